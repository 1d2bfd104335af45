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
pub mod ddl;
pub mod guard;
pub mod node_schema;
pub mod quote;
mod sqlstate;
mod table;
pub mod table_ddl;
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
    let spawn = |purpose: String| {
        move |connection: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send>,
        >| {
            let purpose = purpose.clone();
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%purpose, %error, "postgres connection ended");
                }
            });
        }
    };
    // A password that may only go out encrypted, on a connection that may be in clear: the
    // guard under tokio-postgres refuses a clear-text or MD5 request (see `guard`).
    if needs_guard(pg, &config) {
        return match pg.tls() {
            None => connect_guarded(pg, &config, NoTls, spawn(purpose)).await,
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                connect_guarded(pg, &config, tls, spawn(purpose)).await
            }
        };
    }
    let client = match pg.tls() {
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            spawn(purpose)(Box::pin(connection));
            client
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = config.connect(tls).await?;
            spawn(purpose)(Box::pin(connection));
            client
        }
    };
    Ok(client)
}

/// Whether [`connect`] must guard the authentication: a password is set, the connection may
/// be made without TLS (sslmode disable, allow or prefer) over TCP, and `require_auth` does
/// not accept a password in clear or as MD5 there.
fn needs_guard(pg: &PgConfig, config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::{Host, SslMode};
    config.get_password().is_some()
        && config.get_ssl_mode() != SslMode::Require
        && !(pg.allows_auth("password", false) && pg.allows_auth("md5", false))
        && config.get_hosts().iter().all(|h| matches!(h, Host::Tcp(_)))
}

/// [`connect`] over TCP connections of our own, each under a [`guard::AuthGuard`]: the hosts
/// in order, as tokio-postgres would try them.
async fn connect_guarded<T>(
    pg: &PgConfig,
    config: &tokio_postgres::Config,
    mut tls: T,
    spawn: impl Fn(std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send>>),
) -> Result<Client, tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<guard::AuthGuard<guard::Tcp>>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<guard::AuthGuard<guard::Tcp>>>::Future: Send,
{
    use tokio_postgres::config::Host;
    let timeout = config.get_connect_timeout().copied().unwrap_or(CONNECT_TIMEOUT);
    let (ports, addrs) = (config.get_ports(), config.get_hostaddrs());
    let mut failure: Option<std::io::Error> = None;
    let mut last: Option<tokio_postgres::Error> = None;
    for (i, host) in config.get_hosts().iter().enumerate() {
        let Host::Tcp(name) = host else { continue };
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let target = match addrs.get(i) {
            Some(ip) => tokio::time::timeout(timeout, tokio::net::TcpStream::connect((*ip, port))).await,
            None => tokio::time::timeout(timeout, tokio::net::TcpStream::connect((name.as_str(), port))).await,
        };
        let stream = match target {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                failure = Some(e);
                continue;
            }
            Err(_) => {
                failure = Some(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if config.get_keepalives() {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(config.get_keepalives_idle())
                .with_interval(config.get_keepalives_interval().unwrap_or(Duration::from_secs(10)))
                .with_retries(config.get_keepalives_retries().unwrap_or(3));
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        }
        let Ok(tls_connect) = tls.make_tls_connect(name) else {
            failure = Some(std::io::Error::other(format!("cannot set up TLS for {name}")));
            continue;
        };
        let guarded = guard::AuthGuard::new(guard::Tcp::Open(stream), pg.clone());
        match tokio::time::timeout(timeout, config.connect_raw(guarded, tls_connect)).await {
            Ok(Ok((client, connection))) => {
                spawn(Box::pin(connection));
                return Ok(client);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => failure = Some(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")),
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    // No host answered: tokio-postgres reports the failure, read from a stream that holds it.
    let failed = guard::AuthGuard::new(guard::Tcp::Failed(failure), pg.clone());
    match config.connect_raw(failed, NoTls).await {
        Ok((client, connection)) => {
            spawn(Box::pin(connection));
            Ok(client)
        }
        Err(e) => Err(e),
    }
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
