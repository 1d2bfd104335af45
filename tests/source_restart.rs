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

/// `synapse run` on `nodes` with /readyz on a free port, a 1 s slow retry, and `extra` lines
/// in source a.
fn start_with_ops(nodes: &Nodes, log: &std::path::Path, extra: &str) -> (common::Synapse, String) {
    let (config, ops) = config_with_ops(nodes, extra);
    (spawn_run(&config, log), ops)
}

/// The configuration of [`start_with_ops`] (with an API on loopback, open) and its ops address.
fn config_with_ops(nodes: &Nodes, extra: &str) -> (std::path::PathBuf, String) {
    let config = nodes.config(extra);
    let ops = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\""))
        .replace("api:\n  listen: \"\"", &format!("api:\n  listen: \"{api}\""))
        + "supervision:\n  park_retry_secs: 1\n";
    std::fs::write(&config, text).unwrap();
    (config, ops)
}

fn readyz(ops: &str) -> String {
    reqwest::blocking::get(format!("http://{ops}/readyz")).and_then(|r| r.text()).unwrap_or_default()
}

/// Waits until /readyz shows `part` (the tail of synapse's log on timeout).
fn wait_readyz(ops: &str, part: &str, log: &std::path::Path) -> String {
    wait_readyz_where(ops, part, log, |body| body.contains(part))
}

/// Waits until /readyz's body satisfies `ok` (`what` says what is awaited).
fn wait_readyz_where(ops: &str, what: &str, log: &std::path::Path, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = readyz(ops);
        if ok(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz never showed {what:?}:\n{body}\n{}", common::log_tail(log));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until synapse's log holds `line` (a step logged just after the change a test waited
/// for, e.g. "re-sync done" after the rows it fixed).
fn wait_logged(log: &std::path::Path, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(line) {
            return text;
        }
        assert!(Instant::now() < deadline, "never logged {line:?}:\n{}", common::log_tail(log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `synapse repair fix` of `public.items` between source a and target b; it must succeed.
fn repair_fix(config: &std::path::Path) {
    let args = ["repair", "fix", "--config", config.to_str().unwrap(), "--nodes", "a,b", "--table", "public.items"];
    let out = common::synapse(&args).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// `synapse resume --accept-gap a`: the operator accepts source a's gap; it must succeed.
/// Returns once synapse made the new slot (what is written before may be in no stream:
/// repair restores it), as its `log` says.
fn accept_gap(config: &std::path::Path, log: &std::path::Path) {
    const MADE: &str = "created a new replication slot past the gap";
    let before = std::fs::read_to_string(log).unwrap_or_default().matches(MADE).count();
    let out = common::synapse(&["resume", "--config", config.to_str().unwrap(), "--accept-gap", "a"]).output().unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("gap accepted: capture/a"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(log).unwrap_or_default().matches(MADE).count() <= before {
        assert!(Instant::now() < deadline, "no new slot after the gap was accepted:\n{}", common::log_tail(log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Tries every parked component of `child` again now.
fn sighup(child: &common::Synapse) {
    std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
}

/// Drops synapse's slot once the killed process's walsender has let go of it: the source
/// notices a dead client a moment later, and a slot still active cannot be dropped.
fn drop_slot(nodes: &Nodes) {
    let active = "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = 'synapse_a'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes.source.psql("app", active).unwrap() == "t" {
        assert!(Instant::now() < deadline, "the slot stayed active after synapse stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    nodes.source.psql("app", "SELECT pg_drop_replication_slot('synapse_a')").unwrap();
}

fn slots(nodes: &Nodes) -> String {
    nodes.source.psql("app", "SELECT coalesce(string_agg(slot_name, ','), '-') FROM pg_replication_slots").unwrap()
}

/// Synapse runs once (copies, streams a row), stops; the slot is then lost by `lose` while rows
/// are written. Returns the running synapse, its ops address and log.
fn lose_the_slot(nodes: &Nodes, lose: impl FnOnce(&Nodes)) -> (common::Synapse, String, std::path::PathBuf) {
    lose_the_slot_with(nodes, "", lose)
}

/// [`lose_the_slot`] with `extra` lines in source a.
fn lose_the_slot_with(
    nodes: &Nodes,
    extra: &str,
    lose: impl FnOnce(&Nodes),
) -> (common::Synapse, String, std::path::PathBuf) {
    let log = nodes.dir.path().join("synapse.log");
    let (mut child, _) = start_with_ops(nodes, &log, extra);
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, "SELECT count(*) FROM items", Duration::from_secs(60));
    child.kill().unwrap();
    child.wait().unwrap();
    lose(nodes);
    nodes.source.psql("app", "INSERT INTO items SELECT g, g FROM generate_series(100, 199) g").unwrap();
    let (child, ops) = start_with_ops(nodes, &log, extra);
    (child, ops, log)
}

/// Every row of `items`, digested: equal on two nodes only when they hold the same rows.
const ITEMS_DIGEST: &str =
    "SELECT count(*) || ':' || coalesce(md5(string_agg(id || '=' || v, ',' ORDER BY id)), '-') FROM items";

/// With `on_gap: resync`, after a slot lost in `lose`: synapse crosses the gap by itself — a
/// new slot, the target re-synced — and the target ends identical to the source, with the
/// rows written during the gap and while the re-sync ran; streaming goes on after it.
fn resyncs_after(lose: impl FnOnce(&Nodes)) {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let (child, ops, log) = lose_the_slot_with(&nodes, "    on_gap: resync\n", lose);
    nodes.source.psql("app", "INSERT INTO items VALUES (500, 500); UPDATE items SET v = 7 WHERE id = 1").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, ITEMS_DIGEST, Duration::from_secs(120));
    // The rows are fixed a moment before the re-sync is recorded done.
    let text = wait_logged(&log, "re-sync done");
    // After the re-sync, the task still looks for owed copies before it leaves the list.
    let body = wait_readyz_where(&ops, "capture/a streaming, resync/a gone", &log, |b| {
        b.contains("capture/a: streaming") && !b.contains("resync/a")
    });
    assert!(!body.contains("resync/a"), "the re-sync is done, so it is no longer listed: {body}");
    assert_eq!(slots(&nodes), "synapse_a");
    assert!(text.contains("crossing the gap (on_gap: resync)") && text.contains("CAP011"), "{text}");
    // The owed re-sync is paid: no log position holds retention for it any more.
    nodes.source.psql("app", "INSERT INTO items VALUES (600, 600)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, ITEMS_DIGEST, Duration::from_secs(60));
    drop(child);
}

/// Stream and webhook readers are told of a gap that `on_gap: resync` crossed: a webhook
/// endpoint (whatever its table and operation filters) receives an `io.synapsedb.resync.v1`
/// event between the changes before and after the gap; a stream cursor from before the gap is
/// answered 410 `CON011` with the snapshot link and the gap's cursor; a reader from the
/// gap's cursor gets the changes after it; a reader from the start reads the gap inline.
#[test]
fn stream_and_webhook_readers_are_told_of_a_resync() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let receiver = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let hook = format!("http://{}/hook", receiver.local_addr().unwrap());
    let seen = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or_default());
                axum::http::StatusCode::OK
            }
        }),
    );
    rt.spawn(async move { axum::serve(receiver, app).await });

    let nodes = Nodes::start(ITEMS_SCHEMA);
    let (config, ops) = config_with_ops(&nodes, "    on_gap: resync\n");
    let secret = synapse_connectors::webhook::signing::Secret::generate();
    let text = std::fs::read_to_string(&config).unwrap();
    let api = text.split("api:\n  listen: \"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let text = format!(
        "{text}webhooks:\n  - name: items-hook\n    url: {hook}\n    secrets: [\"{secret}\"]\n    tables: [public.items]\n    operations: [insert]\negress:\n  allow: [127.0.0.1]\n"
    );
    std::fs::write(&config, text).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let child = spawn_run(&config, &log);
    common::wait_ready(&ops, &log, 60);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, "SELECT count(*) FROM items", Duration::from_secs(60));
    let wait_hook = |what: &str, done: &dyn Fn(&[serde_json::Value]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&got.lock().unwrap()) {
            assert!(
                Instant::now() < deadline,
                "the endpoint never got {what}: {:?}\n{}",
                got.lock().unwrap(),
                common::log_tail(&log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_hook("row 1", &|g| g.len() == 1);
    let (status, sub) = common::request(&api, "GET", "/v1/streams/a", "", None);
    assert_eq!(status, 200, "{sub}");
    let before_gap = serde_json::from_str::<serde_json::Value>(&sub).unwrap()["cursor"].as_str().unwrap().to_owned();
    drop(child);

    drop_slot(&nodes);
    nodes.source.psql("app", "INSERT INTO items SELECT g, g FROM generate_series(100, 199) g").unwrap();
    let child = spawn_run(&config, &log);
    wait_readyz(&ops, "capture/a: streaming", &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (500, 500)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, ITEMS_DIGEST, Duration::from_secs(120));

    // The endpoint: row 1, the gap, row 500 — in that order; the rows of the gap are not events.
    wait_hook("the gap and row 500", &|g| g.len() >= 3);
    std::thread::sleep(Duration::from_millis(500));
    let events = got.lock().unwrap().clone();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap_or_default()).collect();
    assert_eq!(types, ["io.synapsedb.change.v1", "io.synapsedb.resync.v1", "io.synapsedb.change.v1"], "{events:?}");
    let gap = &events[1];
    assert_eq!(events[2]["data"]["after"]["id"], 500);
    assert!(gap["data"]["reason"].as_str().unwrap().contains("slot is missing"), "{gap}");
    assert_eq!(gap["data"]["snapshot"], "/v1/streams/a/snapshot");
    let schema: serde_json::Value = serde_json::from_str(include_str!("../schemas/change-event.schema.json")).unwrap();
    assert!(jsonschema::validator_for(&schema).unwrap().is_valid(gap), "{gap}");

    // A stream cursor from before the gap: 410 with where to go.
    let (status, body) = common::request(&api, "GET", &format!("/v1/streams/a/changes?cursor={before_gap}"), "", None);
    assert_eq!(status, 410, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "CON011", "{body}");
    assert_eq!(err["error"]["snapshot"], "/v1/streams/a/snapshot", "{body}");
    let gap_cursor = err["error"]["gap_cursor"].as_str().unwrap().to_owned();
    assert_eq!(gap_cursor, gap["synapsecursor"].as_str().unwrap());
    // From the gap's cursor: what came after it.
    let (status, body) = common::request(&api, "GET", &format!("/v1/streams/a/changes?cursor={gap_cursor}"), "", None);
    assert_eq!(status, 200, "{body}");
    let ids: Vec<i64> = body
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["data"]["after"]["id"].as_i64())
        .collect();
    assert_eq!(ids, [500], "{body}");
    // From the start: the gap inline, in its place.
    let (status, body) = common::request(&api, "GET", "/v1/streams/a/changes?tables=public.counters", "", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("io.synapsedb.resync.v1"), "a reader of another table is told too: {body}");
    drop(child);
}

/// A re-sync owed is durable: synapse killed (-9) while re-syncing (the target's table is
/// locked, so it cannot finish) — by then the new slot exists, so the next start sees no gap —
/// still re-syncs after the restart, and the target ends identical.
#[test]
fn a_resync_cut_short_by_kill_9_is_finished_after_restart() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let mut lock = common::SyncClient::connect(&nodes.target.url("app"));
    let (mut child, ops, log) = lose_the_slot_with(&nodes, "    on_gap: resync\n", |n| {
        drop_slot(n);
        lock.batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE").unwrap();
    });
    wait_readyz(&ops, "resync/a: resyncing", &log);
    child.kill().unwrap();
    child.wait().unwrap();
    drop(lock);
    assert_eq!(slots(&nodes), "synapse_a", "the new slot exists: the restart sees no gap");
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items").unwrap(), "1", "not re-synced yet");
    let (child, _) = start_with_ops(&nodes, &log, "    on_gap: resync\n");
    common::wait_equal(&nodes.source, &nodes.target, ITEMS_DIGEST, Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("crossing the gap").count(), 1, "{text}");
    assert_eq!(text.matches("re-syncing the targets after a gap").count(), 2, "{text}");
    drop(child);
}

/// A dropped slot with `on_gap: resync`: see [`resyncs_after`].
#[test]
fn a_dropped_slot_is_resynced() {
    resyncs_after(|n| {
        drop_slot(n);
    });
}

/// An invalidated slot with `on_gap: resync`: dropped and made again; see [`resyncs_after`].
#[test]
fn an_invalidated_slot_is_resynced() {
    resyncs_after(invalidate_slot);
}

/// A dropped slot (what an operator, a failover or a cleanup script does) while synapse is
/// stopped: the gap is never crossed. The source's capture parks with the gap's positions and
/// how to accept it, creates no new slot, and nothing written after the gap reaches the target;
/// the rest of synapse keeps running. A slot made again by hand is not taken for synapse's own
/// (it starts past what synapse confirmed): still the gap. Accepting (`synapse resume
/// --accept-gap`) resumes the stream, and `synapse repair fix` restores what the gap lost: the
/// target ends identical.
#[test]
fn a_dropped_slot_is_a_gap_never_crossed() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let (child, ops, log) = lose_the_slot(&nodes, |n| {
        drop_slot(n);
    });
    // The applier keeps running: it may still be starting (checking the target's copy state)
    // when the capture parks, so both are awaited.
    let body = wait_readyz_where(&ops, "capture/a parked, apply/a->b streaming", &log, |b| {
        b.contains("capture/a: parked [CAP011]") && b.contains("apply/a->b: streaming")
    });
    assert!(body.contains("gap in source a: its replication slot is missing"), "{body}");
    assert!(body.contains("synapse resume --accept-gap a"), "the fix: {body}");
    // Retried (1 s) several times: still no slot, nothing past the gap applied.
    nodes.source.psql("app", "INSERT INTO items VALUES (500, 500)").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(slots(&nodes), "-", "synapse created a slot past the gap");
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items").unwrap(), "1");
    let text = common::log_tail(&log);
    assert!(text.matches("CAP011").count() >= 2, "parked and retried: {text}");

    // Someone makes the slot again by hand: not synapse's slot, the gap stays.
    nodes.source.psql("app", "SELECT pg_create_logical_replication_slot('synapse_a', 'pgoutput')").unwrap();
    sighup(&child);
    let body = wait_readyz(&ops, "made again, or advanced, by someone else", &log);
    assert!(body.contains("capture/a: parked [CAP011]"), "{body}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items").unwrap(), "1", "nothing past the gap");

    // The operator accepts the gap as told; the stream resumes from a new slot.
    let config = nodes.dir.path().join("synapse.yaml");
    accept_gap(&config, &log);
    wait_readyz(&ops, "capture/a: streaming", &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (600, 600)").unwrap();
    common::wait_equal(
        &nodes.source,
        &nodes.target,
        "SELECT count(*) FROM items WHERE id = 600",
        Duration::from_secs(60),
    );
    // What the gap lost (rows 100–199 and 500) is restored by repair.
    repair_fix(&config);
    let q = "SELECT count(*) || ':' || sum(v) FROM items";
    common::wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(60));
    drop(child);
}

/// A slot invalidated by `max_slot_wal_keep_size` (the server removed WAL it still needed) while
/// synapse is stopped: a gap too, named as such, never crossed.
#[test]
fn an_invalidated_slot_is_a_gap_never_crossed() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let (child, ops, log) = lose_the_slot(&nodes, invalidate_slot);
    let body = wait_readyz(&ops, "capture/a: parked [CAP011]", &log);
    assert!(body.contains("its replication slot was invalidated (wal_status = lost"), "{body}");
    assert!(body.contains("synapse resume --accept-gap a"), "the fix: {body}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(slots(&nodes), "synapse_a", "the invalidated slot is left for the operator");
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items").unwrap(), "1", "nothing past the gap");
    // Accepted: the invalidated slot is made again and the stream goes on.
    accept_gap(&nodes.dir.path().join("synapse.yaml"), &log);
    wait_readyz(&ops, "capture/a: streaming", &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (600, 600)").unwrap();
    let q = "SELECT count(*) FROM items WHERE id = 600";
    common::wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(60));
    drop(child);
}

/// Has the source remove WAL that slot synapse_a still needs (`max_slot_wal_keep_size`).
fn invalidate_slot(n: &Nodes) {
    n.source.psql("app", "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'").unwrap();
    n.source.psql("app", "SELECT pg_reload_conf()").unwrap();
    // Enough WAL past the slot for a checkpoint to remove what it needs.
    for i in 0..4 {
        n.source.psql("app", &format!("INSERT INTO counters VALUES ({}, 0); SELECT pg_switch_wal()", 10 + i)).unwrap();
    }
    n.source.psql("app", "CHECKPOINT").unwrap();
    let status =
        n.source.psql("app", "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'synapse_a'").unwrap();
    assert_eq!(status, "lost", "the slot was not invalidated");
}

/// A half-open replication connection (a NAT or firewall dropped it without a reset: nothing
/// arrives, nothing fails) is noticed within the receive timeout and replaced; changes made
/// meanwhile arrive. Without the timeout the capture would wait on the dead link for hours.
#[test]
fn a_half_open_connection_is_noticed_and_replaced() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let proxy = common::FreezingProxy::start(nodes.source.port());
    let log = nodes.dir.path().join("synapse.log");
    let config = nodes.config("    receive_timeout_secs: 3\n");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("127.0.0.1:{}/", nodes.source.port()), &format!("127.0.0.1:{}/", proxy.port));
    std::fs::write(&config, text).unwrap();
    let child = spawn_run(&config, &log);
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, "SELECT count(*) FROM items", Duration::from_secs(60));

    proxy.freeze_existing();
    nodes.source.psql("app", "INSERT INTO items SELECT g, g FROM generate_series(2, 500) g").unwrap();
    let q = "SELECT count(*) || ':' || sum(v) FROM items";
    if let Err(e) = synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", q, Duration::from_secs(60)) {
        panic!("{e}\n{}", common::log_tail(&log));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("receive timeout"), "{}", common::log_tail(&log));
    drop(child);
}

/// The slot-lag policy: a source whose newest captured change is older than
/// `max_slot_lag_secs` shows a warning next to its capture in /readyz (still ready: the
/// capture works) until changes flow again; `doctor` measures the slot against
/// `max_slot_lag_bytes` and names max_slot_wal_keep_size.
#[test]
fn slot_lag_limits_warn_in_readyz_and_doctor() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let log = nodes.dir.path().join("synapse.log");
    let (config, ops) = config_with_ops(&nodes, "    max_slot_lag_secs: 4\n    max_slot_lag_bytes: 1000\n");
    // No heartbeats: only commits show activity.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("heartbeat_interval_secs: 0.5", "heartbeat_interval_secs: 3600");
    std::fs::write(&config, text).unwrap();
    let mut child = spawn_run(&config, &log);
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    let body = wait_readyz(&ops, "capture/a: streaming (warning: the newest captured change is", &log);
    assert!(body.contains("over max_slot_lag_secs 4") && body.contains("max_slot_wal_keep_size"), "{body}");
    // A fresh change clears it.
    nodes.source.psql("app", "INSERT INTO items VALUES (2, 2)").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while readyz(&ops).contains("warning") {
        assert!(Instant::now() < deadline, "the warning stayed after a fresh change:\n{}", readyz(&ops));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::fs::read_to_string(&log).unwrap().contains("over max_slot_lag_secs"), "logged once");
    // Stopped, with WAL written since: doctor measures the slot against max_slot_lag_bytes.
    child.kill().unwrap();
    child.wait().unwrap();
    nodes.source.psql("app", "INSERT INTO items SELECT g, g FROM generate_series(10, 5000) g").unwrap();
    let out = common::synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("more WAL than 1000 bytes (max_slot_lag_bytes") && text.contains("max_slot_wal_keep_size"),
        "{text}"
    );
}

/// The classic unbounded-WAL case: synapse's database is idle while another database on the
/// same server writes. The heartbeats give the idle slot something to confirm, so its
/// restart_lsn advances and the busy neighbour's WAL is not retained for it.
#[test]
fn an_idle_slot_advances_while_a_neighbour_database_writes() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    nodes.source.create_database("busy").unwrap();
    nodes.source.psql("busy", "CREATE TABLE noise (id bigserial PRIMARY KEY, pad text)").unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let child = spawn_run(&nodes.config(""), &log);
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    let restart = || {
        nodes.source.psql("app", "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'synapse_a'").unwrap()
    };
    let before = restart();
    let wal_before = nodes.source.psql("app", "SELECT pg_current_wal_lsn()").unwrap();
    for _ in 0..5 {
        nodes
            .source
            .psql("busy", "INSERT INTO noise (pad) SELECT repeat('x', 200) FROM generate_series(1, 20000)")
            .unwrap();
    }
    let beyond = |lsn: &str, than: &str| {
        nodes.source.psql("app", &format!("SELECT '{lsn}'::pg_lsn > '{than}'::pg_lsn")).unwrap() == "t"
    };
    // restart_lsn follows the decoder's restart point, which moves with running-transaction
    // snapshots (logged every 15 s by the background writer): allow a few of them.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = restart();
        if beyond(&now, &wal_before) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restart_lsn stayed at {now} (was {before}, busy writes began at {wal_before})\n{}",
            common::log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(child);
}

/// Failover: a streaming standby of the source (pg_basebackup) is promoted after the primary
/// goes down, and synapse is pointed at it. PostgreSQL 15 copies no logical slot to a standby,
/// so changes made between synapse's last capture and the promotion cannot be streamed: never
/// silent — the capture parks with the gap; once accepted (`synapse resume --accept-gap`)
/// it streams on, and `synapse repair fix` makes the target identical to the new primary.
#[test]
fn a_promoted_standby_is_a_gap_never_crossed() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let standby = synapse_localpg::LocalCluster::start_standby(&nodes.source).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let (config, ops) = config_with_ops(&nodes, "");
    let mut child = spawn_run(&config, &log);
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, "SELECT count(*) FROM items", Duration::from_secs(60));
    child.kill().unwrap();
    child.wait().unwrap();

    // Written on the old primary, replayed on the standby, never captured.
    nodes.source.psql("app", "INSERT INTO items SELECT g, g FROM generate_series(100, 199) g").unwrap();
    let replayed = "SELECT count(*) FROM items";
    let deadline = Instant::now() + Duration::from_secs(60);
    while standby.psql("app", replayed).unwrap() != "101" {
        assert!(Instant::now() < deadline, "the standby did not replay the primary's writes");
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes.source.stop("fast").unwrap();
    standby.promote().unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("127.0.0.1:{}/", nodes.source.port()), &format!("127.0.0.1:{}/", standby.port()));
    std::fs::write(&config, text).unwrap();
    let child = spawn_run(&config, &log);
    let body = wait_readyz(&ops, "capture/a: parked [CAP011]", &log);
    assert!(body.contains("a promoted standby"), "{body}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(standby.psql("app", "SELECT count(*) FROM pg_replication_slots").unwrap(), "0", "no slot past the gap");
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items").unwrap(), "1");

    // Accepted: a slot on the new primary, streaming resumes; repair restores the gap.
    accept_gap(&config, &log);
    wait_readyz(&ops, "capture/a: streaming", &log);
    standby.psql("app", "INSERT INTO items VALUES (700, 700)").unwrap();
    common::wait_equal(&standby, &nodes.target, "SELECT count(*) FROM items WHERE id = 700", Duration::from_secs(60));
    repair_fix(&config);
    common::wait_equal(&standby, &nodes.target, "SELECT count(*) || ':' || sum(v) FROM items", Duration::from_secs(60));
    drop(child);
}

/// A failover to a standby that lagged, ready for synapse to start on the new primary.
struct Failover {
    nodes: Nodes,
    standby: synapse_localpg::LocalCluster,
    config: std::path::PathBuf,
    ops: String,
    log: std::path::PathBuf,
}

/// Synapse (with `extra` lines in source a) captures a row the standby replays, then 20,000
/// rows only it and the primary see (the standby is down); synapse is killed, the primary
/// lost, the standby promoted; `on_new_primary` runs there, then a write and an update; the
/// configuration now points at the new primary.
fn fail_over_to_a_lagged_standby(extra: &str, on_new_primary: &str) -> Failover {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let standby = synapse_localpg::LocalCluster::start_standby(&nodes.source).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let (config, ops) = config_with_ops(&nodes, extra);
    let mut child = spawn_run(&config, &log);
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while standby.psql("app", "SELECT count(*) FROM items").unwrap() != "1" {
        assert!(Instant::now() < deadline, "the standby did not replay the primary's writes");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The standby goes away; the primary's next changes (a few MB of WAL) reach only synapse.
    standby.stop("fast").unwrap();
    nodes.source.psql("app", "INSERT INTO items SELECT g, g FROM generate_series(100, 20099) g").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, ITEMS_DIGEST, Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    nodes.source.stop("immediate").unwrap();
    standby.restart().unwrap();
    standby.promote().unwrap();
    if !on_new_primary.is_empty() {
        standby.psql("app", on_new_primary).unwrap();
    }
    standby.psql("app", "INSERT INTO items VALUES (30000, 3); UPDATE items SET v = 9 WHERE id = 1").unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("127.0.0.1:{}/", nodes.source.port()), &format!("127.0.0.1:{}/", standby.port()));
    std::fs::write(&config, text).unwrap();
    Failover { nodes, standby, config, ops, log }
}

/// Failover to a standby that lagged: it stopped receiving before the primary's last changes,
/// which synapse captured and applied. The promoted standby's WAL is behind the log's last
/// change and lacks those rows. With `on_gap: resync` synapse moves the new primary's WAL past
/// the log's position (so the log's positions keep growing), makes the slot there, and the
/// re-sync removes from the target the rows that exist only on the lost primary: the target
/// ends identical to the new primary, and streams on from it.
#[test]
fn a_promoted_standby_that_lagged_is_resynced() {
    let Failover { nodes, standby, config, ops, log } = fail_over_to_a_lagged_standby("    on_gap: resync\n", "");
    let child = spawn_run(&config, &log);
    common::wait_equal(&standby, &nodes.target, ITEMS_DIGEST, Duration::from_secs(120));
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items").unwrap(), "2", "the lost primary's rows stay");
    // The rows are fixed a moment before the re-sync is recorded done.
    let text = wait_logged(&log, "re-sync done");
    assert!(text.contains("moved the source's WAL past the log's last change"), "{}", common::log_tail(&log));
    standby.psql("app", "INSERT INTO items VALUES (30001, 4)").unwrap();
    common::wait_equal(&standby, &nodes.target, ITEMS_DIGEST, Duration::from_secs(60));
    wait_readyz(&ops, "capture/a: streaming", &log);
    drop(child);
}

/// The silent case the timeline check closes: failover to a standby that lagged, and a slot
/// made on the new primary by hand (or synced there) before synapse starts. The slot starts
/// *below* what synapse captured from the old primary, so it looks like synapse's own; without
/// the check the new primary's first commits (at positions the log already passed) would be
/// skipped without a word. The capture parks with the timeline change instead; nothing of the
/// new primary is applied until the operator accepts the gap, after which the stream goes on
/// past the log's position and `synapse repair fix` makes the target identical.
#[test]
fn a_slot_on_a_promoted_standby_is_not_taken_for_ours() {
    let slot_by_hand = "SELECT pg_create_logical_replication_slot('synapse_a', 'pgoutput')";
    let Failover { nodes, standby, config, ops, log } = fail_over_to_a_lagged_standby("", slot_by_hand);
    let child = spawn_run(&config, &log);
    let body = wait_readyz(&ops, "capture/a: parked [CAP011]", &log);
    assert!(body.contains("timeline changed from 1 to 2"), "{body}");
    std::thread::sleep(Duration::from_secs(3));
    let q = "SELECT count(*) || ':' || coalesce(sum(v), 0) FROM items WHERE id IN (1, 30000)";
    assert_eq!(nodes.target.psql("app", q).unwrap(), "1:1", "nothing of the new primary applied");

    accept_gap(&config, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("moved the source's WAL past the log's last change"), "{}", common::log_tail(&log));
    wait_readyz(&ops, "capture/a: streaming", &log);
    standby.psql("app", "INSERT INTO items VALUES (30001, 4)").unwrap();
    common::wait_equal(&standby, &nodes.target, "SELECT count(*) FROM items WHERE id = 30001", Duration::from_secs(60));
    repair_fix(&config);
    common::wait_equal(&standby, &nodes.target, ITEMS_DIGEST, Duration::from_secs(60));
    drop(child);
}
