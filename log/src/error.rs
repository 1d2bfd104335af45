use crate::Offset;

/// Errors of the change log, classified for the caller's retry policy.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the log store at {path} failed")]
    Storage {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("log record at offset {offset} is corrupt and cannot be decoded")]
    Corrupt {
        offset: Offset,
        #[source]
        source: postcard::Error,
    },
    #[error("log record could not be encoded")]
    Encode(#[source] postcard::Error),
    #[error("the log task stopped unexpectedly")]
    TaskFailed(#[source] tokio::task::JoinError),
    #[error("Kafka: {context}")]
    Kafka {
        context: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("the log's topic skipped from offset {expected} to {got}")]
    Gap { expected: Offset, got: Offset },
    #[error(
        "records of {topic} from offset {offset} on were deleted (the topic's retention) before this reader read them"
    )]
    Expired { topic: String, offset: Offset },
    #[error("no record of {topic} arrived within the request timeout, below its head (offset {offset})")]
    Stalled { topic: String, offset: Offset },
    #[error(
        "the message of {topic} at offset {offset} does not carry this deployment's signature \
         (log.kafka.signing_key): it was not written by this synapse, or the key differs"
    )]
    Unsigned { topic: String, offset: Offset },
    #[error("a change of table {table} takes {bytes} bytes encoded, more than a Kafka message may ({limit} bytes)")]
    RecordTooLarge { table: String, bytes: usize, limit: usize },
    #[error(
        "records from offset {offset} on were read before they were durable, and their append failed: \
         the reader starts again from its stored position"
    )]
    Rewound { offset: Offset },
    #[error(
        "a write of the log failed, and records staged after it (from offset {offset} on) follow \
         records it dropped: refused until the writer resumes from the last durable commit"
    )]
    NotRecovered { offset: Offset },
    #[error("Kafka topic {topic} cannot be used or created")]
    Topic {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

impl synapse_error::Classify for LogError {
    /// A stable code for logs, metrics and docs.
    fn code(&self) -> &'static str {
        match self {
            LogError::Storage { .. } => "LOG001",
            LogError::Corrupt { .. } => "LOG002",
            LogError::Encode(_) => "LOG003",
            LogError::TaskFailed(_) => "LOG004",
            LogError::Kafka { .. } => "LOG005",
            LogError::Topic { .. } => "LOG006",
            LogError::Gap { .. } => "LOG007",
            LogError::Expired { .. } => "LOG008",
            LogError::Stalled { .. } => "LOG009",
            LogError::RecordTooLarge { .. } => "LOG010",
            LogError::Unsigned { .. } => "LOG011",
            LogError::Rewound { .. } => "LOG012",
            LogError::NotRecovered { .. } => "LOG013",
        }
    }

    /// Transient errors are retried with backoff; the others stop the pipeline for an operator.
    fn is_transient(&self) -> bool {
        match self {
            // A gap is retried: the read starts again from a fresh reader.
            LogError::Storage { .. }
            | LogError::TaskFailed(_)
            | LogError::Gap { .. }
            | LogError::Stalled { .. }
            | LogError::Rewound { .. }
            | LogError::NotRecovered { .. } => true,
            // Brokers down, leader changes, timeouts pass; authorization and bad configuration
            // do not.
            LogError::Kafka { source, .. } | LogError::Topic { source, .. } => match source.rdkafka_error_code() {
                Some(code) => !matches!(
                    code,
                    rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed
                        | rdkafka::types::RDKafkaErrorCode::ClusterAuthorizationFailed
                        | rdkafka::types::RDKafkaErrorCode::GroupAuthorizationFailed
                        | rdkafka::types::RDKafkaErrorCode::SaslAuthenticationFailed
                        | rdkafka::types::RDKafkaErrorCode::InvalidConfig
                        | rdkafka::types::RDKafkaErrorCode::InvalidReplicationFactor
                        | rdkafka::types::RDKafkaErrorCode::PolicyViolation
                        | rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge
                ),
                None => !matches!(source, rdkafka::error::KafkaError::ClientCreation(_)),
            },
            _ => false,
        }
    }

    /// What an operator should do about it.
    fn hint(&self) -> &'static str {
        match self {
            LogError::Storage { .. } => "check free disk space and permissions of the log directory (log.dir)",
            LogError::Corrupt { .. } => {
                "the record cannot be read: restore the log directory from backup, or drop it and \
                 re-create the slot (synapse resyncs the affected source)"
            }
            LogError::Encode(_) => "report this as a bug, with the table definition",
            LogError::TaskFailed(_) => "see the preceding log lines; restart synapse",
            LogError::Kafka { .. } => {
                "check that log.kafka.brokers are reachable from this host and that the credentials \
                 (log.kafka.properties) allow producing and consuming the synapse topics"
            }
            LogError::Gap { .. } => {
                "the broker skipped records: on a broker that counts offsets per record batch \
                 (tansu) set log.kafka.batch_records: false; else check that \
                 <prefix>.<node>.changes is not compacted"
            }
            LogError::Expired { .. } => {
                "the target missed these changes: raise retention.ms / retention.bytes of \
                 <prefix>.<node>.changes above the longest outage of a consumer, then re-copy the \
                 target (truncate its tables, delete its rows from synapse.table_sync and \
                 synapse.applied, restart)"
            }
            LogError::Stalled { .. } => "check the brokers' health and the partition's leader; synapse retries",
            LogError::Rewound { .. } => {
                "nothing to do: the applier resumes by the commit LSN it stored on the target; see \
                 the log store error before it (e.g. a full disk)"
            }
            LogError::NotRecovered { .. } => {
                "nothing to do: capture starts again from the log's last durable commit; see the \
                 log store error before it (e.g. a full disk)"
            }
            LogError::Unsigned { .. } => {
                "something other than this deployment's capture wrote to the changes topic, or \
                 log.kafka.signing_key differs between the processes: give every synapse process the \
                 same key, and allow only synapse to write the topic (ACLs); a record someone else \
                 wrote is never applied"
            }
            LogError::RecordTooLarge { .. } => {
                "raise log.kafka.max_message_bytes above the size named, and the changes topic's \
                 max.message.bytes (and the brokers' replica.fetch.max.bytes) with it; restart"
            }
            LogError::Topic { .. } => {
                "grant this user Describe, Read and Write on the topic (ACLs), and CreateTopics if \
                 synapse should create it — or create it yourself: 1 partition for \
                 <prefix>.<node>.changes, compacted <prefix>.<node>.consumers"
            }
        }
    }
}
