//! A webhook receiver that checks what synapse sends: each request's Standard Webhooks
//! signature is verified with [`Secret`] and the events it carries are counted. The quickstart
//! runs one to show deliveries end to end; it is also the smallest correct receiver to copy.

use super::signing::Secret;
use axum::http::{HeaderMap, StatusCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a [`VerifyingReceiver`] has seen so far.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Events in accepted requests (a batch counts each of its events).
    pub events: AtomicU64,
    /// Requests accepted (signature valid, body a JSON event or array of events).
    pub requests: AtomicU64,
    /// Requests refused with 401: a signature that does not verify.
    pub bad_signatures: AtomicU64,
}

impl ReceiverStats {
    /// `(events, requests, bad_signatures)` now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (get(&self.events), get(&self.requests), get(&self.bad_signatures))
    }
}

/// A receiver listening on a loopback port until the runtime stops.
pub struct VerifyingReceiver {
    /// The URL to configure as the endpoint (`http://127.0.0.1:<port>/hooks`).
    pub url: String,
    /// Counts, updated as requests arrive.
    pub stats: Arc<ReceiverStats>,
}

impl VerifyingReceiver {
    /// Binds a free loopback port and serves `POST /hooks`: 204 for a verified request, 401
    /// for a bad signature, 400 for a body that is not JSON.
    pub async fn start(secret: Secret) -> std::io::Result<Self> {
        let stats = Arc::new(ReceiverStats::default());
        let s = stats.clone();
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (s, secret) = (s.clone(), secret.clone());
                async move {
                    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                    let ts = h("webhook-timestamp").parse::<i64>().unwrap_or(0);
                    if !secret.verify(&h("webhook-id"), ts, &body, &h("webhook-signature")) {
                        s.bad_signatures.fetch_add(1, Ordering::Relaxed);
                        return StatusCode::UNAUTHORIZED;
                    }
                    let n = match serde_json::from_slice::<serde_json::Value>(&body) {
                        Ok(serde_json::Value::Array(a)) => a.len() as u64,
                        Ok(_) => 1,
                        Err(_) => return StatusCode::BAD_REQUEST,
                    };
                    s.requests.fetch_add(1, Ordering::Relaxed);
                    s.events.fetch_add(n, Ordering::Relaxed);
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, stats })
    }
}
