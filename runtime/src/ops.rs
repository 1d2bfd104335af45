//! Operations endpoints: Prometheus `/metrics`, `/livez` (the process serves requests) and
//! `/readyz` (every pipeline component is streaming, copying or re-syncing; `?strict`: every one
//! streaming; 503 with the reasons otherwise).

use axum::extract::{Query, State};
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
    /// Making the targets whole again after a gap its source crossed (`on_gap: resync`).
    Resyncing,
    Streaming,
    Retrying {
        code: String,
        error: String,
    },
    /// Stopped by a definite error: only this component waits (the rest keep running) and it
    /// is tried again every [`Supervision::park_retry`], or at once on SIGHUP.
    Parked {
        code: String,
        error: String,
        hint: String,
    },
    Stopped,
}

impl ComponentState {
    /// The label of `synapse_component_state{state}`.
    pub fn name(&self) -> &'static str {
        match self {
            ComponentState::Starting => "starting",
            ComponentState::Copying => "copying",
            ComponentState::Resyncing => "resyncing",
            ComponentState::Streaming => "streaming",
            ComponentState::Retrying { .. } => "retrying",
            ComponentState::Parked { .. } => "parked",
            ComponentState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for ComponentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ComponentState::Retrying { code, error } => write!(f, "retrying [{code}] {error}"),
            ComponentState::Parked { code, error, hint } => write!(f, "parked [{code}] {error} — fix: {hint}"),
            other => f.write_str(other.name()),
        }
    }
}

/// What the supervisor does with a component that fails definitely.
#[derive(Clone, Debug)]
pub struct Supervision {
    /// How long a parked component waits before it is tried again: an operator's fix (a grant,
    /// a password, a created table) is picked up without a restart.
    pub park_retry: std::time::Duration,
    /// Exit the process when a component parks, instead of keeping the rest running (for
    /// orchestrators that restart failed processes and alert on it).
    pub exit_on_park: bool,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision { park_retry: std::time::Duration::from_secs(60), exit_on_park: false }
    }
}

/// Each pipeline component's state, for /readyz, the metrics and the CLI, and the supervision
/// policy every component follows.
#[derive(Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, ComponentState>>,
    /// Warnings about a component that is still working (a slot over its lag limit).
    notes: Mutex<BTreeMap<String, String>>,
    pub supervision: Supervision,
    /// Wakes every parked component for an immediate retry (SIGHUP).
    pub resume: tokio::sync::Notify,
    /// Sources whose gap an operator accepted (`synapse resume --accept-gap`): their capture
    /// crosses it at its next try, once.
    accepted_gaps: Mutex<std::collections::BTreeSet<String>>,
    /// Sources whose capture parked on a gap (CAP011) and has not streamed since. Kept apart
    /// from the state: between two tries of a parked capture its state is `starting`, and an
    /// operator accepting the gap then must not be told there is none.
    open_gaps: Mutex<std::collections::BTreeSet<String>>,
    /// Counts resume requests (SIGHUP, the admin API): a component that parks after one arrived
    /// during its try retries at once instead of missing the wake-up.
    resumes: std::sync::atomic::AtomicU64,
}

/// The code of a capture parked on a gap in its source's WAL.
pub const GAP_CODE: &str = "CAP011";

impl Health {
    pub fn new(supervision: Supervision) -> Self {
        Health { supervision, ..Health::default() }
    }

    /// Sets or clears the warning shown next to `component`'s state in `/readyz`.
    pub fn note(&self, component: &str, note: Option<String>) {
        if let Ok(mut n) = self.notes.lock() {
            match note {
                Some(text) => n.insert(component.to_owned(), text),
                None => n.remove(component),
            };
        }
    }

    /// Tries every parked component again now; one that is trying at this moment and then
    /// parks tries once more at once.
    pub fn resume_parked(&self) {
        self.resumes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.resume.notify_waiters();
    }

    /// How many resume requests were made so far (see [`Health::resume_parked`]).
    pub fn resume_requests(&self) -> u64 {
        self.resumes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether source `name`'s capture parked on a gap and has not streamed since (it may be
    /// between two tries).
    pub fn gap_open(&self, name: &str) -> bool {
        self.open_gaps.lock().is_ok_and(|g| g.contains(name))
    }

    /// Lets source `name`'s capture cross its gap at the next try (see [`Health::gap_accepted`]).
    pub fn accept_gap(&self, name: &str) {
        if let Ok(mut g) = self.accepted_gaps.lock() {
            g.insert(name.to_owned());
        }
    }

    /// Whether an operator accepted source `name`'s gap and it is not crossed yet.
    pub fn gap_accepted(&self, name: &str) -> bool {
        self.accepted_gaps.lock().is_ok_and(|g| g.contains(name))
    }

    /// Source `name` crossed its accepted gap.
    pub fn gap_crossed(&self, name: &str) {
        if let Ok(mut g) = self.accepted_gaps.lock() {
            g.remove(name);
        }
    }

    /// The parked components with their state.
    pub fn parked(&self) -> Vec<(String, ComponentState)> {
        self.snapshot().into_iter().filter(|(_, s)| matches!(s, ComponentState::Parked { .. })).collect()
    }

    pub fn set(&self, component: &str, state: ComponentState) {
        if let (Some(source), Ok(mut gaps)) = (component.strip_prefix("capture/"), self.open_gaps.lock()) {
            match &state {
                ComponentState::Parked { code, .. } if code == GAP_CODE => {
                    gaps.insert(source.to_owned());
                }
                ComponentState::Streaming | ComponentState::Stopped => {
                    gaps.remove(source);
                }
                _ => {}
            }
        }
        if let Ok(mut c) = self.components.lock() {
            let before = c.insert(component.to_owned(), state.clone());
            // One series per component, at 1 for its current state.
            if let Some(b) = before.filter(|b| b.name() != state.name()) {
                metrics::gauge!("synapse_component_state", "component" => component.to_owned(), "state" => b.name())
                    .set(0.0);
            }
            metrics::gauge!("synapse_component_state", "component" => component.to_owned(), "state" => state.name())
                .set(1.0);
        }
    }

    /// Drops the entries of a source's components (it moved to another process).
    pub fn forget_source(&self, source: &str) {
        let apply = format!("apply/{source}->");
        let own = [format!("capture/{source}"), format!("kafka-topics/{source}"), format!("resync/{source}")];
        self.forget_where(|k| own.iter().any(|o| o == k) || k.starts_with(&apply));
    }

    /// Drops one component's entry (a task that is done, e.g. a finished re-sync).
    pub fn forget(&self, component: &str) {
        self.forget_where(|k| k == component);
    }

    fn forget_where(&self, gone: impl Fn(&str) -> bool) {
        if let Ok(mut c) = self.components.lock() {
            c.retain(|k, state| {
                let keep = !gone(k);
                if !keep {
                    metrics::gauge!("synapse_component_state", "component" => k.clone(), "state" => state.name())
                        .set(0.0);
                }
                keep
            });
        }
    }

    /// One component's state, if it has one.
    pub fn state(&self, component: &str) -> Option<ComponentState> {
        self.components.lock().ok().and_then(|c| c.get(component).cloned())
    }

    pub fn snapshot(&self) -> BTreeMap<String, ComponentState> {
        self.components.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Every component streaming: copies done, nothing parked (`/readyz?strict`).
    pub fn ready(&self) -> bool {
        let s = self.snapshot();
        !s.is_empty() && s.values().all(|v| *v == ComponentState::Streaming)
    }

    /// Every component working — streaming, or copying and re-syncing on the way there
    /// (`/readyz`): a long initial copy does not take the process (and the stream API it
    /// serves) out of a load balancer; starting, retrying or parked components do.
    pub fn serving(&self) -> bool {
        let s = self.snapshot();
        !s.is_empty()
            && s.values()
                .all(|v| matches!(v, ComponentState::Streaming | ComponentState::Copying | ComponentState::Resyncing))
    }
}

/// Installs the process-wide Prometheus recorder (once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Buckets, not summaries: histograms aggregate across processes.
            let builder = PrometheusBuilder::new()
                .set_buckets(crate::metric_catalog::SECONDS_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, in which case ours stays unused.
            if metrics::set_global_recorder(recorder).is_ok() {
                crate::metric_catalog::describe_all();
            }
            handle
        })
        .clone()
}

/// Serves `/metrics`, `/livez` and `/readyz` — nothing that changes anything: actions live on
/// the API, behind tokens.
pub async fn serve(listen: &str, health: Arc<Health>, tls: Option<Arc<rustls::ServerConfig>>) -> anyhow::Result<()> {
    let handle = metrics_handle();
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    let listener = crate::listener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("ops.listen: cannot listen on {listen}: {e}{}", in_use_hint(&e, "ops.listen")))?;
    tracing::info!(%listen, "serving /metrics /livez /readyz");
    // Served until the process ends.
    let (_forever, running) = tokio::sync::watch::channel(false);
    let limits = crate::listener::Limits { tls, ..Default::default() };
    crate::listener::serve("ops", listener, app, limits, running).await?;
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

#[derive(serde::Deserialize)]
struct ReadyQuery {
    /// Present (`/readyz?strict`): ready only when every component streams.
    strict: Option<String>,
}

async fn readyz(State(health): State<Arc<Health>>, Query(q): Query<ReadyQuery>) -> (StatusCode, String) {
    let mut body = String::new();
    let notes = health.notes.lock().map(|n| n.clone()).unwrap_or_default();
    for (name, state) in health.snapshot() {
        match notes.get(&name) {
            Some(note) => body.push_str(&format!("{name}: {state} (warning: {note})\n")),
            None => body.push_str(&format!("{name}: {state}\n")),
        }
    }
    let ok = if q.strict.is_some() { health.ready() } else { health.serving() };
    if ok {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
