//! Publishes a source node's change stream to public Kafka topics in Debezium's layout, with
//! CloudEvents' Kafka protocol binding (binary mode), so existing Kafka tooling (Kafka Connect
//! sinks, ksqlDB, Flink, plain consumers) reads it without SynapseDB.
//!
//! | topic | message key | message value |
//! |---|---|---|
//! | `<prefix>.<schema>.<table>` | primary key as JSON (`{"id":1}`) | Debezium change envelope (`op`, `before`, `after`, `source`, `transaction`); with `tombstones`, a delete is followed by the same key with no value |
//! | `<prefix>.<node>.transaction` | `{"id":"<xid>:<commit lsn>"}` | Debezium transaction metadata: `BEGIN`, then `END` with `event_count` and per-table `data_collections` |
//! | `<prefix>.<node>.schema-changes` | `{"table":"schema.table"}` | a table's new column list |
//! | `<prefix>.<node>.schema-changes` | `{"control":"resync"}` | a gap in the source's stream (changes lost between two positions; re-read the source), outside any transaction |
//!
//! Every change message carries the CloudEvents attributes as headers (`ce_specversion`,
//! `ce_id`, `ce_source`, `ce_type`, `ce_subject`, `ce_time`, `ce_synapsecursor`,
//! `content-type`) and a W3C `traceparent` whose trace id is derived from the source
//! transaction, so all of a transaction's events share one trace.
//!
//! Guarantees:
//! * **Ordering**: one row's changes stay in order (same key → same partition; the partitioner
//!   is `murmur2_random`, the Java client's, so keys land where Kafka Connect would put them).
//!   A transaction's rows spread over topics and partitions; its `END` event, written only after
//!   every one of its rows was acknowledged, tells a consumer how many to expect per table.
//! * **Delivery**: at least once. The publisher's position is the last `END` in the transaction
//!   topic: after a crash it republishes from the transaction after that, so a transaction cut
//!   by the crash may appear twice, with the same `ce_id`s (de-duplicate on `ce_id`, or on
//!   `source.lsn` + `transaction.total_order`). Nothing acknowledged by the log is skipped.
//! * **Retention**: the publisher registers as the log's consumer `kafka-topics`, so the log
//!   keeps what it has not published.

use crate::feed::{ChangeFeed, Event, Operation, Selector, SourceInfo, TxnEnd};
use crate::ConnectorError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use synapse_log::KafkaContext;
use synapse_log::{ChangeLog, LogError};
use synapse_schemas::{Cursor, Lsn};
use tokio::sync::watch;

/// The log consumer name that holds back retention for the publisher.
pub const CONSUMER: &str = "kafka-topics";
/// Events published per round (one round = produce, await every acknowledgement, then `END`s).
const BATCH: usize = 5_000;

/// Where and how to publish.
#[derive(Clone, Debug)]
pub struct TopicsOptions {
    /// Producer settings (brokers, security, pass-through properties).
    pub client: ClientConfig,
    /// Several records per record batch (see `synapse_log::KafkaLogOptions::batch_records`).
    pub batch_records: bool,
    /// Topic name prefix (Debezium's `topic.prefix`).
    pub prefix: String,
    /// Partitions of table topics created here; -1: the broker's `num.partitions`.
    pub partitions: i32,
    /// Replication factor of topics created here; -1: the broker's default.
    pub replication_factor: i32,
    /// Follow each delete with a tombstone (for compacted topics).
    pub tombstones: bool,
    /// Which tables and operations to publish.
    pub selector: Selector,
    pub timeout: Duration,
}

/// Publishes one source's stream to its public topics; see the module docs for the contract.
pub struct TopicPublisher<L> {
    log: Arc<L>,
    source: SourceInfo,
    options: TopicsOptions,
    producer: FutureProducer<KafkaContext>,
    admin: AdminClient<KafkaContext>,
    created: HashSet<String>,
}

fn kafka(context: &'static str) -> impl Fn(KafkaError) -> ConnectorError {
    move |source| ConnectorError::Publish(LogError::Kafka { context, source })
}

/// What a transaction published so far: its `BEGIN` is out, counts per table.
struct OpenTxn {
    commit_lsn: Lsn,
    xid: u32,
    counts: BTreeMap<Arc<str>, u64>,
}

impl<L: ChangeLog> TopicPublisher<L> {
    pub fn new(log: Arc<L>, source: SourceInfo, options: TopicsOptions) -> Result<Self, ConnectorError> {
        // Tunables give way to the configured properties; the delivery guarantees do not.
        let mut client = ClientConfig::new();
        client
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", if options.batch_records { "10000" } else { "1" })
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", (options.timeout.as_millis() * 3).to_string());
        for (k, v) in options.client.config_map() {
            client.set(k, v);
        }
        let producer: FutureProducer<KafkaContext> = client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create_with_context(KafkaContext)
            .map_err(kafka("creating the producer"))?;
        let admin = options.client.create_with_context(KafkaContext).map_err(kafka("creating the admin client"))?;
        Ok(TopicPublisher { log, source, options, producer, admin, created: HashSet::new() })
    }

    pub fn transaction_topic(&self) -> String {
        format!("{}.{}.transaction", self.options.prefix, self.source.node)
    }

    pub fn schema_topic(&self) -> String {
        format!("{}.{}.schema-changes", self.options.prefix, self.source.node)
    }

    pub fn table_topic(&self, table: &str) -> String {
        format!("{}.{table}", self.options.prefix)
    }

    /// Publishes until `shutdown` turns true. Returns `Ok` on shutdown; errors are classified
    /// (a broker outage is transient: the caller retries, and the publisher resumes).
    pub async fn run(&mut self, shutdown: watch::Receiver<bool>) -> Result<(), ConnectorError> {
        let txn_topic = self.transaction_topic();
        self.ensure_topics(std::slice::from_ref(&txn_topic), 1).await?;
        let after = self.last_published().await?;
        tracing::info!(node = %self.source.node, resume_after = ?after, "publishing to Kafka topics");
        let mut feed =
            ChangeFeed::open(self.log.clone(), self.source.clone(), after, self.options.selector.clone()).await?;
        let mut open: Option<OpenTxn> = None;
        while !*shutdown.borrow() {
            let batch = feed.next_batch(BATCH, Duration::from_millis(500)).await?;
            tracing::trace!(events = batch.events.len(), ended = batch.ended.len(), read = feed.read_offset(), "batch");
            if batch.events.is_empty() && batch.ended.is_empty() {
                continue;
            }
            let mut acks = Vec::with_capacity(batch.events.len() + 8);
            let mut ends = batch.ended.iter().peekable();
            let mut closed = Vec::new();
            for (i, e) in batch.events.iter().enumerate() {
                // Transactions that ended before this event (including ones all filtered out).
                while let Some(end) = ends.next_if(|end| end.events_before <= i) {
                    closed.extend(Self::close(&mut open, end));
                }
                let envelope: Value = serde_json::from_slice(&e.body).map_err(|err| ConnectorError::BadRequest {
                    field: format!("event {}", e.id),
                    message: err.to_string(),
                })?;
                // Schema events and gaps go to the schema-changes topic, outside the
                // transaction metadata (which counts the table topics' events): a transaction
                // of DDL only gets none, as an empty one.
                if matches!(e.op, Operation::Resync | Operation::Schema) {
                    self.publish(e, &envelope, &mut acks).await?;
                    continue;
                }
                if open.as_ref().is_none_or(|o| o.commit_lsn != e.cursor.commit_lsn) {
                    let xid = envelope["data"]["source"]["txId"].as_u64().and_then(|x| u32::try_from(x).ok());
                    let xid = xid.unwrap_or_default();
                    let id = txn_id(xid, e.cursor.commit_lsn);
                    let begin = json!({"status": "BEGIN", "id": id, "event_count": null,
                        "data_collections": null, "ts_ms": e.commit_time_us.div_euclid(1000)});
                    acks.push(self.send(&txn_topic, &json!({"id": id}), Some(&begin), None).await?);
                    open = Some(OpenTxn { commit_lsn: e.cursor.commit_lsn, xid, counts: BTreeMap::new() });
                }
                if let Some(o) = open.as_mut() {
                    *o.counts.entry(e.table.clone()).or_default() += 1;
                }
                self.publish(e, &envelope, &mut acks).await?;
            }
            for end in ends {
                closed.extend(Self::close(&mut open, end));
            }
            // Every row of the batch is acknowledged before an END names its transaction
            // published: the resume point never passes an unacknowledged row.
            wait_all(acks).await?;
            let mut acks = Vec::with_capacity(closed.len());
            for (key, value) in &closed {
                acks.push(self.send(&txn_topic, key, Some(value), None).await?);
            }
            wait_all(acks).await?;
            self.log.commit_consumer(CONSUMER, feed.retention_offset()).await?;
            metrics::counter!("synapse_kafka_topics_events_total", "source" => self.source.node.clone())
                .increment(batch.events.len() as u64);
        }
        Ok(())
    }

    /// The `END` event of `end`'s transaction, if it published anything (as Debezium, empty
    /// transactions get no metadata).
    fn close(open: &mut Option<OpenTxn>, end: &TxnEnd) -> Option<(Value, Value)> {
        let o = open.take_if(|o| o.commit_lsn == end.commit_lsn)?;
        let id = txn_id(o.xid, o.commit_lsn);
        let total: u64 = o.counts.values().sum();
        let collections: Vec<Value> =
            o.counts.iter().map(|(t, n)| json!({"data_collection": t.as_ref(), "event_count": n})).collect();
        let value = json!({"status": "END", "id": id, "event_count": total, "data_collections": collections,
            "ts_ms": end.commit_time_us.div_euclid(1000), "synapse_commit_lsn": o.commit_lsn.0});
        Some((json!({"id": id}), value))
    }

    /// Produces one event (and its tombstone) to its topic.
    async fn publish(
        &mut self,
        e: &Event,
        envelope: &Value,
        acks: &mut Vec<DeliveryFuture>,
    ) -> Result<(), ConnectorError> {
        let (topic, key) = match e.op {
            Operation::Schema => (self.schema_topic(), json!({"table": e.table.as_ref()})),
            Operation::Resync => (self.schema_topic(), json!({"control": "resync"})),
            _ => (self.table_topic(&e.table), key_of(e, &envelope["data"])),
        };
        if !self.created.contains(&topic) {
            // The schema-changes topic keeps one order; table topics get the configured count.
            let partitions =
                if matches!(e.op, Operation::Schema | Operation::Resync) { 1 } else { self.options.partitions };
            self.ensure_topics(std::slice::from_ref(&topic), partitions).await?;
        }
        let trace = format!("{}/{}", self.source.node, e.cursor.commit_lsn.0);
        let headers = ce_headers(envelope, &trace);
        acks.push(self.send(&topic, &key, Some(&envelope["data"]), Some(headers)).await?);
        if e.op == Operation::Delete && self.options.tombstones {
            acks.push(self.send(&topic, &key, None, None).await?);
        }
        Ok(())
    }

    /// Queues one message; the returned future resolves with its delivery report.
    async fn send(
        &self,
        topic: &str,
        key: &Value,
        value: Option<&Value>,
        headers: Option<OwnedHeaders>,
    ) -> Result<DeliveryFuture, ConnectorError> {
        let key = serde_json::to_vec(key).unwrap_or_default();
        let payload = value.map(|v| serde_json::to_vec(v).unwrap_or_default());
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).key(&key);
        if let Some(p) = &payload {
            record = record.payload(p);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let mut record = record;
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                // The local queue is full: wait for deliveries to drain it.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(kafka("queueing a message")(e)),
            }
        }
    }

    /// Creates `topics` unless they exist (`partitions` -1: the broker's default).
    async fn ensure_topics(&mut self, topics: &[String], partitions: i32) -> Result<(), ConnectorError> {
        let rf = self.options.replication_factor;
        let new: Vec<NewTopic<'_>> =
            topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(rf))).collect();
        let opts = AdminOptions::new().operation_timeout(Some(self.options.timeout));
        for result in self.admin.create_topics(&new, &opts).await.map_err(kafka("creating topics"))? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(ConnectorError::Publish(LogError::Topic { topic, source: KafkaError::AdminOp(code) }))
                }
            }
        }
        self.created.extend(topics.iter().cloned());
        Ok(())
    }

    /// The cursor after the last transaction whose `END` is in the transaction topic.
    async fn last_published(&self) -> Result<Option<Cursor>, ConnectorError> {
        let (topic, client, timeout) = (self.transaction_topic(), self.options.client.clone(), self.options.timeout);
        tokio::task::spawn_blocking(move || last_end(&topic, client, timeout))
            .await
            .map_err(|e| ConnectorError::Publish(LogError::TaskFailed(e)))?
    }
}

/// Reads the transaction topic backwards for its last `END` (blocking).
fn last_end(topic: &str, mut client: ClientConfig, timeout: Duration) -> Result<Option<Cursor>, ConnectorError> {
    let consumer: BaseConsumer<KafkaContext> = client
        .set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .create_with_context(KafkaContext)
        .map_err(kafka("creating a reader"))?;
    let (low, high) =
        consumer.fetch_watermarks(topic, 0, timeout).map_err(kafka("reading the transaction topic's offsets"))?;
    // BEGIN/END alternate, with at most a few BEGINs of republished transactions between
    // ENDs: look back in growing windows.
    let mut window = 16;
    if high <= low {
        return Ok(None);
    }
    loop {
        let from = (high - window).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(from)).map_err(kafka("seeking"))?;
        consumer.assign(&tpl).map_err(kafka("seeking"))?;
        let mut last = None;
        let mut next = from;
        while next < high {
            let m = consumer
                .poll(timeout)
                .ok_or_else(|| kafka("reading the transaction topic")(KafkaError::Canceled))?
                .map_err(kafka("reading the transaction topic"))?;
            next = m.offset() + 1;
            let v: Value = m.payload().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or_default();
            if v["status"] == "END" {
                last = v["synapse_commit_lsn"].as_u64();
            }
        }
        if let Some(lsn) = last {
            return Ok(Some(Cursor { commit_lsn: Lsn(lsn), index: u32::MAX }));
        }
        if from == low {
            return Ok(None);
        }
        window *= 4;
    }
}

async fn wait_all(acks: Vec<DeliveryFuture>) -> Result<(), ConnectorError> {
    for ack in acks {
        match ack.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(kafka("publishing a message")(e)),
            Err(_) => return Err(kafka("publishing a message")(KafkaError::Canceled)),
        }
    }
    Ok(())
}

fn txn_id(xid: u32, commit_lsn: Lsn) -> String {
    format!("{xid}:{}", commit_lsn.0)
}

/// The Debezium message key: the row's primary key (replica identity) columns.
fn key_of(e: &Event, data: &Value) -> Value {
    let image = if data["after"].is_object() { &data["after"] } else { &data["before"] };
    let mut key = serde_json::Map::new();
    for c in e.relation.iter().flat_map(|r| r.columns.iter()).filter(|c| c.is_key) {
        key.insert(c.name.clone(), image.get(&c.name).cloned().unwrap_or(Value::Null));
    }
    Value::Object(key)
}

/// CloudEvents Kafka protocol binding, binary mode: attributes as `ce_` headers; the
/// `traceparent`'s trace id comes from `trace` (the transaction), its span id from the event.
fn ce_headers(envelope: &Value, trace: &str) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    if let Some(m) = envelope.as_object() {
        for (k, v) in m {
            if k == "data" || k == "datacontenttype" {
                continue;
            }
            if let Some(s) = v.as_str() {
                h = h.insert(Header { key: &format!("ce_{k}"), value: Some(s) });
            }
        }
    }
    h = h.insert(Header { key: "content-type", value: Some("application/json") });
    let id = envelope["id"].as_str().unwrap_or_default();
    h.insert(Header { key: "traceparent", value: Some(&traceparent(trace, id)) })
}

fn traceparent(trace_seed: &str, span_seed: &str) -> String {
    use sha2::{Digest, Sha256};
    let trace: String = Sha256::digest(trace_seed.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect();
    let span: String = Sha256::digest(span_seed.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("00-{trace}-{span}-01")
}
