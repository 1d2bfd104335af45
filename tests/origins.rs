//! Loop prevention: what SynapseDB applied on a node (initial copy and streamed changes) carries
//! a `synapse_*` replication origin, and a capture of that node with `forward_applied: false`
//! leaves it out while keeping the node's own writes.
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, Nodes, ITEMS_SCHEMA};
use std::time::{Duration, Instant};

#[test]
fn applied_changes_are_not_captured_again() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    // B has the tables (so b_out publishes them from the start) but none of the rows.
    nodes.target.psql("app", &ITEMS_SCHEMA.replace("INSERT INTO counters VALUES (1, 0);", "")).unwrap();
    // B streams a large applied transaction to b_out (protocol 2): its origin comes with the
    // first block, and b_out must still leave it out.
    nodes.target.psql("app", "ALTER SYSTEM SET logical_decoding_work_mem = '64kB'").unwrap();
    nodes.target.psql("app", "SELECT pg_reload_conf()").unwrap();
    // Rows that exist before synapse starts reach B through the initial copy.
    nodes.source.psql("app", "INSERT INTO items SELECT g, g FROM generate_series(1, 50) g").unwrap();
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = nodes.dir.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {log}\nsources:\n  - name: a\n    url: {a}\n    heartbeat_interval_secs: 0.5\n  - name: b_out\n    url: {b}\n    slot: synapse_b_out\n    heartbeat_interval_secs: 0.5\n    forward_applied: false\ntargets:\n  - name: b\n    url: {b}\n    sources: [a]\nops:\n  listen: \"\"\napi:\n  listen: \"{api}\"\n",
            log = nodes.dir.path().join("log").display(),
            a = nodes.source.url("app"),
            b = nodes.target.url("app"),
        ),
    )
    .unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    let q = "SELECT count(*) || ':' || coalesce(sum(v), 0) FROM items";
    let wait_equal = |what: &str| {
        if let Err(e) =
            synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", q, Duration::from_secs(60))
        {
            panic!("{what}: {e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
    };
    wait_equal("initial copy");
    // Streamed changes from A (one transaction far above B's logical_decoding_work_mem), then
    // B's own writes.
    nodes
        .source
        .psql("app", "INSERT INTO items SELECT g, g FROM generate_series(51, 20000) g; UPDATE counters SET n = 7")
        .unwrap();
    wait_equal("streamed changes");
    nodes
        .target
        .psql("app", "INSERT INTO items VALUES (100001, 1), (100002, 2); UPDATE items SET v = 0 WHERE id = 100001")
        .unwrap();

    // b_out's stream holds B's own three changes and nothing SynapseDB applied there.
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ids = loop {
        let body = http
            .get(format!("http://{api}/v1/streams/b_out/changes?limit=10000"))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default();
        let ids: Vec<i64> = body
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|e| e["data"]["after"]["id"].as_i64())
            .collect();
        if ids.len() >= 3 || Instant::now() > deadline {
            break ids;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let streamed = "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = 'synapse_b_out'";
    assert_ne!(nodes.target.psql("app", streamed).unwrap(), "0", "B streamed nothing to b_out");
    assert_eq!(ids, [100001, 100002, 100001], "b_out must hold exactly B's own writes\n{}", common::log_tail(&log));
    // And the counter update A made never shows up in b_out.
    let all = http.get(format!("http://{api}/v1/streams/b_out/changes?limit=10000")).send().unwrap().text().unwrap();
    assert!(!all.contains("\"table\":\"counters\""), "{all}");
    child.kill().unwrap();
    child.wait().unwrap();
    // The applier and the copy workers wrote under SynapseDB origins.
    let origins =
        nodes.target.psql("app", "SELECT string_agg(roname, ',' ORDER BY roname) FROM pg_replication_origin").unwrap();
    assert!(origins.contains("synapse_a@app,") && origins.contains("synapse_a@app_copy0"), "{origins}");
}
