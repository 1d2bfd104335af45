//! One vector index on disk: the rows' vectors, keys, filter values and their postings, the
//! dead letters and the feed cursor in an LMDB environment, and an HNSW graph over the
//! vectors (usearch) in memory, snapshotted to a file beside them.
//!
//! Guarantees:
//! * **Exactly once.** A batch's changes and the cursor it carries commit in one LMDB write
//!   transaction, durable (fsync) when it returns; a batch whose cursor is not past the stored
//!   one is not applied again (a replay after kill -9). The graph follows each commit. Its
//!   nodes are (row, vector generation) pairs: a row whose vector changes gets a new node, and
//!   its old one, like a deleted row's, stays in the graph as a waypoint that searches pass
//!   through but never return (hnswlib's mark-deleted; usearch's own removal leaves holes
//!   that later inserts fill without relinking, which loses rows). Searches return only the
//!   nodes of the committed rows' current vectors. After a crash the graph is the last
//!   snapshot with every committed vector it lacks added, or without a usable snapshot a
//!   build from the stored vectors: either way it answers for exactly the committed rows.
//! * **Bounded waypoints.** Once the nodes added or retired since the graph was built reach
//!   the rows held, a new graph is built from the stored vectors on a thread of its own while
//!   batches go on, and replaces the old one.
//! * **Bad rows do not stop the index.** A vector of the wrong dimension, or with a non-finite
//!   component, is not indexed; its key and the reason go to the dead letters (and its old
//!   vector, if any, leaves the index), in the same transaction.
//! * **Readers never wait** for the writer: a search runs on the graph beside a batch being
//!   linked in and reads the side tables from LMDB's last commit; it says the cursor of the
//!   last batch the graph holds in full (it may already see part of the next one).

use heed::types::Bytes;
use heed::{CommitOrAbort, Env, EnvOpenOptions, RoTxn, RwTxn};
use roaring::RoaringBitmap;
use serde_json::{Map, Value as Json};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use synapse_schemas::{Cursor, Lsn};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

/// How far two vectors are, as the index compares them. Distances are reported as
/// pgvector's operators report them (`<=>`, `<->`, `<#>`), so an application can check one
/// against the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// 1 − cos(angle): direction only, 0 to 2.
    Cosine,
    /// Straight-line distance.
    Euclidean,
    /// The negative inner product (smallest = largest product). Kept as a Euclidean graph of
    /// vectors with one extra component, `sqrt(max_norm² − |x|²)`, and queries with a zero
    /// there: the squared distance is then `|q|² + max_norm² − 2 q·x`, so the nearest is the
    /// largest product (the reduction of Bachrach et al., 2014), and the graph keeps a true
    /// metric's recall. A vector longer than `max_norm` cannot be placed and becomes a dead
    /// letter.
    Dot,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Euclidean => "euclidean",
            Metric::Dot => "dot",
        }
    }
}

/// What a store holds, fixed when it is made.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSpec {
    pub dimensions: usize,
    pub metric: Metric,
    /// Largest size the LMDB environment may grow to (LMDB maps it; nothing is allocated up
    /// front). The graph lives in memory beside it.
    pub max_bytes: usize,
    /// `Metric::Dot` only: the longest vector the index takes.
    pub max_norm: f32,
}

impl StoreSpec {
    /// A store of `dimensions`-component vectors compared by `metric`, up to 4 GiB, vectors
    /// up to length 1 under `Metric::Dot`.
    pub fn new(dimensions: usize, metric: Metric) -> StoreSpec {
        StoreSpec { dimensions, metric, max_bytes: 4 << 30, max_norm: 1.0 }
    }

    /// What the store records of its spec (a different one needs a new store).
    fn identity(&self) -> String {
        match self.metric {
            Metric::Dot => format!("dot (max_norm {})", self.max_norm),
            m => m.name().to_owned(),
        }
    }
}

/// One row's vector and filter values, keyed by the row's key as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    pub key: String,
    pub vector: Vec<f32>,
    pub filters: Map<String, Json>,
}

/// A row that could not be indexed, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub key: String,
    pub reason: String,
    /// The stream position of the batch that met it (`None`: the initial load).
    pub cursor: Option<Cursor>,
}

/// Changes to apply together, in order: a truncate first, then upserts and deletes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub truncate: bool,
    pub upserts: Vec<Upsert>,
    pub deletes: Vec<String>,
    /// Rows the caller could not read a vector from (not numeric, not an array).
    pub dead: Vec<DeadLetter>,
    /// The stream position after this batch, stored with it. `None`: a part of the initial
    /// load, which sets no position (a load cut short starts over with a truncate).
    pub cursor: Option<Cursor>,
}

/// What applying a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub upserted: usize,
    pub deleted: usize,
    pub dead: usize,
    /// False: the batch was already applied (its cursor is not past the stored one).
    pub new: bool,
}

/// A search hit: the row's key and its distance to the query.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Hit {
    pub key: String,
    pub distance: f32,
}

/// Counts and positions of a store.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub items: u64,
    pub cursor: Option<Cursor>,
    pub dead_letters: u64,
    /// How long the last batch took, its commit and its graph update.
    pub last_build_ms: u64,
    /// When the last batch committed, microseconds since the Unix epoch.
    pub last_build_at_us: i64,
    /// Rows the graph has no way to (far from the rest): searched exactly beside it.
    pub orphans: u64,
    /// Nodes in the graph: the rows' current vectors and the waypoints left by moves and
    /// deletes until the next rebuild.
    pub graph_nodes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the index's LMDB environment: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("the HNSW graph: {0} (a restart rebuilds it from the stored vectors)")]
    Graph(String),
    #[error("the graph snapshot {path}: {source}")]
    Snapshot { path: PathBuf, source: std::io::Error },
    #[error("the index holds vectors of {stored} dimensions, not {wanted}: a different index needs a new name")]
    Dimensions { stored: usize, wanted: usize },
    #[error("the index was made for distance {stored}, not {wanted}: a different distance needs a new index name")]
    Distance { stored: String, wanted: String },
    #[error("the query vector has {got} components; the index's vectors have {want}")]
    Query { got: usize, want: usize },
    #[error("the index has used every item id (2^32): rebuild it under a new name")]
    IdsExhausted,
    #[error("the index's stored state is damaged: {0}")]
    Damaged(String),
    #[error("the index is opening: its graph is being brought back from its snapshot and stored vectors")]
    Opening,
}

impl From<cxx::Exception> for StoreError {
    fn from(e: cxx::Exception) -> StoreError {
        StoreError::Graph(e.what().to_owned())
    }
}

/// HNSW graph parameters: links per node (twice that on the base layer), construction width,
/// and the search width (at least k).
const M: usize = 16;
const EF_CONSTRUCTION: usize = 128;
const EF_SEARCH: usize = 100;
/// Graph calls running at once: usearch keeps a search context per call, reserved up front.
const CONTEXTS: usize = 32;
/// A graph snapshot is written once this many items changed since the last one, or once
/// [`SNAPSHOT_AFTER`] passed with any changed: a restart then redoes at most that many.
const SNAPSHOT_CHANGES: u64 = 50_000;
const SNAPSHOT_AFTER: Duration = Duration::from_secs(60);
/// The store's layout. Stores of an older layout (the graph in LMDB) are emptied and
/// loaded again from the table.
const FORMAT: &[u8] = b"lmdb+usearch 1";
/// A batch adding at least this many vectors links them from several threads.
const PARALLEL_FROM: usize = 256;

type Raw = heed::Database<'static, Bytes, Bytes>;

/// The tables, all byte-keyed and byte-valued (encodings below).
struct Tables {
    /// `cursor`, `next_id`, `dims`, `built_ms`, `built_at`, `snapshot` → big-endian numbers;
    /// `metric`, `format` → text.
    meta: Raw,
    /// key → id (u32 BE).
    ids: Raw,
    /// id → key.
    keys: Raw,
    /// id → the row's vector: its generation (u32 BE, counting the row's vector changes),
    /// then the components (f32 little-endian, as the row gave them).
    vectors: Raw,
    /// id → the row's filter values (JSON object).
    filters: Raw,
    /// `column\0value-json` → the ids holding it (a serialized roaring bitmap).
    postings: Raw,
    /// key → [`DeadLetter`] (JSON).
    dead: Raw,
}

const TABLES: [&str; 7] = ["meta", "ids", "keys", "vectors", "filters", "postings", "dead"];

/// A counting semaphore: no more graph calls at once than the graph has contexts for.
struct Permits {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Permit<'a>(&'a Permits);

impl Permits {
    fn take(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// The HNSW graph in memory. usearch takes adds, removes and searches from many threads at
/// once; growing its capacity, emptying and loading it take the lock alone.
struct Graph {
    index: RwLock<Index>,
    permits: Permits,
    dims: usize,
}

impl Graph {
    fn new(dims: usize, metric: Metric) -> Result<Graph, StoreError> {
        let options = IndexOptions {
            dimensions: dims,
            metric: match metric {
                Metric::Cosine => MetricKind::Cos,
                Metric::Euclidean | Metric::Dot => MetricKind::L2sq,
            },
            quantization: ScalarKind::F32,
            connectivity: M,
            expansion_add: EF_CONSTRUCTION,
            expansion_search: EF_SEARCH,
            multi: false,
        };
        let index = Index::new(&options)?;
        index.reserve_capacity_and_threads(1024, CONTEXTS)?;
        Ok(Graph {
            index: RwLock::new(index),
            permits: Permits { free: Mutex::new(CONTEXTS), freed: Condvar::new() },
            dims,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for `more` items beyond those held (removed items' slots are reused first).
    fn reserve(&self, more: usize) -> Result<(), StoreError> {
        let need = {
            let index = self.read();
            let need = index.size() + more;
            if need <= index.capacity() {
                return Ok(());
            }
            need
        };
        self.write().reserve_capacity_and_threads(need.next_power_of_two(), CONTEXTS)?;
        Ok(())
    }

    fn contains(&self, node: u64) -> bool {
        self.read().contains(node)
    }

    /// Links the nodes of `items` in (those it holds already stay), from several threads when
    /// there are many, and returns those a search for their own vector did not find once the
    /// whole batch was in (see [`found`]): a later add — usearch's concurrent adds (issue #735)
    /// and, less often, one made after it on the same thread — can strand a node whose own
    /// add had just been found.
    fn add(&self, items: &[(u64, Vec<f32>)]) -> Result<Vec<u64>, StoreError> {
        self.reserve(items.len())?;
        let threads = if items.len() < PARALLEL_FROM {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
        };
        let parts = items.len().div_ceil(threads);
        let added: Vec<(u64, &[f32])> = in_threads(items, parts, |part| {
            let mut added = Vec::new();
            for (node, v) in part {
                let _permit = self.permits.take();
                let index = self.read();
                if !index.contains(*node) {
                    index.add(*node, v)?;
                    added.push((*node, v.as_slice()));
                }
            }
            Ok(added)
        })?;
        in_threads(&added, parts, |part| {
            let mut orphans = Vec::new();
            for (node, v) in part {
                let _permit = self.permits.take();
                if !found(&self.read(), *node, v)? {
                    orphans.push(*node);
                }
            }
            Ok(orphans)
        })
    }

    /// The `k` nearest nodes that `wanted` lets through.
    fn search(&self, query: &[f32], k: usize, wanted: impl Fn(u64) -> bool) -> Result<Vec<(u64, f32)>, StoreError> {
        let _permit = self.permits.take();
        let found = self.read().filtered_search(query, k, wanted)?;
        Ok(found.keys.iter().copied().zip(found.distances.iter().copied()).collect())
    }

    fn reset(&self) -> Result<(), StoreError> {
        let index = self.write();
        index.reset()?;
        index.reserve_capacity_and_threads(1024, CONTEXTS)?;
        Ok(())
    }

    fn save(&self, path: &Path) -> Result<(), StoreError> {
        let text = path.to_str().ok_or_else(|| StoreError::Damaged(format!("{} is not UTF-8", path.display())))?;
        self.read().save(text)?;
        Ok(())
    }

    /// Loads a snapshot; false (and an empty graph) when it is not one of this graph's.
    fn load(&self, path: &Path) -> Result<bool, StoreError> {
        let text = path.to_str().ok_or_else(|| StoreError::Damaged(format!("{} is not UTF-8", path.display())))?;
        let index = self.write();
        let loaded = index.load(text).is_ok() && index.dimensions() == self.dims;
        if !loaded {
            index.reset()?;
        }
        index.change_expansion_add(EF_CONSTRUCTION);
        index.change_expansion_search(EF_SEARCH);
        let room = index.size().max(1024).next_power_of_two();
        index.reserve_capacity_and_threads(room, CONTEXTS)?;
        Ok(loaded)
    }

    fn size(&self) -> usize {
        self.read().size()
    }
}

/// How many nearest a reachability check asks for (a duplicate vector may come first).
const REACH_K: usize = 4;

/// Links `node` into `index` unless it holds it already, and says whether a search for its
/// own vector then finds it (see [`found`]). A later add can still strand it (see
/// [`Graph::add`]).
fn link(index: &Index, node: u64, v: &[f32]) -> Result<bool, StoreError> {
    if index.contains(node) {
        return Ok(true);
    }
    index.add(node, v)?;
    found(index, node, v)
}

/// Whether a search for `node`'s own vector finds it. HNSW's link pruning can leave a node no
/// way in — typically a vector far from the rest, whose would-be neighbours each keep closer
/// ones — and such a node would never be found: the store keeps those ("orphans") aside and
/// searches them exactly beside the graph, so a row is always found by its own vector once
/// its batch is in.
fn found(index: &Index, node: u64, v: &[f32]) -> Result<bool, StoreError> {
    Ok(index.search(v, REACH_K)?.keys.contains(&node))
}

/// Runs `work` on `items` in parts of `part` items, a thread each, and joins what they return;
/// on this thread when one part holds them all.
fn in_threads<'a, T: Sync, R: Send>(
    items: &'a [T],
    part: usize,
    work: impl Fn(&'a [T]) -> Result<Vec<R>, StoreError> + Sync,
) -> Result<Vec<R>, StoreError> {
    if items.len() <= part {
        return work(items);
    }
    std::thread::scope(|s| {
        let work = &work;
        let threads: Vec<_> = items.chunks(part.max(1)).map(|p| s.spawn(move || work(p))).collect();
        let mut joined = Vec::new();
        for t in threads {
            joined.extend(t.join().unwrap_or_else(|_| Err(StoreError::Graph("a linking thread panicked".into())))?);
        }
        Ok(joined)
    })
}

/// The distance the graph's metric gives (usearch's `Cos` and `L2sq`), for orphans.
fn graph_distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::Cosine => {
            let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
            for (x, y) in a.iter().zip(b) {
                let (x, y) = (f64::from(*x), f64::from(*y));
                ab += x * y;
                aa += x * x;
                bb += y * y;
            }
            (1.0 - ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)) as f32
        }
        Metric::Euclidean | Metric::Dot => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
    }
}

/// The graph's key of generation `generation` of item `id`'s vector.
fn node(id: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(id)
}

/// Which node is each item's current one: `generation[id]`, [`RETIRED`] for none.
#[derive(Default)]
struct Live {
    generation: Vec<u32>,
    count: usize,
}

const RETIRED: u32 = u32::MAX;

impl Live {
    fn set(&mut self, id: u32, generation: Option<u32>) {
        let i = id as usize;
        if i >= self.generation.len() {
            if generation.is_none() {
                return;
            }
            self.generation.resize(i + 1, RETIRED);
        }
        let was = self.generation[i] != RETIRED;
        self.generation[i] = generation.unwrap_or(RETIRED);
        self.count = self.count + usize::from(generation.is_some()) - usize::from(was);
    }

    fn current(&self, node: u64) -> bool {
        self.generation.get(node as u32 as usize).is_some_and(|g| *g != RETIRED && u64::from(*g) == node >> 32)
    }
}

/// The writer's bookkeeping: graph snapshots and rebuilds.
struct Snapshots {
    /// Items changed since the last snapshot.
    changed: u64,
    taken: Instant,
    rebuild: Option<Rebuild>,
    rebuilds: u64,
}

/// A whole graph being built on a thread of its own from the vectors as a commit left them,
/// without the waypoints. The items batches change meanwhile are redone on it before it
/// replaces the old one.
struct Rebuild {
    changed: std::collections::BTreeSet<u32>,
    /// The new graph and the nodes it has no way into.
    done: std::sync::mpsc::Receiver<Result<Built, StoreError>>,
    started: Instant,
}

/// A graph built whole, and its nodes it has no way into (node, vector as placed).
type Built = (Index, Vec<(u64, Vec<f32>)>);

/// A rebuild starts once the graph's waypoints (retired nodes) reach the items held, and
/// at least [`REBUILD_MIN`]: the graph then holds at most about twice the nodes it needs.
const REBUILD_MIN: usize = 10_000;

/// One vector index in its directory.
pub struct Store {
    env: Env,
    t: Tables,
    spec: StoreSpec,
    dir: PathBuf,
    graph: Graph,
    /// Each item's current node: what a search may return.
    live: RwLock<Live>,
    /// Current nodes the graph has no way into (see [`link`]), by item: searched exactly.
    orphans: RwLock<BTreeMap<u32, (u64, Vec<f32>)>>,
    /// The cursor of the last batch the graph holds in full: what a search reflects.
    visible: Mutex<Option<Cursor>>,
    /// The last batch's duration (ms) and commit time (µs since the epoch).
    last_build: Mutex<(u64, i64)>,
    /// One writer at a time (batches and snapshots).
    writer: Mutex<Snapshots>,
    /// The graph was brought back ([`Store::recover`]).
    ready: std::sync::atomic::AtomicBool,
}

fn be64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// A cursor as 12 big-endian bytes: byte order is cursor order.
fn cursor_bytes(c: Cursor) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&c.commit_lsn.0.to_be_bytes());
    b[8..].copy_from_slice(&c.index.to_be_bytes());
    b
}

fn cursor_of(v: &[u8]) -> Option<Cursor> {
    Some(Cursor { commit_lsn: Lsn(be64(v.get(..8)?)?), index: be32(v.get(8..)?)? })
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt() as f32
}

fn posting_key(column: &str, value: &Json) -> Vec<u8> {
    let mut k = column.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(value.to_string().as_bytes());
    k
}

/// A stored vector: its generation, then its components.
fn vector_bytes(generation: u32, v: &[f32]) -> Vec<u8> {
    generation.to_be_bytes().into_iter().chain(v.iter().flat_map(|x| x.to_le_bytes())).collect()
}

fn generation_of(b: &[u8]) -> Option<u32> {
    be32(b.get(..4)?)
}

/// A `vectors` entry's item id and generation.
fn id_and_generation(id: &[u8], stored: &[u8]) -> Result<(u32, u32), StoreError> {
    match (be32(id), generation_of(stored)) {
        (Some(id), Some(generation)) => Ok((id, generation)),
        _ => Err(StoreError::Damaged("a stored vector without its id or generation".into())),
    }
}

fn vector_of(b: &[u8]) -> Vec<f32> {
    b.get(4..).unwrap_or_default().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A row's vector as the graph holds it (one more component under `Metric::Dot`).
fn placed(spec: &StoreSpec, v: &[f32]) -> Vec<f32> {
    let mut out = v.to_vec();
    if spec.metric == Metric::Dot {
        let n = norm(v);
        out.push((spec.max_norm * spec.max_norm - n * n).max(0.0).sqrt());
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// Orphan nodes as stored beside a snapshot: u64 big-endian each.
fn nodes_bytes(nodes: impl Iterator<Item = u64>) -> Vec<u8> {
    nodes.flat_map(u64::to_be_bytes).collect()
}

/// Opens the LMDB environment in `dir`.
fn open_env(dir: &Path, spec: &StoreSpec) -> Result<Env, StoreError> {
    // SAFETY: heed's open is unsafe because the same files opened twice in one process, or
    // by another process with other options, could be corrupted; one synapse owns its
    // log.dir (its lock) and opens each index once (docs/decisions/0019-vector-index.md).
    #[allow(unsafe_code)]
    let env = unsafe { EnvOpenOptions::new().map_size(spec.max_bytes).max_dbs(16).open(dir)? };
    Ok(env)
}

/// True when `env` holds a store of an older layout.
fn older_layout(env: &Env) -> Result<bool, StoreError> {
    let rtxn = env.read_txn()?;
    let older = env.open_databases_and_commit(rtxn, |dbo, rtxn| -> heed::Result<_> {
        let older = match dbo.open_database::<Bytes, Bytes>(rtxn, Some("meta"))? {
            Some(meta) => meta.get(rtxn, b"dims")?.is_some() && meta.get(rtxn, b"format")? != Some(FORMAT),
            None => false,
        };
        Ok(CommitOrAbort::<(), bool>::Abort(older))
    })?;
    Ok(older.abort().unwrap_or(false))
}

impl Store {
    /// Opens (or makes) the store in `dir` without its graph: quick, and it checks the
    /// dimensions and distance. Until [`Store::recover`] has run, searches answer
    /// [`StoreError::Opening`] and batches are refused the same way.
    pub fn open_deferred(dir: &Path, spec: &StoreSpec) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Lmdb(heed::Error::Io(e)))?;
        let mut env = open_env(dir, spec)?;
        if older_layout(&env)? {
            tracing::warn!(dir = %dir.display(), "the vector index was stored in an older layout: emptied, it loads again from its table");
            drop(env);
            for f in ["data.mdb", "lock.mdb"] {
                match std::fs::remove_file(dir.join(f)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(StoreError::Lmdb(heed::Error::Io(e)))
                    }
                    _ => {}
                }
            }
            env = open_env(dir, spec)?;
        }
        let wtxn = env.write_txn()?;
        let made: [Raw; 7] = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
                let mut made = Vec::with_capacity(TABLES.len());
                for n in TABLES {
                    made.push(dbo.create_database::<Bytes, Bytes>(wtxn, Some(n))?);
                }
                let made: [heed::Database<Bytes, Bytes>; 7] =
                    made.try_into().map_err(|_| heed::Error::Io(std::io::Error::other("seven databases")))?;
                Ok(CommitOrAbort::<_, ()>::Commit(made))
            })?
            .unwrap_commit();
        let [meta, ids, keys, vectors, filters, postings, dead] = made;
        let t = Tables { meta, ids, keys, vectors, filters, postings, dead };
        let mut wtxn = env.write_txn()?;
        match t.meta.get(&wtxn, b"dims")?.and_then(be64) {
            Some(d) if d as usize != spec.dimensions => {
                return Err(StoreError::Dimensions { stored: d as usize, wanted: spec.dimensions })
            }
            Some(_) => {}
            None => t.meta.put(&mut wtxn, b"dims", &(spec.dimensions as u64).to_be_bytes())?,
        }
        let wanted = spec.identity();
        match t.meta.get(&wtxn, b"metric")? {
            Some(m) if m != wanted.as_bytes() => {
                return Err(StoreError::Distance { stored: String::from_utf8_lossy(m).into_owned(), wanted })
            }
            Some(_) => {}
            None => t.meta.put(&mut wtxn, b"metric", wanted.as_bytes())?,
        }
        t.meta.put(&mut wtxn, b"format", FORMAT)?;
        let built = (
            t.meta.get(&wtxn, b"built_ms")?.and_then(be64).unwrap_or(0),
            t.meta.get(&wtxn, b"built_at")?.and_then(be64).unwrap_or(0) as i64,
        );
        wtxn.commit()?;
        let dims = spec.dimensions + usize::from(spec.metric == Metric::Dot);
        let store = Store {
            env,
            t,
            spec: spec.clone(),
            dir: dir.to_owned(),
            graph: Graph::new(dims, spec.metric)?,
            live: RwLock::new(Live::default()),
            orphans: RwLock::new(BTreeMap::new()),
            visible: Mutex::new(None),
            last_build: Mutex::new(built),
            writer: Mutex::new(Snapshots { changed: 0, taken: Instant::now(), rebuild: None, rebuilds: 0 }),
            ready: std::sync::atomic::AtomicBool::new(false),
        };
        Ok(store)
    }

    /// Opens (or makes) the store in `dir` and brings its graph back: [`Store::open_deferred`]
    /// then [`Store::recover`].
    pub fn open(dir: &Path, spec: &StoreSpec) -> Result<Store, StoreError> {
        let store = Store::open_deferred(dir, spec)?;
        store.recover()?;
        Ok(store)
    }

    fn snapshot_path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("graph-{generation}.usearch"))
    }

    /// Brings the graph to the committed state: the last snapshot with every stored vector
    /// it lacks added, or a build from the stored vectors (seconds per 100k vectors; logs its
    /// progress). Done once; later calls return at once.
    pub fn recover(&self) -> Result<(), StoreError> {
        let mut writer = lock(&self.writer);
        if self.ready.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let rtxn = self.env.read_txn()?;
        let loaded = match self.t.meta.get(&rtxn, b"snapshot")?.and_then(be64) {
            Some(g) if self.snapshot_path(g).exists() => {
                let loaded = self.graph.load(&self.snapshot_path(g))?;
                if !loaded {
                    tracing::warn!(dir = %self.dir.display(), "the graph snapshot could not be read: rebuilding from the stored vectors");
                }
                loaded
            }
            _ => false,
        };
        let mut live = Live::default();
        let mut orphans = BTreeMap::new();
        let mut missing = Vec::new();
        for entry in self.t.vectors.iter(&rtxn)? {
            let (id, stored) = entry?;
            let (id, generation) = id_and_generation(id, stored)?;
            live.set(id, Some(generation));
            if !self.graph.contains(node(id, generation)) {
                missing.push(id);
            }
        }
        if loaded {
            // The snapshot's orphans that are still current.
            let stored = self.t.meta.get(&rtxn, b"orphans")?.unwrap_or_default();
            for n in stored.chunks_exact(8).filter_map(be64) {
                if let (true, Some(v)) = (live.current(n), self.t.vectors.get(&rtxn, &(n as u32).to_be_bytes())?) {
                    orphans.insert(n as u32, (n, self.placed(&vector_of(v))));
                }
            }
        }
        let total = missing.len();
        let started = Instant::now();
        for (done, part) in missing.chunks(10_000).enumerate() {
            let mut items = Vec::with_capacity(part.len());
            for id in part {
                if let Some(stored) = self.t.vectors.get(&rtxn, &id.to_be_bytes())? {
                    let generation = generation_of(stored).unwrap_or_default();
                    items.push((node(*id, generation), self.placed(&vector_of(stored))));
                }
            }
            let orphaned: HashSet<u64> = self.graph.add(&items)?.into_iter().collect();
            for (n, v) in items.into_iter().filter(|(n, _)| orphaned.contains(n)) {
                orphans.insert(n as u32, (n, v));
            }
            if total > 10_000 {
                let done = (done * 10_000 + part.len()).min(total);
                tracing::info!(dir = %self.dir.display(), done, total, "vector index: linking stored vectors into the graph");
            }
        }
        if total > 0 {
            tracing::info!(dir = %self.dir.display(), items = total, from_snapshot = loaded, seconds = started.elapsed().as_secs_f64(), "vector index: graph brought to the stored state");
        }
        *write(&self.live) = live;
        *write(&self.orphans) = orphans;
        *lock(&self.visible) = self.t.meta.get(&rtxn, b"cursor")?.and_then(cursor_of);
        drop(rtxn);
        writer.changed = total as u64;
        if total > 0 {
            self.snapshot(&mut writer)?;
        }
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn opened(&self) -> Result<(), StoreError> {
        match self.ready.load(std::sync::atomic::Ordering::Acquire) {
            true => Ok(()),
            false => Err(StoreError::Opening),
        }
    }

    /// Writes the graph to a new snapshot file and forgets the changed items it holds.
    /// Called by the writer only, so the graph is exactly the committed state.
    fn snapshot(&self, writer: &mut Snapshots) -> Result<(), StoreError> {
        let generation = {
            let rtxn = self.env.read_txn()?;
            self.t.meta.get(&rtxn, b"snapshot")?.and_then(be64).unwrap_or(0) + 1
        };
        let path = self.snapshot_path(generation);
        let partial = path.with_extension("partial");
        let io = |source| StoreError::Snapshot { path: path.clone(), source };
        self.graph.save(&partial)?;
        std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&partial, &path).map_err(io)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        let mut wtxn = self.env.write_txn()?;
        self.t.meta.put(&mut wtxn, b"snapshot", &generation.to_be_bytes())?;
        let orphans = nodes_bytes(read(&self.orphans).values().map(|(n, _)| *n));
        self.t.meta.put(&mut wtxn, b"orphans", &orphans)?;
        wtxn.commit()?;
        self.remove_snapshots(Some(generation));
        writer.changed = 0;
        writer.taken = Instant::now();
        Ok(())
    }

    /// Starts a rebuild when the waypoints reach the items held, or takes in a finished one:
    /// the items changed since its start are redone on it, it replaces the graph, and a
    /// snapshot records it. Writer only.
    fn rebuild_step(&self, writer: &mut Snapshots, changed: &[u32]) -> Result<(), StoreError> {
        let Some(rebuild) = writer.rebuild.as_mut() else {
            let items = read(&self.live).count;
            if self.graph.size().saturating_sub(items) >= items.max(REBUILD_MIN) {
                writer.rebuild = Some(self.start_rebuild());
            }
            return Ok(());
        };
        rebuild.changed.extend(changed);
        let built = match rebuild.done.try_recv() {
            Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
            Ok(built) => built,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                Err(StoreError::Graph("the rebuild thread stopped".into()))
            }
        };
        let Some(rebuild) = writer.rebuild.take() else { return Ok(()) };
        let (index, built_orphans) = match built {
            Ok(built) => built,
            Err(e) => {
                // The graph in use answers right, only with more waypoints: tried again after
                // the next batch.
                tracing::warn!(dir = %self.dir.display(), error = %e, "vector index: the graph rebuild failed; the current graph stays");
                return Ok(());
            }
        };
        let rtxn = self.env.read_txn()?;
        let mut items = Vec::new();
        for id in &rebuild.changed {
            if let Some(stored) = self.t.vectors.get(&rtxn, &id.to_be_bytes())? {
                items.push((node(*id, generation_of(stored).unwrap_or_default()), self.placed(&vector_of(stored))));
            }
        }
        drop(rtxn);
        let need = index.size() + items.len();
        if need > index.capacity() {
            index.reserve_capacity_and_threads(need.next_power_of_two(), CONTEXTS)?;
        }
        let mut orphans = BTreeMap::new();
        for (n, v) in built_orphans {
            orphans.insert(n as u32, (n, v));
        }
        for (n, v) in items.iter() {
            orphans.remove(&(*n as u32));
            if !link(&index, *n, v)? {
                orphans.insert(*n as u32, (*n, v.clone()));
            }
        }
        {
            let live = read(&self.live);
            orphans.retain(|_, (n, _)| live.current(*n));
        }
        *self.graph.write() = index;
        *write(&self.orphans) = orphans;
        writer.rebuilds += 1;
        tracing::info!(dir = %self.dir.display(), nodes = self.graph.size(), seconds = rebuild.started.elapsed().as_secs_f64(), redone = items.len(), "vector index: graph rebuilt without its waypoints");
        self.snapshot(writer)
    }

    /// Builds a whole graph on a thread of its own from the vectors as the last commit left
    /// them (its read transaction is open when this returns).
    fn start_rebuild(&self) -> Rebuild {
        let (opened, open) = std::sync::mpsc::channel::<()>();
        let (finished, done) = std::sync::mpsc::channel();
        let (env, vectors, spec, dims) = (self.env.clone(), self.t.vectors, self.spec.clone(), self.graph.dims);
        let build = move || -> Result<Built, StoreError> {
            let rtxn = env.read_txn()?;
            drop(opened);
            let index = Graph::new(dims, spec.metric)?.index.into_inner().unwrap_or_else(|p| p.into_inner());
            let count = vectors.len(&rtxn)? as usize;
            index.reserve_capacity_and_threads(count.max(1024).next_power_of_two(), CONTEXTS)?;
            let mut orphans = Vec::new();
            for entry in vectors.iter(&rtxn)? {
                let (id, stored) = entry?;
                let (id, generation) = id_and_generation(id, stored)?;
                let (n, v) = (node(id, generation), placed(&spec, &vector_of(stored)));
                if !link(&index, n, &v)? {
                    orphans.push((n, v));
                }
            }
            Ok((index, orphans))
        };
        let spawned = std::thread::Builder::new().name("vector-rebuild".into()).spawn(move || {
            let _ = finished.send(build());
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "vector index: no thread for a graph rebuild");
        }
        // Wait for its read transaction (or its end): the writer commits nothing before.
        let _ = open.recv();
        tracing::info!(dir = %self.dir.display(), "vector index: rebuilding the graph without its waypoints");
        Rebuild { changed: Default::default(), done, started: Instant::now() }
    }

    /// Writes a graph snapshot now if anything changed since the last one (a clean shutdown
    /// does, so the next start links nothing).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.opened()?;
        let mut writer = lock(&self.writer);
        if writer.changed > 0 {
            self.snapshot(&mut writer)?;
        }
        Ok(())
    }

    /// Whole-graph rebuilds taken in since the store was opened.
    pub fn graph_rebuilds(&self) -> u64 {
        lock(&self.writer).rebuilds
    }

    /// Removes snapshot files other than `keep` (best effort: a leftover is only space).
    fn remove_snapshots(&self, keep: Option<u64>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let keep = keep.map(|g| self.snapshot_path(g));
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("graph-") && Some(e.path()) != keep {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The stream position of the last applied batch (`None`: not loaded yet).
    pub fn cursor(&self) -> Result<Option<Cursor>, StoreError> {
        Ok(*lock(&self.visible))
    }

    /// Applies `batch` (see the module's guarantees).
    pub fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        self.opened()?;
        let started = Instant::now();
        let mut writer = lock(&self.writer);
        let mut wtxn = self.env.write_txn()?;
        let stored = self.t.meta.get(&wtxn, b"cursor")?.and_then(cursor_of);
        if let (Some(stored), Some(new)) = (stored, batch.cursor) {
            if stored >= new {
                return Ok(Applied::default());
            }
        }
        let mut applied = Applied { new: true, ..Default::default() };
        if batch.truncate {
            self.truncate(&mut wtxn)?;
        }
        // Each changed item's new node and its vector as the graph holds it (`None`: retired).
        let mut changed: BTreeMap<u32, Option<(u64, Vec<f32>)>> = BTreeMap::new();
        let mut dead = batch.dead.clone();
        for u in &batch.upserts {
            match self.check(&u.vector) {
                Ok(()) => {
                    self.upsert(&mut wtxn, u, &mut changed)?;
                    self.t.dead.delete(&mut wtxn, u.key.as_bytes())?;
                    applied.upserted += 1;
                }
                Err(reason) => dead.push(DeadLetter { key: u.key.clone(), reason, cursor: batch.cursor }),
            }
        }
        for key in &batch.deletes {
            if self.remove(&mut wtxn, key, &mut changed)? {
                applied.deleted += 1;
            }
            self.t.dead.delete(&mut wtxn, key.as_bytes())?;
        }
        for d in &dead {
            // A row that cannot be indexed any more is not found by its old vector either.
            self.remove(&mut wtxn, &d.key, &mut changed)?;
            let json = serde_json::to_vec(d).map_err(|e| StoreError::Damaged(e.to_string()))?;
            self.t.dead.put(&mut wtxn, d.key.as_bytes(), &json)?;
        }
        applied.dead = dead.len();
        match batch.cursor {
            Some(c) => self.t.meta.put(&mut wtxn, b"cursor", &cursor_bytes(c))?,
            // A load starts (and starts over) without a position.
            None => self.t.meta.delete(&mut wtxn, b"cursor").map(|_| ())?,
        }
        let at = synapse_schemas::unix_micros_now();
        self.t.meta.put(&mut wtxn, b"built_ms", &(started.elapsed().as_millis() as u64).to_be_bytes())?;
        self.t.meta.put(&mut wtxn, b"built_at", &at.to_be_bytes())?;
        wtxn.commit()?;
        // The graph follows the commit; a crash in between is made up when the store opens.
        if batch.truncate {
            self.graph.reset()?;
            *write(&self.live) = Live::default();
            write(&self.orphans).clear();
            writer.changed = 0;
            // A rebuild from before the truncate is dropped (its thread's answer unheard).
            writer.rebuild = None;
        }
        // Split once: each changed item's new generation (None: retired), and the nodes to link
        // (their vectors moved, not copied).
        let mut current = Vec::with_capacity(changed.len());
        let mut adds = Vec::new();
        for (id, c) in changed {
            current.push((id, c.as_ref().map(|(node, _)| (node >> 32) as u32)));
            adds.extend(c);
        }
        let orphaned: HashSet<u64> = self.graph.add(&adds)?.into_iter().collect();
        {
            let mut live = write(&self.live);
            let mut orphans = write(&self.orphans);
            for (id, generation) in &current {
                live.set(*id, *generation);
                orphans.remove(id);
            }
            for (n, v) in adds.into_iter().filter(|(n, _)| orphaned.contains(n)) {
                orphans.insert(n as u32, (n, v));
            }
        }
        *lock(&self.visible) = batch.cursor;
        *lock(&self.last_build) = (started.elapsed().as_millis() as u64, at);
        writer.changed += current.len() as u64;
        let ids: Vec<u32> = current.into_iter().map(|(id, _)| id).collect();
        self.rebuild_step(&mut writer, &ids)?;
        if writer.changed >= SNAPSHOT_CHANGES || (writer.changed > 0 && writer.taken.elapsed() >= SNAPSHOT_AFTER) {
            self.snapshot(&mut writer)?;
        }
        Ok(applied)
    }

    fn check(&self, v: &[f32]) -> Result<(), String> {
        if v.len() != self.spec.dimensions {
            return Err(format!("the vector has {} components; the index takes {}", v.len(), self.spec.dimensions));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(format!("component {i} is not a finite number"));
        }
        if self.spec.metric == Metric::Cosine && v.iter().all(|x| *x == 0.0) {
            return Err("a zero vector has no direction (cosine distance)".into());
        }
        if self.spec.metric == Metric::Dot {
            let norm = norm(v);
            if norm > self.spec.max_norm {
                return Err(format!(
                    "its length {norm} exceeds max_norm {} (dot distance): raise max_norm under a new index name",
                    self.spec.max_norm
                ));
            }
        }
        Ok(())
    }

    fn placed(&self, v: &[f32]) -> Vec<f32> {
        placed(&self.spec, v)
    }

    /// The graph's distance as the metric reports it (see [`Metric`]); `query_norm` is the
    /// query's length (used by `Metric::Dot`).
    fn reported(&self, query_norm: f32, graph_distance: f32) -> f32 {
        match self.spec.metric {
            // usearch's cosine distance is pgvector's, 1 − cos.
            Metric::Cosine => graph_distance,
            // usearch's L2 is squared.
            Metric::Euclidean => graph_distance.max(0.0).sqrt(),
            Metric::Dot => -(query_norm * query_norm + self.spec.max_norm * self.spec.max_norm - graph_distance) / 2.0,
        }
    }

    fn id_of(&self, rtxn: &RoTxn, key: &str) -> Result<Option<u32>, StoreError> {
        Ok(self.t.ids.get(rtxn, key.as_bytes())?.and_then(be32))
    }

    fn upsert(
        &self,
        wtxn: &mut RwTxn,
        u: &Upsert,
        changed: &mut BTreeMap<u32, Option<(u64, Vec<f32>)>>,
    ) -> Result<(), StoreError> {
        let id = match self.id_of(wtxn, &u.key)? {
            Some(id) => {
                self.unpost(wtxn, id)?;
                id
            }
            None => {
                // Ids are never reused: a search in flight never meets a reused one.
                let next = self.t.meta.get(wtxn, b"next_id")?.and_then(be32).unwrap_or(0);
                let after = next.checked_add(1).ok_or(StoreError::IdsExhausted)?;
                self.t.meta.put(wtxn, b"next_id", &after.to_be_bytes())?;
                self.t.ids.put(wtxn, u.key.as_bytes(), &next.to_be_bytes())?;
                self.t.keys.put(wtxn, &next.to_be_bytes(), u.key.as_bytes())?;
                next
            }
        };
        // An update that leaves the vector as it is (another column changed, or the vector
        // came as unchanged TOAST) keeps its node: linking a node is a batch's cost.
        let generation = match self.t.vectors.get(wtxn, &id.to_be_bytes())? {
            Some(stored) if vector_of(stored) == u.vector => None,
            Some(stored) => Some(
                generation_of(stored)
                    .and_then(|g| g.checked_add(1))
                    .filter(|g| *g != RETIRED)
                    .ok_or(StoreError::IdsExhausted)?,
            ),
            None => Some(0),
        };
        if let Some(generation) = generation {
            self.t.vectors.put(wtxn, &id.to_be_bytes(), &vector_bytes(generation, &u.vector))?;
            changed.insert(id, Some((node(id, generation), self.placed(&u.vector))));
        }
        let values = serde_json::to_vec(&u.filters).map_err(|e| StoreError::Damaged(e.to_string()))?;
        self.t.filters.put(wtxn, &id.to_be_bytes(), &values)?;
        for (column, value) in &u.filters {
            let k = posting_key(column, value);
            let mut ids = self.posting(wtxn, &k)?;
            ids.insert(id);
            self.put_posting(wtxn, &k, &ids)?;
        }
        Ok(())
    }

    /// Takes `id` out of the postings of the filter values it holds.
    fn unpost(&self, wtxn: &mut RwTxn, id: u32) -> Result<(), StoreError> {
        let Some(old) = self.t.filters.get(wtxn, &id.to_be_bytes())? else { return Ok(()) };
        let old: Map<String, Json> = serde_json::from_slice(old).map_err(|e| StoreError::Damaged(e.to_string()))?;
        for (column, value) in &old {
            let k = posting_key(column, value);
            let mut ids = self.posting(wtxn, &k)?;
            ids.remove(id);
            self.put_posting(wtxn, &k, &ids)?;
        }
        Ok(())
    }

    fn posting(&self, rtxn: &RoTxn, k: &[u8]) -> Result<RoaringBitmap, StoreError> {
        match self.t.postings.get(rtxn, k)? {
            Some(b) => RoaringBitmap::deserialize_from(b).map_err(|e| StoreError::Damaged(e.to_string())),
            None => Ok(RoaringBitmap::new()),
        }
    }

    fn put_posting(&self, wtxn: &mut RwTxn, k: &[u8], ids: &RoaringBitmap) -> Result<(), StoreError> {
        if ids.is_empty() {
            self.t.postings.delete(wtxn, k)?;
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(ids.serialized_size());
        ids.serialize_into(&mut bytes).map_err(|e| StoreError::Damaged(e.to_string()))?;
        self.t.postings.put(wtxn, k, &bytes)?;
        Ok(())
    }

    /// Removes `key`'s vector and values; false when it was not indexed.
    fn remove(
        &self,
        wtxn: &mut RwTxn,
        key: &str,
        changed: &mut BTreeMap<u32, Option<(u64, Vec<f32>)>>,
    ) -> Result<bool, StoreError> {
        let Some(id) = self.id_of(wtxn, key)? else { return Ok(false) };
        self.unpost(wtxn, id)?;
        for t in [&self.t.filters, &self.t.keys, &self.t.vectors] {
            t.delete(wtxn, &id.to_be_bytes())?;
        }
        self.t.ids.delete(wtxn, key.as_bytes())?;
        changed.insert(id, None);
        Ok(true)
    }

    /// Empties the tables (ids are still not reused); the graph is emptied after the commit,
    /// and with no snapshot named a crash rebuilds it from what is stored after the truncate.
    fn truncate(&self, wtxn: &mut RwTxn) -> Result<(), StoreError> {
        let t = &self.t;
        for table in [&t.ids, &t.keys, &t.vectors, &t.filters, &t.postings, &t.dead] {
            table.clear(wtxn)?;
        }
        t.meta.delete(wtxn, b"snapshot")?;
        Ok(())
    }

    /// The `k` nearest rows to `query` among those whose filter values equal every one of
    /// `filter`'s, with the cursor the answer reflects.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &Map<String, Json>,
    ) -> Result<(Vec<Hit>, Option<Cursor>), StoreError> {
        if query.len() != self.spec.dimensions {
            return Err(StoreError::Query { got: query.len(), want: self.spec.dimensions });
        }
        self.opened()?;
        let cursor = *lock(&self.visible);
        let rtxn = self.env.read_txn()?;
        let mut allowed: Option<RoaringBitmap> = None;
        for (column, value) in filter {
            let ids = self.posting(&rtxn, &posting_key(column, value))?;
            allowed = Some(match allowed {
                Some(a) => a & ids,
                None => ids,
            });
        }
        if allowed.as_ref().is_some_and(|a| a.is_empty()) || k == 0 || self.graph.size() == 0 {
            return Ok((Vec::new(), cursor));
        }
        // Under `Metric::Dot` the query's extra component is 0.
        let mut placed = query.to_vec();
        placed.resize(self.graph.dims, 0.0);
        let found = {
            let live = read(&self.live);
            let wanted = |node: u64| live.current(node) && allowed.as_ref().is_none_or(|a| a.contains(node as u32));
            let mut found = self.graph.search(&placed, k, wanted)?;
            let orphans = read(&self.orphans);
            if !orphans.is_empty() {
                let metric = self.spec.metric;
                found.extend(
                    orphans.values().filter(|(n, _)| wanted(*n)).map(|(n, v)| (*n, graph_distance(metric, &placed, v))),
                );
                found.sort_by(|a, b| a.1.total_cmp(&b.1));
                found.dedup_by_key(|f| f.0);
                found.truncate(k);
            }
            found
        };
        let mut hits = Vec::with_capacity(found.len());
        let query_norm = norm(query);
        for (node, distance) in found {
            let id = node as u32;
            // An item deleted by a batch committed since is skipped.
            let Some(key) = self.t.keys.get(&rtxn, &id.to_be_bytes())? else { continue };
            hits.push(Hit {
                key: String::from_utf8_lossy(key).into_owned(),
                distance: self.reported(query_norm, distance),
            });
        }
        Ok((hits, cursor))
    }

    /// The stored vector of `key`, if it is indexed.
    pub fn vector(&self, key: &str) -> Result<Option<Vec<f32>>, StoreError> {
        let rtxn = self.env.read_txn()?;
        let Some(id) = self.id_of(&rtxn, key)? else { return Ok(None) };
        Ok(self.t.vectors.get(&rtxn, &id.to_be_bytes())?.map(vector_of))
    }

    /// Every indexed key (for checks; a full scan).
    pub fn keys(&self) -> Result<Vec<String>, StoreError> {
        let rtxn = self.env.read_txn()?;
        let mut out = Vec::new();
        for entry in self.t.ids.iter(&rtxn)? {
            let (k, _) = entry?;
            out.push(String::from_utf8_lossy(k).into_owned());
        }
        Ok(out)
    }

    /// Items whose current node the graph holds (equal to `stats().items` between batches;
    /// for checks).
    pub fn graph_items(&self) -> usize {
        let live = read(&self.live);
        let held = live
            .generation
            .iter()
            .enumerate()
            .filter(|(id, g)| **g != RETIRED && self.graph.contains(node(*id as u32, **g)));
        held.count()
    }

    /// Up to `limit` dead letters, in key order.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let rtxn = self.env.read_txn()?;
        let mut out = Vec::new();
        for entry in self.t.dead.iter(&rtxn)?.take(limit) {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v).map_err(|e| StoreError::Damaged(e.to_string()))?);
        }
        Ok(out)
    }

    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let rtxn = self.env.read_txn()?;
        let (last_build_ms, last_build_at_us) = *lock(&self.last_build);
        Ok(StoreStats {
            items: self.t.ids.len(&rtxn)?,
            cursor: *lock(&self.visible),
            dead_letters: self.t.dead.len(&rtxn)?,
            last_build_ms,
            last_build_at_us,
            orphans: read(&self.orphans).len() as u64,
            graph_nodes: self.graph.size() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64) -> Option<Cursor> {
        Some(Cursor { commit_lsn: Lsn(lsn), index: 0 })
    }

    fn spec(metric: Metric) -> StoreSpec {
        StoreSpec { max_bytes: 64 << 20, ..StoreSpec::new(4, metric) }
    }

    /// An empty Euclidean store of `dims`-component vectors (the directory lives as long as the
    /// store is used).
    fn euclidean(dims: usize) -> (tempfile::TempDir, Store, StoreSpec) {
        let dir = tempfile::tempdir().unwrap();
        let spec = StoreSpec { max_bytes: 256 << 20, ..StoreSpec::new(dims, Metric::Euclidean) };
        let store = Store::open(dir.path(), &spec).unwrap();
        (dir, store, spec)
    }

    fn up(key: &str, v: [f32; 4], color: &str) -> Upsert {
        let mut filters = Map::new();
        filters.insert("color".into(), Json::String(color.into()));
        Upsert { key: key.into(), vector: v.to_vec(), filters }
    }

    #[test]
    fn upserts_deletes_filters_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &spec(Metric::Euclidean)).unwrap();
        let batch = Batch {
            upserts: vec![
                up("a", [0.0, 0.0, 0.0, 1.0], "red"),
                up("b", [0.0, 0.0, 1.0, 0.0], "blue"),
                up("c", [0.0, 0.0, 0.9, 0.1], "red"),
                up("bad", [1.0, 2.0, 3.0, f32::NAN], "red"),
            ],
            cursor: at(10),
            ..Default::default()
        };
        let applied = store.apply(&batch).unwrap();
        assert_eq!((applied.upserted, applied.dead, applied.new), (3, 1, true));
        // A replay of the same batch changes nothing.
        assert!(!store.apply(&batch).unwrap().new);
        let (hits, cursor) = store.search(&[0.0, 0.0, 1.0, 0.0], 2, &Map::new()).unwrap();
        assert_eq!(cursor, at(10));
        assert_eq!(hits.iter().map(|h| h.key.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        let mut red = Map::new();
        red.insert("color".into(), Json::String("red".into()));
        let (hits, _) = store.search(&[0.0, 0.0, 1.0, 0.0], 2, &red).unwrap();
        assert_eq!(hits.iter().map(|h| h.key.as_str()).collect::<Vec<_>>(), ["c", "a"]);
        let dead = store.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].reason.contains("component 3"), "{dead:?}");

        // c turns blue and moves; b goes; a bad vector for a replaces nothing but a's entry.
        let batch = Batch {
            upserts: vec![
                up("c", [1.0, 0.0, 0.0, 0.0], "blue"),
                Upsert { key: "a".into(), vector: vec![1.0, 0.0], filters: Map::new() },
            ],
            deletes: vec!["b".into()],
            cursor: at(20),
            ..Default::default()
        };
        store.apply(&batch).unwrap();
        let mut keys = store.keys().unwrap();
        keys.sort();
        assert_eq!(keys, ["c"]);
        assert!(store.search(&[0.0, 0.0, 1.0, 0.0], 3, &red).unwrap().0.is_empty());
        assert_eq!(store.stats().unwrap().dead_letters, 2);
        drop(store);
        // Reopened: the same state; a different dimension count is refused.
        let store = Store::open(dir.path(), &spec(Metric::Euclidean)).unwrap();
        assert_eq!(store.cursor().unwrap(), at(20));
        assert_eq!(store.keys().unwrap(), ["c"]);
        drop(store);
        let wrong = StoreSpec { dimensions: 8, ..spec(Metric::Euclidean) };
        assert!(matches!(Store::open(dir.path(), &wrong), Err(StoreError::Dimensions { stored: 4, wanted: 8 })));
    }

    #[test]
    fn truncate_empties_and_cosine_refuses_zero_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &spec(Metric::Cosine)).unwrap();
        let batch = Batch {
            upserts: vec![up("a", [1.0, 0.0, 0.0, 0.0], "red"), up("z", [0.0; 4], "red")],
            cursor: at(1),
            ..Default::default()
        };
        assert_eq!(store.apply(&batch).unwrap().dead, 1);
        store
            .apply(&Batch {
                truncate: true,
                upserts: vec![up("b", [0.0, 1.0, 0.0, 0.0], "red")],
                cursor: at(2),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(store.keys().unwrap(), ["b"]);
        assert_eq!(store.stats().unwrap().dead_letters, 0);
    }

    /// Recall against exact search, and every row found by its own vector, after batches of
    /// inserts, updates and deletes.
    #[test]
    fn recall_against_exact_search_after_updates() {
        use rand::{Rng, SeedableRng};
        let dims = 16;
        let (_dir, store, _) = euclidean(dims);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut rows: std::collections::BTreeMap<String, Vec<f32>> = Default::default();
        let mut next = 0;
        for round in 0..6u64 {
            let mut batch = Batch { cursor: at(round + 1), ..Default::default() };
            for _ in 0..200 {
                let key = if round > 0 && rng.gen_bool(0.3) {
                    format!("k{}", rng.gen_range(0..next))
                } else {
                    next += 1;
                    format!("k{}", next - 1)
                };
                let v: Vec<f32> = (0..dims).map(|_| rng.gen_range(-1.0..1.0)).collect();
                rows.insert(key.clone(), v.clone());
                batch.upserts.push(Upsert { key, vector: v, filters: Map::new() });
            }
            for _ in 0..(round * 20) {
                let key = format!("k{}", rng.gen_range(0..next));
                if rows.remove(&key).is_some() {
                    batch.upserts.retain(|u| u.key != key);
                    batch.deletes.push(key);
                }
            }
            store.apply(&batch).unwrap();
        }
        let mut keys = store.keys().unwrap();
        keys.sort();
        assert_eq!(keys, rows.keys().cloned().collect::<Vec<_>>(), "the index holds exactly the live rows");
        let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>();
        let (mut found, mut wanted) = (0, 0);
        for (key, v) in rows.iter().take(100) {
            let (hits, _) = store.search(v, 10, &Map::new()).unwrap();
            assert_eq!(&hits[0].key, key, "a row's own vector finds it first");
            let mut exact: Vec<(&String, f32)> = rows.iter().map(|(k, w)| (k, dist(v, w))).collect();
            exact.sort_by(|a, b| a.1.total_cmp(&b.1));
            let top: std::collections::HashSet<&String> = exact.iter().take(10).map(|e| e.0).collect();
            found += hits.iter().filter(|h| top.contains(&h.key)).count();
            wanted += 10;
        }
        let recall = found as f64 / wanted as f64;
        assert!(recall >= 0.95, "recall@10 {recall}");
    }

    /// Every row is found by its own vector after batches linked from several threads, on data
    /// full of near-duplicates (`sin(g·k)` repeats within 6·10⁻⁴ every 710 rows, 710 being
    /// close to 113 turns): usearch's concurrent adds strand some of them after their own add
    /// returned (a few per 3,000 on two cores), and the store must keep those aside.
    #[test]
    fn near_duplicates_linked_in_parallel_are_each_found_by_their_own_vector() {
        let vector = |g: i64| -> Vec<f32> { (1..=8).map(|k| ((g * k) as f64).sin() as f32).collect() };
        for round in 0..5 {
            let (_dir, store, _) = euclidean(8);
            for (first, last) in [(1, 2000), (2001, 3000)] {
                let upserts =
                    (first..=last).map(|g| Upsert { key: g.to_string(), vector: vector(g), filters: Map::new() });
                store.apply(&Batch { upserts: upserts.collect(), ..Default::default() }).unwrap();
            }
            let missed: Vec<i64> = (1..=3000)
                .filter(|g| {
                    let (hits, _) = store.search(&vector(*g), 5, &Map::new()).unwrap();
                    hits.first().map(|h| h.key.as_str()) != Some(&g.to_string())
                })
                .collect();
            assert!(missed.is_empty(), "round {round}: not found first by their own vector: {missed:?}");
        }
    }

    /// Distances come out as pgvector's operators give them: `<=>` 1 − cos, `<->` the
    /// straight-line distance, `<#>` the negative inner product; a changed distance is refused.
    #[test]
    fn distances_as_pgvector_reports_them() {
        let q = [1.0, 2.0, 0.0, 0.0];
        let v = [3.0, 0.0, 4.0, 0.0];
        let batch = Batch { upserts: vec![up("v", v, "red")], cursor: at(1), ..Default::default() };
        let mut dirs = Vec::new();
        for (metric, want) in [
            (Metric::Cosine, 1.0 - 3.0 / (5f32.sqrt() * 5.0)),
            (Metric::Euclidean, (4.0f32 + 4.0 + 16.0).sqrt()),
            (Metric::Dot, -3.0),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), &StoreSpec { max_norm: 10.0, ..spec(metric) }).unwrap();
            store.apply(&batch).unwrap();
            let (hits, _) = store.search(&q, 1, &Map::new()).unwrap();
            assert!((hits[0].distance - want).abs() < 1e-4, "{metric:?}: {} vs {want}", hits[0].distance);
            assert_eq!(store.vector("v").unwrap().unwrap(), v, "{metric:?}: the row's own vector back");
            dirs.push(dir);
        }
        let changed = StoreSpec { max_norm: 20.0, ..spec(Metric::Dot) };
        let refused = Store::open(dirs[2].path(), &changed).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("max_norm 10") && refused.contains("new index name"), "{refused}");
        assert!(matches!(Store::open(dirs[0].path(), &spec(Metric::Dot)), Err(StoreError::Distance { .. })));
    }

    /// Under `Metric::Dot` the nearest are the largest inner products (exact search agrees),
    /// and a vector longer than `max_norm` is a dead letter.
    #[test]
    fn dot_finds_the_largest_products() {
        use rand::{Rng, SeedableRng};
        let dims = 16;
        let dir = tempfile::tempdir().unwrap();
        let spec = StoreSpec { max_bytes: 256 << 20, max_norm: 8.0, ..StoreSpec::new(dims, Metric::Dot) };
        let store = Store::open(dir.path(), &spec).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Lengths vary (0.5 to 2 per component scale): the product, not the angle, decides.
        let rows: Vec<Vec<f32>> = (0..2_000)
            .map(|_| {
                let scale = rng.gen_range(0.5..1.5);
                (0..dims).map(|_| scale * rng.gen_range(-1.0f32..1.0)).collect()
            })
            .collect();
        let mut upserts: Vec<Upsert> = rows
            .iter()
            .enumerate()
            .map(|(i, v)| Upsert { key: i.to_string(), vector: v.clone(), filters: Map::new() })
            .collect();
        upserts.push(Upsert { key: "long".into(), vector: vec![3.0; dims], filters: Map::new() });
        let applied = store.apply(&Batch { upserts, cursor: at(1), ..Default::default() }).unwrap();
        assert_eq!(applied.dead, 1);
        assert!(store.dead_letters(1).unwrap()[0].reason.contains("exceeds max_norm 8"));
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let (mut found, mut wanted) = (0, 0);
        for _ in 0..100 {
            let q: Vec<f32> = (0..dims).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let (hits, _) = store.search(&q, 10, &Map::new()).unwrap();
            let mut exact: Vec<(usize, f32)> = rows.iter().enumerate().map(|(i, v)| (i, dot(&q, v))).collect();
            exact.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<String> = exact.iter().take(10).map(|e| e.0.to_string()).collect();
            found += hits.iter().filter(|h| top.contains(&h.key)).count();
            wanted += 10;
            let first: usize = hits[0].key.parse().unwrap();
            assert!((hits[0].distance + dot(&q, &rows[first])).abs() < 1e-3, "distance is −q·x");
        }
        let recall = found as f64 / wanted as f64;
        assert!(recall >= 0.95, "recall@10 under dot {recall}");
    }

    /// The graph lives in memory: reopened, the store brings it back to exactly the committed
    /// rows — rebuilt from the stored vectors, then from a snapshot with the items changed
    /// since redone, then rebuilt again past a damaged snapshot.
    #[test]
    fn the_graph_comes_back_from_snapshot_and_changes_or_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let point = |i: usize| [i as f32, (i % 7) as f32, (i % 3) as f32, 1.0];
        let check = |store: &Store, live: &std::collections::BTreeMap<String, [f32; 4]>| {
            let mut keys = store.keys().unwrap();
            keys.sort();
            assert_eq!(keys, live.keys().cloned().collect::<Vec<_>>());
            assert_eq!(store.graph_items(), live.len(), "the graph holds exactly the stored rows");
            for (key, v) in live {
                let (hits, _) = store.search(v, 1, &Map::new()).unwrap();
                assert_eq!(&hits[0].key, key, "{key} found by its own vector");
                assert!(hits[0].distance < 1e-3);
            }
        };
        let mut live = std::collections::BTreeMap::new();
        let store = Store::open(dir.path(), &spec(Metric::Euclidean)).unwrap();
        let upserts: Vec<Upsert> = (0..300).map(|i| up(&format!("k{i}"), point(i), "red")).collect();
        for u in &upserts {
            live.insert(u.key.clone(), point(u.key[1..].parse().unwrap()));
        }
        store.apply(&Batch { upserts, cursor: at(1), ..Default::default() }).unwrap();
        drop(store);
        // No snapshot yet: rebuilt from the vectors (and a snapshot written).
        let store = Store::open(dir.path(), &spec(Metric::Euclidean)).unwrap();
        assert_eq!(store.cursor().unwrap(), at(1));
        check(&store, &live);
        let snapshots = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("graph-"))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };
        assert_eq!(snapshots().len(), 1);
        // Moved, deleted and new rows after the snapshot: linked in when the store opens.
        let mut batch = Batch { cursor: at(2), ..Default::default() };
        for i in (0..300).step_by(3) {
            // Moved far (a third of the rows at once): usearch's own removal loses rows here.
            let v = point(i + 1000);
            batch.upserts.push(up(&format!("k{i}"), v, "blue"));
            live.insert(format!("k{i}"), v);
        }
        for i in (1..300).step_by(5) {
            batch.deletes.push(format!("k{i}"));
            live.remove(&format!("k{i}"));
        }
        batch.upserts.push(up("new", point(5000), "red"));
        live.insert("new".into(), point(5000));
        store.apply(&batch).unwrap();
        drop(store);
        let store = Store::open(dir.path(), &spec(Metric::Euclidean)).unwrap();
        assert_eq!(store.cursor().unwrap(), at(2));
        check(&store, &live);
        drop(store);
        // A damaged snapshot is not trusted: rebuilt from the vectors.
        for path in snapshots() {
            std::fs::write(path, b"not a graph").unwrap();
        }
        let store = Store::open(dir.path(), &spec(Metric::Euclidean)).unwrap();
        check(&store, &live);
    }

    /// Once the waypoints reach the rows held, a whole graph is built beside the one in use;
    /// batches go on meanwhile, and what they change is redone on the new graph before it
    /// takes over.
    #[test]
    fn a_relinked_graph_is_rebuilt_whole_while_batches_go_on() {
        use rand::{Rng, SeedableRng};
        let dims = 8;
        let (_dir, store, _) = euclidean(dims);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut live: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut cursor = 0;
        while store.graph_rebuilds() < 2 {
            cursor += 1;
            assert!(cursor < 400, "no rebuild after {} relinked items", cursor * 500);
            let mut batch = Batch { cursor: at(cursor), ..Default::default() };
            for _ in 0..500 {
                let key = format!("k{}", rng.gen_range(0..2_000));
                let v: Vec<f32> = (0..dims).map(|_| rng.gen_range(-1.0..1.0)).collect();
                if rng.gen_bool(0.1) {
                    if live.remove(&key).is_some() {
                        batch.deletes.push(key);
                    }
                } else if !batch.deletes.contains(&key) && !batch.upserts.iter().any(|u| u.key == key) {
                    live.insert(key.clone(), v.clone());
                    batch.upserts.push(Upsert { key, vector: v, filters: Map::new() });
                }
            }
            store.apply(&batch).unwrap();
        }
        let mut keys = store.keys().unwrap();
        keys.sort();
        assert_eq!(keys, live.keys().cloned().collect::<Vec<_>>());
        assert_eq!(store.graph_items(), live.len(), "the rebuilt graph holds exactly the stored rows");
        for (key, v) in &live {
            assert_eq!(&store.search(v, 1, &Map::new()).unwrap().0[0].key, key, "{key} found by its own vector");
        }
    }

    /// A vector far from all the others (here: random directions, 20 times the data's spread)
    /// gets no way in from the graph's pruned links; it is still found by its own vector
    /// the moment its batch is in, and after a restart.
    #[test]
    fn far_vectors_are_found_by_their_own_vector() {
        use rand::{Rng, SeedableRng};
        let dims = 32;
        let (dir, store, spec) = euclidean(dims);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let centres: Vec<Vec<f32>> = (0..20).map(|_| (0..dims).map(|_| rng.gen_range(-1.0..1.0)).collect()).collect();
        let upserts = (0..5_000)
            .map(|i| {
                let c = &centres[i % 20];
                let vector = c.iter().map(|x| x + rng.gen_range(-0.05..0.05)).collect();
                Upsert { key: format!("c{i}"), vector, filters: Map::new() }
            })
            .collect();
        store.apply(&Batch { upserts, cursor: at(1), ..Default::default() }).unwrap();
        let mut far = Vec::new();
        for b in 0..200u64 {
            let vector: Vec<f32> = (0..dims).map(|_| rng.gen_range(-20.0..20.0)).collect();
            let key = format!("far{}", b % 50);
            store
                .apply(&Batch {
                    upserts: vec![Upsert { key: key.clone(), vector: vector.clone(), filters: Map::new() }],
                    cursor: at(2 + b),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(store.search(&vector, 1, &Map::new()).unwrap().0[0].key, key, "batch {b}");
            far.retain(|(k, _): &(String, Vec<f32>)| *k != key);
            far.push((key, vector));
        }
        let orphans = store.stats().unwrap().orphans;
        println!("{orphans} of 50 far rows are orphans");
        store.checkpoint().unwrap();
        drop(store);
        let store = Store::open(dir.path(), &spec).unwrap();
        assert_eq!(store.stats().unwrap().orphans, orphans, "the orphans come back with the snapshot");
        for (key, v) in &far {
            assert_eq!(&store.search(v, 1, &Map::new()).unwrap().0[0].key, key, "{key} after a restart");
        }
    }

    /// An update that keeps a row's vector (another column changed) changes its filter values
    /// and leaves the graph as it is: the row is still found first, under its new value only.
    #[test]
    fn an_update_that_keeps_the_vector_only_changes_filters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &spec(Metric::Euclidean)).unwrap();
        let rows = [up("a", [1.0, 0.0, 0.0, 0.0], "red"), up("b", [0.0, 1.0, 0.0, 0.0], "red")];
        store.apply(&Batch { upserts: rows.to_vec(), cursor: at(1), ..Default::default() }).unwrap();
        store
            .apply(&Batch { upserts: vec![up("a", [1.0, 0.0, 0.0, 0.0], "blue")], cursor: at(2), ..Default::default() })
            .unwrap();
        let mut blue = Map::new();
        blue.insert("color".into(), Json::String("blue".into()));
        let mut red = Map::new();
        red.insert("color".into(), Json::String("red".into()));
        assert_eq!(store.search(&[1.0, 0.0, 0.0, 0.0], 1, &blue).unwrap().0[0].key, "a");
        assert_eq!(
            store.search(&[1.0, 0.0, 0.0, 0.0], 2, &red).unwrap().0.iter().map(|h| h.key.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(store.cursor().unwrap(), at(2));
    }
}
