//! Who may call the HTTP API, and the record of what they changed.
//!
//! * Bearer tokens with scopes: `stream` (read changes of the token's tables), `endpoints`
//!   (manage webhook endpoints), `repair` (check and fix replicas), `admin` (all of them, and
//!   resuming parked components). Tokens are kept as SHA-256 digests and compared in constant
//!   time; a config may give the digest only (`token_sha256`), so no file holds the secret.
//! * Without tokens (a development setup; refused by the configuration on a non-loopback
//!   address) every request must name a loopback host (`Host: localhost…`), so a web page that
//!   rebinds its DNS name to 127.0.0.1 cannot reach the API.
//! * Every request that changes something (POST, PUT, PATCH, DELETE) must send JSON
//!   (`Content-Type: application/json`), so a browser cannot forge one without a CORS
//!   preflight, and is recorded in the audit log: who (token name), what, when, the outcome.

use crate::ConnectorError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Stream,
    Endpoints,
    Repair,
    Admin,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Stream => "stream",
            Scope::Endpoints => "endpoints",
            Scope::Repair => "repair",
            Scope::Admin => "admin",
        })
    }
}

/// A bearer token: its name, the digest of its secret, what it may read and do.
#[derive(Clone, Debug)]
pub struct Token {
    pub name: String,
    pub sha256: [u8; 32],
    /// `schema.table` names a `stream` token may read; empty = every table.
    pub tables: Vec<String>,
    pub scopes: Vec<Scope>,
}

impl Token {
    /// A token from its secret.
    pub fn new(name: &str, secret: &str, tables: Vec<String>, scopes: Vec<Scope>) -> Token {
        Token { name: name.to_owned(), sha256: digest(secret), tables, scopes }
    }

    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

/// The SHA-256 of a token's secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.trim().as_bytes()).into()
}

/// The API's tokens (none: authentication off, loopback host names only). Replaced as a whole
/// by [`Auth::replace`] (token rotation without a restart); a request sees one set or the other.
#[derive(Debug, Default)]
pub struct Auth {
    tokens: std::sync::RwLock<Arc<Vec<Token>>>,
}

impl Auth {
    pub fn new(tokens: Vec<Token>) -> Auth {
        Auth { tokens: std::sync::RwLock::new(Arc::new(tokens)) }
    }

    /// The tokens now.
    pub fn tokens(&self) -> Arc<Vec<Token>> {
        self.tokens.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Serves `tokens` from the next request on.
    pub fn replace(&self, tokens: Vec<Token>) {
        if let Ok(mut t) = self.tokens.write() {
            *t = Arc::new(tokens);
        }
    }

    /// The caller's token if it may act in `scope` (`None` when authentication is off).
    pub fn check(&self, headers: &HeaderMap, scope: Scope) -> Result<Option<Token>, ConnectorError> {
        let Some(token) = self.caller(headers)? else { return Ok(None) };
        if token.allows(scope) {
            Ok(Some(token))
        } else {
            Err(ConnectorError::Forbidden(format!(
                "token `{}` lacks the `{scope}` scope (it has: {})",
                token.name,
                token.scopes.iter().map(Scope::to_string).collect::<Vec<_>>().join(", ")
            )))
        }
    }

    /// The token presented (`None` when authentication is off), whatever its scopes.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Option<Token>, ConnectorError> {
        let tokens = self.tokens();
        if tokens.is_empty() {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            return if is_loopback_host(host) {
                Ok(None)
            } else {
                Err(ConnectorError::Forbidden(format!(
                    "Host `{}` is not a loopback name: without api.tokens only localhost, 127.0.0.1 and [::1] are served",
                    host.chars().take(100).collect::<String>()
                )))
            };
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ConnectorError::Unauthorized)?;
        let d = digest(presented);
        // Every token is compared, in constant time: timing tells nothing about which matched.
        let mut found = None;
        for t in tokens.iter() {
            if constant_time_eq(&t.sha256, &d) {
                found = Some(t);
            }
        }
        found.cloned().map(Some).ok_or(ConnectorError::Unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `localhost`, `127.0.0.1`, `[::1]` or a name under `.localhost`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => {
            host.rsplit_once(':').map_or(host, |(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host })
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// One line of the audit log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub at: String,
    /// The token's name; `-` with authentication off; `?` when no valid token was presented.
    pub who: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// The audit log: JSON lines appended (and synced) for every request that changes something.
pub struct Audit {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    rotate_bytes: u64,
}

/// Entries [`Audit::recent`] returns at most.
pub const AUDIT_RECENT: usize = 1_000;
/// Past this size the audit log is rotated: the file becomes `<name>.1` (replacing the one
/// before) and a new one is started. Entries are a few hundred bytes: ~200,000 per file.
pub const AUDIT_ROTATE_BYTES: u64 = 64 << 20;
/// How much of the file's end [`Audit::recent`] reads (its entries are short).
const AUDIT_TAIL_BYTES: u64 = 1 << 20;

impl Audit {
    pub fn open(path: &Path) -> std::io::Result<Audit> {
        Self::open_rotating_at(path, AUDIT_ROTATE_BYTES)
    }

    /// [`Audit::open`] rotating past `rotate_bytes`.
    pub fn open_rotating_at(path: &Path, rotate_bytes: u64) -> std::io::Result<Audit> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Audit { path: path.to_owned(), file: Mutex::new(Self::create(path)?), rotate_bytes })
    }

    fn create(path: &Path) -> std::io::Result<std::fs::File> {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(path)
    }

    fn append(&self, entry: &AuditEntry) {
        let labels = [("method", entry.method.clone()), ("status", entry.status.to_string())];
        metrics::counter!("synapse_admin_actions_total", &labels).increment(1);
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        let written =
            self.file.lock().map_err(|_| std::io::Error::other("audit log lock poisoned")).and_then(|mut f| {
                if f.metadata()?.len() >= self.rotate_bytes {
                    let mut old = self.path.clone().into_os_string();
                    old.push(".1");
                    std::fs::rename(&self.path, &old)?;
                    *f = Self::create(&self.path)?;
                }
                f.write_all(&line)?;
                f.sync_data()
            });
        if let Err(e) = written {
            // The action happened; losing its record must at least be loud.
            tracing::error!(path = %self.path.display(), error = %e, who = %entry.who, method = %entry.method, uri = %entry.path, "cannot append to the audit log");
            metrics::counter!("synapse_audit_write_errors_total").increment(1);
        }
    }

    /// The newest entries, newest last (read from the file's last MiB, not the whole file).
    pub fn recent(&self, limit: usize) -> std::io::Result<Vec<AuditEntry>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.path)?;
        let len = f.metadata()?.len();
        let from = len.saturating_sub(AUDIT_TAIL_BYTES);
        f.seek(SeekFrom::Start(from))?;
        let mut tail = Vec::new();
        f.take(AUDIT_TAIL_BYTES).read_to_end(&mut tail)?;
        let text = String::from_utf8_lossy(&tail);
        // Started mid-file: the first line may be cut.
        let lines: Vec<&str> = text.lines().skip(usize::from(from > 0)).collect();
        Ok(lines[lines.len().saturating_sub(limit.min(AUDIT_RECENT))..]
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// A route layer: the caller's token must have `scope` (see [`Auth::check`]).
pub async fn require(State((auth, scope)): State<(Arc<Auth>, Scope)>, request: Request, next: Next) -> Response {
    match auth.check(request.headers(), scope) {
        Ok(_) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// What the middleware needs: the tokens (to name the caller) and the audit log.
#[derive(Clone)]
pub struct Guard {
    pub auth: Arc<Auth>,
    pub audit: Option<Arc<Audit>>,
}

/// The API's middleware: mutating requests must send JSON and are audited.
pub async fn guard(State(g): State<Guard>, request: Request, next: Next) -> Response {
    let mutating = matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    if !mutating {
        return next.run(request).await;
    }
    let who = match g.auth.caller(request.headers()) {
        Ok(Some(t)) => t.name.clone(),
        Ok(None) => "-".into(),
        Err(_) => "?".into(),
    };
    let (method, path) = (request.method().to_string(), request.uri().path().to_owned());
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    let response = if json || *request.method() == Method::DELETE {
        next.run(request).await
    } else {
        ConnectorError::BadRequest {
            field: "Content-Type".into(),
            message: "a request that changes something must send `Content-Type: application/json` (a body of `{}` if it has nothing to say)".into(),
        }
        .into_response()
    };
    if let Some(audit) = &g.audit {
        let at = synapse_schemas::cloudevent::rfc3339_micros(synapse_schemas::unix_micros_now());
        audit.append(&AuditEntry { at, who, method, path, status: response.status().as_u16() });
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "localhost:7654", "127.0.0.1:80", "[::1]:7654", "[::1]", "api.localhost:1", "127.0.0.2"]
        {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["", "evil.example", "evil.example:7654", "10.0.0.1", "localhost.evil.example", "[2001:db8::1]:1"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn the_audit_log_rotates_and_reads_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open_rotating_at(&path, 4096).unwrap();
        let entry = |i: usize| AuditEntry {
            at: "2026-12-03T00:00:00Z".into(),
            who: "root".into(),
            method: "POST".into(),
            path: format!("/v1/endpoints/{i}"),
            status: 200,
        };
        for i in 0..100 {
            audit.append(&entry(i));
        }
        let old = dir.path().join("audit.jsonl.1");
        assert!(old.exists(), "rotated");
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 4096 + 200, "the current file is {size} bytes");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let recent = audit.recent(5).unwrap();
        assert_eq!(recent.iter().map(|e| e.path.as_str()).collect::<Vec<_>>().last(), Some(&"/v1/endpoints/99"));
        assert_eq!(recent.len(), 5);
        // A file far larger than the tail read: the newest entries, no torn first line.
        let big = dir.path().join("big.jsonl");
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&serde_json::to_string(&entry(i)).unwrap());
            text.push('\n');
        }
        std::fs::write(&big, text).unwrap();
        let tail = Audit::open(&big).unwrap().recent(AUDIT_RECENT).unwrap();
        assert_eq!(tail.len(), AUDIT_RECENT);
        assert_eq!(tail.last().unwrap().path, "/v1/endpoints/19999");
    }
}
