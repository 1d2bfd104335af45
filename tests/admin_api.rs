//! The operator's API on a running two-region mesh (real PostgreSQL, `synapse run`, HTTP):
//! * `GET /v1/conflicts` shows a conflict the test produces (two regions renaming one account
//!   at once), both versions and the result side by side, filtered and paged;
//! * `GET /v1/topology` names both nodes, both captures and both appliers with their state
//!   and lag, and `synapse status` prints them as tables;
//! * `GET /v1/openapi.json` is a valid OpenAPI 3.1 document served without a token, and every
//!   operation it lists is a route of the running process (no operation answers with the
//!   router's own 404 or 405) that enforces the token scope the document names (401 without
//!   a token, 403 with a token of every other scope).
#![allow(clippy::unwrap_used)]

mod common;

use common::{request, spawn_run, wait_ready, ADMIN_TOKEN};
use serde_json::Value;
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

/// A token of each scope but `admin`.
const SCOPED: [(&str, &str); 3] = [
    ("stream", "stream-token-0123456789abcdef"),
    ("endpoints", "endpoints-token-0123456789abcdef"),
    ("repair", "repair-token-0123456789abcdef"),
];

/// `synapse status` against the running synapse: whether it exited 0 (every part runs), its
/// output and its errors.
fn status_cli(config: &std::path::Path) -> (bool, String, String) {
    let out = common::synapse(&["status", "--config", config.to_str().unwrap()])
        .env("SYNAPSE_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn get(api: &str, path: &str) -> (u16, Value) {
    let (status, body) = request(api, "GET", path, "", Some(ADMIN_TOKEN));
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[test]
fn conflicts_topology_and_the_openapi_document_on_a_running_mesh() {
    let nodes: Vec<LocalCluster> = (0..2).map(|_| LocalCluster::start(ClusterOptions::default()).unwrap()).collect();
    for n in &nodes {
        n.create_database("app").unwrap();
        n.psql(
            "app",
            "CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL); INSERT INTO accounts VALUES (1, 'alice')",
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let listen = common::Listeners::new();
    let scoped: String = SCOPED
        .iter()
        .map(|(scope, token)| format!("    - {{name: {scope}, token: {token}, scopes: [{scope}]}}\n"))
        .collect();
    let config = common::two_regions_config(&nodes, "public.accounts", dir.path(), &listen.yaml(&scoped));
    let (ops, api) = (listen.ops.clone(), listen.api.clone());
    let log = dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    wait_ready(&ops, &log, 120);

    common::concurrent_renames(&nodes[0], &nodes[1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let conflicts = loop {
        let (status, body) = get(&api, "/v1/conflicts");
        assert_eq!(status, 200, "{body}");
        if !body["conflicts"].as_array().unwrap().is_empty() {
            break body;
        }
        if Instant::now() > deadline {
            let diag: Vec<String> = nodes
                .iter()
                .map(|n| {
                    n.psql("app", "SELECT string_agg(coalesce(application_name,'') || ' ' || state || ' ' || coalesce(wait_event_type,'') || ':' || coalesce(wait_event,'') || ' ' || left(query, 80), E'\n') FROM pg_stat_activity WHERE datname = 'app' AND pid <> pg_backend_pid()").unwrap()
                        + "\nslots: " + &n.psql("app", "SELECT string_agg(slot_name || ' ' || coalesce(confirmed_flush_lsn::text,'') || ' active=' || active, ', ') FROM pg_replication_slots").unwrap()
                        + "\nowner: " + &n.psql("app", "SELECT owner FROM accounts WHERE id = 1").unwrap()
                        + " lsn " + &n.psql("app", "SELECT pg_current_wal_lsn()").unwrap()
                })
                .collect();
            let metrics = reqwest::blocking::get(format!("http://{ops}/metrics")).unwrap().text().unwrap();
            let metrics: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && (l.contains("capture_events")
                            || l.contains("skipped")
                            || l.contains("apply_rows")
                            || l.contains("apply_transactions")
                            || l.contains("capture_transactions")
                            || l.contains("lag_records"))
                })
                .collect();
            panic!(
                "no conflict logged: {body}\n{}\n{}\n{}",
                diag.join("\n----\n"),
                metrics.join("\n"),
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("conflicts: {conflicts}");
    let c = &conflicts["conflicts"][0];
    assert_eq!(c["table"], "public.accounts", "{c}");
    assert!(["us", "eu"].contains(&c["node"].as_str().unwrap()), "{c}");
    let owners: Vec<&str> =
        ["local", "remote", "result"].iter().map(|side| c[side]["values"]["owner"].as_str().unwrap_or("?")).collect();
    assert!(owners[..2].contains(&"alice (us)") && owners[..2].contains(&"alice (eu)"), "both versions: {c}");
    assert!(owners[2] == "alice (us)" || owners[2] == "alice (eu)", "the result: {c}");
    assert!(c["detected_at"].as_str().unwrap().ends_with('Z'), "{c}");
    assert_eq!(conflicts["unreachable"], Value::Array(vec![]));
    // Filters and paging.
    let node = c["node"].as_str().unwrap();
    let (_, one) = get(&api, &format!("/v1/conflicts?node={node}&limit=1"));
    assert_eq!(one["conflicts"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["next"][node]["before_id"], one["conflicts"][0]["id"], "{one}");
    let (_, none) = get(&api, "/v1/conflicts?table=public.other");
    assert!(none["conflicts"].as_array().unwrap().is_empty(), "{none}");
    let (status, bad) = get(&api, "/v1/conflicts?limit=0");
    assert_eq!(status, 400);
    assert!(bad.to_string().contains("limit"), "{bad}");
    let (status, bad) = get(&api, "/v1/conflicts?before_id=3");
    assert_eq!(status, 400, "{bad}");
    let (status, _) = request(&api, "GET", "/v1/conflicts", "", None);
    assert_eq!(status, 401, "the conflict log needs a token");

    // The topology: both nodes members, both captures and appliers streaming, with lag.
    let (status, t) = get(&api, "/v1/topology");
    assert_eq!(status, 200, "{t}");
    println!("topology: {t}");
    let names = |list: &Value, field: &str| -> Vec<String> {
        let mut v: Vec<String> =
            list.as_array().unwrap().iter().map(|x| x[field].as_str().unwrap_or("?").to_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&t["nodes"], "name"), ["eu", "us"], "{t}");
    assert!(t["nodes"].as_array().unwrap().iter().all(|n| n["phase"] == "member"), "{t}");
    assert_eq!(names(&t["sources"], "source"), ["eu", "us"], "{t}");
    for s in t["sources"].as_array().unwrap() {
        assert_eq!(s["component"]["state"], "streaming", "{s}");
        assert!(s["lag_seconds"].is_number() && s["slot_lag_bytes"].is_number(), "{s}");
    }
    let appliers: Vec<String> = t["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!("{}->{} {}", a["source"].as_str().unwrap(), a["target"].as_str().unwrap(), a["component"]["state"])
        })
        .collect();
    assert_eq!(appliers.len(), 2, "{t}");
    assert!(appliers.contains(&"us->eu \"streaming\"".to_owned()), "{appliers:?}");
    assert!(appliers.contains(&"eu->us \"streaming\"".to_owned()), "{appliers:?}");
    assert!(t["targets"].as_array().unwrap().iter().all(|a| a["behind_records"].is_number()), "{t}");
    // The same as tables from the CLI: exit 0 while every part runs.
    let (ran, text, errors) = status_cli(&config);
    println!("synapse status:\n{text}");
    assert!(ran, "{text}{errors}");
    for want in ["ready: every part runs", "us -> eu", "eu -> us", "member"] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    assert_eq!(text.matches("streaming").count(), 4, "{text}");
    // `synapse replay` moves an endpoint back to a time.
    let (status, body) = request(
        &api,
        "POST",
        "/v1/endpoints",
        r#"{"name": "audit", "url": "http://127.0.0.1:9/hook"}"#,
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 201, "{body}");
    let out =
        common::synapse(&["replay", "audit", "--since", "2020-01-01T00:00:00Z", "--config", config.to_str().unwrap()])
            .env("SYNAPSE_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("audit: delivering again from"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out =
        common::synapse(&["replay", "nope", "--since", "2020-01-01T00:00:00Z", "--config", config.to_str().unwrap()])
            .env("SYNAPSE_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nope"),
        "an unknown endpoint is named"
    );

    // The OpenAPI document: served without a token, valid 3.1, every operation routed.
    let (status, text) = request(&api, "GET", "/v1/openapi.json", "", None);
    assert_eq!(status, 200);
    let spec = oas3::from_json(&text).unwrap_or_else(|e| panic!("not a valid OpenAPI 3.1 document: {e}"));
    assert!(spec.openapi.starts_with("3.1"), "{}", spec.openapi);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            assert!(
                op["responses"].as_object().unwrap().keys().any(|k| k.starts_with('2')),
                "{method} {path}: no success answer"
            );
            // Parameters filled with names that exist nowhere: the handler answers (an error
            // naming the object), the router never says "no such route".
            let concrete =
                path.split('/').map(|p| if p.starts_with('{') { "nope" } else { p }).collect::<Vec<_>>().join("/");
            let body = if path.starts_with("/v1/repair") { r#"{"tables": ["public.nope"]}"# } else { "{}" };
            let method = method.to_uppercase();
            let scope = op["security"][0]["token"][0].as_str();
            if let Some(scope) = scope {
                assert_eq!(request(&api, &method, &concrete, body, None).0, 401, "{method} {path} without a token");
                for (other, token) in SCOPED.iter().filter(|(s, _)| *s != scope) {
                    let (status, answer) = request(&api, &method, &concrete, body, Some(token));
                    assert_eq!(status, 403, "{method} {path} (scope {scope}) with a {other} token: {answer}");
                }
                if scope != "admin" {
                    let token = SCOPED.iter().find(|(s, _)| *s == scope).unwrap().1;
                    let (status, answer) = request(&api, &method, &concrete, body, Some(token));
                    assert!(![401, 403].contains(&status), "{method} {path} with its scope {scope}: {status} {answer}");
                }
            }
            let (status, answer) = request(&api, &method, &concrete, body, Some(ADMIN_TOKEN));
            assert_ne!(status, 405, "{method} {path}: the router has no such method");
            assert!(
                status != 404 || answer.contains("\"error\""),
                "{method} {path}: the router has no such route ({status} {answer:?})"
            );
        }
    }
    println!("{operations} operations in the document, each routed");
    assert!(operations >= 30, "{operations} operations");
}

/// An initial copy's progress: while the copy into the target waits (a lock the test holds),
/// `/v1/topology` shows the applier copying with its chunks, and `synapse status` draws the bar;
/// once the lock goes, every chunk is done and the applier streams.
#[test]
fn an_initial_copy_shows_its_progress() {
    let nodes = common::Nodes::start(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
    );
    nodes.target.psql("app", "CREATE TABLE t (id int PRIMARY KEY, v text)").unwrap();
    let mut locker = common::SyncClient::connect(&nodes.target.url("app"));
    locker.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE").unwrap();
    let listen = common::Listeners::new();
    let config = nodes.config_with(&listen.yaml(""));
    let (ops, api) = (listen.ops.clone(), listen.api.clone());
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    let applier = loop {
        // The API listens a moment after the process starts.
        let t = if std::net::TcpStream::connect(&api).is_ok() { get(&api, "/v1/topology").1 } else { Value::Null };
        let a = t["targets"][0].clone();
        if a["component"]["state"] == "copying" && a["copy"]["chunks"].as_u64().unwrap_or(0) > 0 {
            break a;
        }
        assert!(Instant::now() < deadline, "no copy in progress shown: {t}\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(applier["copy"]["chunks_done"], 0, "{applier}");
    let (ran, text, _) = status_cli(&config);
    println!("{text}");
    assert!(!ran, "not ready while copying:\n{text}");
    assert!(text.contains("copying [") && text.contains(&format!("0/{} chunks", applier["copy"]["chunks"])), "{text}");
    locker.batch_execute("ROLLBACK").unwrap();
    wait_ready(&ops, &log, 60);
    let (_, t) = get(&api, "/v1/topology");
    let a = &t["targets"][0];
    assert_eq!(a["copy"]["chunks_done"], a["copy"]["chunks"], "{a}");
    assert_eq!(a["rows_copied"], 20000, "{a}");
}
