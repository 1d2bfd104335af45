//! The configured vector indexes at run time (`vector_indexes:`): each a component
//! `index/<name>` that loads its table from a snapshot, then follows the source's log
//! (`synapse_connectors::vector::maintain`), and reloads after a gap; and their routes:
//! * `GET /v1/indexes/<name>` — size, position, dead letters, last batch;
//! * `POST /v1/indexes/<name>/search` — `{"vector": [...], "k": 10, "filter": {"lang": "en"},
//!   "after_lsn": "0/1A2B3C4", "timeout_secs": 10, "include": ["title"]}`: the `k` nearest
//!   rows' keys and distances (as pgvector's operators give them), with the source position the
//!   index reflects, and with `include` the rows' current values of those columns read from the
//!   source (`row`; `null` for a row deleted since). With `after_lsn` (e.g. `SELECT
//!   pg_current_wal_lsn()` after a write) the answer waits until the index holds every change
//!   the source committed up to there (read-your-writes), or answers 503 after the timeout.
//!
//! Both are served to `stream` tokens (reads; nothing here changes data).

use crate::config::{Config, VectorIndexConfig};
use crate::ops::{ComponentState, Health};
use crate::pipeline::{supervise, ComponentFailed};
use crate::positions::Positions;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_connectors::api::SnapshotSource;
use synapse_connectors::vector::maintain::{self, IndexSpec};
use synapse_connectors::vector::rows::{Current, CurrentRows};
use synapse_connectors::vector::store::{Batch, Store, StoreError, StoreSpec};
use synapse_connectors::ConnectorError;
use synapse_log::SourceLog;
use synapse_schemas::Lsn;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// One running index.
pub struct Index {
    pub config: VectorIndexConfig,
    store: Arc<Store>,
    spec: IndexSpec,
    /// Rows read by the current (or last) load.
    loaded: AtomicU64,
    /// Every log record below this offset is in the store.
    read: AtomicU64,
    /// Reads the found rows' current values (`include`).
    rows: CurrentRows,
}

/// Every configured index.
#[derive(Default)]
pub struct Indexes {
    indexes: BTreeMap<String, Arc<Index>>,
    positions: Option<Arc<Positions>>,
}

/// Largest `k` a search may ask for.
const MAX_K: usize = 1_000;
const MAX_WAIT_SECS: f64 = 300.0;

impl Indexes {
    /// Opens each index's store under `log.dir/indexes/<name>`.
    pub fn open(config: &Config, positions: Arc<Positions>) -> anyhow::Result<Indexes> {
        let mut indexes = BTreeMap::new();
        for v in &config.vector_indexes {
            let dir = config.log.dir.join("indexes").join(&v.name);
            let spec = StoreSpec {
                max_bytes: v.max_size_mb << 20,
                max_norm: v.max_norm.unwrap_or(1.0),
                ..StoreSpec::new(v.dimensions, v.metric())
            };
            // The graph is brought back by the index's own component, not here: a large one
            // takes seconds, and the rest of synapse does not wait for it.
            let store = Store::open_deferred(&dir, &spec)
                .map_err(|e| anyhow::anyhow!("vector_indexes {}: {e} ({})", v.name, dir.display()))?;
            let spec = IndexSpec {
                name: v.name.clone(),
                table: v.table.clone(),
                column: v.column.clone(),
                filters: v.filters.clone(),
                batch_rows: v.batch_rows,
                batch_wait: Duration::from_millis(v.batch_wait_ms),
            };
            let source = config
                .sources
                .iter()
                .find(|s| s.name == v.source)
                .ok_or_else(|| anyhow::anyhow!("vector_indexes {}: no source {}", v.name, v.source))?;
            let pg = source.url.pg_config().map_err(anyhow::Error::msg)?;
            let index = Index {
                config: v.clone(),
                store: Arc::new(store),
                spec,
                loaded: AtomicU64::new(0),
                read: AtomicU64::new(0),
                rows: CurrentRows::new(pg, &v.table),
            };
            indexes.insert(v.name.clone(), Arc::new(index));
        }
        Ok(Indexes { indexes, positions: Some(positions) })
    }

    /// Starts each index's component: load if it has no position, then follow the log;
    /// reload after a gap.
    pub(crate) fn spawn(
        &self,
        config: &Config,
        logs: &BTreeMap<String, Arc<SourceLog>>,
        tasks: &mut JoinSet<Result<(), ComponentFailed>>,
        health: &Arc<Health>,
        shutdown: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        for index in self.indexes.values() {
            let v = &index.config;
            let Some(source) = config.sources.iter().find(|s| s.name == v.source) else { continue };
            let Some(log) = logs.get(&v.source).cloned() else { continue };
            let c = crate::pipeline::capture_config(source)?;
            let snapshot = SnapshotSource { config: c.source, capture_slot: c.slot, tables: c.tables };
            let info = synapse_connectors::feed::SourceInfo { node: v.source.clone(), database: String::new() };
            let component = format!("index/{}", v.name);
            health.set(&component, ComponentState::Starting);
            let (index, h, sd) = (index.clone(), health.clone(), shutdown.clone());
            tasks.spawn(async move {
                let run = || async {
                    let (store, spec) = (&index.store, &index.spec);
                    let opening = store.clone();
                    tokio::task::spawn_blocking(move || opening.recover())
                        .await
                        .map_err(index_error)?
                        .map_err(index_error)?;
                    loop {
                        let keys = if store.cursor().map_err(|e| ConnectorError::Index(e.to_string()))?.is_none() {
                            h.set(&component, ComponentState::Copying);
                            index.loaded.store(0, Ordering::Relaxed);
                            maintain::load(&snapshot, &info.node, store, spec, &index.loaded).await?
                        } else {
                            let client = synapse_postgres::connect(&snapshot.config, "vector index")
                                .await
                                .map_err(synapse_capture::CaptureError::sql("connecting to the source"))?;
                            maintain::key_columns(&client, &spec.table).await?
                        };
                        h.set(&component, ComponentState::Streaming);
                        let reload =
                            maintain::follow(log.clone(), info.clone(), store, spec, &keys, &index.read, sd.clone())
                                .await?;
                        if !reload {
                            // Shutting down: a snapshot now spares the next start the linking.
                            let closing = store.clone();
                            tokio::task::spawn_blocking(move || closing.checkpoint())
                                .await
                                .map_err(index_error)?
                                .map_err(index_error)?;
                            return Ok::<_, ConnectorError>(());
                        }
                        tracing::warn!(index = %spec.name, "the source's stream has a gap: reloading the index from a new snapshot");
                        maintain::apply(store, Batch { truncate: true, ..Default::default() }).await?;
                    }
                };
                supervise(&component, &h, &sd, run).await?;
                h.set(&component, ComponentState::Stopped);
                Ok(())
            });
        }
        Ok(())
    }

    /// Every index's status (`GET /v1/topology`).
    pub(crate) fn json(&self) -> Value {
        Value::Array(
            self.indexes
                .values()
                .map(|i| status(i).unwrap_or_else(|e| json!({"name": i.config.name, "error": e.to_string()})))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Result<&Arc<Index>, ConnectorError> {
        self.indexes.get(name).ok_or_else(|| ConnectorError::NotFound {
            what: format!(
                "vector index {name} (configured: {})",
                self.indexes.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }
}

fn index_error(e: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Index(e.to_string())
}

fn status(index: &Index) -> Result<Value, ConnectorError> {
    let stats = index.store.stats().map_err(index_error)?;
    let v = &index.config;
    Ok(json!({
        "name": v.name, "source": v.source, "table": v.table, "column": v.column,
        "dimensions": v.dimensions, "distance": v.distance, "filters": v.filters,
        "items": stats.items, "dead_letters": stats.dead_letters,
        "cursor": stats.cursor.map(|c| c.to_string()),
        "lsn": stats.cursor.map(|c| c.commit_lsn.to_string()),
        "loaded_rows": index.loaded.load(Ordering::Relaxed),
        "last_batch_ms": stats.last_build_ms,
        "last_batch_at_us": stats.last_build_at_us,
        "graph_nodes": stats.graph_nodes, "orphans": stats.orphans,
    }))
}

/// A vector index: size, position, lag, dead letters, last batch.
#[utoipa::path(get, path = "/v1/indexes/{name}", tag = "indexes", security(("token" = ["stream"])),
    params(("name" = String, Path, description = "the index")),
    responses((status = 200, description = "the index's status", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn show(
    State(i): State<Arc<Indexes>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ConnectorError> {
    let index = i.get(&name)?;
    let mut v = status(index)?;
    v["dead"] = serde_json::to_value(index.store.dead_letters(20).map_err(index_error)?).unwrap_or_default();
    Ok(Json(v))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchRequest {
    vector: Vec<f32>,
    #[serde(default = "default_k")]
    k: usize,
    #[serde(default)]
    filter: Value,
    #[serde(default)]
    after_lsn: Option<String>,
    #[serde(default)]
    timeout_secs: Option<f64>,
    #[serde(default)]
    include: Vec<String>,
}

fn default_k() -> usize {
    10
}

/// The `k` nearest rows to a vector, optionally filtered, after a position, with the rows'
/// current values.
#[utoipa::path(post, path = "/v1/indexes/{name}/search", tag = "indexes", security(("token" = ["stream"])),
    params(("name" = String, Path, description = "the index")),
    request_body(content = Object, description = "`{\"vector\": [..], \"k\": 10, \"filter\": {..}, \"after_lsn\": \"0/1A2B3C4\", \"timeout_secs\": 10, \"include\": [\"title\"]}`"),
    responses((status = 200, description = "`{\"hits\": [{\"key\", \"distance\", \"row\"}], \"lsn\", \"cursor\"}`", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn search(
    State(i): State<Arc<Indexes>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ConnectorError> {
    let bad = |field: &str, message: String| ConnectorError::BadRequest { field: field.into(), message };
    let req: SearchRequest = serde_json::from_slice(&body).map_err(|e| bad("body", e.to_string()))?;
    let index = i.get(&name)?;
    if req.vector.len() != index.config.dimensions {
        return Err(bad(
            "vector",
            format!("{} components; index {name} holds vectors of {}", req.vector.len(), index.config.dimensions),
        ));
    }
    if req.vector.iter().any(|x| !x.is_finite()) {
        return Err(bad("vector", "every component must be a finite number".into()));
    }
    if !(1..=MAX_K).contains(&req.k) {
        return Err(bad("k", format!("{} is out of range: 1 to {MAX_K}", req.k)));
    }
    let filter = maintain::filter_of(&req.filter).map_err(|m| bad("filter", m))?;
    if let Some(unknown) = filter.keys().find(|c| !index.config.filters.contains(c)) {
        return Err(bad(
            "filter",
            format!("`{unknown}` is not one of the index's filter columns {:?}", index.config.filters),
        ));
    }
    if let Some(lsn) = &req.after_lsn {
        let lsn: Lsn =
            lsn.parse().map_err(|e| bad("after_lsn", format!("{e}: give a position as PostgreSQL prints it")))?;
        let timeout = req.timeout_secs.unwrap_or(10.0);
        if !(0.0..=MAX_WAIT_SECS).contains(&timeout) {
            return Err(bad("timeout_secs", format!("{timeout} is not a number of seconds from 0 to {MAX_WAIT_SECS}")));
        }
        let deadline = Instant::now() + Duration::from_secs_f64(timeout);
        let positions = i.positions.as_ref().ok_or_else(|| index_error("no positions"))?;
        let mut through = None;
        loop {
            if through.is_none() {
                through = positions.captured_through(&index.config.source, lsn)?;
            }
            if through.is_some_and(|t| index.read.load(Ordering::Relaxed) >= t) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ConnectorError::NotReached {
                    what: format!("index {name} has not reached {lsn} within {timeout} s"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let store = index.store.clone();
    let (vector, k) = (req.vector, req.k);
    let started = Instant::now();
    let (hits, cursor) = tokio::task::spawn_blocking(move || store.search(&vector, k, &filter))
        .await
        .map_err(index_error)?
        .map_err(|e| match e {
            StoreError::Opening => ConnectorError::NotReached { what: format!("index {name}: {e}; retry shortly") },
            e => index_error(e),
        })?;
    metrics::histogram!("synapse_vector_search_seconds", "index" => name.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("synapse_vector_searches_total", "index" => name.clone()).increment(1);
    let mut hits = serde_json::to_value(&hits).map_err(index_error)?;
    if !req.include.is_empty() {
        let keys: Vec<String> =
            hits.as_array().into_iter().flatten().filter_map(|h| h["key"].as_str().map(str::to_owned)).collect();
        let rows = index.rows.read(&keys, &req.include).await?;
        for (hit, row) in hits.as_array_mut().into_iter().flatten().zip(rows) {
            match row {
                Current::Row(values) => hit["row"] = Value::Object(values),
                Current::Gone => hit["row"] = Value::Null,
                Current::Ambiguous => {
                    hit["row"] = Value::Null;
                    hit["row_error"] = "the key holds a `/` inside a value: read the row by its key columns".into();
                }
            }
        }
    }
    Ok(Json(json!({
        "hits": hits,
        "cursor": cursor.map(|c| c.to_string()),
        "lsn": cursor.map(|c| c.commit_lsn.to_string()),
    })))
}
