//! `check`: which keys of a table two or more nodes hold differently, with changes in flight
//! told apart from drift.
//!
//! ```text
//!  every node: one snapshot ─▶ bucket digests ─▶ trees (merkle_light): node 0 vs each other
//!              │                 (tracked digests, all in memory: compared directly)
//!              └─ differing buckets' sub-bucket digests              ─▶ differing sub-buckets
//!                 └─ their rows (key, row hash)                        ─▶ candidate keys
//!  cut: a marker in every node's WAL; wait until every applier between the nodes applied it
//!  re-read the candidates by key ─▶ unchanged everywhere since the snapshot: drift
//!                                   changed somewhere: in flight (not reported as drift)
//! ```
//!
//! Why the cut is sound: a change committed before a node's snapshot has a position below
//! that node's marker, so once every applier is past the markers it has reached every node. A
//! candidate whose rows did not change anywhere between the snapshots and the re-read had no
//! change in flight, so its difference is drift; one that changed was being written (or
//! delivered) during the check and is left for the next check.

use crate::node::{Key, Node, Rows, TrackedRead};
use crate::{DigestTree, RepairError};
use futures_util::future::try_join_all;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_schemas::Lsn;

/// How long a check waits for appliers to pass the cut, and whether it waits at all.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub bits: u8,
    /// `None`: compare the snapshots as they are (changes in flight may show as drift).
    pub cut_timeout: Option<Duration>,
    /// Where the rows of differing buckets are remembered between checks (`None`: not).
    pub cache_dir: Option<std::path::PathBuf>,
    /// The appliers between the nodes, as (source, target) names, from the configuration: an
    /// applier that has applied nothing yet has no stored position and must still be waited
    /// for (unless no applier ever ran on its node). `None`: those whose positions the nodes
    /// store.
    pub appliers: Option<Vec<(String, String)>>,
    /// Rounds of the cut: the longest path a change takes between the nodes, in applier hops.
    /// 1 for a full mesh or one-way replication; 2 for hub-and-spoke, where a spoke's change
    /// reaches the other spokes through the hub (see `wait_for_cut`).
    pub cut_rounds: u8,
}

/// How one key differs between the nodes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyDiff {
    pub key: Key,
    /// Nodes without the row.
    pub missing_on: Vec<String>,
    /// Nodes holding the row, grouped by equal rows (one group: all holders agree).
    pub holders: Vec<Vec<String>>,
}

/// What a check of one table found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub table: String,
    pub nodes: Vec<String>,
    /// Rows per node, in the snapshot.
    pub rows: Vec<u64>,
    pub buckets: usize,
    /// How keys are split into buckets: "key hash", or "key range LO..HI" (a scan of a table
    /// keyed by one integer column: differing buckets are read through the key's index).
    pub buckets_by: String,
    pub differing_buckets: usize,
    /// Pairs compared to find them: Merkle tree nodes (scanned digests) or buckets (tracked).
    pub compared: usize,
    /// Keys held differently and unchanged since the snapshots: drift, in key order.
    pub differing: Vec<KeyDiff>,
    /// Keys that differed in the snapshots and changed on some node before the cut was
    /// confirmed: changes in flight, not drift.
    pub changing: Vec<Key>,
    /// Appliers waited for ("source→node"), and how long the cut took; empty without a cut.
    pub cut: Vec<String>,
    pub cut_ms: u64,
    /// "tracked": digests kept current by `repair track`, read after folding `folded` recorded
    /// changes (cost ∝ changes); "scanned": computed by a scan of the table.
    pub digests: String,
    pub folded: u64,
    /// Differing buckets whose rows were taken from the previous check (digests unchanged).
    pub reused_buckets: usize,
}

/// The rows of the differing buckets of the last check of a table between the same nodes,
/// with the digests they had: kept in a JSON file per table and node list (for the next
/// process) and in memory (for the next check of this one).
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Cache {
    nodes: Vec<String>,
    bits: u8,
    /// How keys were split into buckets (see `Report::buckets_by`).
    #[serde(default)]
    buckets_by: String,
    /// Shared between a check's cache and the next one's (most buckets carry over).
    buckets: BTreeMap<usize, Arc<CachedBucket>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedBucket {
    /// Every node's (rows, hash sum) of the bucket.
    fingerprint: String,
    /// The same of each of its sub-buckets that differed: one whose digests are unchanged on
    /// every node holds the rows it held then, in a bucket changed elsewhere.
    subs: BTreeMap<usize, String>,
    /// Per node, its rows of the bucket's differing keys: (sub-bucket, key, row hash). A cache
    /// written before sub-buckets were kept does not parse: the next check reads afresh.
    rows: Vec<NodeRows>,
}

/// One node's rows of a bucket's differing keys: (sub-bucket, key, row hash).
type NodeRows = Vec<(usize, Key, i64)>;

/// This process's caches by file: reading one back from memory saves parsing it (~0.4 ms of
/// a 10 ms incremental check, measured).
static CACHES: std::sync::LazyLock<std::sync::Mutex<HashMap<std::path::PathBuf, Arc<Cache>>>> =
    std::sync::LazyLock::new(Default::default);

impl Cache {
    fn path(dir: &std::path::Path, table: &str) -> std::path::PathBuf {
        let safe: String = table.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
        dir.join(format!("{safe}.json"))
    }

    /// The cache for these nodes and bits, or an empty one (missing, unreadable, other nodes).
    fn load(dir: &std::path::Path, table: &str, nodes: &[String], bits: u8) -> Arc<Cache> {
        let path = Self::path(dir, table);
        let kept = CACHES.lock().ok().and_then(|c| c.get(&path).cloned());
        let cache = kept.or_else(|| {
            let read = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Cache>(&b).ok())?;
            Some(Arc::new(read))
        });
        match cache {
            Some(c) if c.nodes == nodes && c.bits == bits => c,
            _ => Arc::new(Cache { nodes: nodes.to_vec(), bits, buckets_by: String::new(), buckets: BTreeMap::new() }),
        }
    }

    /// Kept in memory at once; written to its file off the check's path (~1 ms of JSON). Best
    /// effort: a cache that cannot be written only makes the next check read more. Each write
    /// goes through its own temporary file, so a file is always one whole cache.
    fn save(self: Arc<Self>, dir: &std::path::Path, table: &str) {
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = Self::path(dir, table);
        if let Ok(mut c) = CACHES.lock() {
            c.insert(path.clone(), self.clone());
        }
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("json.{}.{n}.tmp", std::process::id()));
        let dir = dir.to_owned();
        // A blocking task: the runtime waits for it at shutdown, so a CLI check's cache lands.
        tokio::task::spawn_blocking(move || {
            let written = std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&tmp, serde_json::to_vec(&*self).unwrap_or_default()))
                .and_then(|_| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(path = %path.display(), error = %e, "cannot keep the repair cache");
            }
        });
    }
}

/// Compares `table` on every node of `nodes`: digests in one snapshot per node (all at once),
/// node 0's tree against each other's top-down, the rows of differing buckets, then the cut.
/// Changes no table (the cut markers are WAL messages); with tracked digests it folds the
/// recorded changes into them.
pub async fn check(nodes: &[&Node], table: &str, options: &CheckOptions) -> Result<Report, RepairError> {
    let started = Instant::now();
    // All at once; an error is reported for the first node in order (a table missing
    // everywhere names the first node).
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let cache = options.cache_dir.as_deref().map(|d| Cache::load(d, table, &names, options.bits)).unwrap_or_default();
    // The buckets that differed last time are likely to differ still: read with the digests.
    let want: Vec<usize> = cache.buckets.keys().copied().collect();
    let opened = futures_util::future::join_all(nodes.iter().map(|n| n.open(table, options.bits, &want))).await;
    if opened.iter().any(Result::is_err) {
        // Nodes that opened are closed again; the error is the first node's in order.
        futures_util::future::join_all(
            nodes.iter().zip(&opened).filter(|(_, o)| o.is_ok()).map(|(n, _)| n.close(table)),
        )
        .await;
    }
    let (mut shapes, mut tracked, mut read) =
        (Vec::with_capacity(nodes.len()), Vec::with_capacity(nodes.len()), Vec::with_capacity(nodes.len()));
    for o in opened {
        let o = o?;
        shapes.push(o.shape);
        tracked.push(o.bits);
        read.push(o.tracked);
    }
    // Digests kept current on every node with these bits: fold and read instead of scanning.
    let use_tracked = tracked.iter().all(|b| *b == Some(options.bits));
    let prepared_ms = started.elapsed().as_millis() as u64;
    let result = match same_columns(nodes, table, &shapes) {
        Ok(()) => compare(nodes, table, &shapes, options, use_tracked.then_some(read), cache).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        // A fold that was rolled back must be read again in full.
        for n in nodes {
            n.forget_tracked(table);
        }
        futures_util::future::join_all(nodes.iter().map(|n| n.close(table))).await;
    }
    tracing::debug!(table, prepared_ms, total_ms = started.elapsed().as_millis() as u64, "check phases");
    result
}

/// Two nodes are compared only if the table has the same columns on both.
fn same_columns(nodes: &[&Node], table: &str, shapes: &[crate::node::Shape]) -> Result<(), RepairError> {
    for (n, s) in nodes.iter().zip(shapes).skip(1) {
        if s.columns != shapes[0].columns {
            return Err(RepairError::Table {
                table: table.to_owned(),
                message: format!(
                    "columns differ: {} has {:?}, {} has {:?}",
                    nodes[0].name, shapes[0].columns, n.name, s.columns
                ),
            });
        }
    }
    Ok(())
}

async fn compare(
    nodes: &[&Node],
    table: &str,
    shapes: &[crate::node::Shape],
    options: &CheckOptions,
    // With tracked digests on every node: those read when the table was opened, per node.
    tracked: Option<Vec<Option<TrackedRead>>>,
    cache: Arc<Cache>,
) -> Result<Report, RepairError> {
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let use_tracked = tracked.is_some();
    let t0 = Instant::now();
    let want: &[usize] = &cache.buckets.keys().copied().collect::<Vec<_>>();
    let fine = crate::node::sub_bits(options.bits);
    // A scan splits a table keyed by one integer column into key ranges (the same on every
    // node: from the smallest key any node holds to the largest): the rows of a differing
    // bucket are then read through the key's index, where hash buckets take a second scan.
    let range = if tracked.is_none() && shapes.iter().all(|s| s.int_key()) {
        let ranges = try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.key_range(s))).await?;
        crate::node::range_layout(&ranges, fine)
    } else {
        None
    };
    let buckets_by = match range {
        Some((lo, span)) => format!("key range {lo}..{}", i128::from(lo) + i128::from(span) - 1),
        None => "key hash".to_owned(),
    };
    // Rows remembered for buckets of another layout are of no use.
    let cache = if cache.buckets_by == buckets_by {
        cache
    } else {
        Arc::new(Cache {
            nodes: names.clone(),
            bits: options.bits,
            buckets_by: buckets_by.clone(),
            buckets: BTreeMap::new(),
        })
    };
    let (digests, folded): (Vec<crate::Buckets>, u64) = match tracked {
        Some(read) => {
            let read = try_join_all(nodes.iter().zip(read).map(|(n, r)| async move {
                match r {
                    Some(r) => Ok(r),
                    None => n.tracked_digests(table, options.bits, want).await,
                }
            }))
            .await?;
            let folded = read.iter().map(|r| r.folded).sum();
            (read.into_iter().map(|r| r.buckets).collect(), folded)
        }
        None => match range {
            Some((lo, span)) => (
                try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.range_digests(s, options.bits, lo, span))).await?,
                0,
            ),
            None => (try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.digests(s, options.bits))).await?, 0),
        },
    };
    let t_digests = t0.elapsed();
    let (mut differing, mut compared) = (BTreeSet::new(), 0);
    if use_tracked {
        // Every node's digests are in memory, kept current by deltas (only changed buckets
        // crossed the wire): comparing them directly costs microseconds, where building the
        // two Merkle trees costs ~0.7 ms of a ~8 ms check (measured, 4,096 buckets).
        for d in &digests[1..] {
            differing.extend((0..d.len()).filter(|b| d.get(*b) != digests[0].get(*b)));
            compared += d.len();
        }
    } else {
        let first = DigestTree::build(&digests[0]);
        for d in &digests[1..] {
            let (buckets, c) = first.diff(&DigestTree::build(d))?;
            differing.extend(buckets);
            compared += c;
        }
    }
    let differing: Vec<usize> = differing.into_iter().collect();
    // A differing bucket whose digests on every node are those of the last check holds the
    // rows it held then: reuse them (a check then costs by what changed, not by the drift).
    let bucket_fingerprint = |b: usize| fingerprint(digests.iter().map(|d| d.get(b)));
    let (reused, to_stage): (Vec<usize>, Vec<usize>) =
        differing.iter().partition(|b| cache.buckets.get(b).is_some_and(|c| c.fingerprint == bucket_fingerprint(**b)));
    // Within buckets to read: sub-bucket digests first, then rows of differing sub-buckets.
    // Tracked digests have their sub-buckets' digests kept too, and an index on the sub-bucket;
    // otherwise the buckets' rows are staged on the node and their sub-buckets digested there.
    // Either way only rows of differing sub-buckets cross the wire, and not those of a
    // sub-bucket whose digests are those of the last check (the same rule one level down: a
    // change elsewhere in its bucket leaves its rows as they were).
    let subs = if use_tracked {
        try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.tracked_sub_digests(s, &to_stage))).await?
    } else if let Some(range) = range {
        try_join_all(
            nodes.iter().zip(shapes).map(|(n, s)| n.range_sub_digests(s, (options.bits, fine), range, &to_stage)),
        )
        .await?
    } else {
        try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.stage(s, options.bits, fine, &to_stage))).await?
    };
    let sub_fingerprint = |sub: usize| fingerprint(subs.iter().map(|m| m.get(&sub).copied()));
    let differing_now = differing_subs(&subs);
    let (reused_subs, read): (BTreeSet<usize>, BTreeSet<usize>) = differing_now.iter().partition(|sub| {
        let cached = cache.buckets.get(&(**sub >> crate::node::SUB_BUCKET_BITS)).and_then(|c| c.subs.get(*sub));
        cached.is_some_and(|f| *f == sub_fingerprint(**sub))
    });
    let read: Vec<usize> = read.into_iter().collect();
    // The rows are the snapshot's last read: its end (and the applied positions the cut
    // starts from, read right after it) go in the same round trip.
    let applied = options.cut_timeout.is_some();
    let ended = if use_tracked {
        try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.sub_bucket_rows(s, fine, &read, applied))).await?
    } else if let Some(range) = range {
        try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.range_rows(s, fine, range, &read, applied))).await?
    } else {
        try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.staged_rows(s, &read, applied))).await?
    };
    let (fetched, positions): (Vec<_>, Vec<_>) = ended.into_iter().map(|e| (e.rows, e.applied)).unzip();
    let t_staged = t0.elapsed();
    let mut snapshot: Vec<Rows> = vec![Rows::new(); nodes.len()];
    // The sub-bucket of every row read now or reused (a key lies in one on every node).
    let mut read_in: BTreeMap<Key, usize> = BTreeMap::new();
    for (i, rows) in fetched.into_iter().enumerate() {
        for (sub, key, hash) in rows {
            read_in.insert(key.clone(), sub);
            snapshot[i].insert(key, hash);
        }
    }
    // Rows of reused buckets, and of the reused sub-buckets of buckets read now.
    for (b, c) in &cache.buckets {
        let whole = reused.binary_search(b).is_ok();
        for (i, rows) in c.rows.iter().enumerate().take(nodes.len()) {
            for (sub, key, hash) in rows.iter().filter(|(sub, _, _)| whole || reused_subs.contains(sub)) {
                read_in.insert(key.clone(), *sub);
                snapshot[i].insert(key.clone(), *hash);
            }
        }
    }
    let candidates: Vec<Key> = disagreeing(&snapshot);
    if let Some(dir) = options.cache_dir.as_deref() {
        // Per bucket read now, the rows of its keys that differ: all a later check reusing the
        // bucket needs (the keys that agree would only be compared again).
        let mut fresh: BTreeMap<usize, Vec<NodeRows>> =
            to_stage.iter().map(|b| (*b, vec![Vec::new(); nodes.len()])).collect();
        for key in &candidates {
            let Some(sub) = read_in.get(key) else { continue };
            if let Some(per_node) = fresh.get_mut(&(sub >> crate::node::SUB_BUCKET_BITS)) {
                for (i, rows) in per_node.iter_mut().enumerate() {
                    if let Some(hash) = snapshot[i].get(key) {
                        rows.push((*sub, key.clone(), *hash));
                    }
                }
            }
        }
        // Unchanged (every differing bucket reused, none gone): nothing to keep.
        if !fresh.is_empty() || reused.len() != cache.buckets.len() {
            let mut next = Cache {
                nodes: cache.nodes.clone(),
                bits: cache.bits,
                buckets_by: buckets_by.clone(),
                buckets: BTreeMap::new(),
            };
            for b in &reused {
                if let Some(c) = cache.buckets.get(b) {
                    next.buckets.insert(*b, c.clone());
                }
            }
            for (b, rows) in fresh {
                let subs = differing_now
                    .range(b << crate::node::SUB_BUCKET_BITS..(b + 1) << crate::node::SUB_BUCKET_BITS)
                    .map(|sub| (*sub, sub_fingerprint(*sub)))
                    .collect();
                next.buckets.insert(b, Arc::new(CachedBucket { fingerprint: bucket_fingerprint(b), subs, rows }));
            }
            Arc::new(next).save(dir, table);
        }
    }
    let cut_timeout = options.cut_timeout.filter(|_| !candidates.is_empty());
    tracing::debug!(
        table,
        digests_ms = t_digests.as_millis() as u64,
        staged_ms = t_staged.as_millis() as u64,
        rows_ms = t0.elapsed().as_millis() as u64,
        read_buckets = to_stage.len(),
        reused_buckets = reused.len(),
        "snapshot phases (cumulative)"
    );

    let (mut cut, mut cut_ms, mut changing) = (Vec::new(), 0, Vec::new());
    let mut now = snapshot.clone();
    if let Some(timeout) = cut_timeout {
        let started = Instant::now();
        cut = wait_for_cut(nodes, options.appliers.as_deref(), timeout, options.cut_rounds, positions).await?;
        cut_ms = started.elapsed().as_millis() as u64;
        // No applier links the nodes: nothing is in flight between them, the snapshots stand.
        if !cut.is_empty() {
            now = try_join_all(nodes.iter().zip(shapes).map(|(n, s)| n.rows_by_key(s, &candidates))).await?;
        }
        tracing::debug!(table, cut_ms, reread_ms = started.elapsed().as_millis() as u64, "cut");
        changing = candidates
            .iter()
            .filter(|k| snapshot.iter().zip(&now).any(|(then, now)| then.get(*k) != now.get(*k)))
            .filter(|k| !agree(&now, k))
            .cloned()
            .collect();
    }
    let differing_keys: Vec<KeyDiff> = candidates
        .iter()
        .filter(|k| snapshot.iter().zip(&now).all(|(then, now)| then.get(*k) == now.get(*k)))
        .map(|k| describe_key(&names, &snapshot, k))
        .collect();
    let (mode, elapsed) = (if use_tracked { "tracked" } else { "scanned" }, t0.elapsed().as_secs_f64());
    metrics::histogram!("synapse_repair_check_seconds", "table" => table.to_owned(), "digests" => mode).record(elapsed);
    metrics::gauge!("synapse_repair_differing_keys", "table" => table.to_owned()).set(differing_keys.len() as f64);
    metrics::counter!("synapse_repair_changing_keys_total", "table" => table.to_owned())
        .increment(changing.len() as u64);
    tracing::info!(
        table,
        digests = mode,
        differing = differing_keys.len(),
        changing = changing.len(),
        folded,
        "repair check"
    );
    Ok(Report {
        table: table.to_owned(),
        nodes: names,
        rows: digests.iter().map(|d| d.rows()).collect(),
        buckets: digests[0].len(),
        buckets_by,
        differing_buckets: differing.len(),
        compared,
        differing: differing_keys,
        changing,
        cut,
        cut_ms,
        digests: if use_tracked { "tracked" } else { "scanned" }.to_owned(),
        folded,
        reused_buckets: reused.len(),
    })
}

/// Every node's (rows, hash sum) of a bucket or sub-bucket, as the cache keeps it.
fn fingerprint(per_node: impl Iterator<Item = Option<(u64, u64)>>) -> String {
    per_node.map(|d| d.map_or("-".into(), |(n, s)| format!("{n}:{s}"))).collect::<Vec<_>>().join(",")
}

/// Sub-buckets whose digests are not the same on every node.
fn differing_subs(per_node: &[BTreeMap<usize, (u64, u64)>]) -> BTreeSet<usize> {
    let subs: BTreeSet<usize> = per_node.iter().flat_map(|m| m.keys().copied()).collect();
    subs.into_iter().filter(|b| per_node.windows(2).any(|w| w[0].get(b) != w[1].get(b))).collect()
}

/// Keys not held alike by every node, in key order.
fn disagreeing(rows: &[Rows]) -> Vec<Key> {
    let keys: BTreeSet<&Key> = rows.iter().flat_map(|r| r.keys()).collect();
    keys.into_iter().filter(|k| !agree(rows, k)).cloned().collect()
}

fn agree(rows: &[Rows], key: &Key) -> bool {
    rows.windows(2).all(|w| w[0].get(key) == w[1].get(key))
}

fn describe_key(names: &[String], rows: &[Rows], key: &Key) -> KeyDiff {
    let mut missing_on = Vec::new();
    let mut groups: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for (name, r) in names.iter().zip(rows) {
        match r.get(key) {
            None => missing_on.push(name.clone()),
            Some(h) => groups.entry(*h).or_default().push(name.clone()),
        }
    }
    let mut holders: Vec<Vec<String>> = groups.into_values().collect();
    holders.sort();
    KeyDiff { key: key.clone(), missing_on, holders }
}

/// Writes a marker on every node, then waits until each node's applier of every other node
/// has applied past that node's marker. Returns the appliers waited for (none, and no marker
/// written, when no applier links the nodes). `positions`: each node's applied positions, read
/// after the snapshot.
///
/// With `rounds` > 1 it marks and waits again: a change that travels two hops (spoke → hub →
/// spoke) was applied on the hub before the first round ended, but possibly after the hub's
/// first marker; the hub's second marker is after it, so the second round delivers it.
async fn wait_for_cut(
    nodes: &[&Node],
    appliers: Option<&[(String, String)]>,
    timeout: Duration,
    rounds: u8,
    positions: Vec<Option<Vec<(String, Lsn)>>>,
) -> Result<Vec<String>, RepairError> {
    let started = Instant::now();
    let mut waited = Vec::new();
    let mut positions = Some(positions);
    for _ in 0..rounds.max(1) {
        let positions = match positions.take() {
            Some(p) => p,
            None => try_join_all(nodes.iter().map(|n| n.applied())).await?,
        };
        let left = timeout.saturating_sub(started.elapsed());
        waited = cut_round(nodes, appliers, left, positions).await?;
        if waited.is_empty() {
            break;
        }
    }
    Ok(waited)
}

/// One round of [`wait_for_cut`].
async fn cut_round(
    nodes: &[&Node],
    appliers: Option<&[(String, String)]>,
    timeout: Duration,
    positions: Vec<Option<Vec<(String, Lsn)>>>,
) -> Result<Vec<String>, RepairError> {
    let index = |name: &str| nodes.iter().position(|n| n.name == name);
    // (source, target) → applied position; a configured applier without one is at 0.
    let links = |positions: &[Option<Vec<(String, Lsn)>>]| -> BTreeMap<(usize, usize), Lsn> {
        let mut at: BTreeMap<(usize, usize), Lsn> = BTreeMap::new();
        for (t, applied) in positions.iter().enumerate() {
            for (source, lsn) in applied.iter().flatten() {
                if let Some(s) = index(source).filter(|s| *s != t) {
                    at.insert((s, t), *lsn);
                }
            }
        }
        if let Some(pairs) = appliers {
            at.retain(|(s, t), _| pairs.iter().any(|(ps, pt)| index(ps) == Some(*s) && index(pt) == Some(*t)));
            for (ps, pt) in pairs {
                // Only where appliers have run: a node that never ran one has nothing in flight.
                if let (Some(s), Some(t)) = (index(ps), index(pt)) {
                    if positions[t].is_some() {
                        at.entry((s, t)).or_insert(Lsn(0));
                    }
                }
            }
        }
        at
    };
    if links(&positions).is_empty() {
        return Ok(Vec::new());
    }
    let marks: Vec<Lsn> = try_join_all(nodes.iter().map(|n| n.mark_cut())).await?;
    let started = Instant::now();
    loop {
        let positions = try_join_all(nodes.iter().map(|n| n.applied())).await?;
        let at = links(&positions);
        let behind: Vec<String> = at
            .iter()
            .filter(|((s, _), lsn)| **lsn < marks[*s])
            .map(|((s, t), lsn)| format!("{}→{} at {lsn}, cut at {}", nodes[*s].name, nodes[*t].name, marks[*s]))
            .collect();
        if behind.is_empty() {
            let mut waited: Vec<String> =
                at.keys().map(|(s, t)| format!("{}→{}", nodes[*s].name, nodes[*t].name)).collect();
            waited.sort();
            return Ok(waited);
        }
        if started.elapsed() >= timeout {
            return Err(RepairError::Cut { waited: timeout, behind });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
