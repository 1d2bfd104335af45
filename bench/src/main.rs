//! `synapse-bench`: end-to-end benchmarks against PostgreSQL's own tools, measured in the same
//! run on the same machine, printing both figures and the ratio.
//!
//! | id | what | baseline |
//! |----|------|----------|
//! | P1 | catch-up after 1M rows in 10k-row transactions were written while paused | publication/subscription |
//! | P2 | catch-up after 100k single-row update transactions | publication/subscription |
//! | P3 | capture drain of the P1 WAL into the durable log | pg_recvlogical to /dev/null |
//! | P7 | peak RSS while one ~1 GB transaction flows through (goal < 256 MB) | pg_recvlogical peak RSS |
//! | P8 | initial copy of the P1 table into an empty target | COPY TO STDOUT piped into COPY FROM STDIN |
//! | P2M | P2's transactions written a third on each of three mesh nodes, cold catch-up (see mesh.rs) | publication/subscription one way; SynapseDB one way |
//! | P5 | `repair check` of 1M rows on two nodes with 99 differences: time and bytes on the wire (see repair.rs) | pg_comparator; reladiff |
//! | P6 | webhook delivery: events/s batched and per key, commit → delivery p99 (see delivery.rs) | plain HTTP client; pg_recvlogical |
//!
//! Pausing (P1, P2) is the same for both: a lock on the target table holds each applier back
//! while the workload runs, and the clocks start when the lock is released, one consumer after
//! the other. `--cold-start` instead keeps synapse stopped during the workload and starts it,
//! start-up and capture included.
//!
//! Run from a release build: `cargo build --release && target/release/synapse-bench`; the
//! scenarios that run `synapse run` start the `synapse` binary next to this one.

mod delivery;
mod mesh;
mod repair;

/// The in-process scenarios (P5's running check, P6) measure what the `synapse` binary runs,
/// allocator included.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_log::SourceLog;
use tokio_postgres::Client;

enum KeepDir {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl KeepDir {
    fn path(&self) -> &Path {
        match self {
            KeepDir::Temp(t) => t.path(),
            KeepDir::Kept(p) => p,
        }
    }
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

/// `synapse-bench` options.
#[derive(clap::Parser)]
#[command(
    name = "synapse-bench",
    version,
    about = "End-to-end benchmarks with PostgreSQL's own tools as baselines (run a release build)"
)]
pub struct Options {
    /// Rows of the bulk scenarios (P1, P3, P8).
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    #[arg(long, default_value_t = 10_000)]
    pub txn_rows: u64,
    /// Single-row update transactions of P2.
    #[arg(long, default_value_t = 100_000)]
    pub updates: u64,
    /// Size of P7's single transaction in MB (0 skips P7).
    #[arg(long, default_value_t = 1024)]
    pub big_mb: u64,
    /// Record a perf profile of synapse during P2 and print its top symbols.
    #[arg(long)]
    pub profile: bool,
    /// Parallel chunk copies in P8.
    #[arg(long, default_value_t = synapse_runtime::config::defaults::COPY_PARALLELISM)]
    pub copy_parallelism: usize,
    /// Rounds (fresh clusters each); the median round is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// P1/P2: keep synapse stopped during the workload and time it from process start.
    #[arg(long)]
    pub cold_start: bool,
    /// Scenarios to run (comma-separated): P1,P2,P3,P7,P8 run together; P1k,P2k,P3k (the same
    /// through a Kafka-protocol broker) together; P2M, P5 and P6 alone.
    #[arg(long, value_delimiter = ',', default_value = "P1,P2,P3,P7,P8,P1k,P2k,P3k,P2M,P5,P6")]
    pub scenarios: Vec<String>,
    /// P1k/P2k/P3k: a librdkafka property for synapse's Kafka clients (`key=value`, repeatable),
    /// e.g. `--kafka-property compression.type=zstd` to compare producer settings.
    #[arg(long = "kafka-property", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
    /// Events captured and delivered in P6.
    #[arg(long, default_value_t = 200_000)]
    pub p6_events: u64,
}

struct Row {
    id: &'static str,
    what: String,
    synapse: f64,
    baseline: f64,
    unit: &'static str,
    higher_is_better: bool,
    goal: String,
}

impl Row {
    /// Whether this row meets its goal: a minimum ratio, or (P7) an absolute ceiling.
    fn met(&self) -> bool {
        match self.id {
            "P1" => self.ratio() >= 2.0,
            "P2" => self.ratio() >= 3.0,
            "P3" => self.ratio() >= 0.8,
            "P8" => self.ratio() >= 0.9,
            "P7" => self.synapse < 256.0,
            "P5" => self.ratio() >= 3.0,
            "P5i" => self.ratio() >= 100.0,
            "P5b" => self.synapse <= 1.0,
            "P6a" => self.synapse >= 50_000.0,
            "P6b" => self.synapse >= 10_000.0,
            "P6c" => self.synapse < 50.0,
            _ => false,
        }
    }
}

async fn sql(url: &str) -> anyhow::Result<Client> {
    Ok(synapse_postgres::connect_str(url, "bench").await?)
}

async fn wait_marker(client: &Client, id: i32, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if client.query_opt("SELECT 1 FROM marker WHERE id = $1", &[&id]).await?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("marker {id} never arrived");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `synapse` binary built with this one (same profile, same directory).
pub(crate) fn synapse_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let synapse = exe.with_file_name("synapse");
    if !synapse.exists() {
        bail!("{} not found: build it with the same profile first (`cargo build --release`)", synapse.display());
    }
    Ok(synapse)
}

pub(crate) fn spawn_synapse(config: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Ok(Command::new(synapse_binary()?)
        .args(["run", "--config", &config.display().to_string()])
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()?)
}

pub(crate) fn stop(child: &mut Child) -> anyhow::Result<()> {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    child.wait()?;
    Ok(())
}

/// pg_recvlogical draining `slot` up to `end` into /dev/null, as the baseline consumer.
fn recvlogical(src: &LocalCluster, slot: &str, end: &str) -> Command {
    let mut c = Command::new(src.bindir().join("pg_recvlogical"));
    c.args(["-d", &src.url("bench"), "--slot", slot, "--start", "--endpos", end]);
    c.args(["-o", "proto_version=1", "-o", "publication_names=synapse", "-f", "/dev/null", "--no-loop"]);
    c
}

/// Peak resident set (VmHWM) of a live process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Fetches synapse's /metrics and sums the `_sum` series of the named summaries.
pub(crate) fn scrape(listen: &str, names: &[&str]) -> Vec<(String, f64)> {
    use std::io::{Read, Write};
    let mut body = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(listen) {
        let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        let _ = s.read_to_string(&mut body);
    }
    names
        .iter()
        .map(|n| {
            let key = format!("{n}_sum");
            let v = body
                .lines()
                .filter(|l| l.starts_with(&key))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            (n.to_string(), v)
        })
        .collect()
}

/// Starts a system-wide perf recording (every process: walsender, synapse, target backends).
fn start_profile(enabled: bool, out: &Path) -> Option<Child> {
    if !enabled {
        return None;
    }
    Command::new("perf")
        .args(["record", "-a", "-F", "499", "-o", &out.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn stop_profile(p: Option<Child>) -> anyhow::Result<()> {
    if let Some(mut p) = p {
        Command::new("kill").args(["-INT", &p.id().to_string()]).status()?;
        p.wait()?;
    }
    Ok(())
}

/// Prints CPU share per process and the top symbols of the synapse process.
fn print_profile(label: &str, data: &Path) -> anyhow::Result<()> {
    let d = data.display().to_string();
    let by_comm = Command::new("perf")
        .args(["report", "--stdio", "-i", &d, "--sort", "comm", "--percent-limit", "1"])
        .output()?;
    println!("\n{label}: CPU samples by process (perf record -a; 2 cores):");
    for line in String::from_utf8_lossy(&by_comm.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(12)
    {
        println!("  {line}");
    }
    let syms = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "-i",
            &d,
            "--comms",
            "tokio-rt-worker,synapse",
            "--sort",
            "sym",
            "--percent-limit",
            "1.5",
        ])
        .output()?;
    println!("{label}: top symbols inside synapse:");
    for line in
        String::from_utf8_lossy(&syms.stdout).lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).take(15)
    {
        println!("  {line}");
    }
    Ok(())
}

/// The parts of a round that every catch-up scenario uses.
struct Round<'a> {
    source: &'a Client,
    pg_target: &'a Client,
    syn_target: &'a Client,
    /// A session on the baseline target that holds its apply worker back with a table lock.
    lock: &'a Client,
    /// The same on synapse's target.
    syn_lock: &'a Client,
    cold_start: bool,
    config: &'a Path,
    log: &'a Path,
    listen: &'a str,
    work: &'a Path,
    profile: bool,
}

struct CatchUp {
    baseline_secs: f64,
    synapse_secs: f64,
    /// The source WAL position right after the workload.
    end_lsn: String,
}

impl Round<'_> {
    /// Runs `workload` on the source while both consumers are paused, then times the baseline
    /// and synapse, one after the other, until `marker` arrives on each target.
    ///
    /// Both are paused the same way: a lock on their target table holds the applier back while
    /// capture keeps running (the walsender feeding the baseline's worker stops once its socket
    /// is full; synapse's capture keeps writing its durable log). With `cold_start`, synapse is
    /// instead not running at all during the workload and is started, start-up included.
    async fn catch_up(&self, label: &str, table: &str, workload: &str, marker: i32) -> anyhow::Result<CatchUp> {
        let lock_stmt = format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
        self.lock.batch_execute(&lock_stmt).await?;
        let mut child = None;
        if !self.cold_start {
            self.syn_lock.batch_execute(&lock_stmt).await?;
            child = Some(spawn_synapse(self.config, self.log)?);
        }
        self.source.batch_execute(workload).await?;
        let before_marker: String = self.source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        self.source.execute("INSERT INTO marker VALUES ($1, $2)", &[&marker, &label]).await?;
        let end_lsn: String = self.source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        if !self.cold_start {
            // Capture has made everything durable in the log before either clock starts.
            let deadline = Instant::now() + Duration::from_secs(1800);
            while !self
                .source
                .query_one(
                    "SELECT coalesce(bool_or(confirmed_flush_lsn > $1::text::pg_lsn), false) FROM pg_replication_slots WHERE slot_name = 'synapse_a'",
                    &[&before_marker],
                )
                .await?
                .get::<_, bool>(0)
            {
                if Instant::now() > deadline {
                    bail!("synapse never captured the {label} workload");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let t = Instant::now();
        self.lock.batch_execute("COMMIT").await?;
        wait_marker(self.pg_target, marker, Duration::from_secs(1800)).await?;
        let baseline_secs = t.elapsed().as_secs_f64();
        let perf = start_profile(self.profile, &self.work.join(format!("{label}.perf")));
        let t = Instant::now();
        let mut child = match child {
            Some(c) => {
                self.syn_lock.batch_execute("COMMIT").await?;
                c
            }
            None => spawn_synapse(self.config, self.log)?,
        };
        wait_marker(self.syn_target, marker, Duration::from_secs(1800)).await?;
        let synapse_secs = t.elapsed().as_secs_f64();
        stop_profile(perf)?;
        let stages = scrape(
            self.listen,
            &[
                "synapse_apply_log_read_seconds",
                "synapse_apply_statements_seconds",
                "synapse_apply_commit_seconds",
                "synapse_log_append_seconds",
            ],
        );
        stop(&mut child)?;
        let parts: Vec<String> =
            stages.iter().map(|(k, v)| format!("{}={v:.2}s", k.trim_start_matches("synapse_"))).collect();
        println!(
            "{label} where synapse's time went (cumulative, overlapping stages) over {synapse_secs:.2}s wall: {}",
            parts.join(" ")
        );
        Ok(CatchUp { baseline_secs, synapse_secs, end_lsn })
    }
}

const SCHEMA: &str = "
CREATE TABLE bulk (id bigint PRIMARY KEY, a int NOT NULL, b text NOT NULL, c timestamptz NOT NULL);
CREATE TABLE oltp (id bigint PRIMARY KEY, v bigint NOT NULL, pad text NOT NULL);
CREATE TABLE huge (id bigint PRIMARY KEY, pad text NOT NULL);
CREATE TABLE marker (id int PRIMARY KEY, phase text NOT NULL);";

/// One round of P1, P3, P2 (and P8, P7 on the embedded log). With `kafka` (a broker's
/// address) synapse keeps its log on Kafka and the rows are P1k, P3k, P2k; the baselines are
/// measured again in the same round.
async fn run_once(o: &Options, round: usize, kafka: Option<&str>) -> anyhow::Result<Vec<Row>> {
    let id = |embedded: &'static str, on_kafka: &'static str| if kafka.is_some() { on_kafka } else { embedded };
    // The goals are the embedded log's; the Kafka rows are reported beside them.
    let goal = |g: &str| if kafka.is_some() { "—".to_string() } else { g.to_string() };
    let opts = ClusterOptions { settings: vec!["max_worker_processes = 16".into()], ..Default::default() };
    let src = LocalCluster::start(opts.clone())?;
    let tpg = LocalCluster::start(opts.clone())?;
    let tsyn = LocalCluster::start(opts)?;
    for c in [&src, &tpg, &tsyn] {
        c.create_database("bench")?;
        c.psql("bench", SCHEMA)?;
    }
    src.psql("bench", "INSERT INTO oltp SELECT g, 0, repeat('o', 80) FROM generate_series(1, 100000) g; CREATE PUBLICATION pub_pg FOR TABLE bulk, oltp, huge, marker;")?;
    tpg.psql(
        "bench",
        &format!(
            "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} dbname=bench user=postgres' PUBLICATION pub_pg",
            src.port()
        ),
    )?;
    let work = tempfile::tempdir()?;
    if std::env::var_os("SYNAPSE_BENCH_KEEP").is_some() {
        eprintln!("keeping the work directory {}", work.path().display());
    }
    let work =
        if std::env::var_os("SYNAPSE_BENCH_KEEP").is_some() { KeepDir::Kept(work.keep()) } else { KeepDir::Temp(work) };
    let listen = format!("127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    });
    let config = work.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {}\n{}sources:\n  - name: a\n    url: {}\n    tables: [public.bulk, public.oltp, public.huge, public.marker]\ntargets:\n  - name: b\n    url: {}\nops:\n  listen: \"{listen}\"\napi:\n  listen: \"\"\n",
            work.path().join("log").display(),
            // tansu counts offsets per record batch (see log.kafka.batch_records).
            kafka
                .map(|b| {
                    // tansu answers a fetch only when fetch.wait.max.ms (500 ms by default) has
                    // passed, even when records arrived (Kafka answers at once): a waiting
                    // reader would be up to 500 ms late. Measured P2k: 8,328 txns/s at the
                    // default, 31,587 at 5 ms.
                    let mut props = vec![("fetch.wait.max.ms".to_string(), "5".to_string())];
                    for (k, v) in &o.kafka_properties {
                        props.retain(|(d, _)| d != k);
                        props.push((k.clone(), v.clone()));
                    }
                    let properties: String = props.iter().map(|(k, v)| format!("      {k}: '{v}'\n")).collect();
                    let properties = if properties.is_empty() { properties } else { format!("    properties:\n{properties}") };
                    format!("  kafka:\n    brokers: {b}\n    batch_records: false\n{properties}")
                })
                .unwrap_or_default(),
            src.url("bench"),
            tsyn.url("bench")
        ),
    )?;
    let log = work.path().join("synapse.log");
    let source = sql(&src.url("bench")).await?;
    let pg_target = sql(&tpg.url("bench")).await?;
    let syn_target = sql(&tsyn.url("bench")).await?;

    eprintln!("setup: initial sync of both targets");
    let mut child = spawn_synapse(&config, &log)?;
    source.execute("INSERT INTO marker VALUES (0, 'setup')", &[]).await?;
    wait_marker(&pg_target, 0, Duration::from_secs(300)).await.context("baseline initial sync")?;
    wait_marker(&syn_target, 0, Duration::from_secs(300))
        .await
        .with_context(|| format!("synapse initial sync; see {}", log.display()))?;
    stop(&mut child)?;

    let mut rows = Vec::new();
    let p3_recv = "bench_recv";
    source.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&p3_recv]).await?;
    // Capture alone into its own log, on the publication synapse created; no heartbeats, so
    // it drains exactly the P1 transactions.
    let mut drain_cfg = synapse_capture::CaptureConfig::new("drain", src.url("bench").parse()?);
    drain_cfg.slot = "bench_drain".into();
    drain_cfg.create_publication = false;
    drain_cfg.heartbeat_interval = Duration::from_secs(3600);
    let drain = synapse_capture::Capture::connect(drain_cfg).await?;
    drain.prepare().await?;

    // ---- P1: bulk catch-up ----
    let txns = o.rows / o.txn_rows;
    eprintln!("P1: writing {} rows in {txns} transactions while both consumers are paused", o.rows);
    let lock = sql(&tpg.url("bench")).await?;
    let syn_lock = sql(&tsyn.url("bench")).await?;
    let round_env = Round {
        source: &source,
        pg_target: &pg_target,
        syn_target: &syn_target,
        lock: &lock,
        syn_lock: &syn_lock,
        cold_start: o.cold_start,
        config: &config,
        log: &log,
        listen: &listen,
        work: work.path(),
        profile: o.profile && round == 0,
    };
    let p1 = round_env
        .catch_up(
            "P1",
            "bulk",
            &format!(
                "DO $$ BEGIN FOR i IN 0..{} LOOP
                    INSERT INTO bulk SELECT g, g % 1000, md5(g::text), now() FROM generate_series(i * {n} + 1, (i + 1) * {n}) g;
                    COMMIT;
                 END LOOP; END $$",
                txns - 1,
                n = o.txn_rows
            ),
            1,
        )
        .await?;
    let end_p1 = p1.end_lsn.clone();
    rows.push(Row {
        id: id("P1", "P1k"),
        what: format!("bulk catch-up, {} rows", o.rows),
        synapse: o.rows as f64 / p1.synapse_secs,
        baseline: o.rows as f64 / p1.baseline_secs,
        unit: "rows/s",
        higher_is_better: true,
        goal: goal("≥ 2×"),
    });

    // ---- P3: capture drain of the P1 WAL ----
    eprintln!("P3: draining the P1 WAL: pg_recvlogical, then synapse capture");
    let t = Instant::now();
    let status = recvlogical(&src, p3_recv, &end_p1).status()?;
    let pg_p3 = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    let drain_log = match kafka {
        None => {
            SourceLog::Embedded(synapse_log::EmbeddedLog::open(&work.path().join("drain.redb"), Default::default())?)
        }
        Some(b) => {
            let options = synapse_log::KafkaLogOptions {
                batch_records: false,
                ..synapse_log::KafkaLogOptions::new(b, &format!("drain{round}"))
            };
            SourceLog::Kafka(synapse_log::KafkaLog::open(options).await?)
        }
    };
    let (stop_drain, rx) = tokio::sync::watch::channel(false);
    let stats = drain.stats();
    let t = Instant::now();
    let task = tokio::spawn(async move { drain.stream(drain_log, rx).await });
    while stats.transactions.load(Ordering::Relaxed) < txns + 1 {
        if task.is_finished() {
            bail!("synapse capture stopped early");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let syn_p3 = t.elapsed().as_secs_f64();
    stop_drain.send(true)?;
    let _ = task.await;
    source
        .batch_execute("SELECT pg_drop_replication_slot('bench_recv'); SELECT pg_drop_replication_slot('bench_drain');")
        .await?;
    rows.push(Row {
        id: id("P3", "P3k"),
        what: format!("capture drain, {} rows", o.rows),
        synapse: o.rows as f64 / syn_p3,
        baseline: o.rows as f64 / pg_p3,
        unit: "rows/s",
        higher_is_better: true,
        goal: goal("≥ 0.8×"),
    });

    // ---- P2: OLTP catch-up ----
    eprintln!("P2: writing {} single-row update transactions while both consumers are paused", o.updates);
    let p2 = round_env
        .catch_up(
            "P2",
            "oltp",
            &format!(
                "DO $$ BEGIN FOR i IN 1..{} LOOP
                    UPDATE oltp SET v = v + 1 WHERE id = 1 + (i * 7919) % 100000;
                    COMMIT;
                 END LOOP; END $$",
                o.updates
            ),
            2,
        )
        .await?;
    let same: bool = {
        let q = "SELECT sum(v)::int8 FROM oltp";
        let a: i64 = pg_target.query_one(q, &[]).await?.get(0);
        let b: i64 = syn_target.query_one(q, &[]).await?.get(0);
        let s: i64 = source.query_one(q, &[]).await?.get(0);
        a == s && b == s
    };
    if !same {
        bail!("P2 targets differ from the source");
    }
    rows.push(Row {
        id: id("P2", "P2k"),
        what: format!("OLTP catch-up, {} txns", o.updates),
        synapse: o.updates as f64 / p2.synapse_secs,
        baseline: o.updates as f64 / p2.baseline_secs,
        unit: "txns/s",
        higher_is_better: true,
        goal: goal("≥ 3×"),
    });

    if kafka.is_some() {
        // Initial copy does not go through the log; P7's memory bound is the embedded log's.
        return Ok(rows);
    }

    // ---- P8: initial copy ----
    eprintln!("P8: initial copy of bulk into empty databases: COPY | COPY, then synapse");
    tsyn.create_database("copy_pg")?;
    tsyn.create_database("copy_syn")?;
    tsyn.psql("copy_pg", SCHEMA)?;
    let t = Instant::now();
    let pipe = format!(
        "{psql} -X -q -d {src} -c 'COPY bulk TO STDOUT' | {psql} -X -q -d {dst} -c 'COPY bulk FROM STDIN'",
        psql = src.bindir().join("psql").display(),
        src = src.url("bench"),
        dst = tsyn.url("copy_pg")
    );
    let status = Command::new("sh").args(["-c", &pipe]).status()?;
    let pg_p8 = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("baseline COPY pipe failed");
    }
    let mut copy_cfg = synapse_capture::CaptureConfig::new("copy", src.url("bench").parse()?);
    copy_cfg.slot = "bench_copy".into();
    copy_cfg.tables = vec!["public.bulk".into()];
    copy_cfg.publication = "bench_copy".into();
    let copier = synapse_capture::Capture::connect(copy_cfg).await?;
    let prepared = copier.prepare().await?;
    let t = Instant::now();
    let report = synapse_apply::initial_copy::run(
        &copier,
        &prepared.tables,
        &tsyn.url("copy_syn").parse()?,
        o.copy_parallelism,
        Default::default(),
    )
    .await?;
    let syn_p8 = t.elapsed().as_secs_f64();
    source.batch_execute("SELECT pg_drop_replication_slot('bench_copy')").await?;
    if report.rows != o.rows {
        bail!("synapse copied {} rows, expected {}", report.rows, o.rows);
    }
    rows.push(Row {
        id: "P8",
        what: format!("initial copy, {} rows", o.rows),
        synapse: o.rows as f64 / syn_p8,
        baseline: o.rows as f64 / pg_p8,
        unit: "rows/s",
        higher_is_better: true,
        goal: "≥ 0.9×".into(),
    });

    // ---- P7: one large transaction ----
    if o.big_mb > 0 && round == 0 {
        let n = o.big_mb * 1024 * 1024 / 256;
        eprintln!("P7: one transaction of ~{} MB ({n} rows) while synapse is stopped", o.big_mb);
        tpg.psql("bench", "ALTER SUBSCRIPTION sub DISABLE")?;
        source.execute("SELECT pg_create_logical_replication_slot('bench_recv7', 'pgoutput')", &[]).await?;
        source
            .batch_execute(&format!(
                "INSERT INTO huge SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, {n}) g"
            ))
            .await?;
        source.batch_execute("INSERT INTO marker VALUES (7, 'p7')").await?;
        let end: String = source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        let mut recv = recvlogical(&src, "bench_recv7", &end).spawn()?;
        let mut recv_peak: f64 = 0.0;
        while recv.try_wait()?.is_none() {
            recv_peak = recv_peak.max(peak_rss_mib(recv.id()).unwrap_or(0.0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        source.batch_execute("SELECT pg_drop_replication_slot('bench_recv7')").await?;
        let mut child = spawn_synapse(&config, &log)?;
        let mut peak: f64 = 0.0;
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            peak = peak.max(peak_rss_mib(child.id()).unwrap_or(0.0));
            if syn_target.query_opt("SELECT 1 FROM marker WHERE id = 7", &[]).await?.is_some() {
                break;
            }
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                bail!("P7 did not complete; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop(&mut child)?;
        rows.push(Row {
            id: "P7",
            what: format!("peak RSS, one {} MB transaction", o.big_mb),
            synapse: peak,
            baseline: recv_peak,
            unit: "MiB",
            higher_is_better: false,
            goal: "< 256 MiB".into(),
        });
    }

    if o.profile && round == 0 {
        print_profile("P1", &work.path().join("P1.perf"))?;
        print_profile("P2", &work.path().join("P2.perf"))?;
    }
    Ok(rows)
}

impl Row {
    fn ratio(&self) -> f64 {
        if self.higher_is_better {
            self.synapse / self.baseline
        } else {
            self.baseline / self.synapse
        }
    }
}

/// Runs every scenario `repeat` times (fresh clusters each round) and prints the round with the
/// median ratio per scenario, and the spread: this machine is shared and noisy.
fn main() -> std::process::ExitCode {
    use clap::Parser;
    let options = Options::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNAPSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let _ = synapse_runtime::ops::metrics_handle();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(options)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(o: Options) -> anyhow::Result<()> {
    let want = |id: &str| o.scenarios.iter().any(|s| s.eq_ignore_ascii_case(id));
    let replication = ["P1", "P2", "P3", "P7", "P8"].iter().any(|id| want(id));
    let mut rounds = Vec::new();
    let mut notes = Vec::new();
    for round in 0..o.repeat.max(1) {
        eprintln!("== round {} of {}", round + 1, o.repeat.max(1));
        let mut rows = if replication { run_once(&o, round, None).await? } else { Vec::new() };
        if want("P1k") || want("P2k") || want("P3k") {
            eprintln!("P1k/P2k/P3k: the same with the log on a Kafka-protocol broker (tansu)");
            let broker = synapse_localpg::LocalBroker::start()?;
            rows.extend(run_once(&o, round, Some(broker.addr())).await?);
        }
        if want("P2M") {
            let work = tempfile::tempdir()?;
            let work = if std::env::var_os("SYNAPSE_BENCH_KEEP").is_some() {
                eprintln!("keeping the work directory {}", work.path().display());
                KeepDir::Kept(work.keep())
            } else {
                KeepDir::Temp(work)
            };
            let m = crate::mesh::run(o.updates, work.path())?;
            let per_sec = |secs: f64| m.updates as f64 / secs;
            notes.push(format!(
                "P2M round {}: {} txns from cold start — mesh of 3 writable nodes {:.2}s ({:.0} txns/s, each applied on 2 nodes), SynapseDB one way {:.2}s ({:.0} txns/s), publication/subscription one way {:.2}s ({:.0} txns/s); mesh / SynapseDB one way = {:.2}×",
                round + 1,
                m.updates,
                m.mesh_secs,
                per_sec(m.mesh_secs),
                m.oneway_secs,
                per_sec(m.oneway_secs),
                m.native_secs,
                per_sec(m.native_secs),
                m.oneway_secs / m.mesh_secs
            ));
            rows.push(Row {
                id: "P2c",
                what: format!("OLTP cold catch-up one way, {} txns", m.updates),
                synapse: per_sec(m.oneway_secs),
                baseline: per_sec(m.native_secs),
                unit: "txns/s",
                higher_is_better: true,
                goal: "—".into(),
            });
            rows.push(Row {
                id: "P2M",
                what: format!("OLTP over a 3-node mesh, {} txns", m.updates),
                synapse: per_sec(m.mesh_secs),
                baseline: per_sec(m.native_secs),
                unit: "txns/s",
                higher_is_better: true,
                goal: "—".into(),
            });
        }
        if want("P5") {
            let work = tempfile::tempdir()?;
            let p = crate::repair::run(o.rows, work.path()).await?;
            let pct = |bytes: u64| bytes as f64 * 100.0 / p.table_bytes as f64;
            let show = |name: &str, r: &Result<crate::repair::ToolRun, String>| match r {
                Ok(r) => format!(
                    "{name} {:.2}s, {:.0} KiB ({:.3}% of the table), {} keys",
                    r.secs,
                    r.bytes as f64 / 1024.0,
                    pct(r.bytes),
                    r.found
                ),
                Err(e) => format!("{name}: {e}"),
            };
            notes.push(format!(
                "P5 round {}: {} rows, table {:.0} MiB, 99 rows differ — synapse repair check {:.2}s, {:.0} KiB ({:.3}% of the table), {} keys; {}; {}",
                round + 1,
                p.rows,
                p.table_bytes as f64 / 1048576.0,
                p.synapse.secs,
                p.synapse.bytes as f64 / 1024.0,
                pct(p.synapse.bytes),
                p.synapse.found,
                show("pg_comparator", &p.pg_comparator),
                show("reladiff", &p.reladiff),
            ));
            notes.push(format!(
                "P5 round {}: repair track {:.2}s (both nodes: triggers, bucket index, digests seeded); then checks each after {} rows updated alike on both nodes — `synapse repair check` (a new process) {:.3}s, {:.0} KiB, {} keys ({:.0}× faster than the cold check, {}); in a running synapse (admin API path, connections open) {:.4}s (median of {}, quartiles {:.4}–{:.4}s), {:.0} KiB, {} keys ({:.0}× faster than the cold check, {})",
                round + 1,
                p.track_secs,
                crate::repair::CHANGES,
                p.incremental.secs,
                p.incremental.bytes as f64 / 1024.0,
                p.incremental.found,
                p.synapse.secs / p.incremental.secs,
                match &p.pg_comparator {
                    Ok(r) => format!("{:.0}× faster than pg_comparator", r.secs / p.incremental.secs),
                    Err(_) => "pg_comparator not measured".into(),
                },
                p.warm.secs,
                crate::repair::WARM_RUNS,
                p.warm_quartiles.0,
                p.warm_quartiles.1,
                p.warm.bytes as f64 / 1024.0,
                p.warm.found,
                p.synapse.secs / p.warm.secs,
                match &p.pg_comparator {
                    Ok(r) => format!("{:.0}× faster than pg_comparator", r.secs / p.warm.secs),
                    Err(_) => "pg_comparator not measured".into(),
                },
            ));
            if [p.synapse.found, p.incremental.found, p.warm.found] != [99, 99, 99] {
                anyhow::bail!(
                    "P5: synapse repair check found {} (cold), {} (incremental), {} (running) differing keys, not 99",
                    p.synapse.found,
                    p.incremental.found,
                    p.warm.found
                );
            }
            let baseline = p.pg_comparator.as_ref().map_or(f64::NAN, |r| r.secs);
            rows.push(Row {
                id: "P5",
                what: format!("repair check {} rows, 99 differ", p.rows),
                synapse: p.synapse.secs,
                baseline,
                unit: "s (baseline pg_comparator)",
                higher_is_better: false,
                goal: "≥ 3×".into(),
            });
            rows.push(Row {
                id: "P5i",
                what: format!("incremental check after {} changes", crate::repair::CHANGES),
                synapse: p.warm.secs,
                baseline,
                unit: "s (baseline pg_comparator)",
                higher_is_better: false,
                goal: "≥ 100×".into(),
            });
            rows.push(Row {
                id: "P5b",
                what: "repair check bytes on the wire".into(),
                synapse: pct(p.synapse.bytes),
                baseline: p.pg_comparator.as_ref().map_or(f64::NAN, |r| pct(r.bytes)),
                unit: "% of table (baseline pg_comparator)",
                higher_is_better: false,
                goal: "≤ 1%".into(),
            });
        }
        if want("P6") {
            let p = crate::delivery::run(o.p6_events).await?;
            notes.push(format!(
                "P6 round {}: commit → delivery p50 {:.1} ms / p99 {:.1} ms (pg_recvlogical p50 {:.1} / p99 {:.1} ms)",
                round + 1,
                p.latency.0,
                p.latency.1,
                p.latency.2,
                p.latency.3
            ));
            rows.push(Row {
                id: "P6a",
                what: format!("webhooks batched ×{}, {} events", 100, p.events),
                synapse: p.batched.0,
                baseline: p.batched.1,
                unit: "events/s",
                higher_is_better: true,
                goal: "≥ 50k/s".into(),
            });
            rows.push(Row {
                id: "P6b",
                what: format!("webhooks per-key ordered, {} events", p.events / 5),
                synapse: p.keyed.0,
                baseline: p.keyed.1,
                unit: "events/s",
                higher_is_better: true,
                goal: "≥ 10k/s".into(),
            });
            rows.push(Row {
                id: "P6c",
                what: "commit→delivery p99 at 5k events/s".into(),
                synapse: p.latency.1,
                baseline: p.latency.3,
                unit: "ms",
                higher_is_better: false,
                goal: "< 50 ms".into(),
            });
        }
        rounds.push(rows);
    }
    println!(
        "\n{:<4} {:<38} {:>12} {:>12} {:>8}  {:<17} {:<10} {:<4} unit",
        "id", "scenario (median round)", "synapse", "baseline", "ratio", "ratio min–max", "goal", "met"
    );
    let ids: Vec<&str> = rounds[0].iter().map(|r| r.id).collect();
    for id in ids {
        let mut of_id: Vec<&Row> = rounds.iter().filter_map(|rs| rs.iter().find(|r| r.id == id)).collect();
        of_id.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        let (lo, hi) = (of_id[0].ratio(), of_id[of_id.len() - 1].ratio());
        let r = of_id[of_id.len() / 2];
        println!(
            "{:<4} {:<38} {:>12.1} {:>12.1} {:>7.2}×  {:>6.2}–{:<9.2} {:<10} {:<4} {}",
            r.id,
            r.what,
            r.synapse,
            r.baseline,
            r.ratio(),
            lo,
            hi,
            r.goal,
            if r.goal == "—" {
                "—"
            } else if r.met() {
                "yes"
            } else {
                "no"
            },
            r.unit
        );
    }
    for n in &notes {
        println!("{n}");
    }
    println!("\nbaselines: P1/P2 PostgreSQL publication/subscription (apply worker held by a table lock); P2c/P2M publication/subscription one way, disabled during the workload (PostgreSQL 15 cannot replicate both ways without loops); P3/P7 pg_recvlogical to /dev/null; P1k/P2k/P3k the same baselines, synapse's log on tansu 0.6 (one broker, memory storage, loopback); P5 pg_comparator 2.3 (pgcmp extension, --no-lock), reladiff in the notes; P8 psql COPY | psql COPY; P6a/b the same bodies POSTed by a plain HTTP client (same batch and concurrency, unsigned, unordered); P6c pg_recvlogical (test_decoding) commit → COMMIT line.");
    Ok(())
}
