//! Mesh membership at run time: which configured nodes are members, and a node that is not
//! joining from a donor's snapshot while every node keeps writing
//! (`synapse_apply::mesh::join`; docs/decisions/0018-mesh-membership.md).
//!
//! Each node's own database records its membership (`synapse.mesh_membership`). On start:
//! * a **member** (or a node set up by a release before membership was recorded) is installed
//!   as before;
//! * when no node of the mesh is a member yet, every new node **founds** it: the nodes start
//!   from the same data, rows older than the mesh are a shared baseline. A node that does not
//!   answer counts against founding once any node's log holds records (the mesh ran before:
//!   it may be a member holding the data); a new node then waits (`APP015`) rather than found
//!   a mesh alone;
//! * otherwise a new node **joins**: with `mesh.on_new_node: join` at once, with `wait` once
//!   asked (`synapse mesh join <node>`, `POST /v1/mesh/nodes/{node}/join`). Until it is a
//!   member its capture and the appliers into it wait; the rest of the mesh goes on. A join cut
//!   short (kill -9, a lost connection) starts over on the next try: the copy commits whole.
//!
//! A member **leaves** (`synapse mesh leave <node>`, `POST /v1/mesh/nodes/{node}/leave`): its
//! writes up to the request are delivered to every other node first; then its capture and the
//! appliers from and into it stop, its slot, triggers and the replication origins and log
//! positions of its appliers are removed on every node, it is recorded `left` (on the node, and
//! in `log.dir/mesh/left.json`, so a restart with the node still configured runs nothing of
//! it), and tombstone purging stops waiting for it. Version vectors keep its entries: ids are
//! never reused.
//!
//! Routes (`GET /v1/mesh`, `POST /v1/mesh/nodes/{node}/join|leave`, scope `admin`) show each
//! node's phase, the join's progress and each applier's catch-up.

use crate::config::{Config, MeshConfig, MeshNode, OnNewNode};
use crate::ops::{ComponentState, Health};
use crate::positions::Positions;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use synapse_apply::mesh::join::{self, JoinProgress, JoinSpec, Membership};
use synapse_apply::mesh::MeshTable;
use synapse_apply::{connect_target, ApplyError};
use synapse_connectors::ConnectorError;
use synapse_log::{ChangeLog, SourceLog};
use synapse_resolver::NodeId;
use tokio::sync::watch;

/// Where one node stands, as this process saw it last.
#[derive(Clone, Default)]
struct NodeStatus {
    /// starting, waiting (for `mesh join`), joining, member, left.
    phase: &'static str,
    donor: Option<String>,
    /// Asked to join (`wait` mode).
    requested: bool,
    progress: Arc<JoinProgress>,
}

/// The mesh's nodes as this process runs them.
pub struct Members {
    mesh: Option<MeshConfig>,
    config: Config,
    health: Arc<Health>,
    positions: Arc<Positions>,
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
    /// Per node, true once it left: its components stop.
    left: BTreeMap<String, watch::Sender<bool>>,
    /// The logs, once open (a leave removes positions from them).
    logs: OnceLock<BTreeMap<String, Arc<SourceLog>>>,
    /// Decided once per process: no node of the mesh was a member when every node answered,
    /// so the new ones found it together.
    founded: std::sync::atomic::AtomicBool,
}

/// Where the nodes that left are recorded, under `log.dir`.
const LEFT_DIR: &str = "mesh";
const LEFT_FILE: &str = "left.json";

/// How long a leave waits for the node's last writes to reach every other node.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the start-up survey waits for a node before counting it unknown.
const SURVEY_TIMEOUT: Duration = Duration::from_secs(10);

impl Members {
    pub fn new(config: &Config, health: Arc<Health>, positions: Arc<Positions>) -> Members {
        let gone: BTreeSet<String> = std::fs::read(config.log.dir.join(LEFT_DIR).join(LEFT_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let names: Vec<String> = config.mesh.iter().flat_map(|m| &m.nodes).map(|n| n.name.clone()).collect();
        let nodes = names
            .iter()
            .map(|n| {
                let phase = if gone.contains(n) { "left" } else { "starting" };
                (n.clone(), NodeStatus { phase, ..Default::default() })
            })
            .collect();
        let left = names.iter().map(|n| (n.clone(), watch::channel(gone.contains(n)).0)).collect();
        for n in names.iter().filter(|n| gone.contains(*n)) {
            tracing::warn!(node = %n, "mesh node {n} left the mesh: nothing of it runs; remove it from mesh.nodes");
        }
        Members {
            mesh: config.mesh.clone(),
            config: config.clone(),
            health,
            positions,
            nodes: Mutex::new(nodes),
            left,
            logs: OnceLock::new(),
            founded: Default::default(),
        }
    }

    /// The logs, for leaves (set once they are open).
    pub(crate) fn set_logs(&self, logs: &BTreeMap<String, Arc<SourceLog>>) {
        let _ = self.logs.set(logs.clone());
    }

    /// Whether `node` left the mesh (known at start from `log.dir`, or since).
    pub fn has_left(&self, node: &str) -> bool {
        self.left.get(node).is_some_and(|t| *t.borrow())
    }

    /// Turns true on `shutdown`, or once any of `nodes` (mesh nodes; others are ignored) left:
    /// what a component of those nodes stops on.
    pub(crate) fn stop_for(&self, nodes: &[&str], shutdown: &watch::Receiver<bool>) -> watch::Receiver<bool> {
        let mut watched: Vec<watch::Receiver<bool>> =
            nodes.iter().filter_map(|n| self.left.get(*n)).map(|t| t.subscribe()).collect();
        if watched.is_empty() {
            return shutdown.clone();
        }
        let now = *shutdown.borrow() || watched.iter().any(|w| *w.borrow());
        let tx = Arc::new(watch::channel(now).0);
        let rx = tx.subscribe();
        watched.push(shutdown.clone());
        for mut w in watched {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = w.wait_for(|on| *on) => if r.is_ok() { let _ = tx.send(true); },
                    _ = tx.closed() => {}
                }
            });
        }
        rx
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut NodeStatus)) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        f(nodes.entry(node.to_owned()).or_default());
    }

    fn status(&self, node: &str) -> NodeStatus {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner).get(node).cloned().unwrap_or_default()
    }

    fn set_phase(&self, node: &str, phase: &'static str) {
        self.update(node, |s| s.phase = phase);
        let joined = if phase == "member" { 1.0 } else { 0.0 };
        metrics::gauge!("synapse_mesh_node_member", "node" => node.to_owned()).set(joined);
    }

    /// Whether the mesh is being founded: no node that answers within `SURVEY_TIMEOUT` is a
    /// member (or joining, or left), and either every node answered or no node's log holds
    /// anything yet (a first start). Then the new nodes found it together instead of joining.
    /// A node that does not answer while the logs show the mesh ran before leaves it
    /// undecided: it may be a member holding the data.
    pub async fn founding(&self) -> bool {
        self.decide_founding(None).await.unwrap_or(false)
    }

    /// Makes node `node` ready to take part: installed if a member, founded, or joined from its
    /// donor (see the module's rules); the mesh tables once it is. `founding`: from
    /// [`Members::founding`] at start.
    pub async fn prepare(
        &self,
        node: &MeshNode,
        founding: bool,
        logs: &BTreeMap<String, Arc<SourceLog>>,
    ) -> Result<Vec<MeshTable>, ApplyError> {
        let m = self.mesh.as_ref().ok_or_else(|| ApplyError::LeftMesh { node: node.name.clone() })?;
        let pg = node.url.pg_config().map_err(|e| join_error(node, e))?;
        let client = connect_target(&pg).await?;
        synapse_postgres::node_schema::migrate(&client).await?;
        let id = NodeId(node.id);
        let state = join::membership(&client, &node.name).await?;
        match state {
            Membership::Member => {}
            Membership::Installed => join::record_membership(&client, &node.name, id, "member", None).await?,
            Membership::Left => {
                self.set_phase(&node.name, "left");
                return Err(ApplyError::LeftMesh { node: node.name.clone() });
            }
            Membership::New if founding || self.founds(&node.name).await? => {
                tracing::info!(node = %node.name, "founding the mesh (no node is a member yet): the nodes start from the same data");
                join::record_membership(&client, &node.name, id, "member", None).await?;
            }
            Membership::New | Membership::Joining { .. } => {
                let resumed = matches!(state, Membership::Joining { .. });
                self.join(m, (node, &pg), &client, resumed, logs).await?;
            }
        }
        let tables = synapse_apply::mesh::install(&client, id, &m.tables, &m.policies()).await?;
        self.set_phase(&node.name, "member");
        Ok(tables)
    }

    /// Whether the new node `except` founds the mesh: decided already in this process, or
    /// [`Members::founding`]'s rule holds now.
    async fn founds(&self, except: &str) -> Result<bool, ApplyError> {
        if self.founded.load(Ordering::Relaxed) {
            return Ok(true);
        }
        self.decide_founding(Some(except)).await
    }

    async fn decide_founding(&self, except: Option<&str>) -> Result<bool, ApplyError> {
        let Some(m) = &self.mesh else { return Ok(false) };
        let mut surveys = tokio::task::JoinSet::new();
        for n in m.nodes.iter().filter(|n| Some(n.name.as_str()) != except).cloned() {
            surveys.spawn(async move {
                let answer = tokio::time::timeout(SURVEY_TIMEOUT, read_membership(&n)).await;
                (n.name, answer.ok().and_then(Result::ok))
            });
        }
        let mut silent = Vec::new();
        while let Some(r) = surveys.join_next().await {
            match r {
                Ok((_, Some(Membership::New))) => {}
                Ok((_, Some(_))) => return Ok(false),
                Ok((name, None)) => silent.push(name),
                Err(_) => silent.push("?".into()),
            }
        }
        let history = self.logs.get().is_some_and(|logs| logs.values().any(|l| l.next_offset() > 0));
        if !silent.is_empty() && history {
            silent.sort();
            return Err(ApplyError::MembershipUnknown {
                node: except.unwrap_or("-").to_owned(),
                silent: silent.join(", "),
            });
        }
        self.founded.store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// The donor of `node`: `join_from`, else the hub, else the first member in `nodes`.
    async fn donor<'a>(&self, m: &'a MeshConfig, node: &MeshNode) -> Result<&'a MeshNode, ApplyError> {
        let named = node.join_from.as_ref().or(m.hub.as_ref().filter(|h| **h != node.name));
        if m.hub.as_ref() == Some(&node.name) {
            return Err(ApplyError::Join {
                node: node.name.clone(),
                message: "the hub cannot join a running mesh (no spoke has applied every other); make a member the hub, or join this node as a spoke".into(),
            });
        }
        let candidates: Vec<&MeshNode> = match named {
            Some(name) => m.nodes.iter().filter(|n| &n.name == name).collect(),
            None => m.nodes.iter().filter(|n| n.name != node.name).collect(),
        };
        for c in &candidates {
            if let Ok(Ok(Membership::Member | Membership::Installed)) =
                tokio::time::timeout(SURVEY_TIMEOUT, read_membership(c)).await
            {
                return Ok(c);
            }
        }
        Err(ApplyError::DonorNotMember {
            node: node.name.clone(),
            donor: candidates.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(" or "),
        })
    }

    async fn join(
        &self,
        m: &MeshConfig,
        (node, pg): (&MeshNode, &synapse_postgres::PgConfig),
        client: &tokio_postgres::Client,
        resumed: bool,
        logs: &BTreeMap<String, Arc<SourceLog>>,
    ) -> Result<(), ApplyError> {
        let donor = self.donor(m, node).await?;
        self.update(&node.name, |s| s.donor = Some(donor.name.clone()));
        if !resumed && m.on_new_node == OnNewNode::Wait && !self.status(&node.name).requested {
            self.set_phase(&node.name, "waiting");
            return Err(ApplyError::NotJoined { node: node.name.clone(), donor: donor.name.clone() });
        }
        self.set_phase(&node.name, "joining");
        // Ready for Kubernetes meanwhile (the rest of the mesh serves), as during a copy.
        self.health.set(&format!("mesh/{}", node.name), ComponentState::Copying);
        let progress = Arc::new(JoinProgress::default());
        self.update(&node.name, |s| s.progress = progress.clone());
        let donor_pg = donor.url.pg_config().map_err(|e| join_error(node, e))?;
        let donor_client = connect_target(&donor_pg).await?;
        join::record_membership(client, &node.name, NodeId(node.id), "joining", Some(&donor.name)).await?;
        tracing::info!(node = %node.name, donor = %donor.name, resumed, "joining the mesh");
        join::prepare_tables(&donor_client, client, &node.name, &m.tables).await?;
        // Triggers first: a local write the moment the join commits is versioned.
        synapse_apply::mesh::install(client, NodeId(node.id), &m.tables, &m.policies()).await?;
        let sources: Vec<String> = self
            .config
            .targets
            .iter()
            .find(|t| t.name == node.name)
            .map(|t| self.config.sources_of(t).map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        let donor_log = logs.get(&donor.name).ok_or_else(|| ApplyError::Join {
            node: node.name.clone(),
            message: format!("the log of {} is not open in this process", donor.name),
        })?;
        // Log retention must keep what this node will read: held from before the snapshot, at
        // or below where it will start (the donor's position in each log only grows).
        let consumer = format!("apply-{}", node.name);
        for s in &sources {
            let Some(log) = logs.get(s) else { continue };
            let hold = if s == &donor.name {
                log.next_offset()
            } else {
                log.consumer_position(&format!("apply-{}", donor.name)).await?.unwrap_or(0)
            };
            log.commit_consumer(&consumer, hold).await?;
        }
        let donor_source = self.config.sources.iter().find(|s| s.name == donor.name);
        let slot = donor_source
            .and_then(|s| crate::pipeline::capture_config(s).ok())
            .map(|c| c.slot)
            .unwrap_or_else(|| donor.name.clone());
        let started = std::time::Instant::now();
        let spec = JoinSpec {
            node: &node.name,
            target: pg,
            donor: &donor.name,
            donor_source: &donor_pg,
            slot_hint: &slot,
            tables: &m.tables,
            sources: &sources,
            donor_log_end: donor_log.next_offset(),
        };
        let report = join::copy(&spec, &progress).await?;
        metrics::counter!("synapse_mesh_join_rows_total", "node" => node.name.clone()).increment(report.rows);
        tracing::info!(
            node = %node.name,
            donor = %donor.name,
            rows = report.rows,
            versions = report.versions,
            snapshot_lsn = %report.snapshot_lsn,
            starts = ?report.starts,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "joined the mesh; catching up"
        );
        Ok(())
    }

    fn node_json(&self, node: &MeshNode) -> Value {
        let s = self.status(&node.name);
        let p = &s.progress;
        let catch_up = self.positions.catch_up(&node.name);
        let behind: u64 = catch_up.iter().filter_map(|a| a["behind"].as_u64()).sum();
        let component = format!("mesh/{}", node.name);
        let capturing = self.health.state(&format!("capture/{}", node.name)) == Some(ComponentState::Streaming);
        let mut v = json!({
            "name": node.name,
            "id": node.id,
            "region": node.region,
            "phase": s.phase,
            "donor": s.donor,
            "join": {
                "tables_total": p.tables_total.load(Ordering::Relaxed),
                "tables_done": p.tables_done.load(Ordering::Relaxed),
                "rows_copied": p.rows_copied.load(Ordering::Relaxed),
                "snapshot_lsn": synapse_schemas::Lsn(p.snapshot_lsn.load(Ordering::Relaxed)).to_string(),
            },
            "catch_up": catch_up,
            "records_behind": behind,
            // Its own writes are captured once its capture streams: only then may it take them.
            "caught_up": s.phase == "member" && behind == 0 && capturing,
        });
        if let Some(state) = self.health.state(&component) {
            v["component"] = state.name().into();
        }
        v
    }

    pub(crate) fn json(&self) -> Value {
        let nodes: Vec<Value> = self.mesh.iter().flat_map(|m| &m.nodes).map(|n| self.node_json(n)).collect();
        json!({"nodes": nodes, "on_new_node": self.mesh.as_ref().map(|m| match m.on_new_node {
            OnNewNode::Join => "join",
            OnNewNode::Wait => "wait",
        })})
    }
}

impl Members {
    /// Takes `node` out of the mesh (see the module's description). Idempotent: a leave cut
    /// short is run again.
    async fn leave(&self, node: &MeshNode) -> Result<(), String> {
        let m = self.mesh.as_ref().ok_or("no mesh")?;
        let pg = node.url.pg_config().map_err(|e| format!("url: {e}"))?;
        let fail = |what: &str| {
            let what = what.to_owned();
            move |e: ApplyError| format!("{what}: {}", synapse_error::chain(&e))
        };
        let client = connect_target(&pg).await.map_err(fail("connecting to the node"))?;
        // 1. Its writes so far reach every other node.
        let lsn: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| format!("reading the node's WAL position: {e}"))?
            .get(0);
        let lsn: synapse_schemas::Lsn = lsn.parse().map_err(|e| format!("{e}"))?;
        tracing::info!(node = %node.name, %lsn, "leaving the mesh: delivering its writes up to here to every node");
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        let (reached, _, appliers) = self
            .positions
            .wait_until(&node.name, None, lsn, deadline)
            .await
            .map_err(|e| format!("waiting for its writes to arrive: {e}"))?;
        if !reached {
            return Err(format!(
                "its writes up to {lsn} did not reach every node within {DRAIN_TIMEOUT:?} (appliers: {appliers:?}); fix what holds them and ask again"
            ));
        }
        // 2. Its components stop.
        if let Some(tx) = self.left.get(&node.name) {
            let _ = tx.send(true);
        }
        let own = |c: &str| {
            c == format!("capture/{}", node.name)
                || c.starts_with(&format!("apply/{}->", node.name))
                || c.ends_with(&format!("->{}", node.name))
        };
        let stopped_by = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let running: Vec<String> = self
                .health
                .snapshot()
                .into_iter()
                .filter(|(c, s)| own(c) && *s != ComponentState::Stopped)
                .map(|(c, _)| c)
                .collect();
            if running.is_empty() {
                break;
            }
            if std::time::Instant::now() > stopped_by {
                return Err(format!("its components did not stop: {}", running.join(", ")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // 3. Its slot, triggers and its appliers' origins on it; its origin and position on
        //    every other node; its positions in the logs.
        let source = self.config.sources.iter().find(|s| s.name == node.name);
        let slot = source.and_then(|s| crate::pipeline::capture_config(s).ok()).map(|c| c.slot);
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot.as_deref().unwrap_or("")],
            )
            .await
            .map_err(|e| format!("removing the node's slot: {e}"))?;
        client
            .execute(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE left(roname, length($1)) = $1",
                &[&synapse_schemas::APPLIED_ORIGIN_PREFIX],
            )
            .await
            .map_err(|e| format!("removing the replication origins of its appliers: {e}"))?;
        for t in &m.tables {
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL synapse.own_ddl = on; DROP TRIGGER IF EXISTS synapse_local_write ON {0};
                     DROP TRIGGER IF EXISTS synapse_before_write ON {0}; COMMIT",
                    t.split('.').map(synapse_postgres::quote::ident).collect::<Vec<_>>().join(".")
                ))
                .await
                .map_err(|e| format!("removing the mesh triggers of {t}: {e}"))?;
        }
        client
            .execute("DELETE FROM synapse.mesh_tables", &[])
            .await
            .map_err(|e| format!("forgetting the mesh tables on the node: {e}"))?;
        join::record_membership(&client, &node.name, NodeId(node.id), "left", None)
            .await
            .map_err(fail("recording the node left"))?;
        for other in m.nodes.iter().filter(|o| o.name != node.name && !self.has_left(&o.name)) {
            let opg = other.url.pg_config().map_err(|e| format!("{}: url: {e}", other.name))?;
            let c = connect_target(&opg).await.map_err(fail(&format!("connecting to {}", other.name)))?;
            let origin = synapse_apply::origin_name(&node.name, &opg);
            c.execute(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
                &[&origin],
            )
            .await
            .map_err(|e| format!("removing the origin of {} on {}: {e}", node.name, other.name))?;
            c.execute("DELETE FROM synapse.applied WHERE source_node = $1", &[&node.name])
                .await
                .map_err(|e| format!("removing the position of {} on {}: {e}", node.name, other.name))?;
            c.execute("DELETE FROM synapse.table_sync WHERE source_node = $1", &[&node.name])
                .await
                .map_err(|e| format!("removing the sync state of {} on {}: {e}", node.name, other.name))?;
        }
        if let Some(logs) = self.logs.get() {
            for (name, log) in logs {
                let consumers: Vec<String> = if name == &node.name {
                    log.consumers().await.map_err(|e| format!("{e}"))?.into_iter().map(|(c, _)| c).collect()
                } else {
                    vec![format!("apply-{}", node.name)]
                };
                for c in consumers {
                    log.remove_consumer(&c).await.map_err(|e| format!("removing {c} from log {name}: {e}"))?;
                }
            }
        }
        // 4. Recorded where a restart reads it first.
        let mut gone: BTreeSet<String> =
            self.left.iter().filter(|(_, t)| *t.borrow()).map(|(n, _)| n.clone()).collect();
        gone.insert(node.name.clone());
        crate::resharding::write_atomically(&self.config.log.dir.join(LEFT_DIR), LEFT_FILE, &gone)
            .map_err(|e| format!("recording the leave in log.dir: {e}"))?;
        let health = &self.health;
        health.forget(&format!("mesh/{}", node.name));
        health.forget_source(&node.name);
        for other in &m.nodes {
            health.forget(&format!("apply/{}->{}", other.name, node.name));
        }
        self.set_phase(&node.name, "left");
        tracing::warn!(node = %node.name, "left the mesh: remove it from mesh.nodes");
        Ok(())
    }
}

fn join_error(node: &MeshNode, e: impl std::fmt::Display) -> ApplyError {
    ApplyError::Join { node: node.name.clone(), message: format!("url: {e}") }
}

/// A node's recorded membership (its node schema brought current first).
async fn read_membership(node: &MeshNode) -> Result<Membership, ApplyError> {
    let pg = node.url.pg_config().map_err(|e| join_error(node, e))?;
    let client = connect_target(&pg).await?;
    synapse_postgres::node_schema::migrate(&client).await?;
    join::membership(&client, &node.name).await
}

/// Each mesh node's phase (joining, member, left), donor, copy progress and catch-up.
#[utoipa::path(get, path = "/v1/mesh", tag = "mesh", security(("token" = ["admin"])),
    responses((status = 200, description = "`{\"nodes\": [...]}`", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn status(State(m): State<Arc<Members>>) -> Json<Value> {
    Json(m.json())
}

/// `POST /v1/mesh/nodes/{node}/join`: a node waiting to join (`on_new_node: wait`) joins now.
#[utoipa::path(post, path = "/v1/mesh/nodes/{node}/join", tag = "mesh", security(("token" = ["admin"])),
    params(("node" = String, Path, description = "a node of mesh.nodes waiting to join")),
    responses((status = 200, description = "the node", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn request_join(
    State(m): State<Arc<Members>>,
    Path(node): Path<String>,
) -> Result<Json<Value>, ConnectorError> {
    let Some(n) = m.mesh.iter().flat_map(|m| &m.nodes).find(|n| n.name == node) else {
        return Err(ConnectorError::NotFound { what: format!("mesh node {node} in mesh.nodes") });
    };
    let phase = m.status(&node).phase;
    if phase == "left" {
        return Err(ConnectorError::Conflict {
            what: format!("{node} left the mesh: remove it from mesh.nodes, or add it back under a new id"),
        });
    }
    m.update(&node, |s| s.requested = true);
    if phase == "waiting" {
        tracing::warn!(%node, "admin API: joining the node to the mesh");
        m.health.resume_parked();
    }
    Ok(Json(m.node_json(n)))
}

/// `POST /v1/mesh/nodes/{node}/leave`: the node leaves (answers once it has; see
/// [`Members::leave`]). 409 with what stopped it, to be fixed and asked again.
#[utoipa::path(post, path = "/v1/mesh/nodes/{node}/leave", tag = "mesh", security(("token" = ["admin"])),
    params(("node" = String, Path, description = "a member")),
    responses((status = 200, description = "the node, once it left", body = Object), (status = 409, description = "what stopped the leave: fix it and ask again", body = synapse_connectors::openapi::ErrorBody), synapse_connectors::openapi::Errors))]
pub(crate) async fn request_leave(
    State(m): State<Arc<Members>>,
    Path(node): Path<String>,
) -> Result<Json<Value>, ConnectorError> {
    let Some(mesh) = m.mesh.as_ref() else { return Err(ConnectorError::NotFound { what: "a mesh section".into() }) };
    let Some(n) = mesh.nodes.iter().find(|n| n.name == node).cloned() else {
        return Err(ConnectorError::NotFound { what: format!("mesh node {node} in mesh.nodes") });
    };
    if mesh.hub.as_deref() == Some(node.as_str()) {
        return Err(ConnectorError::Conflict {
            what: format!("{node} is the hub: every spoke replicates through it; make another node the hub first"),
        });
    }
    let remaining = mesh.nodes.iter().filter(|o| o.name != node && !m.has_left(&o.name)).count();
    if remaining < 2 {
        return Err(ConnectorError::Conflict { what: format!("{node} leaving would leave fewer than two nodes") });
    }
    match m.status(&node).phase {
        "left" => return Ok(Json(m.node_json(&n))),
        "member" => {}
        other => {
            return Err(ConnectorError::Conflict { what: format!("{node} is {other}, not a member: nothing to leave") })
        }
    }
    tracing::warn!(%node, "admin API: the node leaves the mesh");
    m.set_phase(&node, "leaving");
    match m.leave(&n).await {
        Ok(()) => Ok(Json(m.node_json(&n))),
        Err(e) => {
            m.set_phase(&node, "member");
            tracing::error!(%node, error = %e, "leaving the mesh failed; nothing of the node was removed unless said");
            Err(ConnectorError::Conflict { what: format!("{node} could not leave: {e}") })
        }
    }
}
