//! The PostgreSQL replication-protocol connection (`replication=database`), built on
//! `postgres-protocol`'s message encoders and SCRAM/MD5 authentication.
//!
//! Why our own: of the published clients (docs/decisions/0001-replication-transport.md), `pgwire-replication` hardcodes
//! protocol version 1 and pulls ring + aws-lc, `pg_walstream` breaks its API every release and its
//! default TLS feature does not resolve here, and `pgoutput`/`pg_replicate` are unusable. The
//! transport is ~300 lines over `postgres-protocol` (which does not parse CopyBothResponse, so
//! frames are split here) and every pgoutput throughput measurement was bounded by the single
//! walsender, not the client.
//!
//! Startup pins `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601` and
//! `extra_float_digits=3`, so the text values pgoutput sends are canonical and lossless.

use crate::CaptureError;
use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use std::time::Duration;
use synapse_postgres::quote;
use synapse_postgres::PgConfig;
use synapse_schemas::Lsn;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_postgres::config::Host;

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub fn now_pg_micros() -> i64 {
    synapse_schemas::unix_micros_now() - PG_EPOCH_OFFSET_US
}

/// PostgreSQL timestamps (µs since 2000-01-01) → µs since the Unix epoch.
pub fn pg_to_unix_micros(pg: i64) -> i64 {
    pg.saturating_add(PG_EPOCH_OFFSET_US)
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Socket for T {}

/// A server error with its SQLSTATE, as sent in an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

fn parse_error(mut body: &[u8]) -> ServerError {
    let mut e = ServerError { code: String::new(), message: String::new(), detail: None, hint: None };
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        let value = String::from_utf8_lossy(&rest[..end]).into_owned();
        match field {
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
        body = rest.get(end + 1..).unwrap_or_default();
    }
    e
}

/// A connected socket before the startup message: whether it is private (TLS, or a local
/// socket) and the TLS channel binding, if any.
struct Link {
    socket: Box<dyn Socket>,
    private: bool,
    binding: Option<Vec<u8>>,
}

/// Asks for TLS (SSLRequest) unless `sslmode=disable`, and wraps the socket when the server
/// agrees; a server that declines is refused where the mode requires TLS.
async fn start_tls(
    mut socket: tokio::net::TcpStream,
    host: &str,
    port: u16,
    config: &PgConfig,
) -> Result<Link, CaptureError> {
    let target = format!("{host}:{port}");
    let Some(tls) = config.tls() else { return Ok(Link { socket: Box::new(socket), private: false, binding: None }) };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    socket.write_all(&request).await.map_err(CaptureError::Io)?;
    let answer = socket.read_u8().await.map_err(CaptureError::Io)?;
    let mode = config.ssl_mode();
    match answer {
        b'S' => {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
                CaptureError::Tls {
                    target: target.clone(),
                    message: format!("`{host}` is not a TLS server name ({e})"),
                }
            })?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, socket).await.map_err(|e| {
                // A refused certificate needs a person; a link that broke mid-handshake, a retry.
                if synapse_postgres::tls::is_tls_refusal(&e) {
                    CaptureError::Tls { target: target.clone(), message: e.to_string() }
                } else {
                    CaptureError::Io(e)
                }
            })?;
            let binding = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| synapse_postgres::tls::server_end_point(c));
            Ok(Link { socket: Box::new(stream), private: true, binding })
        }
        b'N' if !mode.requires_tls() => Ok(Link { socket: Box::new(socket), private: false, binding: None }),
        b'N' => Err(CaptureError::Tls {
            target,
            message: format!("the server does not offer TLS, and sslmode={mode} requires it"),
        }),
        other => Err(CaptureError::Protocol(format!("unexpected answer {other:#x} to the TLS request"))),
    }
}

/// The longest backend message accepted: PostgreSQL's 1 GiB value limit plus headroom.
pub const MAX_FRAME: usize = (1 << 30) + (1 << 20);

/// One backend frame: tag and body.
struct Frame {
    tag: u8,
    body: Bytes,
}

/// A connection in replication mode, before streaming starts.
pub struct ReplicationConnection {
    reader: ReadHalf<Box<dyn Socket>>,
    writer: WriteHalf<Box<dyn Socket>>,
    buf: BytesMut,
    out: BytesMut,
    /// The server process serving this connection (BackendKeyData).
    backend_pid: Option<i32>,
    /// The server's major version (ParameterStatus `server_version`).
    server_major: Option<u32>,
    /// While streaming, set after a large read: the next read waits until then (see
    /// [`PACE_AFTER`]).
    resume_at: Option<tokio::time::Instant>,
    streaming: bool,
}

/// A read of at least this much while streaming means the walsender has a backlog for us:
/// the next read then waits [`PACE`], so the data arrives in fewer, larger TCP segments. A
/// reader that drains the socket at once makes the walsender send each message on its own
/// (`pq_flush_if_writable` after every message), and each segment costs the source CPU: on
/// P1's WAL the walsender spent 3.0–3.8 core-seconds serving an eager reader, 2.5–2.8 with
/// this pacing (PostgreSQL's busy apply worker: 2.1–2.5). Live traffic (small reads) is never
/// delayed. See `docs/decisions/0024-capture-read-pacing.md`.
const PACE_AFTER: usize = 32 * 1024;
const PACE: Duration = Duration::from_millis(1);

/// What IDENTIFY_SYSTEM reports.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: u64,
    pub database: Option<String>,
}

/// What CREATE_REPLICATION_SLOT reports.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub name: String,
    pub consistent_point: u64,
    /// The exported snapshot, valid until this connection runs its next command.
    pub snapshot: Option<String>,
}

/// `15.5 (Debian 15.5-1)` → 15; `9.6.24` → 9.
fn major_version(v: &[u8]) -> Option<u32> {
    let digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&v[..digits]).ok()?.parse().ok()
}

fn parse_lsn(s: &str) -> Option<u64> {
    s.parse::<Lsn>().ok().map(|l| l.0)
}

impl ReplicationConnection {
    /// Connects (over TLS as `sslmode` says) and authenticates (trust, password, MD5 or
    /// SCRAM-SHA-256, with channel binding over TLS when the server offers it). A password is
    /// not sent in clear or as MD5 over a network connection without TLS, unless the URL's
    /// `require_auth` allows it.
    pub async fn connect(config: &PgConfig, application_name: &str) -> Result<Self, CaptureError> {
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let host = config.get_hosts().first().cloned().unwrap_or(Host::Tcp("localhost".into()));
        let timeout = config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(30));
        let socket: Link = match &host {
            Host::Tcp(h) => {
                let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((h.as_str(), port)))
                    .await
                    .map_err(|_| CaptureError::Connect {
                        target: format!("{h}:{port}"),
                        source: std::io::ErrorKind::TimedOut.into(),
                    })?
                    .map_err(|source| CaptureError::Connect { target: format!("{h}:{port}"), source })?;
                s.set_nodelay(true).ok();
                // The kernel notices a peer gone without a reset in ~1 min, not the default 2 h.
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(10))
                    .with_retries(3);
                socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive).ok();
                start_tls(s, h, port, config).await?
            }
            // A local socket crosses no network: no TLS (as libpq), and a password is safe on it.
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|source| CaptureError::Connect { target: path.display().to_string(), source })?;
                Link { socket: Box::new(s), private: true, binding: None }
            }
        };
        let Link { socket, private, binding } = socket;
        let (reader, writer) = tokio::io::split(socket);
        let mut c = ReplicationConnection {
            reader,
            writer,
            buf: BytesMut::with_capacity(1 << 20),
            out: BytesMut::new(),
            backend_pid: None,
            server_major: None,
            resume_at: None,
            streaming: false,
        };
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        let params = [
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "iso_8601"),
            ("extra_float_digits", "3"),
        ];
        frontend::startup_message(params.iter().copied(), &mut c.out).map_err(CaptureError::Io)?;
        c.flush().await?;
        c.authenticate(&user, config, private, binding).await?;
        Ok(c)
    }

    async fn authenticate(
        &mut self,
        user: &str,
        config: &PgConfig,
        private: bool,
        binding: Option<Vec<u8>>,
    ) -> Result<(), CaptureError> {
        let password = config.get_password();
        let need_password = || CaptureError::Config {
            field: "source.url".into(),
            message: "the server asks for a password; add it to the URL or set PGPASSWORD".into(),
        };
        let allow = |method: &'static str| {
            if config.allows_auth(method, private) {
                Ok(())
            } else {
                Err(CaptureError::AuthRefused { method, tls: private })
            }
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        let mut authenticated = false;
        loop {
            let f = self.frame().await?;
            match f.tag {
                b'R' => {
                    let mut body = f.body.clone();
                    if body.len() < 4 {
                        return Err(CaptureError::Protocol("short authentication message".into()));
                    }
                    match body.get_i32() {
                        0 if !authenticated => allow("none")?,
                        0 => {}
                        3 => {
                            allow("password")?;
                            authenticated = true;
                            frontend::password_message(password.ok_or_else(need_password)?, &mut self.out)
                                .map_err(CaptureError::Io)?;
                            self.flush().await?;
                        }
                        5 => {
                            if body.len() < 4 {
                                return Err(CaptureError::Protocol("short MD5 salt".into()));
                            }
                            allow("md5")?;
                            authenticated = true;
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = md5_hash(user.as_bytes(), password.ok_or_else(need_password)?, salt);
                            frontend::password_message(hash.as_bytes(), &mut self.out).map_err(CaptureError::Io)?;
                            self.flush().await?;
                        }
                        10 => {
                            let mechs = String::from_utf8_lossy(&body);
                            if !mechs.split('\0').any(|m| m == sasl::SCRAM_SHA_256) {
                                return Err(CaptureError::Protocol(format!(
                                    "no supported SASL mechanism in {mechs:?}"
                                )));
                            }
                            allow("scram-sha-256")?;
                            authenticated = true;
                            // Channel binding ties the authentication to this TLS session: a man
                            // in the middle with another certificate cannot relay it.
                            let plus = mechs.split('\0').any(|m| m == sasl::SCRAM_SHA_256_PLUS);
                            let (mechanism, binding) = match binding.clone() {
                                Some(b) if plus => {
                                    (sasl::SCRAM_SHA_256_PLUS, sasl::ChannelBinding::tls_server_end_point(b))
                                }
                                Some(_) => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested()),
                                None => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                            };
                            let s = sasl::ScramSha256::new(password.ok_or_else(need_password)?, binding);
                            frontend::sasl_initial_response(mechanism, s.message(), &mut self.out)
                                .map_err(CaptureError::Io)?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| CaptureError::Protocol("SASL continue before start".into()))?;
                            s.update(&body).map_err(CaptureError::Io)?;
                            frontend::sasl_response(s.message(), &mut self.out).map_err(CaptureError::Io)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| CaptureError::Protocol("SASL final before start".into()))?;
                            s.finish(&body).map_err(CaptureError::Io)?;
                        }
                        other => {
                            return Err(CaptureError::Protocol(format!("unsupported authentication method {other}")))
                        }
                    }
                }
                b'E' => return Err(CaptureError::Server(parse_error(&f.body))),
                b'Z' => return Ok(()),
                b'K' if f.body.len() >= 4 => {
                    self.backend_pid = Some(i32::from_be_bytes([f.body[0], f.body[1], f.body[2], f.body[3]]));
                }
                b'S' => {
                    let mut parts = f.body.split(|b| *b == 0);
                    if parts.next() == Some(b"server_version") {
                        self.server_major = parts.next().and_then(major_version);
                    }
                }
                _ => {} // NoticeResponse
            }
        }
    }

    async fn flush(&mut self) -> Result<(), CaptureError> {
        let out = self.out.split();
        self.writer.write_all(&out).await.map_err(CaptureError::Io)?;
        self.writer.flush().await.map_err(CaptureError::Io)
    }

    /// Reads one frame. Cancel-safe: partial frames stay buffered.
    async fn frame(&mut self) -> Result<Frame, CaptureError> {
        loop {
            if let Some(frame) = split_frame(&mut self.buf)? {
                return Ok(frame);
            }
            // A deadline, not a fresh sleep: a caller that cancels this (select!) and calls
            // again waits for the same moment, never longer.
            if let Some(at) = self.resume_at {
                tokio::time::sleep_until(at).await;
                self.resume_at = None;
            }
            let n = self.reader.read_buf(&mut self.buf).await.map_err(CaptureError::Io)?;
            if n == 0 {
                return Err(CaptureError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            if self.streaming && n >= PACE_AFTER {
                self.resume_at = Some(tokio::time::Instant::now() + PACE);
            }
        }
    }

    /// Runs a replication or SQL command; returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, CaptureError> {
        frontend::query(sql, &mut self.out).map_err(CaptureError::Io)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.frame().await?;
            match f.tag {
                b'D' => rows.push(parse_data_row(&f.body)?),
                b'E' => error = Some(parse_error(&f.body)),
                b'Z' => break,
                _ => {} // RowDescription, CommandComplete, EmptyQuery, Notice
            }
        }
        match error {
            Some(e) => Err(CaptureError::Server(e)),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, CaptureError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or_else(|| CaptureError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemInfo {
            system_id: col(0),
            timeline: col(1).parse().unwrap_or(0),
            xlog_pos: parse_lsn(&col(2)).unwrap_or(0),
            database: row.get(3).cloned().flatten(),
        })
    }

    /// Creates a logical slot for pgoutput. With `export_snapshot`, the returned snapshot shows
    /// exactly the data committed before `consistent_point`.
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
        export_snapshot: bool,
    ) -> Result<CreatedSlot, CaptureError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} {} LOGICAL pgoutput {}",
            quote::ident(name),
            if temporary { "TEMPORARY" } else { "" },
            if export_snapshot { "EXPORT_SNAPSHOT" } else { "NOEXPORT_SNAPSHOT" }
        );
        let rows = self.simple_query(&sql).await?;
        let row =
            rows.first().ok_or_else(|| CaptureError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten();
        Ok(CreatedSlot {
            name: col(0).unwrap_or_default(),
            consistent_point: col(1).as_deref().and_then(parse_lsn).unwrap_or(0),
            snapshot: col(2),
        })
    }

    /// The server's major version, as it reported at start-up (`None`: not reported).
    pub fn server_major(&self) -> Option<u32> {
        self.server_major
    }

    /// Starts streaming from `start_lsn` (0 = the slot's confirmed position). `streaming` asks
    /// for in-progress transactions (pgoutput protocol 2, PostgreSQL 14+): the caller must then
    /// handle `StreamStart` … `StreamCommit`/`StreamAbort`.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start_lsn: u64,
        publication: &str,
        streaming: bool,
    ) -> Result<ReplicationStream, CaptureError> {
        let protocol = if streaming { "\"proto_version\" '2', \"streaming\" 'on'" } else { "\"proto_version\" '1'" };
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({protocol}, \"publication_names\" {}, \"messages\" 'true')",
            quote::ident(slot),
            Lsn(start_lsn),
            quote::replication_literal(&quote::ident(publication)),
        );
        frontend::query(&sql, &mut self.out).map_err(CaptureError::Io)?;
        self.flush().await?;
        loop {
            let f = self.frame().await?;
            match f.tag {
                b'W' => break,
                b'E' => return Err(CaptureError::Server(parse_error(&f.body))),
                _ => {}
            }
        }
        self.streaming = true;
        Ok(ReplicationStream { conn: self })
    }
}

/// Splits the next whole frame (tag, length, body) off `buf`; `None` until one is buffered
/// (room for it is reserved).
fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, CaptureError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(CaptureError::Protocol(format!("frame length {len} < 4")));
    }
    // PostgreSQL's messages are below 1 GiB; a longer length is a broken or hostile peer, and
    // would have us reserve up to 4 GiB.
    if len > MAX_FRAME {
        return Err(CaptureError::Protocol(format!("frame length {len} exceeds {MAX_FRAME} bytes")));
    }
    if buf.len() > len {
        let mut frame = buf.split_to(len + 1);
        let tag = frame[0];
        frame.advance(5);
        return Ok(Some(Frame { tag, body: frame.freeze() }));
    }
    buf.reserve(len + 1 - buf.len());
    Ok(None)
}

/// A CopyData body of the replication stream: WAL data or a keepalive.
fn copy_data(mut b: Bytes) -> Result<ReplicationMessage, CaptureError> {
    match b.first().copied() {
        Some(b'w') if b.len() >= 25 => {
            b.advance(1);
            let wal_start = b.get_u64();
            let wal_end = b.get_u64();
            let _server_time = b.get_i64();
            Ok(ReplicationMessage::XLogData { wal_start, wal_end, data: b })
        }
        Some(b'k') if b.len() >= 18 => {
            b.advance(1);
            let wal_end = b.get_u64();
            let _server_time = b.get_i64();
            Ok(ReplicationMessage::Keepalive { wal_end, reply_requested: b.get_u8() == 1 })
        }
        _ => Err(CaptureError::Protocol("short CopyData".into())),
    }
}

/// Runs `bytes`, as a server would send them, through the frame splitter and every parser the
/// connection applies to a frame (CopyData, ErrorResponse, DataRow); returns the whole frames
/// read. For fuzzing: it must return an error, never panic or allocate without bound.
#[doc(hidden)]
pub fn parse_frames(bytes: &[u8]) -> Result<usize, CaptureError> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = 0;
    while let Some(f) = split_frame(&mut buf)? {
        frames += 1;
        match f.tag {
            b'd' => {
                copy_data(f.body)?;
            }
            b'E' => {
                let _ = parse_error(&f.body);
            }
            b'D' => {
                parse_data_row(&f.body)?;
            }
            _ => {}
        }
    }
    Ok(frames)
}

fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, CaptureError> {
    let bad = || CaptureError::Protocol("malformed DataRow".into());
    let mut b = body;
    if b.len() < 2 {
        return Err(bad());
    }
    let n = b.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return Err(bad());
        }
        let len = b.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if b.len() < len {
                return Err(bad());
            }
            row.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
            b.advance(len);
        }
    }
    Ok(row)
}

/// A message from the walsender while streaming.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// WAL data: one pgoutput message in `data`.
    XLogData { wal_start: u64, wal_end: u64, data: Bytes },
    /// Keepalive: the server's WAL end; reply now if `reply_requested`.
    Keepalive { wal_end: u64, reply_requested: bool },
}

/// The streaming (CopyBoth) phase of a replication connection.
pub struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    /// The server process (walsender) streaming to us.
    pub fn backend_pid(&self) -> Option<i32> {
        self.conn.backend_pid
    }

    /// Next message. Cancel-safe.
    pub async fn next(&mut self) -> Result<ReplicationMessage, CaptureError> {
        loop {
            let f = self.conn.frame().await?;
            match f.tag {
                b'd' => return copy_data(f.body),
                b'E' => return Err(CaptureError::Server(parse_error(&f.body))),
                b'c' => return Err(CaptureError::Protocol("server ended the replication stream".into())),
                _ => {}
            }
        }
    }

    /// Makes the next read wait `PACE`, 1 ms (unless one is already due): the walsender has a
    /// backlog for us, and a reader that takes each message as it is sent slows it down.
    pub fn pace(&mut self) {
        if self.conn.resume_at.is_none() {
            self.conn.resume_at = Some(tokio::time::Instant::now() + PACE);
        }
    }

    /// Standby status update: `flush` is what the slot may advance to.
    pub async fn send_status(&mut self, write: u64, flush: u64, apply: u64, reply: bool) -> Result<(), CaptureError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.extend_from_slice(b"r");
        msg.extend_from_slice(&write.to_be_bytes());
        msg.extend_from_slice(&flush.to_be_bytes());
        msg.extend_from_slice(&apply.to_be_bytes());
        msg.extend_from_slice(&now_pg_micros().to_be_bytes());
        msg.extend_from_slice(&[u8::from(reply)]);
        frontend::CopyData::new(&msg[..]).map_err(CaptureError::Io)?.write(&mut self.conn.out);
        self.conn.flush().await
    }
}
