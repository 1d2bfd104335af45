//! Where and how to connect: tokio-postgres' settings plus what libpq has and tokio-postgres
//! lacks — the TLS modes that verify the server (`verify-ca`, `verify-full`), the certificate
//! files (`sslrootcert`, `sslcert`, `sslkey`) and `require_auth`.
//!
//! A connection string is libpq's, in either form (`postgres://…?sslmode=verify-full&…` or
//! `host=… sslmode=verify-full …`); the keys above are taken out here, the rest goes to
//! tokio-postgres unchanged. The certificate files are read when the string is parsed, so a
//! missing or unreadable file is a configuration error at start-up, not a failed connection.

use crate::tls::{self, SslMode};
use std::str::FromStr;
use std::sync::Arc;

/// A PostgreSQL connection's settings: tokio-postgres' [`tokio_postgres::Config`] (reachable
/// through `Deref`) and the TLS policy [`crate::connect`] and the replication transport apply.
#[derive(Clone)]
pub struct PgConfig {
    pg: tokio_postgres::Config,
    mode: SslMode,
    /// `None` with [`SslMode::Disable`] only.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// libpq's `require_auth`: the authentication methods the server may ask for. `None`: any,
    /// except that a password is never sent in clear (or as MD5) over a connection without TLS.
    require_auth: Option<Vec<String>>,
}

/// Why a connection string was refused. Never holds the string (it may hold a password).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PgConfigError {
    pub message: String,
}

fn bad(message: impl Into<String>) -> PgConfigError {
    PgConfigError { message: message.into() }
}

/// The keys handled here rather than by tokio-postgres.
const OURS: [&str; 5] = ["sslmode", "sslrootcert", "sslcert", "sslkey", "require_auth"];

/// Authentication methods `require_auth` may name (libpq 16).
const AUTH_METHODS: [&str; 4] = ["password", "md5", "scram-sha-256", "none"];

impl PgConfig {
    /// Settings as tokio-postgres parsed them, with TLS as its own `sslmode` says (`prefer`:
    /// TLS when the server offers it, the certificate unverified — libpq's default).
    pub fn from_pg(pg: tokio_postgres::Config) -> PgConfig {
        let mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        // Without files to read, building the client configuration cannot fail.
        let tls = tls::client_config(mode, None, None).ok().flatten();
        PgConfig { pg, mode, tls, require_auth: None }
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// The TLS client configuration (`None`: TLS disabled).
    pub fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// Whether the server may have us authenticate with `method` (`password`, `md5`,
    /// `scram-sha-256`), given whether the connection is encrypted. Without `require_auth`,
    /// a password is never sent in clear, nor as an MD5 hash, over a connection without TLS:
    /// whoever sits in between could read or replay it.
    pub fn allows_auth(&self, method: &str, encrypted: bool) -> bool {
        match &self.require_auth {
            Some(allowed) => allowed.iter().any(|m| m == method),
            None => encrypted || !matches!(method, "password" | "md5"),
        }
    }

    pub fn pg(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    pub fn pg_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }
}

impl std::ops::Deref for PgConfig {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &tokio_postgres::Config {
        &self.pg
    }
}

impl std::fmt::Debug for PgConfig {
    /// tokio-postgres' `Debug` redacts the password; ours adds the TLS mode.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig").field("pg", &self.pg).field("sslmode", &self.mode).finish()
    }
}

impl FromStr for PgConfig {
    type Err = PgConfigError;

    fn from_str(s: &str) -> Result<PgConfig, PgConfigError> {
        let (rest, ours) = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            split_url(s)
        } else {
            split_key_value(s)?
        };
        let mut pg: tokio_postgres::Config = rest.parse().map_err(|e: tokio_postgres::Error| bad(e.to_string()))?;
        let get = |key: &str| ours.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let mode = match get("sslmode") {
            None => SslMode::Prefer,
            // Values are never echoed: in a malformed string one may be part of a password.
            Some(m) => m
                .parse()
                .map_err(|()| bad("sslmode is not one of disable, allow, prefer, require, verify-ca, verify-full"))?,
        };
        pg.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let client = match (get("sslcert"), get("sslkey")) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(bad("sslcert and sslkey go together: give both files, or neither")),
        };
        if mode == SslMode::Disable && (get("sslrootcert").is_some() || client.is_some()) {
            return Err(bad("sslmode=disable with certificate files: choose a TLS mode, or drop the files"));
        }
        let tls = tls::client_config(mode, get("sslrootcert"), client).map_err(bad)?;
        let require_auth = match get("require_auth") {
            None => None,
            Some(list) => {
                let methods: Vec<String> = list.split(',').map(|m| m.trim().to_owned()).collect();
                if methods.iter().any(|m| !AUTH_METHODS.contains(&m.as_str())) {
                    return Err(bad(format!(
                        "require_auth names a method other than {} (a list separated by commas)",
                        AUTH_METHODS.join(", ")
                    )));
                }
                Some(methods)
            }
        };
        Ok(PgConfig { pg, mode, tls, require_auth })
    }
}

/// A URL's query split into what tokio-postgres parses and our keys (decoded).
fn split_url(s: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = s.split_once('?') else { return (s.to_owned(), Vec::new()) };
    let decode = |t: &str| percent_encoding::percent_decode_str(t).decode_utf8_lossy().into_owned();
    let (mut keep, mut ours) = (Vec::new(), Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k);
        if OURS.contains(&key.as_str()) {
            ours.push((key, decode(v)));
        } else {
            keep.push(pair);
        }
    }
    let rest = if keep.is_empty() { base.to_owned() } else { format!("{base}?{}", keep.join("&")) };
    (rest, ours)
}

/// A `key=value …` string split likewise; values keep libpq's quoting rules (single quotes,
/// backslash escapes), and the rest is written back with every value quoted.
fn split_key_value(s: &str) -> Result<(String, Vec<(String, String)>), PgConfigError> {
    let (mut keep, mut ours) = (Vec::new(), Vec::new());
    for (key, value) in key_values(s)? {
        if OURS.contains(&key.as_str()) {
            ours.push((key, value));
        } else {
            keep.push(format!("{key}='{}'", quoted(&value)));
        }
    }
    Ok((keep.join(" "), ours))
}

fn quoted(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

/// The pairs of a `key=value …` string, in libpq's grammar.
fn key_values(s: &str) -> Result<Vec<(String, String)>, PgConfigError> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not echoed: a stray word may be half of an unquoted password.
            return Err(bad("a word without `=value` (expected key=value pairs; quote a value holding spaces)"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(bad("a quoted value has no closing quote")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// A value as written in a key=value string: quoted only where it must be.
fn shown_value(v: &str) -> String {
    if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        format!("'{}'", quoted(v))
    } else {
        v.to_owned()
    }
}

/// Keys whose values are secrets.
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];

/// `s` (a connection string, either form) fit for logs and output: every password replaced by
/// `***` — the URL's user info, `password` and `sslpassword` parameters. A key=value string
/// that does not parse is not shown at all.
pub fn redact(s: &str) -> String {
    if let Some(scheme_end) = s.find("://").filter(|_| s.starts_with("postgres")) {
        let (head, query) = match s.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (s, None),
        };
        let rest = &head[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let mut out = head[..scheme_end + 3].to_owned();
        match rest[..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***")),
                    None => out.push_str(userinfo),
                }
                out.push_str(&rest[at..]);
            }
            None => out.push_str(rest),
        }
        if let Some(q) = query {
            let pairs: Vec<String> = q
                .split('&')
                .map(|pair| {
                    let key = pair.split('=').next().unwrap_or("");
                    let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
                    if SECRET_KEYS.contains(&key.as_ref()) {
                        format!("{key}=***")
                    } else {
                        pair.to_owned()
                    }
                })
                .collect();
            out.push('?');
            out.push_str(&pairs.join("&"));
        }
        return out;
    }
    match key_values(s) {
        Ok(pairs) => {
            pairs
                .iter()
                .map(|(k, v)| {
                    if SECRET_KEYS.contains(&k.as_str()) {
                        format!("{k}=***")
                    } else {
                        format!("{k}={}", shown_value(v))
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        Err(_) => "(a connection string that does not parse)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_keys_are_taken_out_of_both_forms() {
        let (rest, ours) =
            split_url("postgres://u:p%3F@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem");
        assert_eq!(rest, "postgres://u:p%3F@h:5/db?application_name=x");
        assert_eq!(ours, [("sslmode".into(), "verify-full".into()), ("sslrootcert".into(), "/tmp/ca.pem".into())]);
        let (rest, ours) =
            split_key_value("host=h password='it\\'s x'  sslmode = require user=u\\ v dbname=d").unwrap();
        assert_eq!(ours, [("sslmode".to_string(), "require".to_string())]);
        let pg: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(pg.get_password(), Some(&b"it's x"[..]));
        assert_eq!(pg.get_user(), Some("u v"));
        assert_eq!(pg.get_dbname(), Some("d"));
    }

    proptest::proptest! {
        /// Any text is parsed or refused, never a panic; a refusal never repeats a password.
        #[test]
        fn never_panics(text in ".{0,200}", tail in "(sslmode=[a-z-]{0,12}|sslrootcert='[^']{0,8}'|require_auth=[a-z,-]{0,20}| password=secret9| password=my secret9| password='secret9| sslmode= password=secret9| sslrootcert= password=secret9| require_auth= password=secret9| )*") {
            for s in [format!("{text} {tail}"), format!("postgres://u:secret9@h/db?{text}&{tail}")] {
                if let Err(e) = s.parse::<PgConfig>() {
                    proptest::prop_assert!(!e.to_string().contains("secret9"), "{e}");
                }
            }
        }
    }

    #[test]
    fn passwords_are_redacted_in_every_form() {
        for (text, shown) in [
            ("postgres://u:pa%40ss@h:5/db?sslmode=require", "postgres://u:***@h:5/db?sslmode=require"),
            ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
            ("postgres://u@h/db?password=pw1&application_name=x", "postgres://u@h/db?password=***&application_name=x"),
            ("postgres://h/db?sslpassword=pw1", "postgres://h/db?sslpassword=***"),
            ("host=h password='two words' user='a b'", "host=h password=*** user='a b'"),
            ("host=h password = pw1", "host=h password=***"),
            ("host=h password='unclosed pw1", "(a connection string that does not parse)"),
        ] {
            assert_eq!(redact(text), shown, "{text}");
        }
    }

    #[test]
    fn modes_and_their_errors() {
        let c: PgConfig = "postgres://u@h/db".parse().unwrap();
        assert_eq!(c.ssl_mode(), SslMode::Prefer, "libpq's default");
        assert!(c.tls().is_some());
        let c: PgConfig = "host=h sslmode=disable".parse().unwrap();
        assert!(c.tls().is_none());
        assert!(
            !c.allows_auth("password", false) && !c.allows_auth("md5", false) && c.allows_auth("scram-sha-256", false)
        );
        assert!(c.allows_auth("password", true));
        let c: PgConfig = "host=h sslmode=disable require_auth=md5".parse().unwrap();
        assert!(c.allows_auth("md5", false) && !c.allows_auth("scram-sha-256", true));
        for (text, says) in [
            ("postgres://h/db?sslmode=verify", "sslmode is not one of"),
            ("host=h sslmode=require sslcert=/a", "sslcert and sslkey go together"),
            ("host=h sslmode=disable sslrootcert=/a", "sslmode=disable with certificate files"),
            ("host=h sslmode=verify-full sslrootcert=/nonexistent/ca.pem", "sslrootcert /nonexistent/ca.pem"),
            ("host=h require_auth=gss", "require_auth names a method other than"),
            ("host=h password='open", "no closing quote"),
        ] {
            let e = text.parse::<PgConfig>().unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
