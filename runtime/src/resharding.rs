//! Online resharding of a shard set: its move from the placement in `shards` to the one in
//! `resharding.shards`, in steps an operator takes (`synapse shards start|switch|reverse|finish`,
//! the same on the admin API), each recorded durably before it takes effect.
//!
//! ```text
//!  (none) ──start──▶ started ──switch──▶ switched ──finish──▶ finished
//!                                 ▲          │
//!                                 └─reverse──┘ (reversed ──switch──▶ switched)
//! ```
//!
//! * **start**: each new shard copies its rows from an exported snapshot of the source (the
//!   initial copy, filtered by its rule) and then applies the log from the snapshot's position,
//!   exactly once, as any new target does. The current placement goes on as before.
//! * **switch**: once every new shard has applied all the source committed before the switch
//!   was asked (the source's WAL position then), the next placement serves: reads at a cut
//!   (`/v1/positions/wait?target=<set>`) wait for its shards. Nothing is copied or applied at
//!   the switch: both placements are kept by the same log, each shard exactly once, so nothing in
//!   flight is lost or applied twice.
//! * **reverse**: the current placement serves again; it was kept in sync all along.
//! * **finish**: the retired shards' appliers stop and their moved rows (every row of the
//!   sharded tables: none stays theirs) are deleted; their positions no longer hold the log.
//!
//! The state is a JSON file per set under `log.dir/resharding/`, written to a temporary file,
//! synced and renamed: a kill -9 at any point leaves the last step taken, and every step's
//! effect (copies, appliers) resumes from its own durable state.

use crate::config::{Config, ReshardRole, TargetConfig};
use crate::ops::{ComponentState, Health};
use crate::pipeline::{supervise, ComponentFailed};
use crate::positions::Positions;
use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use synapse_apply::{ApplyConfig, ApplyError};
use synapse_connectors::ConnectorError;
use synapse_log::{ChangeLog, SourceLog};
use synapse_schemas::Lsn;
use tokio::sync::watch;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Started,
    Switched,
    Reversed,
    Finished,
}

impl Phase {
    /// `synapse_reshard_phase`: 0 none, 1 started, 2 switched, 3 reversed, 4 finished.
    pub fn number(self) -> f64 {
        match self {
            Phase::Started => 1.0,
            Phase::Switched => 2.0,
            Phase::Reversed => 3.0,
            Phase::Finished => 4.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Started => "started",
            Phase::Switched => "switched",
            Phase::Reversed => "reversed",
            Phase::Finished => "finished",
        }
    }
}

/// One step taken: when, and (switch, reverse) the source positions it was taken at.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Step {
    pub phase: Phase,
    pub at_us: i64,
    #[serde(default)]
    pub source_lsn: BTreeMap<String, String>,
}

/// A set's move as recorded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ReshardState {
    pub set: String,
    /// The next placement's shards: a state recorded for another move is not this one's.
    pub next: Vec<String>,
    pub phase: Phase,
    pub steps: Vec<Step>,
}

impl ReshardState {
    /// Whether a shard of this role serves reads in this phase.
    pub fn serves(phase: Option<Phase>, role: Option<ReshardRole>) -> bool {
        match role {
            None => true,
            Some(ReshardRole::New) => matches!(phase, Some(Phase::Switched | Phase::Finished)),
            Some(ReshardRole::Retired) => !matches!(phase, Some(Phase::Switched | Phase::Finished)),
        }
    }
}

/// The moves of every shard set of a configuration, each watched by the components it
/// concerns.
pub struct Reshards {
    dir: PathBuf,
    sets: Mutex<BTreeMap<String, watch::Sender<Option<ReshardState>>>>,
}

impl Reshards {
    /// Reads the recorded moves of `config`'s resharding sets (a record of another move than
    /// the configured one is set aside, with a warning).
    pub fn open(config: &Config) -> anyhow::Result<Reshards> {
        let dir = config.log.dir.join("resharding");
        let mut sets = BTreeMap::new();
        for (set, next) in next_placements(config) {
            let path = dir.join(format!("{set}.json"));
            let state = match std::fs::read(&path) {
                Ok(bytes) => {
                    let s: ReshardState = serde_json::from_slice(&bytes).map_err(|e| {
                        anyhow::anyhow!("{}: not a resharding record ({e}); remove it to start over", path.display())
                    })?;
                    if s.next == next {
                        Some(s)
                    } else {
                        tracing::warn!(set, recorded = ?s.next, configured = ?next, "a recorded move of another placement is ignored: `synapse shards start` begins this one");
                        None
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => anyhow::bail!("{}: {e}", path.display()),
            };
            metrics::gauge!("synapse_reshard_phase", "set" => set.clone())
                .set(state.as_ref().map_or(0.0, |s| s.phase.number()));
            sets.insert(set, watch::channel(state).0);
        }
        Ok(Reshards { dir, sets: Mutex::new(sets) })
    }

    /// Follows `set`'s move (`None` inside: not started; no receiver: no move configured).
    pub fn watch(&self, set: &str) -> Option<watch::Receiver<Option<ReshardState>>> {
        self.sets.lock().unwrap_or_else(PoisonError::into_inner).get(set).map(watch::Sender::subscribe)
    }

    pub fn phase(&self, set: &str) -> Option<Phase> {
        let sets = self.sets.lock().unwrap_or_else(PoisonError::into_inner);
        sets.get(set).and_then(|s| s.borrow().as_ref().map(|s| s.phase))
    }

    pub fn state(&self, set: &str) -> Option<Option<ReshardState>> {
        let sets = self.sets.lock().unwrap_or_else(PoisonError::into_inner);
        sets.get(set).map(|s| s.borrow().clone())
    }

    /// Takes a step: refused (with why) unless it follows the current phase; recorded durably,
    /// then announced.
    pub fn step(
        &self,
        set: &str,
        next: &[String],
        to: Phase,
        source_lsn: BTreeMap<String, String>,
    ) -> Result<ReshardState, String> {
        let sets = self.sets.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = sets.get(set) else {
            return Err(format!("target {set} has no resharding section: nothing to move"));
        };
        let now = tx.borrow().clone();
        let from = now.as_ref().map(|s| s.phase);
        let allowed = matches!(
            (from, to),
            (None, Phase::Started)
                | (Some(Phase::Started | Phase::Reversed), Phase::Switched)
                | (Some(Phase::Switched), Phase::Reversed | Phase::Finished)
        );
        if !allowed {
            return Err(format!(
                "{set} is {}: {} is not a next step ({})",
                from.map_or("not resharding", Phase::name),
                to.name(),
                match from {
                    None => "start first",
                    Some(Phase::Started) => "switch next, once the new shards have caught up",
                    Some(Phase::Switched) => "reverse, or finish",
                    Some(Phase::Reversed) => "switch again (finish follows a switch)",
                    Some(Phase::Finished) => "the move is over: make resharding.shards the set's shards",
                }
            ));
        }
        let mut state = now.unwrap_or_else(|| ReshardState {
            set: set.to_owned(),
            next: next.to_vec(),
            phase: to,
            steps: Vec::new(),
        });
        state.phase = to;
        state.steps.push(Step { phase: to, at_us: synapse_schemas::unix_micros_now(), source_lsn });
        write_atomically(&self.dir, &format!("{set}.json"), &state)
            .map_err(|e| format!("recording the step in {}: {e}", self.dir.display()))?;
        tracing::info!(set, phase = to.name(), "resharding step recorded");
        metrics::gauge!("synapse_reshard_phase", "set" => set.to_owned()).set(to.number());
        tx.send_replace(Some(state.clone()));
        Ok(state)
    }
}

/// Each resharding set's next placement (shard names, sorted): its new and kept shards.
pub fn next_placements(config: &Config) -> BTreeMap<String, Vec<String>> {
    let shards = || config.targets.iter().filter_map(|t| Some((t.shard.as_ref()?, t.reshard_role)));
    let moving: std::collections::BTreeSet<&str> =
        shards().filter(|(_, role)| role.is_some()).map(|(s, _)| s.set.as_str()).collect();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (s, role) in shards().filter(|(s, _)| moving.contains(s.set.as_str())) {
        if role != Some(ReshardRole::Retired) {
            out.entry(s.set.clone()).or_default().push(s.shard.clone());
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// Writes `state` as JSON to `dir/name` so a kill -9 leaves the old file or the new one whole.
pub(crate) fn write_atomically(
    dir: &std::path::Path,
    name: &str,
    state: &impl serde::Serialize,
) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    // The rename itself is durable once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

/// Waits until `set`'s recorded move satisfies `ready`; `None` on shutdown.
pub(crate) async fn until(
    rx: &mut watch::Receiver<Option<ReshardState>>,
    shutdown: &watch::Receiver<bool>,
    ready: impl Fn(&Option<ReshardState>) -> bool,
) -> Option<()> {
    let mut sd = shutdown.clone();
    tokio::select! {
        r = rx.wait_for(|s| ready(s)) => r.ok().map(|_| ()),
        _ = sd.wait_for(|s| *s) => None,
    }
}

/// A stop signal for a retired shard's applier: the process's shutdown, or the move finishing.
pub(crate) fn stop_when_finished(
    mut rx: watch::Receiver<Option<ReshardState>>,
    shutdown: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let finished = |s: &Option<ReshardState>| s.as_ref().is_some_and(|s| s.phase == Phase::Finished);
    let (tx, stop) = watch::channel(*shutdown.borrow() || finished(&rx.borrow()));
    tokio::spawn(async move {
        if until(&mut rx, &shutdown, finished).await.is_some() || *shutdown.borrow() {
            let _ = tx.send(true);
        }
    });
    stop
}

/// After the move finished: deletes the retired shard's rows of every sharded table (it holds
/// none of them any more) and its position from the log's consumers, then leaves the component
/// list. Idempotent: run again at each start while the configuration still names the shard.
pub(crate) async fn retire_shard(
    component: &str,
    health: &Arc<Health>,
    shutdown: &watch::Receiver<bool>,
    acfg: &ApplyConfig,
    log: &SourceLog,
) -> Result<(), ComponentFailed> {
    let Some(shard) = &acfg.shard else { return Ok(()) };
    health.set(component, ComponentState::Starting);
    let delete = || async {
        let client = synapse_apply::connect_target(&acfg.target).await?;
        let mut rows = 0;
        for table in shard.rules.keys() {
            let name: synapse_postgres::TableName =
                table.parse().map_err(|e| ApplyError::Schema { table: table.clone(), message: format!("{e}") })?;
            rows += client
                .execute(&format!("DELETE FROM {}", name.quoted()), &[])
                .await
                .map_err(ApplyError::target(format!("deleting the moved rows of {table}")))?;
        }
        log.remove_consumer(&acfg.consumer).await?;
        Ok::<u64, ApplyError>(rows)
    };
    if let Some(rows) = supervise(component, health, shutdown, delete).await? {
        tracing::info!(component, rows, "retired shard emptied of its moved rows");
        metrics::counter!("synapse_reshard_rows_deleted_total", "set" => shard.set.clone(), "shard" => shard.shard.clone())
            .increment(rows);
        health.forget(component);
    }
    Ok(())
}

/// What the admin routes of resharding need.
#[derive(Clone)]
pub struct Control {
    pub config: Config,
    pub reshards: Arc<Reshards>,
    pub positions: Arc<Positions>,
}

/// How long a switch or reverse waits for the placement it hands to to catch up.
const CATCH_UP: Duration = Duration::from_secs(60);

impl Control {
    /// Each shard of `set` with its role, target name and sources.
    fn shards(&self, set: &str) -> Vec<(&TargetConfig, Option<ReshardRole>)> {
        self.config
            .targets
            .iter()
            .filter(|t| t.shard.as_ref().is_some_and(|s| s.set == set))
            .map(|t| (t, t.reshard_role))
            .collect()
    }

    /// Waits until every shard of `role` has applied what each of its sources has committed
    /// now; the sources' positions then.
    async fn caught_up(&self, set: &str, role: ReshardRole) -> Result<BTreeMap<String, String>, ConnectorError> {
        let mut at = BTreeMap::new();
        let deadline = Instant::now() + CATCH_UP;
        for (t, _) in self.shards(set).into_iter().filter(|(_, r)| *r == Some(role)) {
            for source in self.config.sources_of(t) {
                let lsn = match at.get(&source.name) {
                    Some(l) => *l,
                    None => {
                        let pg = source.url.pg_config().map_err(|e| bad("source", e))?;
                        let client = synapse_postgres::connect(&pg, "reshard").await.map_err(|e| {
                            ConnectorError::Busy { what: format!("connections to source {} ({e})", source.name) }
                        })?;
                        let row = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.map_err(|e| {
                            ConnectorError::Busy { what: format!("reads of source {} ({e})", source.name) }
                        })?;
                        let lsn: Lsn = row.get::<_, String>(0).parse().map_err(|e| bad("source", e))?;
                        at.insert(source.name.clone(), lsn);
                        lsn
                    }
                };
                let (reached, _, positions) =
                    self.positions.wait_until(&source.name, Some(&t.name), lsn, deadline).await?;
                if !reached {
                    return Err(ConnectorError::Conflict {
                        what: format!(
                            "a step while {} has not applied source {} up to {lsn} (it is at {}): wait for it to catch up \
                             (synapse shards status) and try again; nothing changed",
                            t.name,
                            source.name,
                            positions.first().map(|p| p["applied_lsn"].to_string()).unwrap_or_default()
                        ),
                    });
                }
            }
        }
        Ok(at.into_iter().map(|(k, v)| (k, v.to_string())).collect())
    }

    fn status(&self, set: &str) -> Result<Value, ConnectorError> {
        let Some(state) = self.reshards.state(set) else {
            return Err(ConnectorError::NotFound { what: format!("a resharding of target {set}") });
        };
        let phase = state.as_ref().map(|s| s.phase);
        let positions = self.positions.json();
        let shards: Vec<Value> = self
            .shards(set)
            .into_iter()
            .map(|(t, role)| {
                let applied: Vec<&Value> = positions["targets"]
                    .as_array()
                    .map(|a| a.iter().filter(|p| p["target"] == t.name.as_str()).collect())
                    .unwrap_or_default();
                json!({
                    "target": t.name,
                    "key_range": t.shard.as_ref().map(|s| s.key_range.to_string()),
                    "role": match role { Some(ReshardRole::New) => "new", Some(ReshardRole::Retired) => "retired", None => "kept" },
                    "serving": ReshardState::serves(phase, role),
                    "appliers": applied,
                })
            })
            .collect();
        Ok(json!({
            "set": set,
            "phase": phase.map_or("not started", Phase::name),
            "steps": state.map(|s| s.steps).unwrap_or_default(),
            "shards": shards,
            // The logs' heads: how far the shards' appliers have to go.
            "sources": positions["sources"],
        }))
    }
}

fn bad(field: &str, e: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::BadRequest { field: field.into(), message: e.to_string() }
}

/// A shard set's placement and the progress of its move.
#[utoipa::path(get, path = "/v1/shards/{set}", tag = "shards", security(("token" = ["admin"])),
    params(("set" = String, Path, description = "the shard set (a target's name)")),
    responses((status = 200, description = "the set's phase, shards and their catch-up", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn status(State(c): State<Control>, Path(set): Path<String>) -> Result<Json<Value>, ConnectorError> {
    c.status(&set).map(Json)
}

/// Takes a step of a shard set's move: start, switch, reverse or finish.
#[utoipa::path(post, path = "/v1/shards/{set}/{step}", tag = "shards", security(("token" = ["admin"])),
    params(("set" = String, Path, description = "the shard set"), ("step" = String, Path, description = "start, switch, reverse or finish")),
    responses((status = 200, description = "the set after the step", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn step(
    State(c): State<Control>,
    Path((set, step)): Path<(String, String)>,
) -> Result<Json<Value>, ConnectorError> {
    let next = next_placements(&c.config)
        .remove(&set)
        .ok_or_else(|| ConnectorError::NotFound { what: format!("a resharding section on target {set}") })?;
    let (to, lsn) = match step.as_str() {
        "start" => (Phase::Started, BTreeMap::new()),
        // The placement taking over must hold everything committed before the step.
        "switch" if c.reshards.phase(&set).is_some() => (Phase::Switched, c.caught_up(&set, ReshardRole::New).await?),
        "reverse" if c.reshards.phase(&set) == Some(Phase::Switched) => {
            (Phase::Reversed, c.caught_up(&set, ReshardRole::Retired).await?)
        }
        "switch" => (Phase::Switched, BTreeMap::new()),
        "reverse" => (Phase::Reversed, BTreeMap::new()),
        "finish" => (Phase::Finished, BTreeMap::new()),
        other => return Err(bad("step", format!("`{other}` is not a step: start, switch, reverse or finish"))),
    };
    let state = c.reshards.step(&set, &next, to, lsn).map_err(|message| ConnectorError::Conflict { what: message })?;
    tracing::warn!(set, phase = state.phase.name(), "admin API: resharding step taken");
    c.status(&set).map(Json)
}
