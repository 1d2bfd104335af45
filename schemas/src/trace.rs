//! Trace spans of a source transaction, exported over OpenTelemetry when the process has an
//! exporter (`synapse run` with `OTEL_EXPORTER_OTLP_ENDPOINT` set): the capture of the
//! transaction (source commit → durable in the log), its apply on each target (read from the
//! log → committed on the target, a child of the capture) and each webhook delivery attempt.
//!
//! No trace context travels through the log (its records' layout is fixed): every stage
//! derives the same ids from the transaction — the trace id from the source node and commit
//! position, the capture's span id from them too — so the spans of one transaction join one
//! trace wherever they are recorded. A webhook attempt's span carries the trace and span id
//! of the `traceparent` header sent with it, so a receiver's own spans continue that trace, and
//! links to the traces of the transactions it delivers.
//!
//! Spans are made with their real start and end times after the fact (the stages' hot paths
//! only call [`enabled`] — one relaxed load — when nothing exports).

use crate::Lsn;
use opentelemetry::trace::{Link, Span, SpanBuilder, SpanContext, TraceContextExt, TraceFlags, TraceState, Tracer};
pub use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::Context;
pub use opentelemetry::KeyValue;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Called once an exporter is installed (`opentelemetry::global::set_tracer_provider`).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans are recorded at all.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The trace of `node`'s transaction committed at `commit_lsn`.
pub fn transaction_trace(node: &str, commit_lsn: Lsn) -> TraceId {
    let d = digest(&[b"transaction", node.as_bytes(), &commit_lsn.0.to_be_bytes()]);
    TraceId::from_bytes(d[..16].try_into().unwrap_or([1; 16]))
}

/// The span of that transaction's capture (the parent of its applies).
pub fn capture_span(node: &str, commit_lsn: Lsn) -> SpanId {
    let d = digest(&[b"capture", node.as_bytes(), &commit_lsn.0.to_be_bytes()]);
    SpanId::from_bytes(d[..8].try_into().unwrap_or([1; 8]))
}

/// The trace of a webhook delivery (every attempt of one `webhook-id` shares it), as its
/// `traceparent` header names it.
pub fn delivery_trace(webhook_id: &str) -> TraceId {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(webhook_id.as_bytes());
    TraceId::from_bytes(d[..16].try_into().unwrap_or([1; 16]))
}

/// One finished span.
pub struct Recorded<'a> {
    pub name: &'static str,
    pub trace: TraceId,
    /// `None`: a new span id.
    pub span: Option<SpanId>,
    /// The parent span in the same trace (`None`: a root).
    pub parent: Option<SpanId>,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Other traces this span belongs to (a delivery's transactions).
    pub links: &'a [TraceId],
    /// An error message: the span's status is set to error with it.
    pub error: Option<String>,
}

thread_local! {
    /// The ids the next span built on this thread takes (the SDK's id generator asks
    /// [`next_trace_id`] and [`next_span_id`]; the API has no other way to fix them).
    static NEXT: Cell<(Option<TraceId>, Option<SpanId>)> = const { Cell::new((None, None)) };
}

/// For the SDK's id generator: the trace id [`record`] fixed for the span being built.
pub fn next_trace_id() -> Option<TraceId> {
    NEXT.with(|n| {
        let (t, s) = n.get();
        n.set((None, s));
        t
    })
}

/// For the SDK's id generator: the span id [`record`] fixed for the span being built.
pub fn next_span_id() -> Option<SpanId> {
    NEXT.with(|n| {
        let (t, s) = n.get();
        n.set((t, None));
        s
    })
}

/// Exports `r` (nothing when no exporter is installed).
pub fn record(r: Recorded<'_>) {
    if !enabled() {
        return;
    }
    let tracer = opentelemetry::global::tracer("synapsedb");
    let remote = |trace, span| SpanContext::new(trace, span, TraceFlags::SAMPLED, true, TraceState::default());
    // A child takes its trace from the parent; a root's comes from the id generator.
    let parent = match r.parent {
        Some(p) => Context::new().with_remote_span_context(remote(r.trace, p)),
        None => Context::new(),
    };
    let builder = SpanBuilder::from_name(r.name)
        .with_kind(r.kind)
        .with_start_time(r.start)
        .with_attributes(r.attributes)
        .with_links(
            r.links
                .iter()
                .map(|t| Link::with_context(remote(*t, SpanId::from_bytes([0, 0, 0, 0, 0, 0, 0, 1]))))
                .collect(),
        );
    NEXT.with(|n| n.set((r.parent.is_none().then_some(r.trace), r.span)));
    let mut span = tracer.build_with_context(builder, &parent);
    NEXT.with(|n| n.set((None, None)));
    if let Some(e) = r.error {
        span.set_status(opentelemetry::trace::Status::error(e));
    }
    span.end_with_timestamp(r.end);
}

/// Microseconds since the Unix epoch as a time.
pub fn at_micros(us: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(us.max(0) as u64)
}
