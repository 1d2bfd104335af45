//! The Kafka log against a real Kafka-protocol broker (tansu, see `synapse_localpg::LocalBroker`).
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

mod common;

use common::{contract, txn};
use rdkafka::mocking::MockCluster;
use std::sync::Arc;
use std::time::Duration;
use synapse_error::Classify;
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

    // A topic this user may not see: definite (retrying does not grant rights), named.
    mock.create_topic("synapse.n1.changes", 1, 1).unwrap();
    mock.create_topic("synapse.n1.consumers", 1, 1).unwrap();
    mock.topic_error(
        "synapse.n1.changes",
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let options =
        KafkaLogOptions { timeout: Duration::from_secs(2), ..KafkaLogOptions::new(&mock.bootstrap_servers(), "n1") };
    let e = KafkaLog::open(options).await.err().expect("an unauthorized topic must fail");
    assert_eq!(e.code(), "LOG006", "{e}");
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("synapse.n1.changes"), "{e}");
    assert!(e.hint().contains("ACLs"), "{}", e.hint());

    // A port nothing listens on.
    let port = synapse_localpg::free_port().unwrap(); // reserved: nothing listens on it
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
    let mock = mock_with_topics();
    let options =
        KafkaLogOptions { max_message_bytes: 10_000, ..KafkaLogOptions::new(&mock.bootstrap_servers(), "n1") };
    let log = KafkaLog::open(options).await.unwrap();
    log.append(vec![LogRecord::Relation(docs())]).await.unwrap();
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

/// TLS, as `log.kafka.properties` configures it for a real cluster: the broker reached through
/// a TLS endpoint with a certificate signed by a private CA (a rustls proxy in front of tansu,
/// which advertises the proxy: tansu 0.6 cannot serve TLS itself). With the CA the log contract
/// holds over TLS; without it the broker is not trusted and `open` fails with a classified,
/// retried error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_contract_holds_over_tls_and_an_untrusted_broker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "synapse test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut server = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server = server.signed_by(&key, &ca, &ca_key).unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap().to_string();
    let b = LocalBroker::start_behind(&front).unwrap();
    let tls = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![server.der().clone()],
        tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let backend = b.addr().to_string();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                let Ok(mut client) = acceptor.accept(socket).await else { return };
                let Ok(mut broker) = tokio::net::TcpStream::connect(&backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
            });
        }
    });
    let options = |ca: Option<&std::path::Path>| {
        let mut o = KafkaLogOptions { batch_records: false, ..KafkaLogOptions::new(&front, "n1") };
        o.properties.insert("security.protocol".into(), "ssl".into());
        o.properties.insert("fetch.wait.max.ms".into(), "5".into());
        if let Some(ca) = ca {
            o.properties.insert("ssl.ca.location".into(), ca.display().to_string());
        }
        o
    };

    let untrusted = KafkaLogOptions { timeout: Duration::from_secs(2), ..options(None) };
    let e = KafkaLog::open(untrusted).await.err().expect("a broker signed by an unknown CA must be refused");
    assert_eq!(e.code(), "LOG005", "{e}");
    assert!(e.is_transient(), "{e}");

    let trusted = options(Some(&ca_pem));
    contract(|| async { KafkaLog::open(trusted.clone()).await.unwrap() }, true).await;
}

/// A process opening the log while another keeps appending past the broker's retention (the
/// mock keeps a partition's last 5 MiB): the oldest records are deleted while the new log
/// indexes them, and the head moves faster than it indexes. Opening must succeed and return,
/// indexing on from the stream's new start up to the head it found, and a reader from there
/// reads on. (A consumer-group member taking a source over opens its log this way:
/// this failed the kill -9 hand-over test at random with LOG008.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_opened_while_retention_deletes_its_oldest_records_opens() {
    let mock = mock_with_topics();
    let options = KafkaLogOptions::new(&mock.bootstrap_servers(), "n1");
    let writer = KafkaLog::open(options.clone()).await.unwrap();
    // Small fetches make indexing the retained 5 MiB take hundreds of round trips, as a large
    // topic on a busy machine does: retention deletes the oldest records meanwhile.
    let mut slow = options.clone();
    slow.properties.insert("fetch.message.max.bytes".into(), "4096".into());
    let options = slow;
    writer.append(vec![LogRecord::Relation(docs())]).await.unwrap();
    // ~40 KiB transactions, without pause: the mock's 5 MiB turn over several times a second.
    // Values that do not compress (the producer compresses messages).
    let big = |lsn: u64| {
        let mut t = txn(lsn, 40, lsn as i64);
        let mut x = lsn.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for r in &mut t {
            if let LogRecord::Change(c) = r {
                let text: String = (0..64)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        format!("{x:016x}")
                    })
                    .collect();
                c.after = Some(vec![Datum::Text(text), Datum::Null].into());
            }
        }
        t
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appending = {
        let (writer, stop) = (writer.clone(), stop.clone());
        tokio::spawn(async move {
            let mut lsn = 1_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writer.append(big(lsn)).await.unwrap();
                lsn += 100;
            }
            lsn
        })
    };
    // Past the retention before the first open, then open again and again while it deletes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for round in 0..3 {
        // Bounded: an open indexes up to the head it found, not the head as the writer moves it.
        let opened = tokio::time::timeout(Duration::from_secs(60), KafkaLog::open(options.clone())).await;
        let reader = match opened {
            Ok(Ok(log)) => log,
            Ok(Err(e)) => panic!("open {round} while retention deletes the oldest records: [{}] {e}", e.code()),
            Err(_) => panic!("open {round} did not return within 60 s while another process appends"),
        };
        let from = reader.next_offset();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let read = reader.read(from, 100).await.unwrap();
        assert!(!read.is_empty(), "round {round}: the reader reads on from the head it indexed to");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = appending.await.unwrap();
    assert!(written > 1_000 + 100 * 200, "the writer appended only {} transactions", (written - 1_000) / 100);
}

/// One mock broker with node n1's topics (the mock implements no CreateTopics).
fn mock_with_topics() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = MockCluster::new(1).unwrap();
    for topic in ["synapse.n1.changes", "synapse.n1.consumers"] {
        mock.create_topic(topic, 1, 1).unwrap();
    }
    mock
}

/// The relation the tests' transactions (`common::txn`) refer to.
fn docs() -> Relation {
    Relation {
        oid: 5,
        schema: "public".into(),
        table: "docs".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![],
    }
}

/// A signed log (`signing_key`): what a holder of the key wrote reads back, also in a new
/// process; a message anyone else wrote to the topic (no signature, another key) is refused by
/// its offset, never decoded, and the error is definite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_log_refuses_messages_it_did_not_sign() {
    let mock = MockCluster::new(1).unwrap();
    for topic in ["synapse.n1.changes", "synapse.n1.consumers"] {
        mock.create_topic(topic, 1, 1).unwrap();
    }
    let plain = KafkaLogOptions::new(&mock.bootstrap_servers(), "n1");
    let key = synapse_log::SigningKey::new(&[7u8; 32]).unwrap();
    let signed = KafkaLogOptions { signing_key: Some(key), ..plain.clone() };
    assert!(!format!("{signed:?}").contains("7, 7"), "the key stays out of Debug");
    assert!(synapse_log::SigningKey::new(b"short").is_err());

    let writer = KafkaLog::open(signed.clone()).await.unwrap();
    writer.append(txn(100, 3, 1)).await.unwrap();
    let reader = KafkaLog::open(signed.clone()).await.unwrap();
    assert_eq!(reader.read(0, 100).await.unwrap().len(), 5);

    // Someone who may write the topic, without the key.
    let forger = KafkaLog::open(plain.clone()).await.unwrap();
    let at = forger.append(txn(200, 1, 2)).await.unwrap();
    let other = KafkaLogOptions { signing_key: Some(synapse_log::SigningKey::new(&[8u8; 32]).unwrap()), ..plain };
    KafkaLog::open(other).await.err().expect("a reader with another key refuses the first message");
    for _ in 0..50 {
        if reader.next_offset() > at {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = reader.read(5, 100).await;
    }
    let e = reader.read(5, 100).await.unwrap_err();
    assert_eq!(e.code(), "LOG011", "{e}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains("synapse.n1.changes"), "{e}");
    assert!(KafkaLog::open(signed).await.is_err(), "a new process refuses to index it too");
}
