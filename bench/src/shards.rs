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

/// What S measured: seconds from start to the marker on every shard per shard count of
/// [`COUNTS`]; an online split of the 1-shard set into 2 new shards (start → both copied) and
/// `pg_dump | psql` of the same rows into one database.
pub(crate) struct Measured {
    pub apply_secs: Vec<f64>,
    pub split_secs: f64,
    pub dump_secs: f64,
}

pub(crate) async fn run(rows: u64, txn_rows: u64, work: &Path) -> anyhow::Result<Measured> {
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
    let (split_secs, dump_secs) = split(&src, &tgt, &configs[0], work, rows).await?;
    Ok(Measured { apply_secs: secs, split_secs, dump_secs })
}

/// The 1-shard set split online into two new shards (`synapse shards start` until both hold
/// their rows), against `pg_dump --data-only | psql` of the same table into one database.
async fn split(
    src: &LocalCluster,
    tgt: &LocalCluster,
    config: &Path,
    work: &Path,
    rows: u64,
) -> anyhow::Result<(f64, f64)> {
    for db in ["split_0", "split_1", "dump_0"] {
        tgt.create_database(db)?;
        tgt.psql(db, SCHEMA)?;
    }
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port()?);
    let text = std::fs::read_to_string(config)?.replace("api:\n  listen: \"\"", &format!("api:\n  listen: \"{api}\""));
    let resharding = format!(
        "    resharding:\n      shards:\n        - {{name: n0, url: \"{}\", key_range: \"-80\"}}\n        - {{name: n1, url: \"{}\", key_range: \"80-\"}}\nops:",
        tgt.url("split_0"),
        tgt.url("split_1")
    );
    let split_config = work.join("split.yaml");
    std::fs::write(&split_config, text.replacen("ops:", &resharding, 1))?;
    let log = work.join("split.log");
    let mut child = spawn_synapse(&split_config, &log)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(&api).is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("the API never came up; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let out = std::process::Command::new(crate::synapse_binary()?)
        .args(["shards", "start", "--config", &split_config.display().to_string(), "--set", "t"])
        .output()?;
    if !out.status.success() {
        anyhow::bail!("synapse shards start: {}", String::from_utf8_lossy(&out.stderr));
    }
    let shards = [sql(&tgt.url("split_0")).await?, sql(&tgt.url("split_1")).await?];
    let ready = "SELECT count(*) FROM synapse.table_sync WHERE state = 'ready'";
    for c in &shards {
        loop {
            // The node schema (and so the table) appears when the shard starts.
            let n: i64 = c.query_one(ready, &[]).await.map(|r| r.get(0)).unwrap_or(0);
            if n == 2 {
                break;
            }
            if started.elapsed() > Duration::from_secs(1800) {
                anyhow::bail!("the split never finished copying; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let split_secs = started.elapsed().as_secs_f64();
    stop(&mut child)?;
    let mut held = 0i64;
    for c in &shards {
        held += c.query_one("SELECT count(*) FROM sbulk", &[]).await?.get::<_, i64>(0);
    }
    if held as u64 != rows {
        anyhow::bail!("the split's shards hold {held} rows together, not {rows}");
    }
    let bin = src.bindir();
    let started = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --data-only -t public.sbulk -d '{}' | {} -q -d '{}' >/dev/null",
            bin.join("pg_dump").display(),
            src.url("bench"),
            bin.join("psql").display(),
            tgt.url("dump_0")
        ))
        .status()?;
    let dump_secs = started.elapsed().as_secs_f64();
    if !status.success() {
        anyhow::bail!("pg_dump | psql failed: {status}");
    }
    eprintln!("S: split of {rows} rows into 2 new shards {split_secs:.2}s; pg_dump | psql of them {dump_secs:.2}s");
    Ok((split_secs, dump_secs))
}
