//! `fix` for one-way replication (no mesh): each target that applies a source is made to hold
//! the source's rows for the keys a check found differing. Without a mesh there is no
//! causality metadata to resolve by, and none is needed: only the applier writes a one-way
//! target, so the source is the truth by construction; anything else on the target is drift.
//!
//! ```text
//!  each target: BEGIN (session: replica role, replication origin "repair")
//!   1. lock the target's rows of the keys (the applier waits on them, not the reverse)
//!   2. read the source's rows of the keys now (row_to_json)
//!   3. upsert the rows the source has (json_populate_recordset … ON CONFLICT DO UPDATE),
//!      delete the ones it has not
//!   4. COMMIT (--dry-run: ROLLBACK after counting)
//! ```
//!
//! Guarantees:
//! * **Converges with the stream**: the rows are read from the source after the target's are
//!   locked, so they are at least as new as anything the applier wrote; changes still in flight
//!   (committed on the source before the read) are applied afterwards in order and end at the
//!   same row. Nothing the stream will bring is lost.
//! * **Replicated onwards**: the write commits with origin `repair`, not an applier's, so a
//!   capture of the target (a chain a → b → c) streams it further.
//! * Rows move as JSON, which PostgreSQL converts exactly both ways for the common types (see the
//!   integration test); upserts touch no row outside the keys (no delete + insert: foreign keys
//!   with ON DELETE CASCADE elsewhere stay untouched).

use crate::check::KeyDiff;
use crate::fix::{FixReport, NodeChanges, REPAIR_ORIGIN};
use crate::node::{Key, Node, Shape};
use crate::RepairError;
use synapse_postgres::quote;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

/// A target of the source, with a writer session as appliers write.
pub struct OneWayTarget {
    pub node: Node,
    writer: Client,
}

impl OneWayTarget {
    pub async fn connect(name: &str, config: &synapse_postgres::PgConfig) -> Result<OneWayTarget, RepairError> {
        let node = Node::connect(name, config).await?;
        let apply = |source| RepairError::Apply { node: name.to_owned(), source: Box::new(source) };
        let writer = synapse_apply::connect_target(config).await.map_err(apply)?;
        synapse_apply::replica_session(&writer, REPAIR_ORIGIN).await.map_err(apply)?;
        Ok(OneWayTarget { node, writer })
    }
}

/// Makes each of `targets` hold `source`'s rows for the keys of `diffs` that it holds
/// differently (see the module docs).
pub async fn fix_one_way(
    source: &Node,
    targets: &[OneWayTarget],
    shape: &Shape,
    diffs: &[KeyDiff],
    dry_run: bool,
) -> Result<FixReport, RepairError> {
    let mut report =
        FixReport { table: shape.name.clone(), dry_run, keys: diffs.len(), nodes: Vec::new(), unresolved: Vec::new() };
    for target in targets {
        let name = &target.node.name;
        let same_as_source = |d: &KeyDiff| {
            let held = |n: &str| d.holders.iter().position(|g| g.iter().any(|h| h == n));
            match (held(&source.name), held(name)) {
                (None, None) => true,
                (a, b) => a == b,
            }
        };
        let keys: Vec<Key> = diffs.iter().filter(|d| !same_as_source(d)).map(|d| d.key.clone()).collect();
        let changes = if keys.is_empty() {
            NodeChanges { node: name.clone(), ..Default::default() }
        } else {
            copy_rows(source, target, shape, &keys, dry_run).await?
        };
        report.nodes.push(changes);
    }
    Ok(report)
}

async fn copy_rows(
    source: &Node,
    target: &OneWayTarget,
    shape: &Shape,
    keys: &[Key],
    dry_run: bool,
) -> Result<NodeChanges, RepairError> {
    let name = &target.node.name;
    let fail = |context: String| move |source| RepairError::Node { node: name.clone(), context, source };
    let w = &target.writer;
    w.batch_execute("BEGIN").await.map_err(fail("beginning the repair".into()))?;
    let result = async {
        let (join, columns) = shape.key_join(keys);
        let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let locked = format!("SELECT {} FROM {} {join} FOR UPDATE OF t", shape.key_text(), shape.from());
        let present: std::collections::BTreeSet<Key> = w
            .query(&locked, &params)
            .await
            .map_err(fail(format!("locking the rows of {}", shape.name)))?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let rows = source.rows_json(shape, keys).await?;
        let mut changes = NodeChanges { node: name.clone(), ..Default::default() };
        let gone: Vec<Key> = keys
            .iter()
            .filter(|k| !rows.contains_key(k.as_slice()) && present.contains(k.as_slice()))
            .cloned()
            .collect();
        if !rows.is_empty() {
            let key_cols: Vec<String> = shape.columns[..shape.key_len].iter().map(|c| quote::ident(c)).collect();
            let set: Vec<String> =
                shape.columns[shape.key_len..].iter().map(|c| format!("{0} = EXCLUDED.{0}", quote::ident(c))).collect();
            let on_conflict =
                if set.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", set.join(", ")) };
            let sql = format!(
                "INSERT INTO {table} SELECT * FROM json_populate_recordset(NULL::{table}, $1::text::json)
                 ON CONFLICT ({keys}) {on_conflict}",
                table = shape.table,
                keys = key_cols.join(", "),
            );
            let body = format!("[{}]", rows.values().cloned().collect::<Vec<_>>().join(","));
            w.execute(&sql, &[&body]).await.map_err(fail(format!("writing the source's rows into {}", shape.name)))?;
            for k in rows.keys() {
                if present.contains(k) {
                    changes.updated.push(k.clone());
                } else {
                    changes.inserted.push(k.clone());
                }
            }
        }
        if !gone.is_empty() {
            let (join, columns) = shape.key_join(&gone);
            let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            // `USING` takes the unnest as a join partner: the ON condition becomes the WHERE.
            let using = join.replacen("JOIN ", "USING ", 1).replacen(" ON ", " WHERE ", 1);
            let sql = format!("DELETE FROM {} {using}", shape.from());
            w.execute(&sql, &params)
                .await
                .map_err(fail(format!("deleting rows the source has not from {}", shape.name)))?;
            changes.deleted = gone;
        }
        Ok(changes)
    }
    .await;
    let end = if dry_run || result.is_err() { "ROLLBACK" } else { "COMMIT" };
    w.batch_execute(end).await.map_err(fail("ending the repair".into()))?;
    result
}
