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

/// A table's shape as the catalog holds it, then a digest of its rows.
const SHAPE_AND_ROWS: &str = "SELECT '{t}: ' || (SELECT string_agg(column_name || ' ' || data_type || ' ' || udt_name || ' '
            || is_nullable || ' ' || coalesce(column_default, '-') || ' ' || coalesce(generation_expression, '-'),
            ', ' ORDER BY ordinal_position)
        FROM information_schema.columns WHERE table_schema = 'public' AND table_name = '{t}')
    || ' | ' || (SELECT count(*) || ' rows ' || coalesce(md5(string_agg(i::text, ';' ORDER BY i::text)), '-') FROM {t} i)";

/// The public schema's enum types and constraints.
const TYPES_AND_CONSTRAINTS: &str = "SELECT coalesce((SELECT string_agg(t.typname || '=' || (SELECT string_agg(e.enumlabel, ','
            ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid), '; ' ORDER BY t.typname)
        FROM pg_type t WHERE t.typnamespace = 'public'::regnamespace AND t.typtype = 'e'), '-')
    || ' | ' || coalesce((SELECT string_agg(c.conrelid::regclass || ' ' || c.conname || ' ' || pg_get_constraintdef(c.oid),
            '; ' ORDER BY c.conrelid::regclass::text, c.conname)
        FROM pg_constraint c WHERE c.connamespace = 'public'::regnamespace), '-')
    || ' | ' || coalesce((SELECT string_agg(indexdef, '; ' ORDER BY indexname) FROM pg_indexes
        WHERE schemaname = 'public'), '-')";

/// Every public table's shape and rows, the enum types, the constraints and indexes: what a target must
/// match.
fn digest(cluster: &LocalCluster, db: &str) -> String {
    let list = "SELECT string_agg(tablename, ' ' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'";
    let Ok(tables) = cluster.psql(db, list) else { return String::new() };
    let mut out = vec![cluster.psql(db, TYPES_AND_CONSTRAINTS).unwrap_or_default()];
    for t in tables.split_whitespace() {
        out.push(cluster.psql(db, &SHAPE_AND_ROWS.replace("{t}", t)).unwrap_or_default());
    }
    out.join("\n")
}

fn wait_same(nodes: &Nodes, target_db: &str, what: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = digest(&nodes.source, "app");
        let t = digest(&nodes.target, target_db);
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
        "CREATE INDEX items_w ON items (w) WHERE w > 0",
        // A migration tool's file sent as one string: DDL, a backfill, DDL.
        "ALTER TABLE items ADD COLUMN score numeric; UPDATE items SET score = id * 1.5 WHERE id <= 200; \
         ALTER TABLE items ALTER COLUMN score SET DEFAULT 0",
        "ALTER TABLE items ALTER COLUMN label SET DEFAULT 'unnamed'",
        "ALTER TABLE items DROP COLUMN status",
        "ALTER TABLE items ALTER COLUMN w SET NOT NULL",
        "ALTER TABLE items ADD CONSTRAINT items_n_positive CHECK (n >= 0)",
        "COMMENT ON COLUMN items.n IS 'times incremented'",
        "ALTER TABLE items RENAME CONSTRAINT items_n_positive TO items_n_nonnegative",
        "COMMENT ON TABLE items IS 'replicated'",
        // An enum type, a column of it, a value added and used at once.
        "CREATE TYPE mood AS ENUM ('calm', 'busy')",
        "ALTER TABLE items ADD COLUMN mood mood DEFAULT 'calm'",
        "ALTER TYPE mood ADD VALUE 'away'",
        "UPDATE items SET mood = 'away' WHERE id <= 10",
        // A type change with a conversion.
        // (Not a narrowing type change while writers run: a peer's row of the old type that
        // arrives after it may not convert — README's mesh section states that limit.)
        "ALTER TABLE items ALTER COLUMN score TYPE numeric(12, 2)",
        // A new table created and filled by one migration, then a foreign key to it.
        "CREATE TABLE owners (id int PRIMARY KEY, name text NOT NULL); \
         INSERT INTO owners SELECT g, 'owner ' || g FROM generate_series(1, 20) g",
        "ALTER TABLE items ADD COLUMN owner_id int REFERENCES owners (id)",
        "UPDATE items SET owner_id = id % 20 + 1 WHERE id <= 200",
        // A table split off: made from a query (rows the stream never carried), keyed after.
        // (synapse is killed right after it: at restart the initial copy takes the new table
        // before the log's CREATE TABLE AS is applied, which must then be passed, not fail.)
        "CREATE TABLE item_labels AS SELECT id, label FROM items WHERE id <= 100; \
         ALTER TABLE item_labels ADD PRIMARY KEY (id)",
        "DROP INDEX items_label",
        "ALTER TABLE items DROP COLUMN label",
        "CREATE TABLE archive (LIKE items INCLUDING DEFAULTS); ALTER TABLE archive ADD PRIMARY KEY (id); \
         INSERT INTO archive SELECT * FROM items WHERE id <= 5",
        "DROP TABLE archive",
        // A table filled before it had a key (so never streamed), keyed later: copied beside.
        "CREATE TABLE tags (id int, tag text); INSERT INTO tags SELECT g, 't' || g FROM generate_series(1, 30) g; \
         ALTER TABLE tags ADD PRIMARY KEY (id)",
        "ALTER TABLE items ALTER COLUMN w DROP NOT NULL",
        "ALTER TABLE items ADD COLUMN double_n bigint GENERATED ALWAYS AS (n * 2) STORED",
        "ALTER TABLE items RENAME COLUMN w TO weight",
        "INSERT INTO item_labels VALUES (100000, 'late'); DELETE FROM item_labels WHERE id = 1",
    ];
    assert!(migrations.len() >= 25);
    for (i, m) in migrations.into_iter().enumerate() {
        if m == "DROP INDEX items_label" {
            // The target lacks the index (dropped there by hand, or made at the source before
            // the target existed): the drop leaves what the target already has, and passes.
            nodes.target.psql("app", m).unwrap();
        }
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
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("owed copies made"), "tags was copied beside the stream:\n{}", common::log_tail(&log));
    let indexes = "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = 'items'";
    assert_eq!(nodes.target.psql("app", indexes).unwrap(), nodes.source.psql("app", indexes).unwrap());
    let comment = "SELECT obj_description('items'::regclass)";
    assert_eq!(nodes.target.psql("app", comment).unwrap(), "replicated");

    // A renamed table goes on replicating under its new name; a dropped one is dropped.
    nodes.source.psql("app", "ALTER TABLE items RENAME TO things").unwrap();
    nodes.source.psql("app", "INSERT INTO things (id, weight) VALUES (99999, 1)").unwrap();
    let q = "SELECT count(*) || ' ' || sum(weight) FROM things";
    synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", q, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", common::log_tail(&log)));
    nodes.source.psql("app", "DROP TABLE things").unwrap();
    let gone = "SELECT count(*) FROM pg_tables WHERE tablename IN ('items', 'things', 'owners', 'item_labels')";
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

/// A consumer of the stream sees each statement in its place, with the columns it left.
#[test]
fn consumers_see_the_statement_and_the_new_columns() {
    let nodes = start();
    let config = nodes.config("");
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("api:\n  listen: \"\"", &format!("api:\n  listen: \"{api}\""));
    std::fs::write(&config, text).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    nodes.wait_copied(1, Duration::from_secs(60), &log);
    nodes
        .source
        .psql("app", "UPDATE items SET n = 1 WHERE id = 1; ALTER TABLE items ADD COLUMN w int DEFAULT 7")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ddl = loop {
        let (status, body) =
            common::request(&api, "GET", "/v1/streams/a/changes?operations=schema&limit=100", "", None);
        // One event per line.
        let mut events = body.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        if let Some(e) = events.find(|e| e["type"] == "io.synapsedb.ddl.v1") {
            break e;
        }
        assert!(Instant::now() < deadline, "no ddl event: {status} {body}\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ddl["subject"], "public.items");
    assert_eq!(ddl["data"]["tag"], "ALTER TABLE");
    assert_eq!(ddl["data"]["statement"], "ALTER TABLE items ADD COLUMN w int DEFAULT 7");
    let columns: Vec<String> = ddl["data"]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {}", c["name"].as_str().unwrap(), c["type"].as_str().unwrap()))
        .collect();
    assert_eq!(columns, ["id bigint", "v text", "n integer", "w integer"]);
}

/// `ddl: events` leaves the target's schema alone (rows still arrive, a new column is added
/// when a row carries it); `ddl: stop` parks the target at the change until it is recorded.
#[test]
fn the_ddl_policy_is_the_sources() {
    for policy in ["events", "stop"] {
        let nodes = start();
        let config = nodes.config(&format!("    ddl: {policy}\n"));
        let text =
            std::fs::read_to_string(&config).unwrap().replace("ops:\n", "supervision:\n  park_retry_secs: 1\nops:\n");
        std::fs::write(&config, text).unwrap();
        let log = nodes.dir.path().join("synapse.log");
        let _child = spawn_run(&config, &log);
        nodes.wait_copied(1, Duration::from_secs(60), &log);
        nodes.source.psql("app", "ALTER TABLE items ADD COLUMN w int DEFAULT 7").unwrap();
        nodes.source.psql("app", "INSERT INTO items (id, w) VALUES (5000, 1)").unwrap();
        let arrived = "SELECT count(*) FROM items WHERE id = 5000";
        let deadline = Instant::now() + Duration::from_secs(30);
        if policy == "events" {
            while nodes.target.psql("app", arrived).unwrap_or_default() != "1" {
                assert!(Instant::now() < deadline, "{policy}: the row never arrived:\n{}", common::log_tail(&log));
                std::thread::sleep(Duration::from_millis(100));
            }
            // The statement did not run: old rows were not given the default.
            assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM items WHERE w IS NULL").unwrap(), "200");
            assert!(std::fs::read_to_string(&log).unwrap().contains("not running a schema change (ddl: events)"));
            continue;
        }
        while !std::fs::read_to_string(&log).unwrap().contains("APP009") {
            assert!(Instant::now() < deadline, "{policy}: never parked:\n{}", common::log_tail(&log));
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = common::log_tail(&log);
        assert!(text.contains("ddl: stop"), "names the policy:\n{text}");
        assert_eq!(nodes.target.psql("app", arrived).unwrap(), "0");
        // The operator makes the change by hand and records it; the target goes on.
        nodes.target.psql("app", "ALTER TABLE items ADD COLUMN w int DEFAULT 7").unwrap();
        let offset = text.split("log offset ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap().to_owned();
        let skip = format!("INSERT INTO synapse.schema_skips (source_node, log_offset) VALUES ('a', {offset})");
        nodes.target.psql("app", &skip).unwrap();
        wait_same(&nodes, "app", "the recorded change", &log);
    }
}

/// The application migrates as its own role, with no rights on synapse's objects (the event
/// trigger runs as that role): its statements work as before, and the tables it makes join
/// the capture, one made from a query copied beside the stream.
#[test]
fn an_application_role_migrates_as_before() {
    let nodes = start();
    let grants = "CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app; ALTER TABLE items OWNER TO app";
    nodes.source.psql("app", grants).unwrap();
    let config = nodes.config("");
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    nodes.wait_copied(1, Duration::from_secs(60), &log);
    let mut client = common::SyncClient::connect(&nodes.source.url("app").replace("postgres@", "app@"));
    client
        .batch_execute(
            "ALTER TABLE items ADD COLUMN w int DEFAULT 7; \
             CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'x'); \
             CREATE TABLE picked AS SELECT id FROM items WHERE id <= 10; ALTER TABLE picked ADD PRIMARY KEY (id)",
        )
        .unwrap();
    client.batch_execute("INSERT INTO notes VALUES (2, 'y'); DELETE FROM picked WHERE id = 1").unwrap();
    wait_same(&nodes, "app", "the application's migration", &log);
    let denied = client.batch_execute("SELECT * FROM synapse.capture_publications").unwrap_err();
    assert!(denied.to_string().contains("permission denied") || format!("{denied:?}").contains("42501"), "{denied:?}");
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
    let out = common::synapse(&["skip-ddl", "-c", config.to_str().unwrap(), "--source", "a", "--target", "c"])
        .args(["--offset", &offset, "--by", "ops-oncall"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let audit = "SELECT skipped_by FROM synapse.schema_skips";
    assert_eq!(nodes.target.psql("app2", audit).unwrap(), "synapse skip-ddl by ops-oncall");
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.target.psql("app2", "SELECT count(*) FROM items WHERE id = 5000").unwrap_or_default() != "1" {
        assert!(Instant::now() < deadline, "target c never resumed:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A mesh table's shape and rows on one node, by column name (two nodes that added two
/// columns in another order hold the same table): columns with their types, nullability and
/// defaults, then a digest of the rows as JSON objects, then the public constraints and enums.
fn mesh_digest(cluster: &LocalCluster) -> String {
    let shape = "SELECT string_agg(column_name || ' ' || data_type || ' ' || udt_name || ' ' || is_nullable || ' '
            || coalesce(column_default, '-') || ' ' || coalesce(generation_expression, '-'), ', ' ORDER BY column_name)
        FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'items'";
    let rows = "SELECT count(*) || ' rows ' || md5(string_agg(to_jsonb(i)::text, ';' ORDER BY id)) FROM items i";
    let comment = "SELECT coalesce(col_description(attrelid, attnum), '-') FROM pg_attribute
        WHERE attrelid = 'items'::regclass AND attname = 'n'";
    [shape, rows, TYPES_AND_CONSTRAINTS, comment]
        .iter()
        .map(|q| cluster.psql("app", q).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn wait_mesh_same(mesh: &common::mesh::KilledMesh, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got: Vec<String> = mesh.nodes.iter().map(mesh_digest).collect();
        if got[0] == got[1] && got[1] == got[2] && !got[0].is_empty() {
            return got[0].clone();
        }
        let all = "SELECT string_agg(to_jsonb(i)::text, E'\\n' ORDER BY id) FROM items i";
        let sets: Vec<std::collections::BTreeSet<String>> = mesh
            .nodes
            .iter()
            .map(|n| n.psql("app", all).unwrap_or_default().lines().map(str::to_owned).collect())
            .collect();
        let odd: Vec<String> = (0..3)
            .flat_map(|i| {
                sets[i].iter().filter(|r| !sets.iter().all(|s| s.contains(*r))).map(move |r| format!("node {i}: {r}"))
            })
            .take(12)
            .collect();
        let sample = odd.join("\n");
        assert!(
            Instant::now() < deadline,
            "after {what} the nodes differ:\n{}\n{}\n{}",
            got.join("\n"),
            sample,
            common::mesh::tail(&mesh.logtext())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const MESH_ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
    INSERT INTO items (id, v) SELECT g, 'v' || g FROM generate_series(1, 200) g";

/// The migration suite on a three-node mesh: each migration issued on the next node while every
/// node writes the table. After each one all three nodes hold the same schema and rows, and the
/// writers go on: each node's triggers follow the table's new shape — in the migration's own
/// transaction on the node that ran it (a write right after a dropped or renamed column does
/// not fail), in the applier's on the others. kill -9 of synapse between migrations changes
/// nothing.
#[test]
fn migrations_issued_on_any_mesh_node_reach_every_node() {
    migrations_on_a_mesh("  tables: [public.items]\n");
}

/// The same suite in a hub-and-spoke mesh (u0 the hub): a migration issued on one spoke reaches
/// the other through the hub, which passes on what it applied, and is not run again on the
/// spoke it came from when the hub sends it back.
#[test]
fn migrations_issued_on_a_spoke_reach_the_other_spokes_through_the_hub() {
    migrations_on_a_mesh("  hub: u0\n  tables: [public.items]\n");
}

fn migrations_on_a_mesh(mesh_yaml: &str) {
    let mesh = common::mesh::KilledMesh::new(MESH_ITEMS, mesh_yaml);
    let mut child = mesh.start(1);
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let mut client = common::SyncClient::connect(&mesh.nodes[i].url("app"));
            let (stop, pause, written) = (stop.clone(), pause.clone(), written.clone());
            std::thread::spawn(move || {
                let mut id = 100_000 * (i as i64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    if pause.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    id += 1;
                    client.batch_execute(&format!("INSERT INTO items (id) VALUES ({id})")).unwrap();
                    // Each node bumps its own third of the shared rows: concurrent updates of one
                    // row resolve by clock, and would make the count meaningless.
                    let k = (id % 66) * 3 + i as i64 + 1;
                    client.batch_execute(&format!("UPDATE items SET n = n + 1 WHERE id = {k}")).unwrap();
                    written.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    let migrations = [
        "ALTER TABLE items ADD COLUMN w int DEFAULT 7",
        "ALTER TABLE items RENAME COLUMN v TO label",
        "ALTER TABLE items ALTER COLUMN w TYPE bigint",
        "UPDATE items SET w = 5000000000 WHERE id = 1",
        "ALTER TABLE items ADD COLUMN status text NOT NULL DEFAULT 'new'",
        "CREATE INDEX items_label ON items (label)",
        // A migration tool's file as one string: DDL, a backfill through the new column, DDL.
        // (Not `SET DEFAULT` on a column the writers omit: a row another node inserted before
        // the change reached it takes the old default there and the new one elsewhere — the
        // limit README's mesh section states.)
        "ALTER TABLE items ADD COLUMN score numeric; UPDATE items SET score = id * 1.5 WHERE id <= 200; \
         CREATE INDEX items_score ON items (score)",
        "ALTER TABLE items ALTER COLUMN label SET STATISTICS 500",
        "ALTER TABLE items DROP COLUMN status",
        "ALTER TABLE items ALTER COLUMN w SET NOT NULL",
        "ALTER TABLE items ADD CONSTRAINT items_n_positive CHECK (n >= 0)",
        "COMMENT ON COLUMN items.n IS 'times incremented'",
        "ALTER TABLE items RENAME CONSTRAINT items_n_positive TO items_n_nonnegative",
        "CREATE TYPE mood AS ENUM ('calm', 'busy')",
        "ALTER TABLE items ADD COLUMN mood mood DEFAULT 'calm'",
        "ALTER TYPE mood ADD VALUE 'away'",
        "UPDATE items SET mood = 'away' WHERE id <= 10",
        // (Not a narrowing type change while writers run: a peer's row of the old type that
        // arrives after it may not convert — README's mesh section states that limit.)
        "ALTER TABLE items ALTER COLUMN score TYPE numeric(12, 2)",
        // A dropped column written right after, in the same transaction: the trigger follows.
        "ALTER TABLE items DROP COLUMN label; UPDATE items SET score = 1 WHERE id = 2",
        "ALTER TABLE items ALTER COLUMN w DROP NOT NULL",
        "ALTER TABLE items ADD COLUMN double_n bigint GENERATED ALWAYS AS (n * 2) STORED",
        "ALTER TABLE items RENAME COLUMN w TO weight; UPDATE items SET weight = 3 WHERE id = 3",
        "ALTER TABLE items ADD COLUMN note text; UPDATE items SET note = 'x' WHERE id <= 50",
        "CREATE INDEX items_note ON items (note) WHERE note IS NOT NULL",
        "ALTER TABLE items ADD COLUMN tags text[]; UPDATE items SET tags = ARRAY['a', 'b'] WHERE id <= 5",
        "ALTER TABLE items DROP CONSTRAINT items_n_nonnegative",
    ];
    for (i, m) in migrations.into_iter().enumerate() {
        mesh.sql(i % 3, m);
        if i % 4 == 3 {
            // kill -9 right after a migration: its change and position commit together or not.
            mesh.kill(child);
            child = mesh.restart();
        }
        std::thread::sleep(Duration::from_millis(300)); // rows of the new shape follow it
        pause.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50)); // the writers' statements in flight end
        wait_mesh_same(&mesh, m);
        pause.store(false, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let end = wait_mesh_same(&mesh, "the writers stopped");
    assert!(end.contains("weight bigint int8 YES 7"), "{end}");
    assert!(written.load(Ordering::Relaxed) > 30, "the writers kept writing through the migrations");
    // Versions follow the shape: a column added by a migration is stamped by later writes.
    let stamped = "SELECT count(*) FROM synapse.row_version WHERE tbl = 'public.items' AND cols ? 'note'";
    assert!(mesh.sql(0, stamped).parse::<i64>().unwrap() >= 50, "{}", mesh.sql(0, stamped));
    // A mesh table keeps its name: a rename is refused on the node, in its transaction.
    let e = mesh.nodes[1].psql("app", "ALTER TABLE items RENAME TO things").unwrap_err();
    assert!(format!("{e:?}").contains("cannot be renamed"), "{e:?}");
    drop(child);
}

/// Two nodes changing the table at once (synapse stopped, so neither has seen the other's
/// change): different columns are both applied everywhere; the same statement run on two
/// nodes is applied once on each node (where it arrives second, it found what it makes and
/// is passed as applied). One column added with two types cannot be both: the appliers that
/// meet the other node's statement park, naming it, and the rest of the mesh goes on.
#[test]
fn concurrent_schema_changes_on_two_mesh_nodes_converge_or_park_named() {
    let mesh = common::mesh::KilledMesh::new(MESH_ITEMS, "  tables: [public.items]\n");
    let child = mesh.start(1);
    mesh.kill(child);
    mesh.sql(0, "ALTER TABLE items ADD COLUMN a int DEFAULT 1; UPDATE items SET a = 5 WHERE id = 1");
    mesh.sql(1, "ALTER TABLE items ADD COLUMN b text DEFAULT 'x'; UPDATE items SET b = 'y' WHERE id = 2");
    mesh.sql(0, "ALTER TABLE items ADD COLUMN c int");
    mesh.sql(2, "ALTER TABLE items ADD COLUMN c int");
    mesh.sql(2, "UPDATE items SET c = 9 WHERE id = 3");
    let child = mesh.restart();
    let end = wait_mesh_same(&mesh, "concurrent compatible changes");
    assert!(end.starts_with("a integer int4 YES 1 -, b text text YES 'x'::text -, c integer int4 YES - -"), "{end}");
    let rows = "SELECT string_agg(coalesce(a::text, '-') || b || coalesce(c::text, '-'), ',' ORDER BY id) FROM items WHERE id <= 3";
    assert_eq!(mesh.sql(1, rows), "5x-,1y-,1x9", "each node's write of its new column reached the others");
    assert!(mesh.logtext().contains("passed as applied"), "{}", common::mesh::tail(&mesh.logtext()));

    mesh.kill(child);
    mesh.sql(0, "ALTER TABLE items ADD COLUMN d int");
    mesh.sql(1, "ALTER TABLE items ADD COLUMN d text");
    let child = mesh.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(mesh.logtext().contains("ADD COLUMN d int")
        && mesh.logtext().contains("ADD COLUMN d text")
        && mesh.logtext().matches("APP009").count() >= 2)
    {
        assert!(Instant::now() < deadline, "no park named the statements:\n{}", common::mesh::tail(&mesh.logtext()));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The rest goes on: node 2's appliers into nodes 0 and 1 face no conflict.
    mesh.sql(2, "UPDATE items SET b = 'after' WHERE id = 5");
    mesh.wait_all_of(&[0, 1], "a write after the conflict", "SELECT b FROM items WHERE id = 5", "after");
    drop(child);
}
