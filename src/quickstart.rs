//! `synapse quickstart`: live replication in one command.
//!
//! Without arguments it starts two local PostgreSQL nodes from the installed server binaries,
//! creates a demo schema with a running workload on node A, and replicates A → B, printing
//! progress until Ctrl-C; then it stops the workload, waits for B to catch up and proves A = B.
//! With `--source URL --target URL` it replicates every table of the source that has a primary
//! key or replica identity; a rerun with the same `--data-dir` resumes instead of copying again.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_connectors::webhook::receiver::VerifyingReceiver;
use synapse_connectors::webhook::signing::Secret;
use synapse_connectors::webhook::EndpointSpec;
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_runtime::config::{ApiConfig, Config, LogConfig, OpsConfig, SecretUrl, SourceConfig, TargetConfig};
use synapse_runtime::ops::Health;
use synapse_runtime::pipeline;
use tokio::sync::watch;

pub struct Options {
    pub source: Option<String>,
    pub target: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub duration: Option<Duration>,
    pub ops_listen: String,
    pub api_listen: String,
}

const DEMO_SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(14,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE transfers (id bigserial PRIMARY KEY, from_id bigint NOT NULL, to_id bigint NOT NULL, amount numeric(14,2) NOT NULL, at timestamptz NOT NULL DEFAULT now());
INSERT INTO accounts SELECT g, 'owner ' || g, 1000, now() FROM generate_series(1, 10000) g;
INSERT INTO transfers (from_id, to_id, amount) SELECT g, g + 1, 1 FROM generate_series(1, 5000) g;";

/// Moves money between random accounts, one small transaction at a time.
async fn workload(url: String, mut stop: watch::Receiver<bool>) -> anyhow::Result<u64> {
    let client = synapse_postgres::connect_str(&url, "workload").await?;
    let stmt = client
        .prepare(
            "WITH t AS (INSERT INTO transfers (from_id, to_id, amount) VALUES ($1, $2, $3::float8::numeric(14,2)) RETURNING from_id, to_id, amount)
             UPDATE accounts a SET balance = balance + CASE WHEN a.id = t.to_id THEN t.amount ELSE -t.amount END, updated_at = now()
             FROM t WHERE a.id IN (t.from_id, t.to_id)",
        )
        .await?;
    let mut n = 0u64;
    while !*stop.borrow() {
        let from = (rand::random::<u64>() % 10_000 + 1) as i64;
        let to = (rand::random::<u64>() % 10_000 + 1) as i64;
        if from != to {
            let amount = (rand::random::<u64>() % 10_000) as f64 / 100.0;
            client.execute(&stmt, &[&from, &to, &amount]).await?;
            n += 1;
        }
        // ~500 transactions/s: lively without drowning a small machine.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            _ = stop.changed() => {}
        }
    }
    Ok(n)
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let mut clusters = Vec::new();
    let _tmp;
    let (source_url, target_url, data_dir, demo) = match (&opts.source, &opts.target) {
        (Some(s), Some(t)) => (
            s.clone(),
            t.clone(),
            opts.data_dir.clone().unwrap_or_else(|| PathBuf::from(synapse_runtime::config::defaults::LOG_DIR)),
            false,
        ),
        (None, None) => {
            eprintln!(
                "starting two local PostgreSQL nodes (A and B) from {}",
                synapse_localpg::server_bindir()?.display()
            );
            let a = LocalCluster::start(ClusterOptions::default())?;
            let b = LocalCluster::start(ClusterOptions::default())?;
            a.create_database("app")?;
            b.create_database("app")?;
            a.psql("app", DEMO_SCHEMA)?;
            eprintln!(
                "node A: {}  (demo schema: accounts, transfers)\nnode B: {}  (empty)",
                a.url("app"),
                b.url("app")
            );
            let urls = (a.url("app"), b.url("app"));
            clusters.push(a);
            clusters.push(b);
            let dir = tempfile::tempdir()?;
            let path = opts.data_dir.clone().unwrap_or_else(|| dir.path().to_owned());
            _tmp = dir;
            (urls.0, urls.1, path, true)
        }
        _ => anyhow::bail!("--source and --target go together: give both, or neither for the local demo"),
    };
    let config = Config {
        log: LogConfig { dir: data_dir.clone(), ..Default::default() },
        sources: vec![SourceConfig {
            heartbeat_interval_secs: 1.0,
            receive_timeout_secs: 60.0,
            ..SourceConfig::new("a", SecretUrl::new(source_url.clone()))
        }],
        targets: vec![TargetConfig {
            name: "b".into(),
            url: SecretUrl::new(target_url.clone()),
            sources: vec![],
            initial_copy: true,
            copy_parallelism: synapse_runtime::config::defaults::COPY_PARALLELISM,
            max_txns_per_commit: synapse_apply::defaults::MAX_TXNS_PER_COMMIT,
            synchronous_commit: None,
            shards: Vec::new(),
            sharding: Default::default(),
            shard: None,
            resharding: None,
            reshard_role: None,
        }],
        ops: OpsConfig { listen: opts.ops_listen.clone(), tls: None },
        api: ApiConfig { listen: opts.api_listen.clone(), ..Default::default() },
        webhooks: vec![],
        egress: Default::default(),
        // A demo stops on the first definite error, with its fix, rather than wait for one.
        vector_indexes: Vec::new(),
        supervision: synapse_runtime::config::SupervisionConfig { exit_on_park: true, ..Default::default() },
        mesh: None,
    };
    let mut config = config;
    let mut receiver = None;
    if demo {
        let secret = Secret::generate();
        let VerifyingReceiver { url, stats } =
            VerifyingReceiver::start(secret.parse().map_err(anyhow::Error::msg)?).await?;
        let spec: EndpointSpec = serde_json::from_value(serde_json::json!({
            "name": "demo-receiver",
            "url": url,
            "secrets": [secret],
            "tables": ["public.transfers"],
            "operations": ["insert"],
            "batch_size": 50,
        }))?;
        config.webhooks.push(spec);
        // The demo's receiver runs on loopback, which webhooks may not reach by default.
        config.egress.allow.push("127.0.0.1".into());
        eprintln!("webhook receiver: {url} (gets each new transfer, signed per Standard Webhooks)");
        receiver = Some(stats);
    }
    config.validate("quickstart")?;
    let (stop, shutdown) = watch::channel(false);
    let (stop_load, load_rx) = watch::channel(false);
    let load = demo.then(|| tokio::spawn(workload(source_url.clone(), load_rx)));
    let health = Arc::new(Health::new(config.supervision.policy()));
    if !config.ops.listen.is_empty() {
        let (listen, h) = (config.ops.listen.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = synapse_runtime::ops::serve(&listen, h, None).await {
                eprintln!("warning: {e}");
            }
        });
    }
    if !config.api.listen.is_empty() {
        // The demo's table; with --source/--target every captured table.
        let tables = if demo { "&tables=public.accounts" } else { "" };
        // Subscribing first gives the cursor of "now": the stream starts there instead of
        // replaying the whole log.
        let api = &config.api.listen;
        eprintln!(
            "live stream:      curl -N -H 'Accept: text/event-stream' \"http://{api}$(curl -s http://{api}/v1/streams/a | sed -E 's/.*\"changes\":\"([^\"]*)\".*/\\1/')&live=true{tables}\""
        );
    }
    eprintln!("replicating A → B (log in {}); Ctrl-C to stop\n", data_dir.display());
    let running = pipeline::start(&config, health.clone(), shutdown.clone()).await?;
    let captures = running.captures.clone();
    let appliers = running.appliers.clone();
    let waiter = tokio::spawn({
        let stop = stop.clone();
        async move { pipeline::wait(running, &stop).await }
    });
    let started = Instant::now();
    let mut last_events = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = synapse_runtime::shutdown_signal();
    tokio::pin!(ctrl_c);
    let mut waiter = waiter;
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
            r = &mut waiter => {
                r??;
                anyhow::bail!("the pipeline stopped");
            }
        }
        if opts.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let (c, a) = (&captures[0].1, &appliers[0].1);
        let events = c.events.load(Ordering::Relaxed);
        eprintln!(
            "{:>5.0}s  captured {:>8} events ({:>6} /s)  applied {:>7} txns {:>8} rows  copied {:>7} rows  slot lag {:>8} B  lag {:>5.2} s",
            started.elapsed().as_secs_f64(),
            events,
            events - last_events,
            a.transactions.load(Ordering::Relaxed),
            a.rows.load(Ordering::Relaxed),
            a.rows_copied.load(Ordering::Relaxed),
            c.slot_lag_bytes.load(Ordering::Relaxed),
            c.lag_seconds(),
        );
        if let Some(r) = &receiver {
            let (events, requests, bad) = r.snapshot();
            eprintln!("       webhook: {events:>8} events in {requests:>6} signed requests ({bad} bad signatures)");
        }
        last_events = events;
    }
    let _ = stop_load.send(true);
    if let Some(load) = load {
        let n = load.await??;
        eprintln!("\nworkload stopped after {n} transactions; waiting for B to catch up");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // A digest of every row of every table, in key order: equal digests mean equal data
            // row for row (counts and sums alone would miss rows that differ but add up).
            let q = "SELECT (SELECT count(*) || ' accounts, md5 ' || md5(string_agg(a::text, ';' ORDER BY id)) FROM accounts a)
                     || '; ' || (SELECT count(*) || ' transfers, md5 ' || md5(string_agg(t::text, ';' ORDER BY id)) FROM transfers t)";
            let (a, b) = (clusters[0].psql("app", q)?, clusters[1].psql("app", q).unwrap_or_default());
            if a == b {
                eprintln!("A and B hold the same rows: {a}");
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("B did not catch up within 60 s\n  A: {a}\n  B: {b}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let _ = stop.send(true);
    waiter.await??;
    Ok(())
}
