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

/// Each table's rows as sorted text lines, from the query's single text column (none while
/// the table is not there yet).
fn lines(cluster: &LocalCluster, db: &str, query: &str) -> Vec<String> {
    let out = cluster.psql(db, query).unwrap_or_default();
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

/// Inserts, updates that move rows, deletes, until `stop`: the workload of a move.
fn writer_until(url: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<i64> {
    std::thread::spawn(move || {
        let mut c = SyncClient::connect(&url);
        let mut t = 0i64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            t += 1;
            c.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO orders VALUES ({cust}, {id}, 'new {t}');
                 UPDATE orders SET customer = customer + 13 WHERE id = {moved};
                 DELETE FROM orders WHERE id = {gone};
                 UPDATE tickets SET region = (region + 37) % 200 WHERE id = {ticket};
                 COMMIT;",
                cust = t % 101,
                id = 1_000_000 + t,
                moved = 1 + (t * 7) % 20_000,
                gone = 1 + (t * 13) % 20_000,
                ticket = 1 + (t * 3) % 2000,
            ))
            .unwrap();
            std::thread::sleep(Duration::from_millis(3));
        }
        t
    })
}

/// The hash bounds of the key ranges used below, as SQL on `hashtextextended(customer::text, 0)`.
const HASH_RULES: [(&str, &str); 6] = [
    ("s0", "h < 0"),
    ("s1", "h >= 0"),
    ("s2", "h < -4611686018427387904"),
    ("s3", "h >= -4611686018427387904 AND h < 0"),
    ("s4", "h >= 0 AND h < 4611686018427387904"),
    ("s5", "h >= 4611686018427387904"),
];
const RANGE_RULES: [(&str, &str); 6] = [
    ("s0", "region < 100"),
    ("s1", "region >= 100"),
    ("s2", "region < 50"),
    ("s3", "region >= 50 AND region < 100"),
    ("s4", "region >= 100 AND region < 150"),
    ("s5", "region >= 150"),
];

/// Rows of `db` outside its shard's rules (0 when every row is where its rule says).
fn misplaced(shards: &LocalCluster, db: &str) -> i64 {
    let rule = |rules: &[(&str, &str)]| rules.iter().find(|(s, _)| *s == db).map(|(_, r)| r.to_string()).unwrap();
    let q = format!(
        "SELECT (SELECT count(*) FROM (SELECT hashtextextended(customer::text, 0) AS h FROM orders) o WHERE NOT ({}))
              + (SELECT count(*) FROM tickets WHERE NOT ({}))",
        rule(&HASH_RULES),
        rule(&RANGE_RULES)
    );
    shards.psql(db, &q).unwrap().parse().unwrap()
}

/// Split 2 → 4 with a writer running and synapse killed -9 during the copy, the catch-up and
/// right after the switch: the new placement ends equal to the source, rows where the rules
/// say, no key twice; verify is clean; reverse hands back to a placement kept in sync; finish
/// empties the retired shards. A range-sharded table moves with the hash-sharded one.
#[test]
fn an_online_split_survives_kill_9_and_can_be_reversed_and_finished() {
    let source = LocalCluster::start(ClusterOptions::default()).unwrap();
    let shards = LocalCluster::start(ClusterOptions::default()).unwrap();
    source.create_database("app").unwrap();
    source
        .psql(
            "app",
            "CREATE TABLE orders (customer bigint, id bigint, note text, PRIMARY KEY (customer, id));
             INSERT INTO orders SELECT g % 97, g, repeat('o', 200) FROM generate_series(1, 60000) g;
             CREATE TABLE tickets (region int, id bigint, body text, PRIMARY KEY (region, id));
             INSERT INTO tickets SELECT g % 200, g, 'ticket ' || g FROM generate_series(1, 2000) g;
             CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
             INSERT INTO countries VALUES ('fr', 'France'), ('de', 'Germany');",
        )
        .unwrap();
    let all = ["s0", "s1", "s2", "s3", "s4", "s5"];
    for s in all {
        shards.create_database(s).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = dir.path().join("synapse.yaml");
    let url = |s: &str| shards.url(s);
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {log}\nsources:\n  - name: a\n    url: {src}\n    heartbeat_interval_secs: 0.5\n\
             targets:\n  - name: shop\n    shards:\n      - {{name: s0, url: \"{s0}\", key_range: \"-80\"}}\n      - {{name: s1, url: \"{s1}\", key_range: \"80-\"}}\n\
             \x20   sharding:\n      public.orders: {{hash: customer}}\n\
             \x20     public.tickets: {{range: region, ranges: [{{shard: s0, to: 100}}, {{shard: s1, from: 100}}]}}\n\
             \x20   resharding:\n      shards:\n\
             \x20       - {{name: s2, url: \"{s2}\", key_range: \"-40\"}}\n\
             \x20       - {{name: s3, url: \"{s3}\", key_range: \"40-80\"}}\n\
             \x20       - {{name: s4, url: \"{s4}\", key_range: \"80-c0\"}}\n\
             \x20       - {{name: s5, url: \"{s5}\", key_range: \"c0-\"}}\n\
             \x20     sharding:\n        public.orders: {{hash: customer}}\n\
             \x20       public.tickets: {{range: region, ranges: [{{shard: s2, to: 50}}, {{shard: s3, from: 50, to: 100}}, {{shard: s4, from: 100, to: 150}}, {{shard: s5, from: 150}}]}}\n\
             ops:\n  listen: \"\"\napi:\n  listen: \"{api}\"\n",
            log = dir.path().join("log").display(),
            src = source.url("app"),
            s0 = url("s0"),
            s1 = url("s1"),
            s2 = url("s2"),
            s3 = url("s3"),
            s4 = url("s4"),
            s5 = url("s5"),
        ),
    )
    .unwrap();
    let log = dir.path().join("synapse.log");
    let shards_cmd = |step: &str| {
        let out =
            common::synapse(&["shards", step, "--config", config.to_str().unwrap(), "--set", "shop"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, plan) = shards_cmd("plan");
    assert_eq!(code, Some(0), "{plan}");
    assert!(plan.contains("shop/s2") && plan.contains("shop/s0"), "{plan}");
    let mut synapse = spawn_run(&config, &log);
    wait_split(&source, &shards, &["s0", "s1"], &log);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = writer_until(source.url("app"), stop.clone());
    let wait_api = || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&api).is_err() {
            assert!(Instant::now() < deadline, "the API never came up:\n{}", log_tail(&log));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_api();

    // start, then kill -9 while the new shards copy: a lock on s2's table holds its copy in
    // place until the kill.
    shards
        .psql("s2", "CREATE TABLE orders (customer bigint, id bigint, note text, PRIMARY KEY (customer, id))")
        .unwrap();
    let mut locker = SyncClient::connect(&shards.url("s2"));
    locker.batch_execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").unwrap();
    let (code, out) = shards_cmd("start");
    assert_eq!(code, Some(0), "{out}");
    let copying = "SELECT count(*) > 0 FROM synapse.table_sync WHERE state = 'copying'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while shards.psql("s2", copying).unwrap_or_default() != "t" {
        assert!(Instant::now() < deadline, "no new shard ever copied:\n{}", log_tail(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    synapse.kill().unwrap();
    synapse.wait().unwrap();
    locker.batch_execute("ROLLBACK").unwrap();
    synapse = spawn_run(&config, &log);
    wait_api();
    // kill -9 again while they catch up.
    let copied =
        |s: &str| shards.psql(s, "SELECT count(*) FROM synapse.table_sync WHERE state = 'ready'").unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ["s2", "s3", "s4", "s5"].iter().any(|s| copied(s) != "3") {
        assert!(Instant::now() < deadline, "the new shards never finished copying:\n{}", log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    synapse.kill().unwrap();
    synapse.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("re-copying a table whose copy was interrupted"),
        "the kill landed in a copy:\n{}",
        log_tail(&log)
    );
    synapse = spawn_run(&config, &log);
    wait_api();
    // switch (it waits for the new shards to catch up), then kill -9 at once.
    let (code, out) = shards_cmd("switch");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("switched"), "{out}");
    synapse.kill().unwrap();
    synapse.wait().unwrap();
    synapse = spawn_run(&config, &log);
    wait_api();
    let (_, status) = shards_cmd("status");
    assert!(status.contains("switched"), "the switch was recorded before it answered: {status}");

    // The writer goes on past the switch, then stops.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let txns = writing.join().unwrap();
    assert!(txns > 10, "the writer ran through the move: {txns} transactions");
    // Both placements hold the source: the new one serving, the old one kept for reverse.
    wait_split(&source, &shards, &["s2", "s3", "s4", "s5"], &log);
    wait_split(&source, &shards, &["s0", "s1"], &log);
    for s in all {
        assert_eq!(misplaced(&shards, s), 0, "rows of {s} outside its rules");
    }
    let (code, out) = shards_cmd("verify");
    assert_eq!(code, Some(0), "{out}");
    let out = common::synapse(&["shards", "status", "--watch", "--config", config.to_str().unwrap(), "--set", "shop"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("every new shard has caught up"), "{text}");

    // reverse, then switch again and finish.
    let (code, out) = shards_cmd("reverse");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("reversed"), "{out}");
    src_write_and_wait(&source, &api, "reverse", &["shop/s0", "shop/s1"]);
    let (code, out) = shards_cmd("finish");
    assert_ne!(code, Some(0), "finish is refused after a reverse: {out}");
    let (code, out) = shards_cmd("switch");
    assert_eq!(code, Some(0), "{out}");
    src_write_and_wait(&source, &api, "switch", &["shop/s2", "shop/s3", "shop/s4", "shop/s5"]);
    let (code, out) = shards_cmd("finish");
    assert_eq!(code, Some(0), "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in ["s0", "s1"] {
        while shards.psql(s, "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM tickets)").unwrap() != "0" {
            assert!(Instant::now() < deadline, "{s} still holds moved rows after finish:\n{}", log_tail(&log));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    wait_split(&source, &shards, &["s2", "s3", "s4", "s5"], &log);
    drop(synapse);
}

/// Writes on the source, then waits (reads at a cut on the set) and checks the answer named
/// exactly the serving shards.
fn src_write_and_wait(source: &LocalCluster, api: &str, note: &str, serving: &[&str]) {
    source.psql("app", &format!("INSERT INTO countries VALUES ('x-{note}', '{note}')")).unwrap();
    let lsn = source.psql("app", "SELECT pg_current_wal_lsn()").unwrap();
    let (status, body) = common::request(
        api,
        "GET",
        &format!("/v1/positions/wait?source=a&target=shop&lsn={lsn}&timeout_secs=30"),
        "",
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {status} {body}"));
    assert_eq!(v["reached"], true, "{body}");
    let mut names: Vec<&str> = v["targets"].as_array().unwrap().iter().filter_map(|t| t["target"].as_str()).collect();
    names.sort();
    assert_eq!(names, serving, "{body}");
}
