//! Webhook endpoints: configuration, lifecycle and the per-endpoint dispatchers.
//!
//! ```text
//!  config file ─┐                        ┌─ Dispatcher(endpoint, source a) ─┐
//!  /v1/endpoints ┴─▶ Webhooks ── start ──┤                                  ├─▶ HttpSink ─▶ receiver
//!                    (store: API endpoints, disabled, positions, dead letters) └─ Dispatcher(endpoint, source b) ─┘
//! ```

pub mod dispatcher;
pub mod egress;
pub mod receiver;
pub mod routes;
pub mod signing;
pub mod sink;
pub mod store;

use crate::feed::{ChangeFeed, Operation, Selector, SourceInfo};
use crate::{ConnectorError, RowFilter};
use dispatcher::{consumer_name, DispatchConfig, Dispatcher, EndpointStatus, Ordering, Stopped};
use serde::{Deserialize, Serialize};
use signing::Secret;
use sink::HttpSink;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use store::{Disabled, Store};
use synapse_error::Classify;
use synapse_log::ChangeLog;
use synapse_schemas::Cursor;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

/// Defaults, with the reason for each.
pub mod defaults {
    /// Standard Webhooks' schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h,
    /// 24 h — about three days before an event is dead-lettered.
    pub const RETRY_SCHEDULE: [&str; 10] = ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "14h", "20h", "24h"];
    /// Receivers are told to answer within 15 s (Standard Webhooks: 15–30 s).
    pub const TIMEOUT: &str = "15s";
    /// Enough parallelism to hide a receiver's latency without flooding it.
    pub const MAX_IN_FLIGHT: usize = 16;
    pub const BREAKER_THRESHOLD: u32 = 10;
    pub const BREAKER_COOLDOWN: &str = "30s";
    /// Events held in memory per endpoint and source.
    pub const WINDOW: usize = 4_096;
}

/// The longest first `breaker_cooldown` (later ones double up to 10 minutes).
pub const MAX_BREAKER_COOLDOWN: Duration = Duration::from_secs(24 * 3600);

/// The longest delay `retry_schedule` may give.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// An endpoint as configured (config file or `POST /v1/endpoints`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: String,
    pub url: String,
    /// Source nodes whose changes go here; empty = all.
    #[serde(default)]
    pub sources: Vec<String>,
    /// `schema.table` names; empty = all.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Empty = all of insert, update, delete, truncate, schema.
    #[serde(default)]
    pub operations: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<RowFilter>,
    /// `whsec_…` secrets; every one signs (rotation: add the new one, later drop the old).
    /// Optional through the API: one is generated and returned once.
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub ordering: Ordering,
    /// Events per request (1 = one CloudEvent per request; more = a JSON array).
    #[serde(default = "one")]
    pub batch_size: usize,
    #[serde(default = "max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "timeout")]
    pub timeout: String,
    /// Delays before each attempt, e.g. `["0s", "5s", "5m"]`.
    #[serde(default = "schedule")]
    pub retry_schedule: Vec<String>,
    #[serde(default = "breaker_threshold")]
    pub breaker_threshold: u32,
    #[serde(default = "breaker_cooldown")]
    pub breaker_cooldown: String,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn one() -> usize {
    1
}
fn max_in_flight() -> usize {
    defaults::MAX_IN_FLIGHT
}
fn timeout() -> String {
    defaults::TIMEOUT.into()
}
fn schedule() -> Vec<String> {
    defaults::RETRY_SCHEDULE.iter().map(|s| s.to_string()).collect()
}
fn breaker_threshold() -> u32 {
    defaults::BREAKER_THRESHOLD
}
fn breaker_cooldown() -> String {
    defaults::BREAKER_COOLDOWN.into()
}

/// An endpoint whose every field was checked.
#[derive(Clone, Debug)]
pub struct ValidEndpoint {
    pub spec: EndpointSpec,
    pub url: reqwest::Url,
    pub secrets: Vec<Secret>,
    pub timeout: Duration,
    pub retry_schedule: Vec<Duration>,
    pub breaker_cooldown: Duration,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl EndpointSpec {
    /// Checks every field; errors name the field (prefixed with `at`, e.g. `webhooks[2]`).
    pub fn validate(&self, at: &str, sources: &[String]) -> Result<ValidEndpoint, ConnectorError> {
        let bad = |field: &str, message: String| ConnectorError::BadRequest { field: format!("{at}.{field}"), message };
        if !valid_name(&self.name) {
            return Err(bad("name", format!("`{}` must be 1–64 characters of A-Z, a-z, 0-9, _ or -", self.name)));
        }
        let url: reqwest::Url = self.url.parse().map_err(|e| bad("url", format!("not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("url", format!("scheme `{}` is not http or https", url.scheme())));
        }
        for (i, s) in self.sources.iter().enumerate() {
            if !sources.contains(s) {
                return Err(bad(&format!("sources[{i}]"), format!("no source is named `{s}`")));
            }
        }
        for (i, t) in self.tables.iter().enumerate() {
            if t.split('.').count() != 2 {
                return Err(bad(&format!("tables[{i}]"), format!("`{t}` is not schema.table")));
            }
        }
        if self.secrets.is_empty() {
            return Err(bad("secrets", "at least one `whsec_…` secret is required".into()));
        }
        let secrets = self
            .secrets
            .iter()
            .enumerate()
            .map(|(i, s)| s.parse::<Secret>().map_err(|m| bad(&format!("secrets[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        let dur = |field: &str, s: &str| {
            humantime::parse_duration(s)
                .map_err(|e| bad(field, format!("`{s}` is not a duration like 500ms, 5s, 2h ({e})")))
        };
        let timeout = dur("timeout", &self.timeout)?;
        if timeout.is_zero() || timeout > Duration::from_secs(300) {
            return Err(bad("timeout", "must be between 1ms and 5m".into()));
        }
        if self.retry_schedule.is_empty() || self.retry_schedule.len() > 50 {
            return Err(bad("retry_schedule", "must list 1 to 50 delays".into()));
        }
        let retry_schedule = self
            .retry_schedule
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // Bounded: a delay beyond the clock's range would overflow deadline arithmetic.
                let d = dur(&format!("retry_schedule[{i}]"), s)?;
                if d > MAX_RETRY_DELAY {
                    return Err(bad(&format!("retry_schedule[{i}]"), format!("`{s}` is longer than 7 days")));
                }
                Ok(d)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !(1..=1000).contains(&self.batch_size) {
            return Err(bad("batch_size", "must be between 1 and 1000".into()));
        }
        if !(1..=1000).contains(&self.max_in_flight) {
            return Err(bad("max_in_flight", "must be between 1 and 1000".into()));
        }
        if self.breaker_threshold == 0 {
            return Err(bad("breaker_threshold", "must be at least 1".into()));
        }
        let breaker_cooldown = dur("breaker_cooldown", &self.breaker_cooldown)?;
        if breaker_cooldown.is_zero() || breaker_cooldown > MAX_BREAKER_COOLDOWN {
            return Err(bad("breaker_cooldown", "must be between 1ms and 24h".into()));
        }
        if self.headers.len() > 32 {
            return Err(bad("headers", "at most 32 extra headers".into()));
        }
        for k in self.headers.keys() {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                || k.to_ascii_lowercase().starts_with("webhook-")
            {
                return Err(bad(&format!("headers.{k}"), "not a valid header name, or one that signing sets".into()));
            }
        }
        Ok(ValidEndpoint { spec: self.clone(), url, secrets, timeout, retry_schedule, breaker_cooldown })
    }

    /// The spec fit for API output: secrets shortened to their last characters, header values
    /// and the URL's password and query values replaced by `***`.
    pub fn redacted(&self) -> EndpointSpec {
        let mut s = self.clone();
        s.url = redact_url(&s.url);
        for v in s.headers.values_mut() {
            *v = "***".into();
        }
        s.secrets = s
            .secrets
            .iter()
            .map(|x| {
                let tail: String = x.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
                format!("whsec_…{tail}")
            })
            .collect();
        s
    }
}

/// A webhook URL fit for output: its password and every query value replaced by `***` (a
/// query often carries an access token); a URL that does not parse is not shown at all.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else { return "(not a URL)".into() };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        let keys: Vec<String> = u.query_pairs().map(|(k, _)| k.into_owned()).collect();
        u.query_pairs_mut().clear().extend_pairs(keys.iter().map(|k| (k.as_str(), "***")));
    }
    u.to_string()
}

/// A source node's log, as the webhooks read it.
pub struct WebhookSource<L> {
    pub log: Arc<L>,
    pub source: SourceInfo,
}

struct Running {
    valid: ValidEndpoint,
    from_config: bool,
    status: Arc<EndpointStatus>,
    stop: Arc<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
    disabled: Arc<std::sync::Mutex<Option<Disabled>>>,
}

/// Where a replay starts.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayFrom {
    /// Redeliver everything after this cursor (of `source`, or of every source if omitted).
    pub cursor: Option<String>,
    pub source: Option<String>,
    /// Redeliver everything committed at or after this time (RFC 3339).
    pub since: Option<String>,
}

/// Every webhook endpoint of the process.
pub struct Webhooks<L> {
    sources: BTreeMap<String, WebhookSource<L>>,
    store: Store,
    endpoints: Mutex<BTreeMap<String, Running>>,
    egress: Arc<egress::EgressPolicy>,
    shutdown: watch::Receiver<bool>,
}

fn now_text() -> String {
    synapse_schemas::cloudevent::rfc3339_micros(synapse_schemas::unix_micros_now())
}

impl<L: ChangeLog> Webhooks<L> {
    /// Starts the endpoints of the config file and those created through the API before.
    pub async fn start(
        sources: BTreeMap<String, WebhookSource<L>>,
        store: Store,
        configured: Vec<ValidEndpoint>,
        egress: Arc<egress::EgressPolicy>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, ConnectorError> {
        for v in &configured {
            egress.check_url(&v.url).map_err(|m| ConnectorError::BadRequest {
                field: format!("webhooks.{}.url", v.spec.name),
                message: m.into(),
            })?;
        }
        let me = Arc::new(Webhooks { sources, store, endpoints: Mutex::new(BTreeMap::new()), egress, shutdown });
        let names: Vec<String> = me.sources.keys().cloned().collect();
        let disabled: BTreeMap<String, Disabled> = me.store.disabled().await?.into_iter().collect();
        let mut all: Vec<(ValidEndpoint, bool)> = configured.into_iter().map(|v| (v, true)).collect();
        for (name, json) in me.store.endpoints().await? {
            if all.iter().any(|(v, _)| v.spec.name == name) {
                tracing::warn!(endpoint = %name, "an endpoint of the config file replaces the one created through the API");
                continue;
            }
            match serde_json::from_slice::<EndpointSpec>(&json)
                .map_err(|e| e.to_string())
                .and_then(|s| s.validate(&format!("stored endpoint {name}"), &names).map_err(|e| e.to_string()))
            {
                Ok(v) => all.push((v, false)),
                Err(e) => tracing::error!(endpoint = %name, error = %e, "stored endpoint is invalid; not started"),
            }
        }
        // An endpoint removed from the config file would otherwise hold back log retention
        // forever: forget its position, dead letters and log consumers.
        for gone in me.store.endpoints_with_positions().await? {
            if !all.iter().any(|(v, _)| v.spec.name == gone) {
                tracing::info!(endpoint = %gone, "endpoint no longer configured: releasing its log position");
                me.store.forget(&gone).await?;
                for src in me.sources.values() {
                    src.log.remove_consumer(&consumer_name(&gone)).await?;
                }
            }
        }
        let mut eps = me.endpoints.lock().await;
        for (valid, from_config) in all {
            let name = valid.spec.name.clone();
            let mut r = me.running(valid, from_config, disabled.get(&name).cloned());
            me.launch(&name, &mut r).await?;
            eps.insert(name, r);
        }
        drop(eps);
        Ok(me)
    }

    fn running(&self, valid: ValidEndpoint, from_config: bool, disabled: Option<Disabled>) -> Running {
        let (stop, _) = watch::channel(false);
        Running {
            valid,
            from_config,
            status: Arc::new(EndpointStatus::default()),
            stop: Arc::new(stop),
            tasks: Vec::new(),
            disabled: Arc::new(std::sync::Mutex::new(disabled)),
        }
    }

    fn is_disabled(r: &Running) -> bool {
        r.disabled.lock().map(|d| d.is_some()).unwrap_or(false)
    }

    /// Spawns one dispatcher per source of the endpoint (unless it is disabled).
    async fn launch(self: &Arc<Self>, name: &str, r: &mut Running) -> Result<(), ConnectorError> {
        if Self::is_disabled(r) {
            // A disabled endpoint does not hold back retention (enable checks its position).
            for src in self.sources.values() {
                src.log.remove_consumer(&consumer_name(name)).await?;
            }
            return Ok(());
        }
        let v = &r.valid;
        let sink = Arc::new(
            HttpSink::new(
                v.url.clone(),
                v.secrets.clone(),
                v.timeout,
                v.spec.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                &self.egress,
            )
            .map_err(|m| ConnectorError::BadRequest { field: format!("endpoint {name}"), message: m })?,
        );
        // `send_replace`, not `send`: with no task subscribed (after a halt) `send` leaves the
        // old `true` in place, and every new dispatcher would stop as soon as it started.
        r.stop.send_replace(false);
        for (source_name, src) in &self.sources {
            if !v.spec.sources.is_empty() && !v.spec.sources.contains(source_name) {
                continue;
            }
            // A new endpoint starts at the head: it gets every change captured from now on
            // (on a fresh start, that is from the slot's creation; see README "Webhooks").
            if self.store.position(name, source_name).await?.is_none() {
                let head = src.log.head_cursor().await?;
                self.store.set_position(name, source_name, head).await?;
                let keep = src.log.next_offset();
                src.log.commit_consumer(&consumer_name(name), keep).await?;
            }
            let selector = Selector {
                tables: (!v.spec.tables.is_empty()).then(|| v.spec.tables.iter().cloned().collect()),
                operations: (!v.spec.operations.is_empty()).then(|| v.spec.operations.iter().copied().collect()),
                filter: v.spec.filter.clone(),
            };
            let dispatcher = Dispatcher {
                config: DispatchConfig {
                    endpoint: name.to_owned(),
                    source: source_name.clone(),
                    ordering: v.spec.ordering,
                    batch_size: v.spec.batch_size,
                    max_in_flight: v.spec.max_in_flight,
                    retry_schedule: v.retry_schedule.clone(),
                    breaker_threshold: v.spec.breaker_threshold,
                    breaker_cooldown: v.breaker_cooldown,
                    window: defaults::WINDOW,
                },
                log: src.log.clone(),
                sink: sink.clone(),
                store: self.store.clone(),
                status: r.status.clone(),
                disabled: r.disabled.clone(),
            };
            let (stop, disabled, store) = (r.stop.clone(), r.disabled.clone(), self.store.clone());
            let global = self.shutdown.clone();
            let (log, info) = (src.log.clone(), src.source.clone());
            let name = name.to_owned();
            r.tasks.push(tokio::spawn(async move {
                let mut delay = Duration::from_millis(200);
                loop {
                    // Stop on the endpoint's own signal or the process shutdown.
                    let mut local = stop.subscribe();
                    let (fwd_tx, fwd_rx) = watch::channel(false);
                    let mut g = global.clone();
                    let forward = tokio::spawn(async move {
                        tokio::select! {
                            _ = async { let _ = local.wait_for(|s| *s).await; } => {}
                            _ = async { let _ = g.wait_for(|s| *s).await; } => {}
                        }
                        let _ = fwd_tx.send(true);
                    });
                    let result = async {
                        let after = store.position(&name, &dispatcher.config.source).await?.flatten();
                        let feed = ChangeFeed::open(log.clone(), info.clone(), after, selector.clone()).await?;
                        dispatcher.run(feed, fwd_rx).await
                    }
                    .await;
                    forward.abort();
                    match result {
                        Ok(Stopped::Shutdown) => return,
                        Ok(Stopped::Disabled { reason }) => {
                            let d = Disabled { reason, at: now_text() };
                            if let Err(e) = store.set_disabled(&name, Some(&d)).await {
                                tracing::error!(endpoint = %name, error = %synapse_error::chain(&e), "cannot record the disabled state");
                            }
                            if let Ok(mut g) = disabled.lock() {
                                *g = Some(d);
                            }
                            // Release retention here; the other sources' dispatchers do the same
                            // as they stop (they see the flag).
                            if let Err(e) = log.remove_consumer(&consumer_name(&name)).await {
                                tracing::warn!(endpoint = %name, error = %synapse_error::chain(&e), "cannot release the log position");
                            }
                            stop.send_replace(true);
                            return;
                        }
                        Err(e) => {
                            // Definite errors (a cursor gone, an unknown relation) will not heal
                            // by themselves either, but retrying slowly keeps the endpoint
                            // visible in metrics and resumes once an operator fixed the cause.
                            let error = synapse_error::chain(&e);
                            tracing::warn!(endpoint = %name, code = e.code(), %error, hint = e.hint(), retry_in = ?delay, "webhook dispatcher failed");
                            metrics::counter!("synapse_retries_total", "component" => format!("webhook/{name}")).increment(1);
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = async { let mut s = stop.subscribe(); s.wait_for(|s| *s).await.map(|_| ()) } => return,
                            }
                            delay = (delay * 2).min(if e.is_transient() { Duration::from_secs(30) } else { Duration::from_secs(300) });
                        }
                    }
                }
            }));
        }
        Ok(())
    }

    async fn halt(r: &mut Running) {
        r.stop.send_replace(true);
        for t in r.tasks.drain(..) {
            let _ = t.await;
        }
    }

    fn view(name: &str, r: &Running) -> serde_json::Value {
        let status = r.status.snapshot();
        let disabled = r.disabled.lock().ok().and_then(|d| d.clone());
        serde_json::json!({
            "name": name,
            "spec": r.valid.spec.redacted(),
            "from_config": r.from_config,
            "enabled": disabled.is_none(),
            "disabled": disabled,
            "status": status,
        })
    }

    pub async fn list(&self) -> Vec<serde_json::Value> {
        self.endpoints.lock().await.iter().map(|(n, r)| Self::view(n, r)).collect()
    }

    pub async fn get(&self, name: &str) -> Result<serde_json::Value, ConnectorError> {
        let eps = self.endpoints.lock().await;
        eps.get(name).map(|r| Self::view(name, r)).ok_or_else(|| not_found(name))
    }

    pub async fn attempts(&self, name: &str) -> Result<Vec<dispatcher::AttemptRecord>, ConnectorError> {
        let eps = self.endpoints.lock().await;
        let r = eps.get(name).ok_or_else(|| not_found(name))?;
        let s = r.status.inner.lock().map(|g| g.attempts.iter().rev().cloned().collect()).unwrap_or_default();
        Ok(s)
    }

    pub async fn dead_letters(&self, name: &str, limit: usize) -> Result<Vec<store::DeadLetter>, ConnectorError> {
        if !self.endpoints.lock().await.contains_key(name) {
            return Err(not_found(name));
        }
        self.store.dead_letters(name, limit).await
    }

    /// Creates or replaces an API endpoint. Returns the view, plus the generated secret if any.
    pub async fn put(
        self: &Arc<Self>,
        mut spec: EndpointSpec,
        create_only: bool,
    ) -> Result<(serde_json::Value, Option<String>), ConnectorError> {
        let mut generated = None;
        if spec.secrets.is_empty() {
            let s = Secret::generate();
            spec.secrets.push(s.clone());
            generated = Some(s);
        }
        let names: Vec<String> = self.sources.keys().cloned().collect();
        let valid = spec.validate("endpoint", &names)?;
        self.egress
            .check_url(&valid.url)
            .map_err(|m| ConnectorError::BadRequest { field: "endpoint.url".into(), message: m.into() })?;
        let name = spec.name.clone();
        let mut eps = self.endpoints.lock().await;
        if let Some(existing) = eps.get_mut(&name) {
            if existing.from_config {
                return Err(ConnectorError::Forbidden(format!(
                    "endpoint `{name}` is defined in the config file; change it there"
                )));
            }
            if create_only {
                return Err(ConnectorError::Conflict { what: format!("endpoint `{name}`") });
            }
            Self::halt(existing).await;
        }
        self.store.save_endpoint(&name, serde_json::to_vec(&spec).unwrap_or_default()).await?;
        let disabled = eps.get(&name).and_then(|r| r.disabled.lock().ok().and_then(|d| d.clone()));
        let mut r = self.running(valid, false, disabled);
        self.launch(&name, &mut r).await?;
        let view = Self::view(&name, &r);
        eps.insert(name, r);
        Ok((view, generated))
    }

    pub async fn delete(&self, name: &str) -> Result<(), ConnectorError> {
        let mut eps = self.endpoints.lock().await;
        let r = eps.get_mut(name).ok_or_else(|| not_found(name))?;
        if r.from_config {
            return Err(ConnectorError::Forbidden(format!(
                "endpoint `{name}` is defined in the config file; remove it there"
            )));
        }
        Self::halt(r).await;
        eps.remove(name);
        self.store.forget(name).await?;
        for src in self.sources.values() {
            src.log.remove_consumer(&consumer_name(name)).await?;
        }
        Ok(())
    }

    /// Re-enables a disabled endpoint: delivery resumes where it stopped.
    pub async fn enable(self: &Arc<Self>, name: &str) -> Result<serde_json::Value, ConnectorError> {
        let mut eps = self.endpoints.lock().await;
        let r = eps.get_mut(name).ok_or_else(|| not_found(name))?;
        // While disabled it did not hold retention: its position must still be in the log, or
        // the operator chooses where to resume (replay) instead of silently skipping events.
        for (source_name, src) in &self.sources {
            if let Some(pos) = self.store.position(name, source_name).await? {
                let c = pos.unwrap_or_default();
                match src.log.seek(c).await? {
                    synapse_log::Seek::Gone { oldest } => return Err(ConnectorError::CursorGone { cursor: c, oldest }),
                    synapse_log::Seek::At(o) => src.log.commit_consumer(&consumer_name(name), o).await?,
                }
            }
        }
        Self::halt(r).await;
        self.store.set_disabled(name, None).await?;
        if let Ok(mut d) = r.disabled.lock() {
            *d = None;
        }
        self.launch(name, r).await?;
        Ok(Self::view(name, r))
    }

    /// Moves the endpoint's position back (or forward) so delivery resumes after a cursor or
    /// from a time; dead-lettered events after that point are delivered again.
    pub async fn replay(self: &Arc<Self>, name: &str, from: ReplayFrom) -> Result<serde_json::Value, ConnectorError> {
        let bad = |field: &str, message: String| ConnectorError::BadRequest { field: field.into(), message };
        let mut targets: Vec<(String, Option<Cursor>)> = Vec::new();
        let mut eps = self.endpoints.lock().await;
        let r = eps.get_mut(name).ok_or_else(|| not_found(name))?;
        let sources: Vec<&String> = self
            .sources
            .keys()
            .filter(|s| r.valid.spec.sources.is_empty() || r.valid.spec.sources.contains(s))
            .filter(|s| from.source.as_ref().is_none_or(|f| f == *s))
            .collect();
        if let Some(s) = &from.source {
            if sources.is_empty() {
                return Err(bad("source", format!("endpoint `{name}` does not read source `{s}`")));
            }
        }
        match (&from.cursor, &from.since) {
            (Some(c), None) => {
                let c = crate::feed::parse_cursor("cursor", c)?;
                targets.extend(sources.iter().map(|s| ((*s).clone(), Some(c))));
            }
            (None, Some(t)) => {
                let at = humantime::parse_rfc3339_weak(t)
                    .map_err(|e| bad("since", format!("`{t}` is not an RFC 3339 time ({e})")))?;
                let us = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
                for s in sources {
                    let log = &self.sources[s].log;
                    let c = match log.cursor_at_time(us).await? {
                        Some(c) => Some(c),
                        None => log.head_cursor().await?,
                    };
                    targets.push((s.clone(), c));
                }
            }
            _ => return Err(bad("replay", "give exactly one of `cursor` or `since`".into())),
        }
        // Refuse before changing anything if the log no longer holds what the replay needs.
        let mut keep = Vec::new();
        for (s, c) in &targets {
            let log = &self.sources[s].log;
            match log.seek(c.unwrap_or_default()).await? {
                synapse_log::Seek::At(o) => keep.push(o),
                synapse_log::Seek::Gone { oldest } => {
                    return Err(ConnectorError::CursorGone { cursor: c.unwrap_or_default(), oldest })
                }
            }
        }
        Self::halt(r).await;
        for ((s, c), offset) in targets.iter().zip(keep) {
            // Hold retention at the replay point before anything else can delete it.
            self.sources[s].log.commit_consumer(&consumer_name(name), offset).await?;
            self.store.set_position(name, s, *c).await?;
        }
        self.launch(name, r).await?;
        Ok(
            serde_json::json!({"name": name, "replay_from": targets.iter().map(|(s, c)| (s.clone(), c.map(|c| c.to_string()))).collect::<BTreeMap<_, _>>()}),
        )
    }

    /// Deletes dead letters older than `retention` (they are kept for replay and inspection, not
    /// forever); returns how many.
    pub async fn expire_dead_letters(&self, retention: Duration) -> Result<usize, ConnectorError> {
        let before = synapse_schemas::unix_micros_now() - retention.as_micros() as i64;
        let n = self.store.expire_dead_letters(before).await?;
        if n > 0 {
            metrics::counter!("synapse_webhook_dead_letters_expired_total").increment(n as u64);
            tracing::info!(expired = n, retention = ?retention, "dead letters expired");
        }
        Ok(n)
    }

    /// Stops every dispatcher (positions are persisted on the way out).
    pub async fn stop_all(&self) {
        let mut eps = self.endpoints.lock().await;
        for r in eps.values_mut() {
            Self::halt(r).await;
        }
    }
}

fn not_found(name: &str) -> ConnectorError {
    ConnectorError::NotFound { what: format!("endpoint `{name}`") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(edit: impl FnOnce(&mut serde_json::Value)) -> Result<ValidEndpoint, ConnectorError> {
        let mut v = serde_json::json!({
            "name": "e", "url": "https://example.com/in", "secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        });
        edit(&mut v);
        serde_json::from_value::<EndpointSpec>(v).unwrap().validate("endpoint", &["a".to_string()])
    }

    /// Durations are bounded (a deadline past the clock's range would panic the dispatcher),
    /// and each refusal names its field.
    #[test]
    fn durations_and_headers_are_bounded() {
        assert!(spec(|_| {}).is_ok());
        for (field, value, named) in [
            ("retry_schedule", serde_json::json!(["0s", "8days"]), "retry_schedule[1]"),
            ("retry_schedule", serde_json::json!(["584542046090years"]), "retry_schedule[0]"),
            ("breaker_cooldown", serde_json::json!("2days"), "breaker_cooldown"),
            ("breaker_cooldown", serde_json::json!("0s"), "breaker_cooldown"),
            ("timeout", serde_json::json!("10m"), "timeout"),
        ] {
            let e = spec(|v| v[field] = value.clone()).err().unwrap();
            assert!(e.to_string().contains(named), "{field}={value}: {e}");
        }
        let many: serde_json::Map<String, serde_json::Value> =
            (0..33).map(|i| (format!("x-h{i}"), serde_json::json!("v"))).collect();
        let e = spec(|v| v["headers"] = many.into()).err().unwrap();
        assert!(e.to_string().contains("headers"), "{e}");
    }
}
