//! Capture: one logical-decoding reader per source PostgreSQL node.
//!
//! ```text
//!   source PostgreSQL                        capture                              the log
//!  ┌──────────────────┐  pgoutput v1/v2     ┌───────────────────────────────┐   append
//!  │ publication ─ slot├──────────────────▶ │ transport ▶ pgoutput ▶ records├─────────────▶
//!  └────────▲─────────┘  replication proto  └─────┬────────▲─┬──────────────┘  (durable)
//!           │          (v2: streams large         ▼        │ │
//!           │           transactions early)    spool.rs ───┘ │ (at their commit)
//!           └── standby status: flush = last durable commit ◀┘
//!  snapshot.rs: EXPORT_SNAPSHOT + COPY in parallel chunks for the initial copy
//! ```
//!
//! [`Capture`] is the boundary type. Its guarantees:
//! * **Delivery**: at-least-once into the log across crashes, exactly-once in the log's content:
//!   a restarted capture skips transactions the log already holds, and an unfinished one is
//!   closed with a `Discarded` marker by the log's writer recovery.
//! * **Ordering**: transactions reach the log in commit order, each change in its position in
//!   its transaction (the cursor `<commit_lsn>/<index>`).
//! * **Slot**: the slot's confirmed position only moves to what the log acknowledged as durable
//!   (see `replication.rs`).
//! * **Concurrency**: one `Capture` per slot; PostgreSQL itself refuses a second reader.

pub mod catalog;
mod error;
pub mod pgoutput;
mod replication;
pub mod snapshot;
mod spool;
pub mod transport;

pub use error::CaptureError;

use catalog::{SourceTable, TypeResolver};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use synapse_log::ChangeLog;
use synapse_schemas::Lsn;
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::Instrument;
use transport::ReplicationConnection;

/// Defaults, with the reason for each value.
pub mod defaults {
    use std::time::Duration;
    /// Often enough that an idle slot's lag never exceeds a few seconds, rare enough to cost nothing.
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
    /// PostgreSQL's own `wal_receiver_status_interval`.
    pub const STATUS_INTERVAL: Duration = Duration::from_secs(10);
    /// PostgreSQL's own `wal_receiver_timeout`.
    pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
    /// One log append (one fsync) per this many records at most: amortises the fsync while
    /// keeping batches small enough for flat memory.
    pub const MAX_BATCH_RECORDS: usize = 16_384;
    /// Bounds a batch of wide rows: with 8 batches queued, capture holds at most ~64 MiB.
    pub const MAX_BATCH_BYTES: usize = 8 << 20;
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// The source node's name: names its stream, its origin and its metrics.
    pub node: String,
    pub source: synapse_postgres::PgConfig,
    pub slot: String,
    pub publication: String,
    /// `schema.table` names; empty = every table with a primary key or replica identity.
    pub tables: Vec<String>,
    pub create_publication: bool,
    pub heartbeat_interval: Duration,
    pub status_interval: Duration,
    /// A replication connection silent this long is presumed dead (a half-open TCP connection:
    /// a firewall or NAT dropped it without a reset) and reconnected. Each status update asks
    /// the server for a reply, so a live connection is never silent this long.
    pub receive_timeout: Duration,
    pub max_batch_records: usize,
    pub max_batch_bytes: usize,
    /// Leave out transactions SynapseDB applied on this node (replication origin
    /// `synapse_*`): in a mesh every node applies every other directly, and capturing applied
    /// changes again would send them around in a loop. Off keeps cascades (A → B → C) working.
    pub skip_applied: bool,
    /// Ask the source (PostgreSQL 14+) to send large transactions while they run (pgoutput
    /// protocol 2, past its `logical_decoding_work_mem`) rather than keep them in its own
    /// `pg_replslot` until they commit. They wait in `spool_dir` until their commit or abort.
    pub streaming: bool,
    /// Where streamed transactions wait (unlinked files: nothing is left behind by a crash).
    pub spool_dir: std::path::PathBuf,
}

impl CaptureConfig {
    pub fn new(node: &str, source: synapse_postgres::PgConfig) -> Self {
        CaptureConfig {
            node: node.to_owned(),
            source,
            slot: format!("synapse_{}", node.replace(|c: char| !c.is_ascii_alphanumeric(), "_")),
            publication: "synapse".into(),
            tables: Vec::new(),
            create_publication: true,
            heartbeat_interval: defaults::HEARTBEAT_INTERVAL,
            status_interval: defaults::STATUS_INTERVAL,
            receive_timeout: defaults::RECEIVE_TIMEOUT,
            max_batch_records: defaults::MAX_BATCH_RECORDS,
            max_batch_bytes: defaults::MAX_BATCH_BYTES,
            skip_applied: false,
            streaming: true,
            spool_dir: std::env::temp_dir(),
        }
    }
}

/// Live counters for progress displays; the same figures go to Prometheus.
#[derive(Debug, Default)]
pub struct CaptureStats {
    pub events: AtomicU64,
    pub transactions: AtomicU64,
    pub received_lsn: AtomicU64,
    pub durable_lsn: AtomicU64,
    pub confirmed_lsn: AtomicU64,
    /// Unix µs of the newest durable commit.
    pub last_commit_time_us: AtomicI64,
    /// Unix µs carried by the newest heartbeat seen in the stream.
    pub last_heartbeat_us: AtomicI64,
    pub slot_lag_bytes: AtomicI64,
}

impl CaptureStats {
    /// Seconds between now and the newest source activity captured (commit or heartbeat).
    pub fn lag_seconds(&self) -> f64 {
        let newest =
            self.last_commit_time_us.load(Ordering::Relaxed).max(self.last_heartbeat_us.load(Ordering::Relaxed));
        if newest == 0 {
            return 0.0;
        }
        ((synapse_schemas::unix_micros_now() - newest) as f64 / 1e6).max(0.0)
    }
}

/// What `prepare` found and did on the source.
#[derive(Debug)]
pub struct Prepared {
    pub tables: Vec<SourceTable>,
    /// Tables without a primary key or replica identity: left out, with the fix in the report.
    pub skipped: Vec<String>,
    pub slot_created: bool,
}

/// The two gaps a slot shows (see [`Capture::prepare`]), as [`CaptureError::Gap`] names them.
const SLOT_MISSING: &str = "its replication slot is missing (dropped, or this is a promoted standby that never had it)";
const SLOT_INVALIDATED: &str = "its replication slot was invalidated (wal_status = lost: the server removed WAL the slot still needed, e.g. past max_slot_wal_keep_size)";

/// Most WAL [`Capture::replace_slot`] writes to move a source past the log's position.
pub const MAX_WAL_PAD: u64 = 256 << 20;
/// One logical message of that padding.
const WAL_PAD_CHUNK: u64 = 4 << 20;

/// The capture of one source node. See the crate docs for its guarantees.
pub struct Capture {
    config: CaptureConfig,
    /// The SQL connection (catalog, publication, heartbeats): made on first use and replaced
    /// when it breaks, so a retried `prepare`/`stream` after a source restart does not reuse a
    /// dead connection.
    client: std::sync::Mutex<Option<Arc<Client>>>,
    stats: Arc<CaptureStats>,
}

pub async fn connect_sql(config: &synapse_postgres::PgConfig, what: &str) -> Result<Client, CaptureError> {
    synapse_postgres::connect(config, what).await.map_err(CaptureError::sql(format!("connecting to {what}")))
}

impl Capture {
    /// A capture that connects on first use (so its figures exist before the source answers).
    pub fn new(config: CaptureConfig) -> Self {
        Capture { config, client: std::sync::Mutex::new(None), stats: Arc::default() }
    }

    /// A capture connected to its source.
    pub async fn connect(config: CaptureConfig) -> Result<Self, CaptureError> {
        let capture = Capture::new(config);
        capture.client().await?;
        Ok(capture)
    }

    pub fn stats(&self) -> Arc<CaptureStats> {
        self.stats.clone()
    }

    pub fn config(&self) -> &CaptureConfig {
        &self.config
    }

    /// The SQL connection to the source, reconnected first if it broke.
    pub async fn client(&self) -> Result<Arc<Client>, CaptureError> {
        let current =
            self.client.lock().map(|c| c.clone()).map_err(|_| CaptureError::Protocol("client lock poisoned".into()))?;
        match current {
            Some(c) if !c.is_closed() => return Ok(c),
            Some(_) => tracing::info!("reconnecting the source SQL connection"),
            None => {}
        }
        let fresh = Arc::new(connect_sql(&self.config.source, "the source").await?);
        if let Ok(mut c) = self.client.lock() {
            *c = Some(fresh.clone());
        }
        Ok(fresh)
    }

    /// Selects the tables, maintains the publication and creates the slot if missing.
    /// The slot exists before any snapshot is taken, so no commit falls between them.
    ///
    /// Never crosses a gap: when `log` already holds changes of this source, a missing slot
    /// (dropped, or a promoted standby that never had it) or an invalidated one (`wal_status =
    /// 'lost'`) means changes were lost in between, and `prepare` fails with
    /// [`CaptureError::Gap`] instead of creating a slot that would start after them
    /// (docs/decisions/0009-never-silent.md).
    pub async fn prepare<L: ChangeLog>(&self, log: &L) -> Result<Prepared, CaptureError> {
        let history = log.recover_writer().await?;
        self.prepare_with(&history).await
    }

    /// [`Capture::prepare`] for a log whose writer state the caller has (`WriterState::default()`:
    /// a log not written yet).
    pub async fn prepare_with(&self, history: &synapse_log::WriterState) -> Result<Prepared, CaptureError> {
        let (tables, skipped) = self.select_tables().await?;
        let slot_created = self.ensure_slot(history).await?;
        Ok(Prepared { tables, skipped, slot_created })
    }

    /// The first half of [`Capture::prepare`]: selects the tables (and the ones left out for
    /// lack of a key) and maintains the publication.
    pub async fn select_tables(&self) -> Result<(Vec<SourceTable>, Vec<String>), CaptureError> {
        let client = self.client().await?;
        let (tables, skipped) = catalog::select_tables(&client, &self.config.tables).await?;
        for t in &skipped {
            tracing::warn!(table = %t, code = "CAP009", "skipping table without primary key or replica identity: add a primary key or ALTER TABLE {t} REPLICA IDENTITY FULL");
        }
        if !self.config.tables.is_empty() {
            if let Some(t) = skipped.first() {
                return Err(CaptureError::NoReplicaIdentity { table: t.clone() });
            }
        }
        if self.config.create_publication {
            catalog::ensure_publication(&client, &self.config.publication, &tables).await?;
        } else if client
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&self.config.publication])
            .await
            .map_err(CaptureError::sql("reading the publication"))?
            .is_none()
        {
            return Err(CaptureError::MissingPublication { publication: self.config.publication.clone() });
        }
        let all_tables = self.config.tables.is_empty() && self.config.create_publication;
        if !catalog::install_ddl_capture(&client, &self.config.publication, all_tables).await? {
            tracing::warn!(
                source = %self.config.node,
                code = "CAP012",
                "schema changes are not captured: creating event triggers needs a superuser (rds_superuser, \
                 cloudsqlsuperuser…); until an operator installs them, run each migration on every target \
                 too, before its first change"
            );
            metrics::gauge!("synapse_capture_ddl_captured", "source" => self.config.node.clone()).set(0.0);
        } else {
            metrics::gauge!("synapse_capture_ddl_captured", "source" => self.config.node.clone()).set(1.0);
        }
        Ok((tables, skipped))
    }

    /// The second half of [`Capture::prepare`]: creates the slot if missing, or fails with the
    /// gap (see there). Returns whether it created the slot.
    pub async fn ensure_slot(&self, history: &synapse_log::WriterState) -> Result<bool, CaptureError> {
        let client = self.client().await?;
        if self.trusted_slot(&client, history).await?.is_some() {
            return Ok(false);
        }
        let mut conn = ReplicationConnection::connect(&self.config.source, "synapse-setup").await?;
        let slot = conn.create_slot(&self.config.slot, false, false).await?;
        tracing::info!(slot = %self.config.slot, consistent_point = %synapse_schemas::Lsn(slot.consistent_point), "created replication slot");
        Ok(true)
    }

    /// The slot's state if it exists and continues the log; `None` if it is missing and the
    /// log holds nothing yet (a first start); otherwise the gap: missing while the log holds
    /// changes (a log with records was written from this source's slot before: continuing it
    /// needs that slot's history), invalidated, or someone else's ([`Capture::foreign`]).
    async fn trusted_slot(
        &self,
        client: &Client,
        history: &synapse_log::WriterState,
    ) -> Result<Option<catalog::SlotState>, CaptureError> {
        match catalog::slot_state(client, &self.config.slot).await? {
            None if history.next_offset > 0 => Err(self.gap(client, SLOT_MISSING, history).await),
            None => Ok(None),
            Some(s) if s.wal_status.as_deref() == Some("lost") => {
                Err(self.gap(client, SLOT_INVALIDATED, history).await)
            }
            Some(s) => match self.foreign(client, history, &s).await? {
                Some(what) => Err(self.gap(client, &what, history).await),
                None => Ok(Some(s)),
            },
        }
    }

    /// Why the slot found is not the one the log was written from, if it is not: the server
    /// has another system identifier, or the slot starts past `max(last commit end,
    /// confirmed)` — the furthest position capture ever confirmed — so it was made again, or
    /// advanced, by someone else. A log without changes or without a recorded identity (written
    /// before identities were kept) accepts any slot.
    async fn foreign(
        &self,
        client: &Client,
        history: &synapse_log::WriterState,
        slot: &catalog::SlotState,
    ) -> Result<Option<String>, CaptureError> {
        let Some(known) = history.source.as_ref().filter(|_| history.next_offset > 0) else { return Ok(None) };
        let system: String = client
            .query_one("SELECT system_identifier::text FROM pg_control_system()", &[])
            .await
            .map_err(CaptureError::sql("reading the system identifier"))?
            .get(0);
        if system != known.system_id {
            return Ok(Some(format!(
                "the source is another database system (system identifier {system}; the log was written from {})",
                known.system_id
            )));
        }
        let ours = history.last_commit_end.unwrap_or_default().max(known.confirmed);
        Ok(match slot.confirmed_flush {
            Some(at) if at > ours => Some(format!(
                "its replication slot was made again, or advanced, by someone else: it starts at {at}, past {ours}, the furthest position synapse confirmed"
            )),
            _ => None,
        })
    }

    /// Checks the slot is ours ([`Capture::foreign`]) and records the identity the stream
    /// continues from; returns it.
    async fn own_slot(
        &self,
        history: &synapse_log::WriterState,
        system: &transport::SystemInfo,
        log: &impl ChangeLog,
    ) -> Result<synapse_log::SourceIdentity, CaptureError> {
        let client = self.client().await?;
        let slot = self.trusted_slot(&client, history).await?;
        let confirmed = slot.and_then(|s| s.confirmed_flush).unwrap_or_default();
        let known = history.source.as_ref();
        if let Some(k) = known.filter(|k| k.timeline != system.timeline && history.next_offset > 0) {
            // A promoted server may lack commits synapse captured from the old primary (and
            // then reuse their positions), and a slot there — synced or made by hand — cannot
            // be told synapse's own: never crossed silently.
            let what = format!(
                "the source's timeline changed from {} to {} (a promotion): the new primary may lack changes captured from the old one, and its slot cannot be told synapse's own",
                k.timeline, system.timeline
            );
            return Err(self.gap(&client, &what, history).await);
        }
        let identity = synapse_log::SourceIdentity {
            system_id: system.system_id.clone(),
            timeline: system.timeline,
            slot: self.config.slot.clone(),
            confirmed: known.map_or(confirmed, |k| k.confirmed.max(confirmed)),
        };
        if known != Some(&identity) {
            log.record_source(&identity).await?;
        }
        Ok(identity)
    }

    /// Crosses a gap (`on_gap: resync`, or accepted by the operator): drops whatever slot of
    /// that name exists (a gap was found: it is not trusted), moves the source's WAL past the
    /// log's last change, creates the slot, and records it in `log` as the log's own (system
    /// identifier and timeline as the server reports them now). Returns where it starts.
    ///
    /// Moving the WAL matters after a failover to a standby that had not received the old
    /// primary's last (captured) WAL: commit LSNs in the log must keep growing, so the new slot
    /// must start after them. What the source commits before the slot exists is restored by
    /// the re-sync, not streamed. The move writes at most [`MAX_WAL_PAD`] bytes of WAL
    /// (logical messages no slot decodes); more is [`CaptureError::Behind`].
    pub async fn replace_slot(
        &self,
        history: &synapse_log::WriterState,
        log: &impl ChangeLog,
    ) -> Result<Lsn, CaptureError> {
        let client = self.client().await?;
        let slot = &self.config.slot;
        if let Some(s) = catalog::slot_state(&client, slot).await? {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[slot])
                .await
                .map_err(CaptureError::sql("dropping the slot"))?;
            let invalidated = s.wal_status.as_deref() == Some("lost");
            tracing::warn!(%slot, invalidated, "dropped the replication slot to make it again past the gap");
        }
        if let Some(end) = history.last_commit_end {
            let mut written = 0u64;
            loop {
                let now: String = client
                    .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                    .await
                    .map_err(CaptureError::sql("reading the WAL position"))?
                    .get(0);
                let now: Lsn = now.parse().map_err(|e| CaptureError::Protocol(format!("WAL position {now}: {e}")))?;
                if now > end {
                    break;
                }
                let behind = end.0 - now.0;
                if written + behind > MAX_WAL_PAD {
                    return Err(CaptureError::Behind {
                        node: self.config.node.clone(),
                        last_captured: end.to_string(),
                        behind,
                        limit: MAX_WAL_PAD,
                    });
                }
                let chunk = behind.clamp(1, WAL_PAD_CHUNK) as i32;
                client
                    .execute("SELECT pg_logical_emit_message(false, 'synapse_resync', repeat(' ', $1))", &[&chunk])
                    .await
                    .map_err(CaptureError::sql("writing WAL to pass the log's position"))?;
                written += chunk as u64;
            }
            if written > 0 {
                tracing::warn!(bytes = written, log_position = %end, "moved the source's WAL past the log's last change");
            }
        }
        let mut conn = ReplicationConnection::connect(&self.config.source, "synapse-setup").await?;
        let system = conn.identify_system().await?;
        let created = conn.create_slot(slot, false, false).await?;
        let at = Lsn(created.consistent_point);
        tracing::warn!(%slot, consistent_point = %at, timeline = system.timeline, "created a new replication slot past the gap");
        // The log's own from now on: the next start must not take it for someone else's.
        let identity = synapse_log::SourceIdentity {
            system_id: system.system_id,
            timeline: system.timeline,
            slot: slot.clone(),
            confirmed: at,
        };
        log.record_source(&identity).await?;
        Ok(at)
    }

    /// After a receive timeout: the SQL connection to the same server is suspect too (it may
    /// hang without ever reporting closed), so the next use makes a new one; and the server
    /// still holds the slot for the dead link until its `wal_sender_timeout`, so that session
    /// (ours: `walsender`, and only while it still streams) is ended now.
    async fn end_silent_session(&self, walsender: Option<i32>) {
        if let Ok(mut c) = self.client.lock() {
            *c = None;
        }
        let Some(pid) = walsender else { return };
        let Ok(client) = self.client().await else { return };
        let ended =
            client.query_opt("SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE pid = $1", &[&pid]).await;
        tracing::info!(walsender = pid, ended = ?ended.map(|r| r.is_some()), "ended the silent replication session on the source");
    }

    /// The gap error for `what`, with the positions on both sides and how to accept it.
    async fn gap(&self, client: &Client, what: &str, history: &synapse_log::WriterState) -> CaptureError {
        let wal_now = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|_| "unknown".into());
        let node = &self.config.node;
        let accept = format!(
            "`synapse resume --accept-gap {node}` (POST /v1/components/resume {{\"accept_gap\": [\"{node}\"]}}): synapse makes a new slot and tells stream and webhook consumers of the gap"
        );
        let e = CaptureError::Gap {
            node: self.config.node.clone(),
            what: what.to_owned(),
            last_captured: history.last_commit_end.map_or("its start (no transaction yet)".into(), |l| l.to_string()),
            wal_now,
            accept,
        };
        metrics::counter!("synapse_capture_gaps_total", "source" => self.config.node.clone()).increment(1);
        e
    }

    /// Streams changes into `log` until `shutdown` turns true or an error occurs. Call
    /// [`Capture::prepare`] first. Safe to call again after an error (it resumes).
    pub async fn stream<L: ChangeLog + Clone>(
        &self,
        log: L,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), CaptureError> {
        let span = tracing::info_span!("capture", node = %self.config.node, slot = %self.config.slot);
        async {
            let state = log.recover_writer().await?;
            let mut conn = ReplicationConnection::connect(&self.config.source, &format!("synapse-{}", self.config.node)).await?;
            let system = conn.identify_system().await?;
            tracing::info!(system_id = %system.system_id, timeline = system.timeline, resume_after = ?state.last_commit_end.map(|l| l.to_string()), "starting replication");
            // Every (re)connect: the slot may have been dropped and made again meanwhile.
            let source = self.own_slot(&state, &system, &log).await?;
            // Protocol 2 (streaming) is PostgreSQL 14's.
            let streaming = self.config.streaming && conn.server_major().is_some_and(|v| v >= 14);
            let stream = match conn.start_replication(&self.config.slot, 0, &self.config.publication, streaming).await {
                Ok(stream) => stream,
                // The slot went while we ran (or between prepare and now): a gap, not a retry.
                Err(CaptureError::Server(e)) if e.code == "42704" || (e.code == "55000" && e.message.contains("can no longer")) => {
                    let client = self.client().await?;
                    let what = if e.code == "42704" {
                        SLOT_MISSING
                    } else {
                        SLOT_INVALIDATED
                    };
                    return Err(self.gap(&client, what, &state).await);
                }
                Err(e) => return Err(e),
            };
            let client = self.client().await?;
            let heartbeat = tokio::spawn(heartbeats(client.clone(), self.config.clone(), self.stats.clone()));
            let streamer = replication::Streamer {
                log,
                client: &client,
                types: TypeResolver::default(),
                stats: self.stats.clone(),
                settings: replication::StreamSettings {
                    max_batch_records: self.config.max_batch_records,
                    max_batch_bytes: self.config.max_batch_bytes,
                    status_interval: self.config.status_interval,
                    receive_timeout: self.config.receive_timeout,
                    skip_applied: self.config.skip_applied,
                    publication: self.config.publication.clone(),
                    node: self.config.node.clone(),
                },
                relations: HashMap::new(),
                emitted: HashSet::new(),
                source,
                spools: spool::Spools::new(self.config.spool_dir.clone(), &self.config.node),
            };
            let walsender = stream.backend_pid();
            let r = streamer.run(stream, state.last_commit_end, shutdown).await;
            heartbeat.abort();
            if matches!(&r, Err(CaptureError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut) {
                self.end_silent_session(walsender).await;
            }
            r
        }
        .instrument(span)
        .await
    }
}

/// Emits heartbeat messages into the WAL (so an idle slot still advances and lag in seconds is
/// measurable) and samples the slot's lag in bytes.
async fn heartbeats(client: Arc<Client>, config: CaptureConfig, stats: Arc<CaptureStats>) {
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    loop {
        tick.tick().await;
        let emitted = client
            .execute(
                "SELECT pg_logical_emit_message(false, $1, (extract(epoch FROM clock_timestamp()) * 1000000)::int8::text)",
                &[&replication::HEARTBEAT_PREFIX],
            )
            .await;
        if let Err(e) = emitted {
            tracing::debug!(error = %e, "heartbeat failed");
        }
        if let Ok(Some(slot)) = catalog::slot_state(&client, &config.slot).await {
            let lag = slot.lag_bytes.unwrap_or(0);
            stats.slot_lag_bytes.store(lag, Ordering::Relaxed);
            metrics::gauge!("synapse_slot_lag_bytes", "source" => config.node.clone()).set(lag as f64);
        }
        metrics::gauge!("synapse_capture_lag_seconds", "source" => config.node.clone()).set(stats.lag_seconds());
    }
}
