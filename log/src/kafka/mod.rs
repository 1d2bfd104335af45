//! The change log on Apache Kafka (or any Kafka-protocol broker), for deployments that outgrow
//! one machine. Same contract as the embedded log (see [`ChangeLog`]).
//!
//! Layout per source node (`prefix` defaults to "synapse"):
//! * `<prefix>.<node>.changes` — one partition: one Kafka message per append (a capture batch,
//!   split only past `max_message_bytes`), so readers see whole transactions in commit order.
//!   Log offset = message offset × 2^20 + the record's index in the message. Each message
//!   carries its transaction's commit LSN as a header.
//! * `<prefix>.<node>.consumers` — compacted: consumer name → position (retention's input).
//!
//! Topics that already exist are used as they are (an operator may create them, and a user
//! without CreateTopics rights can run); missing ones are created.
//!
//! The relation registry and the transaction index (commit LSN → offsets) are rebuilt in
//! memory at open by reading the changes topic once, then kept current by `append` (the one
//! writer) and by `read` (readers in other processes).
//!
//! Durability: the producer is idempotent with `acks=all`; `append` resolves once its message
//! has a successful delivery report, so an append is atomic unless it was split (over 900 KB):
//! then, on `Err`, a prefix may be visible. The writer restarts through
//! [`ChangeLog::recover_writer`], which marks the unfinished transaction `Discarded` — the
//! protocol readers already follow after a crash.

use crate::{ChangeLog, LogError, Offset, Seek, WriterState};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::TopicPartitionList;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use synapse_schemas::{Cursor, LogRecord, Lsn, Relation, RelationKey, ResyncMark};
use tokio::sync::watch;

mod index;
mod options;
use index::{pack, unpack, State};
pub use options::*;

type LogProducer = FutureProducer<KafkaContext>;
type LogReader = StreamConsumer<KafkaContext>;
type Meta = BaseConsumer<KafkaContext>;

/// The Kafka [`ChangeLog`]. Cheap to clone; clones share the clients.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    options: KafkaLogOptions,
    topic: String,
    /// Replaced when librdkafka reports a fatal error (an idempotent producer whose epoch
    /// was fenced after a timed-out request never produces again).
    producer: std::sync::RwLock<LogProducer>,
    /// For watermark queries (made every 100 ms by waiting readers): one client, not one each.
    meta: Arc<Meta>,
    /// Readers positioned where the last read ended, reused by the next read from there: the
    /// next log offset, the reader (positioned at the next message) and the records of the
    /// last message that did not fit in that read.
    readers: tokio::sync::Mutex<Vec<Reader>>,
    head: watch::Sender<Offset>,
    /// Offset of the first retained record (records below were deleted by retention).
    low: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
}

struct Reader {
    next: Offset,
    /// Kafka offset of the message `consumer` yields next.
    next_message: i64,
    consumer: LogReader,
    leftover: std::collections::VecDeque<(Offset, LogRecord)>,
}

/// How many times indexing starts again at a start retention moved (see `index_until`).
const MAX_INDEX_RESTARTS: u32 = 100;

/// A message's records, encoded, stay under the brokers' default `message.max.bytes` (1 MB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 900_000;

fn make_producer(options: &KafkaLogOptions) -> Result<LogProducer, LogError> {
    // Tunables (compression, batching, timeouts) give way to log.kafka.properties; what the
    // log's guarantees rest on (idempotence, acks=all, the message size) does not.
    let tunables = [
        ("compression.type", "lz4".to_string()),
        ("linger.ms", "1".to_string()),
        ("batch.num.messages", if options.batch_records { "10000" } else { "1" }.to_string()),
        ("message.timeout.ms", (options.timeout.as_millis() * 3).to_string()),
    ];
    options
        .client_with(&tunables)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", (options.max_message_bytes + 100_000).to_string())
        .create_with_context(KafkaContext)
        .map_err(kafka("creating the producer"))
}

/// A reader of assigned partitions only: no group membership, nothing committed to Kafka.
fn reader_config(options: &KafkaLogOptions) -> ClientConfig {
    let mut c = options.client();
    c.set("group.id", format!("{}.reader", options.changes_topic()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Never skip silently to another offset: records deleted by retention before a reader
        // got them are an error (`Expired`), not a jump.
        .set("auto.offset.reset", "error");
    c
}

/// Which of `topics` the brokers know (a metadata request; nothing is created by it).
async fn existing_topics(meta: &Arc<Meta>, topics: &[&str], timeout: Duration) -> Result<Vec<String>, LogError> {
    let mut found = Vec::new();
    for topic in topics {
        let (meta, name) = (meta.clone(), topic.to_string());
        let metadata = tokio::task::spawn_blocking(move || meta.fetch_metadata(Some(&name), timeout))
            .await
            .map_err(LogError::TaskFailed)?
            .map_err(kafka("asking the brokers for the topics"))?;
        for t in metadata.topics() {
            match t.error() {
                None if !t.partitions().is_empty() => found.push(t.name().to_owned()),
                None => {}
                Some(e) => match RDKafkaErrorCode::from(e) {
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {}
                    code => {
                        return Err(LogError::Topic {
                            topic: t.name().to_owned(),
                            source: KafkaError::MetadataFetch(code),
                        })
                    }
                },
            }
        }
    }
    Ok(found)
}

const LSN_HEADER: &str = "synapse-commit-lsn";
/// HMAC-SHA256 of the message (see [`SigningKey`]), when the log is signed.
const SIGNATURE_HEADER: &str = "synapse-signature";
/// Consumers-topic keys of gap marks (`#resync/<offset>`); no consumer name starts with `#`.
const RESYNC_KEY: &str = "#resync/";
/// A gap mark or source identity from the consumers topic; one that does not decode is said
/// loudly (without it a gap or a foreign slot could go unnoticed), then skipped.
fn decoded<T: serde::de::DeserializeOwned>(key: &str, payload: &[u8]) -> Option<T> {
    match postcard::from_bytes(payload) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(key, error = %e, "an entry of the log's consumers topic does not decode; it is ignored");
            None
        }
    }
}

/// Consumers-topic key of the source identity.
const SOURCE_KEY: &str = "#source";

fn kafka(context: &'static str) -> impl Fn(KafkaError) -> LogError {
    move |source| LogError::Kafka { context, source }
}

impl KafkaLog {
    /// Connects, creates the topics if missing, and reads the stream once to index it.
    pub async fn open(options: KafkaLogOptions) -> Result<KafkaLog, LogError> {
        let producer = make_producer(&options)?;
        let meta: Meta =
            reader_config(&options).create_with_context(KafkaContext).map_err(kafka("creating a reader"))?;
        let meta = Arc::new(meta);
        let topic = options.changes_topic();
        let consumers_topic = options.consumers_topic();
        let existing = existing_topics(&meta, &[&topic, &consumers_topic], options.timeout).await?;
        let rf = options.replication_factor;
        let mut wanted = Vec::new();
        if !existing.contains(&topic) {
            wanted.push(NewTopic::new(&topic, 1, TopicReplication::Fixed(rf)));
        }
        if !existing.contains(&consumers_topic) {
            wanted
                .push(NewTopic::new(&consumers_topic, 1, TopicReplication::Fixed(rf)).set("cleanup.policy", "compact"));
        }
        if !wanted.is_empty() {
            let admin: AdminClient<KafkaContext> =
                options.client().create_with_context(KafkaContext).map_err(kafka("creating the admin client"))?;
            let admin_options = AdminOptions::new().operation_timeout(Some(options.timeout));
            let created = tokio::time::timeout(options.timeout * 2, admin.create_topics(&wanted, &admin_options))
                .await
                .map_err(|_| LogError::Topic {
                    topic: topic.clone(),
                    source: KafkaError::AdminOp(RDKafkaErrorCode::RequestTimedOut),
                })?
                .map_err(|source| LogError::Topic { topic: topic.clone(), source })?;
            for result in created {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => return Err(LogError::Topic { topic, source: KafkaError::AdminOp(code) }),
                }
            }
        }
        let (head, _) = watch::channel(0);
        let log = KafkaLog {
            inner: Arc::new(Inner {
                topic,
                producer: std::sync::RwLock::new(producer),
                meta,
                readers: tokio::sync::Mutex::new(Vec::new()),
                head,
                low: Default::default(),
                state: Mutex::new(State::default()),
                options,
            }),
        };
        // A topic just created (here or by another process) may not be in the broker's
        // metadata yet: its partition is "unknown" for a moment, not missing.
        let deadline = std::time::Instant::now() + log.inner.options.timeout;
        loop {
            match log.refresh_watermarks().await {
                Err(LogError::Kafka {
                    source:
                        KafkaError::MetadataFetch(
                            RDKafkaErrorCode::UnknownPartition
                            | RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::UnknownTopic,
                        ),
                    ..
                }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        }
        // Index the stream: relations, transactions, the open transaction.
        // Up to the head as it is now, not as it moves: another process may be appending faster
        // than this one indexes (a consumer-group member catching up after a hand-over), and
        // chasing its head kept `open` from returning. What comes later is indexed as it is
        // read, and by `recover_writer` before this process writes.
        let head = log.next_offset();
        log.index_until(log.inner.low.load(std::sync::atomic::Ordering::Acquire), Some(head)).await?;
        log.load_consumers().await?;
        Ok(log)
    }

    /// A reader whose next message is the one at Kafka offset `message`.
    fn reader_at(&self, message: i64) -> Result<LogReader, LogError> {
        let c = self.consumer()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.inner.topic, 0, rdkafka::Offset::Offset(message))
            .map_err(kafka("positioning a reader"))?;
        c.assign(&tpl).map_err(kafka("positioning a reader"))?;
        Ok(c)
    }

    fn consumer(&self) -> Result<LogReader, LogError> {
        reader_config(&self.inner.options).create_with_context(KafkaContext).map_err(kafka("creating a reader"))
    }

    /// (low, high) offsets of partition 0 of `topic`.
    async fn watermarks(&self, topic: String, context: &'static str) -> Result<(i64, i64), LogError> {
        let (meta, timeout) = (self.inner.meta.clone(), self.inner.options.timeout);
        tokio::task::spawn_blocking(move || meta.fetch_watermarks(&topic, 0, timeout))
            .await
            .map_err(LogError::TaskFailed)?
            .map_err(kafka(context))
    }

    /// Reads (and so indexes) the stream from `from` up to the head, following it while it grows.
    async fn index_to_head(&self, from: Offset) -> Result<(), LogError> {
        self.index_until(from, None).await
    }

    /// Reads (and so indexes) the stream from `from` up to `until`, or up to the head while it
    /// grows when `until` is `None`.
    async fn index_until(&self, mut from: Offset, until: Option<Offset>) -> Result<(), LogError> {
        // A topic whose retention deletes its start as fast as a new reader can reach it (a
        // size limit far below the write rate) is reported, not chased for ever.
        let mut restarts = 0;
        // `next_offset` is exact once the last message is indexed (its record count known); the
        // head found at open (`until`) is the next message's first offset, an upper bound.
        while from < until.map_or_else(|| self.next_offset(), |u| u.min(self.next_offset())) {
            let batch = match self.read(from, 10_000).await {
                // Retention deleted the oldest records while they were being indexed (another
                // process keeps appending): they are gone for every reader alike, so indexing
                // goes on from the stream's new start, as if the log were opened a moment later.
                // A consumer whose position is in the deleted part still gets LOG008 when it reads.
                Err(LogError::Expired { .. }) => {
                    self.refresh_watermarks().await?;
                    let low = self.inner.low.load(std::sync::atomic::Ordering::Acquire);
                    restarts += 1;
                    if low <= from || restarts > MAX_INDEX_RESTARTS {
                        return Err(LogError::Expired { topic: self.inner.topic.clone(), offset: from });
                    }
                    tracing::info!(topic = %self.inner.topic, from, low, "records deleted by retention while indexing; indexing from the new start");
                    from = low;
                    continue;
                }
                other => other?,
            };
            let Some((last, _)) = batch.last() else {
                // The index must be complete (the writer's recovery relies on it).
                return Err(LogError::Stalled { topic: self.inner.topic.clone(), offset: from });
            };
            from = last + 1;
        }
        Ok(())
    }

    async fn refresh_watermarks(&self) -> Result<(), LogError> {
        let (low, high) = self.watermarks(self.inner.topic.clone(), "reading the log's offsets").await?;
        self.inner.low.store(pack(low, 0), std::sync::atomic::Ordering::Release);
        self.inner.head.send_if_modified(|h| {
            let high = pack(high, 0);
            let grew = high > *h;
            *h = (*h).max(high);
            grew
        });
        Ok(())
    }

    async fn load_consumers(&self) -> Result<(), LogError> {
        let topic = self.inner.options.consumers_topic();
        let timeout = self.inner.options.timeout;
        let (low, high) = self.watermarks(topic.clone(), "reading the consumers' offsets").await?;
        if high <= low {
            return Ok(());
        }
        let consumer = self.consumer()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(low)).map_err(kafka("reading consumers"))?;
        consumer.assign(&tpl).map_err(kafka("reading consumers"))?;
        let mut positions = BTreeMap::new();
        let mut marks = BTreeMap::new();
        let mut source = None;
        loop {
            let m = tokio::time::timeout(timeout, consumer.recv())
                .await
                .map_err(|_| LogError::Kafka { context: "reading consumers", source: KafkaError::Canceled })?
                .map_err(kafka("reading consumers"))?;
            let name = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
            if name == SOURCE_KEY {
                source = m.payload().and_then(|p| decoded(&name, p));
            } else if let Some(offset) = name.strip_prefix(RESYNC_KEY) {
                let mark = m.payload().and_then(|p| decoded::<ResyncMark>(&name, p));
                if let (Ok(offset), Some(mark)) = (offset.parse::<Offset>(), mark) {
                    marks.insert(offset, mark);
                }
            } else {
                match m.payload().and_then(|p| p.try_into().ok()).map(u64::from_be_bytes) {
                    Some(next) => positions.insert(name, next),
                    None => positions.remove(&name),
                };
            }
            if m.offset() + 1 >= high {
                break;
            }
        }
        let mut state = self.state();
        state.consumers = positions;
        state.resyncs.extend(marks);
        state.source = source;
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores a gap mark beside the consumer positions (a compacted topic that time
    /// retention does not clean).
    async fn put_resync(&self, offset: Offset, mark: &ResyncMark) -> Result<(), LogError> {
        let topic = self.inner.options.consumers_topic();
        let key = format!("{RESYNC_KEY}{offset}");
        let payload = postcard::to_stdvec(mark).map_err(LogError::Encode)?;
        let record = FutureRecord::to(&topic).key(&key).payload(&payload);
        let sent = self.producer().send(record, self.inner.options.timeout).await;
        sent.map_err(|(e, _)| self.failed("storing a resync mark", e))?;
        Ok(())
    }

    async fn put_consumer(&self, name: &str, next: Option<Offset>) -> Result<(), LogError> {
        let topic = self.inner.options.consumers_topic();
        let payload = next.map(u64::to_be_bytes);
        let mut record = FutureRecord::to(&topic).key(name);
        if let Some(p) = &payload {
            record = record.payload(p.as_slice());
        }
        let sent = self.producer().send(record, self.inner.options.timeout).await;
        sent.map_err(|(e, _)| self.failed("storing a consumer position", e))?;
        Ok(())
    }

    /// `last + 1` after a message's last record names the next message's first record.
    fn normalize(&self, from: Offset) -> Offset {
        let (message, index) = unpack(from);
        match self.state().last_message {
            Some((k, records)) if k == message && index >= records => pack(k + 1, 0),
            _ => from,
        }
    }

    pub fn options(&self) -> &KafkaLogOptions {
        &self.inner.options
    }

    /// A reader's position `next` in Kafka's terms: the offset of the next message it has not
    /// fully read (what a consumer group commits, and lag tools compare with the high watermark).
    pub fn kafka_position(&self, next: Offset) -> i64 {
        let (message, index) = unpack(self.normalize(next));
        if index == 0 {
            return message;
        }
        let state = self.state();
        let records = match state.records_before.range(message + 1..).next() {
            Some((_, after)) => state.records_before.get(&message).map(|before| after - before),
            None => state.last_message.filter(|(k, _)| *k == message).map(|(_, n)| n as u64),
        };
        match records {
            Some(n) if index as u64 >= n => message + 1,
            _ => message,
        }
    }

    fn producer(&self) -> LogProducer {
        self.inner.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Classifies a producer error; after a fatal one, the next call gets a new producer.
    fn failed(&self, context: &'static str, source: KafkaError) -> LogError {
        let fatal = self.producer().client().fatal_error();
        if let Some((code, reason)) = fatal {
            tracing::warn!(?code, reason, "the Kafka producer failed fatally; starting a new one");
            if let Ok(p) = make_producer(&self.inner.options) {
                *self.inner.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner) = p;
            }
        }
        LogError::Kafka { context, source }
    }
}

impl ChangeLog for KafkaLog {
    async fn append(&self, records: Vec<LogRecord>) -> Result<Offset, LogError> {
        let started = std::time::Instant::now();
        let mut txn = self.state().open;
        let mut bytes = 0u64;
        // One message per append (split only past max_message_bytes): an append is atomic,
        // and messages go out one at a time, so no record batch holds two of them.
        let mut chunks: Vec<(std::ops::Range<usize>, Vec<u8>, Option<u64>)> = Vec::new();
        let mut body = Vec::new();
        let (mut start, mut first_txn) = (0, txn);
        for (i, r) in records.iter().enumerate() {
            if let LogRecord::Begin(b) = r {
                txn = Some(b.commit_lsn.0);
            }
            let encoded = postcard::to_stdvec(r).map_err(LogError::Encode)?;
            if encoded.len() > self.inner.options.max_message_bytes {
                let table = match r {
                    LogRecord::Change(c) => {
                        let state = self.state();
                        let by_oid = || state.relations.iter().find(|(k, _)| k.oid == c.relation.oid).map(|(_, r)| r);
                        state.relations.get(&c.relation).or_else(by_oid).map(|r| r.name())
                    }
                    _ => None,
                };
                return Err(LogError::RecordTooLarge {
                    table: table.unwrap_or_else(|| "-".into()),
                    bytes: encoded.len(),
                    limit: self.inner.options.max_message_bytes,
                });
            }
            if !body.is_empty() && body.len() + encoded.len() > self.inner.options.max_message_bytes {
                chunks.push((start..i, std::mem::take(&mut body), first_txn));
                (start, first_txn) = (i, txn);
            }
            body.extend_from_slice(&encoded);
            if matches!(r, LogRecord::Commit(_) | LogRecord::Discarded { .. }) {
                txn = None;
            }
        }
        if !body.is_empty() {
            chunks.push((start..records.len(), body, first_txn));
        }
        let mut last = None;
        let mut marks = Vec::new();
        for (range, body, lsn) in chunks {
            // postcard's encoding of a sequence: its length as a varint, then the elements.
            let mut payload = postcard::to_stdvec(&(range.len() as u64)).map_err(LogError::Encode)?;
            payload.extend_from_slice(&body);
            bytes += payload.len() as u64;
            let lsn = lsn.map(u64::to_be_bytes);
            let lsn = lsn.as_ref().map(|l| l.as_slice());
            let mut headers = OwnedHeaders::new().insert(Header { key: LSN_HEADER, value: lsn });
            let signature = self.inner.options.signing_key.as_ref().map(|k| k.sign(&self.inner.topic, lsn, &payload));
            if let Some(sig) = &signature {
                headers = headers.insert(Header { key: SIGNATURE_HEADER, value: Some(sig.as_slice()) });
            }
            let record = FutureRecord::<(), [u8]>::to(&self.inner.topic).payload(&payload).headers(headers);
            let delivered = self.producer().send(record, self.inner.options.timeout).await;
            let message = delivered.map_err(|(e, _)| self.failed("appending to the log", e))?.offset;
            let mut state = self.state();
            for (j, r) in records[range].iter().enumerate() {
                state.index(pack(message, j), r);
                last = Some(pack(message, j));
                if let LogRecord::Resync(mark) = r {
                    marks.push((pack(message, j), mark.clone()));
                }
            }
            drop(state);
            self.inner.head.send_if_modified(|h| {
                let next = pack(message + 1, 0);
                let grew = next > *h;
                *h = (*h).max(next);
                grew
            });
        }
        let Some(last) = last else { return Ok(self.next_offset().saturating_sub(1)) };
        for (offset, mark) in &marks {
            self.put_resync(*offset, mark).await?;
        }
        let log = self.inner.topic.clone();
        metrics::counter!("synapse_log_appended_records_total", "log" => log.clone()).increment(records.len() as u64);
        metrics::counter!("synapse_log_appended_bytes_total", "log" => log.clone()).increment(bytes);
        metrics::histogram!("synapse_log_append_seconds", "log" => log).record(started.elapsed().as_secs_f64());
        Ok(last)
    }

    async fn read(&self, from: Offset, max: usize) -> Result<Vec<(Offset, LogRecord)>, LogError> {
        let from = self.normalize(from);
        if from >= self.next_offset() {
            self.refresh_watermarks().await?;
            if from >= self.next_offset() {
                return Ok(Vec::new());
            }
        }
        let reused = {
            let mut readers = self.inner.readers.lock().await;
            readers.iter().position(|r| r.next == from).map(|i| readers.swap_remove(i))
        };
        let mut reader = match reused {
            Some(r) => r,
            None => {
                let message = unpack(from).0;
                let consumer = self.reader_at(message)?;
                Reader { next: from, next_message: message, consumer, leftover: Default::default() }
            }
        };
        let head_message = unpack(*self.inner.head.borrow()).0;
        let deadline = tokio::time::Instant::now() + self.inner.options.timeout;
        let mut out: Vec<(Offset, LogRecord)> = Vec::new();
        while out.len() < max {
            if let Some(r) = reader.leftover.pop_front() {
                out.push(r);
                continue;
            }
            if reader.next_message >= head_message {
                break;
            }
            // Below the head a message is there to fetch; wait for it, but not forever.
            let wait = if out.is_empty() {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                Duration::from_millis(5)
            };
            let m = match tokio::time::timeout(wait, reader.consumer.recv()).await {
                Ok(Ok(m)) => m,
                Ok(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    return Err(LogError::Expired {
                        topic: self.inner.topic.clone(),
                        offset: pack(reader.next_message, 0),
                    })
                }
                // librdkafka reconnects and follows leaders by itself; these only report it.
                Ok(Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::NotLeaderForPartition
                    | RDKafkaErrorCode::LeaderNotAvailable,
                ))) if out.is_empty() => continue,
                Ok(Err(_)) if !out.is_empty() => break,
                Ok(Err(e)) => return Err(kafka("reading the log")(e)),
                // Nothing within the timeout (a leader moving, a slow broker): return what is
                // here and keep the reader; the caller reads again.
                Err(_) => {
                    tracing::debug!(message = reader.next_message, "no record arrived within the timeout");
                    break;
                }
            };
            let at = m.offset();
            if at != reader.next_message {
                // A broker that counts offsets per batch (see `batch_records`) answers a fetch
                // inside a batch with the next one: refuse rather than skip records.
                return Err(LogError::Gap { expected: pack(reader.next_message, 0), got: pack(at, 0) });
            }
            reader.next_message = at + 1;
            if let Some(key) = &self.inner.options.signing_key {
                let header =
                    |name: &str| m.headers().and_then(|h| h.iter().find(|x| x.key == name)).and_then(|x| x.value);
                let payload = m.payload().unwrap_or_default();
                let signed = header(SIGNATURE_HEADER)
                    .is_some_and(|sig| key.verify(&self.inner.topic, header(LSN_HEADER), payload, sig));
                if !signed {
                    metrics::counter!("synapse_log_unsigned_records_total", "log" => self.inner.topic.clone())
                        .increment(1);
                    return Err(LogError::Unsigned { topic: self.inner.topic.clone(), offset: pack(at, 0) });
                }
            }
            let records: Vec<LogRecord> = postcard::from_bytes(m.payload().unwrap_or_default())
                .map_err(|source| LogError::Corrupt { offset: pack(at, 0), source })?;
            let mut state = self.state();
            for (j, r) in records.into_iter().enumerate() {
                let offset = pack(at, j);
                state.index(offset, &r);
                if offset >= from {
                    reader.leftover.push_back((offset, r));
                }
            }
        }
        // Readers ask for `last + 1` next.
        reader.next = out.last().map_or(from, |(o, _)| o + 1);
        let mut readers = self.inner.readers.lock().await;
        // A few positioned readers are enough (appliers, webhooks, the stream API).
        if readers.len() < 8 {
            readers.push(reader);
        }
        Ok(out)
    }

    async fn wait_readable(&self, from: Offset, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let from = self.normalize(from);
        let mut rx = self.inner.head.subscribe();
        while *rx.borrow() <= from && tokio::time::Instant::now() < deadline {
            // Another process may be the writer: look at the broker now and then.
            let tick = Duration::from_millis(100).min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if tokio::time::timeout(tick, rx.changed()).await.is_err() {
                let _ = self.refresh_watermarks().await;
            }
        }
    }

    fn records_behind(&self, from: Offset) -> u64 {
        let from = self.normalize(from);
        let (message, index) = unpack(from);
        let head = unpack(*self.inner.head.borrow()).0;
        let state = self.state();
        match state.records_before.get(&message) {
            Some(before) => state.records.saturating_sub(before + index as u64),
            // Not indexed yet (another process writes): count messages.
            None => head.saturating_sub(message).max(0) as u64,
        }
    }

    fn next_offset(&self) -> Offset {
        // After the last record of the last message, readers hold `last + 1`: that is the
        // head they compare with ("caught up"), not the next message's first offset.
        let head = *self.inner.head.borrow();
        match self.state().last_message {
            Some((k, records)) if pack(k + 1, 0) == head => pack(k, records),
            _ => head,
        }
    }

    async fn relation(&self, key: RelationKey) -> Result<Option<Relation>, LogError> {
        Ok(self.state().relations.get(&key).cloned())
    }

    async fn previous_relation(&self, oid: u32, before: Offset) -> Result<Option<RelationKey>, LogError> {
        let state = self.state();
        Ok(state.history.range((oid, 0)..(oid, before)).next_back().map(|(_, v)| RelationKey { oid, version: *v }))
    }

    async fn recover_writer(&self) -> Result<WriterState, LogError> {
        self.refresh_watermarks().await?;
        // Index whatever another writer appended since this log was opened.
        let indexed = self.state().indexed;
        self.index_to_head(indexed).await?;
        let (open, last_end) = {
            let s = self.state();
            (s.open, s.last_commit_end)
        };
        let mut next = self.next_offset();
        if let Some(lsn) = open {
            tracing::warn!(commit_lsn = %Lsn(lsn), "discarding a transaction the previous writer left unfinished");
            next = self.append(vec![LogRecord::Discarded { commit_lsn: Lsn(lsn) }]).await? + 1;
        }
        let source = self.state().source.clone();
        Ok(WriterState { last_commit_end: last_end.map(Lsn), next_offset: next, source })
    }

    async fn commit_consumer(&self, name: &str, next: Offset) -> Result<(), LogError> {
        self.put_consumer(name, Some(next)).await?;
        self.state().consumers.insert(name.to_owned(), next);
        Ok(())
    }

    async fn record_source(&self, source: &crate::SourceIdentity) -> Result<(), LogError> {
        let topic = self.inner.options.consumers_topic();
        let payload = postcard::to_stdvec(source).map_err(LogError::Encode)?;
        let record = FutureRecord::to(&topic).key(SOURCE_KEY).payload(&payload);
        let sent = self.producer().send(record, self.inner.options.timeout).await;
        sent.map_err(|(e, _)| self.failed("storing the source identity", e))?;
        self.state().source = Some(source.clone());
        Ok(())
    }

    async fn resync_marks(&self) -> Result<Vec<(Offset, ResyncMark)>, LogError> {
        Ok(self.state().resyncs.iter().map(|(o, m)| (*o, m.clone())).collect())
    }

    async fn consumer_position(&self, name: &str) -> Result<Option<Offset>, LogError> {
        Ok(self.state().consumers.get(name).copied())
    }

    async fn consumers(&self) -> Result<Vec<(String, Offset)>, LogError> {
        let mut all: Vec<(String, Offset)> = self.state().consumers.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        Ok(all)
    }

    async fn remove_consumer(&self, name: &str) -> Result<(), LogError> {
        self.put_consumer(name, None).await?;
        self.state().consumers.remove(name);
        Ok(())
    }

    async fn seek(&self, after: Cursor) -> Result<Seek, LogError> {
        let first = self.inner.low.load(std::sync::atomic::Ordering::Acquire);
        let head = self.next_offset();
        let state = self.state();
        let oldest = state.txns.iter().find(|(_, t)| t.begin >= first).map(|(l, _)| Lsn(*l));
        let gone = Seek::Gone { oldest };
        let lsn = after.commit_lsn.0;
        if let Some(t) = state.txns.get(&lsn) {
            return Ok(match t.commit {
                Some(c) if after.index >= t.events => Seek::At(c + 1),
                _ if t.begin >= first => Seek::At(t.begin),
                _ => gone,
            });
        }
        // A cursor older than every retained transaction: its rest may be gone.
        if state.txns.first_key_value().is_some_and(|(l, t)| lsn < *l && t.begin > first) {
            return Ok(gone);
        }
        Ok(match state.txns.range(lsn.saturating_add(1)..).next() {
            Some((_, t)) if t.begin >= first => Seek::At(t.begin),
            Some(_) => gone,
            None => Seek::At(head),
        })
    }

    async fn cursor_at_time(&self, commit_time_us: i64) -> Result<Option<Cursor>, LogError> {
        // The broker's own time index is not to be relied on (tansu answers offset 0).
        Ok(self
            .state()
            .txns
            .iter()
            .find(|(_, t)| t.time_us >= commit_time_us)
            .map(|(l, _)| Cursor { commit_lsn: Lsn(*l), index: 0 }))
    }

    async fn head_cursor(&self) -> Result<Option<Cursor>, LogError> {
        Ok(self
            .state()
            .txns
            .iter()
            .rev()
            .find(|(_, t)| t.commit.is_some())
            .map(|(l, t)| Cursor { commit_lsn: Lsn(*l), index: t.events.saturating_add(1) }))
    }

    async fn apply_retention(&self, keep_since_us: Option<i64>) -> Result<u64, LogError> {
        // Kafka deletes by the topic's retention settings; an explicit DeleteRecords below
        // what every consumer passed is not supported by every broker (tansu 0.6 drops the
        // connection), so nothing is deleted here. Allowed by the contract ("may keep more").
        let _ = keep_since_us;
        Ok(0)
    }
}
