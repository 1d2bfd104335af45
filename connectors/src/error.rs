use synapse_error::Classify;
use synapse_log::LogError;
use synapse_schemas::{Cursor, Lsn};

/// Errors of the connectors, classified once: transient ones are retried with backoff,
/// definite ones stop that endpoint or answer that request, with a stable code and a hint.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("reading the change log failed")]
    Log(#[from] LogError),
    #[error("cursor {cursor} is older than the log's retention{}", oldest.map(|l| format!(" (oldest retained transaction: {l})")).unwrap_or_default())]
    CursorGone { cursor: Cursor, oldest: Option<Lsn> },
    #[error("cursor {cursor} of stream `{stream}` is from before a gap in the source's stream at {gap} ({reason}): changes after it were lost upstream")]
    CursorBeforeGap { stream: String, cursor: Cursor, gap: Cursor, reason: String },
    #[error("too many {what} open")]
    Busy { what: String },
    #[error("invalid {field}: {message}")]
    BadRequest { field: String, message: String },
    #[error("the log refers to relation {oid} but holds no description of it")]
    UnknownRelation { oid: u32 },
    #[error("missing or unknown bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("the connector state store at {path} failed")]
    Store {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("the source could not take a snapshot")]
    Source(#[from] synapse_capture::CaptureError),
    #[error("publishing to the Kafka topics failed")]
    Publish(#[source] LogError),
    #[error("source {node} has no capture slot `{slot}` yet (or lost it): a snapshot now could not be followed without a gap")]
    NotCapturing { node: String, slot: String },
    /// A vector index's own store (its LMDB files) or an event it cannot read.
    #[error("vector index: {0}")]
    Index(String),
    #[error("reading {table} for the snapshot failed")]
    Snapshot {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A read-your-writes wait (`after_lsn`) that ran out of time.
    #[error("{what}")]
    NotReached { what: String },
    /// Reading rows' current values (a search's `include`) from the source.
    #[error("reading the current rows of {table} from the source failed")]
    Rows {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ConnectorError {
    pub fn http_status(&self) -> u16 {
        match self {
            ConnectorError::CursorGone { .. } | ConnectorError::CursorBeforeGap { .. } => 410,
            ConnectorError::BadRequest { .. } => 400,
            ConnectorError::Unauthorized => 401,
            ConnectorError::Forbidden(_) => 403,
            ConnectorError::NotFound { .. } => 404,
            ConnectorError::Conflict { .. } => 409,
            _ if self.is_transient() => 503,
            _ => 500,
        }
    }
}

impl synapse_error::Classify for ConnectorError {
    fn code(&self) -> &'static str {
        match self {
            ConnectorError::Log(e) => e.code(),
            ConnectorError::CursorGone { .. } => "CON001",
            ConnectorError::BadRequest { .. } => "CON002",
            ConnectorError::UnknownRelation { .. } => "CON003",
            ConnectorError::Unauthorized => "CON004",
            ConnectorError::Forbidden(_) => "CON005",
            ConnectorError::NotFound { .. } => "CON006",
            ConnectorError::Store { .. } => "CON007",
            ConnectorError::Conflict { .. } => "CON008",
            ConnectorError::Source(e) => e.code(),
            ConnectorError::Snapshot { .. } => "CON009",
            ConnectorError::Publish(e) => e.code(),
            ConnectorError::NotCapturing { .. } => "CON010",
            ConnectorError::CursorBeforeGap { .. } => "CON011",
            ConnectorError::Busy { .. } => "CON012",
            ConnectorError::Index(_) => "CON013",
            ConnectorError::NotReached { .. } => "CON014",
            ConnectorError::Rows { .. } => "CON015",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            ConnectorError::Log(e) => e.is_transient(),
            ConnectorError::Store { .. }
            | ConnectorError::Snapshot { .. }
            | ConnectorError::NotCapturing { .. }
            | ConnectorError::Busy { .. }
            | ConnectorError::NotReached { .. }
            | ConnectorError::Rows { .. } => true,
            ConnectorError::Source(e) => e.is_transient(),
            ConnectorError::Publish(e) => e.is_transient(),
            _ => false,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            ConnectorError::Log(e) => e.hint(),
            ConnectorError::CursorGone { .. } => {
                "re-read the tables with GET /v1/streams/{name}/snapshot and resume from the cursor \
                 it ends with; keep readers within log.stream_retention_hours"
            }
            ConnectorError::CursorBeforeGap { .. } => {
                "re-read the tables with GET /v1/streams/{name}/snapshot (the `snapshot` link) and \
                 resume from the cursor it ends with; SynapseDB's own targets are re-synced"
            }
            ConnectorError::Busy { .. } => "retry later; close streams you no longer read, or raise api.max_streams",
            ConnectorError::BadRequest { .. } => "fix the named parameter or field and retry",
            ConnectorError::UnknownRelation { .. } => "the log is incomplete: report this as a bug",
            ConnectorError::Unauthorized => "send `Authorization: Bearer <token>` with a token from api.tokens",
            ConnectorError::Forbidden(_) => "use a token whose `tables` include the requested tables",
            ConnectorError::NotFound { .. } => "check the name; GET /v1/endpoints and /v1/streams list what exists",
            ConnectorError::Store { .. } => "check free disk space and permissions of log.dir",
            ConnectorError::Conflict { .. } => "choose another name, or PUT to replace it",
            ConnectorError::Source(e) => e.hint(),
            ConnectorError::Publish(e) => e.hint(),
            ConnectorError::Snapshot { .. } => {
                "retry the snapshot; check the source is reachable and the table readable"
            }
            ConnectorError::NotCapturing { .. } => {
                "retry once /readyz shows the source's capture streaming; if it is parked on a gap, \
                 follow the fix it names"
            }
            ConnectorError::Index(_) => {
                "check free disk space under log.dir; a damaged index is rebuilt by deleting its \
                 directory (log.dir/indexes/<name>) and restarting: it loads again from a snapshot"
            }
            ConnectorError::NotReached { .. } => {
                "retry with a longer timeout_secs; GET /v1/indexes/{name} shows the position the \
                 index holds and /readyz whether its source is streaming"
            }
            ConnectorError::Rows { .. } => {
                "check that the source is reachable and the columns readable by synapse's role; \
                 a search without `include` still answers from the index"
            }
        }
    }
}
