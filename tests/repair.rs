//! `synapse repair check` and `synapse repair fix` on a running three-node mesh, diverged by
//! writes replication never carried (written under an applier-like origin its capture skips,
//! as a lost log segment or a bug would leave them), while a workload keeps writing other keys
//! through the mesh on every node:
//! * check reports exactly the diverged keys, never a key only in flight (the cut);
//! * a dry run (through the admin API) changes nothing; fix resolves by causality (newer wins, concurrent merges with a
//!   conflict logged by source `repair`, a lost delete deletes); a row written outside the mesh
//!   (same version, different data) stays unresolved until `--prefer` names the winner;
//! * afterwards the nodes hold identical rows and identical causality metadata;
//! * a node lost in the middle of a fix: clear error, nothing changed on any node.
#![allow(clippy::unwrap_used)]

mod common;

use common::mesh::{tail, KilledMesh};
use common::{request, synapse, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SCHEMA: &str =
    "CREATE TABLE items (id int PRIMARY KEY, a int, b text, big text, n numeric, t timestamptz, j jsonb);
    INSERT INTO items SELECT g, g, 'b' || g, NULL, g * 0.25, '2026-01-01'::timestamptz + g * interval '1 hour',
        jsonb_build_object('g', g) FROM generate_series(1, 2000) g;";

/// Runs `sql` on node `i` as a write its capture skips (origin `synapse_lost`): the node's
/// trigger records a new version, but no peer ever receives it.
fn lost(mesh: &KilledMesh, i: usize, sql: &str) {
    mesh.sql(
        i,
        &format!(
            "SELECT pg_replication_origin_create('synapse_lost') WHERE NOT EXISTS
                 (SELECT 1 FROM pg_replication_origin WHERE roname = 'synapse_lost');
             SELECT pg_replication_origin_session_setup('synapse_lost');
             {sql};
             -- Committed with the origin, then released before psql returns: the session's
             -- exit is asynchronous, and the next write here would find the origin still active.
             COMMIT;
             SELECT pg_replication_origin_session_reset();"
        ),
    );
}

fn repair(mesh: &KilledMesh, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["repair"];
    all.extend_from_slice(&args[..1]);
    all.extend_from_slice(&["--config", mesh.config.to_str().unwrap()]);
    all.extend_from_slice(&args[1..]);
    let out = synapse(&all).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn keys(v: &Value) -> BTreeSet<i64> {
    v.as_array().unwrap().iter().map(|k| k["key"][0].as_str().unwrap().parse().unwrap()).collect()
}

const DRIFT: [i64; 7] = [5, 6, 7, 8, 9, 10, 5001];

/// Writes through the mesh on every node, to keys 1000–1999, until stopped.
struct Workload {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workload {
    fn start(mesh: &KilledMesh) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let threads = (0..3)
            .map(|i| {
                let (stop, writes) = (stop.clone(), writes.clone());
                let url = mesh.nodes[i].url("app");
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async move {
                        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
                        tokio::spawn(conn);
                        let mut n = i as i64;
                        while !stop.load(Ordering::Relaxed) {
                            n += 7;
                            let id = 1000 + (n * 37 + i as i64 * 11) % 1000;
                            let r = client
                                .execute(
                                    "UPDATE items SET a = a + 1, b = $2 WHERE id = $1",
                                    &[&(id as i32), &format!("w{i}.{n}")],
                                )
                                .await;
                            if r.is_ok() {
                                writes.fetch_add(1, Ordering::Relaxed);
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    });
                })
            })
            .collect();
        Workload { stop, writes, threads }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.writes.load(Ordering::Relaxed)
    }
}

const ITEMS: &str = "SELECT count(*) || ':' || md5(string_agg(i::text, ';' ORDER BY id)) FROM items i";
const VERSIONS: &str = "SELECT count(*) || ':' || md5(string_agg(tbl || pk::text || vv::text || hlc_ms || '.' || hlc_lc
    || node || live || cols::text, ';' ORDER BY tbl, pk)) FROM synapse.row_version";

#[test]
fn fix_makes_a_diverged_mesh_identical_through_the_resolver_while_it_keeps_writing() {
    let mesh = KilledMesh::new(SCHEMA, "  tables: [public.items]\n");
    let child = mesh.start(1);
    mesh.sql(0, "UPDATE items SET a = a WHERE id <= 20"); // versions for a few old rows
    mesh.wait_same("versions before the drift", VERSIONS);

    // Drift replication never carries.
    lost(&mesh, 1, "UPDATE items SET a = 555 WHERE id = 5"); // newer on u1
    lost(&mesh, 1, "UPDATE items SET a = 666 WHERE id = 6"); // concurrent on u1 and u2,
    lost(&mesh, 2, "UPDATE items SET b = 'six' WHERE id = 6"); // different columns
    lost(&mesh, 0, "DELETE FROM items WHERE id = 7"); // a delete u1, u2 never saw
    lost(&mesh, 1, "UPDATE items SET big = repeat('toast ', 5000) WHERE id = 9"); // TOASTed
    lost(&mesh, 0, "UPDATE items SET b = NULL, n = NULL WHERE id = 10"); // NULLs
    lost(&mesh, 2, "INSERT INTO items VALUES (5001, 1, 'new', NULL, 1.5, now(), '[1, 2]')"); // insert
                                                                                             // Outside the mesh altogether: no trigger, so the same version with other data.
    lost(&mesh, 2, "SET session_replication_role = replica; UPDATE items SET b = 'rogue' WHERE id = 8");

    // Changes in flight: written through the mesh while synapse is down, not yet delivered.
    mesh.kill(child);
    mesh.sql(0, "UPDATE items SET b = 'in flight' WHERE id BETWEEN 1000 AND 1049");
    let in_flight: BTreeSet<i64> = (1000..1050).collect();
    let (code, text) = repair(&mesh, &["check", "--json", "--no-wait"]);
    assert_eq!(code, Some(1), "{text}");
    let report = json_of(&text);
    assert_eq!(
        keys(&report[0]["differing"]),
        BTreeSet::from(DRIFT).union(&in_flight).copied().collect(),
        "without waiting for the appliers, changes in flight look like drift: {text}"
    );

    // With the cut (the default), while synapse catches up and a workload writes everywhere.
    let child = mesh.restart();
    let workload = Workload::start(&mesh);
    let (code, text) = repair(&mesh, &["check", "--json"]);
    assert_eq!(code, Some(1), "{text}\n{}", tail(&mesh.logtext()));
    let report = json_of(&text);
    assert_eq!(keys(&report[0]["differing"]), BTreeSet::from(DRIFT), "only the drift, nothing in flight: {text}");
    assert_eq!(report[0]["cut"], json!(["u0→u1", "u0→u2", "u1→u0", "u1→u2", "u2→u0", "u2→u1"]), "{text}");
    let changing: BTreeSet<i64> =
        report[0]["changing"].as_array().unwrap().iter().map(|k| k[0].as_str().unwrap().parse().unwrap()).collect();
    assert!(changing.iter().all(|k| (1000..2000).contains(k)), "{text}");
    println!(
        "check while catching up and writing: {} keys in flight left out ({} of the 50 written while down), cut in {} ms",
        changing.len(),
        changing.intersection(&in_flight).count(),
        report[0]["cut_ms"]
    );
    let six = report[0]["differing"].as_array().unwrap().iter().find(|d| d["key"] == json!(["6"])).unwrap();
    assert_eq!(six["holders"], json!([["u0"], ["u1"], ["u2"]]), "three different rows of 6: {text}");

    // A dry run reports what would change and changes nothing.
    let before: Vec<String> = (0..3)
        .map(|i| mesh.sql(i, "SELECT string_agg(i::text, ';' ORDER BY id) FROM items i WHERE id < 20 OR id > 5000"))
        .collect();
    // Through the admin API of the running synapse (the CLI's `fix --dry-run --json` prints the same).
    let (status, text) = request(&mesh.api, "POST", "/v1/repair/fix", r#"{"prefer": "moon"}"#, Some(ADMIN_TOKEN));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("`moon` is not one of the nodes compared"), "{text}");
    let (status, text) = request(
        &mesh.api,
        "POST",
        "/v1/repair/fix",
        r#"{"dry_run": true, "tables": ["public.items"]}"#,
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200, "{text}");
    let dry = json_of(&text);
    let fix = &dry[0]["fix"];
    assert_eq!(fix["dry_run"], json!(true));
    let u0 = fix["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "u0").unwrap();
    assert_eq!(u0["inserted"], json!([["5001"]]), "{text}");
    assert_eq!(u0["updated"], json!([["5"], ["6"], ["9"]]), "{text}");
    let u1 = fix["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "u1").unwrap();
    assert_eq!(u1["deleted"], json!([["7"]]), "{text}");
    assert_eq!(fix["unresolved"].as_array().unwrap().len(), 1, "{text}");
    assert_eq!(fix["unresolved"][0]["key"], json!(["8"]), "{text}");
    let after: Vec<String> = (0..3)
        .map(|i| mesh.sql(i, "SELECT string_agg(i::text, ';' ORDER BY id) FROM items i WHERE id < 20 OR id > 5000"))
        .collect();
    assert_eq!(before, after, "a dry run changed rows");
    assert_eq!(mesh.conflicts("id::text", "source_node = 'repair'"), " |  | ", "a dry run logged conflicts");

    // The fix: causality decides; 8 stays (and says why).
    let (code, text) = repair(&mesh, &["fix"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("unresolved 8: the same version with different data on u0, u1, u2"), "{text}");
    assert!(text.contains("choose a node with --prefer"), "{text}");
    // Then with a preferred node for what causality cannot decide.
    let (code, text) = repair(&mesh, &["fix", "--prefer", "u0"]);
    assert_eq!(code, Some(0), "{text}\n{}", tail(&mesh.logtext()));
    assert!(text.contains("1 key(s) differ") && text.contains("  8: different rows"), "only 8 was left: {text}");

    let writes = workload.stop();
    let rows = mesh.wait_same("rows after the fix", ITEMS);
    mesh.wait_same("causality metadata after the fix", VERSIONS);
    let (code, text) = repair(&mesh, &["check"]);
    assert_eq!(code, Some(0), "{text}");
    println!("{writes} workload writes during check and fix; {rows}");

    let row = |id: i64| {
        mesh.sql(
            1,
            &format!("SELECT coalesce((SELECT (a, b, length(big), n)::text FROM items WHERE id = {id}), 'gone')"),
        )
    };
    assert_eq!(row(5), "(555,b5,,1.25)");
    assert_eq!(row(6), "(666,six,,1.50)", "concurrent writes of different columns both kept");
    assert_eq!(row(7), "gone");
    assert_eq!(row(8), "(8,b8,,2.00)", "u0's row preferred");
    assert_eq!(row(9), "(9,b9,30000,2.25)");
    assert_eq!(row(10), "(10,,,)");
    assert_eq!(row(5001), "(1,new,,1.5)");
    // The concurrent pair is in a conflict log, resolved by source "repair"; nothing else is.
    let logged = mesh.conflicts("pk::text || kind", "source_node = 'repair'");
    assert!(logged.contains("[\"6\"]update_update"), "{logged}");
    assert!(!mesh.logtext().contains("panicked"), "{}", tail(&mesh.logtext()));
    drop(child);
}

#[test]
fn a_node_lost_in_the_middle_of_a_fix_changes_nothing_anywhere() {
    let mesh = KilledMesh::new(SCHEMA, "  tables: [public.items]\n");
    let child = mesh.start(1);
    lost(&mesh, 1, "UPDATE items SET a = 555 WHERE id = 5; UPDATE items SET a = 556 WHERE id = 6");
    let rows: Vec<String> = (0..3).map(|i| mesh.sql(i, ITEMS)).collect();

    // u2's row 5 is locked, so the fix waits there; then its session is terminated.
    let url = mesh.nodes[2].url("app");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let locker = rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute("BEGIN; SELECT * FROM items WHERE id = 5 FOR UPDATE").await.unwrap();
        c
    });
    let mut all = vec!["repair", "fix", "--config", mesh.config.to_str().unwrap()];
    all.push("--json");
    let fix = synapse(&all).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name <> 'psql'";
    while mesh.sql(2, waiting) != "1" {
        assert!(Instant::now() < deadline, "the fix never reached u2's locked row");
        std::thread::sleep(Duration::from_millis(50));
    }
    mesh.sql(2, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock'");
    let out = fix.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("node u2") && text.contains("hint:"), "{text}");
    rt.block_on(locker.batch_execute("ROLLBACK")).unwrap();
    drop(locker);
    let after: Vec<String> = (0..3).map(|i| mesh.sql(i, ITEMS)).collect();
    assert_eq!(rows, after, "nothing may change on any node: {text}");
    assert_eq!(mesh.conflicts("id::text", "true"), " |  | ");
    // Run again, it finishes the job.
    let (code, text) = repair(&mesh, &["fix"]);
    assert_eq!(code, Some(0), "{text}");
    mesh.wait_same("rows after the second fix", ITEMS);
    drop(child);
}

/// Hub-and-spoke (u0 the hub): spokes u1 and u2 exchange changes only through u0. A check of
/// the two spokes, while every node keeps writing, must report only the drift: a spoke's change
/// still on its way through the hub is in flight, not a difference. The check takes the hub
/// into the comparison and cuts twice (spoke → hub, then hub → spoke).
#[test]
fn a_check_between_spokes_tells_changes_relayed_by_the_hub_from_drift() {
    let mesh = KilledMesh::new(SCHEMA, "  hub: u0\n  tables: [public.items]\n");
    let child = mesh.start(1);
    lost(&mesh, 1, "UPDATE items SET a = 555 WHERE id = 5"); // drift on spoke u1
    lost(&mesh, 2, "DELETE FROM items WHERE id = 7"); // drift on spoke u2
    let workload = Workload::start(&mesh);
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..3 {
        let (code, text) = repair(&mesh, &["check", "--json", "--nodes", "u1,u2"]);
        assert_eq!(code, Some(1), "{text}\n{}", tail(&mesh.logtext()));
        assert!(text.contains("comparing hub u0 too"), "{text}");
        let json: Vec<&str> = text.lines().filter(|l| !l.starts_with("note:")).collect();
        let report = json_of(&json.join("\n"));
        assert_eq!(
            keys(&report[0]["differing"]),
            BTreeSet::from([5, 7]),
            "round {round}: only the drift, nothing relayed in flight: {text}"
        );
        assert_eq!(report[0]["cut"], json!(["u0→u1", "u0→u2", "u1→u0", "u2→u0"]), "{text}");
    }
    assert!(workload.stop() > 100, "the workload hardly wrote");
    drop(child);
}
