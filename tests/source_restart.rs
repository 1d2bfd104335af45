//! The source PostgreSQL crashes and restarts while synapse streams: capture reconnects, the
//! slot may resend transactions the log already holds (they are skipped), nothing is lost. And
//! when the slot itself is lost (dropped, invalidated) the gap is never crossed silently.
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_survived, spawn_run, Nodes, ITEMS_SCHEMA};
use std::time::{Duration, Instant};

#[test]
fn source_crash_and_restart_mid_stream() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let config = nodes.config("");
    let log = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    // The crashes must land in streaming: one during the initial copy re-copies the tables
    // instead, and the capture's stream never meets its broken SQL connection (seen once in CI).
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    for round in 0..3i64 {
        // 40 transactions of 2,000 rows, each bumping the counter once.
        nodes
            .source
            .psql(
                "app",
                &format!(
                    "DO $$ BEGIN FOR i IN 0..39 LOOP
                        INSERT INTO items SELECT g, g FROM generate_series({base} + i * 2000 + 1, {base} + (i + 1) * 2000) g;
                        UPDATE counters SET n = n + 1;
                        COMMIT;
                     END LOOP; END $$",
                    base = round * 100_000
                ),
            )
            .unwrap();
        nodes.source.stop("immediate").unwrap(); // a crash while synapse is still catching up
        std::thread::sleep(Duration::from_millis(300));
        nodes.source.restart().unwrap();
    }
    let text = assert_survived(&nodes, &mut child, &log, 120);
    assert!(text.contains("reconnecting the source SQL connection"), "{text}");
}

/// `synapse run` on `nodes` with /readyz on a free port and a 1 s slow retry.
fn start_with_ops(nodes: &Nodes, log: &std::path::Path) -> (common::Synapse, String) {
    let config = nodes.config("");
    let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\""))
        + "supervision:\n  park_retry_secs: 1\n";
    std::fs::write(&config, text).unwrap();
    (spawn_run(&config, log), ops)
}

fn readyz(ops: &str) -> String {
    reqwest::blocking::get(format!("http://{ops}/readyz")).and_then(|r| r.text()).unwrap_or_default()
}

/// Waits until /readyz shows `part` (the tail of synapse's log on timeout).
fn wait_readyz(ops: &str, part: &str, log: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = readyz(ops);
        if body.contains(part) {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz never showed {part:?}:\n{body}\n{}", common::log_tail(log));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn slots(nodes: &Nodes) -> String {
    nodes.source.psql("app", "SELECT coalesce(string_agg(slot_name, ','), '-') FROM pg_replication_slots").unwrap()
}

/// Synapse runs once (copies, streams a row), stops; the slot is then lost by `lose` while rows
/// are written. Returns the running synapse, its ops address and log.
fn lose_the_slot(nodes: &Nodes, lose: impl FnOnce(&Nodes)) -> (common::Synapse, String, std::path::PathBuf) {
    let log = nodes.dir.path().join("synapse.log");
    let (mut child, _) = start_with_ops(nodes, &log);
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, "SELECT count(*) FROM items", Duration::from_secs(60));
    child.kill().unwrap();
    child.wait().unwrap();
    lose(nodes);
    nodes.source.psql("app", "INSERT INTO items SELECT g, g FROM generate_series(100, 199) g").unwrap();
    let (child, ops) = start_with_ops(nodes, &log);
    (child, ops, log)
}

/// A dropped slot (what an operator, a failover or a cleanup script does) while synapse is
/// stopped: the gap is never crossed. The source's capture parks with the gap's positions and
/// how to accept it, creates no new slot, and nothing written after the gap reaches the target;
/// the rest of synapse keeps running. Accepting (a new slot, SIGHUP) resumes the stream, and
/// `synapse repair fix` restores what the gap lost: the target ends identical.
#[test]
fn a_dropped_slot_is_a_gap_never_crossed() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let (child, ops, log) = lose_the_slot(&nodes, |n| {
        n.source.psql("app", "SELECT pg_drop_replication_slot('synapse_a')").unwrap();
    });
    let body = wait_readyz(&ops, "capture/a: parked [CAP011]", &log);
    assert!(body.contains("gap in source a: its replication slot is missing"), "{body}");
    assert!(body.contains("pg_create_logical_replication_slot('synapse_a', 'pgoutput')"), "the fix: {body}");
    assert!(body.contains("apply/a->b: streaming"), "the applier keeps running: {body}");
    // Retried (1 s) several times: still no slot, nothing past the gap applied.
    nodes.source.psql("app", "INSERT INTO items VALUES (500, 500)").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(slots(&nodes), "-", "synapse created a slot past the gap");
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items").unwrap(), "1");
    let text = common::log_tail(&log);
    assert!(text.matches("CAP011").count() >= 2, "parked and retried: {text}");

    // The operator accepts the gap as told; the stream resumes from the new slot.
    nodes.source.psql("app", "SELECT pg_create_logical_replication_slot('synapse_a', 'pgoutput')").unwrap();
    std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    wait_readyz(&ops, "capture/a: streaming", &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (600, 600)").unwrap();
    common::wait_equal(
        &nodes.source,
        &nodes.target,
        "SELECT count(*) FROM items WHERE id = 600",
        Duration::from_secs(60),
    );
    // What the gap lost (rows 100–199 and 500) is restored by repair.
    let config = nodes.dir.path().join("synapse.yaml");
    let out = common::synapse(&[
        "repair",
        "fix",
        "--config",
        config.to_str().unwrap(),
        "--nodes",
        "a,b",
        "--table",
        "public.items",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let q = "SELECT count(*) || ':' || sum(v) FROM items";
    common::wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(60));
    drop(child);
}

/// A slot invalidated by `max_slot_wal_keep_size` (the server removed WAL it still needed) while
/// synapse is stopped: a gap too, named as such, never crossed.
#[test]
fn an_invalidated_slot_is_a_gap_never_crossed() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let (child, ops, log) = lose_the_slot(&nodes, |n| {
        n.source.psql("app", "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'").unwrap();
        n.source.psql("app", "SELECT pg_reload_conf()").unwrap();
        // Enough WAL past the slot for a checkpoint to remove what it needs.
        for i in 0..4 {
            n.source
                .psql("app", &format!("INSERT INTO counters VALUES ({}, 0); SELECT pg_switch_wal()", 10 + i))
                .unwrap();
        }
        n.source.psql("app", "CHECKPOINT").unwrap();
        let status =
            n.source.psql("app", "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'synapse_a'").unwrap();
        assert_eq!(status, "lost", "the slot was not invalidated");
    });
    let body = wait_readyz(&ops, "capture/a: parked [CAP011]", &log);
    assert!(body.contains("its replication slot was invalidated (wal_status = lost"), "{body}");
    assert!(body.contains("pg_drop_replication_slot('synapse_a')"), "the fix: {body}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(slots(&nodes), "synapse_a", "the invalidated slot is left for the operator");
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items").unwrap(), "1", "nothing past the gap");
    drop(child);
}
