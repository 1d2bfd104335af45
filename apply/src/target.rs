//! The target side: SynapseDB's own state tables, and target tables created or extended from
//! the source's definition.

use crate::ApplyError;
use std::collections::HashMap;
use synapse_postgres::quote;
use synapse_schemas::{Lsn, Relation, ReplicaIdentity};
use tokio_postgres::Client;

/// Brings the target's `synapse.*` tables (position and sync state, kept next to the data they
/// describe so one target transaction commits both) to this release's version.
pub async fn setup_state(client: &Client) -> Result<(), ApplyError> {
    synapse_postgres::node_schema::migrate(client).await?;
    Ok(())
}

/// Takes the target-side lock that makes this session the only applier of `node` here (held
/// until the connection closes, so a killed process releases it). Two appliers of one source
/// would both apply the transactions after the stored position: the second waits instead.
pub async fn lock_applier(client: &Client, node: &str) -> Result<(), ApplyError> {
    let key = format!("synapse.apply/{node}");
    let row = client
        .query_one("SELECT pg_try_advisory_lock(hashtext('synapse'), hashtext($1))", &[&key])
        .await
        .map_err(ApplyError::target("taking the applier lock"))?;
    if row.get::<_, bool>(0) {
        return Ok(());
    }
    let holder = client
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = hashtext('synapse')::oid
               AND objid = hashtext($1)::oid AND granted AND pid <> pg_backend_pid() LIMIT 1",
            &[&key],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, i32>(0));
    Err(ApplyError::Busy { node: node.to_owned(), holder })
}

/// The next log offset to apply for `node` and the commit LSN of the last transaction applied
/// (stored together: see `resume.rs`), if it ever applied anything.
pub async fn load_position(client: &Client, node: &str) -> Result<Option<(u64, Lsn)>, ApplyError> {
    let row = client
        .query_opt("SELECT next_offset, commit_lsn::text FROM synapse.applied WHERE source_node = $1", &[&node])
        .await
        .map_err(ApplyError::target("reading the applied position"))?;
    Ok(row.map(|r| {
        let lsn: String = r.get(1);
        (r.get::<_, i64>(0) as u64, lsn.parse().unwrap_or_default())
    }))
}

/// Who asked to pass `node`'s schema change at log `offset`, if an operator recorded it in
/// `synapse.schema_skips` (`synapse skip-ddl`).
pub async fn schema_skip(client: &Client, node: &str, offset: u64) -> Result<Option<String>, ApplyError> {
    let row = client
        .query_opt(
            "SELECT skipped_by FROM synapse.schema_skips WHERE source_node = $1 AND log_offset = $2",
            &[&node, &(offset as i64)],
        )
        .await
        .map_err(ApplyError::target("reading the schema changes to skip"))?;
    Ok(row.map(|r| r.get(0)))
}

/// Records that the applier of `node` passes the schema change at log `offset` here (read by
/// [`schema_skip`]). False when it was already recorded.
pub async fn record_schema_skip(client: &Client, node: &str, offset: u64, by: &str) -> Result<bool, ApplyError> {
    let inserted = client
        .execute(
            "INSERT INTO synapse.schema_skips (source_node, log_offset, skipped_by) VALUES ($1, $2, $3)
             ON CONFLICT (source_node, log_offset) DO NOTHING",
            &[&node, &(offset as i64), &by],
        )
        .await
        .map_err(ApplyError::target("recording a schema change to skip"))?;
    Ok(inserted == 1)
}

/// Tables copied by the initial copy, with the LSN from which streamed changes apply to them.
pub async fn load_sync(
    client: &Client,
    node: &str,
) -> Result<HashMap<(String, String), (String, Option<Lsn>)>, ApplyError> {
    let rows = client
        .query(
            "SELECT schema_name, table_name, state, sync_lsn::text FROM synapse.table_sync WHERE source_node = $1",
            &[&node],
        )
        .await
        .map_err(ApplyError::target("reading table sync state"))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let lsn: Option<String> = r.get(3);
            ((r.get(0), r.get(1)), (r.get(2), lsn.and_then(|s| s.parse().ok())))
        })
        .collect())
}

/// A target table ready to receive changes of one source relation version.
#[derive(Debug, Clone)]
pub struct TargetTable {
    pub name: String,
    /// For each source column, the target type to cast text values to.
    pub casts: Vec<String>,
    /// For each source column, the target column's type OID.
    pub type_oids: Vec<u32>,
    /// For each source column, how COPY's binary format carries its text, when every column
    /// has a binary encoder (see `copy_binary.rs`); inserts are written in text otherwise.
    pub binary: Option<Vec<crate::copy_binary::Field>>,
}

impl TargetTable {
    /// Whether COPY's binary format can carry `rel`'s rows here: every column has the same
    /// built-in type on both sides (binary arrays and records embed type OIDs, which differ
    /// between clusters for user-defined types).
    pub fn binary_compatible(&self, rel: &Relation) -> bool {
        const FIRST_USER_OID: u32 = 16_384;
        rel.columns.iter().zip(&self.type_oids).all(|(c, t)| c.type_oid == *t && c.type_oid < FIRST_USER_OID)
    }
}

/// Finds the target table for `rel`; creates it (and its schema) from the source definition if
/// missing, and adds columns the source has and the target lacks.
/// Creates the enum and domain types `rel`'s columns use and the target lacks (from the
/// definitions capture read on the source).
async fn ensure_types(client: &Client, rel: &Relation) -> Result<(), ApplyError> {
    let mut seen = std::collections::HashSet::new();
    for def in rel.columns.iter().flat_map(|c| &c.type_defs) {
        if !seen.insert(def.name.as_str()) {
            continue;
        }
        let exists = client
            .query_one("SELECT to_regtype($1) IS NOT NULL", &[&def.name])
            .await
            .map_err(ApplyError::target(format!("looking up type {}", def.name)))?;
        if exists.get::<_, bool>(0) {
            continue;
        }
        tracing::info!(table = %rel.name(), r#type = %def.name, "creating missing type from the source definition");
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}; {}", quote::ident(&def.schema), def.ddl))
            .await
            .map_err(|e| {
                schema_error(&rel.name(), e, |e| {
                    format!("type {} could not be created from the source definition ({}): {e}", def.name, def.ddl)
                })
            })?;
    }
    Ok(())
}

/// A target table that cannot be made as the source's: definite, unless the connection (or
/// the server) failed on the way, which is retried like any lost connection.
fn schema_error(
    table: &str,
    e: tokio_postgres::Error,
    message: impl FnOnce(&tokio_postgres::Error) -> String,
) -> ApplyError {
    if synapse_postgres::is_transient(&e) {
        return ApplyError::target(format!("shaping table {table} on the target"))(e);
    }
    ApplyError::Schema { table: table.to_owned(), message: message(&e) }
}

/// `add_columns`: add the source's columns the table lacks. Not for a mesh table: a column a
/// peer still sends that this node lacks is one this node dropped or renamed, and that change is
/// on its way to the peer; its values are not written here.
pub async fn ensure_table(client: &Client, rel: &Relation, add_columns: bool) -> Result<TargetTable, ApplyError> {
    let name = rel.quoted_name();
    let mut cols = target_columns(client, &name).await?;
    if cols.is_none() || rel.columns.iter().any(|c| !c.type_defs.is_empty()) {
        ensure_types(client, rel).await?;
    }
    if cols.is_none() {
        let defs: Vec<String> =
            rel.columns.iter().map(|c| format!("{} {}", quote::ident(&c.name), c.type_name)).collect();
        let keys: Vec<String> = rel.key_columns().map(|(_, c)| quote::ident(&c.name)).collect();
        let pk = if rel.replica_identity != ReplicaIdentity::Full && !keys.is_empty() {
            format!(", PRIMARY KEY ({})", keys.join(", "))
        } else {
            String::new()
        };
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {name} ({}{pk})",
            quote::ident(&rel.schema),
            defs.join(", ")
        );
        tracing::info!(table = %rel.name(), "creating missing target table from the source definition");
        client.batch_execute(&ddl).await.map_err(|e| {
            schema_error(&rel.name(), e, |e| format!("could not create it from the source definition ({ddl}): {e}"))
        })?;
        cols = target_columns(client, &name).await?;
    }
    let mut cols = cols.unwrap_or_default();
    for c in &rel.columns {
        if add_columns && !cols.contains_key(&c.name) {
            let ddl = format!("ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {} {}", quote::ident(&c.name), c.type_name);
            tracing::info!(table = %rel.name(), column = %c.name, "adding column the source has");
            client.batch_execute(&ddl).await.map_err(|e| {
                schema_error(&rel.name(), e, |e| format!("missing column {} could not be added: {e}", c.name))
            })?;
            cols = target_columns(client, &name).await?.unwrap_or_default();
        }
    }
    let casts =
        rel.columns.iter().map(|c| cols.get(&c.name).map(|t| t.0.clone()).unwrap_or_else(|| "text".into())).collect();
    let type_oids = rel.columns.iter().map(|c| cols.get(&c.name).map(|t| t.1).unwrap_or(0)).collect();
    let mut table = TargetTable { name, casts, type_oids, binary: None };
    if table.binary_compatible(rel) {
        table.binary = rel.columns.iter().map(|c| crate::copy_binary::Field::for_type(c.type_oid)).collect();
    }
    Ok(table)
}

/// Column name → (type name for casts, type OID).
async fn target_columns(client: &Client, quoted: &str) -> Result<Option<HashMap<String, (String, u32)>>, ApplyError> {
    let exists = client
        .query_one("SELECT to_regclass($1)::oid", &[&quoted])
        .await
        .map_err(ApplyError::target(format!("looking up {quoted}")))?;
    let Some(oid) = exists.get::<_, Option<u32>>(0) else { return Ok(None) };
    let rows = client
        .query(
            "SELECT attname, format_type(atttypid, NULL), atttypid FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
            &[&oid],
        )
        .await
        .map_err(ApplyError::target(format!("reading columns of {quoted}")))?;
    Ok(Some(rows.into_iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect()))
}

/// Whether every table of `shapes` has, on the target, each of those columns with its type
/// (and perhaps more: a mesh node may have added its own concurrently).
pub(crate) async fn has_shapes(client: &Client, shapes: &[synapse_schemas::TableShape]) -> Result<bool, ApplyError> {
    for shape in shapes {
        let Some((schema, table)) = shape.table.split_once('.') else { return Ok(false) };
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&schema, &table],
            )
            .await
            .map_err(ApplyError::target(format!("reading the columns of {}", shape.table)))?;
        let here: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if rows.is_empty() || shape.columns.iter().any(|c| here.get(&c.name) != Some(&c.type_name)) {
            return Ok(false);
        }
    }
    Ok(true)
}
