//! Where a dispatcher sends requests. [`Sink`] is the seam the compliance harness drives;
//! [`HttpSink`] is the webhook implementation.

use super::signing::{signature_header, Secret};
use crate::Event;
use std::future::Future;
use std::time::{Duration, Instant};

/// One request: the events in log order and the id the receiver de-duplicates on.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// `webhook-id`: the event's id for a single event, `<first id>..<last index>` for a
    /// batch. The same request always carries the same id, across retries and restarts.
    pub id: String,
    pub events: Vec<Event>,
}

/// What the receiver answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the receiver has the events.
    Delivered,
    /// Failed; retry later, not before `retry_after` if the receiver said so.
    Retry { retry_after: Option<Duration> },
    /// 410 Gone: the receiver asks never to be called again; the endpoint is disabled.
    Disable,
}

/// One attempt's result, for the dispatcher and the attempts API.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub latency: Duration,
    pub error: Option<String>,
}

/// Sends one delivery. Implementations do not retry: the dispatcher owns retries, ordering
/// and acknowledgement, so every sink gets the same guarantees.
pub trait Sink: Send + Sync + 'static {
    fn send(&self, delivery: &Delivery) -> impl Future<Output = Attempt> + Send;
}

/// POSTs CloudEvents (structured mode; a JSON array for batches) signed per Standard Webhooks.
pub struct HttpSink {
    client: reqwest::Client,
    url: reqwest::Url,
    secrets: Vec<Secret>,
    headers: Vec<(String, String)>,
}

impl HttpSink {
    pub fn new(
        url: reqwest::Url,
        secrets: Vec<Secret>,
        timeout: Duration,
        headers: Vec<(String, String)>,
        egress: &std::sync::Arc<super::egress::EgressPolicy>,
    ) -> Result<Self, String> {
        egress.check_url(&url)?;
        let client = egress
            .client_builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // Redirects are failures under Standard Webhooks; do not follow them silently.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("SynapseDB-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(HttpSink { client, url, secrets, headers })
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate(v)?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form servers must send.
fn httpdate(s: &str) -> Option<std::time::SystemTime> {
    let p: Vec<&str> = s.split_whitespace().collect();
    if p.len() != 6 || p[5] != "GMT" {
        return None;
    }
    let day: i64 = p[1].parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| *m == p[2])? as i64
        + 1;
    let year: i64 = p[3].parse().ok()?;
    let hms: Vec<i64> = p[4].split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if hms.len() != 3 {
        return None;
    }
    // days_from_civil (Howard Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2];
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// W3C trace context: the trace id is derived from the webhook-id, so every attempt of one
/// delivery shares a trace a receiver can correlate; each attempt gets its own span id (the
/// span synapse exports for the attempt, `synapse_schemas::trace`).
fn traceparent(webhook_id: &str, span: u64) -> String {
    let trace = synapse_schemas::trace::delivery_trace(webhook_id);
    format!("00-{trace}-{span:016x}-01")
}

/// The attempt's span: the delivery's trace, the span id its `traceparent` named, links to the
/// traces of the transactions it carries.
fn trace_attempt(d: &Delivery, span: u64, start: std::time::SystemTime, attempt: &Attempt) {
    use synapse_schemas::trace::{self, KeyValue, Recorded, SpanId, SpanKind};
    let mut links: Vec<trace::TraceId> = d
        .events
        .iter()
        .filter_map(|e| e.id.split_once('/').map(|(node, _)| trace::transaction_trace(node, e.cursor.commit_lsn)))
        .collect();
    links.dedup();
    let mut attributes = vec![
        KeyValue::new("webhook.id", d.id.clone()),
        KeyValue::new("webhook.events", d.events.len() as i64),
        KeyValue::new("webhook.outcome", format!("{:?}", attempt.outcome)),
    ];
    if let Some(status) = attempt.status {
        attributes.push(KeyValue::new("http.response.status_code", i64::from(status)));
    }
    trace::record(Recorded {
        name: "webhook.delivery",
        trace: trace::delivery_trace(&d.id),
        span: Some(SpanId::from_bytes(span.to_be_bytes())),
        parent: None,
        kind: SpanKind::Client,
        start,
        end: std::time::SystemTime::now(),
        attributes,
        links: &links,
        error: attempt.error.clone(),
    });
}

impl Sink for HttpSink {
    async fn send(&self, d: &Delivery) -> Attempt {
        let started = Instant::now();
        let (span, wall) = (rand::random::<u64>() | 1, std::time::SystemTime::now());
        let (body, content_type) = match d.events.as_slice() {
            [one] => (one.body.to_vec(), "application/cloudevents+json"),
            many => {
                let mut b = Vec::with_capacity(many.iter().map(|e| e.body.len() + 1).sum::<usize>() + 2);
                b.push(b'[');
                for (i, e) in many.iter().enumerate() {
                    if i > 0 {
                        b.push(b',');
                    }
                    b.extend_from_slice(&e.body);
                }
                b.push(b']');
                (b, "application/cloudevents-batch+json")
            }
        };
        let ts = synapse_schemas::unix_micros_now() / 1_000_000;
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature_header(&self.secrets, &d.id, ts, &body))
            .header("traceparent", traceparent(&d.id, span));
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let attempt = match req.body(body).send().await {
            Ok(resp) => {
                let status = resp.status();
                let after = retry_after(resp.headers());
                drain(resp).await;
                let outcome = if status.is_success() {
                    Outcome::Delivered
                } else if status == reqwest::StatusCode::GONE {
                    Outcome::Disable
                } else {
                    Outcome::Retry { retry_after: after }
                };
                let error = (!status.is_success()).then(|| format!("HTTP {status}"));
                Attempt { outcome, status: Some(status.as_u16()), latency: started.elapsed(), error }
            }
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                Attempt {
                    outcome: Outcome::Retry { retry_after: None },
                    status: None,
                    latency: started.elapsed(),
                    // Without the URL: it may carry credentials or a token in its query, and
                    // this text reaches logs, dead letters and the attempts API.
                    error: Some(format!("{what}: {}", synapse_error::chain(&e.without_url()))),
                }
            }
        };
        if synapse_schemas::trace::enabled() {
            trace_attempt(d, span, wall, &attempt);
        }
        attempt
    }
}

/// Most of a receiver's answer read (and dropped) so its connection can be reused; a longer
/// answer ends the connection instead of filling memory.
const MAX_DRAIN: usize = 64 << 10;

async fn drain(mut resp: reqwest::Response) {
    let mut read = 0usize;
    while let Ok(Some(chunk)) = resp.chunk().await {
        read += chunk.len();
        if read > MAX_DRAIN {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_stable_per_delivery() {
        let (a, b) = (traceparent("a/0/1/1", 7), traceparent("a/0/1/1", 9));
        assert_eq!(a.len(), 55);
        assert_eq!(a[..36], b[..36], "same trace for every attempt");
        assert_ne!(a[36..], b[36..], "a span per attempt");
        assert_ne!(traceparent("a/0/1/2", 7)[..36], a[..36]);
        assert!(a.starts_with("00-") && a.ends_with("-01"));
    }

    #[test]
    fn http_dates() {
        let t = httpdate("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 784_111_777);
        assert!(httpdate("yesterday").is_none());
    }
}
