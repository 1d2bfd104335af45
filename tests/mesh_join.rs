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
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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

/// The mesh workload on the nodes whose bit is set in `active`, in one-second rounds, until
/// stopped.
struct Writers {
    active: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writers {
    fn start(nodes: &[LocalCluster], active: u8) -> Writers {
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicU8::new(active));
        let urls: Vec<String> = nodes.iter().map(|n| n.url("app")).collect();
        let (r, st, a) = (record.clone(), stop.clone(), active.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let mut round = 0u64;
            while !st.load(Ordering::SeqCst) {
                round += 1;
                let until = Instant::now() + Duration::from_secs(1);
                let on = a.load(Ordering::SeqCst);
                rt.block_on(async {
                    let tasks: Vec<_> = (0..urls.len())
                        .filter(|i| on & (1 << i) != 0)
                        .map(|i| tokio::spawn(writer(urls[i].clone(), i, round, 1, until, r.clone())))
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
            }
        });
        Writers { active, stop, record, thread }
    }

    /// Stops after the current round; what the writers committed.
    fn stop(self) -> Record {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        std::mem::take(&mut *self.record.lock().unwrap())
    }
}

/// Waits until the `fingerprint` of every node in `nodes` is the same.
fn converge(nodes: &[&LocalCluster], secs: u64, log: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let f: Vec<String> = nodes.iter().map(|n| fingerprint(n, "app")).collect();
        if f.iter().all(|x| x == &f[0]) {
            return f[0].clone();
        }
        assert!(Instant::now() < deadline, "nodes differ: {f:?}\n{}", common::log_tail(log));
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Waits until `sql` answers the same, non-empty, on every node in `nodes` (and `want`, if
/// given).
fn until_same(
    nodes: &[&LocalCluster],
    what: &str,
    sql: &str,
    want: Option<&str>,
    secs: u64,
    log: &std::path::Path,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got: Vec<String> = nodes.iter().map(|n| n.psql("app", sql).unwrap_or_default()).collect();
        if got.iter().all(|g| g == &got[0]) && !got[0].is_empty() && want.is_none_or(|w| got[0] == w) {
            return got[0].clone();
        }
        assert!(Instant::now() < deadline, "{what} differ: {got:?}\n{}", common::log_tail(log));
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Waits until `nodes` hold the same rows, then the same version of every row, then no
/// tombstone (purged), and checks every counter is its baseline (100) plus every increment
/// `record` committed on any node. Returns the data's fingerprint.
fn converged(nodes: &[&LocalCluster], record: &Record, log: &std::path::Path) -> String {
    let fingerprint = converge(nodes, 180, log);
    let versions =
        format!("SELECT md5(string_agg({VERSION_ROW}, ';' ORDER BY tbl, pk::text)) FROM synapse.row_version");
    until_same(nodes, "row versions", &versions, None, 60, log);
    until_same(nodes, "tombstones", "SELECT count(*) FROM synapse.row_version WHERE NOT live", Some("0"), 90, log);
    for k in 1..=COUNTED {
        let want = 100 + record.increments.get(&k).copied().unwrap_or(0);
        for n in nodes {
            let got = n.psql("app", &format!("SELECT hits FROM accounts WHERE id = {k}")).unwrap();
            assert_eq!(got, want.to_string(), "counter of key {k}: the baseline plus every committed increment");
        }
    }
    fingerprint
}

/// Where the test's synapse listens and keeps its configuration and output.
struct Paths {
    ops: String,
    api: String,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Paths {
    fn in_dir(dir: &std::path::Path) -> Paths {
        let port = || format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
        Paths { ops: port(), api: port(), config: dir.join("mesh.yaml"), log: dir.join("synapse.log") }
    }
}

/// Four clusters, `app` on each; the first three hold the schema and the same baseline rows.
fn four_nodes() -> Vec<LocalCluster> {
    let nodes: Vec<LocalCluster> = (0..4).map(|_| LocalCluster::start(ClusterOptions::default()).unwrap()).collect();
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
    nodes
}

/// Waits until synapse installed the mesh on each of `nodes`.
fn wait_installed(nodes: &[LocalCluster], log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in nodes {
        while n.psql("app", "SELECT count(*) FROM pg_trigger WHERE tgname = 'synapse_local_write'").unwrap_or_default()
            != "2"
        {
            assert!(Instant::now() < deadline, "the mesh did not start:\n{}", common::log_tail(log));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_fourth_region_joins_while_every_region_writes() {
    // Node 3 is an empty database: the join makes its tables from the donor's definitions.
    let (nodes, dir) = (four_nodes(), tempfile::tempdir().unwrap());
    let Paths { ops, api, config, log } = Paths::in_dir(dir.path());
    std::fs::write(&config, config_yaml(&nodes, 3, dir.path(), &ops, &api)).unwrap();
    let child = spawn_run(&config, &log);
    wait_installed(&nodes[..3], &log);

    // Writers on every member for the whole test; node 3 joins their ranks once it is ready.
    let writers = Writers::start(&nodes, 0b0111);
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
    writers.active.store(0b1111, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(5));
    let record = writers.stop();

    // All four converge; purging ran throughout (every second), the new node among those it
    // waits for.
    let all: Vec<&LocalCluster> = nodes.iter().collect();
    println!("four nodes converged: {}", converged(&all, &record, &log));
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

/// `synapse mesh <args…> --config <config>` with the admin token: its output, on success.
fn mesh_cli(config: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["mesh"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config.to_str().unwrap()]);
    let out = common::synapse(&all).env("SYNAPSE_TOKEN", ADMIN_TOKEN).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "synapse mesh {args:?}: {text}");
    text
}

/// Hub-and-spoke: a new spoke waits to be joined (`on_new_node: wait`), joins from the hub with
/// `synapse mesh join`; then another spoke leaves under load with `synapse mesh leave`: its
/// writes reach everyone first, its slot and origins go, the remaining three converge with
/// tombstones purged without it, and a restart with it still configured runs nothing of it.
#[test]
fn a_spoke_joins_from_the_hub_and_another_leaves() {
    let (nodes, dir) = (four_nodes(), tempfile::tempdir().unwrap());
    let Paths { ops, api, config, log } = Paths::in_dir(dir.path());
    let yaml = |count| {
        config_yaml(&nodes, count, dir.path(), &ops, &api)
            .replace("  tables: [", "  hub: u0\n  on_new_node: wait\n  tables: [")
    };
    std::fs::write(&config, yaml(3)).unwrap();
    let mut child = spawn_run(&config, &log);
    wait_installed(&nodes[..3], &log);
    let writers = Writers::start(&nodes, 0b0111);
    std::thread::sleep(Duration::from_secs(2));
    common::terminate(&mut child);
    std::fs::write(&config, yaml(4)).unwrap();
    let child = spawn_run(&config, &log);
    // Not joined until asked: parked with the reason and the command, the rest replicating.
    let waiting = wait_node(&api, "u3", 60, &log, |n| n["phase"] == "waiting");
    assert_eq!(waiting["donor"], "u0", "a spoke joins from the hub");
    let ready = reqwest::blocking::get(format!("http://{ops}/readyz")).unwrap().text().unwrap();
    assert!(ready.contains("APP012") && ready.contains("synapse mesh join"), "{ready}");
    let out = mesh_cli(&config, &["join", "u3"]);
    assert!(out.contains("caught up") || out.contains("member"), "{out}");
    writers.active.store(0b1111, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3));

    // u2's application moves away; u2 leaves while the others keep writing.
    writers.active.store(0b1011, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    let out = mesh_cli(&config, &["leave", "u2"]);
    assert!(out.contains("u2 left the mesh"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let record = writers.stop();
    // The rest converge (u2's increments included); purging goes on without the node that left.
    let rest: Vec<&LocalCluster> = [0, 1, 3].iter().map(|&i| &nodes[i]).collect();
    println!("three nodes converged after u2 left: {}", converged(&rest, &record, &log));
    // Nothing of u2 is left: no slot or origin on it, no origin or position for it elsewhere.
    assert_eq!(nodes[2].psql("app", "SELECT count(*) FROM pg_replication_slots").unwrap(), "0");
    assert_eq!(nodes[2].psql("app", "SELECT count(*) FROM pg_replication_origin").unwrap(), "0");
    assert_eq!(nodes[2].psql("app", "SELECT state FROM synapse.mesh_membership").unwrap(), "left");
    for n in &rest {
        let of_u2 = "SELECT (SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'synapse\\_u2@%')
                          + (SELECT count(*) FROM synapse.applied WHERE source_node = 'u2')";
        assert_eq!(n.psql("app", of_u2).unwrap(), "0");
    }
    // Restarted with u2 still configured: nothing of it runs, everything else is ready.
    drop(child);
    let _child = spawn_run(&config, &log);
    common::wait_ready(&ops, &log, 60);
    assert_eq!(node_status(&api, "u2")["phase"], "left");
    assert_eq!(nodes[2].psql("app", "SELECT count(*) FROM pg_replication_slots").unwrap(), "0");
}
