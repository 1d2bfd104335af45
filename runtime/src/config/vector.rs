//! `vector_indexes:` — nearest-neighbour indexes kept in sync with a table's vector column
//! (`synapse_connectors::vector`, docs/decisions/0019-vector-index.md).

use super::validate::Problems;
use super::Config;
use serde::Deserialize;
use synapse_connectors::vector::store::Metric;

/// One index: a source table's vector column, its distance, the columns searches filter on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorIndexConfig {
    /// Names the index in the API (`/v1/indexes/<name>`) and its directory under `log.dir`.
    pub name: String,
    /// The source whose table it follows.
    pub source: String,
    /// `schema.table` (with a primary key: rows are found by it).
    pub table: String,
    /// The vector column: `real[]`, `double precision[]`, or pgvector's `vector`.
    pub column: String,
    pub dimensions: usize,
    /// `cosine` (default), `euclidean` or `dot` (distances as pgvector's `<=>`, `<->`, `<#>`).
    #[serde(default = "default_distance")]
    pub distance: String,
    /// `dot` only, and required there: the longest vector the index takes (a longer one is a
    /// dead letter); the same number for the index's life.
    #[serde(default)]
    pub max_norm: Option<f32>,
    /// Columns whose values a search may require (`"filter": {"lang": "en"}`).
    #[serde(default)]
    pub filters: Vec<String>,
    /// A batch takes every change waiting, up to this many. Large by default: each batch
    /// costs an LMDB commit (an fsync) plus a share per change, so under a backlog bigger
    /// batches keep up where small ones fall behind (docs/decisions/0019-vector-index.md).
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// How long an idle index waits for a first change before it polls again (a batch never
    /// waits for more changes than are there).
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// Largest size of the index on disk, MiB.
    #[serde(default = "default_max_size_mb")]
    pub max_size_mb: usize,
}

fn default_distance() -> String {
    "cosine".into()
}
fn default_batch_rows() -> usize {
    10_000
}
fn default_batch_wait_ms() -> u64 {
    200
}
fn default_max_size_mb() -> usize {
    4096
}

impl VectorIndexConfig {
    /// The distance, once validated.
    pub fn metric(&self) -> Metric {
        match self.distance.as_str() {
            "euclidean" => Metric::Euclidean,
            "dot" => Metric::Dot,
            _ => Metric::Cosine,
        }
    }
}

impl Config {
    pub(super) fn vector_problems(&self, p: &mut Problems) {
        let mut names: Vec<&str> = Vec::new();
        for (i, v) in self.vector_indexes.iter().enumerate() {
            let at = |f: &str| format!("vector_indexes[{i}].{f}");
            if !super::validate::valid_name(&v.name) || names.contains(&v.name.as_str()) {
                p.add(at("name"), format!("`{}` must be unique, 1–40 characters of a-z, 0-9, _ or -", v.name));
            }
            names.push(&v.name);
            if !self.sources.iter().any(|s| s.name == v.source) {
                p.add(at("source"), format!("`{}` is not one of sources", v.source));
            }
            if v.table.split('.').count() != 2 {
                p.add(at("table"), format!("`{}` is not schema.table", v.table));
            }
            if v.column.is_empty() {
                p.add(at("column"), "name the vector column");
            }
            if !(1..=4096).contains(&v.dimensions) {
                p.add(at("dimensions"), format!("{} is out of range: 1 to 4096", v.dimensions));
            }
            match v.distance.as_str() {
                "cosine" | "euclidean" if v.max_norm.is_some() => p.add(at("max_norm"), "applies to distance dot only"),
                "cosine" | "euclidean" => {}
                "dot" => match v.max_norm {
                    None => p.add(
                        at("max_norm"),
                        "distance dot needs the longest vector the index will hold (1 for normalized embeddings)",
                    ),
                    Some(n) if !(n.is_finite() && n > 0.0 && n <= 1e18) => {
                        p.add(at("max_norm"), format!("{n} is not a positive number"))
                    }
                    Some(_) => {}
                },
                other => p.add(at("distance"), format!("`{other}`: cosine, euclidean or dot")),
            }
            if v.filters.contains(&v.column) {
                p.add(at("filters"), format!("`{}` is the vector column", v.column));
            }
            if !(1..=100_000).contains(&v.batch_rows) {
                p.add(at("batch_rows"), format!("{} is out of range: 1 to 100000", v.batch_rows));
            }
            if v.batch_wait_ms > 60_000 {
                p.add(at("batch_wait_ms"), format!("{} is out of range: 0 to 60000", v.batch_wait_ms));
            }
            if !(16..=1 << 20).contains(&v.max_size_mb) {
                p.add(at("max_size_mb"), format!("{} is out of range: 16 to 1048576", v.max_size_mb));
            }
        }
    }
}
