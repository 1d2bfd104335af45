//! kill -9 of synapse at random points during a workload, then restart: the target must equal
//! the source row for row, and a per-transaction counter proves each transaction applied once.
#![allow(clippy::unwrap_used)]

mod common;

use common::{ledger_schema, ledger_workload as workload, spawn_run, wait_equal, Nodes};
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn kill_dash_nine_at_random_points_loses_and_duplicates_nothing() {
    let nodes = Nodes::start(&ledger_schema(300_000));
    let config = nodes.config("");
    kill_nine_at_random_points(&nodes, &config);
}

/// The same on the Kafka log: a kill lands between messages of one transaction, between the
/// broker's acknowledgement and the slot's confirmation, or in an applier reading from Kafka.
#[test]
fn kill_dash_nine_on_the_kafka_log_loses_and_duplicates_nothing() {
    let broker = synapse_localpg::LocalBroker::start().unwrap();
    let nodes = Nodes::start(&ledger_schema(300_000));
    let config = nodes.kafka_config(broker.addr());
    kill_nine_at_random_points(&nodes, &config);
    // The stream went through the broker, not the embedded log.
    assert!(!nodes.dir.path().join("log/a.redb").exists(), "an embedded log was written");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let log = rt.block_on(synapse_log::KafkaLog::open(synapse_log::KafkaLogOptions::new(broker.addr(), "a"))).unwrap();
    assert!(synapse_log::ChangeLog::next_offset(&log) > 1000, "the changes topic is nearly empty");
}

fn kill_nine_at_random_points(nodes: &Nodes, config: &std::path::Path) {
    let config = config.to_owned();
    let log = nodes.dir.path().join("synapse.log");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = workload(nodes.source.url("app"), 2000, stop.clone(), done.clone());
    let mut rng = rand::thread_rng();
    let kill_after = |child: &mut std::process::Child, ms: u64| {
        std::thread::sleep(Duration::from_millis(ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    };
    // 4 kills during the initial copy (each rerun truncates and re-copies the interrupted table).
    for _ in 0..4 {
        kill_after(&mut spawn_run(&config, &log), rng.gen_range(200..700));
    }
    // Let one run finish the copy, then 20 kills at random points of streaming.
    let mut child = spawn_run(&config, &log);
    nodes.wait_copied(2, Duration::from_secs(120), &log);
    kill_after(&mut child, rng.gen_range(0..500));
    for _ in 0..20 {
        kill_after(&mut spawn_run(&config, &log), rng.gen_range(100..1500));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let txns = done.load(Ordering::Relaxed);
    assert!(txns > 100, "the workload ran only {txns} transactions");

    let mut child = spawn_run(&config, &log);
    let rows =
        "SELECT count(*) || ':' || md5(string_agg(id || '/' || txn_no || '/' || payload, ',' ORDER BY id)) FROM ledger";
    if let Err(e) =
        synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", rows, Duration::from_secs(120))
    {
        let text = std::fs::read_to_string(&log).unwrap();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        let applied =
            nodes.target.psql("app", "SELECT next_offset, commit_lsn FROM synapse.applied").unwrap_or_default();
        panic!("{e}\napplied: {applied}\nlast lines of synapse's log (newest first):\n{}", tail.join("\n"));
    }
    wait_equal(&nodes.source, &nodes.target, "SELECT n FROM counters", Duration::from_secs(10));
    child.kill().unwrap();
    child.wait().unwrap();
    let n: u64 = nodes.target.psql("app", "SELECT n FROM counters").unwrap().parse().unwrap();
    assert_eq!(n, txns, "each workload transaction bumps the counter once");
    let text = std::fs::read_to_string(&log).unwrap();
    if std::env::var_os("SYNAPSE_TEST_SHOW_LOG").is_some() {
        eprintln!("{text}");
    }
    assert!(!text.contains("panicked"), "synapse panicked:\n{text}");
}

/// A tmpfs of `mb` MiB mounted at `dir` (root only: CI and the test machines run as root),
/// unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, mb: u32) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The embedded log's disk fills up while changes stream in: appends fail without anything
/// being acknowledged (the slot does not advance past what is durable), synapse keeps running
/// and retrying, and once space is freed the pipeline goes on by itself — nothing lost, nothing
/// twice (the counter).
#[test]
fn a_full_log_disk_loses_nothing_and_recovers_when_freed() {
    let nodes = Nodes::start(&ledger_schema(1_000));
    let config = nodes.config("");
    let log_dir = nodes.dir.path().join("log");
    let _disk = SmallDisk::mount(&log_dir, 64);
    let out = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &out);
    nodes.wait_copied(2, Duration::from_secs(60), &out);
    // Leave about 1 MiB free, then write far more than that.
    let filler = log_dir.join("filler");
    let free_kb = {
        let df = std::process::Command::new("df")
            .args(["-k", "--output=avail", log_dir.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&df.stdout).lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let status = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", filler.display()),
            "bs=1k",
            &format!("count={}", free_kb.saturating_sub(1024)),
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let txns = Arc::new(AtomicU64::new(0));
    let writer = workload(nodes.source.url("app"), 2_000, stop.clone(), txns.clone());
    // Appends now fail for lack of space: retried, never acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(&out).unwrap_or_default().contains("LOG001") {
        assert!(std::time::Instant::now() < deadline, "the log never ran out of space:\n{}", common::log_tail(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "synapse exited on a full disk:\n{}", common::log_tail(&out));
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let q = "SELECT count(*) || ':' || sum(txn_no) || ':' || (SELECT n FROM counters) FROM ledger";
    wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(120));
    let n = nodes.target.psql("app", "SELECT n FROM counters").unwrap();
    assert_eq!(n, txns.load(Ordering::SeqCst).to_string(), "each transaction applied exactly once");
    assert!(std::fs::read_to_string(&out).unwrap().contains("reopened the log store"), "{}", common::log_tail(&out));
    child.kill().unwrap();
    child.wait().unwrap();
}
