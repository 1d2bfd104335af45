//! How to reach the brokers and name the topics ([`KafkaLogOptions`]), and the context every
//! Kafka client of synapse is created with ([`KafkaContext`]).

use super::*;

/// The context of every Kafka client synapse creates: librdkafka's logs and global errors go
/// to `tracing`, a lost or refused broker connection as a warning — librdkafka reconnects by
/// itself and the component using the client reports its retries — not as an error repeated
/// for every broker and every client while one is down.
#[derive(Clone, Copy, Debug, Default)]
pub struct KafkaContext;

impl rdkafka::ClientContext for KafkaContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error if !matches!(fac, "FAIL" | "ERROR") => {
                tracing::error!(target: "librdkafka", "{fac} {message}")
            }
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
                tracing::warn!(target: "librdkafka", "{fac} {message}")
            }
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "{fac} {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "{fac} {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::DestroyBroker,
            ) => tracing::warn!(target: "librdkafka", %error, "{reason}"),
            _ => tracing::error!(target: "librdkafka", %error, "{reason}"),
        }
    }
}

impl rdkafka::consumer::ConsumerContext for KafkaContext {}

/// How to reach the brokers and name the topics.
#[derive(Clone, Debug)]
pub struct KafkaLogOptions {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic name prefix.
    pub prefix: String,
    /// The source node whose stream this is.
    pub node: String,
    /// Replication factor of the topics created here (existing topics are left as they are).
    pub replication_factor: i32,
    /// Any librdkafka property (security.protocol, sasl.*, ssl.*, …), passed through.
    pub properties: BTreeMap<String, String>,
    /// How long a request to the brokers may take before it counts as failed.
    pub timeout: Duration,
    /// Let the producer put several records in one record batch (Kafka's normal mode). Off
    /// for brokers that count offsets per batch rather than per record: tansu 0.6 reports
    /// a batch's base offset + 1 as the high watermark and answers a fetch inside a batch
    /// with the next batch, so records of a multi-record batch are missed.
    pub batch_records: bool,
    /// Largest message synapse produces: an append is split into messages below it, and one
    /// record above it is refused (`LOG010`). Keep below the topic's `max.message.bytes`.
    pub max_message_bytes: usize,
    /// Signs every message of the changes topic, and refuses to read one that does not carry
    /// this key's signature: appliers run what the log says (DDL included), so only holders
    /// of the key may write it. `None`: anyone who may write the topic may.
    pub signing_key: Option<SigningKey>,
}

/// An HMAC-SHA256 key for the log's messages; its `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey(std::sync::Arc<[u8]>);

impl SigningKey {
    /// At least 32 bytes: a shorter key is refused (`Err` says why, without the key).
    pub fn new(key: &[u8]) -> Result<SigningKey, String> {
        if key.len() < 32 {
            return Err(format!("the signing key has {} bytes; at least 32 are needed", key.len()));
        }
        Ok(SigningKey(key.into()))
    }

    /// The MAC of a message of `topic`: its LSN header (if any) and its payload.
    fn mac(&self, topic: &str, lsn: Option<&[u8]>, payload: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        // HMAC takes a key of any length; `new` checked ours.
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in [topic.as_bytes(), &[0], lsn.unwrap_or_default(), &[0], payload] {
            mac.update(part);
        }
        mac
    }

    pub(crate) fn sign(&self, topic: &str, lsn: Option<&[u8]>, payload: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        self.mac(topic, lsn, payload).finalize().into_bytes().into()
    }

    /// Whether `signature` is this key's for the message (compared in constant time).
    pub(crate) fn verify(&self, topic: &str, lsn: Option<&[u8]>, payload: &[u8], signature: &[u8]) -> bool {
        use hmac::Mac;
        self.mac(topic, lsn, payload).verify_slice(signature).is_ok()
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl KafkaLogOptions {
    pub fn new(brokers: &str, node: &str) -> KafkaLogOptions {
        KafkaLogOptions {
            brokers: brokers.to_owned(),
            prefix: "synapse".into(),
            node: node.to_owned(),
            replication_factor: 1,
            properties: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            batch_records: true,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            signing_key: None,
        }
    }

    /// The client settings: brokers and every pass-through property.
    pub fn client(&self) -> ClientConfig {
        self.client_with(&[])
    }

    /// The client settings over `defaults`: a pass-through property overrides a default.
    pub fn client_with(&self, defaults: &[(&str, String)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in defaults {
            c.set(*k, v);
        }
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// Checks every property with librdkafka without connecting: `Err` names the bad one
    /// (e.g. `No such configuration property: "sasl.mechanismz"`).
    pub fn check(&self) -> Result<(), String> {
        self.client().create_native_config().map(drop).map_err(|e| match e {
            // The value is left out: it may be a password.
            KafkaError::ClientConfig(_, message, key, _) if !key.is_empty() => format!("{key}: {message}"),
            other => other.to_string(),
        })
    }

    pub fn changes_topic(&self) -> String {
        format!("{}.{}.changes", self.prefix, self.node)
    }

    pub fn consumers_topic(&self) -> String {
        format!("{}.{}.consumers", self.prefix, self.node)
    }
}
