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
}

impl LogError {
    /// A stable code for logs, metrics and docs.
    pub fn code(&self) -> &'static str {
        match self {
            LogError::Storage { .. } => "LOG001",
            LogError::Corrupt { .. } => "LOG002",
            LogError::Encode(_) => "LOG003",
            LogError::TaskFailed(_) => "LOG004",
        }
    }

    /// Transient errors are retried with backoff; the others stop the pipeline for an operator.
    pub fn is_transient(&self) -> bool {
        matches!(self, LogError::Storage { .. } | LogError::TaskFailed(_))
    }

    /// What an operator should do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            LogError::Storage { .. } => "check free disk space and permissions of the log directory (log.dir)",
            LogError::Corrupt { .. } => {
                "the record cannot be read: restore the log directory from backup, or drop it and \
                 re-create the slot (synapse resyncs the affected source)"
            }
            LogError::Encode(_) => "report this as a bug, with the table definition",
            LogError::TaskFailed(_) => "see the preceding log lines; restart synapse",
        }
    }
}
