//! Wires the stages together for `synapse run` and `synapse quickstart`: per source a capture
//! into its own stream of the configured log (embedded, or Kafka with `log.kafka`); per
//! (target, source) an initial copy and an applier (`start_source`). With `log.kafka.group` the
//! sources are started and stopped as the consumer group assigns them to this process
//! (`source_group`). Holds no processing logic of its own, only supervision: transient errors
//! retry with backoff, a definite error parks only the component it concerns (logged with its
//! code and hint, shown in /readyz and `synapse_component_state`) and the rest keeps running.

use crate::config::{Config, OnGap, ReshardRole, SourceConfig, TargetConfig};
use crate::ops::{ComponentState, Health};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use synapse_apply::{initial_copy, Applier, ApplyConfig, ApplyStats};
use synapse_capture::{Capture, CaptureConfig, CaptureError, CaptureStats};
use synapse_connectors::api::{Api, SnapshotSource, StreamSource};
use synapse_connectors::feed::SourceInfo;
use synapse_connectors::webhook::{store::Store, WebhookSource, Webhooks};
use synapse_error::Classify;
use synapse_log::{ChangeLog, EmbeddedLog, KafkaLog, SourceLog};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

pub use crate::gaps::RESYNC_MARK;
use crate::gaps::{accept_gap, spawn_resync, watch_slot_lag};

/// `error: cause: cause …`
pub use synapse_error::chain;

/// A definite failure of one component.
#[derive(Debug, thiserror::Error)]
#[error("{component} stopped [{code}]: {error}\n  hint: {hint}")]
pub struct ComponentFailed {
    pub component: String,
    pub code: &'static str,
    pub error: String,
    pub hint: &'static str,
}

/// Retries `f` while it fails transiently (exponential backoff, 200 ms … 30 s, with jitter;
/// back to 200 ms after an attempt that ran a minute: a failure after long healthy work is a
/// new incident, not the next of a series). A definite failure parks the component: it waits
/// [`crate::ops::Supervision::park_retry`] (or a SIGHUP) and tries again, while every other
/// component keeps running; `Err` only with `exit_on_park` (docs/decisions/0009-never-silent.md).
pub async fn supervise<T, E: Classify, Fut: Future<Output = Result<T, E>>>(
    component: &str,
    health: &Health,
    shutdown: &watch::Receiver<bool>,
    mut f: impl FnMut() -> Fut,
) -> Result<Option<T>, ComponentFailed> {
    const FIRST: Duration = Duration::from_millis(200);
    let mut delay = FIRST;
    // Each new attempt shows the state the component had when it began (e.g. `streaming` for
    // a long-running stream), not the failure before it: an attempt that works never returns.
    let working = match health.state(component) {
        Some(
            s @ (ComponentState::Starting
            | ComponentState::Copying
            | ComponentState::Resyncing
            | ComponentState::Streaming),
        ) => s,
        _ => ComponentState::Starting,
    };
    loop {
        let started = tokio::time::Instant::now();
        let resumes = health.resume_requests();
        match f().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_transient() => {
                if started.elapsed() >= Duration::from_secs(60) {
                    delay = FIRST;
                }
                let error = chain(&e);
                tracing::warn!(component, code = e.code(), %error, retry_in = ?delay, "transient error, retrying");
                health.set(component, ComponentState::Retrying { code: e.code().into(), error });
                metrics::counter!("synapse_retries_total", "component" => component.to_owned()).increment(1);
                let jitter = Duration::from_millis(rand::random::<u64>() % (delay.as_millis() as u64 / 2 + 1));
                let mut sd = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay + jitter) => {}
                    _ = sd.wait_for(|s| *s) => return Ok(None),
                }
                health.set(component, working.clone());
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                let failed = ComponentFailed {
                    component: component.to_owned(),
                    code: e.code(),
                    error: chain(&e),
                    hint: e.hint(),
                };
                health.set(
                    component,
                    ComponentState::Parked {
                        code: e.code().into(),
                        error: failed.error.clone(),
                        hint: e.hint().into(),
                    },
                );
                metrics::counter!("synapse_parks_total", "component" => component.to_owned(), "code" => e.code())
                    .increment(1);
                let policy = &health.supervision;
                if policy.exit_on_park {
                    tracing::error!(component, code = failed.code, error = %failed.error, hint = failed.hint, "stopped (exit_on_park)");
                    return Err(failed);
                }
                // Only this component waits; an operator's fix is picked up at the next try.
                tracing::error!(
                    component,
                    code = failed.code,
                    error = %failed.error,
                    hint = failed.hint,
                    retry_in = ?policy.park_retry,
                    "parked: the rest keeps running; tried again after retry_in, or at once on SIGHUP"
                );
                let mut sd = shutdown.clone();
                // Registered before the check, so a request between the two is not missed.
                let resumed = health.resume.notified();
                if health.resume_requests() != resumes {
                    // Asked while this try ran (e.g. an accepted gap): try again now.
                    tracing::info!(component, "resumed (asked while it was trying)");
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep(policy.park_retry) => {}
                        _ = resumed => tracing::info!(component, "resumed (SIGHUP or the admin API)"),
                        _ = sd.wait_for(|s| *s) => return Ok(None),
                    }
                }
                health.set(component, working.clone());
                delay = FIRST;
            }
        }
    }
}

/// How often each log drops what every consumer has passed.
const RETENTION_INTERVAL: Duration = Duration::from_secs(30);

/// A source's captured tables, once its capture selected them.
pub(crate) type TablesWatch = watch::Receiver<Option<Vec<synapse_capture::catalog::SourceTable>>>;

/// Live figures of a running pipeline.
pub struct Running {
    pub captures: Vec<(String, Arc<CaptureStats>)>,
    pub appliers: Vec<(String, Arc<ApplyStats>)>,
    pub tasks: JoinSet<Result<(), ComponentFailed>>,
    pub webhooks: Option<Arc<Webhooks<SourceLog>>>,
    /// Where the HTTP API listens, once bound.
    pub api_addr: Option<std::net::SocketAddr>,
    /// The API's tokens, replaceable while it runs (rotation).
    pub auth: Option<Arc<synapse_connectors::auth::Auth>>,
}

fn database_of(s: &SourceConfig) -> String {
    s.url
        .pg_config()
        .ok()
        .and_then(|c| c.get_dbname().or(c.get_user()).map(str::to_owned))
        .unwrap_or_else(|| "postgres".into())
}

/// Opens source `name`'s stream in the configured log: Kafka when `log.kafka` is set (a
/// broker that cannot be reached yet is retried with backoff), else the embedded log in
/// `log.dir`. `None` on shutdown.
async fn open_log(
    config: &Config,
    name: &str,
    health: &Health,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Option<SourceLog>> {
    let Some(kafka) = &config.log.kafka else {
        let log = EmbeddedLog::open(&config.log.dir.join(format!("{name}.redb")), Default::default())
            .map_err(|e| anyhow::anyhow!("log.dir: {} ({})", chain(&e), e.hint()))?;
        return Ok(Some(SourceLog::Embedded(log)));
    };
    let component = format!("log/{name}");
    health.set(&component, ComponentState::Starting);
    let options = kafka.log_options(name);
    let log = supervise(&component, health, shutdown, || KafkaLog::open(options.clone()))
        .instrument(tracing::info_span!("kafka_log", source = name, brokers = %kafka.brokers))
        .await
        .map_err(|f| anyhow::anyhow!("log.kafka: {f}"))?;
    health.set(&component, ComponentState::Streaming);
    Ok(log.map(SourceLog::Kafka))
}

fn source_info(config: &Config, name: &str) -> SourceInfo {
    SourceInfo {
        node: name.to_owned(),
        database: config.sources.iter().find(|s| s.name == name).map(database_of).unwrap_or_default(),
    }
}

/// What the process keeps track of beside its tasks, shared with the admin API.
struct Registries {
    health: Arc<Health>,
    positions: Arc<crate::positions::Positions>,
    reshards: Arc<crate::resharding::Reshards>,
    members: Arc<crate::mesh_membership::Members>,
    indexes: Arc<crate::vector_indexes::Indexes>,
}

/// Opens each source's log; starts webhooks, the HTTP API and retention on them.
async fn start_delivery(
    config: &Config,
    running: &mut Running,
    reg: &Registries,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<BTreeMap<String, Arc<SourceLog>>> {
    let health = &reg.health;
    let mut logs = BTreeMap::new();
    for source in &config.sources {
        let Some(log) = open_log(config, &source.name, health, shutdown).await? else { break };
        logs.insert(source.name.clone(), Arc::new(log));
    }
    let info = |name: &str| source_info(config, name);
    let api_on = !config.api.listen.is_empty();
    if api_on || !config.webhooks.is_empty() {
        let store = Store::open(&config.log.dir.join("connectors.redb"))
            .map_err(|e| anyhow::anyhow!("log.dir: {} ({})", chain(&e), e.hint()))?;
        let names: Vec<String> = logs.keys().cloned().collect();
        let mut valid = Vec::new();
        for (i, w) in config.webhooks.iter().enumerate() {
            valid.push(w.validate(&format!("webhooks[{i}]"), &names)?);
        }
        let sources =
            logs.iter().map(|(n, l)| (n.clone(), WebhookSource { log: l.clone(), source: info(n) })).collect();
        let egress = Arc::new(config.egress.policy());
        let hooks = Webhooks::start(sources, store, valid, egress, shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("webhooks: {} ({})", chain(&e), e.hint()))?;
        health.set("webhooks", ComponentState::Streaming);
        if config.log.dead_letter_retention_hours > 0.0 {
            let retention = Duration::from_secs_f64(config.log.dead_letter_retention_hours * 3600.0);
            let (h, mut sd) = (hooks.clone(), shutdown.clone());
            running.tasks.spawn(async move {
                loop {
                    if let Err(e) = h.expire_dead_letters(retention).await {
                        tracing::warn!(error = %chain(&e), "expiring dead letters failed; retried");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
                        _ = sd.wait_for(|s| *s) => return Ok(()),
                    }
                }
            });
        }
        running.webhooks = Some(hooks);
    }
    if api_on {
        let auth = Arc::new(config.api.auth());
        // Every change made through the API (endpoints, repair, resume) is recorded here.
        let audit_path = config.log.dir.join("audit.jsonl");
        let audit = synapse_connectors::auth::Audit::open(&audit_path)
            .map_err(|e| anyhow::anyhow!("log.dir: cannot open the audit log {}: {e}", audit_path.display()))?;
        let audit = Some(Arc::new(audit));
        let api = Arc::new(Api {
            streams: logs
                .iter()
                .map(|(n, l)| {
                    let pg = config.sources.iter().find(|s| &s.name == n).and_then(|s| {
                        let c = capture_config(s).ok()?;
                        Some(SnapshotSource { config: c.source, capture_slot: c.slot, tables: c.tables })
                    });
                    (n.clone(), StreamSource { log: l.clone(), source: info(n), snapshot_source: pg })
                })
                .collect(),
            auth: auth.clone(),
            audit: audit.clone(),
            webhooks: running.webhooks.clone(),
            shutdown: shutdown.clone(),
            live_slots: Arc::new(tokio::sync::Semaphore::new(config.api.max_streams)),
        });
        if auth.tokens().is_empty() {
            tracing::warn!(listen = %config.api.listen, "api.tokens is empty: the HTTP API requires no authentication (loopback host names only)");
        }
        let listener = crate::listener::bind(&config.api.listen).await.map_err(|e| {
            let hint = crate::ops::in_use_hint(&e, "api.listen");
            anyhow::anyhow!("api.listen: cannot listen on {}: {e}{hint}", config.api.listen)
        })?;
        running.api_addr = listener.local_addr().ok();
        running.auth = Some(auth.clone());
        tracing::info!(listen = %config.api.listen, "serving /v1/streams, /v1/endpoints and the admin routes");
        let repair = Arc::new(crate::repair::RepairService::new(config.clone()));
        let reshard = crate::resharding::Control {
            config: config.clone(),
            reshards: reg.reshards.clone(),
            positions: reg.positions.clone(),
        };
        let admin = crate::admin::router(
            auth,
            crate::admin::Services {
                health: health.clone(),
                audit,
                repair,
                positions: reg.positions.clone(),
                reshard,
                members: reg.members.clone(),
                indexes: reg.indexes.clone(),
                conflicts: Arc::new(crate::conflicts::ConflictLog::new(config)),
            },
        );
        let app = synapse_connectors::api::router_with(api, admin);
        let sd = shutdown.clone();
        let tls = config.api.tls.as_ref().map(|f| crate::listener_tls::serve_with("api", f)).transpose();
        let limits = crate::listener::Limits {
            max_connections: config.api.max_connections,
            header_timeout: Duration::from_secs_f64(config.api.header_timeout_secs),
            tls: tls.map_err(anyhow::Error::msg)?,
        };
        running.tasks.spawn(async move {
            crate::listener::serve("api", listener, app, limits, sd).await.map_err(|e| ComponentFailed {
                component: "api".into(),
                code: "SYN002",
                error: e.to_string(),
                hint: "check api.listen",
            })
        });
    }
    let window_us = (config.log.stream_retention_hours * 3.6e9) as i64;
    for (name, log) in &logs {
        let (log, mut sd, name) = (log.clone(), shutdown.clone(), name.clone());
        running.tasks.spawn(async move {
            loop {
                let keep_since = (window_us > 0).then(|| synapse_schemas::unix_micros_now() - window_us);
                match log.apply_retention(keep_since).await {
                    Ok(n) if n > 0 => tracing::debug!(source = %name, deleted = n, "log retention"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(source = %name, error = %chain(&e), "log retention failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
                    _ = sd.wait_for(|s| *s) => return Ok(()),
                }
            }
        });
    }
    Ok(logs)
}

pub fn capture_config(s: &SourceConfig) -> Result<CaptureConfig, anyhow::Error> {
    let pg = s.url.pg_config().map_err(anyhow::Error::msg)?;
    let mut c = CaptureConfig::new(&s.name, pg);
    if let Some(slot) = &s.slot {
        c.slot = slot.clone();
    }
    c.publication = s.publication.clone();
    c.tables = s.tables.clone();
    c.create_publication = s.create_publication;
    c.heartbeat_interval = Duration::from_secs_f64(s.heartbeat_interval_secs);
    c.receive_timeout = Duration::from_secs_f64(s.receive_timeout_secs);
    // Status updates (each asking for a reply) come often enough to tell silence from a pause.
    c.status_interval = c.status_interval.min(c.receive_timeout / 3);
    c.skip_applied = !s.forward_applied;
    c.streaming = s.streaming;
    Ok(c)
}

fn apply_config(config: &Config, t: &TargetConfig, source: &SourceConfig) -> Result<ApplyConfig, anyhow::Error> {
    let pg = t.url.pg_config().map_err(anyhow::Error::msg)?;
    let mut c = ApplyConfig::new(&source.name, pg, &format!("apply-{}", t.name));
    c.max_txns_per_commit = t.max_txns_per_commit;
    c.synchronous_commit = config.synchronous_commit(t);
    c.ddl = source.ddl;
    c.shard = t.shard.clone();
    Ok(c)
}

/// Starts every component; returns once all are spawned.
pub async fn start(config: &Config, health: Arc<Health>, shutdown: watch::Receiver<bool>) -> anyhow::Result<Running> {
    // Not ready until every component is registered: /readyz (and a test's or a load
    // balancer's "caught up") must not see only the first few, all streaming, and answer 200
    // while the captures are still to be made.
    health.set(STARTUP, ComponentState::Starting);
    let mut running = Running {
        captures: Vec::new(),
        appliers: Vec::new(),
        tasks: JoinSet::new(),
        webhooks: None,
        api_addr: None,
        auth: None,
    };
    let reshards = Arc::new(crate::resharding::Reshards::open(config)?);
    let positions = Arc::new(crate::positions::Positions::new(reshards.clone()));
    let members = Arc::new(crate::mesh_membership::Members::new(config, health.clone(), positions.clone()));
    let indexes = Arc::new(crate::vector_indexes::Indexes::open(config, positions.clone())?);
    let reg = Registries {
        health: health.clone(),
        positions: positions.clone(),
        reshards: reshards.clone(),
        members: members.clone(),
        indexes: indexes.clone(),
    };
    let logs = start_delivery(config, &mut running, &reg, &shutdown).await?;
    indexes.spawn(config, &logs, &mut running.tasks, &health, &shutdown)?;
    forget_removed_appliers(config, &logs).await;
    members.set_logs(&logs);
    let mut mesh_tables = BTreeMap::new();
    if let Some(m) = &config.mesh {
        // Each node is made ready by a task of its own (a node that refuses parks alone): its
        // membership settled (founded, joined from a donor's snapshot, or a member already)
        // and its triggers installed. Its capture and the appliers into it wait for that: a
        // write made before its node's trigger exists would reach the peers without a version,
        // and an applier into a joining node would apply what its copy will hold.
        let founding = members.founding().await;
        // A node that left runs nothing (its sources' and targets' parts are skipped too).
        for node in m.nodes.iter().filter(|n| !members.has_left(&n.name)) {
            let component = format!("mesh/{}", node.name);
            health.set(&component, ComponentState::Starting);
            let (tx, rx) = watch::channel(None);
            mesh_tables.insert(node.name.clone(), rx);
            let (h, sd, node, members, logs) =
                (health.clone(), shutdown.clone(), node.clone(), members.clone(), logs.clone());
            running.tasks.spawn(async move {
                let installed = supervise(&component, &h, &sd, || members.prepare(&node, founding, &logs)).await?;
                if let Some(tables) = installed {
                    tracing::info!(node = %node.name, id = node.id, region = node.region.as_deref().unwrap_or("-"), tables = tables.len(), "mesh node ready");
                    h.set(&component, ComponentState::Streaming);
                    let _ = tx.send(Some(tables));
                }
                Ok(())
            });
        }
    }
    if let Some(m) = config.mesh.as_ref().filter(|m| m.tombstone_purge_interval_secs > 0.0) {
        spawn_tombstone_purge(config, m, (&logs, &members), &mut running, &shutdown)?;
    }
    let shared =
        Shared { config: config.clone(), health: health.clone(), logs, mesh_tables, positions, reshards, members };
    match config.log.kafka.as_ref().and_then(|k| k.group.clone()) {
        // Sources are shared with the other members of the group: each runs in one of them.
        Some(group) => {
            if !config.webhooks.is_empty() || !config.api.listen.is_empty() {
                // Their positions live in this process's connectors.redb, not in the group.
                tracing::warn!(
                    %group,
                    "webhooks and the streaming API are not shared by the consumer group: every member \
                     running them delivers on its own; configure them on one member only"
                );
            }
            running.tasks.spawn(crate::source_group::run(Arc::new(shared), group, shutdown.clone()));
        }
        None => {
            for source in &config.sources {
                let parts = SourceParts {
                    tasks: &mut running.tasks,
                    captures: &mut running.captures,
                    appliers: &mut running.appliers,
                };
                if !start_source(&shared, source, parts, &shutdown).await? {
                    return Ok(running);
                }
            }
        }
    }
    health.forget(STARTUP);
    Ok(running)
}

/// The component that stands for the pipeline being set up.
const STARTUP: &str = "startup";

/// What every source's components share.
pub(crate) struct Shared {
    pub config: Config,
    pub health: Arc<Health>,
    pub logs: BTreeMap<String, Arc<SourceLog>>,
    /// Per mesh node, its tables once its triggers are installed.
    pub mesh_tables: BTreeMap<String, watch::Receiver<Option<Vec<synapse_apply::mesh::MeshTable>>>>,
    /// Where each capture and applier is (reads at a cut, `/v1/positions`).
    pub positions: Arc<crate::positions::Positions>,
    /// The shard sets' moves (new shards start, retired ones stop, on their steps).
    pub reshards: Arc<crate::resharding::Reshards>,
    /// The mesh's membership (the parts of a node that left stop).
    pub members: Arc<crate::mesh_membership::Members>,
}

/// Where a source's components put their tasks and live figures.
pub(crate) struct SourceParts<'a> {
    pub tasks: &'a mut JoinSet<Result<(), ComponentFailed>>,
    pub captures: &'a mut Vec<(String, Arc<CaptureStats>)>,
    pub appliers: &'a mut Vec<(String, Arc<ApplyStats>)>,
}

/// An applier's position in a source's log holds back the log's retention; a target removed
/// from the configuration would hold it forever. Its position stays in the target itself
/// (`synapse.applied`): a target added back resumes there, or is told its changes are gone.
async fn forget_removed_appliers(config: &Config, logs: &BTreeMap<String, Arc<SourceLog>>) {
    for (source, log) in logs {
        let wanted: Vec<String> = config
            .targets
            .iter()
            .filter(|t| config.sources_of(t).any(|s| &s.name == source))
            .map(|t| format!("apply-{}", t.name))
            .collect();
        let consumers = match log.consumers().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(source = %source, error = %chain(&e), "cannot list the log's consumers; removed targets may hold retention");
                continue;
            }
        };
        for (name, position) in consumers {
            if name.starts_with("apply-") && !wanted.contains(&name) {
                match log.remove_consumer(&name).await {
                    Ok(()) => tracing::warn!(
                        source = %source,
                        consumer = %name,
                        position,
                        "forgot the log position of a target no longer configured to apply this source (it held log retention)"
                    ),
                    Err(e) => {
                        tracing::warn!(source = %source, consumer = %name, error = %chain(&e), "cannot forget a removed target's log position")
                    }
                }
            }
        }
    }
}

/// Waits until `rx` holds a value; `None` if shutdown came first.
pub(crate) async fn ready<T: Clone>(
    rx: &mut watch::Receiver<Option<T>>,
    shutdown: &watch::Receiver<bool>,
) -> Option<T> {
    let mut sd = shutdown.clone();
    tokio::select! {
        r = rx.wait_for(Option::is_some) => r.ok().and_then(|v| v.clone()),
        _ = sd.wait_for(|s| *s) => None,
    }
}

/// Starts one source's components, each a task of its own that waits for what it needs: its
/// capture (after its mesh node's triggers, if any), an initial copy and applier per target
/// (after the capture's table list and the target's mesh triggers), its public-topic
/// publisher. Returns at once; `Ok(false)`: the source has no log (shutdown came first).
pub(crate) async fn start_source(
    shared: &Shared,
    source: &SourceConfig,
    parts: SourceParts<'_>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<bool> {
    let (config, health, logs, mesh_tables) = (&shared.config, &shared.health, &shared.logs, &shared.mesh_tables);
    if shared.members.has_left(&source.name) {
        return Ok(true);
    }
    let component = format!("capture/{}", source.name);
    health.set(&component, ComponentState::Starting);
    let mut cfg = capture_config(source)?;
    cfg.spool_dir = config.log.dir.join("spool").join(&source.name);
    let Some(log) = logs.get(&source.name).map(|l| SourceLog::clone(l)) else { return Ok(false) };
    let capture = Arc::new(Capture::new(cfg));
    parts.captures.push((source.name.clone(), capture.stats()));
    if let Some(l) = logs.get(&source.name) {
        shared.positions.capture(&source.name, capture.stats(), l.clone());
    }
    // The captured tables once selected, and the slot once it exists: an initial copy needs
    // both (the slot's stream must hold every change after the copy's snapshot); an applier
    // with nothing to copy needs neither and applies the log even while the capture is parked.
    let (tables_tx, tables_rx) = watch::channel(None);
    let (slot_tx, slot_rx) = watch::channel(None);
    if source.max_slot_lag_bytes.is_some() || source.max_slot_lag_secs.is_some() {
        parts.tasks.spawn(watch_slot_lag(source.clone(), capture.stats(), health.clone(), shutdown.clone()));
    }
    // A mesh node's capture also stops when the node leaves.
    let sd = shared.members.stop_for(&[&source.name], shutdown);
    let (c, l, h, name) = (capture.clone(), log.clone(), health.clone(), source.name.clone());
    let mut own_mesh = mesh_tables.get(&source.name).cloned();
    let comp = component.clone();
    let resync = source.on_gap == OnGap::Resync;
    let wake = Arc::new(Notify::new());
    let w = wake.clone();
    parts.tasks.spawn(async move {
        if let Some(rx) = own_mesh.as_mut() {
            if ready(rx, &sd).await.is_none() {
                return Ok(());
            }
        }
        let Some((tables, skipped)) = supervise(&comp, &h, &sd, || c.select_tables()).await? else { return Ok(()) };
        for t in &skipped {
            eprintln!(
                "warning [CAP009]: source {name}: table {t} has no primary key or replica identity and is not replicated\n  fix: add a primary key, or ALTER TABLE {t} REPLICA IDENTITY FULL"
            );
        }
        let _ = tables_tx.send(Some(tables));
        // On a gap (a lost slot) it parks, and the appliers go on with what the log holds; or,
        // with on_gap: resync, crosses it and owes the targets a re-sync.
        // A gap is crossed with on_gap: resync, or once when the operator accepted it.
        let cross = |gap: &CaptureError| match gap {
            CaptureError::Gap { .. } if resync => Some(Some(&*w)),
            CaptureError::Gap { .. } if h.gap_accepted(&name) => Some(None),
            _ => None,
        };
        let ensure = || async {
            let history = l.recover_writer().await?;
            match c.ensure_slot(&history).await {
                Err(gap) => match cross(&gap) {
                    Some(wake) => {
                        accept_gap(&c, &l, &history, &gap, wake).await?;
                        h.gap_crossed(&name);
                        Ok(())
                    }
                    None => Err(gap),
                },
                Ok(_) => Ok(()),
            }
        };
        if supervise(&comp, &h, &sd, ensure).await?.is_none() {
            return Ok(());
        }
        let _ = slot_tx.send(Some(()));
        h.set(&comp, ComponentState::Streaming);
        let stream = || async {
            match c.stream(l.clone(), sd.clone()).await {
                Err(gap) => match cross(&gap) {
                    Some(wake) => {
                        accept_gap(&c, &l, &l.recover_writer().await?, &gap, wake).await?;
                        h.gap_crossed(&name);
                        Ok(())
                    }
                    None => Err(gap),
                },
                r => r,
            }
        };
        loop {
            let r = supervise(&comp, &h, &sd, stream).await?;
            // A clean return means shutdown (or a stream that ended: resume it).
            if r.is_none() || *sd.borrow() {
                h.set(&comp, ComponentState::Stopped);
                return Ok(());
            }
            h.set(&comp, ComponentState::Streaming);
        }
    });
    let own_mesh_node = config.mesh.as_ref().is_some_and(|m| m.nodes.iter().any(|n| n.name == source.name));
    // The appliers wake the re-sync task when a table joined holding rows (a copy owed).
    let copies_owed = wake.clone();
    if !own_mesh_node {
        spawn_resync(
            shared,
            source,
            capture.config(),
            (tables_rx.clone(), slot_rx.clone()),
            wake,
            parts.tasks,
            shutdown,
        )?;
    }
    let targets = config.targets.iter().filter(|t| !shared.members.has_left(&t.name));
    for target in targets.filter(|t| config.sources_of(t).any(|s| s.name == source.name)) {
        let component = format!("apply/{}->{}", source.name, target.name);
        let role = target.reshard_role;
        // A new shard of a move waits for `synapse shards start`: not a component before.
        if role != Some(ReshardRole::New) {
            health.set(&component, ComponentState::Starting);
        }
        let mut acfg = apply_config(config, target, source)?;
        acfg.copies_owed = Some(copies_owed.clone());
        let stats = Arc::new(ApplyStats::default());
        parts.appliers.push((component.clone(), stats.clone()));
        let mut gate = target.shard.as_ref().and_then(|s| shared.reshards.watch(&s.set));
        let (positions, target_name) = (shared.positions.clone(), target.name.clone());
        let mut target_mesh =
            config.mesh.as_ref().and_then(|m| Some((m.clone(), mesh_tables.get(&target.name)?.clone())));
        let node_id = |m: &crate::config::MeshConfig| {
            synapse_resolver::NodeId(m.nodes.iter().find(|n| n.name == target.name).map(|n| n.id).unwrap_or_default())
        };
        let node = config.mesh.as_ref().map(node_id).unwrap_or_default();
        // The hub passes on the schema changes it applies, in its own capture's publication.
        let forward_ddl = config
            .mesh
            .as_ref()
            .filter(|m| m.hub.as_ref() == Some(&target.name))
            .and_then(|_| config.sources.iter().find(|s| s.name == target.name))
            .map(|s| s.publication.clone());
        // Stops too when either mesh node leaves.
        let sd = shared.members.stop_for(&[&source.name, &target.name], shutdown);
        let (c, l, h, mut tables_rx, mut slot_rx) =
            (capture.clone(), log.clone(), health.clone(), tables_rx.clone(), slot_rx.clone());
        let source_name = source.name.clone();
        let (copy, parallelism) = (target.initial_copy, target.copy_parallelism);
        parts.tasks.spawn(async move {
            let shard = acfg.shard.clone();
            if let (Some(ReshardRole::New), Some(rx)) = (role, gate.as_mut()) {
                if crate::resharding::until(rx, &sd, |s| s.is_some()).await.is_none() {
                    return Ok(());
                }
                h.set(&component, ComponentState::Starting);
            }
            // A retired shard applies until the move finishes (it may be reversed until then).
            let stop = match (role, gate.clone()) {
                (Some(ReshardRole::Retired), Some(rx)) => crate::resharding::stop_when_finished(rx, sd.clone()),
                _ => sd.clone(),
            };
            if *stop.borrow() && !*sd.borrow() {
                return crate::resharding::retire_shard(&component, &h, &sd, &acfg, &l).await;
            }
            positions.applier(&source_name, &target_name, shard.clone(), role, stats.clone());
            if let Some((m, rx)) = target_mesh.as_mut() {
                let Some(tables) = ready(rx, &sd).await else { return Ok(()) };
                acfg.mesh = Some(synapse_apply::MeshApply {
                    policies: m.policies(),
                    tables: tables.iter().map(|t: &synapse_apply::mesh::MeshTable| (t.name(), t.clone())).collect(),
                    node,
                    name: target_name.clone(),
                    forward_ddl: forward_ddl.clone(),
                });
            }
            let applier = Applier::with_stats(acfg.clone(), stats.clone());
            let mut copy = copy;
            let mut tables = Vec::new();
            if copy {
                let Some(t) = ready(&mut tables_rx, &sd).await else { return Ok(()) };
                tables = t;
                let pending = || initial_copy::pending(&tables, &acfg.target, &source_name);
                let Some(pending) = supervise(&component, &h, &sd, pending).await? else { return Ok(()) };
                copy = pending > 0;
            }
            if copy {
                if ready(&mut slot_rx, &sd).await.is_none() {
                    return Ok(());
                }
                h.set(&component, ComponentState::Copying);
                let report = supervise(&component, &h, &sd, || {
                    initial_copy::run(&c, &tables, &acfg.target, acfg.shard.as_ref(), parallelism, stats.clone())
                })
                .await?;
                match report {
                    Some(r) => tracing::info!(
                        component,
                        copied = r.tables_copied,
                        already = r.tables_already_synced,
                        rows = r.rows,
                        "initial copy done"
                    ),
                    None => return Ok(()),
                }
            }
            h.set(&component, ComponentState::Streaming);
            supervise(&component, &h, &stop, || applier.run(&l, stop.clone())).await?;
            if *stop.borrow() && !*sd.borrow() {
                return crate::resharding::retire_shard(&component, &h, &sd, &acfg, &l).await;
            }
            h.set(&component, ComponentState::Stopped);
            Ok(())
        });
    }
    if let Some(log) = logs.get(&source.name) {
        spawn_publisher(config, &source.name, log, parts.tasks, health, shutdown);
    }
    Ok(true)
}

/// Publishes a source's changes to the public per-table topics, if configured.
fn spawn_publisher(
    config: &Config,
    name: &str,
    log: &Arc<SourceLog>,
    tasks: &mut JoinSet<Result<(), ComponentFailed>>,
    health: &Arc<Health>,
    shutdown: &watch::Receiver<bool>,
) {
    let Some((kafka, topics)) = config.log.kafka.as_ref().and_then(|k| Some((k, k.public_topics.as_ref()?))) else {
        return;
    };
    let component = format!("kafka-topics/{name}");
    health.set(&component, ComponentState::Starting);
    let options = synapse_connectors::kafka_topics::TopicsOptions {
        client: kafka.log_options(name).client(),
        batch_records: kafka.batch_records,
        prefix: kafka.topic_prefix.clone(),
        partitions: topics.partitions.unwrap_or(-1),
        replication_factor: kafka.replication_factor.unwrap_or(-1),
        tombstones: topics.tombstones,
        selector: synapse_connectors::Selector {
            tables: (!topics.tables.is_empty()).then(|| topics.tables.iter().cloned().collect()),
            ..Default::default()
        },
        timeout: Duration::from_secs_f64(kafka.request_timeout_secs),
    };
    let (log, source, h, sd) = (log.clone(), source_info(config, name), health.clone(), shutdown.clone());
    tasks.spawn(async move {
        let run = || {
            let (log, source, options, sd) = (log.clone(), source.clone(), options.clone(), sd.clone());
            async move {
                let mut publisher = synapse_connectors::kafka_topics::TopicPublisher::new(log, source, options)?;
                publisher.run(sd).await
            }
        };
        h.set(&component, ComponentState::Streaming);
        supervise(&component, &h, &sd, run).await?;
        h.set(&component, ComponentState::Stopped);
        Ok(())
    });
}

/// Purges causally stable tombstones every `tombstone_purge_interval_secs` (see
/// `synapse_apply::tombstones`). A failed round is logged and retried at the next interval:
/// purging late costs space, never correctness.
fn spawn_tombstone_purge(
    config: &Config,
    m: &crate::config::MeshConfig,
    (logs, members): (&BTreeMap<String, Arc<SourceLog>>, &Arc<crate::mesh_membership::Members>),
    running: &mut Running,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for node in &m.nodes {
        let Some(source) = config.sources.iter().find(|s| s.name == node.name) else { continue };
        let applies =
            config.targets.iter().find(|t| t.name == node.name).map(|t| t.sources.clone()).unwrap_or_default();
        nodes.push(synapse_apply::tombstones::PurgeNode {
            name: node.name.clone(),
            target: node.url.pg_config().map_err(anyhow::Error::msg)?,
            slot: capture_config(source)?.slot,
            applies,
        });
    }
    let (logs, members) = (logs.clone(), members.clone());
    let hops = if m.hub.is_some() { 2 } else { 1 };
    let interval = Duration::from_secs_f64(m.tombstone_purge_interval_secs);
    let mut sd = shutdown.clone();
    running.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = sd.changed() => {}
            }
            if *sd.borrow() {
                return Ok(());
            }
            let log_end = |name: &str| logs.get(name).map(|l| l.next_offset());
            let patience = interval.max(Duration::from_secs(30));
            // Rounds are named by the clock: later rounds, larger names.
            let id = synapse_schemas::unix_micros_now();
            // A node that left is waited for no more.
            let present: Vec<synapse_apply::tombstones::PurgeNode> = nodes
                .iter()
                .filter(|n| !members.has_left(&n.name))
                .map(|n| synapse_apply::tombstones::PurgeNode {
                    applies: n.applies.iter().filter(|a| !members.has_left(a)).cloned().collect(),
                    ..n.clone()
                })
                .collect();
            let round = synapse_apply::tombstones::purge_round(&present, log_end, hops, 10_000, patience, id);
            // A round waits up to `patience` for stability; shutdown does not wait for it. A
            // round cut short is one a crash would cut: a later round finishes it.
            let round = tokio::select! {
                r = round.instrument(tracing::info_span!("tombstone_purge")) => r,
                _ = sd.wait_for(|s| *s) => return Ok(()),
            };
            match round {
                Ok(p) if p.agreed > 0 => tracing::info!(agreed = p.agreed, deleted = p.deleted, "tombstone purge round"),
                Ok(_) => tracing::debug!(nodes = present.len(), "tombstone purge round: no tombstone every node agrees on"),
                Err(e) => tracing::warn!(code = e.code(), error = %e, hint = e.hint(), "tombstone purge round failed; retrying at the next interval"),
            }
        }
    });
    Ok(())
}

/// Waits for every task; the first definite failure stops the others and is returned.
pub async fn wait(mut running: Running, stop: &watch::Sender<bool>) -> Result<(), ComponentFailed> {
    let mut first = None;
    let webhooks = running.webhooks.take();
    while let Some(r) = running.tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = stop.send(true);
                first.get_or_insert(e);
            }
            Err(join) if join.is_panic() => {
                let _ = stop.send(true);
                first.get_or_insert(ComponentFailed {
                    component: "pipeline".into(),
                    code: "SYN001",
                    error: format!("a task panicked: {join}"),
                    hint: "report this as a bug with the log output",
                });
            }
            Err(_) => {}
        }
    }
    if let Some(w) = webhooks {
        // Dispatchers persist their positions on the way out.
        w.stop_all().await;
    }
    first.map_or(Ok(()), Err)
}
