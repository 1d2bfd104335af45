//! `synapse-bench`: end-to-end benchmarks against PostgreSQL's own tools, measured in the same
//! run on the same machine, printing both figures and the ratio.
//!
//! | id | what | baseline |
//! |----|------|----------|
//! | P1 | catch-up after 1M rows in 10k-row transactions were written while paused | publication/subscription |
//! | P2 | catch-up after 100k single-row update transactions | publication/subscription |
//! | P3 | capture drain of the P1 WAL into the durable log | pg_recvlogical to /dev/null |
//! | P7 | one ~1 GB transaction replicated while it runs: peak RSS (goal < 256 MB), start → target commit in source times (goal ≤ 2×), also on protocol 1 (P7t1) | publication/subscription with `streaming = on` (its apply worker's RSS) |
//! | P8 | initial copy of the P1 table into an empty target | COPY TO STDOUT piped into COPY FROM STDIN |
//! | P2M | P2's transactions written a third on each of three mesh nodes, cold catch-up (see mesh.rs) | publication/subscription one way; SynapseDB one way |
//! | P2W | P2's transactions written by the application on one node into its mesh table (the local-write trigger versions each) | the same writes into a plain table on that node |
//! | P5 | `repair check` of 1M rows on two nodes with 99 differences: time and bytes on the wire (see repair.rs) | pg_comparator; reladiff |
//! | P6 | webhook delivery: events/s batched and per key, commit → delivery p99 (see delivery.rs) | plain HTTP client; pg_recvlogical |
//!
//! | P4 | commit → applied latency quartiles and p99 at a fixed offered rate, both replicating | publication/subscription |
//! | S2, S4 | apply throughput of the P1 workload into 2 and 4 hash shards, from the same backlog (see shards.rs) | SynapseDB into 1 shard |
//! | SX | an online split of the 1-shard set into 2 new shards: start until both hold their rows | `pg_dump --data-only \| psql` of the same table |
//!
//! P1 and P2 compare by `--method` (see [`Method`]): by default both replicators are stopped
//! during the workload and each is timed alone from the same WAL backlog, start-up included.
//!
//! Run from a release build: `cargo build --release && target/release/synapse-bench`; the
//! scenarios that run `synapse run` start the `synapse` binary next to this one.

mod delivery;
mod mesh;
mod repair;
mod replication;
mod shards;
mod vector;

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

pub(crate) enum KeepDir {
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
    /// Rows per transaction of P1's workload.
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
    /// How P1/P2 compare the two replicators (see `Method`).
    #[arg(long, value_enum, default_value_t = Method::Backlog)]
    pub method: Method,
    /// P4's offered rate: single-row transactions per second on the source.
    #[arg(long, default_value_t = 5_000)]
    pub p4_rate: u64,
    /// How long P4 writes at that rate.
    #[arg(long, default_value_t = 20)]
    pub p4_seconds: u64,
    /// Scenarios to run (comma-separated): P1,P2,P3,P4,P7,P8 run together; P1k,P2k,P3k (the same
    /// through a Kafka-protocol broker) together; P2M, P5, P6, S (shards) and V (vector index) alone.
    #[arg(long, value_delimiter = ',', default_value = "P1,P2,P3,P4,P7,P8,P1k,P2k,P3k,P2M,P5,P6,S,V")]
    pub scenarios: Vec<String>,
    /// P1k/P2k/P3k: a librdkafka property for synapse's Kafka clients (`key=value`, repeatable),
    /// e.g. `--kafka-property compression.type=zstd` to compare producer settings.
    #[arg(long = "kafka-property", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
    /// Events captured and delivered in P6.
    #[arg(long, default_value_t = 200_000)]
    pub p6_events: u64,
    /// Vectors of scenario V.
    #[arg(long, default_value_t = 100_000)]
    pub vectors: usize,
    /// Dimensions of scenario V's vectors.
    #[arg(long, default_value_t = 128)]
    pub vector_dims: usize,
    /// Seconds of 1,000 vector updates/s in V5 (sync lag through `synapse run`).
    #[arg(long, default_value_t = 30)]
    pub vector_sync_secs: u64,
}

/// How P1 and P2 compare synapse with PostgreSQL's own logical replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Both stopped while the workload runs (the subscription disabled, synapse not
    /// running), then each started alone and timed to the marker applied, start-up included:
    /// the same WAL backlog for both. The default: the fair comparison.
    Backlog,
    /// Both replicating while the workload runs: each side's time from the workload's start
    /// to the marker applied (throughput at saturation), and the lag left at its end.
    Live,
    /// Each applier held by a table lock during the workload while capture runs: synapse's
    /// capture decodes the whole WAL into its log, PostgreSQL's walsender stops once its socket
    /// is full. A head start for synapse; shows what decoupling capture from apply buys.
    Decoupled,
}

impl Method {
    fn describe(self) -> &'static str {
        match self {
            Method::Backlog => "both replicators stopped during the workload, then timed from the same backlog",
            Method::Live => "both replicating while the workload runs",
            Method::Decoupled => "appliers held by a lock, capture running (capture decoupled)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Method::Backlog => "catch-up from backlog",
            Method::Live => "live",
            Method::Decoupled => "catch-up, capture decoupled",
        }
    }
}

pub(crate) struct Row {
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
            "P1" => self.ratio() >= 1.5,
            "P2" => self.ratio() >= 2.0,
            "P4" => self.ratio() >= 1.0,
            "P3" => self.ratio() >= 0.8,
            "P8" => self.ratio() >= 0.9,
            "P7" => self.synapse < 256.0,
            "P7t" => self.synapse <= 2.0,
            "P5" => self.ratio() >= 3.0,
            "P5i" => self.ratio() >= 100.0,
            "P5b" => self.synapse <= 1.0,
            "P6a" => self.synapse >= 50_000.0,
            "P6b" => self.synapse >= 10_000.0,
            "P6c" => self.synapse < 50.0,
            "V1" => self.synapse >= 0.95,
            "V5" => self.synapse < 2_000.0,
            _ => false,
        }
    }
}

pub(crate) async fn sql(url: &str) -> anyhow::Result<Client> {
    Ok(synapse_postgres::connect_str(url, "bench").await?)
}

pub(crate) async fn wait_marker(client: &Client, id: i32, timeout: Duration) -> anyhow::Result<()> {
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
pub(crate) fn recvlogical(src: &LocalCluster, slot: &str, end: &str) -> Command {
    let mut c = Command::new(src.bindir().join("pg_recvlogical"));
    c.args(["-d", &src.url("bench"), "--slot", slot, "--start", "--endpos", end]);
    c.args(["-o", "proto_version=1", "-o", "publication_names=synapse", "-f", "/dev/null", "--no-loop"]);
    c
}

/// Peak resident set (VmHWM) of a live process, in MiB.
pub(crate) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Fetches synapse's /metrics and sums the `_sum` series of the named summaries.
pub(crate) fn scrape(listen: &str, names: &[&str]) -> Vec<(String, f64)> {
    let body = metrics_text(listen);
    names.iter().map(|n| (n.to_string(), series_sum(&body, &format!("{n}_sum"), ""))).collect()
}

/// The sum of the values of every series in `body` whose line starts with `prefix` and
/// contains `needle` (every label set of a metric).
fn series_sum(body: &str, prefix: &str, needle: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Synapse's `/metrics` page (empty if it does not answer).
fn metrics_text(listen: &str) -> String {
    use std::io::{Read, Write};
    let mut body = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(listen) {
        let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        let _ = s.read_to_string(&mut body);
    }
    body
}

/// For each histogram in `names` (seconds, every label set summed): how many observations it
/// has and how many of them took longer than `over` (one of the catalog's bucket bounds).
pub(crate) fn scrape_slow(listen: &str, names: &[&str], over: &str) -> Vec<(String, f64, f64)> {
    let body = metrics_text(listen);
    names
        .iter()
        .map(|n| {
            let count = series_sum(&body, &format!("{n}_count"), "");
            let fast = series_sum(&body, &format!("{n}_bucket"), &format!("le=\"{over}\""));
            (n.to_string(), count, count - fast)
        })
        .collect()
}

/// Starts a system-wide perf recording (every process: walsender, synapse, target backends).
pub(crate) fn start_profile(enabled: bool, out: &Path) -> Option<Child> {
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

pub(crate) fn stop_profile(p: Option<Child>) -> anyhow::Result<()> {
    if let Some(mut p) = p {
        Command::new("kill").args(["-INT", &p.id().to_string()]).status()?;
        p.wait()?;
    }
    Ok(())
}

/// Prints CPU share per process and the top symbols of the synapse process.
pub(crate) fn print_profile(label: &str, data: &Path) -> anyhow::Result<()> {
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
    // Colours only on a terminal: piped into a file or a pager, escape codes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
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
    let replication = ["P1", "P2", "P3", "P4", "P7", "P8"].iter().any(|id| want(id));
    let mut rounds = Vec::new();
    let mut notes = Vec::new();
    for round in 0..o.repeat.max(1) {
        eprintln!("== round {} of {}", round + 1, o.repeat.max(1));
        let mut rows = if replication { replication::run_once(&o, round, None).await? } else { Vec::new() };
        if want("P1k") || want("P2k") || want("P3k") {
            eprintln!("P1k/P2k/P3k: the same with the log on a Kafka-protocol broker (tansu)");
            let broker = synapse_localpg::LocalBroker::start()?;
            rows.extend(replication::run_once(&o, round, Some(broker.addr())).await?);
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
            rows.push(Row {
                id: "P2W",
                what: format!("app writes, mesh table vs plain, {} txns", m.updates),
                synapse: per_sec(m.mesh_write_secs),
                baseline: per_sec(m.plain_write_secs),
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
        if want("V") {
            let work = tempfile::tempdir()?;
            let v = crate::vector::run(o.vectors, o.vector_dims, work.path())?;
            let what = |m: &str| format!("{m}, {} × {} clustered, k 10 (baseline faiss HNSW)", v.n, v.dims);
            for (id, what, synapse, baseline, unit, higher) in [
                ("V1", what("recall@10"), v.ours_recall, v.faiss_recall, "", true),
                ("V2", what("queries/s, one thread"), v.ours_qps, v.faiss_qps, "queries/s", true),
                ("V3", what("query p99"), v.ours_p99_ms, v.faiss_p99_ms, "ms", false),
                ("V4", what("build"), v.ours_build_secs, v.faiss_build_secs, "s", false),
            ] {
                let goal = if id == "V1" { "≥ 0.95" } else { "—" };
                rows.push(Row { id, what, synapse, baseline, unit, higher_is_better: higher, goal: goal.into() });
            }
            notes.push(format!(
                "V round {}: the store alone: 200-update batches every 200 ms commit in p50 {:.3} s, p99 {:.3} s; one batch of {}",
                round + 1,
                v.batch_p50_secs,
                v.batch_p99_secs,
                v.sweep.iter().map(|(n, s)| format!("{n} updates {s:.3} s")).collect::<Vec<_>>().join(", ")
            ));
            let sync = tempfile::tempdir()?;
            let s = crate::vector::run_sync(o.vectors, o.vector_dims, o.vector_sync_secs, sync.path()).await?;
            rows.push(Row {
                id: "V5",
                what: format!("commit → searchable p99 at 1k updates/s, {} × {}", s.rows, s.dims),
                synapse: s.ours[1] * 1e3,
                baseline: s.baseline[1] * 1e3,
                unit: "ms (baseline pub/sub replica of the table, no index)",
                higher_is_better: false,
                goal: "< 2,000 ms".into(),
            });
            notes.push(format!(
                "V5 round {}: `synapse run` loaded {} × {} from a snapshot in {:.1} s; {:.0} vector updates/s committed for {} s; commit → searchable (a search waiting with after_lsn) p50 {:.3} s, p99 {:.3} s, max {:.3} s over {} samples; the same commits on a PostgreSQL subscriber p50 {:.3} s, p99 {:.3} s, max {:.3} s",
                round + 1,
                s.rows,
                s.dims,
                s.load_secs,
                s.updates_per_sec,
                o.vector_sync_secs,
                s.ours[0],
                s.ours[1],
                s.ours[2],
                s.samples,
                s.baseline[0],
                s.baseline[1],
                s.baseline[2]
            ));
        }
        if want("S") {
            let work = tempfile::tempdir()?;
            let m = crate::shards::run(o.rows, o.txn_rows, work.path()).await?;
            let secs = &m.apply_secs;
            let per_sec = |s: f64| o.rows as f64 / s;
            rows.push(Row {
                id: "SX",
                what: format!("online split 1 → 2 shards, {} rows", o.rows),
                synapse: m.split_secs,
                baseline: m.dump_secs,
                unit: "s (baseline pg_dump | psql)",
                higher_is_better: false,
                goal: "—".into(),
            });
            for (k, s) in crate::shards::COUNTS.iter().zip(secs).skip(1) {
                rows.push(Row {
                    id: if *k == 2 { "S2" } else { "S4" },
                    what: format!("apply into {k} shards, {} rows backlog", o.rows),
                    synapse: per_sec(*s),
                    baseline: per_sec(secs[0]),
                    unit: "rows/s (baseline 1 shard)",
                    higher_is_better: true,
                    goal: "—".into(),
                });
            }
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
    println!("\nbaselines: P1/P2 PostgreSQL publication/subscription (method: {}); P4 the same subscription, both replicating; P2c/P2M publication/subscription one way, disabled during the workload (PostgreSQL 15 cannot replicate both ways without loops); P2W the same writes into a plain table on the same node; P3 pg_recvlogical to /dev/null; P7 publication/subscription with streaming = on, each replicator alone while the transaction runs (RSS: its apply worker's); P1k/P2k/P3k the same baselines, synapse's log on tansu 0.6 (one broker, memory storage, loopback); P5 pg_comparator 2.3 (pgcmp extension, --no-lock), reladiff in the notes; P8 psql COPY | psql COPY; P6a/b the same bodies POSTed by a plain HTTP client (same batch and concurrency, unsigned, unordered); P6c pg_recvlogical (test_decoding) commit → COMMIT line; S2/S4 synapse into one shard, same backlog, every shard a database on one server; SX pg_dump --data-only | psql of the same table into one database; V1–V4 faiss-cpu IndexHNSWFlat (M 16, efConstruction 128, efSearch 100) on the same vectors and queries (both build on every core and answer on one thread), ground truth by brute force; V5 a PostgreSQL subscription of the same table (commit → row visible, no index: what the index adds to plain replication).", o.method.short());
    Ok(())
}
