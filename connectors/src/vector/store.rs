//! One vector index on disk: an HNSW graph (hannoy) in an LMDB environment, with the keys, the
//! filter columns' values, their postings, the dead letters and the feed cursor beside it.
//!
//! Guarantees:
//! * **Exactly once.** A batch's changes, the graph's rebuild and the cursor it carries commit
//!   in one LMDB write transaction; a batch whose cursor is not past the stored one is not
//!   applied again (a replay after kill -9). LMDB's commit is durable (fsync) when it returns.
//! * **Bad rows do not stop the index.** A vector of the wrong dimension, or with a non-finite
//!   component, is not indexed; its key and the reason go to the dead letters (and its old
//!   vector, if any, leaves the index), in the same transaction.
//! * **Readers never wait** for the writer (LMDB's MVCC): a search sees the last committed
//!   batch, and says which cursor that is.

use hannoy::distances::{Cosine, Euclidean};
use hannoy::{Database as Vectors, Distance, Reader, Writer};
use heed::types::Bytes;
use heed::{CommitOrAbort, Env, EnvOpenOptions, RoTxn, RwTxn};
use rand_hnsw::SeedableRng;
use roaring::RoaringBitmap;
use serde_json::{Map, Value as Json};
use std::path::Path;
use synapse_schemas::{Cursor, Lsn};

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
    /// largest product (the reduction of Bachrach et al., 2014). A vector longer than
    /// `max_norm` cannot be placed and becomes a dead letter.
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
    /// Largest size the environment may grow to (LMDB maps it; nothing is allocated up front).
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
    pub last_build_ms: u64,
    /// When the last batch committed, microseconds since the Unix epoch.
    pub last_build_at_us: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the index's LMDB environment: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("the HNSW graph: {0}")]
    Graph(#[from] hannoy::Error),
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
}

/// HNSW graph parameters: M links per node (M0 on the base layer), construction width, and
/// the search width (at least k).
const M: usize = 16;
const M0: usize = 32;
const EF_CONSTRUCTION: usize = 128;
const EF_SEARCH: usize = 100;

enum Graph {
    Cosine(Vectors<'static, Cosine>),
    Euclidean(Vectors<'static, Euclidean>),
}

type Raw = heed::Database<'static, Bytes, Bytes>;

/// The side tables, all byte-keyed and byte-valued (encodings below).
struct Tables {
    /// `cursor`, `next_id`, `dims`, `built_ms`, `built_at` → big-endian numbers.
    meta: Raw,
    /// key → id (u32 BE).
    ids: Raw,
    /// id → key.
    keys: Raw,
    /// id → the row's filter values (JSON object).
    filters: Raw,
    /// `column\0value-json` → the ids holding it (a serialized roaring bitmap).
    postings: Raw,
    /// key → [`DeadLetter`] (JSON).
    dead: Raw,
}

/// One vector index in its directory.
pub struct Store {
    env: Env,
    graph: Graph,
    t: Tables,
    spec: StoreSpec,
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

impl Store {
    /// Opens (or makes) the store in `dir`.
    pub fn open(dir: &Path, spec: &StoreSpec) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Lmdb(heed::Error::Io(e)))?;
        // SAFETY: heed's open is unsafe because the same files opened twice in one process, or
        // by another process with other options, could be corrupted; one synapse owns its
        // log.dir (its lock) and opens each index once (docs/decisions/0019-vector-index.md).
        #[allow(unsafe_code)]
        let env = unsafe { EnvOpenOptions::new().map_size(spec.max_bytes).max_dbs(8).open(dir)? };
        let names = ["meta", "ids", "keys", "filters", "postings", "dead"];
        let wtxn = env.write_txn()?;
        let raw: [Raw; 6] = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
                let mut made = Vec::with_capacity(names.len());
                for n in names {
                    made.push(dbo.create_database::<Bytes, Bytes>(wtxn, Some(n))?);
                }
                let made: [heed::Database<Bytes, Bytes>; 6] =
                    made.try_into().map_err(|_| heed::Error::Io(std::io::Error::other("six databases")))?;
                Ok(CommitOrAbort::<_, ()>::Commit(made))
            })?
            .unwrap_commit();
        let [meta, ids, keys, filters, postings, dead] = raw;
        let wtxn = env.write_txn()?;
        let graph = match spec.metric {
            Metric::Cosine => Graph::Cosine(
                env.create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
                    dbo.create_database(wtxn, Some("vectors")).map(CommitOrAbort::<_, ()>::Commit)
                })?
                .unwrap_commit(),
            ),
            Metric::Euclidean | Metric::Dot => Graph::Euclidean(
                env.create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
                    dbo.create_database(wtxn, Some("vectors")).map(CommitOrAbort::<_, ()>::Commit)
                })?
                .unwrap_commit(),
            ),
        };
        let store = Store { env, graph, t: Tables { meta, ids, keys, filters, postings, dead }, spec: spec.clone() };
        let mut wtxn = store.env.write_txn()?;
        match store.t.meta.get(&wtxn, b"dims")?.and_then(be64) {
            Some(d) if d as usize != spec.dimensions => {
                return Err(StoreError::Dimensions { stored: d as usize, wanted: spec.dimensions })
            }
            Some(_) => {}
            None => {
                store.t.meta.put(&mut wtxn, b"dims", &(spec.dimensions as u64).to_be_bytes())?;
            }
        }
        let wanted = spec.identity();
        match store.t.meta.get(&wtxn, b"metric")? {
            Some(m) if m != wanted.as_bytes() => {
                return Err(StoreError::Distance { stored: String::from_utf8_lossy(m).into_owned(), wanted })
            }
            Some(_) => {}
            // Stores made before the distance was recorded: the graph's own check (hannoy
            // records cosine or euclidean) still refuses a change between those two.
            None => store.t.meta.put(&mut wtxn, b"metric", wanted.as_bytes())?,
        }
        wtxn.commit()?;
        Ok(store)
    }

    /// The stream position of the last applied batch (`None`: not loaded yet).
    pub fn cursor(&self) -> Result<Option<Cursor>, StoreError> {
        let rtxn = self.env.read_txn()?;
        Ok(self.t.meta.get(&rtxn, b"cursor")?.and_then(cursor_of))
    }

    /// Applies `batch` (see the module's guarantees).
    pub fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        let started = std::time::Instant::now();
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
        let mut dead = batch.dead.clone();
        for u in &batch.upserts {
            match self.check(&u.vector) {
                Ok(()) => {
                    self.upsert(&mut wtxn, u)?;
                    self.t.dead.delete(&mut wtxn, u.key.as_bytes())?;
                    applied.upserted += 1;
                }
                Err(reason) => dead.push(DeadLetter { key: u.key.clone(), reason, cursor: batch.cursor }),
            }
        }
        for key in &batch.deletes {
            if self.remove(&mut wtxn, key)? {
                applied.deleted += 1;
            }
            self.t.dead.delete(&mut wtxn, key.as_bytes())?;
        }
        for d in &dead {
            // A row that cannot be indexed any more is not found by its old vector either.
            self.remove(&mut wtxn, &d.key)?;
            let json = serde_json::to_vec(d).map_err(|e| StoreError::Damaged(e.to_string()))?;
            self.t.dead.put(&mut wtxn, d.key.as_bytes(), &json)?;
        }
        applied.dead = dead.len();
        self.build(&mut wtxn, batch.cursor.map_or(0, |c| c.commit_lsn.0 ^ u64::from(c.index)))?;
        let took = started.elapsed().as_millis() as u64;
        match batch.cursor {
            Some(c) => self.t.meta.put(&mut wtxn, b"cursor", &cursor_bytes(c))?,
            // A load starts (and starts over) without a position.
            None => self.t.meta.delete(&mut wtxn, b"cursor").map(|_| ())?,
        }
        self.t.meta.put(&mut wtxn, b"built_ms", &took.to_be_bytes())?;
        self.t.meta.put(&mut wtxn, b"built_at", &synapse_schemas::unix_micros_now().to_be_bytes())?;
        wtxn.commit()?;
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

    /// Components per vector in the graph: one more under `Metric::Dot`.
    fn graph_dims(&self) -> usize {
        self.spec.dimensions + usize::from(self.spec.metric == Metric::Dot)
    }

    /// A row's vector as the graph holds it.
    fn placed(&self, v: &[f32]) -> Vec<f32> {
        let mut out = v.to_vec();
        if self.spec.metric == Metric::Dot {
            let n = norm(v);
            out.push((self.spec.max_norm * self.spec.max_norm - n * n).max(0.0).sqrt());
        }
        out
    }

    /// The graph's distance as the metric reports it (see [`Metric`]); `query_norm` is the
    /// query's length (used by `Metric::Dot`).
    fn reported(&self, query_norm: f32, graph_distance: f32) -> f32 {
        match self.spec.metric {
            // hannoy's cosine is (1 − cos) / 2.
            Metric::Cosine => graph_distance * 2.0,
            // hannoy's Euclidean is squared.
            Metric::Euclidean => graph_distance.max(0.0).sqrt(),
            Metric::Dot => -(query_norm * query_norm + self.spec.max_norm * self.spec.max_norm - graph_distance) / 2.0,
        }
    }

    fn id_of(&self, rtxn: &RoTxn, key: &str) -> Result<Option<u32>, StoreError> {
        Ok(self.t.ids.get(rtxn, key.as_bytes())?.and_then(be32))
    }

    fn upsert(&self, wtxn: &mut RwTxn, u: &Upsert) -> Result<(), StoreError> {
        let vector = self.placed(&u.vector);
        let mut moved = true;
        let id = match self.id_of(wtxn, &u.key)? {
            Some(id) => {
                self.unpost(wtxn, id)?;
                // An update that leaves the vector as it is (another column changed, or the
                // vector came as unchanged TOAST) keeps its place in the graph: a re-insert is
                // most of a batch's cost.
                let stored = match &self.graph {
                    Graph::Cosine(db) => Writer::new(*db, 0, self.graph_dims()).item_vector(wtxn, id)?,
                    Graph::Euclidean(db) => Writer::new(*db, 0, self.graph_dims()).item_vector(wtxn, id)?,
                };
                moved = stored.as_deref() != Some(vector.as_slice());
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
        if moved {
            match &self.graph {
                Graph::Cosine(db) => Writer::new(*db, 0, self.graph_dims()).add_item(wtxn, id, &vector)?,
                Graph::Euclidean(db) => Writer::new(*db, 0, self.graph_dims()).add_item(wtxn, id, &vector)?,
            }
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
    fn remove(&self, wtxn: &mut RwTxn, key: &str) -> Result<bool, StoreError> {
        let Some(id) = self.id_of(wtxn, key)? else { return Ok(false) };
        self.unpost(wtxn, id)?;
        self.t.filters.delete(wtxn, &id.to_be_bytes())?;
        self.t.keys.delete(wtxn, &id.to_be_bytes())?;
        self.t.ids.delete(wtxn, key.as_bytes())?;
        match &self.graph {
            Graph::Cosine(db) => Writer::new(*db, 0, self.graph_dims()).del_item(wtxn, id)?,
            Graph::Euclidean(db) => Writer::new(*db, 0, self.graph_dims()).del_item(wtxn, id)?,
        };
        Ok(true)
    }

    fn truncate(&self, wtxn: &mut RwTxn) -> Result<(), StoreError> {
        for t in [&self.t.ids, &self.t.keys, &self.t.filters, &self.t.postings, &self.t.dead] {
            t.clear(wtxn)?;
        }
        match &self.graph {
            Graph::Cosine(db) => Writer::new(*db, 0, self.graph_dims()).clear(wtxn)?,
            Graph::Euclidean(db) => Writer::new(*db, 0, self.graph_dims()).clear(wtxn)?,
        }
        Ok(())
    }

    /// Links the batch's new items into the graph and repairs around its deleted ones.
    fn build(&self, wtxn: &mut RwTxn, seed: u64) -> Result<(), StoreError> {
        fn run<D: Distance>(db: Vectors<'static, D>, dims: usize, wtxn: &mut RwTxn, seed: u64) -> hannoy::Result<()> {
            let writer = Writer::new(db, 0, dims);
            // Nothing added, moved or deleted (filter values changed, say): the graph stands,
            // and the build's pass over every node's links is not paid.
            if !writer.need_build(wtxn)? {
                return Ok(());
            }
            // Seeded by the cursor: a replayed batch builds the same graph.
            let mut rng = rand_hnsw::rngs::StdRng::seed_from_u64(seed);
            let built = writer.builder(&mut rng).ef_construction(EF_CONSTRUCTION).build::<M, M0>(wtxn);
            built
        }
        match &self.graph {
            Graph::Cosine(db) => run(*db, self.graph_dims(), wtxn, seed)?,
            Graph::Euclidean(db) => run(*db, self.graph_dims(), wtxn, seed)?,
        }
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
        let rtxn = self.env.read_txn()?;
        let cursor = self.t.meta.get(&rtxn, b"cursor")?.and_then(cursor_of);
        let mut allowed: Option<RoaringBitmap> = None;
        for (column, value) in filter {
            let ids = self.posting(&rtxn, &posting_key(column, value))?;
            allowed = Some(match allowed {
                Some(a) => a & ids,
                None => ids,
            });
        }
        if allowed.as_ref().is_some_and(|a| a.is_empty()) || k == 0 {
            return Ok((Vec::new(), cursor));
        }
        fn run<D: Distance>(
            db: Vectors<'static, D>,
            rtxn: &RoTxn,
            query: &[f32],
            k: usize,
            allowed: Option<&RoaringBitmap>,
        ) -> hannoy::Result<Vec<(u32, f32)>> {
            let reader = match Reader::open(rtxn, 0, db) {
                Ok(r) => r,
                // Nothing built yet: an empty index.
                Err(hannoy::Error::MissingMetadata(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut q = reader.nns(k);
            q.ef_search(EF_SEARCH.max(k));
            if let Some(a) = allowed {
                q.candidates(a);
            }
            Ok(q.by_vector(rtxn, query)?.into_nns())
        }
        // Under `Metric::Dot` the query's extra component is 0.
        let mut placed = query.to_vec();
        placed.resize(self.graph_dims(), 0.0);
        let found = match &self.graph {
            Graph::Cosine(db) => run(*db, &rtxn, &placed, k, allowed.as_ref())?,
            Graph::Euclidean(db) => run(*db, &rtxn, &placed, k, allowed.as_ref())?,
        };
        let mut hits = Vec::with_capacity(found.len());
        let query_norm = norm(query);
        for (id, distance) in found {
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
        let mut v = match &self.graph {
            Graph::Cosine(db) => Writer::new(*db, 0, self.graph_dims()).item_vector(&rtxn, id)?,
            Graph::Euclidean(db) => Writer::new(*db, 0, self.graph_dims()).item_vector(&rtxn, id)?,
        };
        if let Some(v) = v.as_mut() {
            v.truncate(self.spec.dimensions);
        }
        Ok(v)
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
        let num = |k: &[u8]| -> Result<Option<u64>, StoreError> { Ok(self.t.meta.get(&rtxn, k)?.and_then(be64)) };
        Ok(StoreStats {
            items: self.t.ids.len(&rtxn)?,
            cursor: self.t.meta.get(&rtxn, b"cursor")?.and_then(cursor_of),
            dead_letters: self.t.dead.len(&rtxn)?,
            last_build_ms: num(b"built_ms")?.unwrap_or(0),
            last_build_at_us: num(b"built_at")?.unwrap_or(0) as i64,
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
        let dir = tempfile::tempdir().unwrap();
        let spec = StoreSpec { max_bytes: 256 << 20, ..StoreSpec::new(dims, Metric::Euclidean) };
        let store = Store::open(dir.path(), &spec).unwrap();
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
