//! The admin routes `synapse run` adds to the HTTP API (all behind tokens with scopes, see
//! `synapse_connectors::auth`; none on the ops listener, which serves only `/metrics`,
//! `/livez` and `/readyz`):
//! * `POST /v1/repair/check`, `POST /v1/repair/fix` — scope `repair` ([`crate::repair`]);
//! * `GET /v1/components` — every component's state; `POST /v1/components/resume` — try every
//!   parked component again now (what SIGHUP does); with `{"accept_gap": ["<source>"]}` those
//!   sources' captures also cross the gap they are parked on (a new slot; stream and webhook
//!   consumers are told; the targets are repaired by `synapse repair fix`) — scope `admin`;
//! * `GET /v1/audit?limit=` — the newest audit entries — scope `admin`;
//! * `GET /v1/positions`, `GET /v1/positions/wait` — reads at a cut ([`crate::positions`]) —
//!   scope `stream`;
//! * `GET /v1/shards/{set}`, `POST /v1/shards/{set}/{start|switch|reverse|finish}` — a shard
//!   set's move ([`crate::resharding`]) — scope `admin`;
//! * `GET /v1/indexes/{name}`, `POST /v1/indexes/{name}/search` — vector indexes
//!   ([`crate::vector_indexes`]) — scope `stream`;
//! * `GET /v1/mesh`, `POST /v1/mesh/nodes/{node}/join|leave` — mesh membership
//!   ([`crate::mesh_membership`]) — scope `admin`;
//! * `GET /v1/topology` — everything this process runs in one answer: mesh nodes, sources
//!   and targets with their state, error, fix and lag (bytes, seconds, records), vector
//!   indexes — scope `admin`;
//! * `GET /v1/conflicts` — the mesh nodes' conflict logs ([`crate::conflicts`]) — scope
//!   `admin`;
//! * `GET /v1/openapi.json` — the OpenAPI 3.1 description of every route ([`crate::openapi`])
//!   — no token;
//! * `GET /console` — the web console's page, script and style ([`crate::console`]) — no
//!   token (the page asks for one).

use crate::ops::{ComponentState, Health, GAP_CODE};
use crate::positions::Positions;
use crate::repair::RepairService;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use synapse_connectors::auth::{require, Audit, Auth, Scope};
use synapse_connectors::ConnectorError;

#[derive(Clone)]
pub(crate) struct Admin {
    health: Arc<Health>,
    audit: Option<Arc<Audit>>,
}

/// What the admin routes act on.
pub struct Services {
    pub health: Arc<Health>,
    pub audit: Option<Arc<Audit>>,
    pub repair: Arc<RepairService>,
    pub positions: Arc<Positions>,
    pub reshard: crate::resharding::Control,
    pub members: Arc<crate::mesh_membership::Members>,
    pub indexes: Arc<crate::vector_indexes::Indexes>,
    pub conflicts: Arc<crate::conflicts::ConflictLog>,
}

/// What `GET /v1/topology` reads.
#[derive(Clone)]
pub(crate) struct Topology {
    health: Arc<Health>,
    positions: Arc<Positions>,
    members: Arc<crate::mesh_membership::Members>,
    indexes: Arc<crate::vector_indexes::Indexes>,
}

/// The admin routes, each with its scope.
pub fn router(auth: Arc<Auth>, services: Services) -> Router {
    let Services { health, audit, repair, positions, reshard, members, indexes, conflicts } = services;
    let scoped = |scope: Scope| axum::middleware::from_fn_with_state((auth.clone(), scope), require);
    let repair = repair.router().route_layer(scoped(Scope::Repair));
    let topology = Router::new()
        .route("/v1/topology", get(topology))
        .with_state(Topology {
            health: health.clone(),
            positions: positions.clone(),
            members: members.clone(),
            indexes: indexes.clone(),
        })
        .route("/v1/conflicts", get(crate::conflicts::list).with_state(conflicts))
        .route_layer(scoped(Scope::Admin));
    // Applications read at a cut with their stream tokens: nothing here changes data.
    let reads = Router::new()
        .route("/v1/positions", get(crate::positions::list))
        .route("/v1/positions/wait", get(crate::positions::wait))
        .with_state(positions)
        .route_layer(scoped(Scope::Stream));
    let vectors = Router::new()
        .route("/v1/indexes/{name}", get(crate::vector_indexes::show))
        .route("/v1/indexes/{name}/search", post(crate::vector_indexes::search))
        .with_state(indexes)
        .route_layer(scoped(Scope::Stream));
    let admin = Router::new()
        .route("/v1/components", get(components))
        .route("/v1/components/resume", post(resume))
        .route("/v1/audit", get(audit_log))
        .with_state(Admin { health, audit })
        .route_layer(scoped(Scope::Admin));
    let shards = Router::new()
        .route("/v1/shards/{set}", get(crate::resharding::status))
        .route("/v1/shards/{set}/{step}", post(crate::resharding::step))
        .with_state(reshard)
        .route_layer(scoped(Scope::Admin));
    let mesh = Router::new()
        .route("/v1/mesh", get(crate::mesh_membership::status))
        .route("/v1/mesh/nodes/{node}/join", post(crate::mesh_membership::request_join))
        .route("/v1/mesh/nodes/{node}/leave", post(crate::mesh_membership::request_leave))
        .with_state(members)
        .route_layer(scoped(Scope::Admin));
    let document = Router::new().route("/v1/openapi.json", get(crate::openapi::document_route));
    repair
        .merge(admin)
        .merge(reads)
        .merge(shards)
        .merge(mesh)
        .merge(vectors)
        .merge(topology)
        .merge(document)
        .merge(crate::console::router())
}

/// `GET /v1/topology`: each source and target with its component's state (and error and fix
/// when not running) and its position and lag; the mesh's nodes; the vector indexes.
#[utoipa::path(get, path = "/v1/topology", tag = "components", security(("token" = ["admin"])),
    responses((status = 200, description = "`{\"ready\", \"nodes\", \"sources\", \"targets\", \"indexes\", \"components\"}`", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn topology(State(t): State<Topology>) -> Json<Value> {
    let components = states(&t.health);
    let state_of = |name: &str| {
        components.as_array().into_iter().flatten().find(|c| c["component"] == name).cloned().unwrap_or(Value::Null)
    };
    let mut positions = t.positions.json();
    // Each capture and applier with its component's state beside its position.
    let mut attach = |list: &str, component: &dyn Fn(&Value) -> String| {
        for v in positions[list].as_array_mut().into_iter().flatten() {
            v["component"] = state_of(&component(v));
        }
    };
    attach("sources", &|s| format!("capture/{}", s["source"].as_str().unwrap_or_default()));
    attach("targets", &|a| {
        format!("apply/{}->{}", a["source"].as_str().unwrap_or_default(), a["target"].as_str().unwrap_or_default())
    });
    let mesh = t.members.json();
    Json(json!({
        "ready": t.health.ready(),
        "serving": t.health.serving(),
        "nodes": mesh["nodes"],
        "sources": positions["sources"],
        "targets": positions["targets"],
        "indexes": t.indexes.json(),
        "components": components,
    }))
}

fn states(health: &Health) -> Value {
    let all = health.snapshot();
    Value::Array(
        all.iter()
            .map(|(name, state)| {
                let mut v = json!({"component": name, "state": state.name()});
                match state {
                    ComponentState::Parked { code, error, hint } => {
                        v["code"] = code.clone().into();
                        v["error"] = error.clone().into();
                        v["hint"] = hint.clone().into();
                    }
                    ComponentState::Retrying { code, error } => {
                        v["code"] = code.clone().into();
                        v["error"] = error.clone().into();
                    }
                    _ => {}
                }
                v
            })
            .collect(),
    )
}

/// Every component's state, with the error and the fix of those parked or retrying.
#[utoipa::path(get, path = "/v1/components", tag = "components", security(("token" = ["admin"])),
    responses((status = 200, description = "`{\"ready\", \"serving\", \"components\": [...]}`", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn components(State(a): State<Admin>) -> Json<Value> {
    Json(json!({"ready": a.health.ready(), "serving": a.health.serving(), "components": states(&a.health)}))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    /// Sources whose gap (`CAP011`) the operator accepts.
    #[serde(default)]
    accept_gap: Vec<String>,
}

/// Tries every parked component again now; `accept_gap` lets those sources' captures cross
/// the gap they are parked on.
#[utoipa::path(post, path = "/v1/components/resume", tag = "components", security(("token" = ["admin"])),
    request_body(content = Object, description = "`{}` or `{\"accept_gap\": [\"<source>\"]}`"),
    responses((status = 200, description = "the components resumed", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn resume(State(a): State<Admin>, body: axum::body::Bytes) -> Result<Json<Value>, ConnectorError> {
    // An empty body is a plain resume.
    let req: ResumeRequest = match body.iter().all(u8::is_ascii_whitespace) {
        true => ResumeRequest::default(),
        false => serde_json::from_slice(&body)
            .map_err(|e| ConnectorError::BadRequest { field: "body".into(), message: e.to_string() })?,
    };
    for source in &req.accept_gap {
        let component = format!("capture/{source}");
        if !a.health.gap_open(source) {
            return Err(ConnectorError::BadRequest {
                field: "accept_gap".into(),
                message: format!("{component} is not parked on a gap ({GAP_CODE}): there is no gap to accept"),
            });
        }
    }
    for source in &req.accept_gap {
        tracing::warn!(%source, "admin API: the operator accepted the gap; the capture crosses it now");
        a.health.accept_gap(source);
    }
    let parked: Vec<String> = a.health.parked().into_iter().map(|(name, _)| name).collect();
    tracing::info!(parked = parked.len(), "admin API: trying parked components again");
    a.health.resume_parked();
    Ok(Json(json!({"resumed": parked, "accepted_gaps": req.accept_gap})))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    limit: Option<usize>,
}

/// The newest audit entries (who changed what, when, with what answer).
#[utoipa::path(get, path = "/v1/audit", tag = "components", security(("token" = ["admin"])),
    params(("limit" = Option<usize>, Query, description = "entries (default 100)")),
    responses((status = 200, description = "`{\"entries\": [...]}`", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn audit_log(
    State(a): State<Admin>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return ConnectorError::BadRequest { field: "query".into(), message: e.body_text() }.into_response(),
    };
    let Some(audit) = &a.audit else { return Json(json!({"entries": []})).into_response() };
    let limit = q.limit.unwrap_or(100).min(synapse_connectors::auth::AUDIT_RECENT);
    match audit.recent(limit) {
        Ok(entries) => Json(json!({"entries": entries})).into_response(),
        Err(e) => {
            let body = synapse_error::body("SYN005", &format!("cannot read the audit log: {e}"), "check log.dir");
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
    }
}
