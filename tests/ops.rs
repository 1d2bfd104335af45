//! /livez, /readyz and /metrics of a running `synapse run`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{post, synapse, Nodes};
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let status = body.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body))
}

/// Starts `synapse run` replicating a → b with the ops server on a free port: (process,
/// address, config file).
fn run_with_ops(nodes: &Nodes, extra_source_yaml: &str) -> (common::Synapse, String, std::path::PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let config = nodes.config(extra_source_yaml);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{addr}\""));
    std::fs::write(&config, text).unwrap();
    let child = synapse(&["run", "--config", config.to_str().unwrap()]).stderr(Stdio::null()).spawn().unwrap();
    (common::Synapse::guard(child), addr, config)
}

#[test]
fn readiness_and_metrics_report_the_pipeline() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let (mut child, addr, _) = run_with_ops(&nodes, "");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = get(&addr, "/readyz") {
            assert!(body.contains("capture/a: streaming") && body.contains("apply/a->b: streaming"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {:?}", get(&addr, "/readyz"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&addr, "/livez").unwrap().0, 200);
    nodes.source.psql("app", "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        let applied = body.lines().find(|l| l.starts_with("synapse_apply_rows_total")).map(|l| l.to_owned());
        if applied.as_deref().is_some_and(|l| l.ends_with(" 100")) {
            for name in [
                "synapse_capture_events_total",
                "synapse_slot_lag_bytes",
                "synapse_capture_lag_seconds",
                "synapse_log_append_seconds",
            ] {
                assert!(body.contains(name), "{name} missing:\n{body}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "rows never counted: {applied:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The admin API of a running pipeline: `POST /repair/check` finds a row written on the target
/// by hand while replication runs (and not the rows in flight), says what is wrong with a bad
/// request, and reads tracked digests once `repair track` has set them up.
#[test]
fn the_admin_api_checks_replicas_of_a_running_pipeline() {
    let nodes = Nodes::start(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 2000) g",
    );
    let (mut child, addr, config) = run_with_ops(&nodes, "    tables: [public.t]\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&addr, "/readyz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "never ready: {:?}", get(&addr, "/readyz"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = post(&addr, "/repair/check", "{}");
    assert_eq!(status, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reports[0]["differing"], serde_json::json!([]), "{body}");

    nodes.target.psql("app", "UPDATE t SET v = 'by hand' WHERE id = 7").unwrap();
    nodes.source.psql("app", "UPDATE t SET v = 'replicated' WHERE id BETWEEN 100 AND 199").unwrap();
    let (status, body) = post(&addr, "/repair/check", r#"{"tables": ["public.t"], "bits": 8}"#);
    assert_eq!(status, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        reports[0]["differing"],
        serde_json::json!([{"key": ["7"], "missing_on": [], "holders": [["a"], ["b"]]}]),
        "{body}"
    );
    assert_eq!(reports[0]["cut"], serde_json::json!(["a→b"]), "{body}");

    // Every error in one shape: {"error": {"code", "message", "hint"}}.
    let (status, body) = post(&addr, "/repair/check", r#"{"nodes": ["a", "moon"]}"#);
    assert_eq!(status, 400, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "REP007", "{body}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`moon` is not a node"), "{body}");
    assert!(e["error"]["hint"].as_str().unwrap().contains("fix the named field"), "{body}");
    let (status, body) = post(&addr, "/repair/check", r#"{"tabels": []}"#);
    assert_eq!(status, 422, "unknown fields are refused: {body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("tabels"), "{body}");
    assert!(e["error"]["hint"].as_str().unwrap().contains("only these fields"), "{body}");
    let (status, body) = post(&addr, "/repair/check", r#"{"dry_run": true}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("POST /repair/fix"), "{body}");

    let out = synapse(&["repair", "track", "--config", config.to_str().unwrap(), "--bits", "8"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    nodes.source.psql("app", "DELETE FROM t WHERE id = 3").unwrap();
    let (status, body) = post(&addr, "/repair/check", r#"{"bits": 8}"#);
    assert_eq!(status, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reports[0]["digests"], "tracked", "{body}");
    assert_eq!(reports[0]["differing"].as_array().unwrap().len(), 1, "the replicated delete is no drift: {body}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// An API address another process holds (a second synapse or quickstart on the machine): the
/// start fails naming the setting, the address and the fix, not a bare "address in use".
#[test]
fn an_address_in_use_names_the_setting_and_the_fix() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY)");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = nodes.config("");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("api:\n  listen: \"\"", &format!("api:\n  listen: \"{addr}\""));
    std::fs::write(&config, text).unwrap();
    let out = synapse(&["run", "--config", config.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("api.listen: cannot listen on {addr}")), "{err}");
    assert!(err.contains("another process listens there; set api.listen to a free address"), "{err}");
    assert!(!err.contains("\u{1b}["), "no colour codes when stderr is not a terminal: {err}");
}
