//! Shard sets: one source split across shard databases by hash and by range, a writer running
//! (inserts, updates that move rows between shards, deletes), against real clusters and the
//! real binary.
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

mod common;

use common::{log_tail, spawn_run, SyncClient};
use std::path::Path;
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

const SCHEMA: &str = "
    CREATE TABLE orders (customer bigint, id bigint, note text, PRIMARY KEY (customer, id));
    INSERT INTO orders SELECT g % 97, g, 'order ' || g FROM generate_series(1, 5000) g;
    CREATE TABLE tickets (region int, id bigint, body text, PRIMARY KEY (region, id));
    INSERT INTO tickets SELECT g % 200, g, 'ticket ' || g FROM generate_series(1, 2000) g;
    CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
    INSERT INTO countries VALUES ('fr', 'France'), ('de', 'Germany');";

/// Each table's rows as sorted text lines, from the query's single text column.
fn lines(cluster: &LocalCluster, db: &str, query: &str) -> Vec<String> {
    let out = cluster.psql(db, query).unwrap();
    let mut v: Vec<String> = out.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect();
    v.sort();
    v
}

const ROWS: [(&str, &str); 3] = [
    ("orders", "SELECT customer || ',' || id || ',' || coalesce(note, '') FROM orders"),
    ("tickets", "SELECT region || ',' || id || ',' || coalesce(body, '') FROM tickets"),
    ("countries", "SELECT code || ',' || name FROM countries"),
];

/// Waits until, for every table, the shards' rows together are the source's (a key on two
/// shards would show twice); reference tables must be whole on each shard.
fn wait_split(source: &LocalCluster, shards: &LocalCluster, names: &[&str], log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut differing = Vec::new();
        for (table, q) in ROWS {
            let want = lines(source, "app", q);
            if table == "countries" {
                for s in names {
                    if lines(shards, s, q) != want {
                        differing.push(format!("{table} on {s}"));
                    }
                }
                continue;
            }
            let mut union: Vec<String> = names.iter().flat_map(|s| lines(shards, s, q)).collect();
            union.sort();
            if union != want {
                differing.push(format!("{table}: source {} rows, shards {} rows", want.len(), union.len()));
            }
        }
        if differing.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "shards never matched the source: {differing:?}\n{}", log_tail(log));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Inserts, in-place updates, updates that move a row to another customer or region (and so,
/// often, another shard), deletes; `txns` transactions.
fn writer(url: String, txns: i64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = SyncClient::connect(&url);
        for t in 1..=txns {
            let id = 100_000 + t;
            c.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO orders VALUES ({cust}, {id}, 'new {t}');
                 UPDATE orders SET customer = customer + 13 WHERE id = {moved};
                 UPDATE orders SET note = 'touched {t}' WHERE id = {touched};
                 DELETE FROM orders WHERE id = {gone};
                 UPDATE tickets SET region = (region + 100) % 200 WHERE id = {ticket};
                 INSERT INTO tickets VALUES ({region}, {id}, 'new {t}');
                 DELETE FROM tickets WHERE id = {ticket_gone};
                 INSERT INTO countries VALUES ('c{t}', 'country {t}');
                 COMMIT;",
                cust = t % 101,
                moved = 1 + (t * 7) % 5000,
                touched = 1 + (t * 11) % 5000,
                gone = 1 + (t * 13) % 5000,
                ticket = 1 + (t * 3) % 2000,
                region = (t * 37) % 200,
                ticket_gone = 1 + (t * 17) % 2000,
            ))
            .unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

#[test]
fn a_writer_s_rows_land_each_on_the_shard_its_rule_names() {
    let source = LocalCluster::start(ClusterOptions::default()).unwrap();
    let shards = LocalCluster::start(ClusterOptions::default()).unwrap();
    source.create_database("app").unwrap();
    source.psql("app", SCHEMA).unwrap();
    let names = ["s0", "s1"];
    for s in names {
        shards.create_database(s).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = dir.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {log}\nsources:\n  - name: a\n    url: {src}\n    heartbeat_interval_secs: 0.5\n\
             targets:\n  - name: shop\n    shards:\n      - {{name: s0, url: \"{s0}\"}}\n      - {{name: s1, url: \"{s1}\"}}\n\
             \x20   sharding:\n      public.orders: {{hash: customer}}\n\
             \x20     public.tickets: {{range: region, ranges: [{{shard: s0, to: 100}}, {{shard: s1, from: 100}}]}}\n\
             ops:\n  listen: \"\"\napi:\n  listen: \"{api}\"\n",
            log = dir.path().join("log").display(),
            src = source.url("app"),
            s0 = shards.url("s0"),
            s1 = shards.url("s1"),
        ),
    )
    .unwrap();
    let log = dir.path().join("synapse.log");
    let _synapse = spawn_run(&config, &log);
    // The writer starts while the shards are being copied: the copy and the stream meet.
    writer(source.url("app"), 400).join().unwrap();
    wait_split(&source, &shards, &names, &log);
    // Every row is on the shard its rule names, by the server's own hash: the expression an
    // operator would check with.
    let misplaced = |db: &str, cond: &str| shards.psql(db, &format!("SELECT count(*) FROM {cond}")).unwrap();
    assert_eq!(misplaced("s0", "orders WHERE hashtextextended(customer::text, 0) >= 0"), "0");
    assert_eq!(misplaced("s1", "orders WHERE hashtextextended(customer::text, 0) < 0"), "0");
    assert_eq!(misplaced("s0", "tickets WHERE region >= 100"), "0");
    assert_eq!(misplaced("s1", "tickets WHERE region < 100"), "0");
    // Both shards hold rows of the hash-sharded table: the split is real.
    for s in names {
        let n: i64 = shards.psql(s, "SELECT count(*) FROM orders").unwrap().parse().unwrap();
        assert!(n > 1000, "{s} holds {n} orders");
    }
    // Each shard keeps its own position (exactly once per shard).
    for s in names {
        let applied = shards.psql(s, "SELECT count(*) FROM synapse.applied WHERE source_node = 'a'").unwrap();
        assert_eq!(applied, "1", "{s}");
    }

    // Reads at a cut: after a write, its source position; once every shard has applied up to
    // it, the write is on its shard (read-your-writes across shards).
    let mut src = SyncClient::connect(&source.url("app"));
    for i in 0..20i64 {
        let (customer, id) = (7 + i * 31, 500_000 + i);
        src.batch_execute(&format!("INSERT INTO orders VALUES ({customer}, {id}, 'ryw')")).unwrap();
        let lsn = source.psql("app", "SELECT pg_current_wal_lsn()").unwrap();
        let (status, body) =
            common::request(&api, "GET", &format!("/v1/positions/wait?source=a&target=shop&lsn={lsn}"), "", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {status} {body}"));
        assert_eq!((status, v["reached"].as_bool()), (200, Some(true)), "{body}");
        assert_eq!(v["targets"].as_array().map(Vec::len), Some(2), "{body}");
        let owner = if shards.psql("s0", &format!("SELECT hashtextextended('{customer}', 0) < 0")).unwrap() == "t" {
            "s0"
        } else {
            "s1"
        };
        let there = shards.psql(owner, &format!("SELECT count(*) FROM orders WHERE id = {id}")).unwrap();
        assert_eq!(there, "1", "order {id} not on {owner} once the wait said so: {body}");
    }
    // A position the source has not reached: not reached when the timeout passes.
    let (status, body) =
        common::request(&api, "GET", "/v1/positions/wait?source=a&lsn=FFFFFFFF/0&timeout_secs=0.3", "", None);
    assert!(status == 200 && body.contains("\"reached\":false"), "{status} {body}");
    let (status, body) = common::request(&api, "GET", "/v1/positions/wait?source=a&lsn=nonsense", "", None);
    assert!(status == 400 && body.contains("lsn"), "{status} {body}");
    let (status, body) = common::request(&api, "GET", "/v1/positions/wait?source=a&target=nope&lsn=0/1", "", None);
    assert_eq!(status, 404, "{body}");
    let (status, body) = common::request(&api, "GET", "/v1/positions", "", None);
    assert!(status == 200 && body.contains("\"key_range\":\"80-\""), "{status} {body}");

    // Drift on one shard — a row of the other shard's, a lost row, a changed one — is found
    // by comparing it with its rows of the source, and repaired.
    shards
        .psql(
            "s0",
            "INSERT INTO orders SELECT c, 999999, 'stray' FROM generate_series(1, 1000) c
                 WHERE hashtextextended(c::text, 0) >= 0 LIMIT 1;
             DELETE FROM orders WHERE id = (SELECT min(id) FROM orders);
             UPDATE orders SET note = 'drift' WHERE id = (SELECT max(id) FROM orders WHERE id < 999999);",
        )
        .unwrap();
    let repair = |cmd: &str| {
        let out = common::synapse(&[
            "repair",
            cmd,
            "--config",
            config.to_str().unwrap(),
            "--nodes",
            "a,shop/s0",
            "--table",
            "public.orders",
            "--json",
        ])
        .output()
        .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = repair("check");
    assert_eq!(code, Some(1), "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report[0]["differing"].as_array().map(Vec::len), Some(3), "{out}");
    let (code, out) = repair("fix");
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = repair("check");
    assert_eq!(code, Some(0), "{out}");
    wait_split(&source, &shards, &names, &log);
    assert_eq!(misplaced("s0", "orders WHERE hashtextextended(customer::text, 0) >= 0"), "0");
    // Two shards in one comparison hold different rows: refused, naming the fix.
    let out = common::synapse(&[
        "repair",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--nodes",
        "a,shop/s0,shop/s1",
        "--table",
        "public.orders",
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("compare one shard at a time"), "{text}");
}
