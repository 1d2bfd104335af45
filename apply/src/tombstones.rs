//! Purging mesh tombstones once they are causally stable — never on a timer.
//!
//! A deleted row's version stays in `synapse.row_version` (live = false) so that a concurrent
//! write arriving later is resolved against the delete instead of resurrecting the row. It can
//! go once no such write can arrive any more, which [`purge_round`] establishes in two steps:
//!
//! 1. **Agreement.** Each node's versions of the candidate keys are read, and that node's WAL
//!    position right after. A tombstone qualifies only if every node holds exactly the same
//!    version (vector, clock, live = false). A write committed on a node before its read is in
//!    the version read (the trigger writes both in one transaction), so it is in the agreed
//!    version; a write committed after the read builds on the tombstone and dominates it.
//! 2. **Nothing older in flight.** Writes included in the agreed version may still travel: node
//!    B may know a write of C only through A's merge while C's own change to B is still in the
//!    log. So the round waits until every node's slot has confirmed its read position (all its
//!    earlier writes are in its log) and every node applying that log has applied it up to
//!    there. With a hub, a spoke's writes reach the other spokes in two hops, so this is done
//!    twice (`hops`), the second time from positions read after the first completed.
//!
//! Deleting is then done in three steps, because the nodes cannot delete at one instant: a
//! node that has deleted a tombstone versions its next write of the key from nothing, and a
//! node still holding the tombstone would take that write for an old one and drop it (found
//! by the mesh test: a node cut off while a round deleted left it holding a tombstone that
//! swallowed the other nodes' new writes of the key and diverged).
//!
//! 3. **Mark** the agreed tombstones with the round on every node. Appliers and repair treat a
//!    marked tombstone as no version (a version they receive that it dominates can only be
//!    such a new write), local writes build on it and clear the mark. A round that cannot mark
//!    every node stops here; its marks are harmless, and a later round marks them again.
//! 4. **Complete**: the round is recorded in `synapse.purge_rounds` on every node it reaches.
//! 5. **Delete** the tombstones still marked with a completed round, on every node. A node the
//!    round cannot reach keeps its marked tombstones until a later round, which first deletes
//!    every marked tombstone of a round any node records complete; until then they are
//!    ignored, not resolved against.

use crate::{connect_target, ApplyError};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// One mesh node, as the purge reaches it.
#[derive(Debug, Clone)]
pub struct PurgeNode {
    pub name: String,
    pub target: synapse_postgres::PgConfig,
    /// Its capture's replication slot.
    pub slot: String,
    /// The nodes whose logs it applies.
    pub applies: Vec<String>,
}

/// What one round did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Tombstones every node agreed on.
    pub agreed: usize,
    /// Rows deleted from `synapse.row_version`, over all nodes (marks of earlier rounds too).
    pub deleted: u64,
}

/// A stored version as one comparable text: jsonb prints canonically, so equal versions are
/// equal texts on every node.
const VERSION_TEXT: &str = "(r.vv, r.hlc_ms, r.hlc_lc, r.node, r.cols)::text";

/// One purge round over every node, for up to `batch` tombstones. `log_end(node)` is the offset
/// the next record of `node`'s change log gets; `hops` the longest path a write travels (1 in a
/// mesh, 2 through a hub). Waits at most `patience` for the stability conditions; a round that
/// runs out of it purges nothing and the next one tries again. `round` names this round's
/// marks: distinct from every earlier round's (a clock reading in microseconds serves; only
/// equality is compared).
pub async fn purge_round(
    nodes: &[PurgeNode],
    log_end: impl Fn(&str) -> Option<u64>,
    hops: usize,
    batch: i64,
    patience: Duration,
    round: i64,
) -> Result<Purged, ApplyError> {
    let mut clients = Vec::with_capacity(nodes.len());
    for n in nodes {
        clients.push(connect_target(&n.target).await?);
    }
    // 0. What earlier rounds completed but could not delete everywhere.
    let mut completed = BTreeSet::new();
    for c in &clients {
        for r in c
            .query("SELECT round FROM synapse.purge_rounds", &[])
            .await
            .map_err(ApplyError::target("reading completed purge rounds"))?
        {
            completed.insert(r.get::<_, i64>(0));
        }
    }
    let mut deleted = 0;
    if !completed.is_empty() {
        let rounds: Vec<i64> = completed.into_iter().collect();
        for c in &clients {
            deleted += delete_marked(c, &rounds).await?;
        }
        // Every node was reached and holds no mark of these rounds any more.
        for c in &clients {
            c.execute("DELETE FROM synapse.purge_rounds WHERE round = ANY($1)", &[&rounds])
                .await
                .map_err(ApplyError::target("forgetting finished purge rounds"))?;
        }
        if deleted > 0 {
            tracing::info!(deleted, "finished an interrupted tombstone purge");
        }
    }
    let Some(first) = clients.first() else { return Ok(Purged::default()) };
    let candidates = first
        .query("SELECT tbl, pk::text FROM synapse.row_version WHERE NOT live ORDER BY tbl, pk LIMIT $1", &[&batch])
        .await
        .map_err(ApplyError::target("listing tombstones"))?;
    if candidates.is_empty() {
        return Ok(Purged { agreed: 0, deleted });
    }
    let tbls: Vec<String> = candidates.iter().map(|r| r.get(0)).collect();
    let pks: Vec<String> = candidates.iter().map(|r| r.get(1)).collect();

    // 1. Agreement, and each node's WAL position after its read.
    let mut agreed: Option<HashMap<(String, String), String>> = None;
    let mut read_at = Vec::with_capacity(nodes.len());
    let read = format!(
        "SELECT r.tbl, r.pk::text, r.live, {VERSION_TEXT} FROM synapse.row_version r
         WHERE (r.tbl, r.pk) IN (SELECT t, p::jsonb FROM unnest($1::text[], $2::text[]) AS u(t, p))"
    );
    for c in &clients {
        let mut here = HashMap::new();
        for r in c.query(&read, &[&tbls, &pks]).await.map_err(ApplyError::target("reading tombstones"))? {
            if !r.get::<_, bool>(2) {
                here.insert((r.get(0), r.get(1)), r.get::<_, String>(3));
            }
        }
        let lsn: String = c
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(ApplyError::target("reading the WAL position"))?
            .get(0);
        read_at.push(lsn);
        agreed = Some(match agreed {
            None => here,
            Some(mut a) => {
                a.retain(|k, v| here.get(k) == Some(v));
                a
            }
        });
    }
    let agreed: Vec<((String, String), String)> = agreed.unwrap_or_default().into_iter().collect();
    if agreed.is_empty() {
        return Ok(Purged { agreed: 0, deleted });
    }

    // 2. Every node's writes up to its read are in its log, and applied by its readers.
    let deadline = Instant::now() + patience;
    let not_yet = Purged { agreed: agreed.len(), deleted };
    for hop in 0..hops.max(1) {
        if hop > 0 {
            for (c, lsn) in clients.iter().zip(read_at.iter_mut()) {
                *lsn = c
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                    .map_err(ApplyError::target("reading the WAL position"))?
                    .get(0);
            }
        }
        let mut ends = HashMap::new();
        for ((n, c), lsn) in nodes.iter().zip(&clients).zip(&read_at) {
            if !wait_for(deadline, || slot_passed(c, &n.slot, lsn)).await? {
                return Ok(not_yet);
            }
            match log_end(&n.name) {
                Some(end) => ends.insert(n.name.as_str(), end),
                None => return Ok(not_yet),
            };
        }
        for (n, c) in nodes.iter().zip(&clients) {
            for source in &n.applies {
                let Some(end) = ends.get(source.as_str()) else { return Ok(not_yet) };
                if !wait_for(deadline, || applied_past(c, source, *end)).await? {
                    return Ok(not_yet);
                }
            }
        }
    }

    // 3. Mark on every node (a node that fails stops the round: see the module's docs).
    let (t, (p, v)): (Vec<&str>, (Vec<&str>, Vec<&str>)) =
        agreed.iter().map(|((t, p), v)| (t.as_str(), (p.as_str(), v.as_str()))).unzip();
    for c in &clients {
        c.execute(
            &format!(
                "UPDATE synapse.row_version r SET purge_round = $4
                 FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, p, v)
                 WHERE r.tbl = u.t AND r.pk = u.p::jsonb AND NOT r.live AND {VERSION_TEXT} = u.v"
            ),
            &[&t, &p, &v, &round],
        )
        .await
        .map_err(ApplyError::target("marking stable tombstones"))?;
    }
    // 4. Complete wherever it can be recorded; 5. delete. A node that fails here is finished
    //    by a later round (step 0), once any node records the round complete.
    let mut failed = None;
    let mut recorded = false;
    for c in &clients {
        match c.execute("INSERT INTO synapse.purge_rounds (round) VALUES ($1)", &[&round]).await {
            Ok(_) => recorded = true,
            // The first failure is the one reported; the rest of the nodes are still tried.
            Err(e) => failed = failed.or(Some(ApplyError::target("recording a completed purge round")(e))),
        }
    }
    let mut purged = 0;
    if recorded {
        for c in &clients {
            match delete_marked(c, &[round]).await {
                Ok(n) => purged += n,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
    }
    if recorded {
        let mut per_table: HashMap<&str, u64> = HashMap::new();
        for ((tbl, _), _) in &agreed {
            *per_table.entry(tbl.as_str()).or_default() += 1;
        }
        for (table, n) in per_table {
            metrics::counter!("synapse_mesh_tombstones_purged_total", "table" => table.to_owned()).increment(n);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(Purged { agreed: agreed.len(), deleted: deleted + purged }),
    }
}

/// Deletes the tombstones still marked with one of `rounds` (a write since cleared the mark).
async fn delete_marked(c: &Client, rounds: &[i64]) -> Result<u64, ApplyError> {
    c.execute("DELETE FROM synapse.row_version WHERE NOT live AND purge_round = ANY($1)", &[&rounds])
        .await
        .map_err(ApplyError::target("purging stable tombstones"))
}

async fn slot_passed(c: &Client, slot: &str, lsn: &str) -> Result<bool, ApplyError> {
    let r = c
        .query_opt(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )
        .await
        .map_err(ApplyError::target("reading the capture's slot"))?;
    Ok(r.and_then(|r| r.get::<_, Option<bool>>(0)).unwrap_or(false))
}

async fn applied_past(c: &Client, source: &str, end: u64) -> Result<bool, ApplyError> {
    let r = c
        .query_opt("SELECT next_offset FROM synapse.applied WHERE source_node = $1", &[&source])
        .await
        .map_err(ApplyError::target("reading applied positions"))?;
    Ok(r.is_some_and(|r| r.get::<_, i64>(0) >= end as i64))
}

async fn wait_for<F, Fut>(deadline: Instant, mut check: F) -> Result<bool, ApplyError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, ApplyError>>,
{
    loop {
        if check().await? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
