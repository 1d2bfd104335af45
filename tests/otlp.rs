//! Traces over OTLP/HTTP and logs as JSON: `synapse run` from a real PostgreSQL source into a
//! real target and a webhook endpoint, with `OTEL_EXPORTER_OTLP_ENDPOINT` naming a collector
//! stand-in (an HTTP server here that decodes the protobuf export requests with the
//! OpenTelemetry protocol's own types) and `SYNAPSE_LOG_FORMAT=json`. One source transaction
//! gives a `capture` span and an `apply` span (its child) in one trace named by the
//! transaction; the webhook's `webhook.delivery` span carries the trace and span id of the
//! `traceparent` the receiver got, and links to the transaction's trace. Every log line is a
//! JSON object.
#![allow(clippy::unwrap_used)]

mod common;

use common::{request, wait_ready, Nodes, ADMIN_TOKEN};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests received: path, head, body.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A minimal HTTP/1.1 server: each request's path, headers and body are kept; it answers `ok`.
fn server(ok: &'static [u8]) -> (u16, Received) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || loop {
                // One request: the head, then Content-Length bytes of body.
                let mut data = Vec::new();
                let mut buf = [0u8; 65536];
                let (head, length) = loop {
                    let Ok(n) = conn.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buf[..n]);
                    if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&data[..end]).to_string();
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0usize);
                        data.drain(..end + 4);
                        break (head, length);
                    }
                };
                while data.len() < length {
                    let Ok(n) = conn.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buf[..n]);
                }
                let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                keep.lock().unwrap().push((path, head, data[..length].to_vec()));
                if conn.write_all(ok).is_err() {
                    return;
                }
            });
        }
    });
    (port, got)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_transaction_is_one_trace_from_capture_to_apply_and_delivery() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let (collector, exports) =
        server(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n");
    let (receiver, deliveries) = server(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
    let listen = common::Listeners::new();
    let config = nodes.config_with(&listen.yaml(""));
    let (ops, api) = (listen.ops.clone(), listen.api.clone());
    let log = config.with_file_name("synapse.log");
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let child = common::synapse(&["run", "--config", config.to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{collector}"))
        .env("OTEL_SERVICE_NAME", "synapse-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("SYNAPSE_LOG_FORMAT", "json")
        .stderr(out)
        .spawn()
        .unwrap();
    let _child = common::Synapse::guard(child);
    wait_ready(&ops, &log, 120);
    let hook = format!(r#"{{"name": "traced", "url": "http://127.0.0.1:{receiver}/hook", "tables": ["public.t"]}}"#);
    let (status, body) = request(&api, "POST", "/v1/endpoints", &hook, Some(ADMIN_TOKEN));
    assert_eq!(status, 201, "{body}");

    let lsn = nodes.source.psql("app", "INSERT INTO t VALUES (1, 'traced') RETURNING pg_current_wal_lsn()").unwrap();
    println!("inserted before {lsn}");
    // Wait for the three spans of the transaction, and the delivery's header.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (capture, apply, delivery, traceparent) = loop {
        let spans: Vec<(String, Span)> = exports
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _, _)| path == "/v1/traces")
            .flat_map(|(_, _, body)| {
                let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                req.resource_spans
                    .into_iter()
                    .flat_map(|rs| {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|a| a.key == "service.name")
                            .map(|a| format!("{:?}", a.value))
                            .unwrap_or_default();
                        rs.scope_spans
                            .into_iter()
                            .flat_map(|s| s.spans)
                            .map(move |s| (service.clone(), s))
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let find = |name: &str| spans.iter().find(|(_, s)| s.name == name).cloned();
        let header = deliveries.lock().unwrap().iter().find_map(|(_, head, _)| {
            head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("traceparent:").map(|v| v.trim().to_owned()))
        });
        if let (Some(c), Some(a), Some(d), Some(h)) = (find("capture"), find("apply"), find("webhook.delivery"), header)
        {
            break (c, a, d, h);
        }
        assert!(
            Instant::now() < deadline,
            "spans seen: {:?}\n{}",
            spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>(),
            common::log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (service, capture) = capture;
    assert!(service.contains("synapse-test"), "{service}");
    let (_, apply) = apply;
    let (_, delivery) = delivery;
    println!(
        "capture {} {} / apply {} parent {}",
        hex(&capture.trace_id),
        hex(&capture.span_id),
        hex(&apply.trace_id),
        hex(&apply.parent_span_id)
    );
    assert_eq!(apply.trace_id, capture.trace_id, "capture and apply of one transaction share its trace");
    assert_eq!(apply.parent_span_id, capture.span_id, "the apply is the capture's child");
    // The capture span ends when the capture hears its batch is durable; the log makes it
    // readable in the same moment, so an applier on the other core may read, apply and commit
    // it before the capture's thread takes its timestamp (seen under load). What holds: the
    // apply starts after the source's commit and ends after it starts.
    assert!(
        capture.start_time_unix_nano <= capture.end_time_unix_nano
            && capture.start_time_unix_nano <= apply.start_time_unix_nano
            && apply.start_time_unix_nano <= apply.end_time_unix_nano,
        "capture {}..{}, apply {}..{}",
        capture.start_time_unix_nano,
        capture.end_time_unix_nano,
        apply.start_time_unix_nano,
        apply.end_time_unix_nano
    );
    let attr = |s: &Span, key: &str| {
        s.attributes.iter().find(|a| a.key == key).map(|a| format!("{:?}", a.value)).unwrap_or_default()
    };
    assert!(attr(&apply, "synapse.target").contains('b'), "{:?}", apply.attributes);
    // The delivery: the traceparent's trace and span ids, a link to the transaction's trace.
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts[1], hex(&delivery.trace_id), "traceparent {traceparent}");
    assert_eq!(parts[2], hex(&delivery.span_id), "traceparent {traceparent}");
    assert!(
        delivery.links.iter().any(|l| l.trace_id == capture.trace_id),
        "the delivery links its transaction: {:?}",
        delivery.links
    );

    // Logs are JSON objects, one per line.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3, "{text}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
}
