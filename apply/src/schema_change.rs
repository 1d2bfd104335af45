//! A source's schema change applied in the open target transaction (docs/decisions/0015-ddl-replication.md).

use crate::{target, ApplyError, DdlPolicy, Session};
use synapse_log::{ChangeLog, Offset};
use synapse_schemas::Lsn;

/// SQLSTATEs of a schema change that failed because what it makes already exists or what it
/// removes is gone: duplicate column, table, object; undefined column, table, object.
const ALREADY_CODES: [&str; 6] = ["42701", "42P07", "42710", "42703", "42P01", "42704"];

impl<L: ChangeLog + Clone> Session<'_, L> {
    /// Runs a source's schema change in the open target transaction (see [`ddl`]), unless an
    /// operator recorded it in `synapse.schema_skips`. What this session knew of table shapes
    /// is forgotten: the changes after it bring their new relation versions.
    /// On a hub: emits `change` (as `statement`) again in the applier's transaction, in the form
    /// the capture's event trigger emits, so the hub's capture passes it on to the spokes.
    async fn forward_schema_change(
        &mut self,
        change: &synapse_schemas::SchemaChange,
        statement: &str,
    ) -> Result<(), ApplyError> {
        let Some(publication) = self.applier.config.mesh.as_ref().and_then(|m| m.forward_ddl.clone()) else {
            return Ok(());
        };
        let message = serde_json::json!({
            "tag": change.tag, "sql": statement, "nth": 0, "search_path": change.search_path,
            "tables": change.tables, "types": [], "published_in": [publication], "joined": [], "copy": [],
            "shapes": change.shapes,
        });
        self.client
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&synapse_capture::catalog::DDL_PREFIX, &message.to_string()],
            )
            .await
            .map_err(ApplyError::target("passing a schema change on to the spokes"))?;
        Ok(())
    }

    /// Whether a schema change in a transaction of origin `origin` is this mesh node's own,
    /// sent back by the hub that passed it on: it ran here already.
    pub(crate) fn is_own_echo(&self, origin: Option<&str>) -> bool {
        let Some(name) = self.applier.config.mesh.as_ref().map(|m| m.name.as_str()) else { return false };
        let own = format!("{}{name}@", synapse_schemas::APPLIED_ORIGIN_PREFIX);
        !name.is_empty() && origin.is_some_and(|o| o.starts_with(&own))
    }

    pub(crate) async fn schema_change(
        &mut self,
        offset: Offset,
        commit_lsn: Lsn,
        change: &synapse_schemas::SchemaChange,
    ) -> Result<(), ApplyError> {
        let node = self.applier.config.node.clone();
        // Every table it touches was copied from a snapshot after it (an initial copy at start
        // took a table whose creation the log still held): the copy holds its effect, as it
        // holds the rows committed before it.
        let copied_after = |t: &String| {
            let (schema, table) = t.split_once('.').unwrap_or(("public", t));
            self.sync
                .get(&(schema.to_owned(), table.to_owned()))
                .is_some_and(|(state, lsn)| state == "ready" && lsn.is_some_and(|from| commit_lsn < from))
        };
        if !change.tables.is_empty() && change.tables.iter().all(copied_after) {
            tracing::info!(offset, tag = %change.tag, tables = ?change.tables, "schema change already in the tables' initial copy");
            metrics::counter!("synapse_apply_schema_changes_total", "source" => node.clone(), "outcome" => "in_copy")
                .increment(1);
            return Ok(());
        }
        let skipped = target::schema_skip(&self.client, &node, offset).await?;
        let fail = |statement: String, message: String| ApplyError::SchemaChange {
            source_node: node.clone(),
            offset,
            tag: change.tag.clone(),
            statement,
            message,
        };
        if let Some(by) = skipped {
            tracing::warn!(offset, tag = %change.tag, skipped_by = %by, "skipping a schema change, as synapse.schema_skips says");
            metrics::counter!("synapse_apply_schema_changes_total", "source" => node.clone(), "outcome" => "skipped")
                .increment(1);
            return Ok(());
        }
        let statement = synapse_postgres::ddl::statement(&change.sql, change.nth, &change.tag)
            .map_err(|m| fail(change.sql.clone(), m))?;
        let policy = self.applier.config.ddl;
        if policy == DdlPolicy::Stop {
            return Err(fail(statement, "the source's `ddl: stop` leaves each schema change to the operator".into()));
        }
        let mut outcome = "applied";
        if policy == DdlPolicy::Events {
            tracing::info!(offset, tag = %change.tag, statement, "not running a schema change (ddl: events)");
            outcome = "not_run";
        }
        // The source's search_path for this statement only; the applier qualifies its own. In
        // a savepoint: a type the target already has is kept, and the group goes on.
        let sql = format!(
            "SAVEPOINT synapse_ddl; SET LOCAL search_path TO {}; {statement}; SET LOCAL search_path TO DEFAULT; \
             RELEASE SAVEPOINT synapse_ddl",
            if change.search_path.trim().is_empty() { "''" } else { change.search_path.as_str() }
        );
        let run = if policy == DdlPolicy::Apply { self.client.batch_execute(&sql).await } else { Ok(()) };
        if let Err(e) = run {
            if synapse_postgres::is_transient(&e) {
                return Err(ApplyError::target("running a schema change")(e));
            }
            let creates_type = change.tag == "CREATE TYPE" || change.tag == "CREATE DOMAIN";
            if creates_type && e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) {
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT synapse_ddl; RELEASE SAVEPOINT synapse_ddl")
                    .await
                    .map_err(ApplyError::target("passing a type the target already has"))?;
                tracing::warn!(offset, tag = %change.tag, statement, "the target already has this type: keeping its own (a value it lacks stops this target when it arrives)");
                outcome = "kept";
            } else {
                let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT synapse_ddl; RELEASE SAVEPOINT synapse_ddl")
                    .await
                    .map_err(ApplyError::target("undoing a failed schema change"))?;
                // The same migration run on this mesh node too, concurrently: a statement that
                // failed only because what it makes exists, or what it removes is gone, and left
                // its tables' columns as this node has them, is already applied. On a one-way
                // target the operator decides (the column made by hand may hold other values).
                // Anything else stops this applier, named.
                // An index dropped at the source that this target never had (made there
                // before the target was set up, or dropped here by hand): what the drop leaves
                // is already so, on any target — no rows depend on it.
                let index_absent =
                    change.tag == "DROP INDEX" && e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT);
                let already = index_absent
                    || (self.applier.config.mesh.is_some()
                        && e.code().is_some_and(|c| ALREADY_CODES.contains(&c.code()))
                        && !change.shapes.is_empty()
                        && target::has_shapes(&self.client, &change.shapes).await?);
                if !already {
                    return Err(fail(statement, message));
                }
                tracing::warn!(offset, tag = %change.tag, statement, error = %message, "this node already has what the schema change makes: passed as applied");
                outcome = "already_applied";
            }
        }
        if policy == DdlPolicy::Apply {
            self.reshape_mesh_tables(&change.tables).await?;
        }
        if outcome == "applied" {
            self.forward_schema_change(change, &statement).await?;
        }
        // A table that joined the publication is streamed from here on, like a copied one (a
        // restart must not copy it again); one that joined holding rows the log lacks is owed
        // a copy, which the runtime makes beside the stream.
        if self.applier.config.mesh.is_none() {
            for t in &change.joined {
                let Some((schema, table)) = t.split_once('.') else { continue };
                let state = if change.copy.contains(t) { "owed" } else { "ready" };
                self.copy_owed |= state == "owed";
                self.client
                    .execute(
                        "INSERT INTO synapse.table_sync (source_node, schema_name, table_name, state) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (source_node, schema_name, table_name)
                         DO UPDATE SET state = $4, sync_lsn = NULL, updated_at = now()",
                        &[&node, &schema, &table, &state],
                    )
                    .await
                    .map_err(ApplyError::target("recording a table that joined"))?;
                self.sync.insert((schema.to_owned(), table.to_owned()), (state.to_owned(), None));
                tracing::info!(offset, table = %t, state, "a table joined the capture");
            }
        }
        tracing::info!(offset, tag = %change.tag, tables = ?change.tables, outcome, "applied a schema change");
        metrics::counter!("synapse_apply_schema_changes_total", "source" => node, "outcome" => outcome).increment(1);
        self.schema_changed = true;
        self.tables.clear();
        self.statements.clear();
        Ok(())
    }
}
