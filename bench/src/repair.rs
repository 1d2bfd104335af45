//! P5 of `synapse-bench`: how fast, and with how many bytes on the wire, two nodes' copies of
//! a table are compared — `synapse repair check` against pg_comparator (Debian package
//! postgresql-comparator, its pgcmp extension created) and reladiff (PyPI), in the same run on
//! the same clusters.
//!
//! The table: `t (id bigint primary key, a int, b text)` with b 64 characters; the second node
//! differs by 99 rows (33 updated, 33 deleted, 33 inserted). Every tool connects through a
//! counting TCP proxy per node, so "bytes" is everything sent both ways on every connection the
//! tool opened. Each tool runs `RUNS` times; the median time is reported (and its run's bytes);
//! checks in a running process, which take milliseconds, `WARM_RUNS` times.
//! Tools that are not installed are reported as such (scripts/bench-tools.sh installs both).

use anyhow::{bail, Context};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use synapse_localpg::{ClusterOptions, LocalCluster};
use tokio::net::{TcpListener, TcpStream};

const RUNS: usize = 3;

/// One tool's median run.
#[derive(Clone, Debug)]
pub struct ToolRun {
    pub secs: f64,
    pub bytes: u64,
    /// Distinct keys the tool reported as differing.
    pub found: usize,
}

pub struct RepairBench {
    pub rows: u64,
    pub table_bytes: u64,
    pub synapse: ToolRun,
    pub pg_comparator: Result<ToolRun, String>,
    pub reladiff: Result<ToolRun, String>,
    /// `synapse repair track` on both nodes (seconds), then checks each after `CHANGES`
    /// updates made alike on both nodes.
    pub track_secs: f64,
    pub incremental: ToolRun,
    /// The same checks through the admin API's path in a running process (warm connections):
    /// the median of `WARM_RUNS`, and the quartiles of their times (seconds).
    pub warm: ToolRun,
    pub warm_quartiles: (f64, f64),
}

/// Checks measured in a running process per round: each takes milliseconds and their times
/// spread (two servers, the proxies and the client on 2 cores: quartiles ~1 ms either side of
/// a ~6.5 ms median); the median of 3 moved by ±1.5 ms between rounds.
pub const WARM_RUNS: usize = 15;

/// Rows updated (the same way on both nodes) before each incremental check.
pub const CHANGES: u64 = 100;

/// A TCP proxy to a local port counting every byte through it, both ways.
struct CountingProxy {
    port: u16,
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(to: u16) -> anyhow::Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let bytes = Arc::new(AtomicU64::new(0));
        let counted = bytes.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", to)).await else { return };
                    let (_, _) = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    // Counted as it flows: a client that exits resets its connection, and a
                    // total counted at the end would be lost with it.
                    tokio::join!(pump(ri, wo, counted.clone()), pump(ro, wi, counted));
                });
            }
        });
        Ok(CountingProxy { port, bytes, task })
    }

    fn take(&self) -> u64 {
        self.bytes.swap(0, Ordering::Relaxed)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counted: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        counted.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn run(rows: u64, work: &Path) -> anyhow::Result<RepairBench> {
    let (a, b) = (LocalCluster::start(ClusterOptions::default())?, LocalCluster::start(ClusterOptions::default())?);
    let load = format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, a int, b text);
         INSERT INTO t SELECT g, (g::bigint * 7919) % 100000, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, {rows}) g;"
    );
    for n in [&a, &b] {
        n.create_database("bench")?;
        n.psql("bench", &load)?;
    }
    let step = (rows / 40).max(1);
    let id = |i: u64| 1 + (i * step + i) % rows;
    let mut drift = String::new();
    for i in 0..33 {
        drift.push_str(&format!("UPDATE t SET a = a + 1 WHERE id = {};", id(i)));
        drift.push_str(&format!("DELETE FROM t WHERE id = {};", id(i) + 1));
        drift.push_str(&format!("INSERT INTO t VALUES ({}, 1, 'inserted');", rows + 1 + i));
    }
    b.psql("bench", &drift)?;
    // Everyone reads a settled table: hint bits set, statistics current.
    for n in [&a, &b] {
        n.psql("bench", "VACUUM ANALYZE t")?;
        n.psql("bench", "CHECKPOINT")?;
    }
    let table_bytes: u64 = a.psql("bench", "SELECT pg_table_size('t')")?.trim().parse()?;
    let (pa, pb) = (CountingProxy::start(a.port()).await?, CountingProxy::start(b.port()).await?);
    let url = |p: &CountingProxy| format!("postgres://postgres@127.0.0.1:{}/bench", p.port);

    let config = work.join("p5.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {}\nsources:\n  - name: a\n    url: {}\n    tables: [public.t]\ntargets:\n  - name: b\n    url: {}\nops:\n  listen: \"\"\napi:\n  listen: \"\"\n",
            work.join("log").display(),
            url(&pa),
            url(&pb)
        ),
    )?;
    let exe = crate::synapse_binary()?;
    let check = || {
        let mut c = tokio::process::Command::new(&exe);
        c.args(["repair", "check", "--config", &config.display().to_string(), "--json"]);
        c
    };
    // Cold: no tracked digests yet, and no rows remembered from a previous check.
    let cache = work.join("log").join("repair-cache");
    let synapse = measure(
        &pa,
        &pb,
        |_| match std::fs::remove_dir_all(&cache) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        },
        check,
        synapse_found,
    )
    .await?;

    let pg_comparator = match which("pg_comparator") {
        None => Err("not installed (scripts/bench-tools.sh installs postgresql-comparator)".to_owned()),
        Some(bin) => {
            for n in [&a, &b] {
                n.psql("bench", "CREATE EXTENSION IF NOT EXISTS pgcmp")?;
            }
            let table = |p: &CountingProxy| format!("pgsql://postgres@127.0.0.1:{}/bench/public.t?id:a,b", p.port);
            let (ta, tb) = (table(&pa), table(&pb));
            measure(
                &pa,
                &pb,
                |_| Ok(()),
                || {
                    let mut c = tokio::process::Command::new(&bin);
                    c.args(["--no-lock", &ta, &tb]);
                    c
                },
                |out| Ok(distinct_keys(out.lines().filter_map(|l| l.split_whitespace().nth(1)))),
            )
            .await
            .map_err(|e| format!("{e:#}"))
        }
    };

    let reladiff = match reladiff_bin() {
        None => Err("not installed (scripts/bench-tools.sh installs it from PyPI)".to_owned()),
        Some(bin) => {
            // reladiff knows the `postgresql://` scheme only.
            let (ua, ub) = (
                url(&pa).replacen("postgres://", "postgresql://", 1),
                url(&pb).replacen("postgres://", "postgresql://", 1),
            );
            measure(
                &pa,
                &pb,
                |_| Ok(()),
                || {
                    let mut c = tokio::process::Command::new(&bin);
                    c.args([
                        ua.as_str(),
                        "t",
                        ub.as_str(),
                        "t",
                        "-k",
                        "id",
                        "-c",
                        "a",
                        "-c",
                        "b",
                        "--assume-unique-key",
                    ]);
                    c
                },
                |out| {
                    // Lines like "- 42, 1, x" / "+ 42, 2, x": the key is the first field.
                    Ok(distinct_keys(out.lines().filter_map(|l| {
                        let rest = l.strip_prefix("- ").or_else(|| l.strip_prefix("+ "))?;
                        rest.split(',').next()
                    })))
                },
            )
            .await
            .map_err(|e| format!("{e:#}"))
        }
    };
    // Incremental: digests kept current on both nodes by `repair track`; one check fills the
    // cache of differing buckets; each measured check then follows CHANGES updates made alike
    // on both nodes (the same 99 keys still differ).
    let started = Instant::now();
    let tracked = tokio::process::Command::new(&exe)
        .args(["repair", "track", "--config", &config.display().to_string()])
        .output()
        .await?;
    if !tracked.status.success() {
        bail!("synapse repair track failed: {}", String::from_utf8_lossy(&tracked.stderr));
    }
    let track_secs = started.elapsed().as_secs_f64();
    check().output().await?;
    let (ua, ub) = (a.url("bench"), b.url("bench"));
    let change = |run: usize| -> anyhow::Result<()> {
        let sql = format!("UPDATE t SET a = a + 1 WHERE id % {} = {}", rows / CHANGES, 7 + run);
        for url in [&ua, &ub] {
            let out = std::process::Command::new(a.bindir().join("psql"))
                .args(["-X", "-q", "-d", url, "-c", &sql])
                .output()?;
            if !out.status.success() {
                bail!("{sql}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    };
    let incremental = measure(&pa, &pb, &change, check, synapse_found).await?;
    // The same through the admin API's path in a running process: connections already open.
    let service = synapse_runtime::repair::RepairService::new(synapse_runtime::config::Config::load(&config)?);
    let request = || synapse_runtime::repair::RepairRequest { tables: vec!["public.t".into()], ..Default::default() };
    service.check(request()).await.map_err(|_| anyhow::anyhow!("the warm-up check through the service failed"))?;
    let mut warm = Vec::new();
    for run in 0..WARM_RUNS {
        change(RUNS + run)?;
        let (_, _) = (pa.take(), pb.take());
        let started = Instant::now();
        let reports =
            service.check(request()).await.map_err(|_| anyhow::anyhow!("a check through the service failed"))?;
        let secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        warm.push(ToolRun { secs, bytes: pa.take() + pb.take(), found: reports[0].differing.len() });
    }
    warm.sort_by(|x, y| x.secs.total_cmp(&y.secs));
    let warm_quartiles = (warm[warm.len() / 4].secs, warm[warm.len() * 3 / 4].secs);
    let warm = warm[warm.len() / 2].clone();
    Ok(RepairBench {
        rows,
        table_bytes,
        synapse,
        pg_comparator,
        reladiff,
        track_secs,
        incremental,
        warm,
        warm_quartiles,
    })
}

/// Differing keys in `synapse repair check --json` output.
fn synapse_found(out: &str) -> anyhow::Result<usize> {
    let reports: serde_json::Value = serde_json::from_str(out).context("synapse repair check --json")?;
    Ok(reports[0]["differing"].as_array().map_or(0, Vec::len))
}

fn distinct_keys<'a>(keys: impl Iterator<Item = &'a str>) -> usize {
    keys.collect::<BTreeSet<_>>().len()
}

/// Runs the tool `RUNS` times through the proxies; the median run by time.
async fn measure(
    pa: &CountingProxy,
    pb: &CountingProxy,
    prepare: impl Fn(usize) -> anyhow::Result<()>,
    command: impl Fn() -> tokio::process::Command,
    found: impl Fn(&str) -> anyhow::Result<usize>,
) -> anyhow::Result<ToolRun> {
    let mut runs = Vec::new();
    for run in 0..RUNS {
        prepare(run)?;
        let (_, _) = (pa.take(), pb.take());
        let mut c = command();
        let started = Instant::now();
        let out = c.output().await?;
        let secs = started.elapsed().as_secs_f64();
        // Give the proxies a moment to see the connections close.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Exit 1 = "rows differ" for all three tools.
        if !matches!(out.status.code(), Some(0 | 1)) {
            bail!(
                "{:?} failed ({}): {}{}",
                c.as_std().get_program(),
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let found = found(&text)?;
        if found == 0 {
            // Every run has 99 differences: nothing found is a failure (some tools exit 0 on errors).
            bail!("{:?} found nothing: {}", c.as_std().get_program(), String::from_utf8_lossy(&out.stderr).trim());
        }
        runs.push(ToolRun { secs, bytes: pa.take() + pb.take(), found });
    }
    runs.sort_by(|x, y| x.secs.total_cmp(&y.secs));
    Ok(runs[runs.len() / 2].clone())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// reladiff from PATH or the virtualenv scripts/bench-tools.sh creates.
fn reladiff_bin() -> Option<PathBuf> {
    which("reladiff").or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = Path::new(&home).join(".cache/synapse/bench-tools/bin/reladiff");
        p.is_file().then_some(p)
    })
}
