//! Scale-out through a consumer group: `synapse run` processes with the same `log.kafka.group`
//! share two sources. A second process takes one source over; kill -9 of the first hands its
//! source to the second after the session timeout; a third joins and the second leaves with
//! SIGTERM. All the while two workloads run; at the end each target equals its source row for
//! row and its counter proves every source transaction applied exactly once.
//!
//! On tansu (a real broker process) and on librdkafka's mock brokers. tansu 0.6 never evicts a
//! member that died (its JoinGroup answers kept naming the killed process as the group's leader
//! 60 s later, and the survivors waited in SyncGroup for its assignment): the kill -9 step runs
//! on the mock brokers only, which expire sessions as Apache Kafka does.
#![allow(clippy::unwrap_used)]

mod common;

use common::{ledger_schema, log_tail, paced_ledger_workload, spawn_run, terminate, Synapse};
use rdkafka::consumer::Consumer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalBroker, LocalCluster};

const DBS: [&str; 2] = ["app1", "app2"];

struct Setup {
    source: LocalCluster,
    target: LocalCluster,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl Setup {
    fn applied(&self, db: &str) -> u64 {
        self.target.psql(db, "SELECT n FROM counters").ok().and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    fn log(&self, process: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{process}.log"))
    }

    /// Waits until both targets applied 20 more source transactions.
    fn both_progress(&self, phase: &str, logs: &[&str]) {
        let before: Vec<u64> = DBS.iter().map(|d| self.applied(d)).collect();
        let deadline = Instant::now() + Duration::from_secs(90);
        while DBS.iter().zip(&before).any(|(d, b)| self.applied(d) < b + 20) {
            if Instant::now() > deadline {
                let tails: Vec<String> = logs.iter().map(|p| log_tail(&self.log(p))).collect();
                panic!("replication stalled after {phase}:\n{}", tails.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn run(&self, process: &str) -> Synapse {
        spawn_run(&self.config, &self.log(process))
    }
}

/// How many times `process` logged taking a source.
fn assigned(setup: &Setup, process: &str) -> usize {
    std::fs::read_to_string(setup.log(process)).unwrap_or_default().matches("source assigned to this process").count()
}

fn wait_for(what: &str, setup: &Setup, logs: &[&str], mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ok() {
        if Instant::now() > deadline {
            let tails: Vec<String> = logs.iter().map(|p| log_tail(&setup.log(p))).collect();
            panic!("{what} did not happen:\n{}", tails.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn processes_in_a_group_share_sources_on_a_kafka_protocol_broker() {
    let broker = LocalBroker::start().unwrap();
    share_and_hand_over(broker.addr(), false);
}

#[test]
fn a_killed_member_hands_its_source_over_after_the_session_timeout() {
    let mock = rdkafka::mocking::MockCluster::new(3).unwrap();
    // The mock brokers implement no CreateTopics: the topics exist beforehand.
    for node in ["a", "c"] {
        for kind in ["changes", "consumers"] {
            mock.create_topic(&format!("synapse.{node}.{kind}"), 1, 3).unwrap();
        }
    }
    share_and_hand_over(&mock.bootstrap_servers(), true);
}

fn share_and_hand_over(brokers: &str, kill_nine: bool) {
    let source = LocalCluster::start(ClusterOptions::default()).unwrap();
    let target = LocalCluster::start(ClusterOptions::default()).unwrap();
    for db in DBS {
        source.create_database(db).unwrap();
        target.create_database(db).unwrap();
        source.psql(db, &ledger_schema(5_000)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:
  dir: {dir}
  kafka:
    brokers: {brokers}
    batch_records: {batch}
    request_timeout_secs: 5
    group: synapse.workers
    properties:
      session.timeout.ms: 6000
      heartbeat.interval.ms: 1000
sources:
  - {{ name: a, url: '{a}', heartbeat_interval_secs: 0.5 }}
  - {{ name: c, url: '{c}', heartbeat_interval_secs: 0.5 }}
targets:
  - {{ name: b, url: '{b}', sources: [a] }}
  - {{ name: d, url: '{d}', sources: [c] }}
ops:
  listen: ''
api:
  listen: ''
",
            dir = dir.path().join("log").display(),
            batch = kill_nine, // the mock brokers count offsets per record (see `batch_records`)
            a = source.url("app1"),
            c = source.url("app2"),
            b = target.url("app1"),
            d = target.url("app2"),
        ),
    )
    .unwrap();
    let setup = Setup { source, target, dir, config };
    let stop = Arc::new(AtomicBool::new(false));
    let done: Vec<Arc<AtomicU64>> = DBS.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let loads: Vec<_> = DBS
        .iter()
        .zip(&done)
        // The mock brokers keep only a partition's last 5 MiB and delete its oldest message on
        // every append past that (Kafka deletes whole segments, rarely): a topic turned over
        // every few seconds is deleted under a reader before it starts (LOG008). Paced on the
        // mock, a topic stays under 5 MiB for the test (docs/decisions/0007-test-brokers.md).
        .map(|(db, n)| {
            let pause = Duration::from_millis(if kill_nine { 30 } else { 3 });
            paced_ledger_workload(setup.source.url(db), 50, pause, stop.clone(), n.clone())
        })
        .collect();

    // One member: it runs both sources.
    let mut p1 = setup.run("p1");
    wait_for("p1 taking both sources", &setup, &["p1"], || assigned(&setup, "p1") >= 2);
    setup.both_progress("p1 started alone", &["p1"]);

    // A second member: one source moves to it, the other keeps running in p1.
    let mut p2 = setup.run("p2");
    wait_for("p2 taking a source", &setup, &["p1", "p2"], || assigned(&setup, "p2") >= 1);
    setup.both_progress("p2 joined", &["p1", "p2"]);
    let p2_owned_before_kill = assigned(&setup, "p2");

    if kill_nine {
        // kill -9 of p1: after the session timeout its source moves to p2.
        p1.kill().unwrap();
        p1.wait().unwrap();
        wait_for("p2 taking p1's source", &setup, &["p1", "p2"], || assigned(&setup, "p2") > p2_owned_before_kill);
        setup.both_progress("p1 was killed", &["p2"]);
    } else {
        // p1 leaves cleanly: its source moves to p2 at once.
        terminate(&mut p1);
        wait_for("p2 taking p1's source", &setup, &["p1", "p2"], || assigned(&setup, "p2") > p2_owned_before_kill);
        setup.both_progress("p1 left", &["p2"]);
    }

    // A third member joins, then p2 leaves cleanly: p3 ends with both sources.
    let mut p3 = setup.run("p3");
    wait_for("p3 taking a source", &setup, &["p2", "p3"], || assigned(&setup, "p3") >= 1);
    terminate(&mut p2);
    wait_for("p3 taking both sources", &setup, &["p2", "p3"], || assigned(&setup, "p3") >= 2);
    setup.both_progress("p2 left", &["p3"]);

    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.join().unwrap();
    }
    let rows =
        "SELECT count(*) || ':' || md5(string_agg(id || '/' || txn_no || '/' || payload, ',' ORDER BY id)) FROM ledger";
    for (db, n) in DBS.iter().zip(&done) {
        if let Err(e) =
            synapse_localpg::wait_until_equal(&setup.source, &setup.target, db, rows, Duration::from_secs(120))
        {
            panic!("{db}: {e}\n{}", log_tail(&setup.log("p3")));
        }
        let txns = n.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while setup.applied(db) < txns && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(setup.applied(db), txns, "{db}: each workload transaction bumps the counter once");
    }
    // The group's committed offsets follow the appliers: Kafka tooling shows no lag once caught up.
    let group: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "synapse.workers")
        .create()
        .unwrap();
    for node in ["a", "c"] {
        let topic = format!("synapse.{node}.changes");
        let (_, high) = group.fetch_watermarks(&topic, 0, Duration::from_secs(10)).unwrap();
        let mut committed = -1;
        let deadline = Instant::now() + Duration::from_secs(30);
        while committed != high && Instant::now() < deadline {
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition(&topic, 0);
            let offsets = group.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
            committed = match offsets.find_partition(&topic, 0).map(|p| p.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => -1,
            };
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(committed, high, "{topic}: the group's committed offset is not the high watermark");
    }
    terminate(&mut p3);
    for p in ["p1", "p2", "p3"] {
        let text = std::fs::read_to_string(setup.log(p)).unwrap_or_default();
        assert!(!text.contains("panicked"), "{p} panicked:\n{text}");
    }
}
