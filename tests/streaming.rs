//! Transactions the source streams while they run (pgoutput protocol 2, PostgreSQL 14+): an
//! abort leaves nothing, a rolled-back savepoint is honoured, and kill -9 in the middle of a
//! streamed 200 MB transaction loses and duplicates nothing. Real clusters, the real binary;
//! the source's `logical_decoding_work_mem` is at its minimum (64 kB) so that the source streams.
#![allow(clippy::unwrap_used)]

mod common;

use common::{log_tail, spawn_run, wait_ready, Listeners, Nodes, SyncClient};
use std::path::Path;
use std::time::{Duration, Instant};

const SCHEMA: &str = "CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL);
     CREATE TABLE u (id bigint PRIMARY KEY, v text NOT NULL);
     CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO counters VALUES (1, 0);";

/// Both tables row by row and the counter.
const FINGERPRINT: &str =
    "SELECT (SELECT count(*) || ':' || coalesce(md5(string_agg(id || '=' || v, ',' ORDER BY id)), '') FROM t)
     || '/' || (SELECT count(*) || ':' || coalesce(md5(string_agg(id || '=' || v, ',' ORDER BY id)), '') FROM u)
     || '/' || (SELECT n FROM counters)";

struct Setup {
    nodes: Nodes,
    listeners: Listeners,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

/// Clusters and a configuration; `source_yaml` is added to source `a`'s settings.
fn setup(schema: &str, source_yaml: &str) -> Setup {
    let nodes = Nodes::start(schema);
    // The least the source keeps in memory per transaction before it streams it.
    nodes.source.psql("app", "ALTER SYSTEM SET logical_decoding_work_mem = '64kB'").unwrap();
    nodes.source.psql("app", "SELECT pg_reload_conf()").unwrap();
    let listeners = Listeners::new();
    let config = nodes.config_with(&listeners.yaml(""));
    let yaml = std::fs::read_to_string(&config).unwrap();
    // Source `a`'s last setting in the generated file: the extra lines go right after it.
    let anchor = "heartbeat_interval_secs: 0.5\n";
    assert!(yaml.contains(anchor), "the generated configuration changed shape:\n{yaml}");
    let yaml = yaml.replacen(anchor, &format!("{anchor}{source_yaml}"), 1);
    std::fs::write(&config, yaml).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    Setup { nodes, listeners, config, log }
}

/// One sample of `name{labels}` from /metrics (0 when absent).
fn metric(ops: &str, series: &str) -> f64 {
    let text = reqwest::blocking::get(format!("http://{ops}/metrics")).and_then(|r| r.text()).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// How many transactions the source streamed to the slot (`pg_stat_replication_slots`).
fn streamed_by_source(s: &Setup) -> u64 {
    let q = "SELECT coalesce(sum(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name = 'synapse_a'";
    s.nodes.source.psql("app", q).unwrap().parse().unwrap()
}

fn wait_same(s: &Setup, what: &str) -> String {
    let at = synapse_localpg::wait_until_equal(
        &s.nodes.source,
        &s.nodes.target,
        "app",
        FINGERPRINT,
        Duration::from_secs(180),
    );
    if let Err(e) = at {
        panic!("{what}: {e}\n{}", log_tail(&s.log));
    }
    s.nodes.target.psql("app", FINGERPRINT).unwrap()
}

fn streamed(ops: &str, outcome: &str) -> f64 {
    metric(ops, &format!("synapse_capture_streamed_transactions_total{{source=\"a\",outcome=\"{outcome}\"}}"))
}

#[test]
fn a_streamed_transaction_that_aborts_leaves_nothing() {
    let s = setup(SCHEMA, "");
    let _run = spawn_run(&s.config, &s.log);
    wait_ready(&s.listeners.ops, &s.log, 60);
    let source = s.nodes.source.url("app");
    let mut doomed = SyncClient::connect(&source);
    let mut kept = SyncClient::connect(&source);
    // Two large transactions open at once, their streamed blocks interleaved, with small
    // committed ones between them.
    doomed.batch_execute("BEGIN; INSERT INTO t SELECT g, repeat('d', 100) FROM generate_series(1, 20000) g").unwrap();
    kept.batch_execute("BEGIN; INSERT INTO t SELECT g, repeat('k', 100) FROM generate_series(100001, 120000) g")
        .unwrap();
    s.nodes.source.psql("app", "INSERT INTO u VALUES (1, 'between'); UPDATE counters SET n = n + 1").unwrap();
    doomed
        .batch_execute(
            "UPDATE t SET v = 'changed' WHERE id <= 10000; INSERT INTO u SELECT g, 'd' FROM generate_series(2, 5000) g",
        )
        .unwrap();
    kept.batch_execute("INSERT INTO u SELECT g, 'k' FROM generate_series(10001, 15000) g").unwrap();
    doomed.batch_execute("ROLLBACK").unwrap();
    s.nodes.source.psql("app", "INSERT INTO u VALUES (2, 'after'); UPDATE counters SET n = n + 1").unwrap();
    kept.batch_execute("COMMIT").unwrap();

    let got = wait_same(&s, "after the abort");
    assert!(got.starts_with("20000:"), "only the committed large transaction's rows: {got}");
    assert!(got.ends_with("/2"), "{got}");
    assert_eq!(s.nodes.target.psql("app", "SELECT count(*) FROM t WHERE v <> repeat('k', 100)").unwrap(), "0");
    assert_eq!(s.nodes.target.psql("app", "SELECT count(*) FROM u").unwrap(), "5002");
    // The source did stream both, and synapse saw one end each way, holding nothing after.
    assert!(streamed_by_source(&s) >= 2, "the source streamed {} transactions", streamed_by_source(&s));
    let ops = &s.listeners.ops;
    assert!(streamed(ops, "aborted") >= 1.0, "no streamed abort counted");
    assert!(streamed(ops, "committed") >= 1.0, "no streamed commit counted");
    assert_eq!(metric(ops, "synapse_capture_spool_bytes{source=\"a\"}"), 0.0);
}

#[test]
fn a_rolled_back_savepoint_inside_a_streamed_transaction_is_honoured() {
    let s = setup(SCHEMA, "");
    let _run = spawn_run(&s.config, &s.log);
    wait_ready(&s.listeners.ops, &s.log, 60);
    // Every step is far above 64 kB: the source streams between them, so the rolled-back work
    // has already reached synapse when its savepoint is rolled back. Table u is first used
    // inside savepoint a; after its rollback the source does not send u's definition again.
    s.nodes
        .source
        .psql(
            "app",
            "BEGIN;
             INSERT INTO t SELECT g, 'top' FROM generate_series(1, 5000) g;
             SAVEPOINT a;
             INSERT INTO u SELECT g, 'in a' FROM generate_series(1, 5000) g;
             SAVEPOINT b;
             INSERT INTO t SELECT g, 'in b' FROM generate_series(5001, 10000) g;
             ROLLBACK TO b;
             UPDATE t SET v = 'updated in a' WHERE id <= 2500;
             ROLLBACK TO a;
             INSERT INTO u SELECT g, 'after a' FROM generate_series(1, 3000) g;
             SAVEPOINT c;
             INSERT INTO t SELECT g, 'in c' FROM generate_series(10001, 15000) g;
             RELEASE c;
             SAVEPOINT d;
             DELETE FROM t WHERE id % 2 = 0;
             UPDATE u SET v = 'in d';
             ROLLBACK TO d;
             UPDATE counters SET n = n + 1;
             COMMIT",
        )
        .unwrap();
    let got = wait_same(&s, "after the savepoints");
    assert!(got.starts_with("10000:") && got.contains("/3000:") && got.ends_with("/1"), "{got}");
    let q = "SELECT string_agg(v || ' ' || n, ', ' ORDER BY v) FROM (SELECT v, count(*) n FROM t GROUP BY v) x";
    assert_eq!(s.nodes.target.psql("app", q).unwrap(), "in c 5000, top 5000");
    assert_eq!(s.nodes.target.psql("app", "SELECT DISTINCT v FROM u").unwrap(), "after a");
    assert!(streamed_by_source(&s) >= 1, "the source streamed nothing");
    assert!(streamed(&s.listeners.ops, "committed") >= 1.0, "no streamed commit counted");
}

#[test]
fn kill_dash_nine_in_a_streamed_200_mb_transaction_loses_and_duplicates_nothing() {
    // Writing the transaction out takes longer than the receive timeout: that is not silence of
    // the source's (else the capture would reconnect and have it streamed again, forever).
    let s = setup(
        &format!("{SCHEMA} CREATE TABLE big (id bigint PRIMARY KEY, pad text NOT NULL);"),
        "    receive_timeout_secs: 2\n",
    );
    let ops = s.listeners.ops.clone();
    let mut run = spawn_run(&s.config, &s.log);
    wait_ready(&ops, &s.log, 60);
    // 1,000,000 rows of ~200 bytes in one transaction, with small ones committing beside it.
    let url = s.nodes.source.url("app");
    let big = std::thread::spawn(move || {
        let mut c = SyncClient::connect(&url);
        c.batch_execute(
            "BEGIN; INSERT INTO big SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 1000000) g;
             UPDATE counters SET n = n + 1; COMMIT",
        )
        .unwrap();
    });
    let url = s.nodes.source.url("app");
    let small = std::thread::spawn(move || {
        let mut c = SyncClient::connect(&url);
        for i in 1..=300i64 {
            c.execute("INSERT INTO u VALUES ($1, 'small')", &[&i]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    });

    // Kill 1: while the source streams the transaction, with part of it spooled.
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !ok() {
            assert!(Instant::now() < deadline, "never {what}:\n{}", log_tail(&s.log));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("spooled 20 MB", &|| metric(&ops, "synapse_capture_spool_bytes{source=\"a\"}") > 20e6);
    kill(&mut run);
    let mut run = spawn_run(&s.config, &s.log);
    big.join().unwrap();
    // Kill 2: after its commit, while the restarted capture writes it into the log.
    wait_for("writing the transaction to the log", &|| {
        metric(&ops, "synapse_capture_events_total{source=\"a\"}") > 100_000.0
    });
    kill(&mut run);
    let mut run = spawn_run(&s.config, &s.log);
    small.join().unwrap();

    let q = "SELECT count(*) || ':' || sum(id) || ':' || md5(string_agg(pad, '' ORDER BY id)) FROM big";
    let at = synapse_localpg::wait_until_equal(&s.nodes.source, &s.nodes.target, "app", q, Duration::from_secs(300));
    at.unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&s.log)));
    let got = wait_same(&s, "after two kills");
    assert!(got.contains("/300:") && got.ends_with("/1"), "the small ones and one count of the big one: {got}");
    // Memory stayed flat: the transaction decoded is well over 300 MB; the last run, which
    // finished writing and applying it, stays within P7's bound for a 1 GB one (≈ 170 MiB measured here, most of it the log's
    // cache and the allocator's arenas).
    let peak = peak_rss_mib(run.id());
    assert!(peak < 256.0, "peak RSS {peak:.0} MiB while writing a 200 MB transaction");
    assert!(streamed_by_source(&s) >= 1, "the source streamed nothing");
    assert_eq!(metric(&ops, "synapse_capture_spool_bytes{source=\"a\"}"), 0.0);
    kill(&mut run);
    let text = std::fs::read_to_string(&s.log).unwrap();
    assert!(!text.contains("panicked"), "{}", log_tail(Path::new(&s.log)));
    assert!(!text.contains("receive timeout"), "writing the transaction out passed for silence:\n{}", log_tail(&s.log));
}

fn kill(run: &mut std::process::Child) {
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();
}

/// The process's peak resident set (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}
