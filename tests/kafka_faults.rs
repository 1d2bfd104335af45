//! Broker faults under a running pipeline, injected with librdkafka's mock cluster (three
//! in-process brokers on loopback ports that the `synapse run` child connects to): request
//! errors and dropped connections on produce, fetch and offset requests, partition leader
//! changes, a leader broker down briefly and then longer than the request timeout. After each,
//! the target must equal the source and a per-transaction counter proves each transaction
//! applied once.
#![allow(clippy::unwrap_used)]

mod common;

use common::{ledger_schema, ledger_workload, log_tail, spawn_run, Nodes};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHANGES: &str = "synapse.a.changes";
const CONSUMERS: &str = "synapse.a.consumers";

#[test]
fn broker_faults_mid_stream_lose_and_duplicate_nothing() {
    let mock = MockCluster::new(3).unwrap();
    // The mock brokers do not implement CreateTopics: the topics exist before synapse starts,
    // as an operator without CreateTopics rights would have them.
    for topic in [CHANGES, CONSUMERS] {
        mock.create_topic(topic, 1, 3).unwrap();
        mock.partition_leader(topic, 0, Some(1)).unwrap();
    }
    let nodes = Nodes::start(&ledger_schema(20_000));
    let config = nodes.kafka_config(&mock.bootstrap_servers());
    // Apache Kafka semantics: several records per record batch, and a short request timeout so
    // that a broker down for 8 s fails appends (message timeout = 3 × request timeout).
    let yaml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("batch_records: false", "batch_records: true")
        .replace("request_timeout_secs: 5", "request_timeout_secs: 2");
    std::fs::write(&config, yaml).unwrap();
    let log = nodes.dir.path().join("synapse.log");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    // Large transactions of 200 rows, not 2,000: the mock brokers keep only the last 5 MB of a
    // partition (librdkafka's rdkafka_mock.c), and an applier retrying through a fault must
    // not find its records deleted.
    let load = ledger_workload(nodes.source.url("app"), 200, stop.clone(), done.clone());
    let mut child = spawn_run(&config, &log);
    nodes.wait_copied(2, Duration::from_secs(120), &log);
    let applied = || nodes.target.psql("app", "SELECT n FROM counters").unwrap().parse::<u64>().unwrap();
    // Each phase must let the stream move on afterwards: a fault that wedges it fails here.
    let progressed = |phase: &str| {
        let before = applied();
        let deadline = Instant::now() + Duration::from_secs(60);
        while applied() < before + 20 {
            assert!(Instant::now() < deadline, "the stream did not resume after {phase}:\n{}", log_tail(&log));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    progressed("the initial copy");

    use RDKafkaRespErr::*;
    // Retriable errors and dropped connections in the middle of produce, fetch and offset
    // requests: the idempotent producer retries without duplicating, readers re-fetch.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        ],
    );
    mock.request_errors(
        RDKafkaApiKey::ListOffsets,
        &[RD_KAFKA_RESP_ERR__TRANSPORT, RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE],
    );
    progressed("request errors");

    // Leader changes: the clients must follow the partition to its new leader.
    for leader in [2, 3] {
        for topic in [CHANGES, CONSUMERS] {
            mock.partition_leader(topic, 0, Some(leader)).unwrap();
        }
        progressed("a leader change");
    }

    // A failover: the leader goes down, another broker takes the partitions over.
    mock.broker_down(3).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for topic in [CHANGES, CONSUMERS] {
        mock.partition_leader(topic, 0, Some(1)).unwrap();
    }
    progressed("a failover");
    mock.broker_up(3).unwrap();

    // The leader down longer than appends may wait, with no failover: appends and reads fail,
    // capture and apply retry with backoff until the broker is back.
    mock.broker_down(1).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    mock.broker_up(1).unwrap();
    progressed("the leader's 8 s outage");

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let txns = done.load(Ordering::Relaxed);
    let rows =
        "SELECT count(*) || ':' || md5(string_agg(id || '/' || txn_no || '/' || payload, ',' ORDER BY id)) FROM ledger";
    if let Err(e) =
        synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", rows, Duration::from_secs(120))
    {
        panic!("{e}\n{}", log_tail(&log));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied() < txns && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(applied(), txns, "each workload transaction bumps the counter once");
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    if std::env::var_os("SYNAPSE_TEST_SHOW_LOG").is_some() {
        eprintln!("{text}");
    }
    assert!(!text.contains("panicked"), "synapse panicked:\n{text}");
    // The long outage was seen and retried, not slept through.
    assert!(text.contains("retrying"), "no retry was reported during the outage:\n{}", log_tail(&log));
}
