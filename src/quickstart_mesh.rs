//! `synapse quickstart --regions N`: a writable mesh of N local PostgreSQL nodes, live.
//!
//! Starts the nodes, runs the mesh, then shows the two things a multi-region user worries
//! about: the same row updated in two regions at the same moment (resolved identically
//! everywhere, the loser in `synapse.conflicts`), and a counter incremented in every region
//! (ending at the sum of all increments on every node). Then keeps a light workload running on
//! every node until Ctrl-C or `--duration`, and proves the nodes identical.

use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_runtime::config::{ApiConfig, Config, LogConfig, MeshConfig, MeshNode, OpsConfig, SecretUrl};
use synapse_runtime::ops::Health;
use synapse_runtime::pipeline;
use tokio::sync::watch;

const SCHEMA: &str = "CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL);
INSERT INTO accounts SELECT g, 'owner ' || g, 1000 FROM generate_series(1, 1000) g;";

const REGIONS: [&str; 5] = ["us", "eu", "ap", "sa", "af"];

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    Ok(synapse_postgres::connect_str(url, "demo").await?)
}

/// Row count and a digest of every row, in key order: equal answers mean identical tables.
const FINGERPRINT: &str =
    "SELECT count(*) || ' rows, md5 ' || md5(string_agg(a::text, ';' ORDER BY id)) FROM accounts a";

fn fingerprint(node: &LocalCluster) -> String {
    node.psql("app", FINGERPRINT).unwrap_or_else(|e| format!("error: {e}"))
}

/// Polls until every node gives the same answer to `query`; prints each distinct state once.
async fn wait_same(nodes: &[LocalCluster], names: &[&str], query: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let answers: Vec<String> = nodes.iter().map(|n| n.psql("app", query).unwrap_or_default()).collect();
        let line = names.iter().zip(&answers).map(|(n, a)| format!("{n}: {a}")).collect::<Vec<_>>().join("   ");
        if line != last {
            eprintln!("  {line}");
            last = line;
        }
        if answers.iter().all(|a| a == &answers[0]) {
            return Ok(answers[0].clone());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the nodes did not converge within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(regions: usize, duration: Option<Duration>, ops_listen: String) -> anyhow::Result<()> {
    if !(2..=REGIONS.len()).contains(&regions) {
        anyhow::bail!("--regions: between 2 and {} local nodes", REGIONS.len());
    }
    let names: Vec<&str> = REGIONS[..regions].to_vec();
    eprintln!(
        "starting {regions} local PostgreSQL nodes ({}) from {}",
        names.join(", "),
        synapse_localpg::server_bindir()?.display()
    );
    let mut nodes = Vec::new();
    for name in &names {
        let n = LocalCluster::start(ClusterOptions::default())?;
        n.create_database("app")?;
        // Every region starts from the same data, as a mesh requires.
        n.psql("app", SCHEMA)?;
        eprintln!("  {name}: {}", n.url("app"));
        nodes.push(n);
    }
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        log: LogConfig { dir: dir.path().to_owned(), ..Default::default() },
        sources: vec![],
        targets: vec![],
        ops: OpsConfig { listen: ops_listen, tls: None },
        api: ApiConfig { listen: String::new(), ..Default::default() },
        webhooks: vec![],
        egress: Default::default(),
        // A demo stops on the first definite error, with its fix, rather than wait for one.
        vector_indexes: Vec::new(),
        supervision: synapse_runtime::config::SupervisionConfig { exit_on_park: true, ..Default::default() },
        mesh: Some(MeshConfig {
            nodes: names
                .iter()
                .zip(&nodes)
                .enumerate()
                .map(|(i, (name, n))| MeshNode {
                    name: (*name).to_owned(),
                    id: i as u16 + 1,
                    url: SecretUrl::new(n.url("app")),
                    region: Some((*name).to_owned()),
                    join_from: None,
                })
                .collect(),
            tables: vec!["public.accounts".into()],
            tombstone_purge_interval_secs: 60.0,
            hub: None,
            on_new_node: Default::default(),
            merge_functions: Default::default(),
            columns: [(
                "public.accounts".to_string(),
                [("balance".to_string(), synapse_resolver::Strategy::Counter)].into(),
            )]
            .into(),
        }),
    };
    config.validate("quickstart")?;
    config.expand_mesh();
    let health = Arc::new(Health::new(config.supervision.policy()));
    let (stop, shutdown) = watch::channel(false);
    if !config.ops.listen.is_empty() {
        let (listen, h) = (config.ops.listen.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = synapse_runtime::ops::serve(&listen, h, None).await {
                eprintln!("warning: ops server: {e}");
            }
        });
    }
    let running = pipeline::start(&config, health, shutdown.clone()).await?;
    eprintln!(
        "mesh running: every node captures its own writes and applies the others' (accounts.balance is a counter)\n"
    );
    let clients = {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(connect(&n.url("app")).await?);
        }
        v
    };
    // Give every capture its slot and every applier its connection before the demo writes.
    tokio::time::sleep(Duration::from_secs(2)).await;

    eprintln!(
        "1. {} and {} rename account 1 in the same instant (both transactions open at once):",
        names[0], names[1]
    );
    clients[0].batch_execute("BEGIN; UPDATE accounts SET owner = 'alice (renamed in us)' WHERE id = 1").await?;
    clients[1].batch_execute("BEGIN; UPDATE accounts SET owner = 'alice (renamed in eu)' WHERE id = 1").await?;
    clients[0].batch_execute("COMMIT").await?;
    clients[1].batch_execute("COMMIT").await?;
    let owner = wait_same(&nodes, &names, "SELECT owner FROM accounts WHERE id = 1", Duration::from_secs(60)).await?;
    eprintln!("   every region agrees: {owner} (the later hybrid-logical-clock stamp wins)");
    let logged = nodes
        .iter()
        .map(|n| {
            n.psql(
                "app",
                "SELECT kind || ', ' || resolution || ': kept ' || (result->'values'->>'owner') || ', superseded ' ||
                        ((CASE WHEN resolution = 'local_wins' THEN remote ELSE local END)->'values'->>'owner')
                 FROM synapse.conflicts ORDER BY id LIMIT 1",
            )
            .unwrap_or_default()
        })
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "(none: one update had already seen the other)".into());
    eprintln!("   synapse.conflicts: {logged}\n");

    eprintln!("2. every region adds to account 2's balance (1000) at the same time, 50 times each:");
    let deltas = [100i64, 250, -30, 7, 13];
    let mut expected = 1000i64;
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let d = deltas[i];
        expected += 50 * d;
        let url = n.url("app");
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            for _ in 0..50 {
                // A deadlock with an applier rolls the statement back: retry it, as for any deadlock.
                while let Err(e) = c.execute("UPDATE accounts SET balance = balance + $1 WHERE id = 2", &[&d]).await {
                    if e.as_db_error().is_none_or(|x| x.code().code() != "40P01") {
                        return Err(anyhow::Error::from(e));
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let balance =
        wait_same(&nodes, &names, "SELECT balance FROM accounts WHERE id = 2", Duration::from_secs(60)).await?;
    eprintln!(
        "   every region reads {balance}; the sum of all increments gives {expected}: {}\n",
        if balance == expected.to_string() { "no increment lost" } else { "MISMATCH" }
    );

    eprintln!(
        "3. a light workload writes in every region{}",
        duration.map(|d| format!(" for {d:?}")).unwrap_or_else(|| " until Ctrl-C".into())
    );
    let (wstop, wstop_rx) = watch::channel(false);
    let mut workers = Vec::new();
    for n in &nodes {
        let (url, mut rx) = (n.url("app"), wstop_rx.clone());
        workers.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            let mut writes = 0u64;
            while !*rx.borrow() {
                let id = (rand::random::<u32>() % 1000 + 1) as i32;
                let r = if rand::random::<bool>() {
                    c.execute("UPDATE accounts SET balance = balance + 1 WHERE id = $1", &[&id]).await
                } else {
                    let owner = format!("owner {id} v{}", rand::random::<u16>());
                    c.execute("UPDATE accounts SET owner = $2 WHERE id = $1", &[&id, &owner]).await
                };
                writes += u64::from(r.is_ok());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = rx.changed() => {}
                }
            }
            anyhow::Ok(writes)
        }));
    }
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    let _ = wstop.send(true);
    let mut writes = 0;
    for w in workers {
        writes += w.await??;
    }
    eprintln!("   {writes} writes committed across the regions; waiting for the mesh to settle:");
    let same = wait_same(&nodes, &names, FINGERPRINT, Duration::from_secs(120)).await;
    let conflicts: Vec<String> =
        nodes.iter().map(|n| n.psql("app", "SELECT count(*) FROM synapse.conflicts").unwrap_or_default()).collect();
    let _ = stop.send(true);
    pipeline::wait(running, &stop).await?;
    match same {
        Ok(f) => eprintln!(
            "all {regions} regions identical: {f}; conflicts resolved per node: {}",
            names.iter().zip(&conflicts).map(|(n, c)| format!("{n} {c}")).collect::<Vec<_>>().join(", ")
        ),
        Err(e) => {
            for (n, node) in names.iter().zip(&nodes) {
                eprintln!("  {n}: {}", fingerprint(node));
            }
            return Err(e);
        }
    }
    Ok(())
}
