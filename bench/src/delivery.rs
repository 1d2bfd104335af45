//! P6 of `synapse-bench`: delivering the stream to a local webhook receiver.
//!
//! * Throughput: a source's workload (`--p6-events` rows in 1,000-row transactions over 1,000
//!   keys) is captured into the log first; then an endpoint delivers it from the start of the
//!   log, batched (100 events per request) and per-key ordered (one event per request, one in
//!   flight per key). Baseline: a plain HTTP client POSTing the same pre-rendered bodies with
//!   the same batch size and concurrency, unsigned and unordered — the ceiling of the receiver
//!   and the HTTP stack on this machine.
//! * Latency: commit → delivery p50/p99 while the source commits ~5,000 events/s (500
//!   transactions/s of 10 rows), measured at the receiver from each event's commit time.
//!   Baseline: PostgreSQL's own decoding latency, commit → `COMMIT` line of `pg_recvlogical`
//!   (test_decoding, include-timestamp) on the same workload at the same time.

use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synapse_connectors::feed::{ChangeFeed, Selector, SourceInfo};
use synapse_connectors::webhook::signing::Secret;
use synapse_connectors::webhook::store::Store;
use synapse_connectors::webhook::{EndpointSpec, WebhookSource, Webhooks};
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_log::EmbeddedLog;
use synapse_runtime::config::{ApiConfig, Config, LogConfig, OpsConfig, SecretUrl, SourceConfig};
use synapse_runtime::ops::Health;
use tokio::sync::watch;

/// Events delivered per request in the batched run.
const BATCH: usize = 100;
/// Requests in flight, for synapse and the baseline alike.
const IN_FLIGHT: usize = 16;

/// What the receiver saw.
#[derive(Default)]
struct Received {
    events: AtomicU64,
    /// Commit → receipt, µs, once `record` is set.
    latencies: Mutex<Vec<i64>>,
    record: std::sync::atomic::AtomicBool,
}

async fn receiver() -> anyhow::Result<(String, Arc<Received>)> {
    let r = Arc::new(Received::default());
    let s = r.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let s = s.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let events = match &v {
                    serde_json::Value::Array(a) => a.iter().collect::<Vec<_>>(),
                    one => vec![one],
                };
                s.events.fetch_add(events.len() as u64, Ordering::Relaxed);
                if s.record.load(Ordering::Relaxed) {
                    let now = synapse_schemas::unix_micros_now();
                    let mut l = s.latencies.lock().unwrap_or_else(|p| p.into_inner());
                    for e in events {
                        if let Some(t) = e["time"].as_str().and_then(parse_time_us) {
                            l.push(now - t);
                        }
                    }
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, r))
}

/// `2026-11-26T14:03:48.123456Z` or PostgreSQL's `2026-11-26 14:03:48.123456+00` → µs.
fn parse_time_us(s: &str) -> Option<i64> {
    let s = s.trim().trim_end_matches("+00").trim_end_matches('Z').replace(' ', "T");
    let t = humantime::parse_rfc3339_weak(&s).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as i64)
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn config(src: &LocalCluster, dir: &std::path::Path) -> Config {
    Config {
        log: LogConfig { dir: dir.to_owned(), ..Default::default() },
        sources: vec![SourceConfig {
            tables: vec!["public.ev".into()],
            heartbeat_interval_secs: 1.0,
            receive_timeout_secs: 60.0,
            ..SourceConfig::new("a", SecretUrl::new(src.url("bench")))
        }],
        targets: vec![],
        ops: OpsConfig { listen: String::new(), tls: None },
        api: ApiConfig { listen: String::new(), ..Default::default() },
        webhooks: vec![],
        egress: Default::default(),
        mesh: None,
        // A benchmark stops on a definite error rather than wait for a fix.
        vector_indexes: Vec::new(),
        supervision: synapse_runtime::config::SupervisionConfig { exit_on_park: true, ..Default::default() },
    }
}

fn endpoint(url: &str, secret: &str, batch: usize) -> anyhow::Result<EndpointSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "name": "p6", "url": url, "secrets": [secret], "ordering": "key",
        "batch_size": batch, "max_in_flight": IN_FLIGHT,
    }))?)
}

/// Delivers the whole log to the receiver; returns events/s.
async fn drain(
    log: &Arc<EmbeddedLog>,
    dir: &std::path::Path,
    spec: EndpointSpec,
    rx: &Received,
    n: u64,
) -> anyhow::Result<f64> {
    let store = Store::open(&dir.join(format!("connectors-{}.redb", spec.batch_size)))?;
    store.set_position("p6", "a", None).await?; // from the start of the log
    let mut sources = BTreeMap::new();
    sources.insert("a".to_string(), WebhookSource { log: log.clone(), source: info() });
    let valid = spec.validate("p6", &["a".to_string()])?;
    let before = rx.events.load(Ordering::Relaxed);
    let (stop, sd) = watch::channel(false);
    let started = Instant::now();
    // The receiver is on loopback, which the egress policy refuses by default.
    let egress = Arc::new(synapse_connectors::webhook::egress::EgressPolicy::new(vec!["127.0.0.0/8".parse()?]));
    let hooks = Webhooks::start(sources, store, vec![valid], egress, sd).await?;
    while rx.events.load(Ordering::Relaxed) - before < n {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "P6 delivery did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    hooks.stop_all().await;
    Ok(n as f64 / secs)
}

fn info() -> SourceInfo {
    SourceInfo { node: "a".into(), database: "bench".into() }
}

/// The baseline: the same bodies POSTed by a plain client, same batch and concurrency.
async fn plain_http(url: &str, bodies: &[bytes::Bytes], batch: usize, rx: &Received) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let requests: Vec<Vec<u8>> = bodies
        .chunks(batch)
        .map(|c| {
            if c.len() == 1 {
                return c[0].to_vec();
            }
            let mut b = vec![b'['];
            for (i, e) in c.iter().enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                b.extend_from_slice(e);
            }
            b.push(b']');
            b
        })
        .collect();
    let before = rx.events.load(Ordering::Relaxed);
    let started = Instant::now();
    let results: Vec<Result<reqwest::Response, reqwest::Error>> = futures_util::stream::iter(requests)
        .map(|body| client.post(url).header("content-type", "application/json").body(body).send())
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(results.iter().all(|r| r.as_ref().is_ok_and(|r| r.status().is_success())), "baseline POSTs failed");
    anyhow::ensure!(rx.events.load(Ordering::Relaxed) - before == bodies.len() as u64, "baseline lost events");
    Ok(bodies.len() as f64 / secs)
}

/// Commits ~`per_sec` events/s (10-row transactions) for `secs` seconds.
async fn paced_workload(url: String, per_sec: u64, secs: u64) -> anyhow::Result<()> {
    let c = synapse_postgres::connect_str(&url, "workload").await?;
    let txns_per_sec = per_sec / 10;
    let mut next = 10_000_000i64;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / txns_per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..txns_per_sec * secs {
        tick.tick().await;
        c.execute(
            "INSERT INTO ev SELECT g, g % 1000, md5(g::text) FROM generate_series($1::int8, $1::int8 + 9) g",
            &[&next],
        )
        .await?;
        next += 10;
    }
    let took = started.elapsed().as_secs_f64();
    anyhow::ensure!(took < secs as f64 * 1.5, "the source could not sustain {per_sec} events/s ({took:.1} s)");
    Ok(())
}

pub struct P6 {
    pub batched: (f64, f64),
    pub keyed: (f64, f64),
    /// (synapse p50, p99, baseline p50, p99) in ms.
    pub latency: (f64, f64, f64, f64),
    pub events: u64,
}

pub async fn run(events: u64) -> anyhow::Result<P6> {
    let src = LocalCluster::start(ClusterOptions::default())?;
    src.create_database("bench")?;
    src.psql("bench", "CREATE TABLE ev (id bigint PRIMARY KEY, k int NOT NULL, pad text NOT NULL);")?;
    let work = tempfile::tempdir()?;
    let cfg = config(&src, &work.path().join("log"));

    // 1. Capture the workload into the log.
    eprintln!("P6: capturing {events} events into the log");
    let (stop, sd) = watch::channel(false);
    let running = synapse_runtime::pipeline::start(
        &cfg,
        Arc::new(Health::new(synapse_runtime::ops::Supervision { exit_on_park: true, ..Default::default() })),
        sd,
    )
    .await?;
    let stats = running.captures[0].1.clone();
    let waiter = tokio::spawn({
        let stop = stop.clone();
        async move { synapse_runtime::pipeline::wait(running, &stop).await }
    });
    src.psql(
        "bench",
        &format!(
            "DO $$ BEGIN FOR t IN 0..{} LOOP
               INSERT INTO ev SELECT g, g % 1000, md5(g::text) FROM generate_series(t * 1000 + 1, t * 1000 + 1000) g;
               COMMIT;
             END LOOP; END $$",
            events / 1000 - 1
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while stats.events.load(Ordering::Relaxed) < events {
        anyhow::ensure!(Instant::now() < deadline, "capture did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    waiter.await??;

    // 2. Deliver it: synapse, then the plain client, same receiver.
    let log = Arc::new(EmbeddedLog::open(&cfg.log.dir.join("a.redb"), Default::default())?);
    let (url, rx) = receiver().await?;
    let secret = Secret::generate();
    let mut feed = ChangeFeed::open(log.clone(), info(), None, Selector::default()).await?;
    let mut bodies = Vec::with_capacity(events as usize);
    loop {
        let b = feed.next_batch(10_000, Duration::ZERO).await?;
        if b.events.is_empty() {
            break;
        }
        bodies.extend(b.events.into_iter().map(|e| e.body));
    }
    anyhow::ensure!(bodies.len() as u64 == events, "the log holds {} events, expected {events}", bodies.len());
    eprintln!("P6: delivering {events} events, batched ({BATCH} per request) and per key (1 per request)");
    let syn_batched = drain(&log, work.path(), endpoint(&url, &secret, BATCH)?, &rx, events).await?;
    let base_batched = plain_http(&url, &bodies, BATCH, &rx).await?;
    // Per-key ordered: a fifth of the workload keeps the run short at ~10k/s.
    let keyed_n = events / 5;
    let syn_keyed = drain_prefix(&log, work.path(), &url, &secret, &rx, keyed_n).await?;
    let base_keyed = plain_http(&url, &bodies[..keyed_n as usize], 1, &rx).await?;
    // The live run below opens the log in the pipeline: release it here.
    drop(feed);
    drop(log);

    // 3. Latency at ~5k events/s: synapse live (capture + delivery) and pg_recvlogical side by side.
    eprintln!("P6: commit → delivery latency at 5,000 events/s for 10 s");
    let mut cfg = cfg;
    cfg.webhooks.push(endpoint(&url, &secret, BATCH)?);
    src.psql("bench", "SELECT pg_create_logical_replication_slot('p6_td', 'test_decoding')")?;
    let mut recv = std::process::Command::new(src.bindir().join("pg_recvlogical"))
        .args([
            "-d",
            &src.url("bench"),
            "--slot",
            "p6_td",
            "--start",
            "-o",
            "include-timestamp=1",
            "-F",
            "0",
            "-f",
            "-",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let out = recv.stdout.take().ok_or_else(|| anyhow::anyhow!("pg_recvlogical has no stdout"))?;
    let base_lat = Arc::new(Mutex::new(Vec::new()));
    let bl = base_lat.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // COMMIT 123 (at 2026-11-26 17:20:01.123456+00)
            if let Some(at) =
                line.strip_prefix("COMMIT ").and_then(|l| l.split_once("(at ")).map(|(_, t)| t.trim_end_matches(')'))
            {
                if let Some(t) = parse_time_us(at) {
                    bl.lock().unwrap_or_else(|p| p.into_inner()).push(synapse_schemas::unix_micros_now() - t);
                }
            }
        }
    });
    let (stop, sd) = watch::channel(false);
    let running = synapse_runtime::pipeline::start(
        &cfg,
        Arc::new(Health::new(synapse_runtime::ops::Supervision { exit_on_park: true, ..Default::default() })),
        sd,
    )
    .await?;
    let waiter = tokio::spawn({
        let stop = stop.clone();
        async move { synapse_runtime::pipeline::wait(running, &stop).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    rx.latencies.lock().unwrap_or_else(|p| p.into_inner()).clear();
    base_lat.lock().unwrap_or_else(|p| p.into_inner()).clear();
    rx.record.store(true, Ordering::Relaxed);
    paced_workload(src.url("bench"), 5_000, 10).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rx.record.store(false, Ordering::Relaxed);
    let _ = stop.send(true);
    waiter.await??;
    let _ = recv.kill();
    let _ = recv.wait();
    let _ = reader.join();
    let mut s = std::mem::take(&mut *rx.latencies.lock().unwrap_or_else(|p| p.into_inner()));
    let mut b = std::mem::take(&mut *base_lat.lock().unwrap_or_else(|p| p.into_inner()));
    s.sort_unstable();
    b.sort_unstable();
    anyhow::ensure!(s.len() >= 40_000, "only {} events were delivered during the latency run", s.len());
    Ok(P6 {
        batched: (syn_batched, base_batched),
        keyed: (syn_keyed, base_keyed),
        latency: (percentile(&s, 0.5), percentile(&s, 0.99), percentile(&b, 0.5), percentile(&b, 0.99)),
        events,
    })
}

/// Per-key ordered delivery of the first `n` events: an endpoint limited to them through a
/// row filter on the workload's ids.
async fn drain_prefix(
    log: &Arc<EmbeddedLog>,
    dir: &std::path::Path,
    url: &str,
    secret: &str,
    rx: &Received,
    n: u64,
) -> anyhow::Result<f64> {
    let mut spec = endpoint(url, secret, 1)?;
    spec.filter = Some(format!("id <= {n}").parse().map_err(anyhow::Error::msg)?);
    drain(log, dir, spec, rx, n).await
}
