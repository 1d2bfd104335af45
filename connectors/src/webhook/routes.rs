//! `/v1/endpoints`: manage webhook endpoints (admin tokens only when tokens are configured).
//!
//! * `GET /v1/endpoints` · `POST /v1/endpoints` (create; a secret is generated when none is
//!   given and returned once) · `GET|PUT|DELETE /v1/endpoints/{name}`
//! * `POST /v1/endpoints/{name}/enable` — after a 410 disabled it
//! * `POST /v1/endpoints/{name}/replay` `{"cursor": "…"}` or `{"since": "2026-11-26T10:00:00Z"}`
//! * `GET /v1/endpoints/{name}/attempts` — the latest attempts, newest first
//! * `GET /v1/endpoints/{name}/dead-letters?limit=`

use super::{EndpointSpec, ReplayFrom};
use crate::api::Api;
use crate::ConnectorError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use synapse_log::ChangeLog;

type Res = Result<(StatusCode, Json<Value>), ConnectorError>;

pub fn router<L: ChangeLog>() -> Router<Arc<Api<L>>> {
    Router::new()
        .route("/v1/endpoints", get(list::<L>).post(create::<L>))
        .route("/v1/endpoints/{name}", get(show::<L>).put(replace::<L>).delete(remove::<L>))
        .route("/v1/endpoints/{name}/enable", post(enable::<L>))
        .route("/v1/endpoints/{name}/replay", post(replay::<L>))
        .route("/v1/endpoints/{name}/attempts", get(attempts::<L>))
        .route("/v1/endpoints/{name}/dead-letters", get(dead_letters::<L>))
}

fn hooks<L: ChangeLog>(api: &Api<L>, headers: &HeaderMap) -> Result<Arc<super::Webhooks<L>>, ConnectorError> {
    api.auth.check(headers, crate::auth::Scope::Endpoints)?;
    api.webhooks.clone().ok_or_else(|| ConnectorError::NotFound { what: "webhooks".into() })
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ConnectorError> {
    b.map(|Json(v)| v).map_err(|e| ConnectorError::BadRequest { field: "body".into(), message: e.body_text() })
}

fn ok(v: Value) -> Res {
    Ok((StatusCode::OK, Json(v)))
}

/// Every webhook endpoint with its state and delivery position.
#[utoipa::path(get, path = "/v1/endpoints", tag = "endpoints", security(("token" = ["endpoints"])),
    responses((status = 200, description = "`{\"endpoints\": [...]}`", body = Object), crate::openapi::Errors))]
pub(crate) async fn list<L: ChangeLog>(State(api): State<Arc<Api<L>>>, headers: HeaderMap) -> Res {
    ok(json!({"endpoints": hooks(&api, &headers)?.list().await}))
}

/// Creates an endpoint; a signing secret is generated when none is given and returned once.
#[utoipa::path(post, path = "/v1/endpoints", tag = "endpoints", security(("token" = ["endpoints"])), request_body(content = Object, description = "the endpoint: `name`, `url`, `tables`, `filter`, …"),
    responses((status = 201, description = "the endpoint (with `secret` once)", body = Object), crate::openapi::Errors))]
pub(crate) async fn create<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    headers: HeaderMap,
    spec: Result<Json<EndpointSpec>, JsonRejection>,
) -> Res {
    let (mut view, secret) = hooks(&api, &headers)?.put(body(spec)?, true).await?;
    if let Some(s) = secret {
        view["secret"] = s.into();
    }
    Ok((StatusCode::CREATED, Json(view)))
}

/// Replaces an endpoint's definition (the body's `name` must match).
#[utoipa::path(put, path = "/v1/endpoints/{name}", tag = "endpoints", security(("token" = ["endpoints"])), params(("name" = String, Path, description = "the endpoint")), request_body(content = Object, description = "the endpoint"),
    responses((status = 200, description = "the endpoint", body = Object), crate::openapi::Errors))]
pub(crate) async fn replace<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    spec: Result<Json<EndpointSpec>, JsonRejection>,
) -> Res {
    // The token first: a caller without one learns nothing of the body's rules.
    let hooks = hooks(&api, &headers)?;
    let spec = body(spec)?;
    if spec.name != name {
        return Err(ConnectorError::BadRequest {
            field: "name".into(),
            message: format!("the body names `{}` but the URL `{name}`", spec.name),
        });
    }
    let (mut view, secret) = hooks.put(spec, false).await?;
    if let Some(s) = secret {
        view["secret"] = s.into();
    }
    ok(view)
}

/// One endpoint: definition, state, position, the last error.
#[utoipa::path(get, path = "/v1/endpoints/{name}", tag = "endpoints", security(("token" = ["endpoints"])), params(("name" = String, Path, description = "the endpoint")),
    responses((status = 200, description = "the endpoint", body = Object), crate::openapi::Errors))]
pub(crate) async fn show<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Res {
    ok(hooks(&api, &headers)?.get(&name).await?)
}

/// Deletes an endpoint and its delivery state.
#[utoipa::path(delete, path = "/v1/endpoints/{name}", tag = "endpoints", security(("token" = ["endpoints"])), params(("name" = String, Path, description = "the endpoint")),
    responses((status = 200, description = "`{\"deleted\": name}`", body = Object), crate::openapi::Errors))]
pub(crate) async fn remove<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Res {
    hooks(&api, &headers)?.delete(&name).await?;
    ok(json!({"deleted": name}))
}

/// Enables an endpoint that a 410 from its receiver disabled.
#[utoipa::path(post, path = "/v1/endpoints/{name}/enable", tag = "endpoints", security(("token" = ["endpoints"])), params(("name" = String, Path, description = "the endpoint")),
    responses((status = 200, description = "the endpoint", body = Object), crate::openapi::Errors))]
pub(crate) async fn enable<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Res {
    ok(hooks(&api, &headers)?.enable(&name).await?)
}

/// Delivers again from a cursor or a time.
#[utoipa::path(post, path = "/v1/endpoints/{name}/replay", tag = "endpoints", security(("token" = ["endpoints"])), params(("name" = String, Path, description = "the endpoint")), request_body(content = Object, description = "`{\"cursor\": \"…\"}` or `{\"since\": \"2026-11-26T10:00:00Z\"}`"),
    responses((status = 200, description = "the endpoint at its new position", body = Object), crate::openapi::Errors))]
pub(crate) async fn replay<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    from: Result<Json<ReplayFrom>, JsonRejection>,
) -> Res {
    let hooks = hooks(&api, &headers)?;
    ok(hooks.replay(&name, body(from)?).await?)
}

/// The latest delivery attempts, newest first.
#[utoipa::path(get, path = "/v1/endpoints/{name}/attempts", tag = "endpoints", security(("token" = ["endpoints"])), params(("name" = String, Path, description = "the endpoint")),
    responses((status = 200, description = "`{\"attempts\": [...]}`", body = Object), crate::openapi::Errors))]
pub(crate) async fn attempts<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Res {
    ok(json!({"attempts": hooks(&api, &headers)?.attempts(&name).await?}))
}

/// Events the endpoint gave up on.
#[utoipa::path(get, path = "/v1/endpoints/{name}/dead-letters", tag = "endpoints", security(("token" = ["endpoints"])),
    params(("name" = String, Path, description = "the endpoint"), ("limit" = Option<usize>, Query, description = "1 to 10,000 (default 100)")),
    responses((status = 200, description = "the dead letters", body = Object), crate::openapi::Errors))]
pub(crate) async fn dead_letters<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Res {
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => l.parse::<usize>().ok().filter(|l| (1..=10_000).contains(l)).ok_or_else(|| {
            ConnectorError::BadRequest { field: "limit".into(), message: "must be between 1 and 10000".into() }
        })?,
    };
    ok(json!({"dead_letters": hooks(&api, &headers)?.dead_letters(&name, limit).await?}))
}
