//! Operations endpoints: Prometheus `/metrics`, `/livez` (the process serves requests) and
//! `/readyz` (every pipeline component is streaming; 503 with the reasons otherwise).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ComponentState {
    Starting,
    Copying,
    Streaming,
    Retrying { code: String, error: String },
    Failed { code: String, error: String, hint: String },
    Stopped,
}

/// Each pipeline component's state, for /readyz and the CLI.
#[derive(Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, ComponentState>>,
}

impl Health {
    pub fn set(&self, component: &str, state: ComponentState) {
        if let Ok(mut c) = self.components.lock() {
            c.insert(component.to_owned(), state);
        }
    }

    /// Drops the entries of a source's components (it moved to another process).
    pub fn forget_source(&self, source: &str) {
        if let Ok(mut c) = self.components.lock() {
            let apply = format!("apply/{source}->");
            c.retain(|k, _| {
                k != &format!("capture/{source}") && k != &format!("kafka-topics/{source}") && !k.starts_with(&apply)
            });
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, ComponentState> {
        self.components.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn ready(&self) -> bool {
        let s = self.snapshot();
        !s.is_empty() && s.values().all(|v| *v == ComponentState::Streaming)
    }
}

/// Installs the process-wide Prometheus recorder (once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, in which case ours stays unused.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

pub async fn serve(listen: &str, health: Arc<Health>) -> anyhow::Result<()> {
    serve_with(listen, health, Router::new()).await
}

/// The ops endpoints plus `extra` routes (the admin API of `synapse run`).
pub async fn serve_with(listen: &str, health: Arc<Health>, extra: Router) -> anyhow::Result<()> {
    let handle = metrics_handle();
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health)
        .merge(extra);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("ops.listen: cannot listen on {listen}: {e}{}", in_use_hint(&e, "ops.listen")))?;
    tracing::info!(%listen, "serving /metrics /livez /readyz");
    axum::serve(listener, app).await?;
    Ok(())
}

/// The fix for an address another process holds (two synapse processes, or a second quickstart,
/// on one machine): `field` is the setting that chooses it.
pub fn in_use_hint(e: &std::io::Error, field: &str) -> String {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        format!("\n  hint: another process listens there; set {field} to a free address (e.g. 127.0.0.1:0 for any port), or to \"\" to turn it off")
    } else {
        String::new()
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    let mut body = String::new();
    for (name, state) in health.snapshot() {
        body.push_str(&format!("{name}: {state:?}\n"));
    }
    if health.ready() {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
