//! Webhooks and streams through the real binary, real PostgreSQL and a real HTTP receiver:
//! kill -9 while deliveries are in flight, restart — every change arrives, redeliveries carry
//! the same webhook-id and body, and the live stream of the same process serves the changes.
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, Nodes};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Seen {
    /// webhook-id → bodies received under it.
    by_id: HashMap<String, Vec<Vec<u8>>>,
    bad_signatures: usize,
}

/// A receiver that answers slowly (deliveries are in flight when synapse is killed) and
/// verifies every signature with the independent standardwebhooks crate.
fn start_receiver(rt: &tokio::runtime::Runtime, secret: String) -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let (s, secret) = (s.clone(), secret.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let wh = standardwebhooks::Webhook::new(&secret).unwrap();
                let mut g = s.lock().unwrap();
                if wh.verify(&body, &headers).is_err() {
                    g.bad_signatures += 1;
                    return axum::http::StatusCode::UNAUTHORIZED;
                }
                let id = headers["webhook-id"].to_str().unwrap().to_owned();
                g.by_id.entry(id).or_default().push(body.to_vec());
                axum::http::StatusCode::OK
            }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn free_port() -> u16 {
    synapse_localpg::free_port().unwrap()
}

#[test]
fn kill_dash_nine_during_delivery_redelivers_with_the_same_id() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let nodes = Nodes::start(common::ITEMS_SCHEMA);
    let secret = synapse_connectors::webhook::signing::Secret::generate();
    let (url, seen) = start_receiver(&rt, secret.clone());
    let (api, ops) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = nodes.config("");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("api:\n  listen: \"\"", &format!("api:\n  listen: \"{api}\""))
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\""));
    let text = format!(
        "{text}webhooks:\n  - name: items-hook\n    url: {url}\n    secrets: [\"{secret}\"]\n    tables: [public.items]\n    operations: [insert]\n    retry_schedule: [0s, 100ms, 200ms, 500ms, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]\negress:\n  allow: [127.0.0.1]\n"
    );
    std::fs::write(&config, text).unwrap();
    let log = nodes.dir.path().join("synapse.log");

    let mut child = spawn_run(&config, &log);
    // The endpoint gets what the capture records from its slot's creation on: wait until the
    // pipeline is ready (the API itself comes up earlier) before writing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let http = reqwest::blocking::Client::new();
    while !http.get(format!("http://{ops}/readyz?strict")).send().is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "synapse never became ready:\n{}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(http.get(format!("http://{api}/v1/endpoints/items-hook")).send().unwrap().status().is_success());
    let mut rng = rand::thread_rng();
    let mut next = 1i64;
    for round in 0..6 {
        // 40 transactions of 1–5 inserts, then kill -9 at a random moment of their delivery.
        let mut sql = String::new();
        for _ in 0..40 {
            let n = rng.gen_range(1..=5);
            sql.push_str(&format!(
                "BEGIN; INSERT INTO items SELECT g, g FROM generate_series({next}, {}) g; UPDATE counters SET n = n + 1; COMMIT;\n",
                next + n - 1
            ));
            next += n;
        }
        nodes.source.psql("app", &sql).unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..700)));
        if round < 5 {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            child = spawn_run(&config, &log);
        }
    }
    let rows = next - 1;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let distinct = seen.lock().unwrap().by_id.len() as i64;
        if distinct >= rows {
            break;
        }
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(&log).unwrap();
            let tail: Vec<&str> = text.lines().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect();
            panic!("only {distinct} of {rows} inserts delivered\nlog tail:\n{}", tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let g = seen.lock().unwrap();
    assert_eq!(g.bad_signatures, 0);
    assert_eq!(g.by_id.len() as i64, rows, "an event was lost or invented");
    let mut ids: Vec<i64> = Vec::new();
    let mut redelivered = 0;
    for (id, bodies) in &g.by_id {
        assert!(bodies.iter().all(|b| b == &bodies[0]), "{id} was redelivered with a different body");
        redelivered += usize::from(bodies.len() > 1);
        let e: serde_json::Value = serde_json::from_slice(&bodies[0]).unwrap();
        assert_eq!(e["id"], id.as_str());
        ids.push(e["data"]["after"]["id"].as_i64().unwrap());
    }
    assert!(redelivered > 0, "no kill -9 hit a delivery in flight: the test proved nothing");
    ids.sort();
    assert_eq!(ids, (1..=rows).collect::<Vec<_>>());
    eprintln!("{rows} inserts delivered; {redelivered} redelivered after a kill -9, each with its webhook-id");
    drop(g);

    // The same process serves the stream: subscribe, write, read exactly the new rows.
    let sub: serde_json::Value = http.get(format!("http://{api}/v1/streams/a")).send().unwrap().json().unwrap();
    let cursor = sub["cursor"].as_str().unwrap().to_owned();
    nodes.source.psql("app", &format!("INSERT INTO items VALUES ({next}, 0), ({}, 0)", next + 1)).unwrap();
    let body = http
        .get(format!(
            "http://{api}/v1/streams/a/changes?cursor={cursor}&tables=public.items&live=true&timeout_ms=10000"
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let events: Vec<serde_json::Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<i64> = events.iter().filter_map(|e| e["data"]["after"]["id"].as_i64()).collect();
    assert_eq!(got, [next, next + 1], "{body}");

    // A live SSE client must not hold up a graceful shutdown: SIGTERM ends its stream.
    let sse_url = format!("http://{api}/v1/streams/a/changes?live=true&cursor={cursor}");
    let sse = std::thread::spawn(move || {
        use std::io::Read;
        let mut resp = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .unwrap()
            .get(sse_url)
            .header("accept", "text/event-stream")
            .send()
            .unwrap();
        let mut all = String::new();
        let _ = resp.read_to_string(&mut all);
        all
    });
    std::thread::sleep(Duration::from_millis(500));
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "synapse did not exit on SIGTERM with a live SSE client attached");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let streamed = sse.join().unwrap();
    assert!(streamed.contains("event: change"), "{streamed}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
}
