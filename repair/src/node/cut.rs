//! The cut: where each node's appliers stand, so changes in flight are not taken for drift.

use super::*;

impl Node {
    /// Writes a cut marker into this node's WAL (a transactional logical message, so its
    /// transaction reaches the log and every applier of this node records passing it) and
    /// returns its position: a change committed before it is applied elsewhere once the
    /// applier's position is past it.
    pub async fn mark_cut(&self) -> Result<Lsn, RepairError> {
        let row = self
            .row("SELECT pg_logical_emit_message(true, 'synapse_repair_cut', '')::text", &[])
            .await
            .map_err(self.fail("writing a cut marker (pg_logical_emit_message)".into()))?;
        Ok(row.get::<_, String>(0).parse().unwrap_or(Lsn(0)))
    }

    /// Positions this node's appliers have applied, by source node: the commit position of
    /// each source's last applied transaction. `None`: no applier ever ran on this node.
    pub async fn applied(&self) -> Result<Option<Vec<(String, Lsn)>>, RepairError> {
        const TABLE: &str = "synapse.applied";
        let fail = self.fail("reading applied positions".into());
        // No such table: this node applies nothing.
        if !self.has_table(TABLE).await.map_err(fail)? {
            return Ok(None);
        }
        let rows = match self.rows("SELECT source_node, commit_lsn::text FROM synapse.applied", &[]).await {
            Ok(rows) => rows,
            Err(e) if self.gone(&e, TABLE) => return Ok(None),
            Err(e) => return Err(self.fail("reading applied positions".into())(e)),
        };
        Ok(Some(rows.into_iter().map(|r| (r.get(0), r.get::<_, String>(1).parse().unwrap_or(Lsn(0)))).collect()))
    }
}

/// The advisory lock key of checks of `table` (an SQL literal).
pub(super) fn lock_key(table: &str) -> String {
    quote::literal(&format!("synapse_repair:{table}"))
}

pub(super) fn unlock_sql(table: &str) -> String {
    format!("SELECT pg_advisory_unlock(hashtext({}));", lock_key(table))
}
