//! /livez, /readyz and /metrics of a running `synapse run`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{synapse, Nodes};
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

#[test]
fn readiness_and_metrics_report_the_pipeline() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let config = nodes.config("");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{addr}\""));
    std::fs::write(&config, text).unwrap();
    let mut child = synapse(&["run", "--config", config.to_str().unwrap()]).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = get(&addr, "/readyz") {
            assert!(body.contains("capture/a: Streaming") && body.contains("apply/a->b: Streaming"), "{body}");
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
