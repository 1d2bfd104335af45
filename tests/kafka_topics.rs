//! The public Kafka topics, read as any Kafka user would: a plain rdkafka consumer, no SynapseDB
//! code. `synapse run` on the Kafka log with `public_topics`, a workload of inserts, updates,
//! deletes, TOASTed values, a multi-table transaction, a schema change; kill -9 in the middle.
//! Every message must validate against the published JSON Schema (headers + value rebuilt into
//! the structured CloudEvent), every transaction's END must count exactly its messages, and the
//! table rebuilt from the topic (de-duplicated on `ce_id`) must equal the source table.
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, Nodes};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::TopicPartitionList;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

const SCHEMA: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL, note text);
CREATE TABLE lines (order_id bigint, n int, qty int NOT NULL, PRIMARY KEY (order_id, n));";

struct Msg {
    key: Option<Value>,
    value: Option<Value>,
    headers: BTreeMap<String, String>,
}

/// Every message of `topic` (all partitions), in partition order.
fn read_topic(brokers: &str, topic: &str) -> Vec<Msg> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions = md.topics()[0].partitions().len() as i32;
    assert!(partitions > 0, "topic {topic} does not exist");
    let mut out = Vec::new();
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(low)).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut next = low;
        while next < high {
            let m = consumer.poll(Duration::from_secs(10)).expect("a message").unwrap();
            next = m.offset() + 1;
            let mut headers = BTreeMap::new();
            if let Some(h) = m.headers() {
                for hh in h.iter() {
                    let v = hh.value.map(|v| String::from_utf8(v.to_vec()).unwrap()).unwrap_or_default();
                    headers.insert(hh.key.to_owned(), v);
                }
            }
            out.push(Msg {
                key: m.key().map(|k| serde_json::from_slice(k).unwrap()),
                value: m.payload().map(|p| serde_json::from_slice(p).unwrap()),
                headers,
            });
        }
    }
    out
}

fn workload(url: &str, from: i64, to: i64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        for i in from..to {
            client
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO orders VALUES ({i}, 'new', CASE WHEN {i} % 7 = 0 THEN repeat('toast', 3000) END);
                     INSERT INTO lines SELECT {i}, n, n * 2 FROM generate_series(1, 1 + {i} % 3) n;
                     UPDATE orders SET status = 'paid' WHERE id = {i} - 5;
                     DELETE FROM lines WHERE order_id = {i} - 9;
                     DELETE FROM orders WHERE id = {i} - 9;
                     COMMIT;"
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
}

#[test]
fn public_topics_follow_the_published_contract_through_a_crash() {
    let broker = synapse_localpg::LocalBroker::start().unwrap();
    let nodes = Nodes::start(SCHEMA);
    let config = nodes.kafka_config(broker.addr());
    let yaml = std::fs::read_to_string(&config).unwrap().replacen(
        "    request_timeout_secs: 5\n",
        "    request_timeout_secs: 5\n    public_topics:\n      tombstones: true\n      partitions: 3\n",
        1,
    );
    std::fs::write(&config, yaml).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let url = nodes.source.url("app");

    let mut child = spawn_run(&config, &log);
    // Every workload transaction goes through the stream (none into the initial copy).
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    workload(&url, 10, 150);
    std::thread::sleep(Duration::from_millis(700));
    child.kill().unwrap(); // SIGKILL, mid-stream
    child.wait().unwrap();
    workload(&url, 150, 200);
    nodes.source.psql("app", "ALTER TABLE orders ADD COLUMN priority int DEFAULT 0").unwrap();
    workload(&url, 200, 260);
    let mut child = spawn_run(&config, &log);

    // Wait until every workload transaction's END is published (250 transactions).
    let deadline = Instant::now() + Duration::from_secs(30);
    let txn_topic = "synapse.a.transaction";
    loop {
        let ends: HashSet<String> = read_topic(broker.addr(), txn_topic)
            .iter()
            .filter_map(|m| m.value.as_ref())
            .filter(|v| v["status"] == "END")
            .map(|v| v["id"].to_string())
            .collect();
        if ends.len() >= 250 {
            break;
        }
        if Instant::now() > deadline {
            let q = "SELECT pg_current_wal_lsn(), (SELECT sent_lsn || ' ' || write_lsn || ' ' || state FROM pg_stat_replication), (SELECT confirmed_flush_lsn FROM pg_replication_slots), (SELECT count(*) FROM orders)";
            eprintln!("source: {}", nodes.source.psql("app", q).unwrap());
            eprintln!("target orders: {}", nodes.target.psql("app", "SELECT count(*) FROM orders").unwrap());
            let text = std::fs::read_to_string(&log).unwrap();
            panic!("{} of 250 transactions published:\n{text}", ends.len());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // Settle: one more round trip for anything committed just before.
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();

    let schema: Value = serde_json::from_str(include_str!("../schemas/change-event.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    // Messages per transaction id and table, de-duplicated on ce_id.
    let mut per_txn: HashMap<String, BTreeMap<String, HashSet<String>>> = HashMap::new();
    let mut tombstones = 0;
    for (topic, table, key_cols) in [
        ("synapse.public.orders", "public.orders", &["id"][..]),
        ("synapse.public.lines", "public.lines", &["order_id", "n"][..]),
    ] {
        let msgs = read_topic(broker.addr(), topic);
        assert!(!msgs.is_empty(), "{topic} is empty");
        let mut state: BTreeMap<String, Value> = BTreeMap::new();
        // Per key, messages are in order within their partition: replay per key.
        let mut seen = HashSet::new();
        for m in &msgs {
            let key = m.key.clone().expect("every message has a key");
            let cols: Vec<&str> = key.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(
                cols.iter().copied().collect::<HashSet<_>>(),
                key_cols.iter().copied().collect(),
                "{topic} key {key}"
            );
            let Some(value) = &m.value else {
                tombstones += 1;
                assert!(!state.contains_key(&key.to_string()), "a tombstone follows the delete of {key}");
                continue;
            };
            let h = &m.headers;
            for attr in [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_time",
                "ce_subject",
                "content-type",
                "traceparent",
            ] {
                assert!(h.contains_key(attr), "{topic}: header {attr} missing: {h:?}");
            }
            assert_eq!(h["content-type"], "application/json");
            let tp: Vec<&str> = h["traceparent"].split('-').collect();
            assert!(tp.len() == 4 && tp[1].len() == 32 && tp[2].len() == 16, "traceparent {}", h["traceparent"]);
            // The structured CloudEvent these headers and this value stand for.
            let mut event = json!({"datacontenttype": "application/json", "data": value});
            for (k, v) in h.iter().filter_map(|(k, v)| Some((k.strip_prefix("ce_")?, v))) {
                event[k] = Value::String(v.clone());
            }
            let errors: Vec<String> =
                validator.iter_errors(&event).map(|e| format!("{e} at {}", e.instance_path)).collect();
            assert!(errors.is_empty(), "{topic}: event does not match the schema: {errors:?}\n{event:#}");
            assert_eq!(h["ce_subject"], table);
            let txn = value["transaction"]["id"].as_str().unwrap().to_owned();
            per_txn.entry(txn).or_default().entry(table.to_owned()).or_default().insert(h["ce_id"].clone());
            if !seen.insert(h["ce_id"].clone()) {
                continue; // republished after the crash
            }
            match value["op"].as_str().unwrap() {
                "c" | "u" | "r" => {
                    // Unchanged TOASTed values come as Debezium's placeholder: keep the old one.
                    let mut row = value["after"].clone();
                    if let (Some(old), Some(new)) = (state.get(&key.to_string()), row.as_object_mut()) {
                        for (col, v) in new.iter_mut() {
                            if v == "__debezium_unavailable_value" {
                                *v = old[col.as_str()].clone();
                            }
                        }
                    }
                    state.insert(key.to_string(), row);
                }
                "d" => {
                    state.remove(&key.to_string());
                }
                op => panic!("unexpected op {op}"),
            }
        }
        // The table rebuilt from the topic equals the source table.
        let rows =
            nodes.source.psql("app", &format!("SELECT count(*) FROM {table}")).unwrap().parse::<usize>().unwrap();
        assert_eq!(state.len(), rows, "{topic}: rows rebuilt from the topic");
        if table == "public.orders" {
            let paid = state.values().filter(|v| v["status"] == "paid").count();
            let want: usize =
                nodes.source.psql("app", "SELECT count(*) FROM orders WHERE status = 'paid'").unwrap().parse().unwrap();
            assert_eq!(paid, want);
            let toast = state.values().filter(|v| v["note"].as_str().is_some_and(|n| n.len() == 15000)).count();
            let want: usize = nodes
                .source
                .psql("app", "SELECT count(*) FROM orders WHERE length(note) = 15000")
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(toast, want, "TOASTed notes arrive whole");
            assert!(
                state.values().any(|v| v.get("priority").is_some()),
                "rows after the schema change carry the new column"
            );
        }
    }
    assert!(tombstones > 0, "deletes are followed by tombstones");

    // Transaction metadata: every END counts exactly the distinct events of its transaction.
    let txns = read_topic(broker.addr(), txn_topic);
    let mut ends = 0;
    for m in &txns {
        let v = m.value.as_ref().unwrap();
        assert_eq!(m.key.as_ref().unwrap()["id"], v["id"]);
        if v["status"] != "END" {
            assert_eq!(v["status"], "BEGIN");
            continue;
        }
        ends += 1;
        let id = v["id"].as_str().unwrap();
        let published = per_txn.get(id).unwrap_or_else(|| panic!("END {id} without events"));
        let mut total = 0;
        for c in v["data_collections"].as_array().unwrap() {
            let table = c["data_collection"].as_str().unwrap();
            let n = c["event_count"].as_u64().unwrap() as usize;
            assert_eq!(published.get(table).map_or(0, HashSet::len), n, "txn {id} table {table}");
            total += n;
        }
        assert_eq!(v["event_count"].as_u64().unwrap() as usize, total);
    }
    assert!(ends >= 250, "{ends} transactions ended (250 were run)");
    let schema_changes = read_topic(broker.addr(), "synapse.a.schema-changes");
    assert!(
        schema_changes
            .iter()
            .any(|m| m.value.as_ref().is_some_and(|v| v["columns"].as_array().is_some_and(|c| c.len() == 4))),
        "the ALTER TABLE appears in the schema-changes topic"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
}
