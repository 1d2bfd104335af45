//! Refusing a password in clear on SQL connections. tokio-postgres answers whatever
//! authentication the server asks for; over a connection without TLS, a clear-text or MD5
//! password request would hand the password (or a replayable hash) to whoever sits in
//! between. [`AuthGuard`] sits under tokio-postgres on such connections, reads the server's
//! authentication request as it passes, and fails the read — before tokio-postgres sees the
//! request, so before any password is sent — unless `require_auth` allows that method. SCRAM
//! passes (it reveals nothing); once the server says "authenticated", or TLS starts, the
//! guard only forwards bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];
/// Messages before authentication are small; a longer one means we are not reading what we
/// think: stop inspecting (the server has not asked for a password by then).
const MAX_STARTUP_MESSAGE: usize = 64 << 10;

/// The server asked for a password in a form the connection must not send it in.
#[derive(Debug)]
pub struct PasswordRefused {
    pub method: &'static str,
}

impl std::fmt::Display for PasswordRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server asked for the password {} over a connection without TLS: refused, so the password is not exposed \
             (connect with sslmode=verify-full, or use scram-sha-256 on the server; to accept the risk, add require_auth={} to the URL)",
            if self.method == "md5" { "as an MD5 hash" } else { "in clear" },
            self.method
        )
    }
}

impl std::error::Error for PasswordRefused {}

/// Whether `error` (or what it wraps) is a [`PasswordRefused`]: definite, never retried.
pub fn is_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<PasswordRefused>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.downcast_ref::<PasswordRefused>().is_some()) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// A stream under tokio-postgres that refuses the password requests `allows` rejects.
pub struct AuthGuard<S> {
    inner: S,
    /// Whose `require_auth` decides.
    config: crate::PgConfig,
    /// The first bytes the client wrote (to tell an SSLRequest).
    written: Vec<u8>,
    /// The server answered our SSLRequest (with `N`: the startup goes on in clear).
    ssl_answered: bool,
    /// The server's bytes not yet split into messages.
    pending: Vec<u8>,
    /// Inspecting the server's bytes (until authenticated, an error, or TLS).
    watching: bool,
}

impl<S> AuthGuard<S> {
    pub fn new(inner: S, config: crate::PgConfig) -> Self {
        AuthGuard { inner, config, written: Vec::new(), ssl_answered: false, pending: Vec::new(), watching: true }
    }

    /// Takes in bytes the server sent; an error if they hold a refused password request.
    fn inspect(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut bytes = bytes;
        // Our SSLRequest is answered by one byte: `S` (TLS follows: nothing more to read in
        // clear) or `N` (the startup goes on in clear).
        if self.written == SSL_REQUEST && !self.ssl_answered {
            match bytes.first() {
                Some(b'S') => {
                    self.watching = false;
                    return Ok(());
                }
                Some(_) => {
                    bytes = &bytes[1..];
                    self.ssl_answered = true;
                }
                None => return Ok(()),
            }
        }
        self.pending.extend_from_slice(bytes);
        while self.watching && self.pending.len() >= 5 {
            let tag = self.pending[0];
            let len = u32::from_be_bytes([self.pending[1], self.pending[2], self.pending[3], self.pending[4]]) as usize;
            if !(4..=MAX_STARTUP_MESSAGE).contains(&len) {
                self.watching = false;
                break;
            }
            if self.pending.len() < len + 1 {
                break;
            }
            match tag {
                b'R' if len >= 8 => {
                    let code = i32::from_be_bytes([self.pending[5], self.pending[6], self.pending[7], self.pending[8]]);
                    let method = match code {
                        0 => {
                            self.watching = false; // authenticated
                            None
                        }
                        3 => Some("password"),
                        5 => Some("md5"),
                        _ => None, // SASL steps, others tokio-postgres refuses itself
                    };
                    if let Some(method) = method.filter(|m| !self.config.allows_auth(m, false)) {
                        self.watching = false;
                        return Err(io::Error::new(io::ErrorKind::PermissionDenied, PasswordRefused { method }));
                    }
                }
                b'E' => self.watching = false,
                _ => {}
            }
            self.pending.drain(..len + 1);
        }
        if !self.watching {
            self.pending = Vec::new();
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            if self.watching {
                let new = buf.filled()[before..].to_vec();
                self.inspect(&new)?;
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            if self.watching && self.written.len() < SSL_REQUEST.len() {
                let take = (*n).min(SSL_REQUEST.len() - self.written.len());
                let first = data[..take].to_vec();
                self.written.extend_from_slice(&first);
            }
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TCP connection, or why there is none (so tokio-postgres reports a failed connect as it
/// reports its own: it reads the error from the stream).
pub enum Tcp {
    Open(tokio::net::TcpStream),
    Failed(Option<io::Error>),
}

impl Tcp {
    fn failure(&mut self) -> io::Error {
        match self {
            Tcp::Failed(e) => e.take().unwrap_or_else(|| io::ErrorKind::NotConnected.into()),
            Tcp::Open(_) => io::ErrorKind::NotConnected.into(),
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut *self {
            Tcp::Open(s) => Pin::new(s).poll_read(cx, buf),
            Tcp::Failed(_) => Poll::Ready(Err(self.failure())),
        }
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match &mut *self {
            Tcp::Open(s) => Pin::new(s).poll_write(cx, data),
            Tcp::Failed(_) => Poll::Ready(Err(self.failure())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self {
            Tcp::Open(s) => Pin::new(s).poll_flush(cx),
            Tcp::Failed(_) => Poll::Ready(Err(self.failure())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self {
            Tcp::Open(s) => Pin::new(s).poll_shutdown(cx),
            Tcp::Failed(_) => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(url: &str) -> AuthGuard<Tcp> {
        AuthGuard::new(Tcp::Failed(None), url.parse().unwrap())
    }

    /// `R` with the authentication code `code`.
    fn auth(code: i32) -> Vec<u8> {
        let mut m = vec![b'R', 0, 0, 0, 8];
        m.extend_from_slice(&code.to_be_bytes());
        m
    }

    #[test]
    fn a_clear_text_request_is_refused_even_split_across_reads() {
        let mut g = guard("postgres://u:p@h/db?sslmode=disable");
        g.written = b"\0\0\0\x29\0\x03\0\0".to_vec(); // a StartupMessage's head
        let m = auth(3);
        for b in &m[..m.len() - 1] {
            g.inspect(std::slice::from_ref(b)).unwrap();
        }
        assert!(g.inspect(&m[m.len() - 1..]).is_err(), "refused once the request is whole");
    }

    #[test]
    fn after_an_ssl_refusal_the_startup_is_guarded_and_tls_is_not_inspected() {
        let mut g = guard("postgres://u:p@h/db?sslmode=prefer");
        g.written = SSL_REQUEST.to_vec();
        let mut bytes = vec![b'N'];
        bytes.extend(auth(5));
        assert!(g.inspect(&bytes).is_err(), "MD5 after `N`");
        let mut g = guard("postgres://u:p@h/db?sslmode=prefer");
        g.written = SSL_REQUEST.to_vec();
        g.inspect(b"S").unwrap();
        assert!(!g.watching, "TLS follows: nothing to read in clear");
    }

    #[test]
    fn scram_steps_pass_and_authentication_ends_the_watch() {
        let mut g = guard("postgres://u:p@h/db?sslmode=disable");
        g.written = b"\0\0\0\x29\0\x03\0\0".to_vec();
        let mut sasl = vec![b'R', 0, 0, 0, 23];
        sasl.extend_from_slice(&10i32.to_be_bytes());
        sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
        g.inspect(&sasl).unwrap();
        assert!(g.watching);
        g.inspect(&auth(0)).unwrap();
        assert!(!g.watching);
        // Allowed by name: not refused.
        let mut g = guard("postgres://u:p@h/db?sslmode=disable&require_auth=password");
        g.written = b"\0\0\0\x29\0\x03\0\0".to_vec();
        g.inspect(&auth(3)).unwrap();
    }
}
