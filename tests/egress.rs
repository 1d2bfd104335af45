//! Webhooks may not reach internal addresses (SSRF) unless the configuration allows them:
//! loopback, link-local (cloud metadata) and a host name resolving to loopback are refused
//! before any connection is made; a redirect is never followed; the allow-list opens exactly
//! its networks. No traffic leaves loopback: the refused addresses are never connected to.
#![allow(clippy::unwrap_used)]

mod common;

use common::{request, spawn_run, Nodes, ADMIN_TOKEN, ITEMS_SCHEMA};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A receiver counting the connections it accepts; `redirect`: answers 307 to the metadata
/// service instead of 200.
fn receiver(rt: &tokio::runtime::Runtime, ip: &str, redirect: bool) -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = rt.block_on(tokio::net::TcpListener::bind((ip, 0))).unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/in",
        axum::routing::post(move || {
            h.fetch_add(1, Ordering::SeqCst);
            async move {
                if redirect {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [("location", "http://169.254.169.254/latest/meta-data/")],
                    )
                        .into_response()
                } else {
                    "ok".into_response()
                }
            }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await });
    (port, hits)
}

use axum::response::IntoResponse;

#[test]
fn internal_endpoints_are_refused_unless_allowed() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let nodes = Nodes::start(ITEMS_SCHEMA);
    // The allowed receivers are on 127.0.0.2 (loopback, allowed by the list below); the one
    // reached by name is on 127.0.0.1, where `localhost` resolves, which the list does not allow.
    let (port, hits) = receiver(&rt, "127.0.0.2", false);
    let (redirect_port, redirect_hits) = receiver(&rt, "127.0.0.2", true);
    let (named_port, named_hits) = receiver(&rt, "127.0.0.1", false);
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    // In the configuration, without an allow-list: refused at start, naming the endpoint.
    let config = nodes.config("");
    let base = std::fs::read_to_string(&config).unwrap();
    let hook = |name: &str, url: &str| format!("  - name: {name}\n    url: {url}\n    secrets: [{secret}]\n");
    std::fs::write(&config, format!("{base}webhooks:\n{}", hook("local", &format!("http://127.0.0.2:{port}/in"))))
        .unwrap();
    let out = common::synapse(&["run", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("webhooks.local.url") && text.contains("egress.allow"), "{text}");

    // Allowed: 127.0.0.2 only. Then, through the API: literal internal addresses refused,
    // a name resolving to loopback refused at delivery, a redirect not followed.
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let ops = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let text = base.replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\"")).replace(
        "api:\n  listen: \"\"",
        &format!("api:\n  listen: \"{api}\"\n  tokens:\n    - {{name: root, token: {ADMIN_TOKEN}, admin: true}}"),
    );
    let hooks = hook("local", &format!("http://127.0.0.2:{port}/in"))
        + &hook("redirected", &format!("http://127.0.0.2:{redirect_port}/in"));
    std::fs::write(&config, format!("{text}webhooks:\n{hooks}egress:\n  allow: [127.0.0.2/32]\n")).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    common::wait_ready(&ops, &log, 60);
    for url in
        ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:9/in", "http://[::1]:9/in", "http://10.0.0.1/in"]
    {
        let body = format!(r#"{{"name": "bad", "url": "{url}"}}"#);
        let (status, text) = request(&api, "POST", "/v1/endpoints", &body, Some(ADMIN_TOKEN));
        assert_eq!(status, 400, "{url}: {text}");
        assert!(text.contains("egress policy") && !text.contains(url.split('/').nth(2).unwrap()), "{url}: {text}");
    }
    let body = format!(
        r#"{{"name": "by-name", "url": "http://localhost:{named_port}/in", "retry_schedule": ["0s", "100ms"]}}"#
    );
    let (status, text) = request(&api, "POST", "/v1/endpoints", &body, Some(ADMIN_TOKEN));
    assert_eq!(status, 201, "a name is checked when resolved: {text}");

    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, letters) = request(&api, "GET", "/v1/endpoints/by-name/dead-letters", "", Some(ADMIN_TOKEN));
        let (_, redirected) = request(&api, "GET", "/v1/endpoints/redirected/attempts", "", Some(ADMIN_TOKEN));
        let (_, by_name) = request(&api, "GET", "/v1/endpoints/by-name", "", Some(ADMIN_TOKEN));
        if letters.contains("egress policy") && redirected.contains("307") && hits.load(Ordering::SeqCst) >= 1 {
            assert!(
                !letters.contains("127.0.0.1") && !letters.contains("::1"),
                "the refusal names no address: {letters}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{letters}\n{redirected}\n{by_name}\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The allowed endpoint got the event; the name resolving to a refused address was never
    // connected to; the redirect was answered but not followed.
    assert_eq!(named_hits.load(Ordering::SeqCst), 0, "a refused address was connected to");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert!(redirect_hits.load(Ordering::SeqCst) >= 1);
}
