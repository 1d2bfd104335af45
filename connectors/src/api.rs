//! The HTTP API: resumable change streams (`/v1/streams`) and webhook endpoint management
//! (`/v1/endpoints`, see [`crate::webhook::routes`]).
//!
//! Streams follow Electric's shape API and Kubernetes watches: the client holds the cursor.
//! * `GET /v1/streams/{node}` — subscribe: the cursor after the last committed transaction.
//!   Anything committed after this call is after this cursor (no gap between subscribe and
//!   write).
//! * `GET /v1/streams/{node}/changes?cursor=&live=&limit=&tables=&operations=&filter=`
//!   - JSON lines (`application/x-ndjson`): up to `limit` CloudEvents (and about 16 MiB), then a control line
//!     `{"control":"up-to-date"|"more","cursor":…}` whose cursor resumes the stream (also in the
//!     `synapse-cursor` header). `live=true` long-polls up to `timeout_ms` for the first event.
//!   - SSE (`Accept: text/event-stream`): `event: change`, `id:` = cursor; `Last-Event-ID`
//!     resumes. `event: bookmark` carries the position when only filtered-out traffic passed;
//!     without `live=true` the stream ends with `event: up-to-date`.
//!   - 410 Gone when the cursor is older than the log's retention, with the oldest cursor;
//!     and 410 (`CON011`) when the cursor is from before a gap the source's capture crossed
//!     (`on_gap: resync`), with the `snapshot` link to re-read the tables. A reader already
//!     past the cursor reads the gap inline: an `io.synapsedb.resync.v1` event (SSE
//!     `event: resync`) whose cursor resumes after it.
//! * Bearer tokens (api.tokens, see [`crate::auth`]) need the `stream` scope and are limited to
//!   their tables: a request for other tables gets 403; a request without `tables` sees only the
//!   token's tables.

use crate::feed::{parse_cursor, ChangeFeed, Operation, Selector, SourceInfo};
use crate::{ConnectorError, RowFilter};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use synapse_error::Classify;
use synapse_log::ChangeLog;
use synapse_schemas::Cursor;

/// Largest `limit` a request may ask for.
pub const MAX_LIMIT: usize = 10_000;
/// Events read from the log at a time for one response (an SSE message batch, a page of a
/// JSON lines answer).
const PAGE_EVENTS: usize = 256;
/// The first page of a JSON lines answer, before the events' size is known.
const FIRST_PAGE_EVENTS: usize = 16;
/// A JSON lines answer ends (`"control": "more"`) once its events pass this size.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
const DEFAULT_LIMIT: usize = 1_000;
/// Long-poll wait: below common proxy idle timeouts (60 s).
const DEFAULT_POLL: Duration = Duration::from_secs(20);
/// SSE comment lines keep idle connections open through proxies.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

pub use crate::auth::{Auth, Scope, Token};

/// One source node's log, served as a stream named after the node.
pub struct StreamSource<L> {
    pub log: Arc<L>,
    pub source: SourceInfo,
    /// The source database and its capture's slot, for snapshots (`None`: the stream offers
    /// none).
    pub snapshot_source: Option<SnapshotSource>,
}

/// Where a stream's snapshots are read.
#[derive(Clone)]
pub struct SnapshotSource {
    pub config: synapse_postgres::PgConfig,
    /// The capture's slot: a snapshot is refused while it is missing (see
    /// [`crate::snapshot::ensure_capturing`]).
    pub capture_slot: String,
    /// The source's captured tables (`schema.table`; empty: every table with a key), the
    /// only ones a snapshot reads.
    pub tables: Vec<String>,
}

/// Shared state of the API server.
pub struct Api<L> {
    pub streams: BTreeMap<String, StreamSource<L>>,
    /// Who may call (see [`crate::auth`]).
    pub auth: Arc<Auth>,
    /// Where mutating requests are recorded (`None`: not recorded).
    pub audit: Option<Arc<crate::auth::Audit>>,
    pub webhooks: Option<Arc<crate::webhook::Webhooks<L>>>,
    /// Ends live streams and long polls when it turns true, so a graceful shutdown does not
    /// wait for clients that never disconnect.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Permits for long-lived reads (SSE streams, long polls): past them a request gets 503
    /// `CON012`, so slow or idle readers cannot hold every connection and task.
    pub live_slots: Arc<tokio::sync::Semaphore>,
}

/// Live streams a server holds at once by default (`api.max_streams`).
pub const DEFAULT_MAX_STREAMS: usize = 512;

impl IntoResponse for ConnectorError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = self.body();
        if let ConnectorError::CursorGone { oldest, .. } = &self {
            body["error"]["oldest_cursor"] = oldest.map(|l| Cursor { commit_lsn: l, index: 0 }.to_string()).into();
        }
        if let ConnectorError::CursorBeforeGap { stream, gap, .. } = &self {
            body["error"]["gap_cursor"] = gap.to_string().into();
            body["error"]["snapshot"] = format!("/v1/streams/{stream}/snapshot").into();
        }
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

pub fn router<L: ChangeLog>(api: Arc<Api<L>>) -> Router {
    router_with(api, Router::new())
}

/// The API's routes plus `extra` (the runtime's admin routes), all behind
/// [`crate::auth::guard`]: mutating requests must send JSON and are audited.
pub fn router_with<L: ChangeLog>(api: Arc<Api<L>>, extra: Router) -> Router {
    let guard = crate::auth::Guard { auth: api.auth.clone(), audit: api.audit.clone() };
    let r = Router::new()
        .route("/v1/streams", get(list_streams::<L>))
        .route("/v1/streams/{name}", get(subscribe::<L>))
        .route("/v1/streams/{name}/changes", get(changes::<L>))
        .route("/v1/streams/{name}/snapshot", get(snapshot::<L>));
    let r = match &api.webhooks {
        Some(_) => r.merge(crate::webhook::routes::router::<L>()),
        None => r,
    };
    r.with_state(api).merge(extra).layer(axum::middleware::from_fn_with_state(guard, crate::auth::guard))
}

/// The streams this API serves, each with the cursor of its newest change.
#[utoipa::path(get, path = "/v1/streams", tag = "streams", security(("token" = ["stream"])),
    responses((status = 200, description = "`{\"streams\": [{\"name\", \"cursor\"}]}`", body = Object), crate::openapi::Errors))]
pub(crate) async fn list_streams<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ConnectorError> {
    api.auth.check(&headers, Scope::Stream)?;
    let mut out = Vec::new();
    for (name, s) in &api.streams {
        out.push(json!({"name": name, "cursor": s.log.head_cursor().await?.map(|c| c.to_string())}));
    }
    Ok(Json(json!({ "streams": out })))
}

fn stream<'a, L>(api: &'a Api<L>, name: &str) -> Result<&'a StreamSource<L>, ConnectorError> {
    api.streams.get(name).ok_or_else(|| ConnectorError::NotFound { what: format!("stream `{name}`") })
}

/// One stream: its newest cursor and the link to read changes after it.
#[utoipa::path(get, path = "/v1/streams/{name}", tag = "streams", security(("token" = ["stream"])),
    params(("name" = String, Path, description = "the stream (a source's name)")),
    responses((status = 200, description = "`{\"name\", \"cursor\", \"changes\"}`", body = Object), crate::openapi::Errors))]
pub(crate) async fn subscribe<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ConnectorError> {
    api.auth.check(&headers, Scope::Stream)?;
    let s = stream(&api, &name)?;
    let cursor = s.log.head_cursor().await?.map(|c| c.to_string());
    Ok(Json(json!({
        "name": name,
        "cursor": cursor,
        "changes": format!("/v1/streams/{name}/changes?cursor={}", cursor.as_deref().unwrap_or("")),
    })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ChangesQuery {
    /// Read changes after this cursor (absent: from the oldest retained).
    cursor: Option<String>,
    /// Keep the answer open and send changes as they commit.
    live: Option<bool>,
    /// Most events in one answer (1 to 10,000).
    limit: Option<usize>,
    /// Comma-separated `schema.table` names (default: every table the token may read).
    tables: Option<String>,
    /// Comma-separated `insert`, `update`, `delete`, `truncate`.
    operations: Option<String>,
    /// A row filter, e.g. `status=paid` (see the README's stream section).
    filter: Option<String>,
    /// How long a `live` answer waits for a change before it ends (ms, at most 120,000).
    timeout_ms: Option<u64>,
}

fn bad(field: &str, message: impl Into<String>) -> ConnectorError {
    ConnectorError::BadRequest { field: field.into(), message: message.into() }
}

/// Builds the selector a request may use, enforcing the token's table scope.
fn selector(q: &ChangesQuery, token: Option<&crate::api::Token>) -> Result<Selector, ConnectorError> {
    let requested: Option<HashSet<String>> = q
        .tables
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| t.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect());
    if let Some(t) = &requested {
        if let Some(bad_name) = t.iter().find(|n| n.split('.').count() != 2) {
            return Err(bad("tables", format!("`{bad_name}` is not schema.table")));
        }
    }
    let tables = match token.filter(|t| !t.tables.is_empty()) {
        None => requested,
        Some(tok) => {
            let allowed: HashSet<String> = tok.tables.iter().cloned().collect();
            match requested {
                None => Some(allowed),
                Some(req) => {
                    let mut denied: Vec<&String> = req.difference(&allowed).collect();
                    if !denied.is_empty() {
                        denied.sort();
                        return Err(ConnectorError::Forbidden(format!(
                            "token `{}` may not read {}",
                            tok.name,
                            denied.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        )));
                    }
                    Some(req)
                }
            }
        }
    };
    let operations = match q.operations.as_deref().filter(|o| !o.is_empty()) {
        None => None,
        Some(list) => {
            let mut set = HashSet::new();
            for o in list.split(',') {
                let op: Operation = serde_json::from_value(json!(o.trim())).map_err(|_| {
                    bad("operations", format!("`{o}` is not one of insert, update, delete, truncate, schema"))
                })?;
                set.insert(op);
            }
            Some(set)
        }
    };
    let filter = match q.filter.as_deref().filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => Some(f.parse::<RowFilter>().map_err(|e| bad("filter", e))?),
    };
    Ok(Selector { tables, operations, filter })
}

/// What every stream read starts with: the caller's token checked, the query parsed, the
/// stream found, and the selector the token allows.
fn read_request<'a, L>(
    api: &'a Api<L>,
    name: &str,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
) -> Result<(ChangesQuery, &'a StreamSource<L>, Selector), ConnectorError> {
    let token = api.auth.check(headers, Scope::Stream)?;
    let Query(q) = query.map_err(|e| bad("query", e.body_text()))?;
    let s = stream(api, name)?;
    let selector = selector(&q, token.as_ref())?;
    Ok((q, s, selector))
}

/// Change events after a cursor: JSON lines (`application/x-ndjson`), or Server-Sent Events
/// with `Accept: text/event-stream` (reconnects resume from `Last-Event-ID`). 410 when the
/// cursor is older than the log's retention or from before a gap.
#[utoipa::path(get, path = "/v1/streams/{name}/changes", tag = "streams", security(("token" = ["stream"])),
    params(("name" = String, Path, description = "the stream"), ChangesQuery),
    responses(
        (status = 200, description = "one change event (CloudEvents, Debezium data) per line, then a control line with the cursor to continue from", content_type = "application/x-ndjson", body = String),
        (status = 410, description = "the cursor is gone (`CON001`) or before a gap (`CON011`): re-read the snapshot", body = crate::openapi::ErrorBody),
        crate::openapi::Errors))]
pub(crate) async fn changes<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ConnectorError> {
    let (q, s, selector) = read_request(&api, &name, query, &headers)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad("limit", format!("must be between 1 and {MAX_LIMIT}")));
    }
    let sse =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    // SSE reconnects carry the last received id; it wins over the original URL's cursor.
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).filter(|_| sse);
    let after = match last_event_id.or(q.cursor.as_deref()).filter(|c| !c.is_empty()) {
        Some(c) => Some(parse_cursor(if last_event_id.is_some() { "Last-Event-ID" } else { "cursor" }, c)?),
        None => None,
    };
    if let Some(c) = after {
        let marks = s.log.resync_marks().await?;
        if let Some((_, m)) = marks.into_iter().find(|(_, m)| c < m.cursor()) {
            return Err(ConnectorError::CursorBeforeGap { stream: name, cursor: c, gap: m.cursor(), reason: m.reason });
        }
    }
    let live = q.live.unwrap_or(false);
    let poll = q.timeout_ms.map(Duration::from_millis).unwrap_or(DEFAULT_POLL).min(Duration::from_secs(120));
    let slot = if sse || live {
        let taken = api.live_slots.clone().try_acquire_owned();
        Some(taken.map_err(|_| ConnectorError::Busy { what: "live streams (api.max_streams)".into() })?)
    } else {
        None
    };
    let feed = ChangeFeed::open(s.log.clone(), s.source.clone(), after, selector).await?;
    let shutdown = api.shutdown.clone();
    metrics::counter!("synapse_stream_requests_total", "stream" => name.clone(), "mode" => if sse { "sse" } else { "lines" })
        .increment(1);
    if sse {
        return Ok(sse_response(feed, name, limit, live, shutdown, slot).into_response());
    }
    let r = lines_response(feed, name, limit, if live { poll } else { Duration::ZERO }, shutdown).await;
    drop(slot);
    r
}

/// `GET /v1/streams/{name}/snapshot?tables=&filter=`: the selected tables' rows as read
/// events (JSON lines), then `{"control":"snapshot-end","cursor":…}` — pass that cursor to
/// `/changes` to continue with everything committed after the snapshot.
#[utoipa::path(get, path = "/v1/streams/{name}/snapshot", tag = "streams", security(("token" = ["stream"])),
    params(("name" = String, Path, description = "the stream"),
        ("tables" = Option<String>, Query, description = "comma-separated `schema.table` names"),
        ("filter" = Option<String>, Query, description = "a row filter")),
    responses(
        (status = 200, description = "the rows as read events, then `{\"control\":\"snapshot-end\",\"cursor\"}`", content_type = "application/x-ndjson", body = String),
        crate::openapi::Errors))]
pub(crate) async fn snapshot<L: ChangeLog>(
    State(api): State<Arc<Api<L>>>,
    Path(name): Path<String>,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ConnectorError> {
    let (q, s, selector) = read_request(&api, &name, query, &headers)?;
    if q.cursor.is_some() || q.live.is_some() || q.limit.is_some() || q.operations.is_some() {
        return Err(bad("query", "a snapshot takes only `tables` and `filter`"));
    }
    let Some(source) = s.snapshot_source.clone() else {
        return Err(ConnectorError::NotFound { what: format!("snapshots of stream `{name}`") });
    };
    let info = s.source.clone();
    crate::snapshot::ensure_capturing(&source, &info.node).await?;
    metrics::counter!("synapse_stream_requests_total", "stream" => name.clone(), "mode" => "snapshot").increment(1);
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    tokio::spawn(async move {
        let end = match crate::snapshot::stream_snapshot(&source, &info, &selector, &tx).await {
            Ok(resume) => json!({"control": "snapshot-end", "cursor": resume.to_string()}),
            Err(e) => {
                tracing::warn!(stream = %info.node, error = %synapse_error::chain(&e), "snapshot failed");
                // The status line is long sent: the error travels as the last line.
                json!({"control": "error", "error": {"code": e.code(), "message": synapse_error::chain(&e), "hint": e.hint()}})
            }
        };
        let _ = tx.send(bytes::Bytes::from(format!("{end}\n"))).await;
    });
    let body = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    let mut resp = axum::body::Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn lines_response<L: ChangeLog>(
    mut feed: ChangeFeed<L>,
    name: String,
    limit: usize,
    wait: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<Response, ConnectorError> {
    // Read in pages, so a response holds at most MAX_RESPONSE_BYTES of events (and the
    // pages' records), not `limit` events of any size.
    let mut body = Vec::new();
    let (mut count, mut position, mut more) = (0usize, feed.position(), false);
    loop {
        // Pages sized by the events seen so far, so the answer stops near the size bound.
        let fits = match count {
            0 => FIRST_PAGE_EVENTS,
            _ => MAX_RESPONSE_BYTES.saturating_sub(body.len()) / (body.len() / count).max(1),
        };
        let want = (limit - count).min(fits.clamp(1, PAGE_EVENTS));
        let wait = if count == 0 { wait } else { Duration::ZERO };
        let batch = tokio::select! {
            b = feed.next_batch(want, wait) => b?,
            // Shutting down: answer the long poll now, with the position so far.
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => crate::FeedBatch { position: feed.position(), ..Default::default() },
        };
        position = batch.position.or(position);
        for e in &batch.events {
            body.extend_from_slice(&e.body);
            body.push(b'\n');
        }
        count += batch.events.len();
        if batch.events.len() < want || *shutdown.borrow() {
            break;
        }
        // A full page may have more behind it.
        if count >= limit || body.len() >= MAX_RESPONSE_BYTES {
            more = true;
            break;
        }
    }
    metrics::counter!("synapse_stream_events_total", "stream" => name).increment(count as u64);
    let control = if more { "more" } else { "up-to-date" };
    let cursor = position.map(|c| c.to_string());
    body.extend_from_slice(json!({"control": control, "cursor": cursor}).to_string().as_bytes());
    body.push(b'\n');
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = cursor.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert("synapse-cursor", c);
    }
    Ok(resp)
}

fn sse_response<L: ChangeLog>(
    feed: ChangeFeed<L>,
    name: String,
    limit: usize,
    live: bool,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let clients = metrics::gauge!("synapse_stream_sse_clients", "stream" => name.clone());
    clients.increment(1.0);
    let guard = GaugeGuard(clients, slot);
    let state = Some((feed, feed_position_string(None), guard));
    let events = stream::unfold(state, move |state| {
        let name = name.clone();
        async move {
            let (mut feed, mut last_sent, guard) = state?;
            let wait = if live { SSE_KEEPALIVE } else { Duration::ZERO };
            let batch = match feed.next_batch(limit.min(PAGE_EVENTS), wait).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(stream = %name, error = %synapse_error::chain(&e), "stream read failed");
                    let data = json!({"code": e.code(), "message": synapse_error::chain(&e), "hint": e.hint()});
                    return Some((vec![SseEvent::default().event("error").data(data.to_string())], None));
                }
            };
            let mut out = Vec::with_capacity(batch.events.len() + 1);
            for e in &batch.events {
                let data = String::from_utf8_lossy(&e.body).into_owned();
                let kind = if e.op == Operation::Resync { "resync" } else { "change" };
                out.push(SseEvent::default().event(kind).id(e.cursor.to_string()).data(data));
            }
            metrics::counter!("synapse_stream_events_total", "stream" => name).increment(batch.events.len() as u64);
            let position = feed_position_string(batch.position);
            if batch.events.is_empty() && position != last_sent && !position.is_empty() {
                // Filtered-out traffic moved the position: tell the client so a resume skips it.
                out.push(
                    SseEvent::default()
                        .event("bookmark")
                        .id(position.clone())
                        .data(json!({"cursor": position}).to_string()),
                );
            }
            last_sent = position.clone();
            if batch.events.is_empty() && !live {
                out.push(SseEvent::default().event("up-to-date").data(json!({"cursor": position}).to_string()));
                return Some((out, None));
            }
            Some((out, Some((feed, last_sent, guard))))
        }
    })
    .flat_map(|v| stream::iter(v.into_iter().map(Ok)))
    // The client reconnects with Last-Event-ID once the server is back.
    .take_until(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE))
}

fn feed_position_string(c: Option<Cursor>) -> String {
    c.map(|c| c.to_string()).unwrap_or_default()
}

/// Decrements the connected-clients gauge when the SSE stream is dropped (client gone).
/// A live stream's gauge and its permit (`api.max_streams`), both released when it ends.
struct GaugeGuard(metrics::Gauge, #[allow(dead_code)] Option<tokio::sync::OwnedSemaphorePermit>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
