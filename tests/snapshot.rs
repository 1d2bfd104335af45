//! Stream snapshots through the real binary: read the tables' rows while a writer keeps
//! inserting, then follow the change stream from the cursor the snapshot ends with — every row
//! exactly once across the two.
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, Nodes, SyncClient};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn lines(body: &str) -> Vec<serde_json::Value> {
    body.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn snapshot_then_changes_have_no_gap_and_no_duplicate() {
    let nodes = Nodes::start(&format!(
        "{}\nINSERT INTO items SELECT g, g FROM generate_series(1, 5000) g;",
        common::ITEMS_SCHEMA
    ));
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = nodes.dir.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {}\nsources:\n  - name: a\n    url: {}\n    heartbeat_interval_secs: 0.5\nops:\n  listen: \"\"\napi:\n  listen: \"{api}\"\n",
            nodes.dir.path().join("log").display(),
            nodes.source.url("app"),
        ),
    )
    .unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http.get(format!("http://{api}/v1/streams/a")).send().is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }

    // A writer inserts (and updates) while the snapshot is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, url) = (stop.clone(), nodes.source.url("app"));
        std::thread::spawn(move || {
            let mut c = SyncClient::connect(&url);
            let mut id = 100_000i64;
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute(&format!("INSERT INTO items VALUES ({id}, 1), ({}, 1)", id + 1)).unwrap();
                id += 2;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Refused (503) until the capture has its slot; then taken while the writer runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let r = http.get(format!("http://{api}/v1/streams/a/snapshot?tables=public.items")).send().unwrap();
        if r.status() != 503 {
            break r.text().unwrap();
        }
        assert!(Instant::now() < deadline, "snapshots still refused: {}", r.text().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    let snap = lines(&body);
    let (end, rows) = snap.split_last().unwrap();
    assert_eq!(end["control"], "snapshot-end", "{end}");
    assert!(rows.iter().all(|e| e["data"]["op"] == "r" && e["data"]["source"]["table"] == "items"));
    let in_snapshot: BTreeSet<i64> = rows.iter().map(|e| e["data"]["after"]["id"].as_i64().unwrap()).collect();
    assert_eq!(in_snapshot.len(), rows.len(), "a row twice in the snapshot");
    assert!(in_snapshot.len() >= 5000);

    // Follow the stream from the snapshot's cursor until every row of the table was seen.
    let all: BTreeSet<i64> = nodes
        .source
        .psql("app", "SELECT string_agg(id::text, ',') FROM items")
        .unwrap()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let mut cursor = end["cursor"].as_str().unwrap().to_owned();
    let mut after: Vec<i64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = lines(
            &http
                .get(format!("http://{api}/v1/streams/a/changes?cursor={cursor}&tables=public.items&operations=insert&limit=10000"))
                .send()
                .unwrap()
                .text()
                .unwrap(),
        );
        let (control, events) = page.split_last().unwrap();
        after.extend(events.iter().map(|e| e["data"]["after"]["id"].as_i64().unwrap()));
        cursor = control["cursor"].as_str().unwrap_or(&cursor).to_owned();
        let seen: BTreeSet<i64> = in_snapshot.iter().copied().chain(after.iter().copied()).collect();
        if seen == all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing after the snapshot: {:?}",
            all.difference(&seen).take(10).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let dup: Vec<&i64> = after.iter().filter(|id| in_snapshot.contains(id)).collect();
    assert!(dup.is_empty(), "rows both in the snapshot and after its cursor: {:?}", &dup[..dup.len().min(10)]);
    assert!(!after.is_empty(), "the writer's rows after the snapshot never arrived through the stream");

    // Bad input: a snapshot takes no cursor; tables outside the capture are simply empty.
    let r = http.get(format!("http://{api}/v1/streams/a/snapshot?cursor=0/0/0")).send().unwrap();
    assert_eq!(r.status(), 400);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A snapshot whose cursor the log could not follow without a gap is refused: here the capture
/// is parked before it could create its slot (its publication is missing and it may not create
/// one), so changes after the snapshot would never reach the log.
#[test]
fn a_snapshot_is_refused_while_the_capture_has_no_slot() {
    let nodes = Nodes::start(common::ITEMS_SCHEMA);
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = nodes.dir.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {}\nsources:\n  - name: a\n    url: {}\n    create_publication: false\nops:\n  listen: \"\"\napi:\n  listen: \"{api}\"\n",
            nodes.dir.path().join("log").display(),
            nodes.source.url("app"),
        ),
    )
    .unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let r = loop {
        if let Ok(r) = http.get(format!("http://{api}/v1/streams/a/snapshot")).send() {
            break r;
        }
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "CON010", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("synapse_a"), "{body}");
    assert!(body["error"]["hint"].as_str().unwrap().contains("/readyz"), "{body}");
}

/// A snapshot reads the captured tables only (`sources[].tables`), never the rest of the
/// database, even when the request names no table.
#[test]
fn a_snapshot_reads_only_the_captured_tables() {
    let nodes = Nodes::start(&format!(
        "{}\nINSERT INTO items VALUES (1, 1); CREATE TABLE payroll (id int PRIMARY KEY, salary int); INSERT INTO payroll VALUES (1, 100000);",
        common::ITEMS_SCHEMA
    ));
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = nodes.dir.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {}\nsources:\n  - name: a\n    url: {}\n    tables: [public.items]\nops:\n  listen: \"\"\napi:\n  listen: \"{api}\"\n",
            nodes.dir.path().join("log").display(),
            nodes.source.url("app"),
        ),
    )
    .unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Ok(r) = http.get(format!("http://{api}/v1/streams/a/snapshot")).send() {
            if r.status() == 200 {
                break r.text().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    };
    let events = lines(&body);
    assert!(events.iter().any(|e| e["data"]["source"]["table"] == "items"), "{body}");
    assert!(!body.contains("payroll") && !body.contains("100000"), "an uncaptured table was read: {body}");
}
