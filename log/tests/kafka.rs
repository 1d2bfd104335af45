//! The Kafka log against a real Kafka-protocol broker (tansu, see `synapse_localpg::LocalBroker`).
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

mod common;

use common::{contract, txn};
use rdkafka::mocking::MockCluster;
use std::time::Duration;
use synapse_localpg::LocalBroker;
use synapse_log::{ChangeLog, KafkaLog, KafkaLogOptions};
use synapse_schemas::{Datum, LogRecord, Relation, ReplicaIdentity};

/// The log contract (`common::contract`) on Kafka: append and read back in order, a writer that
/// died mid-transaction recovered with a `Discarded` marker by a new process (a new `KafkaLog`
/// on the same topics), relations and consumer positions found again after reopening, seeks by
/// cursor and time, readers in other processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_contract_holds_on_a_kafka_protocol_broker() {
    let b = LocalBroker::start().unwrap();
    // tansu counts offsets per record batch (see `batch_records`).
    let options = KafkaLogOptions { batch_records: false, ..KafkaLogOptions::new(b.addr(), "n1") };
    contract(|| async { KafkaLog::open(options.clone()).await.unwrap() }, true).await;
}

/// The same on librdkafka's mock brokers, which count offsets per record as Apache Kafka does:
/// the producer's normal mode (several records per record batch). The mock implements no
/// CreateTopics: the topics are created beforehand, as an operator without granting
/// CreateTopics would, and `open` must use them as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_contract_holds_on_kafka_semantics_with_pre_created_topics() {
    let mock = MockCluster::new(3).unwrap();
    for topic in ["synapse.n1.changes", "synapse.n1.consumers"] {
        mock.create_topic(topic, 1, 3).unwrap();
    }
    let options = KafkaLogOptions::new(&mock.bootstrap_servers(), "n1");
    contract(|| async { KafkaLog::open(options.clone()).await.unwrap() }, true).await;
}

/// Clear, classified errors for what operators get wrong: topics missing where they cannot be
/// created (LOG006, naming the topic), brokers that do not answer (transient LOG005).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_and_unreachable_brokers_are_reported_by_name() {
    let mock = MockCluster::new(1).unwrap();
    let options =
        KafkaLogOptions { timeout: Duration::from_secs(2), ..KafkaLogOptions::new(&mock.bootstrap_servers(), "n1") };
    let e = KafkaLog::open(options).await.err().expect("no topics and no CreateTopics must fail");
    assert_eq!(e.code(), "LOG006", "{e}");
    assert!(e.to_string().contains("synapse.n1.changes"), "{e}");
    assert!(e.hint().contains("CreateTopics"), "{}", e.hint());

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let options =
        KafkaLogOptions { timeout: Duration::from_secs(2), ..KafkaLogOptions::new(&format!("127.0.0.1:{port}"), "n1") };
    let started = std::time::Instant::now();
    let e = KafkaLog::open(options).await.err().expect("no broker must fail");
    assert!(started.elapsed() < Duration::from_secs(30), "open hung for {:?}", started.elapsed());
    assert_eq!(e.code(), "LOG005", "{e}");
    assert!(e.is_transient(), "an unreachable broker may come back: {e}");
    assert!(e.hint().contains("log.kafka.brokers"), "{}", e.hint());
}

/// A row change larger than a Kafka message may be is refused before anything of its append is
/// written, naming the table and both sizes (definite: it would fail again); the log stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_larger_than_a_message_is_refused_by_table_and_size() {
    let mock = MockCluster::new(1).unwrap();
    for topic in ["synapse.n1.changes", "synapse.n1.consumers"] {
        mock.create_topic(topic, 1, 1).unwrap();
    }
    let options =
        KafkaLogOptions { max_message_bytes: 10_000, ..KafkaLogOptions::new(&mock.bootstrap_servers(), "n1") };
    let log = KafkaLog::open(options).await.unwrap();
    let rel = Relation {
        oid: 5,
        schema: "public".into(),
        table: "docs".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![],
    };
    log.append(vec![LogRecord::Relation(rel)]).await.unwrap();
    let before = log.next_offset();
    let mut big = txn(100, 2, 1_000);
    if let LogRecord::Change(c) = &mut big[2] {
        c.after = Some(vec![Datum::Text("x".repeat(20_000)), Datum::Null].into());
    }
    let e = log.append(big).await.unwrap_err();
    assert_eq!(e.code(), "LOG010", "{e}");
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("public.docs") && e.to_string().contains("10000"), "{e}");
    assert!(e.hint().contains("max_message_bytes"), "{}", e.hint());
    assert_eq!(log.next_offset(), before, "nothing of the refused append was written");
    log.append(txn(200, 2, 2_000)).await.unwrap();
    assert!(log.next_offset() > before);
}
