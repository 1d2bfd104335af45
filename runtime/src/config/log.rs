//! The `log:` section: the embedded log's directory, or Kafka with its properties and the
//! public topics.

use super::defaults;
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Directory of the embedded log (one file per source).
    #[serde(default = "default_log_dir")]
    pub dir: PathBuf,
    /// Hours of changes kept for stream readers after every consumer passed them (0: none).
    #[serde(default = "default_stream_retention")]
    pub stream_retention_hours: f64,
    /// Hours a webhook dead letter is kept (for inspection and replay); 0: forever.
    #[serde(default = "default_dead_letter_retention")]
    pub dead_letter_retention_hours: f64,
    /// Keep the change streams on Kafka instead of in `dir` (which then holds only this
    /// process's connector state).
    pub kafka: Option<KafkaConfig>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            dir: default_log_dir(),
            stream_retention_hours: default_stream_retention(),
            dead_letter_retention_hours: default_dead_letter_retention(),
            kafka: None,
        }
    }
}

/// `log.kafka`: the brokers and how topics are named and created.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]` (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    /// Topics are `<topic_prefix>.<source>.changes` and `<topic_prefix>.<source>.consumers`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Replication factor of topics synapse creates; unset: the broker's
    /// `default.replication.factor`. Existing topics are used as they are.
    pub replication_factor: Option<i32>,
    /// Seconds a broker request may take before it counts as failed (and is retried).
    #[serde(default = "default_kafka_timeout")]
    pub request_timeout_secs: f64,
    /// `false` for brokers that count offsets per record batch instead of per record (tansu
    /// 0.6): every record then goes in its own batch. Keep `true` on Apache Kafka, Redpanda, MSK.
    #[serde(default = "super::yes")]
    pub batch_records: bool,
    /// Any librdkafka property, passed through: `security.protocol`, `sasl.mechanism`,
    /// `sasl.username`, `sasl.password`, `ssl.ca.location`, …
    #[serde(default)]
    pub properties: KafkaProperties,
    /// Also publish every change to public per-table topics (Debezium layout, CloudEvents
    /// headers) that any Kafka client can read.
    pub public_topics: Option<PublicTopicsConfig>,
    /// Scale out: processes started with the same configuration and this consumer group share
    /// the sources. Each source (its capture, appliers and public-topic publisher) runs in
    /// exactly one member; a member that stops hands its sources over at once, one that dies
    /// after the group's session timeout (`session.timeout.ms` in `properties`, 45 s default).
    pub group: Option<String>,
    /// Largest Kafka message synapse writes (bytes); a single row change above it stops the
    /// capture with LOG010. Raise it together with the changes topic's `max.message.bytes`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Signs the changes topics' messages (HMAC-SHA256); readers refuse any message without
    /// this key's signature (`LOG011`). At least 32 characters, the same in every process:
    /// `${SYNAPSE_LOG_KEY}`. Unset: whoever may write the topics can have appliers run SQL.
    pub signing_key: Option<LogSigningKey>,
}

/// `log.kafka.signing_key`: a secret, never shown.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct LogSigningKey(pub(super) String);

impl std::fmt::Debug for LogSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

fn default_max_message_bytes() -> usize {
    synapse_log::DEFAULT_KAFKA_MAX_MESSAGE_BYTES
}

/// `log.kafka.public_topics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicTopicsConfig {
    /// `schema.table` names to publish; empty: every replicated table.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Partitions of the table topics synapse creates; unset: the broker's `num.partitions`.
    pub partitions: Option<i32>,
    /// Follow each delete with a tombstone (a null value), for compacted topics.
    #[serde(default)]
    pub tombstones: bool,
}

fn default_topic_prefix() -> String {
    "synapse".into()
}

fn default_kafka_timeout() -> f64 {
    10.0
}

/// librdkafka properties; values may be written as strings, numbers or booleans. Values of
/// secret-looking keys (`*password*`, `*secret*`, `*.key*`) never reach logs or output.
#[derive(Clone, Default, Deserialize)]
pub struct KafkaProperties(pub std::collections::BTreeMap<String, PropertyValue>);

#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Text(s) => f.write_str(s),
            PropertyValue::Integer(i) => write!(f, "{i}"),
            PropertyValue::Float(x) => write!(f, "{x}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

fn is_secret_property(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.contains(".key") || key.contains("token")
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.0 {
            if is_secret_property(k) {
                m.entry(k, &"***");
            } else {
                m.entry(k, &v.to_string());
            }
        }
        m.finish()
    }
}

impl KafkaConfig {
    /// The Kafka log's options for source `node`.
    pub fn log_options(&self, node: &str) -> synapse_log::KafkaLogOptions {
        let mut o = synapse_log::KafkaLogOptions::new(&self.brokers, node);
        o.prefix = self.topic_prefix.clone();
        o.replication_factor = self.replication_factor.unwrap_or(-1);
        o.timeout = std::time::Duration::from_secs_f64(self.request_timeout_secs);
        o.batch_records = self.batch_records;
        o.max_message_bytes = self.max_message_bytes;
        o.properties = self.properties.0.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
        // Checked by `validate`.
        o.signing_key = self.signing_key.as_ref().and_then(|k| synapse_log::SigningKey::new(k.0.as_bytes()).ok());
        o
    }
}

/// Two weeks: long enough to notice and replay, short enough that a dead endpoint does not
/// grow the connector store without bound.
fn default_dead_letter_retention() -> f64 {
    336.0
}

fn default_stream_retention() -> f64 {
    defaults::STREAM_RETENTION_HOURS
}

fn default_log_dir() -> PathBuf {
    PathBuf::from(defaults::LOG_DIR)
}
