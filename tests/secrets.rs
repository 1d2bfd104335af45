//! Secrets never leave synapse: database passwords (in the URL's user info and in a
//! `password=` parameter), webhook URLs with credentials and a token in the query, custom
//! header values, signing secrets and API tokens are marked; the pipeline runs with a live and a
//! dead webhook endpoint, every read-only surface is read (the log, /metrics, /readyz, every API
//! view, error bodies, `validate` and `doctor`), and no marker appears anywhere.
#![allow(clippy::unwrap_used)]

mod common;

use common::{request, spawn_run, Nodes, ITEMS_SCHEMA};
use std::time::{Duration, Instant};

const MARKERS: [&str; 6] =
    ["MARKEDpgpw1", "MARKEDpgpw2", "MARKEDhookpw", "MARKEDhooktoken", "MARKEDheader", "MARKEDapitoken0123456789"];

#[test]
fn no_secret_appears_in_logs_metrics_api_or_errors() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let hook_port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
    rt.spawn(async move { axum::serve(listener, app).await });
    let dead_port = synapse_localpg::free_port().unwrap();
    let secret = synapse_connectors::webhook::signing::Secret::generate().to_string();
    let (api, ops) = (free_addr(), free_addr());
    let token = MARKERS[5];

    let config = nodes.config("");
    let source_url = nodes.source.url("app");
    let target_url = nodes.target.url("app");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&source_url, &source_url.replace("postgres@", &format!("postgres:{}@", MARKERS[0])))
        .replace(&target_url, &format!("{target_url}?password={}", MARKERS[1]))
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\""))
        .replace(
            "api:\n  listen: \"\"",
            &format!("api:\n  listen: \"{api}\"\n  tokens:\n    - {{name: root, token: {token}, admin: true}}"),
        );
    let hooks = format!(
        "webhooks:\n  - name: live\n    url: http://u:{}@127.0.0.1:{hook_port}/hook?token={}\n    secrets: [\"{secret}\"]\n    headers: {{x-api-key: {}}}\n  - name: dead\n    url: http://u:{}@127.0.0.1:{dead_port}/hook?token={}\n    secrets: [\"{secret}\"]\n    retry_schedule: [0s, 100ms]\negress:\n  allow: [127.0.0.1]\n",
        MARKERS[2], MARKERS[3], MARKERS[4], MARKERS[2], MARKERS[3]
    );
    std::fs::write(&config, text + &hooks).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    common::wait_ready(&ops, &log, 60);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1), (2, 2)").unwrap();
    // Wait for the dead endpoint to give up on an event (its errors are then recorded).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = request(&api, "GET", "/v1/endpoints/dead/dead-letters", "", Some(token));
        if body.contains("connection failed") {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut seen = vec![("log".to_string(), String::new())];
    for path in ["/metrics", "/readyz"] {
        seen.push((format!("ops {path}"), request(&ops, "GET", path, "", None).1));
    }
    for path in [
        "/v1/endpoints",
        "/v1/endpoints/live",
        "/v1/endpoints/dead/attempts",
        "/v1/endpoints/dead/dead-letters",
        "/v1/components",
        "/v1/audit",
        "/v1/streams/a/changes",
    ] {
        let (status, body) = request(&api, "GET", path, "", Some(token));
        assert_eq!(status, 200, "{path}: {body}");
        seen.push((format!("api {path}"), body));
    }
    // Error bodies: a bad endpoint (its URL marked), a wrong token, a malformed repair request.
    let bad = format!(r#"{{"name": "x", "url": "ftp://u:{}@h/?token={}"}}"#, MARKERS[2], MARKERS[3]);
    seen.push(("bad endpoint".into(), request(&api, "POST", "/v1/endpoints", &bad, Some(token)).1));
    let good = format!(
        r#"{{"name": "y", "url": "http://u:{}@127.0.0.1:{dead_port}/?token={}", "headers": {{"authorization": "{}"}}}}"#,
        MARKERS[2], MARKERS[3], MARKERS[4]
    );
    seen.push(("created endpoint".into(), request(&api, "POST", "/v1/endpoints", &good, Some(token)).1));
    seen.push(("wrong token".into(), request(&api, "GET", "/v1/endpoints", "", Some("MARKEDwrong0123456789abcdef")).1));
    seen.push(("bad repair".into(), request(&api, "POST", "/v1/repair/check", r#"{"nodes": ["x"]}"#, Some(token)).1));
    for cmd in ["validate", "doctor"] {
        let out = common::synapse(&[cmd, "--config", config.to_str().unwrap()]).output().unwrap();
        seen.push((
            cmd.into(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        ));
    }
    seen[0].1 = std::fs::read_to_string(&log).unwrap();
    for (what, text) in &seen {
        for m in MARKERS.iter().chain([&secret.as_str()]) {
            assert!(!text.contains(m), "{what} shows the secret {m}:\n{text}");
        }
        assert!(!text.contains("MARKEDwrong"), "{what} echoes a presented token:\n{text}");
    }
    // The views still say what they redact.
    let endpoint = &seen.iter().find(|(w, _)| w == "api /v1/endpoints/live").unwrap().1;
    assert!(
        endpoint.contains("token=***") && endpoint.contains("u:***@") && endpoint.contains("\"x-api-key\":\"***\""),
        "{endpoint}"
    );
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap())
}

/// The same on the Kafka log: librdkafka properties holding secrets (SASL credentials, a key
/// password) are passed to the client but appear nowhere — not in synapse's log (where
/// librdkafka's own messages go too), the metrics, /readyz, `validate` or `doctor`.
#[test]
fn no_kafka_secret_appears_anywhere() {
    let broker = synapse_localpg::LocalBroker::start().unwrap();
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let config = nodes.kafka_config(broker.addr());
    let ops = free_addr();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("      fetch.wait.max.ms: 5\n", "      fetch.wait.max.ms: 5\n      sasl.username: MARKEDkafkauser\n      sasl.password: MARKEDkafkapw\n      ssl.key.password: MARKEDkeypw\n")
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\""));
    std::fs::write(&config, text).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    common::wait_ready(&ops, &log, 90);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, "SELECT count(*) FROM items", Duration::from_secs(60));
    let mut seen = vec![("log", std::fs::read_to_string(&log).unwrap())];
    for path in ["/metrics", "/readyz"] {
        seen.push((path, reqwest::blocking::get(format!("http://{ops}{path}")).unwrap().text().unwrap()));
    }
    for cmd in ["validate", "doctor"] {
        let out = common::synapse(&[cmd, "--config", config.to_str().unwrap()]).output().unwrap();
        seen.push((cmd, String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)));
    }
    for (what, text) in &seen {
        for m in ["MARKEDkafkapw", "MARKEDkeypw"] {
            assert!(!text.contains(m), "{what} shows {m}:\n{text}");
        }
    }
}
