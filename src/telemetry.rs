//! Logs and traces of the process. Logs go to stderr as text (JSON lines with
//! `SYNAPSE_LOG_FORMAT=json`, one object per event with its span fields, for log shippers).
//! Traces are exported over OTLP/HTTP (protobuf) when the standard OpenTelemetry environment
//! names a collector — `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*` are honoured as the SDK reads
//! them): a span per source transaction's capture and per target's apply of it, and per
//! webhook delivery attempt (`synapse_schemas::trace`). Without that environment nothing is
//! recorded.

use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Flushes the spans still buffered when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: flushing traces to the OTLP collector failed: {e}");
            }
        }
    }
}

/// Installs the log output (filter: `SYNAPSE_LOG`, else `default`) and, when configured, the
/// trace exporter.
pub fn init(default: &str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNAPSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let json = std::env::var("SYNAPSE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colours only on a terminal: piped into a file or a pager, escape codes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = if json {
        tracing_subscriber::fmt::layer().json().with_current_span(true).with_writer(std::io::stderr).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed()
    };
    tracing_subscriber::registry().with(logs.with_filter(filter)).init();
    let provider = otlp();
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
        synapse_schemas::trace::enable();
        tracing::info!("exporting traces over OTLP/HTTP to the collector the OTEL_EXPORTER_OTLP_* environment names");
    }
    Telemetry { provider }
}

fn otlp() -> Option<SdkTracerProvider> {
    let named = |v: &str| std::env::var(v).is_ok_and(|x| !x.trim().is_empty());
    if !named("OTEL_EXPORTER_OTLP_ENDPOINT") && !named("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return None;
    }
    let exporter =
        match opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(Protocol::HttpBinary).build() {
            Ok(e) => e,
            Err(e) => {
                // The rest of the process runs: traces are an aid, not part of replication.
                tracing::warn!(error = %e, "the OTLP trace exporter could not be made: traces are not exported");
                return None;
            }
        };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "synapsedb".into());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .with_id_generator(TransactionIds::default())
            .build(),
    )
}

/// Random ids, except where `synapse_schemas::trace` fixed them for the span being built (a
/// transaction's trace and capture span, a delivery's `traceparent`).
#[derive(Debug, Default)]
struct TransactionIds(opentelemetry_sdk::trace::RandomIdGenerator);

impl opentelemetry_sdk::trace::IdGenerator for TransactionIds {
    fn new_trace_id(&self) -> opentelemetry::trace::TraceId {
        synapse_schemas::trace::next_trace_id().unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> opentelemetry::trace::SpanId {
        synapse_schemas::trace::next_span_id().unwrap_or_else(|| self.0.new_span_id())
    }
}
