//! A region joining a running mesh: three real PostgreSQL nodes written concurrently (counters,
//! sets, max, multi-value, lww columns, deletes, unique-key churn) the whole time; a fourth node,
//! an empty database, is added to the configuration and joins from a donor's snapshot.
//! SynapseDB is killed -9 in the middle of the join's copy (its transaction holds the copied
//! tables and versions, blocked on a table the test holds) and again the moment the node becomes a
//! member (while it catches up). Then the new node takes writes too. Checked afterwards: all
//! four nodes identical row for row and in every row's causality metadata, every counter equal
//! to its baseline plus every committed increment on any node (the new one's included), the
//! tables the new node lacked made with their constraints, and tombstones purged on all four.
#![allow(clippy::unwrap_used)]

mod common;

use common::mesh::{fingerprint, tail, writer, Record, COUNTED, SCHEMA, VERSION_ROW};
use common::{spawn_run, SyncClient, ADMIN_TOKEN};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

fn config_yaml(nodes: &[LocalCluster], count: usize, dir: &std::path::Path, ops: &str, api: &str) -> String {
    let nodes_yaml: String = (0..count)
        .map(|i| {
            format!("    - name: u{i}\n      id: {}\n      url: {}\n      region: r{i}\n", i + 1, nodes[i].url("app"))
        })
        .collect();
    format!(
        "log:\n  dir: {}\nmesh:\n  nodes:\n{nodes_yaml}  tables: [public.accounts, public.members]\n  tombstone_purge_interval_secs: 1\n  columns:\n    public.accounts:\n      hits: counter\n      best: max\n      tags: set\n      title: multi_value\nops:\n  listen: \"{ops}\"\napi:\n  listen: \"{api}\"\n  tokens:\n    - {{name: admin, token: {ADMIN_TOKEN}, admin: true}}\n",
        dir.join("log").display()
    )
}

/// `GET /v1/mesh`; `Null` while synapse is not answering (restarting).
fn mesh_status(api: &str) -> Value {
    reqwest::blocking::Client::new()
        .get(format!("http://{api}/v1/mesh"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(5))
        .send()
        .ok()
        .filter(|r| r.status() == 200)
        .and_then(|r| r.json().ok())
        .unwrap_or(Value::Null)
}

fn node_status(api: &str, name: &str) -> Value {
    mesh_status(api)["nodes"].as_array().into_iter().flatten().find(|n| n["name"] == name).cloned().unwrap_or_default()
}

/// Polls `api`'s view of node `name` until `done` holds (or fails after `secs`).
fn wait_node(api: &str, name: &str, secs: u64, log: &std::path::Path, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let n = node_status(api, name);
        if done(&n) {
            return n;
        }
        assert!(Instant::now() < deadline, "node {name} stays at {n}\n{}", common::log_tail(log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fourth_region_joins_while_every_region_writes() {
    let nodes: Vec<LocalCluster> = (0..4).map(|_| LocalCluster::start(ClusterOptions::default()).unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    for (i, n) in nodes.iter().enumerate() {
        n.create_database("app").unwrap();
        if i < 3 {
            // The founders start from the same data: a baseline, older than the mesh.
            n.psql("app", SCHEMA).unwrap();
            n.psql(
                "app",
                &format!(
                    "INSERT INTO accounts (id, owner, hits) SELECT g, 'seed', 100 FROM generate_series(1, {COUNTED}) g"
                ),
            )
            .unwrap();
        }
    }
    // Node 3 is an empty database: the join makes its tables from the donor's definitions.
    let ops = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = dir.path().join("mesh.yaml");
    let log = dir.path().join("synapse.log");
    std::fs::write(&config, config_yaml(&nodes, 3, dir.path(), &ops, &api)).unwrap();
    let child = spawn_run(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &nodes[..3] {
        while n.psql("app", "SELECT count(*) FROM pg_trigger WHERE tgname = 'synapse_local_write'").unwrap_or_default()
            != "2"
        {
            assert!(Instant::now() < deadline, "the mesh did not start:\n{}", common::log_tail(&log));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Writers on every member for the whole test; node 3 joins their ranks once it is ready.
    let record = Arc::new(Mutex::new(Record::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicUsize::new(3));
    let urls: Vec<String> = nodes.iter().map(|n| n.url("app")).collect();
    let writers = {
        let (record, stop, active) = (record.clone(), stop.clone(), active.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                let until = Instant::now() + Duration::from_secs(1);
                let k = active.load(Ordering::SeqCst);
                rt.block_on(async {
                    let tasks: Vec<_> = (0..k)
                        .map(|i| tokio::spawn(writer(urls[i].clone(), i, round, 1, until, record.clone())))
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));

    // The fourth node: its node schema made now so the test can hold its purge rounds table —
    // the join's copy then stops there, after copying the tables and their versions, inside
    // its one transaction.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&nodes[3].url("app"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        synapse_postgres::node_schema::migrate(&c).await.unwrap();
    });
    let mut holder = SyncClient::connect(&nodes[3].url("app"));
    holder.batch_execute("BEGIN; LOCK TABLE synapse.purge_rounds IN ACCESS EXCLUSIVE MODE").unwrap();
    // Adding the node: a new configuration, synapse restarted with it (stopped cleanly).
    let mut child = child;
    common::terminate(&mut child);
    std::fs::write(&config, config_yaml(&nodes, 4, dir.path(), &ops, &api)).unwrap();
    let child = spawn_run(&config, &log);
    let copying = wait_node(&api, "u3", 60, &log, |n| n["phase"] == "joining" && n["join"]["tables_done"] == 3);
    println!("killing synapse -9 in the join's copy: {}", copying["join"]);
    drop(child); // SIGKILL
    holder.batch_execute("COMMIT").unwrap();
    let empty =
        nodes[3].psql("app", "SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM members)").unwrap();
    assert_eq!(empty, "0", "the interrupted copy left rows behind");

    // Resumed: copied again from a new snapshot; killed again the moment it is a member.
    let child = spawn_run(&config, &log);
    let member = wait_node(&api, "u3", 120, &log, |n| n["phase"] == "member");
    println!("killing synapse -9 as the node catches up: {} records behind", member["records_behind"]);
    drop(child); // SIGKILL
    let child = spawn_run(&config, &log);
    let caught_up = wait_node(&api, "u3", 120, &log, |n| n["caught_up"] == true);
    let capture_ready = Instant::now() + Duration::from_secs(60);
    while nodes[3].psql("app", "SELECT count(*) FROM pg_replication_slots WHERE active").unwrap_or_default() != "1" {
        assert!(Instant::now() < capture_ready, "node 3's capture never started:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("node u3 caught up: {}", caught_up["catch_up"]);
    active.store(4, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::SeqCst);
    writers.join().unwrap();

    // All four converge: data, then every row's version, then no tombstone left.
    let all = |sql: &str| -> Vec<String> { nodes.iter().map(|n| n.psql("app", sql).unwrap_or_default()).collect() };
    let until_same = |what: &str, sql: &str, secs: u64| -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = all(sql);
            if got.iter().all(|g| g == &got[0]) && !got[0].is_empty() {
                return got[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "{what} differ: {got:?}\n{}",
                tail(&std::fs::read_to_string(&log).unwrap_or_default())
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let f: Vec<String> = nodes.iter().map(|n| fingerprint(n, "app")).collect();
        if f.iter().all(|x| x == &f[0]) {
            println!("four nodes converged: {}", f[0]);
            break;
        }
        assert!(Instant::now() < deadline, "nodes differ: {f:?}\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(300));
    }
    until_same(
        "row versions",
        &format!("SELECT md5(string_agg({VERSION_ROW}, ';' ORDER BY tbl, pk::text)) FROM synapse.row_version"),
        60,
    );
    // Purging ran throughout (every second), with the new node among those it waits for.
    let purged = until_same("tombstones", "SELECT count(*) FROM synapse.row_version WHERE NOT live", 90);
    assert_eq!(purged, "0", "tombstones left after quiescence");
    let record = record.lock().unwrap();
    for k in 1..=COUNTED {
        let want = 100 + record.increments.get(&k).copied().unwrap_or(0);
        let got = nodes[3].psql("app", &format!("SELECT hits FROM accounts WHERE id = {k}")).unwrap();
        assert_eq!(got, want.to_string(), "counter of key {k} on the joined node: the baseline plus every increment");
    }
    // The joined node's tables carry the donor's constraints (the unique e-mail resolves there too).
    let unique = nodes[3]
        .psql("app", "SELECT count(*) FROM pg_constraint WHERE conrelid = 'members'::regclass AND contype = 'u'")
        .unwrap();
    assert_eq!(unique, "1");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("resumed=true"), "the join did not resume:\n{}", tail(&text));
    assert!(!text.contains("panicked"), "{}", tail(&text));
    let writes_on_new = record.committed;
    println!("{writes_on_new} writes committed over the test ({} rolled back by deadlock)", record.failed);
    drop(child);
}
