//! The one PostgreSQL layer of SynapseDB: every stage (capture, apply, repair, connectors, the
//! doctor) connects, classifies errors and quotes SQL through this crate, so they agree.
//!
//! ```text
//!   capture ─┐
//!   apply   ─┼─► connect() ──► tokio_postgres::Client   (one place for timeouts and TLS)
//!   repair  ─┤   is_transient(&Error)                    (one retry policy for every SQLSTATE)
//!   doctor  ─┘   quote::{ident, literal}, TableName      (one way to write names into SQL)
//! ```
//!
//! Guarantees:
//! * [`PgConfig`] is libpq's connection string: `sslmode` (`disable` … `verify-full`, default
//!   `prefer`), `sslrootcert`, `sslcert`/`sslkey` and `require_auth` work as in libpq (see
//!   [`tls`]), on every SQL connection and on the replication transport.
//! * [`connect`] never waits longer than [`CONNECT_TIMEOUT`] for a server that does not answer
//!   (unless the URL sets its own `connect_timeout`), and drives the connection on a task of its
//!   own; a broken connection shows as an error on the next statement, never as a hang in it.
//!   Its sessions wait at most [`LOCK_TIMEOUT`] for a lock and probe an idle link with TCP
//!   keepalives after [`KEEPALIVE_IDLE`] (both unless the URL chooses its own).
//! * [`is_transient`] gives one answer for one error wherever it is asked: a retry with backoff
//!   can succeed (connection lost, server starting or shutting down, too many clients,
//!   serialization failure, deadlock, lock or object busy); anything else needs a person.
//! * [`quote::literal`] is correct under either `standard_conforming_strings` setting.
//! * [`node_schema::migrate`] is the only code that creates or changes SynapseDB's own tables
//!   (`synapse.*`): versioned, ordered migrations; a node from a newer release is refused.

mod config;
pub mod node_schema;
pub mod quote;
mod sqlstate;
mod table;
pub mod tls;

pub use config::{redact, PgConfig, PgConfigError};
pub use sqlstate::{is_transient, is_transient_code};
pub use table::{TableName, TableNameError};

use std::time::Duration;
use tokio_postgres::{Client, NoTls};

/// How long a connection attempt may wait for a server that does not answer: long enough for a
/// loaded server across regions, short enough that a dead address is reported, not waited on.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long synapse's own statements wait for a lock (`lock_timeout`, unless the URL's
/// `options` set one).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle time before TCP keepalive probes start on synapse's connections.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Connects to `config` and spawns the connection's task; `purpose` names it in the log when the
/// connection ends with an error (e.g. `"apply b"`).
pub async fn connect(pg: &PgConfig, purpose: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config = pg.pg().clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // A lock held by an application transaction fails synapse's statement after a while (a
    // transient error: retried) instead of hanging it — and, for DDL such as installing a
    // trigger, instead of queueing every later reader of the table behind it.
    let options = config.get_options().unwrap_or_default().to_owned();
    if !options.contains("lock_timeout") {
        config.options(format!("{options} -c lock_timeout={}", LOCK_TIMEOUT.as_millis()).trim());
    }
    // A peer gone without a reset (a dropped NAT entry, a dead host) is noticed in about a
    // minute instead of the kernel's two hours, unless the URL chose its own keepalives.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(KEEPALIVE_IDLE);
        config.keepalives_interval(Duration::from_secs(10));
        config.keepalives_retries(3);
    }
    // Named in pg_stat_activity, so a DBA can tell synapse's sessions (and their TLS) apart.
    if config.get_application_name().is_none() {
        config.application_name(format!("synapse {purpose}"));
    }
    let purpose = purpose.to_owned();
    let client = match pg.tls() {
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%purpose, %error, "postgres connection ended");
                }
            });
            client
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%purpose, %error, "postgres connection ended");
                }
            });
            client
        }
    };
    Ok(client)
}

/// Connects to a connection string (URL or `key=value` form); see [`connect`]. A string that
/// does not parse is an error of its own kind, never a connection error.
pub async fn connect_str(url: &str, purpose: &str) -> Result<Client, ConnectStrError> {
    let config: PgConfig = url.parse()?;
    Ok(connect(&config, purpose).await?)
}

/// Why [`connect_str`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectStrError {
    #[error("invalid connection string: {0}")]
    Config(#[from] PgConfigError),
    #[error(transparent)]
    Connect(#[from] tokio_postgres::Error),
}
