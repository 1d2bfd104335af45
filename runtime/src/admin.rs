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
//!   ([`crate::mesh_membership`]) — scope `admin`.

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
struct Admin {
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
}

/// The admin routes, each with its scope.
pub fn router(auth: Arc<Auth>, services: Services) -> Router {
    let Services { health, audit, repair, positions, reshard, members, indexes } = services;
    let scoped = |scope: Scope| axum::middleware::from_fn_with_state((auth.clone(), scope), require);
    let repair = repair.router().route_layer(scoped(Scope::Repair));
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
    repair.merge(admin).merge(reads).merge(shards).merge(mesh).merge(vectors)
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

async fn components(State(a): State<Admin>) -> Json<Value> {
    Json(json!({"ready": a.health.ready(), "serving": a.health.serving(), "components": states(&a.health)}))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    /// Sources whose gap (`CAP011`) the operator accepts.
    #[serde(default)]
    accept_gap: Vec<String>,
}

async fn resume(State(a): State<Admin>, body: axum::body::Bytes) -> Result<Json<Value>, ConnectorError> {
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
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit_log(
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
