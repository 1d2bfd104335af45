use crate::pgoutput::DecodeError;
use crate::transport::ServerError;
use synapse_log::LogError;

/// Errors of the capture stage, classified once here for the supervisor's retry policy.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("invalid {field}: {message}")]
    Config { field: String, message: String },
    #[error("cannot connect to source {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to the source failed")]
    Io(#[source] std::io::Error),
    #[error("replication protocol violation: {0}")]
    Protocol(String),
    #[error("source server error: {0}")]
    Server(ServerError),
    #[error("source query failed while {context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("undecodable pgoutput message at WAL {lsn}")]
    Decode {
        lsn: String,
        #[source]
        source: DecodeError,
    },
    #[error("change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error(
        "table {table} has no primary key and no replica identity, so its updates and deletes cannot be replicated"
    )]
    NoReplicaIdentity { table: String },
    #[error("publication {publication} does not exist on the source and create_publication is off")]
    MissingPublication { publication: String },
    #[error("writing to the change log failed")]
    Log(#[from] LogError),
    /// The source can no longer continue the log without losing changes (its slot is gone or
    /// invalidated, or this is a promoted standby without it): capture stops rather than cross.
    #[error(
        "gap in source {node}: {what}. The log holds this source's changes up to {last_captured}; what the source \
         committed after that (its WAL is at {wal_now} now) cannot be captured, so nothing past it is. \
         To accept the gap and go on: {accept}"
    )]
    Gap { node: String, what: String, last_captured: String, wal_now: String, accept: String },
    /// `on_gap: resync` could not move the source's WAL past the log's last change within the
    /// bound: the log's positions must keep growing.
    #[error(
        "source {node} is {behind} bytes of WAL behind the last change the log holds ({last_captured}), more than \
         resync moves it forward by itself ({limit} bytes)"
    )]
    Behind { node: String, last_captured: String, behind: u64, limit: u64 },
    /// TLS to the source failed: a certificate the `sslmode` refuses, or no TLS where it is
    /// required.
    #[error("TLS to {target} failed: {message}")]
    Tls { target: String, message: String },
    /// The server asked for a password over a link an eavesdropper could read.
    #[error(
        "the source asked for {method} authentication over a connection {}; refused, so the password is not exposed",
        if *tls { "whose URL's require_auth does not allow it" } else { "without TLS" }
    )]
    AuthRefused { method: &'static str, tls: bool },
    /// A transaction the source streams while it runs could not be kept on disk until its
    /// commit (nothing of it reached the log; the source sends it again after the restart).
    #[error("keeping streamed transaction {xid} in {dir} failed")]
    Spool {
        xid: u32,
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

impl CaptureError {
    pub fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CaptureError {
        let context = context.into();
        move |source| CaptureError::Sql { context, source }
    }
}

impl synapse_error::Classify for CaptureError {
    /// A stable code for logs, metrics and docs.
    fn code(&self) -> &'static str {
        match self {
            CaptureError::Config { .. } => "CAP001",
            CaptureError::Connect { .. } => "CAP002",
            CaptureError::Io(_) => "CAP003",
            CaptureError::Protocol(_) => "CAP004",
            CaptureError::Server(_) => "CAP005",
            CaptureError::Sql { .. } => "CAP006",
            CaptureError::Decode { .. } => "CAP007",
            CaptureError::UnknownRelation(_) => "CAP008",
            CaptureError::NoReplicaIdentity { .. } => "CAP009",
            CaptureError::MissingPublication { .. } => "CAP010",
            CaptureError::Gap { .. } => "CAP011",
            CaptureError::Behind { .. } => "CAP012",
            CaptureError::Tls { .. } => "CAP013",
            CaptureError::AuthRefused { .. } => "CAP014",
            CaptureError::Spool { .. } => "CAP015",
            CaptureError::Log(e) => e.code(),
        }
    }

    /// Transient errors are retried with backoff; definite ones stop capture and are reported.
    fn is_transient(&self) -> bool {
        match self {
            // A full disk may be freed; the source sends the transaction again from its start.
            CaptureError::Connect { .. } | CaptureError::Io(_) | CaptureError::Spool { .. } => true,
            // One list for every stage; 55006 "object in use" covers a slot still held by a
            // previous walsender that has not noticed we died.
            CaptureError::Server(e) => synapse_postgres::is_transient_code(&e.code),
            CaptureError::Sql { source, .. } => synapse_postgres::is_transient(source),
            CaptureError::Log(e) => e.is_transient(),
            _ => false,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            CaptureError::Config { .. } => "fix the named field in the configuration file",
            CaptureError::Connect { .. } | CaptureError::Io(_) => "check that the source is up and reachable; synapse retries",
            CaptureError::Protocol(_) | CaptureError::Decode { .. } => "report this as a bug with the PostgreSQL version",
            CaptureError::Server(_) => "see the server message; `synapse doctor` checks wal_level, privileges and slots",
            CaptureError::Sql { source, .. } if synapse_postgres::tls::is_tls_refusal(source) => synapse_postgres::tls::HINT,
            CaptureError::Sql { .. } => "see the cause; `synapse doctor` checks the source setup",
            CaptureError::UnknownRelation(_) => "restart synapse; the source resends table definitions",
            CaptureError::NoReplicaIdentity { .. } => {
                "add a primary key, or ALTER TABLE … REPLICA IDENTITY FULL (or USING INDEX), or leave the table out of `tables`"
            }
            CaptureError::MissingPublication { .. } => "CREATE PUBLICATION on the source, or set source.create_publication: true",
            CaptureError::Log(e) => e.hint(),
            CaptureError::Gap { .. } => {
                "find out why the slot went (dropped, invalidated by max_slot_wal_keep_size, a failover to a standby without it, \
                 or made again by someone else); accept the gap as the error says, then `synapse repair fix --config <file> \
                 --nodes <source>,<target>` restores on each target what the gap lost; or set the source's `on_gap: resync` \
                 and restart synapse, which does both by itself"
            }
            CaptureError::Tls { .. } => synapse_postgres::tls::HINT,
            CaptureError::AuthRefused { .. } => {
                "connect with sslmode=verify-full (or require), or use scram-sha-256 on the server; to accept the risk, \
                 name the method in the URL's require_auth (e.g. require_auth=md5)"
            }
            CaptureError::Spool { .. } => {
                "free space in the named directory (the log directory's `spool`; it needs room for the largest \
                 transaction in flight), or set the source's `streaming: false` so the source keeps large \
                 transactions in its own pg_replslot until they commit"
            }
            CaptureError::Behind { .. } => {
                "this source is far behind what was captured (a standby that lagged far before its promotion): move the \
                 log directory of this source aside and start again with initial_copy, or write WAL on the source \
                 (e.g. SELECT pg_switch_wal() a few times) until it passes the log's position"
            }
        }
    }
}
