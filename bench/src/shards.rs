//! S1/S2/S4: apply throughput into a shard set of 1, 2 and 4 shards, from the same backlog.
//!
//! One source and one target server (the shards are databases on it: the same machine's cores
//! for every shard count). Three synapse configurations, each with its own slot and log, are
//! started once to make their slots and copy the (empty) tables, then stopped; the workload
//! (`--rows` rows in `--txn-rows`-row transactions, hash-sharded on the key) is written while
//! all three are stopped, so each finds the same WAL backlog. Each is then started alone and
//! timed until a marker written after the workload is on every one of its shards, start-up
//! and capture included. The 1-shard run is the baseline of the others.

use crate::{spawn_synapse, sql, stop, wait_marker};
use anyhow::Context;
use std::path::Path;
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

const SCHEMA: &str = "CREATE TABLE sbulk (id bigint PRIMARY KEY, customer bigint NOT NULL, payload text NOT NULL);
    CREATE TABLE marker (id int PRIMARY KEY, note text);";

/// Shard counts measured, in order (the first is the baseline).
pub(crate) const COUNTS: [usize; 3] = [1, 2, 4];

/// Seconds from start to the marker on every shard, per shard count of [`COUNTS`].
pub(crate) async fn run(rows: u64, txn_rows: u64, work: &Path) -> anyhow::Result<Vec<f64>> {
    let opts = ClusterOptions { settings: vec!["max_worker_processes = 16".into()], ..Default::default() };
    let src = LocalCluster::start(opts.clone())?;
    let tgt = LocalCluster::start(opts)?;
    src.create_database("bench")?;
    src.psql("bench", SCHEMA)?;
    let db = |k: usize, i: usize| format!("s{k}_{i}");
    for k in COUNTS {
        for i in 0..k {
            tgt.create_database(&db(k, i))?;
            tgt.psql(&db(k, i), SCHEMA)?;
        }
    }
    let mut configs = Vec::new();
    for k in COUNTS {
        let shards: String =
            (0..k).map(|i| format!("      - {{name: s{i}, url: \"{}\"}}\n", tgt.url(&db(k, i)))).collect();
        let path = work.join(format!("shards{k}.yaml"));
        std::fs::write(
            &path,
            format!(
                "log:\n  dir: {log}\nsources:\n  - name: a{k}\n    url: {src}\n    tables: [public.sbulk, public.marker]\n\
                 targets:\n  - name: t\n    shards:\n{shards}    sharding:\n      public.sbulk: {{hash: id}}\n\
                 ops:\n  listen: \"\"\napi:\n  listen: \"\"\n",
                log = work.join(format!("log{k}")).display(),
                src = src.url("bench"),
            ),
        )?;
        configs.push(path);
    }
    let source = sql(&src.url("bench")).await?;
    source.execute("INSERT INTO marker VALUES (0, 'setup')", &[]).await?;
    let shard_clients = |k: usize| {
        let urls: Vec<String> = (0..k).map(|i| tgt.url(&db(k, i))).collect();
        async move {
            let mut clients = Vec::new();
            for u in urls {
                clients.push(sql(&u).await?);
            }
            anyhow::Ok(clients)
        }
    };
    eprintln!("S: making each configuration's slot and copying the empty tables");
    for (k, config) in COUNTS.iter().zip(&configs) {
        let log = work.join(format!("synapse{k}.log"));
        let mut child = spawn_synapse(config, &log)?;
        for c in shard_clients(*k).await? {
            wait_marker(&c, 0, Duration::from_secs(120))
                .await
                .with_context(|| format!("setup of {k} shards; see {}", log.display()))?;
        }
        stop(&mut child)?;
    }
    eprintln!("S: writing {rows} rows in {}-row transactions with every replicator stopped", txn_rows);
    let mut next = 1u64;
    while next <= rows {
        let last = (next + txn_rows - 1).min(rows);
        source
            .batch_execute(&format!(
                "INSERT INTO sbulk SELECT g, g % 1000, repeat('s', 80) FROM generate_series({next}, {last}) g"
            ))
            .await?;
        next = last + 1;
    }
    source.execute("INSERT INTO marker VALUES (1, 'done')", &[]).await?;
    let mut secs = Vec::new();
    for (k, config) in COUNTS.iter().zip(&configs) {
        let log = work.join(format!("synapse{k}.log"));
        let clients = shard_clients(*k).await?;
        let started = Instant::now();
        let mut child = spawn_synapse(config, &log)?;
        for c in &clients {
            wait_marker(c, 1, Duration::from_secs(1800))
                .await
                .with_context(|| format!("{k} shards; see {}", log.display()))?;
        }
        let s = started.elapsed().as_secs_f64();
        stop(&mut child)?;
        let mut held = 0i64;
        for c in &clients {
            held += c.query_one("SELECT count(*) FROM sbulk", &[]).await?.get::<_, i64>(0);
        }
        if held as u64 != rows {
            anyhow::bail!("{k} shards hold {held} rows together, not {rows}");
        }
        eprintln!("S: {k} shard(s): {rows} rows in {s:.2}s ({:.0} rows/s)", rows as f64 / s);
        secs.push(s);
    }
    Ok(secs)
}
