//! Schema changes on the source reach the target in order with the rows, while a writer keeps
//! writing the same table: the migrations that used to diverge silently (a default the target
//! never filled, a rename that left an empty column beside the old one, a widened type the
//! target refused) and a migration tool's multi-statement string. A change one target rejects
//! stops only that target, names the statement, and is passed once the operator records it.
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, Nodes};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_localpg::LocalCluster;

/// The application's table: created on the source and, by the same migration, on the targets
/// (synapse copies the rows).
const TABLE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text, n int NOT NULL DEFAULT 0)";
const ROWS: &str = "INSERT INTO items (id, v) SELECT g, 'v' || g FROM generate_series(1, 200) g";

fn start() -> Nodes {
    let nodes = Nodes::start(&format!("{TABLE}; {ROWS}"));
    nodes.target.psql("app", TABLE).unwrap();
    nodes
}

/// The table's shape as the catalog holds it, then a digest of its rows in key order.
const SHAPE_AND_ROWS: &str = "SELECT (SELECT string_agg(column_name || ' ' || data_type || ' ' || is_nullable
            || ' ' || coalesce(column_default, '-'), ', ' ORDER BY ordinal_position)
        FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'items')
    || ' | ' || (SELECT count(*) || ' rows ' || md5(string_agg(i::text, ';' ORDER BY id)) FROM items i)";

fn wait_same(nodes: &Nodes, target_db: &str, what: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = nodes.source.psql("app", SHAPE_AND_ROWS).unwrap_or_default();
        let t = nodes.target.psql(target_db, SHAPE_AND_ROWS).unwrap_or_default();
        if s == t && !s.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "after {what}:\nsource {s}\ntarget {t}\n{}", common::log_tail(log));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Inserts rows and bumps `n` until stopped (columns no migration renames or drops); waits
/// while `pause` is set, so the tables can be compared at rest.
fn writer(
    source: &LocalCluster,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let mut client = common::SyncClient::connect(&source.url("app"));
    std::thread::spawn(move || {
        let mut id = 1000i64;
        while !stop.load(Ordering::Relaxed) {
            if pause.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            id += 1;
            client.batch_execute(&format!("INSERT INTO items (id) VALUES ({id})")).unwrap();
            client.batch_execute(&format!("UPDATE items SET n = n + 1 WHERE id = {}", id % 200 + 1)).unwrap();
            written.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

#[test]
fn migrations_reach_the_target_in_order_with_the_rows() {
    let nodes = start();
    let config = nodes.config("");
    let log = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    nodes.wait_copied(1, Duration::from_secs(60), &log);
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let w = writer(&nodes.source, stop.clone(), pause.clone(), written.clone());

    let migrations = [
        // A constant default: the target's existing rows must hold it too.
        "ALTER TABLE items ADD COLUMN w int DEFAULT 7",
        // A rename keeps the values under the new name.
        "ALTER TABLE items RENAME COLUMN v TO label",
        // A widened type, then a value only the wider type takes.
        "ALTER TABLE items ALTER COLUMN w TYPE bigint",
        "UPDATE items SET w = 5000000000 WHERE id = 1",
        "ALTER TABLE items ADD COLUMN status text NOT NULL DEFAULT 'new'",
        "CREATE INDEX items_label ON items (label)",
        // A migration tool's file sent as one string: DDL, a backfill, DDL.
        "ALTER TABLE items ADD COLUMN score numeric; UPDATE items SET score = id * 1.5 WHERE id <= 200; \
         ALTER TABLE items ALTER COLUMN score SET DEFAULT 0",
        "ALTER TABLE items ALTER COLUMN label SET DEFAULT 'unnamed'",
        "ALTER TABLE items DROP COLUMN status",
        "ALTER TABLE items ALTER COLUMN w SET NOT NULL",
        "ALTER TABLE items ADD CONSTRAINT items_n_positive CHECK (n >= 0)",
        "COMMENT ON TABLE items IS 'replicated'",
    ];
    for (i, m) in migrations.into_iter().enumerate() {
        if i % 4 == 3 {
            // kill -9 right after a migration: its change and position commit together or not.
            nodes.source.psql("app", m).unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            child = spawn_run(&config, &log);
        } else {
            nodes.source.psql("app", m).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300)); // rows of the new shape follow it
        pause.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50)); // the writer's statement in flight ends
        wait_same(&nodes, "app", m, &log);
        pause.store(false, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    wait_same(&nodes, "app", "the writer stopped", &log);
    assert!(written.load(Ordering::Relaxed) > 20, "the writer kept writing through the migrations");
    let indexes = "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = 'items'";
    assert_eq!(nodes.target.psql("app", indexes).unwrap(), nodes.source.psql("app", indexes).unwrap());
    let comment = "SELECT obj_description('items'::regclass)";
    assert_eq!(nodes.target.psql("app", comment).unwrap(), "replicated");

    // A renamed table goes on replicating under its new name; a dropped one is dropped.
    nodes.source.psql("app", "ALTER TABLE items RENAME TO things").unwrap();
    nodes.source.psql("app", "INSERT INTO things (id, w) VALUES (99999, 1)").unwrap();
    let q = "SELECT count(*) || ' ' || sum(w) FROM things";
    synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", q, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", common::log_tail(&log)));
    nodes.source.psql("app", "DROP TABLE things").unwrap();
    let gone = "SELECT count(*) FROM pg_tables WHERE tablename IN ('items', 'things')";
    synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", gone, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", common::log_tail(&log)));
}

/// The walsender may decode a commit before its backend leaves the proc array: for that moment
/// the source's catalog, read from another session, does not show the change yet. A synchronous
/// standby that never answers holds the renaming session in that moment for as long as needed.
#[test]
fn a_change_decoded_before_its_commit_is_visible_is_captured() {
    let nodes = start();
    let config = nodes.config("");
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    nodes.wait_copied(1, Duration::from_secs(60), &log);
    nodes.source.psql("postgres", "ALTER SYSTEM SET synchronous_standby_names = 'nobody'").unwrap();
    nodes.source.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    let mut renamer = common::SyncClient::connect(&nodes.source.url("app"));
    let rename = std::thread::spawn(move || renamer.batch_execute("ALTER TABLE items RENAME TO things").unwrap());

    // The target gets the rename while the source's other sessions still see `items`.
    let renamed = "SELECT count(*) FROM pg_tables WHERE tablename = 'things'";
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.target.psql("app", renamed).unwrap_or_default() != "1" {
        assert!(Instant::now() < deadline, "the rename never reached the target:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(nodes.source.psql("app", renamed).unwrap(), "0", "the rename's commit was already visible");

    nodes.source.psql("postgres", "ALTER SYSTEM RESET synchronous_standby_names").unwrap();
    nodes.source.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    rename.join().unwrap();
    nodes.source.psql("app", "INSERT INTO things (id) VALUES (99999)").unwrap();
    let q = "SELECT count(*) || ' ' || sum(id) FROM things";
    synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", q, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", common::log_tail(&log)));
}

#[test]
fn a_change_one_target_rejects_stops_only_that_target_until_skipped() {
    let nodes = start();
    nodes.target.create_database("app2").unwrap();
    nodes.target.psql("app2", TABLE).unwrap();
    let config = nodes.config("");
    let two = std::fs::read_to_string(&config).unwrap().replace(
        "ops:\n",
        &format!("  - name: c\n    url: {}\nsupervision:\n  park_retry_secs: 1\nops:\n", nodes.target.url("app2")),
    );
    std::fs::write(&config, &two).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    let copied = "SELECT count(*) FROM synapse.table_sync WHERE state = 'ready'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes.target.psql("app", copied).unwrap_or_default() != "1"
        || nodes.target.psql("app2", copied).unwrap_or_default() != "1"
    {
        assert!(Instant::now() < deadline, "initial copies:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Target c already has a column of that name, made by hand: the change cannot run there.
    nodes.target.psql("app2", "ALTER TABLE items ADD COLUMN w int").unwrap();
    nodes.source.psql("app", "ALTER TABLE items ADD COLUMN w int DEFAULT 7").unwrap();
    nodes.source.psql("app", "INSERT INTO items (id) VALUES (5000)").unwrap();
    wait_same(&nodes, "app", "the change", &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !common::log_tail(&log).contains("APP009") {
        assert!(Instant::now() < deadline, "target c never parked:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = common::log_tail(&log);
    assert!(text.contains("ALTER TABLE items ADD COLUMN w int DEFAULT 7"), "names the statement:\n{text}");
    assert!(text.contains("synapse.schema_skips"), "tells the fix:\n{text}");
    assert_eq!(nodes.target.psql("app2", "SELECT count(*) FROM items WHERE id = 5000").unwrap(), "0");

    // The operator keeps c's own column and has the change passed; c then catches up.
    let offset = text.split("log offset ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap().to_owned();
    nodes
        .target
        .psql("app2", &format!("INSERT INTO synapse.schema_skips (source_node, log_offset) VALUES ('a', {offset})"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.target.psql("app2", "SELECT count(*) FROM items WHERE id = 5000").unwrap_or_default() != "1" {
        assert!(Instant::now() < deadline, "target c never resumed:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
}
