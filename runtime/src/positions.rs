//! Reads at a cut: where each source's capture and each target's applier are, and waiting
//! until targets have applied everything a source committed up to a position.
//!
//! * `GET /v1/positions` — every source captured here (the newest commit in its log, the
//!   position confirmed to its slot) and every applier (its target, shard and key range, the
//!   newest source commit it applied, the log offset below which it has everything);
//! * `GET /v1/positions/wait?source=<name>&lsn=<X/Y>[&target=<name or shard set>][&timeout_secs=]`
//!   — answers once every applier of the source (of that target, or of every shard of that
//!   set) has applied every transaction the source committed at or before `lsn`: after a write,
//!   `SELECT pg_current_wal_lsn()` on the source gives an `lsn` to wait for, and a read of any
//!   shard then sees the write (read-your-writes across shards). `{"reached": false, …}` when
//!   the timeout (default 10 s, at most 300) passes first.
//!
//! Both are served to `stream` tokens: applications read at a cut; nothing here changes data.
//! Sources run by another member of a Kafka consumer group are not known here.

use crate::config::ReshardRole;
use crate::resharding::{ReshardState, Reshards};
use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use synapse_apply::shards::ShardAssignment;
use synapse_apply::ApplyStats;
use synapse_capture::CaptureStats;
use synapse_connectors::ConnectorError;
use synapse_log::{ChangeLog, SourceLog};
use synapse_schemas::Lsn;

struct Captured {
    source: String,
    stats: Arc<CaptureStats>,
    log: Arc<SourceLog>,
}

struct Applying {
    source: String,
    target: String,
    shard: Option<ShardAssignment>,
    role: Option<ReshardRole>,
    stats: Arc<ApplyStats>,
}

/// The captures and appliers this process runs, registered as they start.
pub struct Positions {
    captures: Mutex<Vec<Captured>>,
    appliers: Mutex<Vec<Applying>>,
    /// Which shards serve reads while a set moves.
    reshards: Arc<Reshards>,
}

const POLL: Duration = Duration::from_millis(20);
const MAX_WAIT_SECS: f64 = 300.0;

impl Positions {
    pub fn new(reshards: Arc<Reshards>) -> Positions {
        Positions { captures: Mutex::default(), appliers: Mutex::default(), reshards }
    }

    /// Whether the applier's shard serves reads now (every applier that is not a shard of a
    /// moving set does).
    fn serves(&self, a: &Applying) -> bool {
        let phase = a.shard.as_ref().and_then(|s| self.reshards.phase(&s.set));
        ReshardState::serves(phase, a.role)
    }

    pub fn capture(&self, source: &str, stats: Arc<CaptureStats>, log: Arc<SourceLog>) {
        let mut c = self.captures.lock().unwrap_or_else(PoisonError::into_inner);
        c.retain(|c| c.source != source);
        c.push(Captured { source: source.to_owned(), stats, log });
    }

    pub fn applier(
        &self,
        source: &str,
        target: &str,
        shard: Option<ShardAssignment>,
        role: Option<ReshardRole>,
        stats: Arc<ApplyStats>,
    ) {
        let mut a = self.appliers.lock().unwrap_or_else(PoisonError::into_inner);
        a.retain(|a| a.source != source || a.target != target);
        a.push(Applying { source: source.to_owned(), target: target.to_owned(), shard, role, stats });
    }

    /// Everything captured up to `lsn` is in the source's log below the returned offset
    /// (`None`: not yet, or the source is not captured here).
    pub(crate) fn captured_through(&self, source: &str, lsn: Lsn) -> Result<Option<u64>, ConnectorError> {
        let captures = self.captures.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(c) = captures.iter().find(|c| c.source == source) else {
            return Err(ConnectorError::NotFound {
                what: format!(
                    "source {source} among those this process captures ({})",
                    captures.iter().map(|c| c.source.as_str()).collect::<Vec<_>>().join(", ")
                ),
            });
        };
        // Commits arrive in LSN order: past the newest durable commit's end, or past the
        // position confirmed while idle, every commit at or before `lsn` is in the log.
        let durable = c.stats.durable_lsn.load(Ordering::Relaxed).max(c.stats.confirmed_lsn.load(Ordering::Relaxed));
        Ok((durable >= lsn.0).then(|| c.log.next_offset()))
    }

    /// Waits until every applier of `source` into `target` (see [`Self::waiting_for`]) has
    /// applied all the source committed up to `lsn`, or `deadline`: (reached, captured, the
    /// appliers' positions).
    pub(crate) async fn wait_until(
        &self,
        source: &str,
        target: Option<&str>,
        lsn: Lsn,
        deadline: Instant,
    ) -> Result<(bool, bool, Vec<Value>), ConnectorError> {
        self.waiting_for(source, target)?;
        let mut through = None;
        loop {
            if through.is_none() {
                through = self.captured_through(source, lsn)?;
            }
            let appliers = self.waiting_for(source, target)?;
            let reached = through.is_some_and(|n| appliers.iter().all(|a| a["next_offset"].as_u64().unwrap_or(0) >= n));
            if reached || Instant::now() >= deadline {
                return Ok((reached, through.is_some(), appliers));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub(crate) fn json(&self) -> Value {
        let lsn = |v: u64| Lsn(v).to_string();
        let captures = self.captures.lock().unwrap_or_else(PoisonError::into_inner);
        let sources: Vec<Value> = captures
            .iter()
            .map(|c| {
                json!({
                    "source": c.source,
                    "captured_lsn": lsn(c.stats.durable_lsn.load(Ordering::Relaxed)),
                    "confirmed_lsn": lsn(c.stats.confirmed_lsn.load(Ordering::Relaxed)),
                    "log_next_offset": c.log.next_offset(),
                    "lag_seconds": c.stats.lag_seconds(),
                    "slot_lag_bytes": c.stats.slot_lag_bytes.load(Ordering::Relaxed),
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .appliers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|a| {
                let mut v = applier_json(a, self.serves(a));
                // Behind the log's end, where the source is captured here (as the
                // `synapse_apply_lag_*` gauges count it).
                if let Some(c) = captures.iter().find(|c| c.source == a.source) {
                    let behind = c.log.next_offset().saturating_sub(a.stats.next_offset.load(Ordering::Relaxed));
                    v["behind_records"] = behind.into();
                    v["lag_seconds"] = a.stats.lag_seconds(behind).into();
                }
                v
            })
            .collect();
        json!({"sources": sources, "targets": targets})
    }

    /// The appliers into `target` with how far each is behind its source's log end (where the
    /// source is captured here).
    pub(crate) fn catch_up(&self, target: &str) -> Vec<Value> {
        let captures = self.captures.lock().unwrap_or_else(PoisonError::into_inner);
        let appliers = self.appliers.lock().unwrap_or_else(PoisonError::into_inner);
        appliers
            .iter()
            .filter(|a| a.target == target)
            .map(|a| {
                let mut v = applier_json(a, true);
                if let Some(c) = captures.iter().find(|c| c.source == a.source) {
                    let end = c.log.next_offset();
                    v["log_next_offset"] = end.into();
                    v["behind"] = end.saturating_sub(a.stats.next_offset.load(Ordering::Relaxed)).into();
                }
                v
            })
            .collect()
    }

    /// The appliers of `source` into `target` (a target, or a shard set: the shards serving
    /// it; every target: `None`).
    pub(crate) fn waiting_for(&self, source: &str, target: Option<&str>) -> Result<Vec<Value>, ConnectorError> {
        let appliers = self.appliers.lock().unwrap_or_else(PoisonError::into_inner);
        let of = |a: &&Applying| {
            a.source == source
                && target
                    .is_none_or(|t| a.target == t || (a.shard.as_ref().is_some_and(|s| s.set == t) && self.serves(a)))
        };
        let chosen: Vec<Value> = appliers.iter().filter(of).map(|a| applier_json(a, self.serves(a))).collect();
        if chosen.is_empty() {
            return Err(ConnectorError::NotFound {
                what: match target {
                    Some(t) => format!("an applier of source {source} into {t} in this process"),
                    None => format!("an applier of source {source} in this process"),
                },
            });
        }
        Ok(chosen)
    }
}

fn applier_json(a: &Applying, serving: bool) -> Value {
    let mut v = json!({
        "source": a.source,
        "target": a.target,
        "applied_lsn": Lsn(a.stats.applied_lsn.load(Ordering::Relaxed)).to_string(),
        "next_offset": a.stats.next_offset.load(Ordering::Relaxed),
        "rows_copied": a.stats.rows_copied.load(Ordering::Relaxed),
    });
    let chunks = a.stats.copy_chunks.load(Ordering::Relaxed);
    if chunks > 0 {
        v["copy"] = json!({"chunks": chunks, "chunks_done": a.stats.copy_chunks_done.load(Ordering::Relaxed)});
    }
    if let Some(s) = &a.shard {
        v["set"] = s.set.clone().into();
        v["shard"] = s.shard.clone().into();
        v["key_range"] = s.key_range.to_string().into();
        v["serving"] = serving.into();
    }
    v
}

/// Where each source's capture and each applier is, with lag (bytes, seconds, records).
#[utoipa::path(get, path = "/v1/positions", tag = "positions", security(("token" = ["stream"])),
    responses((status = 200, description = "`{\"sources\": [...], \"targets\": [...]}`", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn list(State(p): State<Arc<Positions>>) -> Json<Value> {
    Json(p.json())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WaitQuery {
    source: String,
    lsn: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    timeout_secs: Option<f64>,
}

/// Answers once every applier of `source` (into `target`) applied everything the source
/// committed up to `lsn` (read-your-writes across targets and shards).
#[utoipa::path(get, path = "/v1/positions/wait", tag = "positions", security(("token" = ["stream"])),
    params(("source" = String, Query, description = "the source"), ("lsn" = String, Query, description = "a position, e.g. from `SELECT pg_current_wal_lsn()`"),
        ("target" = Option<String>, Query, description = "a target or shard set (default: every target)"),
        ("timeout_secs" = Option<f64>, Query, description = "at most 300 (default 10)")),
    responses((status = 200, description = "`{\"reached\": bool, ...}`", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn wait(
    State(p): State<Arc<Positions>>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<Value>, ConnectorError> {
    let lsn: Lsn = q.lsn.parse().map_err(|e| ConnectorError::BadRequest {
        field: "lsn".into(),
        message: format!("{e}: give a position as PostgreSQL prints it, e.g. from SELECT pg_current_wal_lsn()"),
    })?;
    let timeout = q.timeout_secs.unwrap_or(10.0);
    if !(0.0..=MAX_WAIT_SECS).contains(&timeout) {
        return Err(ConnectorError::BadRequest {
            field: "timeout_secs".into(),
            message: format!("{timeout} is not a number of seconds from 0 to {MAX_WAIT_SECS}"),
        });
    }
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let (reached, captured, targets) = p.wait_until(&q.source, q.target.as_deref(), lsn, deadline).await?;
    Ok(Json(json!({"reached": reached, "lsn": lsn.to_string(), "captured": captured, "targets": targets})))
}
