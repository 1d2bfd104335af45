//! The embedded log: one redb file per source node.
//!
//! Why redb: pure Rust (no C toolchain), ACID write transactions with a single fsync at commit
//! (one write takes every batch staged so far: group commit), MVCC readers that never block the
//! writer, and a stable file format. Staged batches are readable early from memory (`tail.rs`,
//! decision 0025) until and shortly after they are written. Records are stored in chunks (up
//! to [`CHUNK_RECORDS`] records or [`CHUNK_BYTES`] per B-tree value, keyed by the chunk's first
//! offset): one tree insert per chunk instead of per record made appends ~4× cheaper in
//! `synapse-bench` P1/P3, and reads become sequential.

use crate::{ChangeLog, LogError, Offset, Seek, WriterState};
use redb::{Database, ReadableTable, TableDefinition};
use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_schemas::{Cursor, LogRecord, Lsn, Relation, RelationKey, ResyncMark};
use tokio::sync::watch;

mod tail;

/// First offset of a chunk → `[u32 LE length][postcard record]…`.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
pub const CHUNK_RECORDS: usize = 4_096;
pub const CHUNK_BYTES: usize = 1 << 20;
const RELATIONS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("relations");
/// (table OID, offset of its `Relation` record) → version: the order definitions appeared in.
const RELATION_HISTORY: TableDefinition<(u32, u64), u64> = TableDefinition::new("relation_history");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Offset → the encoded `LogRecord::Resync` there. Kept when retention deletes the record: a
/// cursor from before a gap must still be told about it.
const RESYNCS: TableDefinition<u64, &[u8]> = TableDefinition::new("resyncs");
/// `"source"` → the encoded [`crate::SourceIdentity`].
const SOURCE: TableDefinition<&str, &[u8]> = TableDefinition::new("source");
const CONSUMERS: TableDefinition<&str, u64> = TableDefinition::new("consumers");
/// Transaction index for seeks by cursor and time: commit LSN → (offset of `Begin`, offset of
/// `Commit` or [`OPEN`], event count, commit time µs). Both offsets and the LSN only grow.
const TXNS: TableDefinition<u64, (u64, u64, u32, i64)> = TableDefinition::new("txns");
const OPEN: u64 = u64::MAX;

const CACHE_BYTES: usize = 32 << 20;
const NEXT_OFFSET: &str = "next_offset";
const LAST_COMMIT_END: &str = "last_commit_end";
/// Commit LSN of a transaction whose `Begin` is written but whose `Commit` is not.
const OPEN_TXN: &str = "open_txn";
/// Commit LSN and event count of the newest transaction retention deleted completely.
const GONE_LSN: &str = "gone_lsn";
const GONE_EVENTS: &str = "gone_events";

#[derive(Clone, Debug, Default)]
pub struct EmbeddedLogOptions {
    /// Skip fsync at commit. Only for benchmarks of everything but the disk; a crash may lose
    /// acknowledged records, which breaks the slot contract.
    pub unsafe_no_fsync: bool,
}

/// A batch encoded and given its offsets, waiting for the next store write.
struct Staged {
    first: Offset,
    records: Arc<Vec<LogRecord>>,
    frames: Vec<u8>,
    spans: Vec<std::ops::Range<usize>>,
}

#[derive(Default)]
struct Newest {
    tail: tail::Tail,
    staged: VecDeque<Staged>,
    /// A write failed and the writer has not recovered since ([`ChangeLog::recover_writer`]):
    /// what it stages meanwhile follows records that were dropped, so it is refused. (Given
    /// the offsets after the durable head, it was written ahead of the dropped records, which
    /// capture decodes again on resuming, and appliers skipped those as already applied.)
    failed: bool,
}

/// The one-machine [`ChangeLog`]. Cheap to clone; clones share the file.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` after an I/O error: redb refuses all use of a database that met one ("close and
    /// re-open"), so the next call reopens it — which succeeds once the cause (a full disk)
    /// is gone, with the store as of its last commit.
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
    /// The file's stem (the source's name): the `log` label of its metrics, made once.
    label: String,
    head: watch::Sender<Offset>,
    /// The end of the records readable early: `head` plus every batch staged since.
    early: watch::Sender<Offset>,
    /// The newest batches (readable early) and those staged but not yet written, under one
    /// lock: a batch gets its offsets, its place in the tail and in the write queue at once.
    newest: std::sync::Mutex<Newest>,
    /// One store write at a time; it writes every batch staged so far (group commit).
    flusher: tokio::sync::Mutex<()>,
    options: EmbeddedLogOptions,
}

impl EmbeddedLog {
    /// Opens (or creates) the stream stored at `path`.
    pub fn open(path: &Path, options: EmbeddedLogOptions) -> Result<Self, LogError> {
        let storage = |e: redb::Error| LogError::Storage { path: path.display().to_string(), source: Box::new(e) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| storage(redb::Error::Io(e)))?;
        }
        if !path.exists() {
            create_atomically(path).map_err(|e| storage(*e))?;
        }
        let db = open_db(path).map_err(|e| storage(*e))?;
        let tx = db.begin_write().map_err(|e| storage(e.into()))?;
        let next = {
            tx.open_table(RECORDS).map_err(|e| storage(e.into()))?;
            tx.open_table(RELATIONS).map_err(|e| storage(e.into()))?;
            tx.open_table(CONSUMERS).map_err(|e| storage(e.into()))?;
            tx.open_table(TXNS).map_err(|e| storage(e.into()))?;
            tx.open_table(RELATION_HISTORY).map_err(|e| storage(e.into()))?;
            tx.open_table(RESYNCS).map_err(|e| storage(e.into()))?;
            tx.open_table(SOURCE).map_err(|e| storage(e.into()))?;
            let meta = tx.open_table(META).map_err(|e| storage(e.into()))?;
            let next = meta.get(NEXT_OFFSET).map_err(|e| storage(e.into()))?.map(|v| v.value());
            next.unwrap_or(0)
        };
        tx.commit().map_err(|e| storage(e.into()))?;
        let (head, _) = watch::channel(next);
        let (early, _) = watch::channel(next);
        let db = std::sync::RwLock::new(Some(db));
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                db,
                path: path.to_owned(),
                label: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                head,
                early,
                newest: Default::default(),
                flusher: Default::default(),
                options,
            }),
        })
    }

    /// Resolves once every record below `end` is durable: writes everything staged so far in
    /// one store transaction unless a write before it covered `end` (a batch is staged before
    /// its flush is called, so a write that succeeds always covers it).
    async fn flush(&self, end: Offset) -> Result<(), LogError> {
        let _flusher = self.inner.flusher.lock().await;
        if *self.inner.head.borrow() >= end {
            return Ok(());
        }
        let batches: Vec<Staged> = self.inner.newest().staged.drain(..).collect();
        let head = *self.inner.head.borrow();
        if batches.first().is_none_or(|b| b.first != head) {
            // Staged, then dropped by a failed write before it; or a write that never finished
            // (a panic) left them after a gap: nothing staged may be written at other offsets
            // than readers were given.
            self.inner.rewind();
            return Err(LogError::Rewound { offset: head });
        }
        let started = Instant::now();
        let count: u64 = batches.iter().map(|b| b.records.len() as u64).sum();
        let bytes: u64 = batches.iter().map(|b| b.frames.len() as u64).sum();
        let written = self
            .blocking(move |inner, db| {
                let result = write_batches(inner, db, &batches);
                if result.is_err() {
                    inner.rewind();
                }
                result
            })
            .await;
        if let Err(e) = written {
            self.inner.rewind();
            return Err(e);
        }
        // One series per log file: each source has its own.
        let log = self.inner.label.clone();
        metrics::counter!("synapse_log_appended_records_total", "log" => log.clone()).increment(count);
        metrics::counter!("synapse_log_appended_bytes_total", "log" => log.clone()).increment(bytes);
        metrics::histogram!("synapse_log_append_seconds", "log" => log).record(started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &Database) -> Result<T, Box<redb::Error>> + Send + 'static,
    ) -> Result<T, LogError> {
        let inner = self.inner.clone();
        let storage = |source| LogError::Storage { path: inner.path.display().to_string(), source };
        // On the multi-threaded runtime the store runs right here (`block_in_place` moves this
        // worker's other tasks away): handing each append and read to a blocking thread cost a
        // context switch per call, the top kernel symbol of the P1 profile.
        if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            return tokio::task::block_in_place(|| inner.with_db(f)).map_err(storage);
        }
        let moved = inner.clone();
        tokio::task::spawn_blocking(move || moved.with_db(f)).await.map_err(LogError::TaskFailed)?.map_err(storage)
    }
}

impl Inner {
    fn newest(&self) -> std::sync::MutexGuard<'_, Newest> {
        // Neither holds an invariant a panicking holder could break half-way.
        self.newest.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Encodes `records`, gives them the next offsets, makes them readable early and queues
    /// them for the next store write. Returns the offset after the last.
    fn stage(&self, records: Vec<LogRecord>) -> Result<Offset, LogError> {
        // Encoded on the caller's thread, straight into length-prefixed frames.
        let mut frames: Vec<u8> = Vec::with_capacity(records.len() * 64);
        let mut spans = Vec::with_capacity(records.len());
        for r in &records {
            let at = frames.len();
            frames.extend_from_slice(&[0; 4]);
            frames = postcard::to_extend(r, frames).map_err(LogError::Encode)?;
            let len = (frames.len() - at - 4) as u32;
            frames[at..at + 4].copy_from_slice(&len.to_le_bytes());
            spans.push(at..frames.len());
        }
        let records = Arc::new(records);
        let mut newest = self.newest();
        if newest.failed {
            return Err(LogError::NotRecovered { offset: *self.head.borrow() });
        }
        let first = *self.early.borrow();
        let end = first + records.len() as Offset;
        newest.tail.push(first, records.clone(), frames.len(), *self.head.borrow());
        newest.staged.push_back(Staged { first, records, frames, spans });
        self.early.send_replace(end);
        Ok(end)
    }

    /// Forgets what was staged or readable early but never became durable (a write failed),
    /// and refuses stages until the writer recovers.
    fn rewind(&self) {
        let mut newest = self.newest();
        let durable = *self.head.borrow();
        newest.tail.rewind(durable);
        newest.staged.clear();
        newest.failed = true;
        self.early.send_replace(durable);
    }

    /// Takes stages again, from `next`: the store's head as of its last commit. A commit that
    /// reported an I/O error may still have become durable; its records are then read from
    /// the store, and the offsets go on after them.
    fn recovered(&self, next: Offset) {
        let mut newest = self.newest();
        if !newest.failed && newest.staged.is_empty() && *self.head.borrow() == next {
            return;
        }
        newest.tail.rewind(next.min(*self.head.borrow()));
        newest.staged.clear();
        newest.failed = false;
        self.head.send_replace(next);
        self.early.send_replace(next);
    }

    /// Runs `f` on the store, reopening it first if an I/O error closed it, and closing it
    /// when `f` meets one (see [`Inner::db`]). Nothing `f` did in a transaction that failed
    /// is visible: the reopened store is as of its last commit.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Inner, &Database) -> Result<T, Box<redb::Error>>,
    ) -> Result<T, Box<redb::Error>> {
        fn poisoned<G>(_: G) -> Box<redb::Error> {
            Box::new(redb::Error::LockPoisoned(std::panic::Location::caller()))
        }
        if self.db.read().map_err(poisoned)?.is_none() {
            let mut slot = self.db.write().map_err(poisoned)?;
            if slot.is_none() {
                *slot = Some(open_db(&self.path)?);
                tracing::info!(path = %self.path.display(), "reopened the log store after an I/O error");
            }
        }
        let guard = self.db.read().map_err(poisoned)?;
        let Some(db) = guard.as_ref() else { return Err(Box::new(redb::Error::PreviousIo)) };
        let result = f(self, db);
        drop(guard);
        if let Err(e) = &result {
            if matches!(**e, redb::Error::Io(_) | redb::Error::PreviousIo) {
                tracing::warn!(path = %self.path.display(), error = %e, "the log store met an I/O error; it is reopened on next use");
                if let Ok(mut slot) = self.db.write() {
                    *slot = None;
                }
            }
        }
        result
    }
}

/// Opens the store. redb's default page cache is 1 GiB; the log is read sequentially, so a
/// small cache keeps the process's memory flat (benchmark P7).
fn open_db(path: &Path) -> Result<Database, Box<redb::Error>> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(write_err)
}

/// Creates an empty store at `path` so that a crash (kill -9, power loss) while creating it
/// never leaves a half-written file there: it is made beside it as `<path>.new`, committed,
/// synced and renamed into place. A `.new` left by such a crash held nothing yet (the log is
/// used only after `open` returns) and is replaced. (A crash during redb's own file creation
/// left a file that every later start refused with "invalid data".)
fn create_atomically(path: &Path) -> Result<(), Box<redb::Error>> {
    let mut fresh = path.as_os_str().to_owned();
    fresh.push(".new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    {
        let db = Database::create(&fresh).map_err(write_err)?;
        let tx = db.begin_write().map_err(write_err)?;
        tx.open_table(META).map_err(write_err)?;
        tx.commit().map_err(write_err)?;
    }
    std::fs::File::open(&fresh).and_then(|f| f.sync_all()).map_err(write_err)?;
    std::fs::rename(&fresh, path).map_err(write_err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)?;
    }
    Ok(())
}

fn write_err<E: Into<redb::Error>>(e: E) -> Box<redb::Error> {
    Box::new(e.into())
}

/// Writes staged batches and their index entries in one store transaction (one fsync), then
/// moves the durable head. Each batch starts a chunk.
fn write_batches(inner: &Inner, db: &Database, batches: &[Staged]) -> Result<(), Box<redb::Error>> {
    let mut tx = db.begin_write().map_err(write_err)?;
    if inner.options.unsafe_no_fsync {
        tx.set_durability(redb::Durability::None);
    }
    let next = {
        let mut meta = tx.open_table(META).map_err(write_err)?;
        let mut table = tx.open_table(RECORDS).map_err(write_err)?;
        let mut rels = tx.open_table(RELATIONS).map_err(write_err)?;
        let mut txns = tx.open_table(TXNS).map_err(write_err)?;
        let mut history = tx.open_table(RELATION_HISTORY).map_err(write_err)?;
        let mut resyncs = tx.open_table(RESYNCS).map_err(write_err)?;
        // (commit LSN, Begin offset, commit time) of a transaction begun in these batches.
        let mut begun: Option<(u64, u64, i64)> = None;
        let mut next = meta.get(NEXT_OFFSET).map_err(write_err)?.map(|v| v.value()).unwrap_or(0);
        if let Some(b) = batches.first().filter(|b| b.first != next) {
            // Readers were given other offsets for these records than the store would give them.
            return Err(Box::new(redb::Error::Corrupted(format!(
                "records staged at offset {} but the store's next offset is {next}",
                b.first
            ))));
        }
        let mut open = meta.get(OPEN_TXN).map_err(write_err)?.map(|v| v.value());
        let mut last_end = None;
        for Staged { records, frames, spans, .. } in batches {
            let mut chunk_start = next;
            let mut chunk_from = 0;
            for (r, span) in records.iter().zip(spans) {
                if next > chunk_start
                    && (next - chunk_start >= CHUNK_RECORDS as u64 || span.start - chunk_from >= CHUNK_BYTES)
                {
                    table.insert(chunk_start, &frames[chunk_from..span.start]).map_err(write_err)?;
                    chunk_start = next;
                    chunk_from = span.start;
                }
                let offset = next;
                next += 1;
                match r {
                    LogRecord::Begin(b) => {
                        open = Some(b.commit_lsn.0);
                        begun = Some((b.commit_lsn.0, offset, b.commit_time_us));
                    }
                    LogRecord::Commit(c) => {
                        open = None;
                        last_end = Some(c.end_lsn.0);
                        let lsn = c.commit_lsn.0;
                        let begin = match begun.take() {
                            Some((l, b, _)) if l == lsn => Some(b),
                            _ => txns.get(lsn).map_err(write_err)?.map(|v| v.value().0),
                        };
                        if let Some(b) = begin {
                            txns.insert(lsn, (b, offset, c.event_count, c.commit_time_us)).map_err(write_err)?;
                        }
                    }
                    LogRecord::Discarded { commit_lsn } => {
                        open = None;
                        begun = None;
                        let partial = txns.get(commit_lsn.0).map_err(write_err)?.map(|v| v.value().1 == OPEN);
                        if partial == Some(true) {
                            txns.remove(commit_lsn.0).map_err(write_err)?;
                        }
                    }
                    LogRecord::Relation(rel) => {
                        let k = rel.key();
                        rels.insert((k.oid, k.version), &frames[span.start + 4..span.end]).map_err(write_err)?;
                        history.insert((k.oid, offset), k.version).map_err(write_err)?;
                    }
                    LogRecord::Resync(_) => {
                        resyncs.insert(offset, &frames[span.start + 4..span.end]).map_err(write_err)?;
                    }
                    _ => {}
                }
            }
            if chunk_from < frames.len() {
                table.insert(chunk_start, &frames[chunk_from..]).map_err(write_err)?;
            }
        }
        if let Some((lsn, b, t)) = begun {
            txns.insert(lsn, (b, OPEN, 0, t)).map_err(write_err)?;
        }
        meta.insert(NEXT_OFFSET, next).map_err(write_err)?;
        match open {
            Some(lsn) => meta.insert(OPEN_TXN, lsn).map_err(write_err)?,
            None => meta.remove(OPEN_TXN).map_err(write_err)?,
        };
        if let Some(end) = last_end {
            meta.insert(LAST_COMMIT_END, end).map_err(write_err)?;
        }
        next
    };
    tx.commit().map_err(write_err)?;
    inner.head.send_replace(next);
    Ok(())
}

impl ChangeLog for EmbeddedLog {
    async fn append(&self, records: Vec<LogRecord>) -> Result<Offset, LogError> {
        self.stage(records).await
    }

    fn stage(&self, records: Vec<LogRecord>) -> impl Future<Output = Result<Offset, LogError>> + Send + 'static {
        let staged = self.inner.stage(records);
        let log = self.clone();
        async move {
            let end = staged?;
            log.flush(end).await?;
            Ok(end - 1)
        }
    }

    async fn read(&self, from: Offset, max: usize) -> Result<Vec<(Offset, LogRecord)>, LogError> {
        self.blocking(move |_, db| {
            let tx = db.begin_read().map_err(write_err)?;
            let table = tx.open_table(RECORDS).map_err(write_err)?;
            // The chunk holding `from` starts at or before it.
            let first = match table.range(..=from).map_err(write_err)?.next_back() {
                Some(item) => item.map_err(write_err)?.0.value(),
                None => from,
            };
            let mut out = Vec::with_capacity(max.min(4096));
            for item in table.range(first..).map_err(write_err)? {
                let (k, v) = item.map_err(write_err)?;
                let mut offset = k.value();
                let mut bytes = v.value();
                while !bytes.is_empty() && out.len() < max {
                    let corrupt = |source| Ok(Err(LogError::Corrupt { offset, source }));
                    let Some((len, rest)) = bytes.split_first_chunk::<4>() else {
                        return corrupt(postcard::Error::DeserializeUnexpectedEnd);
                    };
                    let len = u32::from_le_bytes(*len) as usize;
                    let Some((record, rest)) = rest.split_at_checked(len) else {
                        return corrupt(postcard::Error::DeserializeUnexpectedEnd);
                    };
                    if offset >= from {
                        match postcard::from_bytes(record) {
                            Ok(r) => out.push((offset, r)),
                            Err(source) => return corrupt(source),
                        }
                    }
                    bytes = rest;
                    offset += 1;
                }
                if out.len() >= max {
                    break;
                }
            }
            Ok(Ok(out))
        })
        .await?
    }

    async fn wait_readable(&self, from: Offset, timeout: Duration) {
        let mut rx = self.inner.head.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|head| *head > from)).await;
    }

    fn next_offset(&self) -> Offset {
        *self.inner.head.borrow()
    }

    async fn read_early(&self, from: Offset, max: usize, epoch: u64) -> Result<Vec<(Offset, LogRecord)>, LogError> {
        let slices = {
            let tail = &self.inner.newest().tail;
            if tail.epoch() != epoch {
                return Err(LogError::Rewound { offset: from });
            }
            match tail.start() {
                Some(start) if from >= start => Some(tail.slices(from, max)),
                _ => None,
            }
        };
        let Some(slices) = slices else { return self.read(from, max).await };
        // Cloned outside the lock: the writer publishes its next batch meanwhile.
        let mut out = Vec::with_capacity(slices.iter().map(|(_, _, r)| r.len()).sum());
        for (at, batch, range) in slices {
            out.extend((at..).zip(batch[range].iter().cloned()));
        }
        Ok(out)
    }

    fn reads_early(&self) -> bool {
        true
    }

    fn early_epoch(&self) -> u64 {
        self.inner.newest().tail.epoch()
    }

    fn early_head(&self) -> Offset {
        *self.inner.early.borrow()
    }

    async fn wait_early(&self, from: Offset, timeout: Duration) {
        let mut rx = self.inner.early.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|head| *head > from)).await;
    }

    async fn relation(&self, key: RelationKey) -> Result<Option<Relation>, LogError> {
        // Registered by a batch still being written, for a reader that read it early.
        if let Some(rel) = self.inner.newest().tail.relation(key) {
            return Ok(Some(rel));
        }
        let raw = self
            .blocking(move |_, db| {
                let tx = db.begin_read().map_err(write_err)?;
                let table = tx.open_table(RELATIONS).map_err(write_err)?;
                let v = table.get((key.oid, key.version)).map_err(write_err)?;
                Ok(v.map(|v| v.value().to_vec()))
            })
            .await?;
        match raw {
            None => Ok(None),
            Some(bytes) => match postcard::from_bytes(&bytes) {
                Ok(LogRecord::Relation(r)) => Ok(Some(r)),
                Ok(_) => Ok(None),
                Err(source) => Err(LogError::Corrupt { offset: 0, source }),
            },
        }
    }

    async fn previous_relation(&self, oid: u32, before: Offset) -> Result<Option<RelationKey>, LogError> {
        self.blocking(move |_, db| {
            let tx = db.begin_read().map_err(write_err)?;
            let history = tx.open_table(RELATION_HISTORY).map_err(write_err)?;
            let last = history.range((oid, 0)..(oid, before)).map_err(write_err)?.next_back();
            Ok(match last {
                Some(item) => Some(RelationKey { oid, version: item.map_err(write_err)?.1.value() }),
                None => None,
            })
        })
        .await
    }

    async fn recover_writer(&self) -> Result<WriterState, LogError> {
        let (open, last_end, next, source) = self
            .blocking(|_, db| {
                let tx = db.begin_read().map_err(write_err)?;
                let meta = tx.open_table(META).map_err(write_err)?;
                let get = |k| meta.get(k).map(|v| v.map(|v| v.value()));
                let source = tx.open_table(SOURCE).map_err(write_err)?;
                let source = source.get("source").map_err(write_err)?.map(|v| v.value().to_vec());
                Ok((
                    get(OPEN_TXN).map_err(write_err)?,
                    get(LAST_COMMIT_END).map_err(write_err)?,
                    get(NEXT_OFFSET).map_err(write_err)?,
                    source,
                ))
            })
            .await?;
        let source = match source {
            Some(bytes) => {
                Some(postcard::from_bytes(&bytes).map_err(|source| LogError::Corrupt { offset: 0, source })?)
            }
            None => None,
        };
        let mut next = next.unwrap_or(0);
        self.inner.recovered(next);
        if let Some(lsn) = open {
            tracing::warn!(commit_lsn = %Lsn(lsn), "discarding a transaction the previous writer left unfinished");
            next = self.append(vec![LogRecord::Discarded { commit_lsn: Lsn(lsn) }]).await? + 1;
        }
        Ok(WriterState { last_commit_end: last_end.map(Lsn), next_offset: next, source })
    }

    async fn record_source(&self, source: &crate::SourceIdentity) -> Result<(), LogError> {
        let bytes = postcard::to_stdvec(source).map_err(LogError::Encode)?;
        self.blocking(move |_, db| {
            let tx = db.begin_write().map_err(write_err)?;
            tx.open_table(SOURCE).map_err(write_err)?.insert("source", bytes.as_slice()).map_err(write_err)?;
            tx.commit().map_err(write_err)?;
            Ok(())
        })
        .await
    }

    async fn commit_consumer(&self, name: &str, next: Offset) -> Result<(), LogError> {
        let name = name.to_owned();
        // A consumer that read early may be past the durable records; retention must never pass
        // them (a crash would give their offsets to other records).
        let next = next.min(self.next_offset());
        self.blocking(move |_, db| {
            let tx = db.begin_write().map_err(write_err)?;
            tx.open_table(CONSUMERS).map_err(write_err)?.insert(name.as_str(), next).map_err(write_err)?;
            tx.commit().map_err(write_err)?;
            Ok(())
        })
        .await
    }

    async fn resync_marks(&self) -> Result<Vec<(Offset, ResyncMark)>, LogError> {
        let raw = self
            .blocking(move |_, db| {
                let tx = db.begin_read().map_err(write_err)?;
                let t = tx.open_table(RESYNCS).map_err(write_err)?;
                let mut all = Vec::new();
                for entry in t.iter().map_err(write_err)? {
                    let (k, v) = entry.map_err(write_err)?;
                    all.push((k.value(), v.value().to_vec()));
                }
                Ok(all)
            })
            .await?;
        let mut marks = Vec::with_capacity(raw.len());
        for (offset, bytes) in raw {
            match postcard::from_bytes(&bytes) {
                Ok(LogRecord::Resync(m)) => marks.push((offset, m)),
                Ok(_) => {}
                Err(source) => return Err(LogError::Corrupt { offset, source }),
            }
        }
        Ok(marks)
    }

    async fn consumer_position(&self, name: &str) -> Result<Option<Offset>, LogError> {
        let name = name.to_owned();
        self.blocking(move |_, db| {
            let tx = db.begin_read().map_err(write_err)?;
            let t = tx.open_table(CONSUMERS).map_err(write_err)?;
            let v = t.get(name.as_str()).map_err(write_err)?.map(|v| v.value());
            Ok(v)
        })
        .await
    }

    async fn consumers(&self) -> Result<Vec<(String, Offset)>, LogError> {
        self.blocking(move |_, db| {
            let tx = db.begin_read().map_err(write_err)?;
            let t = tx.open_table(CONSUMERS).map_err(write_err)?;
            let mut all = Vec::new();
            for entry in t.iter().map_err(write_err)? {
                let (k, v) = entry.map_err(write_err)?;
                all.push((k.value().to_owned(), v.value()));
            }
            Ok(all)
        })
        .await
    }

    async fn remove_consumer(&self, name: &str) -> Result<(), LogError> {
        let name = name.to_owned();
        self.blocking(move |_, db| {
            let tx = db.begin_write().map_err(write_err)?;
            tx.open_table(CONSUMERS).map_err(write_err)?.remove(name.as_str()).map_err(write_err)?;
            tx.commit().map_err(write_err)?;
            Ok(())
        })
        .await
    }

    async fn seek(&self, after: Cursor) -> Result<Seek, LogError> {
        self.blocking(move |_, db| {
            let tx = db.begin_read().map_err(write_err)?;
            let records = tx.open_table(RECORDS).map_err(write_err)?;
            let txns = tx.open_table(TXNS).map_err(write_err)?;
            let meta = tx.open_table(META).map_err(write_err)?;
            // The head as of this read transaction, not the live one: an append committed
            // since would otherwise put a seek on an empty tail past a transaction it never saw.
            let head = meta.get(NEXT_OFFSET).map_err(write_err)?.map(|v| v.value()).unwrap_or(0);
            // Everything below the first stored chunk is gone.
            let first = match records.first().map_err(write_err)? {
                Some((k, _)) => k.value(),
                None => head,
            };
            let mut oldest = None;
            for item in txns.iter().map_err(write_err)? {
                let (lsn, v) = item.map_err(write_err)?;
                if v.value().0 >= first {
                    oldest = Some(Lsn(lsn.value()));
                    break;
                }
            }
            let gone = Seek::Gone { oldest };
            let lsn = after.commit_lsn.0;
            if let Some(v) = txns.get(lsn).map_err(write_err)? {
                let (begin, commit, events, _) = v.value();
                return Ok(if commit != OPEN && after.index >= events {
                    Seek::At(commit + 1)
                } else if begin >= first {
                    Seek::At(begin)
                } else {
                    gone
                });
            }
            let get = |k| meta.get(k).map(|v| v.map(|v| v.value()));
            if let Some(g) = get(GONE_LSN).map_err(write_err)? {
                let events = get(GONE_EVENTS).map_err(write_err)?.unwrap_or(0);
                if lsn < g || (lsn == g && u64::from(after.index) < events) {
                    return Ok(gone);
                }
            }
            Ok(match txns.range(lsn.saturating_add(1)..).map_err(write_err)?.next() {
                Some(item) => {
                    let begin = item.map_err(write_err)?.1.value().0;
                    if begin >= first {
                        Seek::At(begin)
                    } else {
                        gone
                    }
                }
                None => Seek::At(head),
            })
        })
        .await
    }

    async fn cursor_at_time(&self, commit_time_us: i64) -> Result<Option<Cursor>, LogError> {
        self.blocking(move |_, db| {
            let tx = db.begin_read().map_err(write_err)?;
            let txns = tx.open_table(TXNS).map_err(write_err)?;
            // Commit times follow commit order up to clock adjustments: a linear scan from the
            // oldest retained transaction is exact and, for a replay, cheap enough.
            for item in txns.iter().map_err(write_err)? {
                let (lsn, v) = item.map_err(write_err)?;
                if v.value().3 >= commit_time_us {
                    return Ok(Some(Cursor { commit_lsn: Lsn(lsn.value()), index: 0 }));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn head_cursor(&self) -> Result<Option<Cursor>, LogError> {
        self.blocking(move |_, db| {
            let tx = db.begin_read().map_err(write_err)?;
            let txns = tx.open_table(TXNS).map_err(write_err)?;
            for item in txns.iter().map_err(write_err)?.rev() {
                let (lsn, v) = item.map_err(write_err)?;
                let (_, commit, events, _) = v.value();
                if commit != OPEN {
                    return Ok(Some(Cursor { commit_lsn: Lsn(lsn.value()), index: events.saturating_add(1) }));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn apply_retention(&self, keep_since_us: Option<i64>) -> Result<u64, LogError> {
        self.blocking(move |inner, db| {
            let tx = db.begin_write().map_err(write_err)?;
            let deleted = {
                let consumers = tx.open_table(CONSUMERS).map_err(write_err)?;
                let mut min: Option<u64> = None;
                for item in consumers.iter().map_err(write_err)? {
                    let (_, v) = item.map_err(write_err)?;
                    min = Some(min.map_or(v.value(), |m: u64| m.min(v.value())));
                }
                // The time window: nothing from the first transaction committed at or after
                // `keep_since_us` on (the head if there is none).
                let by_time = match keep_since_us {
                    None => None,
                    Some(t) => {
                        let txns = tx.open_table(TXNS).map_err(write_err)?;
                        let mut bound = *inner.head.borrow();
                        for item in txns.iter().map_err(write_err)? {
                            let (begin, _, _, time) = item.map_err(write_err)?.1.value();
                            if time >= t {
                                bound = begin;
                                break;
                            }
                        }
                        Some(bound)
                    }
                };
                let min = match (min, by_time) {
                    (Some(c), Some(t)) => c.min(t),
                    (Some(c), None) => c,
                    (None, Some(t)) => t,
                    (None, None) => return Ok(0),
                };
                let mut records = tx.open_table(RECORDS).map_err(write_err)?;
                // A chunk can go once the next one starts at or below `min`; count its records by
                // the distance between the two keys.
                let mut keys = Vec::new();
                for item in records.range(..=min).map_err(write_err)? {
                    keys.push(item.map_err(write_err)?.0.value());
                }
                let mut deleted = 0;
                for pair in keys.windows(2) {
                    records.remove(pair[0]).map_err(write_err)?;
                    deleted += pair[1] - pair[0];
                }
                if deleted > 0 {
                    let first = keys.last().copied().unwrap_or(0);
                    let mut txns = tx.open_table(TXNS).map_err(write_err)?;
                    let mut gone = None;
                    for item in txns.iter().map_err(write_err)? {
                        let (lsn, v) = item.map_err(write_err)?;
                        let (_, commit, events, _) = v.value();
                        if commit == OPEN || commit >= first {
                            break;
                        }
                        gone = Some((lsn.value(), events));
                    }
                    if let Some((lsn, events)) = gone {
                        txns.retain_in(..=lsn, |_, _| false).map_err(write_err)?;
                        let mut meta = tx.open_table(META).map_err(write_err)?;
                        meta.insert(GONE_LSN, lsn).map_err(write_err)?;
                        meta.insert(GONE_EVENTS, u64::from(events)).map_err(write_err)?;
                    }
                }
                deleted
            };
            tx.commit().map_err(write_err)?;
            Ok(deleted)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
