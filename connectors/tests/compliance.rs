//! The connector compliance harness, and the webhook and stream behaviours users hit: failing,
//! slow, throttling and vanished receivers; disconnecting stream clients; bad requests.
//!
//! Every connector goes through [`check_compliance`]: events written to a real embedded log
//! must reach a real HTTP client or receiver — each at least once, duplicates only with the
//! same id and body, per-key order kept, nothing lost across a restart — and the connector's
//! metrics must count what happened.
#![allow(clippy::unwrap_used)]

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use synapse_connectors::api::{Api, Auth, Scope, StreamSource, Token};
use synapse_connectors::feed::SourceInfo;
use synapse_connectors::webhook::signing::Secret;
use synapse_connectors::webhook::store::Store;
use synapse_connectors::webhook::{EndpointSpec, ReplayFrom, WebhookSource, Webhooks};
use synapse_log::{ChangeLog, EmbeddedLog};
use synapse_schemas::{Begin, Column, Commit, Datum, LogRecord, Lsn, Op, Relation, ReplicaIdentity, RowChange};
use tokio::sync::watch;

// ---------------------------------------------------------------- fixtures

fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static H: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

fn relation() -> Relation {
    let col = |name: &str, oid: u32, key: bool| Column {
        name: name.into(),
        type_oid: oid,
        type_modifier: -1,
        type_name: "x".into(),
        base_type_oid: oid,
        element_type_oid: 0,
        is_key: key,
        type_defs: Vec::new(),
    };
    Relation {
        oid: 42,
        schema: "public".into(),
        table: "items".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![col("id", 20, true), col("v", 20, false)],
    }
}

/// Writes transactions to the log; each change sets `v` of a key to a growing number, so the
/// order a receiver sees per key is checkable.
struct Writer {
    log: Arc<EmbeddedLog>,
    lsn: u64,
    v: i64,
}

impl Writer {
    async fn txn(&mut self, keys: &[i64]) {
        self.lsn += 0x100;
        let r = relation();
        let lsn = Lsn(self.lsn);
        let now = synapse_schemas::unix_micros_now();
        let mut recs = vec![
            LogRecord::Begin(Begin { commit_lsn: lsn, xid: 7, commit_time_us: now, origin: None }),
            LogRecord::Relation(r.clone()),
        ];
        for (i, k) in keys.iter().enumerate() {
            self.v += 1;
            recs.push(LogRecord::Change(RowChange {
                index: i as u32 + 1,
                relation: r.key(),
                op: Op::Update,
                before: None,
                after: Some(vec![Datum::Text(k.to_string()), Datum::Text(self.v.to_string())].into()),
            }));
        }
        recs.push(LogRecord::Commit(Commit {
            commit_lsn: lsn,
            end_lsn: Lsn(self.lsn + 8),
            commit_time_us: now,
            event_count: keys.len() as u32,
        }));
        self.log.append(recs).await.unwrap();
    }

    /// `n` transactions of 1–3 changes over `keys` keys.
    async fn workload(&mut self, n: usize, keys: i64) -> usize {
        let mut events = 0;
        for _ in 0..n {
            let k: Vec<i64> =
                (0..1 + rand::random::<u32>() % 3).map(|_| rand::random::<i64>().rem_euclid(keys)).collect();
            events += k.len();
            self.txn(&k).await;
        }
        events
    }
}

fn open_log(dir: &std::path::Path) -> Arc<EmbeddedLog> {
    Arc::new(EmbeddedLog::open(&dir.join("a.redb"), Default::default()).unwrap())
}

fn source() -> SourceInfo {
    SourceInfo { node: "a".into(), database: "app".into() }
}

/// One request as a receiver saw it.
#[derive(Clone, Debug)]
struct Received {
    webhook_id: String,
    body: Vec<u8>,
    events: Vec<Value>,
    at: Instant,
}

/// What the receiver answers to the n-th attempt (0-based) of a webhook-id.
type Behaviour = Box<dyn Fn(&str, usize) -> Reply + Send + Sync>;

#[derive(Clone, Copy)]
enum Reply {
    Ok,
    Status(u16),
    RetryAfter(u16, u64),
    Hang(Duration),
    /// 200, then a body that never ends.
    Endless,
}

/// A real HTTP server that verifies signatures with the independent `standardwebhooks` crate.
struct Receiver {
    url: String,
    secret: String,
    got: Mutex<Vec<Received>>,
    attempts: Mutex<HashMap<String, usize>>,
    behaviour: Mutex<Behaviour>,
    bad_signatures: Mutex<usize>,
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Arc<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let me = Arc::new(Receiver {
            url,
            secret: Secret::generate(),
            got: Mutex::new(Vec::new()),
            attempts: Mutex::new(HashMap::new()),
            behaviour: Mutex::new(behaviour),
            bad_signatures: Mutex::new(0),
        });
        let r = me.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let r = r.clone();
                async move { r.handle(headers, body).await }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        me
    }

    fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    async fn handle(&self, headers: HeaderMap, body: axum::body::Bytes) -> axum::response::Response {
        let wh = standardwebhooks::Webhook::new(&self.secret).unwrap();
        if wh.verify(&body, &headers).is_err() {
            *self.bad_signatures.lock().unwrap() += 1;
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let id = headers["webhook-id"].to_str().unwrap().to_owned();
        let n = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(id.clone()).or_insert(0);
            *n += 1;
            *n - 1
        };
        let reply = (self.behaviour.lock().unwrap())(&id, n);
        match reply {
            Reply::Ok => {}
            Reply::Status(s) => return StatusCode::from_u16(s).unwrap().into_response(),
            Reply::RetryAfter(s, secs) => {
                return (StatusCode::from_u16(s).unwrap(), [("retry-after", secs.to_string())]).into_response()
            }
            Reply::Hang(d) => {
                tokio::time::sleep(d).await;
            }
            Reply::Endless => {}
        }
        let events = match serde_json::from_slice::<Value>(&body).unwrap() {
            Value::Array(a) => a,
            one => vec![one],
        };
        self.got.lock().unwrap().push(Received { webhook_id: id, body: body.to_vec(), events, at: Instant::now() });
        if matches!(reply, Reply::Endless) {
            let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
            let endless = futures_util::stream::repeat(Ok::<_, std::convert::Infallible>(chunk));
            return (StatusCode::OK, axum::body::Body::from_stream(endless)).into_response();
        }
        StatusCode::NO_CONTENT.into_response()
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    fn event_count(&self) -> usize {
        self.got.lock().unwrap().iter().map(|r| r.events.len()).sum()
    }
}

fn spec(name: &str, r: &Receiver, extra: Value) -> EndpointSpec {
    let mut v = json!({
        "name": name,
        "url": r.url,
        "secrets": [r.secret],
        "retry_schedule": ["0s", "20ms", "50ms", "100ms", "100ms", "200ms", "200ms", "200ms"],
        "timeout": "2s",
        "breaker_cooldown": "100ms",
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

async fn webhooks(
    log: &Arc<EmbeddedLog>,
    dir: &std::path::Path,
    specs: Vec<EndpointSpec>,
) -> (Arc<Webhooks<EmbeddedLog>>, watch::Sender<bool>) {
    let store = Store::open(&dir.join("connectors.redb")).unwrap();
    let (stop, rx) = watch::channel(false);
    let mut sources = BTreeMap::new();
    sources.insert("a".to_string(), WebhookSource { log: log.clone(), source: source() });
    let valid = specs.iter().map(|s| s.validate("test", &["a".to_string()]).unwrap()).collect();
    // The receivers of these tests are on loopback, which the egress policy refuses by default.
    let egress = Arc::new(synapse_connectors::webhook::egress::EgressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]));
    (Webhooks::start(sources, store, valid, egress, rx).await.unwrap(), stop)
}

/// Waits for `f`. Timeouts are generous on purpose: these tests check what happens, not how
/// fast (a busy CI machine once took over 10 s for three hung-then-retried deliveries).
async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_disabled(h: &Webhooks<EmbeddedLog>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.get(name).await.unwrap()["enabled"] != false {
        if Instant::now() > deadline {
            panic!(
                "410 did not disable endpoint {name}: {} {:?}",
                h.get(name).await.unwrap(),
                h.attempts(name).await.unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- the harness

/// A connector under test: something that delivers the log's events to a real client.
trait ConnectorUnderTest {
    /// Everything received so far, as (delivery id, event) in arrival order.
    fn deliveries(&self) -> Vec<(String, Value)>;
    /// Stops and restarts delivery (a process restart or a client reconnect).
    async fn restart(&mut self);
    /// Metric names the connector must have emitted.
    fn metrics(&self) -> Vec<&'static str>;
}

/// Acks, retries, ordering and metrics, the same for every connector.
async fn check_compliance(c: &mut impl ConnectorUnderTest, w: &mut Writer, keys: i64) {
    let first = w.workload(60, keys).await;
    eventually("first half delivered", Duration::from_secs(30), || distinct(&c.deliveries()) >= first).await;
    c.restart().await;
    let second = w.workload(60, keys).await;
    let total = first + second;
    eventually("everything delivered after the restart", Duration::from_secs(30), || {
        distinct(&c.deliveries()) >= total
    })
    .await;
    let got = c.deliveries();
    // At least once, none invented: exactly the log's events.
    assert_eq!(distinct(&got), total, "an event was lost or invented");
    // Duplicates (redeliveries) are byte-identical to the first delivery.
    let mut by_id: HashMap<String, &Value> = HashMap::new();
    for (_, e) in &got {
        let id = e["id"].as_str().unwrap().to_owned();
        if let Some(prev) = by_id.insert(id.clone(), e) {
            assert_eq!(prev, e, "redelivery of {id} differs");
        }
    }
    // Per-key order: the first delivery of each key's events follows commit order (v grows).
    let mut seen = std::collections::HashSet::new();
    let mut last_v: HashMap<i64, i64> = HashMap::new();
    for (_, e) in &got {
        if !seen.insert(e["id"].as_str().unwrap().to_owned()) {
            continue;
        }
        let (k, v) = (e["data"]["after"]["id"].as_i64().unwrap(), e["data"]["after"]["v"].as_i64().unwrap());
        if let Some(prev) = last_v.insert(k, v) {
            assert!(v > prev, "key {k}: v={v} arrived after v={prev}");
        }
    }
    // Every event is valid against the published schema.
    let schema: Value = serde_json::from_str(synapse_schemas::CHANGE_EVENT_SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for (_, e) in got.iter().take(50) {
        assert!(validator.is_valid(e), "{e}");
    }
    let text = metrics().render();
    for m in c.metrics() {
        assert!(text.contains(m), "metric {m} missing from:\n{text}");
    }
}

fn distinct(d: &[(String, Value)]) -> usize {
    d.iter()
        .map(|(_, e)| e["id"].as_str().unwrap_or_default().to_owned())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

struct WebhookUnderTest {
    log: Arc<EmbeddedLog>,
    dir: tempfile::TempDir,
    receiver: Arc<Receiver>,
    spec: EndpointSpec,
    hooks: Option<(Arc<Webhooks<EmbeddedLog>>, watch::Sender<bool>)>,
}

impl ConnectorUnderTest for WebhookUnderTest {
    fn deliveries(&self) -> Vec<(String, Value)> {
        self.receiver
            .received()
            .into_iter()
            .flat_map(|r| r.events.into_iter().map(move |e| (r.webhook_id.clone(), e)))
            .collect()
    }
    async fn restart(&mut self) {
        if let Some((h, stop)) = self.hooks.take() {
            let _ = stop.send(true);
            h.stop_all().await;
        }
        self.hooks = Some(webhooks(&self.log, self.dir.path(), vec![self.spec.clone()]).await);
    }
    fn metrics(&self) -> Vec<&'static str> {
        vec![
            "synapse_webhook_attempts_total{endpoint=\"compliance\",outcome=\"delivered\"}",
            "synapse_webhook_attempts_total{endpoint=\"compliance\",outcome=\"failed\"}",
            "synapse_webhook_delivery_latency_seconds",
            "synapse_webhook_pending{endpoint=\"compliance\"}",
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_connector_is_compliant() {
    metrics();
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    // Every third webhook-id fails twice (500, then 429 with Retry-After 0) before succeeding.
    let receiver = Receiver::start(Box::new(|id, n| {
        let h = id.bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
        match (h % 3, n) {
            (0, 0) => Reply::Status(500),
            (0, 1) => Reply::RetryAfter(429, 0),
            _ => Reply::Ok,
        }
    }))
    .await;
    let spec = spec("compliance", &receiver, json!({"breaker_threshold": 1000}));
    let mut c = WebhookUnderTest { log: log.clone(), dir, receiver: receiver.clone(), spec, hooks: None };
    c.restart().await;
    let mut w = Writer { log, lsn: 0x1000, v: 0 };
    check_compliance(&mut c, &mut w, 8).await;
    assert_eq!(*receiver.bad_signatures.lock().unwrap(), 0);
    // A retried request keeps its webhook-id: ids that failed were later accepted.
    let attempts = receiver.attempts.lock().unwrap().clone();
    assert!(attempts.values().any(|n| *n >= 3), "the failure injection never triggered");
    let accepted: std::collections::HashSet<String> = receiver.received().into_iter().map(|r| r.webhook_id).collect();
    for (id, n) in &attempts {
        if *n >= 3 {
            assert!(accepted.contains(id), "{id} was retried under another id");
        }
    }
}

struct StreamUnderTest {
    base: String,
    /// (event id, event) as a client that reconnects with Last-Event-ID saw them.
    got: Arc<Mutex<Vec<(String, Value)>>>,
    last_id: Arc<Mutex<Option<String>>>,
    client: Option<tokio::task::JoinHandle<()>>,
}

impl StreamUnderTest {
    fn connect(&mut self) {
        let (base, got, last) = (self.base.clone(), self.got.clone(), self.last_id.clone());
        self.client = Some(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut req = client
                .get(format!("{base}/v1/streams/a/changes?live=true&limit=7"))
                .header("accept", "text/event-stream");
            if let Some(id) = last.lock().unwrap().clone() {
                req = req.header("last-event-id", id);
            }
            let mut resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut buf = String::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    let mut id = None;
                    let mut data = None;
                    let mut kind = "message";
                    for line in frame.lines() {
                        if let Some(v) = line.strip_prefix("id: ") {
                            id = Some(v.to_owned());
                        } else if let Some(v) = line.strip_prefix("data: ") {
                            data = Some(v.to_owned());
                        } else if let Some(v) = line.strip_prefix("event: ") {
                            kind = if v == "change" { "change" } else { "other" };
                        }
                    }
                    if kind == "change" {
                        let e: Value = serde_json::from_str(&data.unwrap()).unwrap();
                        got.lock().unwrap().push((id.clone().unwrap(), e));
                    }
                    if let Some(id) = id {
                        *last.lock().unwrap() = Some(id);
                    }
                }
            }
        }));
    }
}

impl ConnectorUnderTest for StreamUnderTest {
    fn deliveries(&self) -> Vec<(String, Value)> {
        self.got.lock().unwrap().clone()
    }
    async fn restart(&mut self) {
        // The client drops the connection and resumes from the last id it processed.
        if let Some(c) = self.client.take() {
            c.abort();
            let _ = c.await;
        }
        self.connect();
    }
    fn metrics(&self) -> Vec<&'static str> {
        vec!["synapse_stream_events_total{stream=\"a\"}", "synapse_stream_requests_total{stream=\"a\",mode=\"sse\"}"]
    }
}

async fn serve_api(api: Api<EmbeddedLog>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = synapse_connectors::api::router(Arc::new(api));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

fn api(log: &Arc<EmbeddedLog>, tokens: Vec<Token>) -> Api<EmbeddedLog> {
    let mut streams = BTreeMap::new();
    streams.insert("a".to_string(), StreamSource { log: log.clone(), source: source(), snapshot_source: None });
    // Never shut down: the test runtime ends with the test.
    let (stop, shutdown) = watch::channel(false);
    std::mem::forget(stop);
    let live_slots = Arc::new(tokio::sync::Semaphore::new(synapse_connectors::api::DEFAULT_MAX_STREAMS));
    Api { streams, auth: Arc::new(Auth::new(tokens)), audit: None, webhooks: None, shutdown, live_slots }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_connector_is_compliant() {
    metrics();
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let base = serve_api(api(&log, vec![])).await;
    let mut c = StreamUnderTest { base, got: Default::default(), last_id: Default::default(), client: None };
    c.connect();
    let mut w = Writer { log, lsn: 0x1000, v: 0 };
    check_compliance(&mut c, &mut w, 8).await;
    // Resuming with Last-Event-ID neither skips nor repeats: ids are unique.
    let got = c.deliveries();
    assert_eq!(distinct(&got), got.len(), "the SSE resume repeated an event");
}

// ---------------------------------------------------------------- webhook behaviours

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_does_not_slow_another() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let slow = Receiver::start(Box::new(|_, _| Reply::Hang(Duration::from_secs(2)))).await;
    let fast = Receiver::start(Box::new(|_, _| Reply::Ok)).await;
    let dead = Receiver::start(Box::new(|_, _| Reply::Status(503))).await;
    let (_h, _stop) = webhooks(
        &log,
        dir.path(),
        vec![
            spec("slow", &slow, json!({"ordering": "fifo"})),
            spec("fast", &fast, json!({})),
            spec("dead", &dead, json!({"breaker_threshold": 3})),
        ],
    )
    .await;
    let mut w = Writer { log, lsn: 0x1000, v: 0 };
    let n = w.workload(100, 50).await;
    // The slow endpoint needs 2 s per request, one at a time (fifo): minutes for all of it.
    eventually("fast endpoint got everything", Duration::from_secs(30), || fast.event_count() >= n).await;
    assert!(slow.event_count() < n / 10, "the fast endpoint waited for the slow one");
    // The dead endpoint's breaker opened: far fewer attempts than events × retries.
    let attempts: usize = dead.attempts.lock().unwrap().values().sum();
    assert!(attempts < n, "breaker did not hold back requests: {attempts} attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_dead_letters_replay_and_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let r = Receiver::start(Box::new(|_, _| Reply::Status(410))).await;
    let (h, _stop) = webhooks(&log, dir.path(), vec![]).await;
    // Created through the API path (put), as /v1/endpoints does.
    let (view, _) = h.put(spec("ep", &r, json!({"retry_schedule": ["0s", "10ms", "10ms"]})), true).await.unwrap();
    assert_eq!(view["enabled"], true);
    let mut w = Writer { log: log.clone(), lsn: 0x1000, v: 0 };
    w.txn(&[1]).await;
    wait_disabled(&h, "ep").await;
    let v = h.get("ep").await.unwrap();
    assert!(v["disabled"]["reason"].as_str().unwrap().contains("410"), "{v}");
    w.txn(&[2]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.attempts.lock().unwrap().len(), 1, "a disabled endpoint gets no requests");
    assert_eq!(log.consumer_position("webhook:ep").await.unwrap(), None, "a disabled endpoint does not pin the log");

    // Re-enabled against a receiver that now fails with 500: both events run out of retries
    // and are dead-lettered; delivery goes on.
    r.set(Box::new(|_, _| Reply::Status(500)));
    h.enable("ep").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.dead_letters("ep", 10).await.unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "retries exhausted but nothing dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut dead = h.dead_letters("ep", 10).await.unwrap();
    dead.sort_by(|a, b| a.cursor.cmp(&b.cursor));
    assert_eq!(dead[0].cursor, "0/1100/1");
    assert_eq!(dead[1].cursor, "0/1200/1");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_status, Some(500));
    assert_eq!(dead[0].event["data"]["after"]["id"], 1);
    let attempts = h.attempts("ep").await.unwrap();
    assert!(attempts.iter().any(|a| a.status == Some(500) && a.outcome == "failed"));

    // The receiver is fixed; a replay from before the first event redelivers both.
    r.set(Box::new(|_, _| Reply::Ok));
    h.replay("ep", ReplayFrom { cursor: Some("0/1100/0".into()), source: None, since: None }).await.unwrap();
    eventually("replayed", Duration::from_secs(30), || r.event_count() == 2).await;
    // Replaying from a time works too (everything since the epoch).
    h.replay("ep", ReplayFrom { cursor: None, source: None, since: Some("1970-01-01T00:00:00Z".into()) })
        .await
        .unwrap();
    eventually("replayed by time", Duration::from_secs(30), || r.event_count() == 4).await;
    let bad = h.replay("ep", ReplayFrom { cursor: Some("nope".into()), source: None, since: None }).await.unwrap_err();
    assert_eq!(bad.http_status(), 400);

    // Deleting releases the log: the endpoint no longer holds retention.
    h.delete("ep").await.unwrap();
    assert_eq!(log.consumer_position("webhook:ep").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried_with_the_same_id_and_removed_endpoints_release_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    // The first attempt of every request hangs past the endpoint's 300 ms timeout.
    let r =
        Receiver::start(Box::new(|_, n| if n == 0 { Reply::Hang(Duration::from_secs(2)) } else { Reply::Ok })).await;
    let (h, stop) = webhooks(&log, dir.path(), vec![spec("slowpoke", &r, json!({"timeout": "300ms"}))]).await;
    let mut w = Writer { log: log.clone(), lsn: 0x1000, v: 0 };
    w.txn(&[1, 2, 3]).await;
    eventually("delivered after the timeouts", Duration::from_secs(30), || r.event_count() >= 3).await;
    let attempts = h.attempts("slowpoke").await.unwrap();
    assert!(
        attempts.iter().any(|a| a.outcome == "error" && a.error.as_deref().unwrap_or("").contains("timed out")),
        "{attempts:?}"
    );
    for a in attempts.iter().filter(|a| a.outcome == "delivered") {
        assert_eq!(r.attempts.lock().unwrap()[&a.webhook_id], 2, "{} was not retried under its id", a.webhook_id);
    }
    assert!(log.consumer_position("webhook:slowpoke").await.unwrap().is_some());
    // Restart without the endpoint in the config: its log consumer is released.
    let _ = stop.send(true);
    h.stop_all().await;
    drop(h);
    let (_h, _stop) = webhooks(&log, dir.path(), vec![]).await;
    assert_eq!(log.consumer_position("webhook:slowpoke").await.unwrap(), None);
}

/// A receiver that answers 200 with a body that never ends: the delivery counts (its status
/// is what matters), the answer is read only so far, and nothing waits for its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_is_not_read_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let r = Receiver::start(Box::new(|_, _| Reply::Endless)).await;
    let (h, _stop) = webhooks(&log, dir.path(), vec![spec("chatty", &r, json!({"timeout": "5s"}))]).await;
    let mut w = Writer { log: log.clone(), lsn: 0x1000, v: 0 };
    w.txn(&[1, 2, 3]).await;
    let started = Instant::now();
    eventually("three deliveries", Duration::from_secs(30), || r.event_count() >= 3).await;
    let mut delivered = 0;
    while delivered < 3 {
        let attempts = h.attempts("chatty").await.unwrap();
        assert!(attempts.iter().all(|a| a.outcome == "delivered"), "{attempts:?}");
        delivered = attempts.len();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(started.elapsed() < Duration::from_secs(4), "deliveries waited for the endless answers");
    }
    assert_eq!(r.attempts.lock().unwrap().values().copied().collect::<Vec<_>>(), [1, 1, 1], "each delivered once");
}

/// Large rows: a JSON lines answer ends with `more` once its events pass 16 MiB, whatever the
/// `limit`; following the cursor reads the rest, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lines_answer_is_bounded_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let r = relation();
    let big = "x".repeat(200 << 10);
    for t in 0..150u64 {
        let lsn = Lsn(0x1000 + t * 0x100);
        log.append(vec![
            LogRecord::Begin(Begin { commit_lsn: lsn, xid: 7, commit_time_us: 1, origin: None }),
            LogRecord::Relation(r.clone()),
            LogRecord::Change(RowChange {
                index: 1,
                relation: r.key(),
                op: Op::Insert,
                before: None,
                after: Some(vec![Datum::Text(t.to_string()), Datum::Text(big.clone())].into()),
            }),
            LogRecord::Commit(Commit { commit_lsn: lsn, end_lsn: Lsn(lsn.0 + 8), commit_time_us: 1, event_count: 1 }),
        ])
        .await
        .unwrap();
    }
    let base = serve_api(api(&log, vec![])).await;
    let (mut cursor, mut seen, mut answers) = (String::new(), 0, 0);
    loop {
        let text = reqwest::get(format!("{base}/v1/streams/a/changes?limit=10000&cursor={cursor}"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        answers += 1;
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let (control, events) = lines.split_last().unwrap();
        assert!(text.len() < (16 << 20) + (1 << 20), "an answer of {} bytes", text.len());
        seen += events.len();
        cursor = control["cursor"].as_str().unwrap().to_owned();
        if control["control"] == "up-to-date" {
            break;
        }
        assert_eq!(control["control"], "more");
    }
    assert_eq!(seen, 150);
    assert!(answers >= 2, "30 MB of events came in one answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_opens_its_breaker_and_keeps_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    // Nothing listens on this port: every attempt is a refused connection.
    let port = synapse_localpg::free_port().unwrap();
    let spec: EndpointSpec = serde_json::from_value(json!({
        "name": "nowhere", "url": format!("http://127.0.0.1:{port}/hook"),
        "secrets": [Secret::generate()], "retry_schedule": ["0s", "10ms", "10ms", "1h"],
        "breaker_threshold": 3, "breaker_cooldown": "1h",
    }))
    .unwrap();
    let (h, _stop) = webhooks(&log, dir.path(), vec![spec]).await;
    let mut w = Writer { log: log.clone(), lsn: 0x1000, v: 0 };
    for k in 0..20 {
        w.txn(&[k]).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = h.get("nowhere").await.unwrap();
        if v["status"]["breaker"] == "open" {
            break;
        }
        assert!(Instant::now() < deadline, "breaker never opened: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = h.attempts("nowhere").await.unwrap();
    assert!(attempts.iter().all(|a| a.outcome == "error" && a.error.as_deref().unwrap_or("").contains("connection")));
    let n = attempts.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.attempts("nowhere").await.unwrap().len(), n, "an open breaker sends nothing");
    // The status is refreshed by the dispatcher's loop: poll it rather than race the last append.
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = h.get("nowhere").await.unwrap();
        if v["status"]["pending"].as_u64().unwrap_or(0) >= 20 || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(v["status"]["delivered"], 0);
    assert_eq!(v["status"]["dead_lettered"], 0, "the breaker holds events back; it does not burn their retries");
    assert!(v["status"]["pending"].as_u64().unwrap() >= 20, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_endpoint_releases_the_log_and_enable_refuses_a_lost_position() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let r = Receiver::start(Box::new(|_, _| Reply::Status(410))).await;
    let (h, _stop) = webhooks(&log, dir.path(), vec![]).await;
    h.put(spec("ep", &r, json!({})), true).await.unwrap();
    let mut w = Writer { log: log.clone(), lsn: 0x1000, v: 0 };
    w.txn(&[1]).await;
    wait_disabled(&h, "ep").await;
    // Other consumers move on; retention deletes what the disabled endpoint had not delivered.
    for k in 2..6 {
        w.txn(&[k]).await;
    }
    log.commit_consumer("apply", log.next_offset()).await.unwrap();
    assert!(log.apply_retention(None).await.unwrap() > 0);
    let e = h.enable("ep").await.unwrap_err();
    assert_eq!(e.http_status(), 410, "{e}");
    assert_eq!(h.get("ep").await.unwrap()["enabled"], false, "a refused enable changes nothing");
    // The operator picks where to resume, then enables.
    let head = log.head_cursor().await.unwrap().unwrap().to_string();
    r.set(Box::new(|_, _| Reply::Ok));
    h.replay("ep", ReplayFrom { cursor: Some(head), source: None, since: None }).await.unwrap();
    h.enable("ep").await.unwrap();
    w.txn(&[7]).await;
    eventually("delivery after re-enabling", Duration::from_secs(30), || r.event_count() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_fifo_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let r = Receiver::start(Box::new(|_, n| {
        if n == 0 && rand::random::<u8>().is_multiple_of(4) {
            Reply::Status(502)
        } else {
            Reply::Ok
        }
    }))
    .await;
    let (_h, _stop) =
        webhooks(&log, dir.path(), vec![spec("b", &r, json!({"ordering": "fifo", "batch_size": 25}))]).await;
    let mut w = Writer { log, lsn: 0x1000, v: 0 };
    let n = w.workload(200, 5).await;
    eventually("all delivered", Duration::from_secs(20), || r.event_count() >= n).await;
    let got = r.received();
    assert!(got.iter().any(|g| g.events.len() > 1), "no request carried a batch");
    // FIFO: requests arrive in cursor order, each batch's id names its range.
    let mut last = String::new();
    for g in &got {
        let first = g.events[0]["id"].as_str().unwrap().to_owned();
        assert!(g.webhook_id.starts_with(&first), "{} vs {first}", g.webhook_id);
        let c: synapse_schemas::Cursor = g.events[0]["synapsecursor"].as_str().unwrap().parse().unwrap();
        if !last.is_empty() {
            assert!(c > last.parse().unwrap(), "fifo order broken");
        }
        last = g.events.last().unwrap()["synapsecursor"].as_str().unwrap().to_owned();
        assert!(g.at.elapsed() < Duration::from_secs(60));
        assert!(!g.body.is_empty());
    }
}

// ---------------------------------------------------------------- the stream API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_api_lines_paging_gone_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let admin = "admin-token-0123456789abcdef".to_string();
    let reader = "reader-token-0123456789abcdef".to_string();
    let base = serve_api(api(
        &log,
        vec![
            Token::new("admin", &admin, vec![], vec![Scope::Admin]),
            Token::new("reader", &reader, vec!["public.items".into()], vec![Scope::Stream]),
        ],
    ))
    .await;
    let http = reqwest::Client::new();
    let get = |path: &str, token: &str| http.get(format!("{base}{path}")).bearer_auth(token).send();

    // Subscribe before writing: the returned cursor sees every later write.
    let sub: Value = get("/v1/streams/a", &reader).await.unwrap().json().await.unwrap();
    assert!(sub["cursor"].is_null(), "empty log: {sub}");
    let mut w = Writer { log: log.clone(), lsn: 0x1000, v: 0 };
    let n = w.workload(40, 10).await;

    // Page through with limit=7 following the control line's cursor.
    let mut cursor = String::new();
    let mut seen = Vec::new();
    loop {
        let resp = get(&format!("/v1/streams/a/changes?limit=7&cursor={cursor}"), &reader).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        let text = resp.text().await.unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let (control, events) = lines.split_last().unwrap();
        seen.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        cursor = control["cursor"].as_str().unwrap().to_owned();
        if control["control"] == "up-to-date" {
            break;
        }
    }
    assert_eq!(seen.len(), n);
    assert_eq!(seen.iter().collect::<std::collections::HashSet<_>>().len(), n, "a page repeated an event");

    // Long-poll: a live request waits for the next commit.
    let waiter = {
        let (http, base, reader, cursor) = (http.clone(), base.clone(), reader.clone(), cursor.clone());
        tokio::spawn(async move {
            http.get(format!("{base}/v1/streams/a/changes?live=true&timeout_ms=10000&cursor={cursor}"))
                .bearer_auth(reader)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.txn(&[99]).await;
    let text = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    assert!(text.contains("\"id\":99"), "{text}");

    // Auth: none, wrong, out of scope.
    let r = http.get(format!("{base}/v1/streams/a/changes")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "CON004");
    assert_eq!(get("/v1/streams/a/changes", "wrong-token-0123456789abc").await.unwrap().status(), 401);
    let r = get("/v1/streams/a/changes?tables=public.secret", &reader).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("public.secret"));

    // Bad input names the parameter.
    for (q, field) in [
        ("cursor=zzz", "cursor"),
        ("limit=0", "limit"),
        ("operations=upsert", "operations"),
        ("filter=v%20%3E", "filter"),
        ("tables=items", "tables"),
        ("bogus=1", "query"),
    ] {
        let r = get(&format!("/v1/streams/a/changes?{q}"), &admin).await.unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains(field), "{q}: {body}");
    }
    assert_eq!(get("/v1/streams/nope/changes", &admin).await.unwrap().status(), 404);
    let r = http
        .get(format!("{base}/v1/streams/a/changes"))
        .bearer_auth(&admin)
        .header("accept", "text/event-stream")
        .header("last-event-id", "not-a-cursor")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("Last-Event-ID"));

    // Retention passes an old cursor: 410 with the oldest cursor still served.
    log.commit_consumer("apply", log.next_offset()).await.unwrap();
    w.txn(&[1]).await;
    assert!(log.apply_retention(None).await.unwrap() > 0);
    let r = get("/v1/streams/a/changes?cursor=0/1100/1", &admin).await.unwrap();
    assert_eq!(r.status(), 410);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "CON001");
    assert!(body["error"]["oldest_cursor"].is_string(), "{body}");
    assert!(body["error"]["hint"].as_str().unwrap().contains("snapshot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_rest_api() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path());
    let r = Receiver::start(Box::new(|_, _| Reply::Ok)).await;
    let (hooks, _stop) = webhooks(&log, dir.path(), vec![spec("from-config", &r, json!({}))]).await;
    let mut a = api(&log, vec![]);
    a.webhooks = Some(hooks);
    let base = serve_api(a).await;
    let http = reqwest::Client::new();

    // Create without a secret: one is generated and shown once, never again.
    let created =
        http.post(format!("{base}/v1/endpoints")).json(&json!({"name": "gen", "url": r.url})).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let body: Value = created.json().await.unwrap();
    let secret = body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let shown = http.get(format!("{base}/v1/endpoints/gen")).send().await.unwrap().text().await.unwrap();
    assert!(!shown.contains(&secret[6..30]), "{shown}");
    assert_eq!(http.delete(format!("{base}/v1/endpoints/gen")).send().await.unwrap().status(), 200);
    let created = http
        .post(format!("{base}/v1/endpoints"))
        .json(&json!({"name": "api-made", "url": r.url, "secrets": [r.secret], "tables": ["public.items"], "filter": "v > 0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let again = http
        .post(format!("{base}/v1/endpoints"))
        .json(&json!({"name": "api-made", "url": r.url}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let bad =
        http.post(format!("{base}/v1/endpoints")).json(&json!({"name": "x", "url": "ftp://h"})).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("endpoint.url"));
    let bad = http
        .post(format!("{base}/v1/endpoints"))
        .json(&json!({"name": "x", "url": r.url, "batch": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400, "unknown fields are rejected");
    let del = http.delete(format!("{base}/v1/endpoints/from-config")).send().await.unwrap();
    assert_eq!(del.status(), 403, "config endpoints are managed in the file");
    let list: Value = http.get(format!("{base}/v1/endpoints")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["endpoints"].as_array().unwrap().len(), 2);

    let mut w = Writer { log, lsn: 0x1000, v: 0 };
    w.txn(&[5]).await;
    // Both endpoints deliver it.
    eventually("both delivered", Duration::from_secs(30), || r.event_count() == 2).await;
    // The receiver counts a request before the dispatcher has read its answer: poll the status.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let one: Value = http.get(format!("{base}/v1/endpoints/api-made")).send().await.unwrap().json().await.unwrap();
        if one["status"]["delivered"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{one}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let att: Value =
        http.get(format!("{base}/v1/endpoints/api-made/attempts")).send().await.unwrap().json().await.unwrap();
    assert_eq!(att["attempts"][0]["status"], 204);
    assert_eq!(http.delete(format!("{base}/v1/endpoints/api-made")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{base}/v1/endpoints/api-made")).send().await.unwrap().status(), 404);
}
