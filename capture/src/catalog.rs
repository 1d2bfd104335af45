//! Source-side catalog work: which tables can be captured, the publication, the slot, and the
//! type names that make a `Relation` self-describing for the target.

use crate::CaptureError;
use std::collections::HashMap;
use synapse_postgres::quote;
use synapse_schemas::{Column, Lsn, Relation, ReplicaIdentity, TypeDef};
use tokio_postgres::Client;

/// A table on the source that SynapseDB may capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// Heap pages, for splitting the initial copy into chunks.
    pub pages: i64,
}

impl SourceTable {
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote::ident(&self.schema), quote::ident(&self.name))
    }
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// Tables to capture: `selection` names `schema.table` (or `table` in `public`); empty = every
/// ordinary table outside the system schemas and SynapseDB's own `synapse` schema. Returns (capturable, tables lacking a replica
/// identity). A named table that does not exist is a configuration error.
pub async fn select_tables(
    client: &Client,
    selection: &[String],
) -> Result<(Vec<SourceTable>, Vec<String>), CaptureError> {
    let rows = client
        .query(
            "SELECT c.oid, n.nspname, c.relname, GREATEST(c.relpages, 0)::int8,
                    c.relreplident <> 'n' AND (c.relreplident IN ('f', 'i') OR EXISTS (
                        SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg\\_%'
             ORDER BY 2, 3",
            &[],
        )
        .await
        .map_err(CaptureError::sql("listing source tables"))?;
    let mut all: HashMap<String, (SourceTable, bool)> = HashMap::new();
    let mut order = Vec::new();
    for r in rows {
        let t = SourceTable { oid: r.get(0), schema: r.get(1), name: r.get(2), pages: r.get(3) };
        // SynapseDB's own tables only when named (a mesh publishes synapse.row_version).
        if t.schema != "synapse" {
            order.push(t.display());
        }
        all.insert(t.display(), (t, r.get(4)));
    }
    let wanted: Vec<String> = if selection.is_empty() {
        order
    } else {
        let mut v = Vec::new();
        for (i, s) in selection.iter().enumerate() {
            let full = if s.contains('.') { s.clone() } else { format!("public.{s}") };
            if !all.contains_key(&full) {
                return Err(CaptureError::Config {
                    field: format!("source.tables[{i}]"),
                    message: format!("table `{full}` does not exist on the source (or is not an ordinary table)"),
                });
            }
            v.push(full);
        }
        v
    };
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for name in wanted {
        if let Some((t, has_identity)) = all.remove(&name) {
            if has_identity {
                ok.push(t);
            } else {
                bad.push(name);
            }
        }
    }
    Ok((ok, bad))
}

/// Creates the publication for `tables`, or adds the ones it lacks.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[SourceTable],
) -> Result<(), CaptureError> {
    let existing = client
        .query("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1", &[&publication])
        .await
        .map_err(CaptureError::sql("reading the publication"))?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(CaptureError::sql("reading the publication"))?
        .is_some();
    let have: Vec<String> =
        existing.iter().map(|r| format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1))).collect();
    let missing: Vec<String> =
        tables.iter().filter(|t| !have.contains(&t.display())).map(SourceTable::quoted).collect();
    let sql = if !exists {
        if missing.is_empty() {
            format!("CREATE PUBLICATION {}", quote::ident(publication))
        } else {
            format!("CREATE PUBLICATION {} FOR TABLE {}", quote::ident(publication), missing.join(", "))
        }
    } else if !missing.is_empty() {
        format!("ALTER PUBLICATION {} ADD TABLE {}", quote::ident(publication), missing.join(", "))
    } else {
        return Ok(());
    };
    tracing::info!(%publication, tables = missing.len(), "updating publication");
    client.batch_execute(&sql).await.map_err(CaptureError::sql(format!("running `{sql}`")))
}

#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush: Option<Lsn>,
    pub active: bool,
    pub lag_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (the server removed WAL the slot needs).
    pub wal_status: Option<String>,
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, CaptureError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, active,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, wal_status
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(CaptureError::sql("reading the replication slot"))?;
    Ok(row.map(|r| SlotState {
        confirmed_flush: r.get::<_, Option<String>>(0).and_then(|s| s.parse().ok()),
        active: r.get(1),
        lag_bytes: r.get(2),
        wal_status: r.get(3),
    }))
}

/// Resolves type names, domain base types and array element types, with a cache.
#[derive(Default)]
pub struct TypeResolver {
    cache: HashMap<(u32, i32), (String, u32, u32)>,
    /// Creation statements of user-defined types, by OID (empty: a built-in or unsupported type).
    defs: HashMap<u32, Vec<TypeDef>>,
}

impl TypeResolver {
    /// What a target must create for type `oid`: enums and domains (a domain's enum base and an
    /// array's enum or domain element first). Other kinds (composite, range) are not created;
    /// the applier reports them by name if the target lacks them.
    async fn defs_of(&mut self, client: &Client, oid: u32, depth: u8) -> Result<Vec<TypeDef>, CaptureError> {
        if let Some(d) = self.defs.get(&oid) {
            return Ok(d.clone());
        }
        let row = client
            .query_opt(
                "SELECT ty.typtype::text, ty.typbasetype, n.nspname, ty.typname::text,
                        format_type(ty.typbasetype, ty.typtypmod), ty.typdefault, ty.typnotnull,
                        (SELECT array_agg(en.enumlabel::text ORDER BY en.enumsortorder) FROM pg_enum en WHERE en.enumtypid = ty.oid),
                        (SELECT array_agg(quote_ident(c.conname) || ' ' || pg_get_constraintdef(c.oid) ORDER BY c.conname)
                           FROM pg_constraint c WHERE c.contypid = ty.oid),
                        CASE WHEN ty.typcategory = 'A' THEN ty.typelem ELSE 0::oid END
                 FROM pg_type ty JOIN pg_namespace n ON n.oid = ty.typnamespace
                 WHERE ty.oid = $1 AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
                &[&oid],
            )
            .await
            .map_err(CaptureError::sql("reading a user-defined type"))?;
        let mut defs = Vec::new();
        if let Some(r) = row {
            let (kind, base, schema, name): (String, u32, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
            let qualified = format!("{}.{}", quote::ident(&schema), quote::ident(&name));
            let element: u32 = r.get(9);
            match kind.as_str() {
                "e" => {
                    let labels: Vec<String> = r.get::<_, Option<Vec<String>>>(7).unwrap_or_default();
                    let labels: Vec<String> = labels.iter().map(|l| quote::literal(l)).collect();
                    defs.push(TypeDef {
                        ddl: format!("CREATE TYPE {qualified} AS ENUM ({})", labels.join(", ")),
                        name: qualified,
                        schema,
                    });
                }
                "d" => {
                    // Recursion is bounded: a domain over a domain over … stops at four levels.
                    if depth < 4 {
                        defs.extend(Box::pin(self.defs_of(client, base, depth + 1)).await?);
                    }
                    let mut ddl = format!("CREATE DOMAIN {qualified} AS {}", r.get::<_, String>(4));
                    if let Some(default) = r.get::<_, Option<String>>(5) {
                        ddl.push_str(&format!(" DEFAULT {default}"));
                    }
                    if r.get::<_, bool>(6) {
                        ddl.push_str(" NOT NULL");
                    }
                    for c in r.get::<_, Option<Vec<String>>>(8).unwrap_or_default() {
                        ddl.push_str(&format!(" CONSTRAINT {c}"));
                    }
                    defs.push(TypeDef { name: qualified, schema, ddl });
                }
                _ if element != 0 && depth < 4 => {
                    defs.extend(Box::pin(self.defs_of(client, element, depth + 1)).await?)
                }
                _ => {}
            }
        }
        self.defs.insert(oid, defs.clone());
        Ok(defs)
    }
}

impl TypeResolver {
    /// Fills `type_name`, `base_type_oid` and `element_type_oid` of `columns`.
    pub async fn resolve(&mut self, client: &Client, columns: &mut [Column]) -> Result<(), CaptureError> {
        let mut missing: Vec<(u32, i32)> =
            columns.iter().map(|c| (c.type_oid, c.type_modifier)).filter(|k| !self.cache.contains_key(k)).collect();
        // A type made in the transaction being decoded may not be visible yet (the walsender
        // can decode a commit before its backend leaves the proc array): a user type not found
        // is looked up again for a moment before it is taken as dropped.
        for attempt in 0..20 {
            if missing.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let oids: Vec<u32> = missing.iter().map(|k| k.0).collect();
            let mods: Vec<i32> = missing.iter().map(|k| k.1).collect();
            let rows = client
                .query(
                    "SELECT m.oid, m.typmod, format_type(m.oid, NULLIF(m.typmod, -1)),
                            b.oid,
                            CASE WHEN b.typcategory = 'A' THEN
                                 CASE WHEN e.typtype = 'd' THEN e.typbasetype ELSE e.oid END
                            ELSE 0::oid END
                     FROM unnest($1::oid[], $2::int4[]) AS m(oid, typmod)
                     JOIN pg_type t ON t.oid = m.oid
                     JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
                     LEFT JOIN pg_type e ON e.oid = b.typelem",
                    &[&oids, &mods],
                )
                .await
                .map_err(CaptureError::sql("resolving column types"))?;
            for r in rows {
                let elem: Option<u32> = r.get(4);
                self.cache.insert((r.get(0), r.get(1)), (r.get(2), r.get(3), elem.unwrap_or(0)));
            }
            missing.retain(|k| !self.cache.contains_key(k));
        }
        for c in columns {
            // A type dropped since the change was written keeps its OID as its name: values stay text.
            let (name, base, elem) = self.cache.get(&(c.type_oid, c.type_modifier)).cloned().unwrap_or((
                c.type_oid.to_string(),
                c.type_oid,
                0,
            ));
            c.type_name = name;
            c.base_type_oid = base;
            c.element_type_oid = elem;
            // Built-in types (OIDs below 16384, FirstNormalObjectId) need nothing created.
            c.type_defs = if c.type_oid >= 16_384 { self.defs_of(client, c.type_oid, 0).await? } else { Vec::new() };
        }
        Ok(())
    }
}

/// The current definition of a source table as a `Relation` (what the target table is created
/// from, and what the initial copy writes).
pub async fn describe_table(
    client: &Client,
    types: &mut TypeResolver,
    table: &SourceTable,
) -> Result<Relation, CaptureError> {
    let rows = client
        .query(
            "SELECT a.attname, a.atttypid, a.atttypmod,
                    c.relreplident = 'f' OR a.attnum = ANY(COALESCE((
                        SELECT i.indkey::int2[] FROM pg_index i WHERE i.indrelid = c.oid AND
                            CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END
                        LIMIT 1), '{}')),
                    c.relreplident::text
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&table.oid],
        )
        .await
        .map_err(CaptureError::sql(format!("describing table {}", table.display())))?;
    let identity = rows.first().map(|r| r.get::<_, String>(4)).unwrap_or_default();
    let mut columns: Vec<Column> = rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
            type_name: String::new(),
            base_type_oid: 0,
            element_type_oid: 0,
            is_key: r.get(3),
            type_defs: Vec::new(),
        })
        .collect();
    types.resolve(client, &mut columns).await?;
    Ok(Relation {
        oid: table.oid,
        schema: table.schema.clone(),
        table: table.name.clone(),
        replica_identity: ReplicaIdentity::from_pgoutput(identity.bytes().next().unwrap_or(b'd'))
            .unwrap_or(ReplicaIdentity::Default),
        columns,
    })
}

/// The prefix of the messages [`DDL_CAPTURE`] emits.
pub const DDL_PREFIX: &str = "synapse.ddl";

/// The source's DDL capture: an event trigger that emits each schema change as a transactional
/// logical message, so it is decoded at its place in the transaction, in commit order with the
/// rows. The message carries the client's text, which of its DDL statements this is (a string
/// of several fires once per statement; `nth` counts them per client message), the
/// search_path, and the tables the statement touched. No `SET search_path` on the function: it
/// must see the caller's; everything in it is schema-qualified instead. Appliers run as
/// `session_replication_role = replica`, where event triggers enabled the default way do not
/// fire: what SynapseDB applies is not captured again, nor what a session marked
/// `synapse.own_ddl = on` runs (SynapseDB's own triggers and indexes on each node). SynapseDB's own tables (`synapse.*`,
/// which a mesh publishes) are left out: every node migrates its own.
pub const DDL_CAPTURE: &str = concat!(
    r#"
CREATE SCHEMA IF NOT EXISTS synapse;
-- The publications of captures that select every table: new tables join them.
CREATE TABLE IF NOT EXISTS synapse.capture_publications (publication text PRIMARY KEY);
-- The trigger runs as the application's role, which may use these two (not the table).
GRANT USAGE ON SCHEMA synapse TO PUBLIC;
CREATE OR REPLACE FUNCTION synapse.all_tables_publications() RETURNS jsonb
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $fn$ SELECT coalesce(jsonb_agg(publication), '[]') FROM synapse.capture_publications $fn$;
-- Adds keyed tables of `rels` to the all-tables publications that lack them; returns their
-- names. Run as synapse's role (the publication's owner), with a fixed search_path. Anyone
-- may call it: it only does what those captures do at their next start anyway.
CREATE OR REPLACE FUNCTION synapse.join_capture(rels oid[]) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    pub text;
    rel oid;
    own text := current_setting('synapse.own_ddl', true);
    joined jsonb := '[]';
BEGIN
    FOR pub, rel IN
        SELECT a.publication, t.oid FROM synapse.capture_publications a
          JOIN pg_publication p ON p.pubname = a.publication AND NOT p.puballtables
          JOIN pg_class t ON t.oid = ANY (rels)
          JOIN pg_namespace tn ON tn.oid = t.relnamespace
         WHERE t.relkind IN ('r', 'p') AND NOT t.relispartition AND t.relpersistence = 'p'
           AND tn.nspname NOT IN ('synapse', 'pg_catalog', 'information_schema')
           AND (t.relreplident IN ('f', 'i') OR (t.relreplident = 'd' AND EXISTS (
                SELECT 1 FROM pg_index x WHERE x.indrelid = t.oid AND x.indisprimary)))
           AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prpubid = p.oid AND r.prrelid = t.oid)
    LOOP
        -- Not a schema change of the application's: not captured.
        PERFORM set_config('synapse.own_ddl', 'on', true);
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', pub, rel::regclass);
        PERFORM set_config('synapse.own_ddl', coalesce(own, ''), true);
        SELECT joined || jsonb_build_array(tn.nspname || '.' || t.relname) INTO joined
          FROM pg_class t JOIN pg_namespace tn ON tn.oid = t.relnamespace WHERE t.oid = rel;
    END LOOP;
    RETURN (SELECT coalesce(jsonb_agg(DISTINCT j), '[]') FROM jsonb_array_elements(joined) j);
END
$fn$;
-- Before a DROP INDEX: the tables of the published tables' indexes, while the catalog still
-- has them (at sql_drop an index's row is gone, and with it which table it served).
CREATE OR REPLACE FUNCTION synapse.capture_ddl_start() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF pg_catalog.current_setting('synapse.own_ddl', true) = 'on' THEN RETURN; END IF;
    PERFORM pg_catalog.set_config('synapse.index_owners', coalesce((
        SELECT pg_catalog.jsonb_object_agg(i.indexrelid::text, p.schemaname || '.' || p.tablename)
          FROM pg_catalog.pg_publication_tables p
          JOIN pg_catalog.pg_index i ON i.indrelid = (pg_catalog.quote_ident(p.schemaname) || '.'
               || pg_catalog.quote_ident(p.tablename))::pg_catalog.regclass), '{}')::text, true);
END
$fn$;
CREATE OR REPLACE FUNCTION synapse.capture_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
DECLARE
    rels oid[];
    tables jsonb;
    index_tables jsonb;
    types jsonb;
    shapes jsonb;
    pubs jsonb;
    joined jsonb := '[]';
    owed jsonb := '[]';
    n integer := 0;
    -- One client message (its text, when it arrived) is one string of statements, even one
    -- that commits in between: the count is the session's, kept per message.
    q text := pg_catalog.md5(pg_catalog.current_query()) || '@' || pg_catalog.statement_timestamp()::text;
BEGIN
    -- SynapseDB's own schema work on application tables (repair's triggers and indexes, the
    -- mesh's triggers) is each node's own: every node gets it from synapse directly.
    IF pg_catalog.current_setting('synapse.own_ddl', true) = 'on' THEN RETURN; END IF;
    IF pg_catalog.current_setting('synapse.ddl_query', true) = q THEN
        n := pg_catalog.current_setting('synapse.ddl_n')::integer + 1;
    END IF;
    IF TG_EVENT = 'sql_drop' THEN
        -- Before its statement's ddl_command_end, which counts it. ALTER … DROP is caught there.
        IF TG_TAG NOT LIKE 'DROP %' THEN RETURN; END IF;
        SELECT pg_catalog.jsonb_agg(DISTINCT d.address_names[1] || '.' || d.address_names[2])
          INTO tables FROM pg_catalog.pg_event_trigger_dropped_objects() d
         WHERE d.original AND NOT d.is_temporary AND d.object_type = 'table' AND d.address_names[1] <> 'synapse';
        -- A dropped index of a published table (its table noted before the drop).
        SELECT pg_catalog.jsonb_agg(DISTINCT o.value) INTO index_tables
          FROM pg_catalog.pg_event_trigger_dropped_objects() d
          JOIN pg_catalog.jsonb_each_text(coalesce(nullif(pg_catalog.current_setting('synapse.index_owners', true), ''),
               '{}')::jsonb) o ON o.key = d.objid::text
         WHERE d.original AND d.object_type = 'index';
        IF index_tables IS NOT NULL THEN
            tables := coalesce(tables, '[]') || index_tables;
            SELECT pg_catalog.jsonb_agg(DISTINCT p.pubname) INTO pubs FROM pg_catalog.pg_publication_tables p
             WHERE index_tables ? (p.schemaname || '.' || p.tablename);
        END IF;
        SELECT pg_catalog.jsonb_agg(DISTINCT d.object_identity) INTO types
          FROM pg_catalog.pg_event_trigger_dropped_objects() d
         WHERE d.original AND NOT d.is_temporary AND d.object_type IN ('type', 'domain')
           AND d.schema_name <> 'synapse';
        -- Gone from the publications by the time the message is decoded: say which held them.
        SELECT coalesce(pubs, '[]') || coalesce(pg_catalog.jsonb_agg(DISTINCT d.address_args[1]), '[]') INTO pubs
          FROM pg_catalog.pg_event_trigger_dropped_objects() d WHERE d.object_type = 'publication relation';
    ELSE
        PERFORM pg_catalog.set_config('synapse.ddl_query', q, false);
        PERFORM pg_catalog.set_config('synapse.ddl_n', n::text, false);
        IF TG_TAG LIKE 'DROP %' THEN RETURN; END IF;
        SELECT pg_catalog.array_agg(DISTINCT c.oid)
          INTO rels
          FROM "#,
    synapse_postgres::ddl_command_tables!(),
    r#"
         WHERE NOT e.in_extension AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
           AND tn.nspname <> 'synapse';
        SELECT pg_catalog.jsonb_agg(tn.nspname || '.' || t.relname),
               -- The columns after the statement, for consumers of the stream.
               pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('table', tn.nspname || '.' || t.relname,
                   'columns', (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('name', a.attname,
                       'type', pg_catalog.format_type(a.atttypid, a.atttypmod)) ORDER BY a.attnum)
                     FROM pg_catalog.pg_attribute a WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped)))
          INTO tables, shapes
          FROM pg_catalog.pg_class t JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
         WHERE t.oid = ANY (rels);
        -- Enum and domain types (an enum's new value, a domain's new check): a table may use
        -- them next, so every target needs them first.
        SELECT pg_catalog.jsonb_agg(DISTINCT e.object_identity) INTO types
          FROM pg_catalog.pg_event_trigger_ddl_commands() e
          JOIN pg_catalog.pg_type ty ON e.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND ty.oid = e.objid
         WHERE NOT e.in_extension AND e.schema_name <> 'synapse' AND NOT pg_catalog.starts_with(e.schema_name, 'pg_temp')
           AND ty.typtype IN ('e', 'd');
        -- A table made (or given a key) under a capture that selects every table joins its
        -- publication here, in the same transaction, so its next rows are decoded as
        -- published. Only a plain CREATE TABLE is sure to be empty then; a table that joins
        -- by another statement (CREATE TABLE AS, a key added later) may hold rows the stream
        -- never carried: the message asks the targets to copy it. The application's role
        -- may not alter the publication: a function of synapse's does, for keyed tables only.
        IF rels IS NOT NULL THEN
            joined := synapse.join_capture(rels);
            IF TG_TAG <> 'CREATE TABLE' THEN
                owed := joined;
            END IF;
        END IF;
        -- Read here, in the statement's own transaction: when the message is decoded the
        -- catalog may not show the commit yet (the walsender can decode a commit before its
        -- backend leaves the proc array), or may show a later statement's (a drop).
        SELECT pg_catalog.jsonb_agg(DISTINCT p.pubname) INTO pubs FROM pg_catalog.pg_publication_tables p
         WHERE tables ? (p.schemaname || '.' || p.tablename);
        -- A table made without a key yet is made on the targets all the same under such a
        -- capture: the statement that keys it later joins it, and runs there.
        IF TG_TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO') THEN
            pubs := coalesce(pubs, '[]') || synapse.all_tables_publications();
        END IF;
    END IF;
    IF tables IS NULL AND types IS NULL THEN RETURN; END IF;
    PERFORM pg_catalog.pg_logical_emit_message(true, 'synapse.ddl', pg_catalog.jsonb_build_object(
        'tag', TG_TAG, 'sql', pg_catalog.current_query(), 'nth', n,
        'search_path', pg_catalog.current_setting('search_path'), 'tables', coalesce(tables, '[]'),
        'types', coalesce(types, '[]'), 'published_in', coalesce(pubs, '[]'), 'joined', joined, 'copy', owed,
        'shapes', coalesce(shapes, '[]'))::text);
END
$fn$;
"#,
    synapse_postgres::create_event_trigger!("synapse_ddl_end", "ddl_command_end", "synapse.capture_ddl"),
    synapse_postgres::create_event_trigger!("synapse_ddl_drop", "sql_drop", "synapse.capture_ddl"),
    "DO $do$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'synapse_ddl_start') THEN
        CREATE EVENT TRIGGER synapse_ddl_start ON ddl_command_start WHEN TAG IN ('DROP INDEX')
        EXECUTE FUNCTION synapse.capture_ddl_start(); END IF; END $do$;",
);

/// Installs [`DDL_CAPTURE`] on the source (idempotent). `Ok(false)`: the role may not create
/// event triggers (superuser only; `rds_superuser` and the like on managed services).
/// `all_tables`: whether `publication` is kept to every keyed table, so new ones join it.
pub async fn install_ddl_capture(client: &Client, publication: &str, all_tables: bool) -> Result<bool, CaptureError> {
    // The node schema's lock: an applier migrating this node creates schema `synapse` too.
    let lock = synapse_postgres::node_schema::LOCK;
    let publication = quote::literal(publication);
    let join = if all_tables {
        format!("INSERT INTO synapse.capture_publications VALUES ({publication}) ON CONFLICT DO NOTHING;")
    } else {
        format!("DELETE FROM synapse.capture_publications WHERE publication = {publication};")
    };
    let sql = format!("BEGIN; SELECT pg_advisory_xact_lock({lock}); {DDL_CAPTURE} {join} COMMIT;");
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Ok(false)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(CaptureError::sql("installing the DDL capture (event triggers)")(e))
        }
    }
}
