//! Streaming: pgoutput messages → `LogRecord`s → the change log, with slot feedback.
//!
//! ```text
//!  walsender ─XLogData─▶ decode ─▶ pending batch ─(bounded channel)─▶ log writer task
//!      ▲                                                                   │ append (fsync)
//!      └──── standby status: flush = durable LSN ◀──── watch ◀─────────────┘
//! ```
//!
//! THE SLOT RULE: the flush position we report (and so the slot's `confirmed_flush_lsn`) is the
//! end LSN of the last transaction whose `Commit` the log has acknowledged as durable, or, when
//! nothing is open or in flight, the position of the last keepalive (everything before it has
//! been received and written) once the log has recorded it as the source identity's
//! `confirmed`. It never moves past data that is not durable in the log, nor past
//! `max(last commit end, confirmed)` as the log holds them — so a slot found further on was
//! moved or made by someone else.
//!
//! Transactions are never buffered whole: records flow to the log in batches bounded by count
//! and bytes, so memory stays flat for any transaction size. A restart resumes at the slot and
//! skips transactions the log already holds (commit LSN below the log's last commit end).

use crate::catalog::TypeResolver;
use crate::pgoutput::{self, Message, OldTuple, TupleData};
use crate::spool::Spools;
use crate::transport::{pg_to_unix_micros, ReplicationMessage, ReplicationStream};
use crate::{CaptureError, CaptureStats};
use futures_util::FutureExt;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_log::ChangeLog;
use synapse_schemas::{
    Begin, Column, Commit, LogRecord, Lsn, OldValues, Op, Relation, RelationKey, ReplicaIdentity, RowChange,
    SchemaChange, Truncate, Tuple,
};
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

pub(crate) const HEARTBEAT_PREFIX: &str = "synapse_heartbeat";

pub(crate) struct StreamSettings {
    pub max_batch_records: usize,
    pub max_batch_bytes: usize,
    pub status_interval: Duration,
    pub receive_timeout: Duration,
    pub skip_applied: bool,
    /// The publication: schema changes are captured for its tables only.
    pub publication: String,
    /// The source node's name (metric labels).
    pub node: String,
}

/// A streamed transaction's `StreamCommit`: its spooled messages go to the log now.
struct StreamedCommit {
    xid: u32,
    flags: u8,
    commit_lsn: u64,
    end_lsn: u64,
    commit_time: i64,
}

#[derive(Default)]
struct Batch {
    records: Vec<LogRecord>,
    /// End LSN and commit time of the last transaction completed in this batch.
    commit: Option<(u64, i64)>,
    /// pgoutput bytes behind the records, for the size bound.
    bytes: usize,
}

impl Batch {
    fn is_full(&self, settings: &StreamSettings) -> bool {
        self.records.len() >= settings.max_batch_records || self.bytes >= settings.max_batch_bytes
    }
}

/// Hands the batch to the writer and starts a new one; returns the end LSN it completes.
fn ship(permit: mpsc::Permit<'_, Batch>, batch: &mut Batch) -> Option<u64> {
    // The next batch starts at this one's size: growing a vector from empty reallocates and
    // copies a dozen times per batch, each time into fresh pages the kernel must zero (a third
    // of capture's CPU in the P3 profile).
    let next = Batch { records: Vec::with_capacity(batch.records.len()), ..Default::default() };
    let full = std::mem::replace(batch, next);
    let end = full.commit.map(|(end, _)| end);
    permit.send(full);
    end
}

struct OpenTxn {
    begin: Begin,
    /// Begin not yet pushed: an Origin message may still amend it.
    begin_pending: bool,
    index: u32,
    /// Already in the log from before a restart.
    skip: bool,
}

pub(crate) struct Streamer<'a, L> {
    pub log: L,
    pub client: &'a Client,
    pub types: TypeResolver,
    pub stats: Arc<CaptureStats>,
    pub settings: StreamSettings,
    pub relations: HashMap<u32, (RelationKey, Relation)>,
    pub emitted: HashSet<RelationKey>,
    /// The source identity as the log holds it: an idle position is recorded there (its
    /// `confirmed`) before the slot is told of it (see [`synapse_log::SourceIdentity`]).
    pub source: synapse_log::SourceIdentity,
    /// Transactions the source streams while they run (protocol 2), until commit or abort.
    pub spools: Spools,
}

/// How often an idle slot's advance is recorded in the log (and so confirmed to the slot).
const RECORD_IDLE_EVERY: Duration = Duration::from_secs(1);

/// How much later than usual a commit may reach us before the walsender counts as behind.
const BEHIND_BY_US: i64 = 2_000;
/// The usual is the least lateness of the last one to two of these windows.
const LATENESS_WINDOW: Duration = Duration::from_secs(10);

/// Whether the walsender is behind: the last commit reached us much later after its commit
/// time than the usual. Then capture paces its reads ([`ReplicationStream::pace`]): a reader
/// that takes every message as it is sent keeps the walsender sending one message per
/// segment, each waking the reader, and on a busy machine the walsender then trails the
/// source by tens of milliseconds (bench P4: at 5,000 transactions per second, 1–2 % of
/// transactions reached us 10–50 ms late while the subscription's walsender kept up). A pause
/// lets it send its backlog at once. Measured against the usual lateness, not zero: the two
/// clocks may differ.
struct Lateness {
    least: i64,
    least_before: i64,
    window_started: Instant,
    last: i64,
}

impl Lateness {
    fn new() -> Self {
        Lateness { least: i64::MAX, least_before: i64::MAX, window_started: Instant::now(), last: 0 }
    }

    /// A commit with this time (µs since the Unix epoch) reached us now.
    fn commit(&mut self, commit_time_us: i64) {
        if self.window_started.elapsed() >= LATENESS_WINDOW {
            self.least_before = self.least;
            self.least = i64::MAX;
            self.window_started = Instant::now();
        }
        self.last = synapse_schemas::unix_micros_now().saturating_sub(commit_time_us);
        self.least = self.least.min(self.last);
    }

    fn behind(&self) -> bool {
        let usual = self.least.min(self.least_before);
        usual != i64::MAX && self.last.saturating_sub(usual) > BEHIND_BY_US
    }
}

impl<L: ChangeLog + Clone> Streamer<'_, L> {
    pub async fn run(
        mut self,
        mut stream: ReplicationStream,
        skip_below: Option<Lsn>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), CaptureError> {
        // Two batches in flight: while the writer fsyncs, capture keeps reading and grows the
        // next batch (adaptive group commit) instead of queueing many small ones.
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(2);
        let (durable_tx, mut durable_rx) = watch::channel(0u64);
        let writer = tokio::spawn(write_batches(
            self.log.clone(),
            batch_rx,
            durable_tx,
            self.stats.clone(),
            self.settings.node.clone(),
        ));
        let result = self.pump(&mut stream, skip_below, batch_tx, &mut durable_rx, &mut shutdown).await;
        // Let the writer finish what it has: a half-finished append must not race a restart's
        // recovery.
        let written = writer.await;
        let durable = *durable_rx.borrow();
        if durable > 0 {
            // Best effort: the slot learns the final durable position before we disconnect.
            let _ = stream.send_status(durable, durable, durable, false).await;
        }
        result?;
        match written {
            Ok(r) => r,
            Err(e) => Err(CaptureError::Log(synapse_log::LogError::TaskFailed(e))),
        }
    }

    async fn pump(
        &mut self,
        stream: &mut ReplicationStream,
        skip_below: Option<Lsn>,
        batch_tx: mpsc::Sender<Batch>,
        durable_rx: &mut watch::Receiver<u64>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), CaptureError> {
        let skip_below = skip_below.map(|l| l.0).unwrap_or(0);
        let mut txn: Option<OpenTxn> = None;
        let mut batch = Batch::default();
        let mut received = 0u64;
        let mut sent_commit_end = 0u64;
        let mut keepalive_end = 0u64;
        let mut reported = 0u64;
        let mut last_recorded: Option<Instant> = None;
        let mut last_status = Instant::now();
        let mut last_received = Instant::now();
        let mut tick = tokio::time::interval(self.settings.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lateness = Lateness::new();
        loop {
            let mut reply = false;
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                msg = stream.next() => {
                    last_received = Instant::now();
                    let mut msg = Some(msg?);
                    while let Some(m) = msg.take() {
                        match m {
                            ReplicationMessage::XLogData { wal_end, data, .. } => {
                                received = received.max(wal_end);
                                let streamed = self.receive(&data, wal_end, skip_below, &mut txn, &mut batch).await?;
                                if let Some(commit) = streamed {
                                    let shipped = self
                                        .commit_streamed(commit, stream, skip_below, &batch_tx, &mut batch, received.max(reported), reported)
                                        .await?;
                                    match shipped {
                                        Some(end) => sent_commit_end = end.unwrap_or(sent_commit_end),
                                        None => return Ok(()), // writer stopped; run() reports its error
                                    }
                                    // Writing it out was ours to do, not silence of the source's:
                                    // a long one must not pass for a dead link (and be streamed
                                    // again, forever).
                                    last_received = Instant::now();
                                }
                            }
                            ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                                received = received.max(wal_end);
                                if txn.is_none() && batch.records.is_empty() {
                                    keepalive_end = wal_end;
                                }
                                reply |= reply_requested;
                            }
                        }
                        if batch.is_full(&self.settings) {
                            break;
                        }
                        // Take what is already buffered without waiting: it joins this batch.
                        msg = stream.next().now_or_never().transpose()?;
                    }
                    if let Some((_, commit_time)) = batch.commit {
                        lateness.commit(commit_time);
                        if lateness.behind() {
                            stream.pace();
                        }
                    }
                    if !batch.records.is_empty() {
                        let full = batch.is_full(&self.settings);
                        let permit = if full {
                            // Backpressure: a full batch waits for the writer.
                            batch_tx.reserve().await.ok()
                        } else {
                            match batch_tx.try_reserve() {
                                Ok(p) => Some(p),
                                Err(mpsc::error::TrySendError::Full(())) => None, // keep growing it
                                Err(mpsc::error::TrySendError::Closed(())) => return Ok(()),
                            }
                        };
                        match permit {
                            Some(p) => sent_commit_end = ship(p, &mut batch).unwrap_or(sent_commit_end),
                            None if full => return Ok(()), // writer stopped; run() reports its error
                            None => {}
                        }
                    }
                    self.stats.received_lsn.store(received, Ordering::Relaxed);
                }
                permit = batch_tx.reserve(), if !batch.records.is_empty() => {
                    let Ok(p) = permit else { return Ok(()) };
                    sent_commit_end = ship(p, &mut batch).unwrap_or(sent_commit_end);
                }
                changed = durable_rx.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    if last_received.elapsed() >= self.settings.receive_timeout {
                        let silent = last_received.elapsed();
                        metrics::counter!("synapse_capture_receive_timeouts_total", "source" => self.settings.node.clone()).increment(1);
                        return Err(CaptureError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no message from the source for {silent:.0?} (receive timeout): the connection is presumed dead, reconnecting"),
                        )));
                    }
                    reply = true;
                }
            }
            let durable = *durable_rx.borrow();
            // Idle: everything received is durable and no transaction is open, so the keepalive
            // position is safe to confirm.
            let idle = txn.is_none() && batch.records.is_empty() && durable >= sent_commit_end;
            let mut flush = durable.max(reported);
            if idle && keepalive_end > flush {
                // Past the log's last commit only as far as the log has recorded: a slot whose
                // confirmed position passes that was not moved by us (a gap, see lib.rs).
                let due = last_recorded.is_none_or(|t| t.elapsed() >= RECORD_IDLE_EVERY);
                if keepalive_end > self.source.confirmed.0 && due {
                    let mut next = self.source.clone();
                    next.confirmed = Lsn(keepalive_end);
                    self.log.record_source(&next).await?;
                    self.source = next;
                    last_recorded = Some(Instant::now());
                }
                flush = flush.max(keepalive_end.min(self.source.confirmed.0));
            }
            if reply || (flush > reported && last_status.elapsed() >= Duration::from_millis(100)) {
                // Ask for a reply: a live server answers at once, so silence means a dead link.
                stream.send_status(received.max(flush), flush, flush, reply).await?;
                reported = flush;
                last_status = Instant::now();
                self.stats.confirmed_lsn.store(flush, Ordering::Relaxed);
                metrics::gauge!("synapse_capture_confirmed_lsn", "source" => self.settings.node.clone())
                    .set(flush as f64);
            }
        }
    }

    /// One message from the walsender: a streamed transaction's goes to its spool, any other
    /// into the batch. Returns a streamed transaction's commit, for the caller to write.
    async fn receive(
        &mut self,
        data: &[u8],
        wal_end: u64,
        skip_below: u64,
        txn: &mut Option<OpenTxn>,
        batch: &mut Batch,
    ) -> Result<Option<StreamedCommit>, CaptureError> {
        if let Some(top) = self.spools.current {
            self.receive_streamed(top, data, wal_end)?;
            return Ok(None);
        }
        match decode(data, false, wal_end)? {
            Message::StreamStart { xid, first_segment } => {
                if txn.is_some() {
                    return Err(CaptureError::Protocol(format!(
                        "streamed transaction {xid} started inside transaction {}",
                        txn.as_ref().map_or(0, |t| t.begin.xid)
                    )));
                }
                if first_segment {
                    self.spools.start(xid)?;
                }
                self.spools.current = Some(xid);
            }
            Message::StreamStop => {
                return Err(CaptureError::Protocol("a streamed block ended that had not started".into()));
            }
            Message::StreamAbort { xid, subxid } => {
                if self.spools.abort(xid, subxid)? {
                    self.count_streamed("aborted");
                }
            }
            Message::StreamCommit { xid, flags, commit_lsn, end_lsn, commit_time } => {
                return Ok(Some(StreamedCommit { xid, flags, commit_lsn, end_lsn, commit_time }));
            }
            msg => {
                batch.bytes += data.len();
                self.apply(msg, wal_end, skip_below, txn, batch).await?;
            }
        }
        Ok(None)
    }

    /// A message inside a streamed block (`StreamStart` … `StreamStop` of transaction `top`).
    fn receive_streamed(&mut self, top: u32, data: &[u8], wal_end: u64) -> Result<(), CaptureError> {
        let tag = data.first().copied().unwrap_or(0);
        match tag {
            b'E' => {
                self.spools.current = None;
                self.spools.block_done();
            }
            b'O' => {
                if let Message::Origin { name, .. } = decode(data, true, wal_end)? {
                    let applied = self.applied_here(name);
                    if let Some(spool) = self.spools.get(top) {
                        spool.origin = Some(name.to_owned());
                        spool.skip |= applied;
                    }
                }
            }
            b'M' | b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' => {
                if tag == b'M' {
                    if let Message::Message { transactional: false, prefix, content, .. } = decode(data, true, wal_end)?
                    {
                        self.heartbeat(prefix, content);
                        return Ok(());
                    }
                }
                // Every message here names its (sub)transaction right after the tag.
                let subxid = data.get(1..5).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(|| {
                    CaptureError::Protocol(format!("streamed message at {} is too short", Lsn(wal_end)))
                })?;
                self.spools.push(top, subxid, wal_end, data)?;
            }
            other => {
                return Err(CaptureError::Protocol(format!(
                    "message {:?} at {} inside streamed transaction {top}",
                    other as char,
                    Lsn(wal_end)
                )))
            }
        }
        Ok(())
    }

    /// Writes a committed streamed transaction into the log, in bounded batches, as if it had
    /// arrived whole at its commit. Returns the commit end of the last batch shipped
    /// (`Some(None)`: none complete), or `None` once the writer has stopped.
    #[allow(clippy::too_many_arguments)]
    async fn commit_streamed(
        &mut self,
        c: StreamedCommit,
        stream: &mut ReplicationStream,
        skip_below: u64,
        batch_tx: &mpsc::Sender<Batch>,
        batch: &mut Batch,
        received: u64,
        reported: u64,
    ) -> Result<Option<Option<u64>>, CaptureError> {
        let spool = self.spools.take(c.xid).ok_or_else(|| {
            CaptureError::Protocol(format!("commit of streamed transaction {} that never started", c.xid))
        })?;
        let skip = spool.skip || c.commit_lsn < skip_below;
        let mut txn = Some(OpenTxn {
            begin: Begin {
                commit_lsn: Lsn(c.commit_lsn),
                xid: c.xid,
                commit_time_us: pg_to_unix_micros(c.commit_time),
                origin: spool.origin.clone(),
            },
            begin_pending: true,
            index: 0,
            skip,
        });
        let mut shipped = None;
        if skip {
            self.count_streamed("skipped");
            if spool.skip {
                self.count_applied_skip();
            }
            // Not captured (already in the log, or applied here), but the source now counts its
            // table definitions as sent: they are registered for the transactions after it.
            for (wal_end, data) in spool.schema_messages() {
                self.apply(decode(data, true, wal_end)?, wal_end, 0, &mut txn, batch).await?;
            }
        } else {
            self.count_streamed("committed");
            let (xid, bytes) = (spool.xid(), spool.len());
            tracing::debug!(xid, bytes, commit_lsn = %Lsn(c.commit_lsn), "writing a streamed transaction to the log");
            let mut reader = self.spools.reader(spool)?;
            let mut buf = Vec::new();
            let mut last_status = Instant::now();
            loop {
                let next = reader.next(&mut buf).map_err(|e| self.spools.read_error(xid, e))?;
                let Some(wal_end) = next else { break };
                batch.bytes += buf.len();
                self.apply(decode(&buf, true, wal_end)?, wal_end, 0, &mut txn, batch).await?;
                if batch.is_full(&self.settings) {
                    let Ok(permit) = batch_tx.reserve().await else { return Ok(None) };
                    shipped = ship(permit, batch).or(shipped);
                    // The walsender waits meanwhile; it must still hear from us.
                    if last_status.elapsed() >= self.settings.status_interval {
                        stream.send_status(received, reported, reported, false).await?;
                        last_status = Instant::now();
                    }
                }
            }
        }
        let commit = Message::Commit {
            flags: c.flags,
            commit_lsn: c.commit_lsn,
            end_lsn: c.end_lsn,
            commit_time: c.commit_time,
        };
        self.apply(commit, c.end_lsn, 0, &mut txn, batch).await?;
        Ok(Some(shipped))
    }

    /// Applied here by SynapseDB, and so left out: its own source already streams it to
    /// everyone (`skip_applied`).
    fn applied_here(&self, origin: &str) -> bool {
        self.settings.skip_applied && origin.starts_with(synapse_schemas::APPLIED_ORIGIN_PREFIX)
    }

    fn count_applied_skip(&self) {
        metrics::counter!(
            "synapse_capture_skipped_transactions_total",
            "source" => self.settings.node.clone(),
            "reason" => "applied"
        )
        .increment(1);
    }

    fn count_streamed(&self, outcome: &'static str) {
        metrics::counter!(
            "synapse_capture_streamed_transactions_total",
            "source" => self.settings.node.clone(),
            "outcome" => outcome
        )
        .increment(1);
    }

    fn heartbeat(&self, prefix: &str, content: &[u8]) {
        if prefix == HEARTBEAT_PREFIX {
            if let Some(us) = std::str::from_utf8(content).ok().and_then(|s| s.parse::<i64>().ok()) {
                self.stats.last_heartbeat_us.store(us, Ordering::Relaxed);
            }
        }
    }

    /// One decoded message of a transaction (or between transactions) into the batch.
    async fn apply(
        &mut self,
        msg: Message<'_>,
        wal_end: u64,
        skip_below: u64,
        txn: &mut Option<OpenTxn>,
        batch: &mut Batch,
    ) -> Result<(), CaptureError> {
        match msg {
            Message::Begin { final_lsn, commit_time, xid } => {
                *txn = Some(OpenTxn {
                    begin: Begin {
                        commit_lsn: Lsn(final_lsn),
                        xid,
                        commit_time_us: pg_to_unix_micros(commit_time),
                        origin: None,
                    },
                    begin_pending: true,
                    index: 0,
                    skip: final_lsn < skip_below,
                });
            }
            Message::Origin { name, .. } => {
                if let Some(t) = txn.as_mut() {
                    if self.applied_here(name) {
                        t.skip = true;
                        self.count_applied_skip();
                    }
                    t.begin.origin = Some(name.to_owned());
                }
            }
            Message::Relation { body, .. } => {
                let mut columns: Vec<Column> = body
                    .columns
                    .iter()
                    .map(|c| Column {
                        name: c.name.to_owned(),
                        type_oid: c.type_oid,
                        type_modifier: c.type_modifier,
                        type_name: String::new(),
                        base_type_oid: 0,
                        element_type_oid: 0,
                        is_key: c.is_key,
                        type_defs: Vec::new(),
                    })
                    .collect();
                self.types.resolve(self.client, &mut columns).await?;
                let rel = Relation {
                    oid: body.oid,
                    schema: body.namespace.to_owned(),
                    table: body.name.to_owned(),
                    replica_identity: ReplicaIdentity::from_pgoutput(body.replica_identity)
                        .unwrap_or(ReplicaIdentity::Default),
                    columns,
                };
                let key = rel.key();
                // Only new versions become log records (schema-change events); a restart's
                // re-sent definitions are already registered.
                let known = self.emitted.contains(&key) || self.log.relation(key).await?.is_some();
                if !known {
                    push_begin(txn, batch);
                    batch.records.push(LogRecord::Relation(rel.clone()));
                }
                self.emitted.insert(key);
                self.relations.insert(body.oid, (key, rel));
            }
            Message::Insert { relation, new, .. } => {
                self.change(txn, batch, relation, Op::Insert, None, Some(new))?;
            }
            Message::Update { relation, old, new, .. } => {
                self.change(txn, batch, relation, Op::Update, old, Some(new))?;
            }
            Message::Delete { relation, old, .. } => {
                self.change(txn, batch, relation, Op::Delete, Some(old), None)?;
            }
            Message::Truncate { options, relations, .. } => {
                let index = match txn.as_mut() {
                    Some(t) if !t.skip => {
                        t.index += 1;
                        t.index
                    }
                    _ => return Ok(()),
                };
                let keys = relations
                    .iter()
                    .map(|oid| self.relations.get(oid).map(|(k, _)| *k).ok_or(CaptureError::UnknownRelation(*oid)))
                    .collect::<Result<Vec<_>, _>>()?;
                push_begin(txn, batch);
                batch.records.push(LogRecord::Truncate(Truncate {
                    index,
                    relations: keys,
                    cascade: options & pgoutput::TRUNCATE_CASCADE != 0,
                    restart_identity: options & pgoutput::TRUNCATE_RESTART_IDENTITY != 0,
                }));
            }
            Message::Commit { commit_lsn, end_lsn, commit_time, .. } => {
                if let Some(t) = txn.take() {
                    if !t.skip {
                        let mut t = Some(t);
                        push_begin(&mut t, batch);
                        let event_count = t.as_ref().map_or(0, |t| t.index);
                        batch.records.push(LogRecord::Commit(Commit {
                            commit_lsn: Lsn(commit_lsn),
                            end_lsn: Lsn(end_lsn),
                            commit_time_us: pg_to_unix_micros(commit_time),
                            event_count,
                        }));
                        batch.commit = Some((end_lsn, pg_to_unix_micros(commit_time)));
                    }
                }
            }
            Message::Message { prefix, content, transactional: true, .. } if prefix == crate::catalog::DDL_PREFIX => {
                if txn.as_ref().is_none_or(|t| t.skip) {
                    return Ok(());
                }
                let change = self.schema_change(content, wal_end).await?;
                if let Some(change) = change {
                    push_begin(txn, batch);
                    batch.records.push(LogRecord::Schema(change));
                }
            }
            Message::Message { prefix, content, .. } => self.heartbeat(prefix, content),
            Message::Type { .. } => {}
            Message::StreamStart { .. }
            | Message::StreamStop
            | Message::StreamCommit { .. }
            | Message::StreamAbort { .. } => {
                return Err(CaptureError::Protocol(format!(
                    "a stream control message out of place at {}",
                    Lsn(wal_end)
                )));
            }
        }
        Ok(())
    }

    /// A schema change the source's event trigger emitted, if it touched a published table
    /// (`None`: another table's, or a temporary one's).
    async fn schema_change(&self, content: &[u8], lsn: u64) -> Result<Option<SchemaChange>, CaptureError> {
        let bad = || CaptureError::Protocol(format!("the DDL capture's message at {} is not what it emits", Lsn(lsn)));
        let v: serde_json::Value = serde_json::from_slice(content).map_err(|_| bad())?;
        let text = |k: &str| v[k].as_str().map(str::to_owned).ok_or_else(bad);
        let emitted = SchemaChange {
            tag: text("tag")?,
            sql: text("sql")?,
            nth: v["nth"].as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?,
            search_path: text("search_path")?,
            tables: names(&v["tables"]).ok_or_else(bad)?,
            // Absent from an older trigger's messages.
            joined: names(&v["joined"]).unwrap_or_default(),
            // Absent from an older trigger's messages, like `joined` and `copy`.
            shapes: serde_json::from_value(v["shapes"].clone()).unwrap_or_default(),
            copy: names(&v["copy"]).unwrap_or_default(),
        };
        // Enum and domain types: a published table may use them next, and a target that lacks
        // one refuses that table's change.
        let types = names(&v["types"]).unwrap_or_default();
        // The trigger names the publications that held the tables when the statement ran.
        let published = match v["published_in"].as_array() {
            _ if !types.is_empty() => true,
            Some(names) => names.iter().any(|n| n.as_str() == Some(self.settings.publication.as_str())),
            // Emitted by an older trigger, before this version replaced it: its drops name
            // `<table> in publication <name>`; other changes go by the catalog as it is now.
            None => self.legacy_published(&v, &emitted.tables).await?,
        };
        metrics::counter!(
            "synapse_capture_schema_changes_total",
            "source" => self.settings.node.clone(),
            "captured" => published.to_string()
        )
        .increment(1);
        if !published {
            return Ok(None);
        }
        tracing::info!(tag = %emitted.tag, tables = ?emitted.tables, types = ?types, joined = ?emitted.joined, copy = ?emitted.copy, lsn = %Lsn(lsn), "captured a schema change");
        Ok(Some(emitted))
    }

    /// Publication membership for a message of the trigger before `published_in` existed.
    async fn legacy_published(&self, v: &serde_json::Value, tables: &[String]) -> Result<bool, CaptureError> {
        let publication_of = |identity: &str| {
            let name = identity.rsplit_once(" in publication ").map_or("", |(_, n)| n);
            match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => name.to_owned(),
            }
        };
        let dropped = v["publications"].as_array().is_some_and(|p| {
            p.iter().filter_map(|p| p.as_str()).any(|p| publication_of(p) == self.settings.publication)
        });
        if dropped {
            return Ok(true);
        }
        let row = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_publication_tables
                 WHERE pubname = $1 AND schemaname || '.' || tablename = ANY($2)",
                &[&self.settings.publication, &tables],
            )
            .await
            .map_err(CaptureError::sql("reading which tables the publication holds"))?;
        Ok(row.is_some())
    }

    fn change(
        &mut self,
        txn: &mut Option<OpenTxn>,
        batch: &mut Batch,
        relation: u32,
        op: Op,
        old: Option<OldTuple<'_>>,
        new: Option<TupleData<'_>>,
    ) -> Result<(), CaptureError> {
        let Some(t) = txn.as_mut().filter(|t| !t.skip) else { return Ok(()) };
        let (key, _) = self.relations.get(&relation).ok_or(CaptureError::UnknownRelation(relation))?;
        t.index += 1;
        let change = RowChange {
            index: t.index,
            relation: *key,
            op,
            before: match old {
                Some(OldTuple::Key(d)) => Some((OldValues::Key, tuple(d)?)),
                Some(OldTuple::Old(d)) => Some((OldValues::Full, tuple(d)?)),
                None => None,
            },
            after: new.map(tuple).transpose()?,
        };
        push_begin(txn, batch);
        batch.records.push(LogRecord::Change(change));
        Ok(())
    }
}

fn decode(data: &[u8], in_stream: bool, wal_end: u64) -> Result<Message<'_>, CaptureError> {
    pgoutput::decode(data, in_stream).map_err(|source| CaptureError::Decode { lsn: Lsn(wal_end).to_string(), source })
}

/// Writes the pending `Begin` of a transaction that goes into the log. A skipped transaction's
/// new relation definitions are still written (they are registered for later transactions), but
/// outside any transaction, so the log never holds a `Begin` without its `Commit`.
fn push_begin(txn: &mut Option<OpenTxn>, batch: &mut Batch) {
    if let Some(t) = txn.as_mut() {
        if t.begin_pending && !t.skip {
            t.begin_pending = false;
            batch.records.push(LogRecord::Begin(t.begin.clone()));
        }
    }
}

/// One copy of the wire bytes per row; the layout is pgoutput's own (see `Tuple`).
fn tuple(t: TupleData<'_>) -> Result<Tuple, CaptureError> {
    Tuple::from_pgoutput(t.len() as u16, t.raw().to_vec())
        .map_err(|e| CaptureError::Protocol(format!("unexpected tuple data ({e}); binary mode is not requested")))
}

/// What the writer learns of a batch before it moves into the log, reported once it is durable.
struct Shipped {
    commit: Option<(u64, i64)>,
    events: u64,
    txns: u64,
    records: usize,
    bytes: usize,
    /// (commit time, commit LSN, xid, events) per transaction, when tracing is on.
    traced: Vec<(i64, Lsn, u32, u32)>,
}

/// Staged, not yet durable, while the log writes: beyond this the writer waits for the write
/// (and capture, once the channel is full, for the writer). Bounds memory: a staged record is
/// held decoded and encoded until written (bench P7 on protocol 1, where capture outruns the
/// log: 65,536 records / 16 MiB peaked at 305 MiB).
const MAX_STAGED_RECORDS: usize = 16_384;
const MAX_STAGED_BYTES: usize = 8 << 20;
/// Records coalesced into one append where each append is a write (logs that do not stage):
/// one fsync for many batches. A staging log writes everything staged at once anyway.
const MAX_COALESCED: usize = 65_536;

/// The log writer: coalesces queued batches and stages them in the log (`ChangeLog::stage`),
/// which makes them readable early (the appliers apply them meanwhile); one write makes
/// everything staged durable (group commit), then the new durable position is published. On a
/// log that does not read early, one batch at a time.
async fn write_batches<L: ChangeLog + Clone>(
    log: L,
    mut rx: mpsc::Receiver<Batch>,
    durable: watch::Sender<u64>,
    stats: Arc<CaptureStats>,
    source: String,
) -> Result<(), CaptureError> {
    type Write = tokio::task::JoinHandle<Result<(), synapse_log::LogError>>;
    let events_total = metrics::counter!("synapse_capture_events_total", "source" => source.clone());
    let txns_total = metrics::counter!("synapse_capture_transactions_total", "source" => source.clone());
    let durable_lsn = metrics::gauge!("synapse_capture_durable_lsn", "source" => source.clone());
    let pipelined = log.reads_early();
    // The write running and what it makes durable; stages since, whose futures the next write
    // runs in order (the first writes them all; none is dropped: each may carry an error).
    let mut writing: Option<(Write, Vec<Shipped>)> = None;
    type Staged = std::pin::Pin<Box<dyn Future<Output = Result<u64, synapse_log::LogError>> + Send>>;
    let mut staged: Vec<(Staged, Shipped)> = Vec::new();
    let mut open = true;
    loop {
        if writing.is_none() && !staged.is_empty() {
            let (futures, shipped): (Vec<_>, Vec<_>) = std::mem::take(&mut staged).into_iter().unzip();
            let write = tokio::spawn(async move {
                for f in futures {
                    f.await?;
                }
                Ok(())
            });
            writing = Some((write, shipped));
        }
        let in_flight = staged.iter().map(|(_, s)| s).chain(writing.iter().flat_map(|(_, s)| s));
        let (records, bytes) = in_flight.fold((0, 0), |(r, b), s| (r + s.records, b + s.bytes));
        let room = if pipelined {
            records < MAX_STAGED_RECORDS && bytes < MAX_STAGED_BYTES
        } else {
            writing.is_none() && staged.is_empty()
        };
        if !open && writing.is_none() {
            return Ok(());
        }
        tokio::select! {
            done = async {
                match writing.as_mut() {
                    Some((w, _)) => w.await,
                    None => std::future::pending().await,
                }
            }, if writing.is_some() => {
                done.map_err(|e| CaptureError::Log(synapse_log::LogError::TaskFailed(e)))??;
                let shipped = writing.take().map(|(_, s)| s).unwrap_or_default();
                for s in shipped {
                    trace_durable(&source, &s.traced);
                    stats.events.fetch_add(s.events, Ordering::Relaxed);
                    stats.transactions.fetch_add(s.txns, Ordering::Relaxed);
                    events_total.increment(s.events);
                    txns_total.increment(s.txns);
                    if let Some((end, time)) = s.commit {
                        stats.durable_lsn.store(end, Ordering::Relaxed);
                        stats.last_commit_time_us.store(time, Ordering::Relaxed);
                        durable_lsn.set(end as f64);
                        durable.send_replace(end);
                    }
                }
            }
            batch = rx.recv(), if room && open => {
                let Some(first) = batch else {
                    open = false;
                    continue;
                };
                let limit = if pipelined { MAX_STAGED_RECORDS } else { MAX_COALESCED };
                let (records, shipped) = coalesce(first, &mut rx, limit);
                staged.push((Box::pin(log.stage(records)), shipped));
            }
        }
    }
}

/// `first` and whatever more is queued (up to `limit` records) as one vector sized once, and
/// what to report of it once durable.
fn coalesce(first: Batch, rx: &mut mpsc::Receiver<Batch>, limit: usize) -> (Vec<LogRecord>, Shipped) {
    let mut commit = first.commit;
    let mut queued = first.records.len();
    let mut bytes = first.bytes;
    let mut more = Vec::new();
    while queued < limit {
        match rx.try_recv() {
            Ok(next) => {
                queued += next.records.len();
                bytes += next.bytes;
                commit = next.commit.or(commit);
                more.push(next.records);
            }
            Err(_) => break,
        }
    }
    let records = if more.is_empty() {
        first.records
    } else {
        let mut all = Vec::with_capacity(queued);
        all.extend(first.records);
        more.into_iter().for_each(|m| all.extend(m));
        all
    };
    let (mut events, mut txns) = (0u64, 0u64);
    for r in &records {
        match r {
            LogRecord::Change(_) | LogRecord::Truncate(_) => events += 1,
            LogRecord::Commit(_) => txns += 1,
            _ => {}
        }
    }
    // Spans are made from the records before they move into the log.
    let traced: Vec<(i64, Lsn, u32, u32)> = if synapse_schemas::trace::enabled() {
        let mut xid = 0;
        records
            .iter()
            .filter_map(|r| match r {
                LogRecord::Begin(b) => {
                    xid = b.xid;
                    None
                }
                LogRecord::Commit(c) => Some((c.commit_time_us, c.commit_lsn, xid, c.event_count)),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    let shipped = Shipped { commit, events, txns, records: records.len(), bytes, traced };
    (records, shipped)
}

/// One span per transaction now durable in the log: source commit → durable
/// (`synapse_schemas::trace`; the root of the transaction's trace).
fn trace_durable(source: &str, traced: &[(i64, Lsn, u32, u32)]) {
    use synapse_schemas::trace::{self, KeyValue, Recorded, SpanKind};
    let end = std::time::SystemTime::now();
    for (time, lsn, xid, events) in traced {
        trace::record(Recorded {
            name: "capture",
            trace: trace::transaction_trace(source, *lsn),
            span: Some(trace::capture_span(source, *lsn)),
            parent: None,
            kind: SpanKind::Producer,
            start: trace::at_micros(*time),
            end,
            attributes: vec![
                KeyValue::new("synapse.source", source.to_owned()),
                KeyValue::new("synapse.commit_lsn", lsn.to_string()),
                KeyValue::new("synapse.xid", i64::from(*xid)),
                KeyValue::new("synapse.events", i64::from(*events)),
            ],
            links: &[],
            error: None,
        });
    }
}

/// A JSON array of strings, as the DDL capture's message holds names.
fn names(v: &serde_json::Value) -> Option<Vec<String>> {
    v.as_array()?.iter().map(|t| t.as_str().map(str::to_owned)).collect()
}

#[cfg(test)]
mod lateness_tests {
    use super::*;

    #[test]
    fn a_commit_much_later_than_usual_means_behind_whatever_the_clock_offset() {
        let now = synapse_schemas::unix_micros_now();
        // The source's clock 40 s ahead of ours: every commit looks 40 s early.
        let skew = -40_000_000;
        let mut l = Lateness::new();
        assert!(!l.behind(), "nothing seen yet");
        l.commit(now + 40_000_000 - 300);
        assert!(!l.behind());
        l.commit(now - skew - 1_000);
        assert!(!l.behind(), "0.7 ms later than usual is live traffic");
        l.commit(now - skew - 12_000);
        assert!(l.behind(), "12 ms later than usual: the walsender trails the source");
        l.commit(now - skew - 500);
        assert!(!l.behind(), "caught up again");
    }
}
