//! The durable change log between capture and its consumers.
//!
//! ```text
//!  capture ──append(batch)──▶ ┌──────────────┐ ──read(from)──▶ apply, connectors
//!                             │  ChangeLog    │
//!     relation registry ◀─────│ (one stream   │ ◀── commit_consumer(name, next)
//!                             │ per source)   │ ──▶ retention: drop what all consumers passed
//!                             └──────────────┘
//! ```
//!
//! [`ChangeLog`] is the one trait; [`EmbeddedLog`] (redb, one file per source node) is the
//! one-machine default, [`KafkaLog`] implements the same contract on a Kafka-protocol broker,
//! and [`SourceLog`] is whichever of the two a deployment configured.

mod chosen;
mod embedded;
mod error;
mod kafka;

pub use chosen::SourceLog;
pub use embedded::{EmbeddedLog, EmbeddedLogOptions};
pub use error::LogError;
pub use kafka::{
    KafkaContext, KafkaLog, KafkaLogOptions, SigningKey, DEFAULT_MAX_MESSAGE_BYTES as DEFAULT_KAFKA_MAX_MESSAGE_BYTES,
};

use std::future::Future;
use std::time::Duration;
use synapse_schemas::{Cursor, LogRecord, Lsn, Relation, RelationKey, ResyncMark};

/// Position of a record in a stream. Offsets only grow; they are never reused, even after a
/// writer recovery or retention.
pub type Offset = u64;

/// What a writer must know to resume without duplicating transactions in the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriterState {
    /// `end_lsn` of the last transaction whose `Commit` is in the log. A restarted capture skips
    /// every transaction whose end LSN is at or below it.
    pub last_commit_end: Option<Lsn>,
    /// Offset the next appended record gets.
    pub next_offset: Offset,
    /// The source and slot the log was last written from ([`ChangeLog::record_source`]).
    pub source: Option<SourceIdentity>,
}

/// The source server and slot a log is written from, kept beside its records so a capture can
/// tell its own slot from one made by someone else, or a slot on another server.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceIdentity {
    /// The server's system identifier (`IDENTIFY_SYSTEM`; a streaming standby shares it).
    pub system_id: String,
    /// The server's timeline when last seen (a promotion starts a new one).
    pub timeline: u32,
    pub slot: String,
    /// The furthest position capture confirmed to the slot past the log's last commit (idle
    /// keepalives), recorded before it was confirmed: the slot's `confirmed_flush_lsn` never
    /// passes `max(last_commit_end, confirmed)`; a slot that did was made by someone else.
    pub confirmed: Lsn,
}

/// Where a reader resumes after a cursor (see [`ChangeLog::seek`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    /// Read from this offset: the `Begin` of the cursor's transaction when part of it is still
    /// to be read (the reader skips records at or before the cursor), else of the next
    /// transaction, else the head.
    At(Offset),
    /// Retention already deleted records a reader after this cursor needs. `oldest` is the
    /// commit LSN of the oldest transaction still fully readable, if any.
    Gone { oldest: Option<Lsn> },
}

/// One source node's change stream.
///
/// # Contract
/// * **Durability**: when `append` resolves `Ok`, every record of the batch is durable (fsynced)
///   and readable; on `Err` none of them is visible to `read`. Capture advances the replication
///   slot only to the end LSN of the last `Commit` it has seen acknowledged here. Only
///   [`ChangeLog::read_early`] may see a batch before that, and learns when one was dropped;
///   consumer positions ([`ChangeLog::commit_consumer`]) never pass the durable records.
/// * **Ordering**: records are read back in append order. Transactions never interleave; a
///   transaction's records may span several `append` calls (large transactions stream through
///   in bounded batches), so a reader can see a `Begin` whose `Commit` is not yet written.
/// * **Incomplete transactions**: after a writer crash, [`ChangeLog::recover_writer`] appends a
///   `LogRecord::Discarded` marker after an unfinished transaction; readers that applied part of
///   it roll back to their last committed position and skip it.
/// * **Partitioning**: a stream keeps one total order, which implies per-row order (changes of
///   one table + primary key). A partitioned implementation (Kafka) partitions by table + key
///   and carries per-partition event counts in `Commit` metadata so readers can reassemble.
/// * **Concurrency**: one writer per stream; any number of concurrent readers.
/// * **Gaps**: a `LogRecord::Resync` stands between transactions where the source's stream
///   has a gap; [`ChangeLog::resync_marks`] lists them for as long as the log exists.
/// * **Consumer positions** are advisory for retention: exactly-once consumers (apply) keep their
///   own position transactionally with their output and also report it here.
pub trait ChangeLog: Send + Sync + 'static {
    /// Appends `records` in order; resolves once they are durable. Returns the offset of the last.
    fn append(&self, records: Vec<LogRecord>) -> impl Future<Output = Result<Offset, LogError>> + Send;

    /// Appends in two steps, for a writer that keeps going while the log writes: the call gives
    /// `records` their offsets (in call order) and, on a log that reads early, makes them
    /// readable early at once; the future resolves once they are durable, with the offset of
    /// the last. Futures of successive stages may run concurrently on a log that reads early
    /// (the embedded log writes everything staged in one store transaction); on other logs the
    /// records are appended when the future first runs, so each must resolve before the next
    /// `stage` is called. After a failed write, a log that reads early refuses every stage
    /// ([`LogError::NotRecovered`]) until [`ChangeLog::recover_writer`]: what a writer staged
    /// before it learned of the failure would follow records that were dropped.
    fn stage(&self, records: Vec<LogRecord>) -> impl Future<Output = Result<Offset, LogError>> + Send + 'static
    where
        Self: Clone,
    {
        let log = self.clone();
        async move { log.append(records).await }
    }

    /// Reads up to `max` records starting at `from` (records below retention are skipped).
    fn read(&self, from: Offset, max: usize)
        -> impl Future<Output = Result<Vec<(Offset, LogRecord)>, LogError>> + Send;

    /// Resolves when a record at `from` or later is readable, or after `timeout`.
    fn wait_readable(&self, from: Offset, timeout: Duration) -> impl Future<Output = ()> + Send;

    /// Offset the next appended record gets (the high-water mark). A reader at `last + 1` of
    /// the last record is caught up when this equals its position.
    fn next_offset(&self) -> Offset;

    /// Records between `from` and the head, for lag metrics. Offsets of the embedded log are
    /// dense; a log whose offsets are not (Kafka) counts its records.
    fn records_behind(&self, from: Offset) -> u64 {
        self.next_offset().saturating_sub(from)
    }

    /// Reads like [`ChangeLog::read`], and also records whose `append` has not resolved yet: the
    /// embedded log keeps its newest batches in memory from before their fsync, so an applier
    /// need not wait for it nor read the records back. Such records are **not durable**: a crash
    /// or a failed append loses them, and their offsets go to other records. Only a consumer
    /// that stores the commit LSN of the last transaction it acted on with its offset, and checks
    /// the offset against it on restart, may act on them (apply does). Fails with
    /// [`LogError::Rewound`] once records readable early were dropped since `epoch` was read
    /// ([`ChangeLog::early_epoch`]). A log without an early tail reads durable records only.
    fn read_early(
        &self,
        from: Offset,
        max: usize,
        epoch: u64,
    ) -> impl Future<Output = Result<Vec<(Offset, LogRecord)>, LogError>> + Send {
        let _ = epoch;
        self.read(from, max)
    }

    /// Whether [`ChangeLog::read_early`] can return records that are not durable yet.
    fn reads_early(&self) -> bool {
        false
    }

    /// How many times records readable early were dropped (see [`ChangeLog::read_early`]).
    fn early_epoch(&self) -> u64 {
        0
    }

    /// The end of what [`ChangeLog::read_early`] can return (at least [`ChangeLog::next_offset`]).
    fn early_head(&self) -> Offset {
        self.next_offset()
    }

    /// Resolves when a record at `from` or later is readable early, or after `timeout`.
    fn wait_early(&self, from: Offset, timeout: Duration) -> impl Future<Output = ()> + Send {
        self.wait_readable(from, timeout)
    }

    /// Looks up a relation version that some appended `LogRecord::Relation` registered.
    fn relation(&self, key: RelationKey) -> impl Future<Output = Result<Option<Relation>, LogError>> + Send;

    /// The version of table `oid` registered last before offset `before` (`None` if none was):
    /// lets a reader that starts mid-stream tell a schema change from a table's first definition.
    fn previous_relation(
        &self,
        oid: u32,
        before: Offset,
    ) -> impl Future<Output = Result<Option<RelationKey>, LogError>> + Send;

    /// Durably records the source and slot this log is written from (read back by
    /// [`ChangeLog::recover_writer`]).
    fn record_source(&self, source: &SourceIdentity) -> impl Future<Output = Result<(), LogError>> + Send;

    /// Called by a writer before its first append and after a failed one: closes an
    /// unfinished transaction with a `Discarded` marker and tells where to resume.
    fn recover_writer(&self) -> impl Future<Output = Result<WriterState, LogError>> + Send;

    /// Every `LogRecord::Resync` ever appended, with its offset, oldest first. Kept after
    /// retention deleted the record itself: a reader resuming from a cursor before a gap must
    /// be told about the gap, not led past it.
    fn resync_marks(&self) -> impl Future<Output = Result<Vec<(Offset, ResyncMark)>, LogError>> + Send;

    /// Records that consumer `name` has durably processed everything below `next`.
    fn commit_consumer(&self, name: &str, next: Offset) -> impl Future<Output = Result<(), LogError>> + Send;

    /// The position last committed by consumer `name`.
    fn consumer_position(&self, name: &str) -> impl Future<Output = Result<Option<Offset>, LogError>> + Send;

    /// Forgets consumer `name` (it no longer holds back retention).
    fn remove_consumer(&self, name: &str) -> impl Future<Output = Result<(), LogError>> + Send;

    /// Every registered consumer with its position, by name.
    fn consumers(&self) -> impl Future<Output = Result<Vec<(String, Offset)>, LogError>> + Send;

    /// Finds where to read to get everything after `after` (a transaction's commit LSN and an
    /// index in it; `index` ≥ the transaction's event count means "after the whole
    /// transaction"). Exact: `Gone` only when a record the reader needs was deleted.
    fn seek(&self, after: Cursor) -> impl Future<Output = Result<Seek, LogError>> + Send;

    /// Finds the first transaction committed at or after `commit_time_us` (µs since the Unix
    /// epoch) and returns the cursor just before it, for replays by time. `None` if there is
    /// no such transaction yet (resume from the head).
    fn cursor_at_time(&self, commit_time_us: i64) -> impl Future<Output = Result<Option<Cursor>, LogError>> + Send;

    /// The cursor after the last committed transaction in the log (`None` if empty): a
    /// subscriber that starts here misses nothing committed later.
    fn head_cursor(&self) -> impl Future<Output = Result<Option<Cursor>, LogError>> + Send;

    /// Deletes records that every registered consumer has passed and, when `keep_since_us` is
    /// given, that belong to transactions committed before it (µs since the Unix epoch: the
    /// window stream readers, which are not consumers, can resume in). Without consumers and
    /// without `keep_since_us` nothing is deleted. An implementation may keep more (e.g. a
    /// storage chunk still holding needed records). Returns how many were deleted.
    fn apply_retention(&self, keep_since_us: Option<i64>) -> impl Future<Output = Result<u64, LogError>> + Send;
}
