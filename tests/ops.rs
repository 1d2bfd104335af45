//! /livez, /readyz and /metrics of a running `synapse run`, and its admin plane: every action on
//! the API behind a token with the right scope, audited; nothing but health on the ops listener.
#![allow(clippy::unwrap_used)]

mod common;

use common::{request, synapse, Nodes, ADMIN_TOKEN};
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
    run_with_ops_config(nodes, nodes.config(extra_source_yaml))
}

fn run_with_ops_config(_nodes: &Nodes, config: std::path::PathBuf) -> (common::Synapse, String, std::path::PathBuf) {
    let port = synapse_localpg::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{addr}\""));
    std::fs::write(&config, text).unwrap();
    // Its log next to the configuration: a test that finds it gone shows why.
    let log = std::fs::File::create(config.with_file_name("synapse.log")).unwrap();
    let child = synapse(&["run", "--config", config.to_str().unwrap()]).stderr(log).spawn().unwrap();
    (common::Synapse::guard(child), addr, config)
}

/// Tokens of the API in [`run_with_api`], one per scope.
const READER: &str = "reader-token-0123456789abcdef";
const HOOKS: &str = "hooks-token-0123456789abcdef";
const REPAIRER: &str = "repairer-token-0123456789abcdef";

/// [`run_with_ops`] with the API on a free port too, with a token per scope: (process, ops
/// address, API address, config file).
fn run_with_api(nodes: &Nodes, extra_source_yaml: &str) -> (common::Synapse, String, String, std::path::PathBuf) {
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = nodes.config(extra_source_yaml);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "api:\n  listen: \"\"\n",
        &format!(
            "egress:\n  allow: [127.0.0.1]\napi:\n  listen: \"{api}\"\n  tokens:\n    - {{name: reader, token: {READER}}}\n    - {{name: hooks, token: {HOOKS}, scopes: [endpoints]}}\n    - {{name: repairer, token: {REPAIRER}, scopes: [repair]}}\n    - {{name: root, token_sha256: {}, admin: true}}\n",
            sha256_hex(ADMIN_TOKEN)
        ),
    );
    std::fs::write(&config, text).unwrap();
    let (child, ops, config) = run_with_ops_config(nodes, config);
    (child, ops, api, config)
}

fn sha256_hex(s: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

fn wait_ready(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(addr, "/readyz?strict").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "never ready: {:?}", get(addr, "/readyz?strict"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readiness_and_metrics_report_the_pipeline() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let (mut child, addr, _) = run_with_ops(&nodes, "");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = get(&addr, "/readyz?strict") {
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
        // The lag gauges are set after the commit that counted the rows: wait for both.
        let lag_reported = body.lines().any(|l| l.starts_with("synapse_apply_lag_records{"));
        if applied.as_deref().is_some_and(|l| l.ends_with(" 100")) && lag_reported {
            for name in [
                "synapse_capture_events_total",
                "synapse_slot_lag_bytes",
                "synapse_capture_lag_seconds",
                "synapse_log_append_seconds",
            ] {
                assert!(body.contains(name), "{name} missing:\n{body}");
            }
            // Every series is described, per-pipeline series carry their source and target,
            // and histograms have buckets (they aggregate across processes).
            for line in body.lines().filter(|l| l.starts_with("# TYPE synapse_")) {
                let name = line.split_whitespace().nth(2).unwrap();
                assert!(body.contains(&format!("# HELP {name} ")), "{name} has no HELP text:\n{body}");
            }
            let series = |prefix: &str| body.lines().filter(|l| l.starts_with(prefix)).collect::<Vec<_>>();
            for name in ["synapse_apply_rows_total{", "synapse_apply_transactions_total{", "synapse_apply_lag_records{"]
            {
                let lines = series(name);
                assert!(!lines.is_empty(), "{name} missing:\n{body}");
                assert!(lines.iter().all(|l| l.contains("source=\"a\"") && l.contains("target=\"b\"")), "{lines:?}");
            }
            for name in ["synapse_capture_events_total{", "synapse_capture_confirmed_lsn{", "synapse_slot_lag_bytes{"] {
                let lines = series(name);
                assert!(!lines.is_empty() && lines.iter().all(|l| l.contains("source=\"a\"")), "{name}: {lines:?}");
            }
            assert!(!series("synapse_log_append_seconds_bucket{").is_empty(), "no histogram buckets:\n{body}");
            assert!(!series("synapse_build_info{version=").is_empty(), "no build_info:\n{body}");
            break;
        }
        assert!(Instant::now() < deadline, "rows never counted: {applied:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The admin API of a running pipeline: `POST /v1/repair/check` finds a row written on the
/// target by hand while replication runs (and not the rows in flight), says what is wrong with
/// a bad request, and reads tracked digests once `repair track` has set them up.
#[test]
fn the_admin_api_checks_replicas_of_a_running_pipeline() {
    let nodes = Nodes::start(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 2000) g",
    );
    let (mut child, ops, api, config) = run_with_api(&nodes, "    tables: [public.t]\n");
    wait_ready(&ops);
    let check = |body: &str| request(&api, "POST", "/v1/repair/check", body, Some(REPAIRER));
    let (status, body) = check("{}");
    assert_eq!(status, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reports[0]["differing"], serde_json::json!([]), "{body}");

    nodes.target.psql("app", "UPDATE t SET v = 'by hand' WHERE id = 7").unwrap();
    nodes.source.psql("app", "UPDATE t SET v = 'replicated' WHERE id BETWEEN 100 AND 199").unwrap();
    let (status, body) = check(r#"{"tables": ["public.t"], "bits": 8}"#);
    assert_eq!(status, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        reports[0]["differing"],
        serde_json::json!([{"key": ["7"], "missing_on": [], "holders": [["a"], ["b"]]}]),
        "{body}"
    );
    assert_eq!(reports[0]["cut"], serde_json::json!(["a→b"]), "{body}");

    // Every error in one shape: {"error": {"code", "message", "hint"}}.
    let (status, body) = check(r#"{"nodes": ["a", "moon"]}"#);
    assert_eq!(status, 400, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "REP007", "{body}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`moon` is not a node"), "{body}");
    assert!(e["error"]["hint"].as_str().unwrap().contains("fix the named field"), "{body}");
    let (status, body) = check(r#"{"tabels": []}"#);
    assert_eq!(status, 422, "unknown fields are refused: {body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("tabels"), "{body}");
    assert!(e["error"]["hint"].as_str().unwrap().contains("only these fields"), "{body}");
    let (status, body) = check(r#"{"dry_run": true}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("POST /v1/repair/fix"), "{body}");

    let out = synapse(&["repair", "track", "--config", config.to_str().unwrap(), "--bits", "8"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    nodes.source.psql("app", "DELETE FROM t WHERE id = 3").unwrap();
    let (status, body) = check(r#"{"bits": 8}"#);
    assert_eq!(status, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reports[0]["digests"], "tracked", "{body}");
    assert_eq!(reports[0]["differing"].as_array().unwrap().len(), 1, "the replicated delete is no drift: {body}");

    // Each of those requests is in the audit log, with who made it.
    let (status, body) = request(&api, "GET", "/v1/audit?limit=3", "", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    let audit: serde_json::Value = serde_json::from_str(&body).unwrap();
    let last = &audit["entries"].as_array().unwrap()[2];
    assert_eq!(
        (last["who"].as_str(), last["path"].as_str(), last["status"].as_u64()),
        (Some("repairer"), Some("/v1/repair/check"), Some(200)),
        "{body}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The route table of the admin plane: every route answers 401 without a token and 403 to a
/// token without its scope, on the API; the ops listener has none of them (404). A request
/// that changes something must be JSON (no form a web page could forge), and is audited
/// whatever its outcome. Parked components can be resumed through the API.
#[test]
fn every_route_needs_a_token_with_its_scope() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let (mut child, ops, api, config) = run_with_api(&nodes, "");
    wait_ready(&ops);
    let log = config.with_file_name("synapse.log");
    let mut alive = || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("synapse exited ({status}):\n{}", common::log_tail(&log));
        }
    };
    // (method, path, body, the scope it needs, a token without it)
    let routes = [
        ("GET", "/v1/streams", "", READER, HOOKS),
        ("GET", "/v1/streams/a", "", READER, REPAIRER),
        ("GET", "/v1/streams/a/changes", "", READER, HOOKS),
        ("GET", "/v1/endpoints", "", HOOKS, READER),
        ("POST", "/v1/endpoints", r#"{"name": "x", "url": "http://127.0.0.1:9/x"}"#, HOOKS, REPAIRER),
        ("DELETE", "/v1/endpoints/x", "", HOOKS, READER),
        ("POST", "/v1/repair/check", r#"{"no_wait": true}"#, REPAIRER, HOOKS),
        ("POST", "/v1/repair/fix", r#"{"dry_run": true, "no_wait": true}"#, REPAIRER, READER),
        ("GET", "/v1/components", "", ADMIN_TOKEN, REPAIRER),
        ("POST", "/v1/components/resume", "{}", ADMIN_TOKEN, HOOKS),
        ("GET", "/v1/audit", "", ADMIN_TOKEN, READER),
        ("GET", "/v1/positions", "", READER, HOOKS),
        ("GET", "/v1/positions/wait?source=a&lsn=0/1&timeout_secs=0", "", READER, REPAIRER),
    ];
    for (method, path, body, allowed, lacking) in routes {
        alive();
        let (status, text) = request(&api, method, path, body, None);
        assert_eq!(status, 401, "{method} {path} without a token: {text}");
        let (status, text) = request(&api, method, path, body, Some("not-a-token-0123456789abcdef"));
        assert_eq!(status, 401, "{method} {path} with a wrong token: {text}");
        let (status, text) = request(&api, method, path, body, Some(lacking));
        assert_eq!(status, 403, "{method} {path} without its scope: {text}");
        assert!(text.contains("lacks the"), "{text}");
        let (status, text) = request(&api, method, path, body, Some(allowed));
        assert!(![401, 403, 404].contains(&status), "{method} {path} with its scope: {status} {text}");
        let (status, _) = request(&ops, method, path, body, Some(allowed));
        assert_eq!(status, 404, "{method} {path} must not be on the ops listener");
    }
    // A shard set's move: admin scope (this configuration has no shard set: 404 past the scope).
    for (method, path) in [("GET", "/v1/shards/shop"), ("POST", "/v1/shards/shop/start")] {
        assert_eq!(request(&api, method, path, "{}", None).0, 401, "{method} {path} without a token");
        assert_eq!(request(&api, method, path, "{}", Some(READER)).0, 403, "{method} {path} without its scope");
        assert_eq!(request(&api, method, path, "{}", Some(ADMIN_TOKEN)).0, 404, "{method} {path} of no set");
    }
    for path in ["/repair/check", "/repair/fix"] {
        assert_eq!(request(&ops, "POST", path, "{}", None).0, 404, "{path} on ops");
    }
    // An admin token may do everything; resume answers with what it tried again.
    let (status, text) = request(&api, "POST", "/v1/components/resume", "{}", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"resumed\":[]"), "{text}");
    let (status, text) = request(&api, "GET", "/v1/components", "", Some(ADMIN_TOKEN));
    assert!(status == 200 && text.contains("\"component\":\"capture/a\""), "{text}");
    // The CLI does the same with the token from the environment.
    let out =
        synapse(&["resume", "--config", config.to_str().unwrap()]).env("SYNAPSE_TOKEN", ADMIN_TOKEN).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "nothing is parked");
    let out = synapse(&["resume", "--config", config.to_str().unwrap()]).env("SYNAPSE_TOKEN", READER).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("lacks the `admin` scope"));

    // A form post (what a web page can send without a preflight) is refused.
    let mut s = std::net::TcpStream::connect(&api).unwrap();
    let form = "x=1";
    write!(
        s,
        "POST /v1/components/resume HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.0 400") && text.contains("application/json"), "{text}");

    // Audited, refusals too: who (or `?`), what, the status.
    let (_, text) = request(&api, "GET", "/v1/audit?limit=1000", "", Some(ADMIN_TOKEN));
    let audit: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entries = audit["entries"].as_array().unwrap();
    let has = |who: &str, path: &str, status: u64| {
        entries.iter().any(|e| e["who"] == who && e["path"] == path && e["status"] == status)
    };
    assert!(has("?", "/v1/repair/fix", 401), "{text}");
    assert!(has("reader", "/v1/repair/fix", 403), "{text}");
    assert!(has("root", "/v1/components/resume", 200), "{text}");
    assert!(has("root", "/v1/components/resume", 400), "the form post: {text}");
    assert!(!text.contains(ADMIN_TOKEN) && !text.contains(READER), "no secret in the audit log");
}

/// Secure by default: an API on a non-loopback address without tokens does not start; without
/// tokens on loopback, only loopback host names are served (DNS rebinding).
#[test]
fn an_open_api_is_refused_off_loopback_and_checks_the_host_on_it() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY)");
    let config = nodes.config("");
    let open =
        std::fs::read_to_string(&config).unwrap().replace("api:\n  listen: \"\"", "api:\n  listen: \"0.0.0.0:0\"");
    std::fs::write(&config, open).unwrap();
    let out = synapse(&["run", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("api.tokens") && text.contains("not a loopback address"), "{text}");

    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let local = nodes.config("").to_str().unwrap().to_owned();
    let text =
        std::fs::read_to_string(&local).unwrap().replace("api:\n  listen: \"\"", &format!("api:\n  listen: \"{api}\""));
    std::fs::write(&local, text).unwrap();
    let (_child, ops, _) = run_with_ops_config(&nodes, local.into());
    wait_ready(&ops);
    assert_eq!(request(&api, "GET", "/v1/streams", "", None).0, 200, "loopback, no tokens: open");
    let mut s = std::net::TcpStream::connect(&api).unwrap();
    write!(s, "GET /v1/streams HTTP/1.0\r\nHost: rebound.example:7654\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.0 403") && text.contains("not a loopback name"), "{text}");
}

/// Token rotation without a restart: the configuration's `api.tokens` edited and SIGHUP sent —
/// the new token works, the removed one is refused, parked components are tried again as
/// before; a configuration that no longer loads keeps the current tokens.
#[test]
fn tokens_rotate_on_sighup() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let (child, ops, api, config) = run_with_api(&nodes, "");
    wait_ready(&ops);
    assert_eq!(request(&api, "GET", "/v1/streams", "", Some(READER)).0, 200);
    const ROTATED: &str = "rotated-reader-token-0123456789abcdef";
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(READER, ROTATED)).unwrap();
    let hup = || std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    hup();
    let deadline = Instant::now() + Duration::from_secs(20);
    while request(&api, "GET", "/v1/streams", "", Some(ROTATED)).0 != 200 {
        assert!(Instant::now() < deadline, "the rotated token is never accepted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(request(&api, "GET", "/v1/streams", "", Some(READER)).0, 401, "the removed token still works");
    assert_eq!(request(&api, "GET", "/v1/components", "", Some(ADMIN_TOKEN)).0, 200, "the others stay");
    // A broken file: nothing changes.
    std::fs::write(&config, "api: [this is not a configuration").unwrap();
    hup();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(request(&api, "GET", "/v1/streams", "", Some(ROTATED)).0, 200);
    assert_eq!(request(&api, "GET", "/v1/streams", "", Some(READER)).0, 401);
    drop(child);
}

/// A long initial copy keeps `/readyz` ready (the process serves; Kubernetes keeps it in
/// service) while `/readyz?strict` waits until every component streams.
#[test]
fn readyz_is_ready_while_copying_and_strict_once_streaming() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');");
    // The copy into the target's table waits on this lock until the test lets it go.
    nodes.target.psql("app", "CREATE TABLE t (id int PRIMARY KEY, v text)").unwrap();
    let mut locker = common::SyncClient::connect(&nodes.target.url("app"));
    locker.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE").unwrap();
    let (_child, addr, _) = run_with_ops(&nodes, "");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&addr, "/readyz").unwrap_or_default();
        if body.contains("apply/a->b: copying") {
            assert_eq!(status, 200, "copying is ready: {body}");
            assert_eq!(get(&addr, "/readyz?strict").map(|r| r.0), Some(503), "but not strictly");
            break;
        }
        assert!(Instant::now() < deadline, "the copy never showed: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    locker.batch_execute("ROLLBACK").unwrap();
    wait_ready(&addr);
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM t").unwrap(), "1");
}
