//! The API under hostile clients, through the real binary: 2,000 connections that send
//! nothing, slowloris clients that send a header byte at a time, more connections than
//! `api.max_connections`, more live streams than `api.max_streams`. Synapse keeps serving
//! everyone else, closes what stalls within `api.header_timeout_secs`, refuses what is over
//! a cap with a clear 503, and its memory stays bounded.
#![allow(clippy::unwrap_used)]

mod common;

use common::{request, spawn_run, Nodes};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A plain request must be answered, and quickly, whatever else holds connections.
fn served_quickly(api: &str) {
    let started = Instant::now();
    let (status, body) = request(api, "GET", "/v1/streams", "", None);
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "served in {:?}", started.elapsed());
}

#[test]
fn idle_and_slowloris_clients_do_not_starve_the_api() {
    let nodes = Nodes::start(common::ITEMS_SCHEMA);
    let config = nodes.config("");
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let ops = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "api:\n  listen: \"\"",
            &format!("api:\n  listen: \"{api}\"\n  header_timeout_secs: 8\n  max_connections: 2100\n  max_streams: 3"),
        )
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\""));
    std::fs::write(&config, text).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let child = spawn_run(&config, &log);
    common::wait_ready(&ops, &log, 60);
    served_quickly(&api);
    let before = rss_kib(child.id());

    // 2,000 connections that never send a byte, and 50 that send their header a byte at a time.
    let opening = Instant::now();
    let idle: Vec<TcpStream> = (0..2000).map(|_| TcpStream::connect(&api).unwrap()).collect();
    assert!(opening.elapsed() < Duration::from_secs(5), "2,000 connects took {:?}", opening.elapsed());
    let mut slow: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(&api).unwrap()).collect();
    for s in &mut slow {
        s.write_all(b"GET /v1/streams HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    }
    let dripping = Arc::new(AtomicBool::new(true));
    let drip = {
        let dripping = dripping.clone();
        let mut slow: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            while dripping.load(Ordering::Relaxed) {
                for s in &mut slow {
                    let _ = s.write_all(b"x");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        served_quickly(&api);
    }
    let during = rss_kib(child.id());
    eprintln!("RSS: {before} KiB before, {during} KiB with 2,050 stalled connections open");
    assert!(during < before + 100 * 1024, "memory grew by {} KiB", during - before);

    // Past api.max_connections: refused at once with a clear 503, never queued.
    let mut over: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(&api).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut refused = 0;
    for s in &mut over {
        s.set_nonblocking(true).unwrap();
        let mut text = vec![0u8; 1024];
        if let Ok(n) = s.read(&mut text) {
            let text = String::from_utf8_lossy(&text[..n]);
            if text.starts_with("HTTP/1.1 503") {
                assert!(text.contains("SYN003") && text.contains("api.max_connections"), "{text}");
                refused += 1;
            }
        }
    }
    assert!(refused >= 10, "only {refused} of 60 connections over the cap were refused");
    drop(over);

    // Within the header timeout (8 s) every stalled connection is closed by synapse.
    std::thread::sleep(Duration::from_secs(10));
    dripping.store(false, Ordering::Relaxed);
    drip.join().unwrap();
    let mut still_open = 0;
    for mut s in idle.into_iter().chain(slow) {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(_) => {}                                                     // closed (0) or a 408
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {} // closed
            Err(_) => still_open += 1,                                      // would block: open
        }
    }
    assert_eq!(still_open, 0, "stalled connections synapse kept open past the header timeout");
    served_quickly(&api);

    // Past api.max_streams (3): a fourth live stream is refused with CON012; a slot frees
    // when a stream ends.
    let live = |api: &str| {
        let mut s = TcpStream::connect(api).unwrap();
        write!(
            s,
            "GET /v1/streams/a/changes?live=true HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 256];
        let n = s.read(&mut head).unwrap();
        (s, String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let streams: Vec<TcpStream> = (0..3)
        .map(|_| {
            let (s, head) = live(&api);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s
        })
        .collect();
    let (status, body) = request(&api, "GET", "/v1/streams/a/changes?live=true&timeout_ms=100", "", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("CON012") && body.contains("api.max_streams"), "{body}");
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = request(&api, "GET", "/v1/streams/a/changes?live=true&timeout_ms=100", "", None);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no stream slot freed after the streams closed: {status} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(child);
}
