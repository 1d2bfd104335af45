//! `GET /v1/conflicts` — the conflict log of every mesh node (`synapse.conflicts`, written by
//! the mesh appliers in the same transaction as the write they resolved), newest first, with
//! both versions and the result side by side.
//!
//! Query: `node`, `table` (`schema.table`), `kind` (`update_update`, `unique_key`, …) narrow it;
//! `limit` (default 50, at most 500); `before_id` with `node` pages back through one node's log
//! (each answer's `next` gives it). A node that does not answer within 5 s is listed under
//! `unreachable` with the error; the others still answer.
//!
//! Scope `admin`: the versions hold row values.

use crate::config::{Config, MeshNode};
use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use synapse_connectors::ConnectorError;
use tokio::sync::Mutex;
use tokio_postgres::Client;

/// The mesh nodes whose conflict logs are read, each with a connection kept between requests
/// (the console asks every few seconds; a new TLS session each time would cost more than the
/// query) and made again after an error.
pub struct ConflictLog {
    nodes: Vec<(MeshNode, Mutex<Option<Client>>)>,
}

const MAX_LIMIT: i64 = 500;
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConflictQuery {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    before_id: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

impl ConflictLog {
    pub fn new(config: &Config) -> ConflictLog {
        let nodes = config.mesh.iter().flat_map(|m| &m.nodes).map(|n| (n.clone(), Mutex::new(None))).collect();
        ConflictLog { nodes }
    }

    /// One node's newest conflicts matching `q`.
    async fn read(
        &self,
        (node, connection): &(MeshNode, Mutex<Option<Client>>),
        q: &ConflictQuery,
        limit: i64,
    ) -> Result<Vec<Value>, String> {
        let mut connection = connection.lock().await;
        if connection.as_ref().is_none_or(Client::is_closed) {
            let pg = node.url.pg_config()?;
            let client = synapse_postgres::connect(&pg, "conflict log").await.map_err(|e| synapse_error::chain(&e))?;
            *connection = Some(client);
        }
        let Some(client) = connection.as_ref() else { return Err("no connection".into()) };
        let rows = client
            .query(
                r#"SELECT json_build_object('id', id,
                        'detected_at', to_char(detected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                        'source_node', source_node,
                        'table', table_name, 'pk', pk, 'kind', kind, 'resolution', resolution,
                        'local', local, 'remote', remote, 'result', result)::text
                   FROM synapse.conflicts
                  WHERE ($1::text IS NULL OR table_name = $1) AND ($2::text IS NULL OR kind = $2)
                    AND ($3::bigint IS NULL OR id < $3)
                  ORDER BY id DESC LIMIT $4"#,
                &[&q.table, &q.kind, &q.before_id, &limit],
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // The connection may be the cause: the next request makes a new one.
                *connection = None;
                return Err(synapse_error::chain(&e));
            }
        };
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str::<Value>(r.get::<_, &str>(0)).ok())
            .map(|mut v| {
                v["node"] = node.name.clone().into();
                v
            })
            .collect())
    }
}

/// `GET /v1/conflicts`.
/// The mesh nodes' conflict logs, newest first: both versions and the result.
#[utoipa::path(get, path = "/v1/conflicts", tag = "mesh", security(("token" = ["admin"])),
    params(("node" = Option<String>, Query, description = "one node"), ("table" = Option<String>, Query, description = "`schema.table`"),
        ("kind" = Option<String>, Query, description = "e.g. `update_update`, `unique_key`"),
        ("before_id" = Option<i64>, Query, description = "with `node`: the page before this id"),
        ("limit" = Option<i64>, Query, description = "1 to 500 (default 50)")),
    responses((status = 200, description = "`{\"conflicts\": [...], \"next\": {..}, \"unreachable\": [...]}`", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn list(
    State(log): State<Arc<ConflictLog>>,
    Query(q): Query<ConflictQuery>,
) -> Result<Json<Value>, ConnectorError> {
    let bad = |field: &str, message: String| ConnectorError::BadRequest { field: field.into(), message };
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad("limit", format!("{limit} is out of range: 1 to {MAX_LIMIT}")));
    }
    if q.before_id.is_some() && q.node.is_none() {
        return Err(bad("before_id", "pages one node's log: give `node` too".into()));
    }
    let nodes: Vec<_> = log.nodes.iter().filter(|(n, _)| q.node.as_ref().is_none_or(|w| *w == n.name)).collect();
    if let Some(w) = &q.node {
        if nodes.is_empty() {
            return Err(ConnectorError::NotFound { what: format!("mesh node {w}") });
        }
    }
    let reads = nodes.iter().map(|n| async {
        let read = tokio::time::timeout(NODE_TIMEOUT, log.read(n, &q, limit)).await;
        (n.0.name.clone(), read.unwrap_or_else(|_| Err(format!("no answer within {NODE_TIMEOUT:?}"))))
    });
    let mut conflicts = Vec::new();
    let mut unreachable = Vec::new();
    let mut next = serde_json::Map::new();
    for (node, read) in futures_util::future::join_all(reads).await {
        match read {
            Ok(rows) => {
                if rows.len() as i64 == limit {
                    if let Some(last) = rows.last() {
                        next.insert(node.clone(), json!({"node": node, "before_id": last["id"]}));
                    }
                }
                conflicts.extend(rows);
            }
            Err(error) => unreachable.push(json!({"node": node, "error": error})),
        }
    }
    // Newest first across nodes (UTC timestamps of one width sort as text).
    conflicts.sort_by(|a, b| b["detected_at"].as_str().cmp(&a["detected_at"].as_str()));
    conflicts.truncate(limit as usize);
    Ok(Json(json!({"conflicts": conflicts, "next": next, "unreachable": unreachable})))
}
