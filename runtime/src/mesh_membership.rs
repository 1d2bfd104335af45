//! Mesh membership at run time: which configured nodes are members, and a node that is not
//! joining from a donor's snapshot while every node keeps writing
//! (`synapse_apply::mesh::join`; docs/decisions/0018-mesh-membership.md).
//!
//! Each node's own database records its membership (`synapse.mesh_membership`). On start:
//! * a **member** (or a node set up by a release before membership was recorded) is installed
//!   as before;
//! * when no node of the mesh is a member yet, every new node **founds** it: the nodes start
//!   from the same data, rows older than the mesh are a shared baseline;
//! * otherwise a new node **joins**: with `mesh.on_new_node: join` at once, with `wait` once
//!   asked (`synapse mesh join <node>`, `POST /v1/mesh/nodes/{node}/join`). Until it is a
//!   member its capture and the appliers into it wait; the rest of the mesh goes on. A join cut
//!   short (kill -9, a lost connection) starts over on the next try: the copy commits whole.
//!
//! Routes (`GET /v1/mesh`, `POST /v1/mesh/nodes/{node}/join`, scope `admin`) show each node's
//! phase, the join's progress and each applier's catch-up.

use crate::config::{Config, MeshConfig, MeshNode, OnNewNode};
use crate::ops::Health;
use crate::positions::Positions;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use synapse_apply::mesh::join::{self, JoinProgress, JoinSpec, Membership};
use synapse_apply::mesh::MeshTable;
use synapse_apply::{connect_target, ApplyError};
use synapse_connectors::ConnectorError;
use synapse_log::{ChangeLog, SourceLog};
use synapse_resolver::NodeId;

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
}

/// How long the start-up survey waits for a node before counting it unknown.
const SURVEY_TIMEOUT: Duration = Duration::from_secs(10);

impl Members {
    pub fn new(config: &Config, health: Arc<Health>, positions: Arc<Positions>) -> Members {
        let nodes = config
            .mesh
            .iter()
            .flat_map(|m| &m.nodes)
            .map(|n| (n.name.clone(), NodeStatus { phase: "starting", ..Default::default() }))
            .collect();
        Members { mesh: config.mesh.clone(), config: config.clone(), health, positions, nodes: Mutex::new(nodes) }
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

    /// Whether no node of the mesh is a member yet (every node that answers within
    /// [`SURVEY_TIMEOUT`] is new): then the new nodes found the mesh instead of joining it.
    pub async fn founding(&self) -> bool {
        let Some(m) = &self.mesh else { return false };
        let mut surveys = tokio::task::JoinSet::new();
        for n in m.nodes.clone() {
            surveys.spawn(async move { tokio::time::timeout(SURVEY_TIMEOUT, read_membership(&n)).await });
        }
        let mut all_new = true;
        while let Some(r) = surveys.join_next().await {
            if let Ok(Ok(Ok(s))) = r {
                all_new &= s == Membership::New;
            }
        }
        all_new
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
            Membership::New if founding || !self.any_member(m, &node.name).await => {
                tracing::info!(node = %node.name, "founding the mesh (no node is a member yet): the nodes start from the same data");
                join::record_membership(&client, &node.name, id, "member", None).await?;
            }
            Membership::New | Membership::Joining { .. } => {
                let resumed = matches!(state, Membership::Joining { .. });
                self.join(m, node, &client, resumed, logs).await?;
            }
        }
        let tables = synapse_apply::mesh::install(&client, id, &m.tables, &m.policies()).await?;
        self.set_phase(&node.name, "member");
        Ok(tables)
    }

    /// Whether some node other than `except` is a member (or joining: it will be).
    async fn any_member(&self, m: &MeshConfig, except: &str) -> bool {
        for n in m.nodes.iter().filter(|n| n.name != except) {
            if let Ok(Ok(s)) = tokio::time::timeout(SURVEY_TIMEOUT, read_membership(n)).await {
                if s != Membership::New {
                    return true;
                }
            }
        }
        false
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
        node: &MeshNode,
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
        self.health.set(&format!("mesh/{}", node.name), crate::ops::ComponentState::Copying);
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
            target: &node.url.pg_config().map_err(|e| join_error(node, e))?,
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
            "caught_up": s.phase == "member" && behind == 0,
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

/// `GET /v1/mesh`: every node's phase, join progress and catch-up.
pub(crate) async fn status(State(m): State<Arc<Members>>) -> Json<Value> {
    Json(m.json())
}

/// `POST /v1/mesh/nodes/{node}/join`: a node waiting to join (`on_new_node: wait`) joins now.
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
