//! One endpoint × one source: reads the feed at the endpoint's own pace and delivers through a
//! [`Sink`].
//!
//! # Guarantees
//! * **At least once**, with a stable `webhook-id` per request. The position persisted is the
//!   cursor before the oldest undelivered event; after a crash or restart, delivery resumes
//!   there, so events delivered after it (out of order under `key`/`none`) may come again with
//!   the same id.
//! * **Ordering**: `key` — at most one request in flight per primary key, and a key's events
//!   in commit order (truncates and schema changes wait for everything before them); `fifo` —
//!   one request at a time, in commit order; `none` — up to `max_in_flight` in any order.
//! * **Isolation**: each dispatcher has its own feed, window and breaker; a slow or dead
//!   endpoint delays neither other endpoints nor the replication slot (the log absorbs it,
//!   holding retention at this endpoint's position).
//! * **Retries** follow the schedule (with ±20 % jitter, never sooner than `Retry-After`); when
//!   it runs out the event is dead-lettered and delivery goes on. 410 disables the endpoint.
//! * **Circuit breaker**: after `breaker_threshold` consecutive failures no request is sent for
//!   `breaker_cooldown` (doubling up to 10 min); then one probe decides.

use super::sink::{Attempt, Delivery, Outcome, Sink};
use super::store::{DeadLetter, Store};
use crate::feed::ChangeFeed;
use crate::{ConnectorError, Event};
use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use synapse_log::ChangeLog;
use synapse_schemas::Cursor;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Longest breaker cooldown after repeated failed probes.
const MAX_COOLDOWN: Duration = Duration::from_secs(600);
/// How often the position is persisted while deliveries are in flight.
const PERSIST_EVERY: Duration = Duration::from_millis(200);
/// Attempts kept per endpoint for the attempts API.
pub const ATTEMPTS_KEPT: usize = 200;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    #[default]
    Key,
    Fifo,
    None,
}

#[derive(Clone, Debug)]
pub struct DispatchConfig {
    pub endpoint: String,
    pub source: String,
    pub ordering: Ordering,
    pub batch_size: usize,
    pub max_in_flight: usize,
    /// Delay before each attempt: `[0]` before the first (normally zero), `[n]` after the n-th
    /// failure. Its length is the number of attempts.
    pub retry_schedule: Vec<Duration>,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    /// Events held in memory at once (delivered or not yet).
    pub window: usize,
}

/// One attempt as the attempts API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptRecord {
    pub at: String,
    pub source: String,
    pub webhook_id: String,
    pub events: usize,
    pub status: Option<u16>,
    pub outcome: &'static str,
    pub latency_ms: f64,
    pub error: Option<String>,
}

/// Live state of an endpoint, shared with the API.
#[derive(Debug, Default)]
pub struct EndpointStatus {
    pub inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct StatusInner {
    pub positions: std::collections::BTreeMap<String, Option<String>>,
    pub pending: usize,
    pub in_flight: usize,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub breaker: &'static str,
    #[serde(skip)]
    pub attempts: VecDeque<AttemptRecord>,
}

impl EndpointStatus {
    fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        if let Ok(mut g) = self.inner.lock() {
            f(&mut g);
        }
    }
    pub fn snapshot(&self) -> StatusInner {
        self.inner.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// Why a dispatcher returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    Shutdown,
    /// The receiver answered 410 Gone.
    Disabled {
        reason: String,
    },
}

#[derive(Debug)]
enum State {
    Waiting { due: Instant },
    InFlight,
    Done,
}

#[derive(Debug)]
struct Item {
    event: Event,
    state: State,
    attempts: u32,
    last: Option<Attempt>,
}

struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    base: Duration,
}

impl Breaker {
    /// How many requests may start now.
    fn allows(&self, now: Instant, in_flight: usize) -> Option<usize> {
        match self.open_until {
            None => Some(usize::MAX),
            Some(t) if now >= t && in_flight == 0 => Some(1),
            _ => None,
        }
    }
    fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.cooldown = self.base;
    }
    fn failure(&mut self, threshold: u32, now: Instant) {
        self.failures += 1;
        if let Some(t) = self.open_until {
            if now >= t {
                // A failed probe: stay open, longer.
                self.cooldown = (self.cooldown * 2).min(MAX_COOLDOWN);
                self.open_until = Some(now + self.cooldown);
            }
        } else if self.failures >= threshold {
            self.open_until = Some(now + self.cooldown);
        }
    }
}

pub struct Dispatcher<L, S> {
    pub config: DispatchConfig,
    pub log: Arc<L>,
    pub sink: Arc<S>,
    pub store: Store,
    pub status: Arc<EndpointStatus>,
    /// Set once the endpoint is disabled: from then on it no longer holds back log retention.
    pub disabled: Arc<std::sync::Mutex<Option<super::store::Disabled>>>,
}

/// The consumer name under which an endpoint's position holds back log retention.
pub fn consumer_name(endpoint: &str) -> String {
    format!("webhook:{endpoint}")
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

impl<L: ChangeLog, S: Sink> Dispatcher<L, S> {
    pub async fn run(
        &self,
        mut feed: ChangeFeed<L>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Stopped, ConnectorError> {
        let cfg = &self.config;
        let labels = [("endpoint", cfg.endpoint.clone())];
        let mut window: VecDeque<Item> = VecDeque::new();
        let mut base: u64 = 0;
        let mut inflight: JoinSet<(Vec<u64>, String, Attempt)> = JoinSet::new();
        let mut breaker =
            Breaker { failures: 0, open_until: None, cooldown: cfg.breaker_cooldown, base: cfg.breaker_cooldown };
        let mut position: Option<Cursor> = feed.position();
        let mut persisted = position;
        let mut last_persist = Instant::now();
        loop {
            // Refill at half-empty so a scheduling pass never walks a huge window per completion.
            if window.len() <= cfg.window / 2 {
                let batch = feed.next_batch(cfg.window - window.len(), Duration::ZERO).await?;
                let now = Instant::now();
                let due = now + cfg.retry_schedule.first().copied().unwrap_or_default();
                for event in batch.events {
                    window.push_back(Item { event, state: State::Waiting { due }, attempts: 0, last: None });
                }
            }
            let now = Instant::now();
            let mut next_wake = breaker.open_until.filter(|t| *t > now);
            if let Some(mut budget) = breaker.allows(now, inflight.len()) {
                budget = budget.min(cfg.max_in_flight.saturating_sub(inflight.len()));
                for seqs in self.schedule(&mut window, base, now, budget, &mut next_wake) {
                    let events: Vec<Event> = seqs.iter().map(|s| window[(*s - base) as usize].event.clone()).collect();
                    for s in &seqs {
                        window[(*s - base) as usize].state = State::InFlight;
                    }
                    let id = match events.as_slice() {
                        [one] => one.id.clone(),
                        [first, .., last] => format!("{}..{}", first.id, last.cursor),
                        [] => continue,
                    };
                    let sink = self.sink.clone();
                    inflight.spawn(async move {
                        let d = Delivery { id, events };
                        let a = sink.send(&d).await;
                        (seqs, d.id, a)
                    });
                }
            }
            // Acknowledge the delivered prefix.
            while matches!(window.front(), Some(Item { state: State::Done, .. })) {
                if let Some(item) = window.pop_front() {
                    position = Some(item.event.cursor);
                    base += 1;
                }
            }
            if window.is_empty() {
                position = feed.position();
            }
            let pending = window.iter().filter(|i| !matches!(i.state, State::Done)).count();
            metrics::gauge!("synapse_webhook_pending", &labels).set(pending as f64);
            self.status.update(|s| {
                s.pending = pending;
                s.in_flight = inflight.len();
                s.breaker = match breaker.open_until {
                    None => "closed",
                    Some(t) if t <= now => "half-open",
                    Some(_) => "open",
                };
                s.positions.insert(cfg.source.clone(), position.map(|c| c.to_string()));
            });
            if position != persisted && (inflight.is_empty() || last_persist.elapsed() >= PERSIST_EVERY) {
                self.persist(position, &window, &feed).await?;
                persisted = position;
                last_persist = Instant::now();
            }

            let wait_log = window.len() <= cfg.window / 2;
            let sleep_until = next_wake.unwrap_or(now + Duration::from_secs(1));
            let read_from = feed.read_offset();
            tokio::select! {
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    let Ok((seqs, id, attempt)) = done else { continue };
                    if let Some(stop) = self.complete(&mut window, base, seqs, id, attempt, &mut breaker).await? {
                        self.persist(position, &window, &feed).await?;
                        return Ok(stop);
                    }
                }
                _ = tokio::time::sleep_until(sleep_until) => {}
                _ = self.log.wait_readable(read_from, Duration::from_secs(1)), if wait_log => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    self.persist(position, &window, &feed).await?;
                    return Ok(Stopped::Shutdown);
                }
            }
        }
    }

    /// Picks the requests to start now, as sequence numbers of window items.
    fn schedule(
        &self,
        window: &mut VecDeque<Item>,
        base: u64,
        now: Instant,
        budget: usize,
        next_wake: &mut Option<Instant>,
    ) -> Vec<Vec<u64>> {
        let cfg = &self.config;
        let mut out: Vec<Vec<u64>> = Vec::new();
        let mut batch: Vec<u64> = Vec::new();
        let mut blocked: HashSet<u64> = HashSet::new();
        let mut earlier_pending = false;
        let mut wake = |t: Instant| {
            if next_wake.is_none_or(|w| t < w) {
                *next_wake = Some(t);
            }
        };
        for (i, item) in window.iter().enumerate() {
            if out.len() >= budget {
                break;
            }
            let seq = base + i as u64;
            let ready = match item.state {
                State::Done => continue,
                State::InFlight => false,
                State::Waiting { due } if due > now => {
                    wake(due);
                    false
                }
                State::Waiting { .. } => true,
            };
            match cfg.ordering {
                Ordering::Fifo => {
                    // Only the oldest undelivered events, one request at a time.
                    if !ready || !out.is_empty() {
                        break;
                    }
                    batch.push(seq);
                    let mut j = i + 1;
                    while batch.len() < cfg.batch_size {
                        match window.get(j) {
                            Some(Item { state: State::Waiting { .. }, .. }) => batch.push(base + j as u64),
                            _ => break,
                        }
                        j += 1;
                    }
                    out.push(std::mem::take(&mut batch));
                    break;
                }
                Ordering::None => {
                    if ready {
                        batch.push(seq);
                    }
                }
                Ordering::Key => {
                    let e = &item.event;
                    if e.barrier {
                        if ready && !earlier_pending && batch.is_empty() && out.is_empty() {
                            out.push(vec![seq]);
                        }
                        break;
                    }
                    let free = !blocked.contains(&e.keys[0]) && !blocked.contains(&e.keys[1]);
                    if ready && free {
                        batch.push(seq);
                    }
                    blocked.insert(e.keys[0]);
                    blocked.insert(e.keys[1]);
                }
            }
            earlier_pending = true;
            if batch.len() >= cfg.batch_size {
                out.push(std::mem::take(&mut batch));
            }
        }
        if !batch.is_empty() && out.len() < budget {
            out.push(batch);
        }
        out
    }

    /// Records one attempt's result; `Some` when the endpoint must stop.
    async fn complete(
        &self,
        window: &mut VecDeque<Item>,
        base: u64,
        seqs: Vec<u64>,
        webhook_id: String,
        attempt: Attempt,
        breaker: &mut Breaker,
    ) -> Result<Option<Stopped>, ConnectorError> {
        let cfg = &self.config;
        let now = Instant::now();
        let outcome_label = match (&attempt.outcome, attempt.status) {
            (Outcome::Delivered, _) => "delivered",
            (Outcome::Disable, _) => "gone",
            (Outcome::Retry { .. }, Some(_)) => "failed",
            (Outcome::Retry { .. }, None) => "error",
        };
        metrics::counter!("synapse_webhook_attempts_total", "endpoint" => cfg.endpoint.clone(), "outcome" => outcome_label)
            .increment(1);
        let record = AttemptRecord {
            at: synapse_schemas::cloudevent::rfc3339_micros(synapse_schemas::unix_micros_now()),
            source: cfg.source.clone(),
            webhook_id,
            events: seqs.len(),
            status: attempt.status,
            outcome: outcome_label,
            latency_ms: attempt.latency.as_secs_f64() * 1000.0,
            error: attempt.error.clone(),
        };
        self.status.update(|s| {
            if s.attempts.len() >= ATTEMPTS_KEPT {
                s.attempts.pop_front();
            }
            s.attempts.push_back(record);
        });
        match &attempt.outcome {
            Outcome::Delivered => {
                breaker.success();
                let now_us = synapse_schemas::unix_micros_now();
                let hist =
                    metrics::histogram!("synapse_webhook_delivery_latency_seconds", "endpoint" => cfg.endpoint.clone());
                for s in &seqs {
                    if let Some(item) = window.get_mut((*s - base) as usize) {
                        item.state = State::Done;
                        hist.record((now_us - item.event.commit_time_us).max(0) as f64 / 1e6);
                    }
                }
                self.status.update(|s| s.delivered += seqs.len() as u64);
                Ok(None)
            }
            Outcome::Disable => {
                tracing::warn!(endpoint = %cfg.endpoint, "receiver answered 410 Gone: endpoint disabled");
                for s in &seqs {
                    if let Some(item) = window.get_mut((*s - base) as usize) {
                        item.state = State::Waiting { due: now };
                    }
                }
                Ok(Some(Stopped::Disabled { reason: format!("the receiver answered 410 Gone ({})", record_time()) }))
            }
            Outcome::Retry { retry_after } => {
                breaker.failure(cfg.breaker_threshold, now);
                for s in &seqs {
                    let Some(item) = window.get_mut((*s - base) as usize) else { continue };
                    item.attempts += 1;
                    item.last = Some(attempt.clone());
                    if item.attempts as usize >= cfg.retry_schedule.len() {
                        self.dead_letter(item).await?;
                        item.state = State::Done;
                    } else {
                        let planned = jitter(cfg.retry_schedule[item.attempts as usize]);
                        let delay = retry_after.map_or(planned, |r| r.max(planned));
                        item.state = State::Waiting { due: now + delay };
                    }
                }
                Ok(None)
            }
        }
    }

    async fn dead_letter(&self, item: &Item) -> Result<(), ConnectorError> {
        let cfg = &self.config;
        let last = item.last.as_ref();
        tracing::warn!(endpoint = %cfg.endpoint, event = %item.event.id, attempts = item.attempts,
            error = ?last.and_then(|a| a.error.as_deref()), "retries exhausted: event dead-lettered");
        let d = DeadLetter {
            source: cfg.source.clone(),
            cursor: item.event.cursor.to_string(),
            event_id: item.event.id.clone(),
            table: item.event.table.to_string(),
            attempts: item.attempts,
            last_error: last.and_then(|a| a.error.clone()),
            last_status: last.and_then(|a| a.status),
            dead_at: record_time(),
            event: serde_json::from_slice(&item.event.body).unwrap_or_default(),
        };
        self.store.add_dead_letter(&cfg.endpoint, &d).await?;
        metrics::counter!("synapse_webhook_dead_lettered_total", "endpoint" => cfg.endpoint.clone()).increment(1);
        self.status.update(|s| s.dead_lettered += 1);
        Ok(())
    }

    /// Stores the resume cursor, then lets retention pass what is behind it (in that order: a
    /// crash in between leaves retention behind, never ahead).
    async fn persist(
        &self,
        position: Option<Cursor>,
        window: &VecDeque<Item>,
        feed: &ChangeFeed<L>,
    ) -> Result<(), ConnectorError> {
        let cfg = &self.config;
        self.store.set_position(&cfg.endpoint, &cfg.source, position).await?;
        // A disabled endpoint (410 Gone) must not pin the log forever: it lets retention go on,
        // and re-enabling it checks its position is still there.
        if self.disabled.lock().map(|d| d.is_some()).unwrap_or(false) {
            self.log.remove_consumer(&consumer_name(&cfg.endpoint)).await?;
            return Ok(());
        }
        let keep = window.front().map_or_else(|| feed.retention_offset(), |i| i.event.txn_offset);
        self.log.commit_consumer(&consumer_name(&cfg.endpoint), keep).await?;
        Ok(())
    }
}

fn record_time() -> String {
    synapse_schemas::cloudevent::rfc3339_micros(synapse_schemas::unix_micros_now())
}
