//! The HTTP listeners (API and ops): axum routers served through hyper with the bounds
//! `axum::serve` lacks — a header read timeout (which also ends keep-alive connections idle
//! between requests: slowloris), a cap on open connections (past it a connection is answered
//! 503 and closed, so the kernel's backlog never fills with clients that wait forever), and
//! a graceful shutdown that ends idle connections at once.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// How a listener bounds its clients.
#[derive(Clone)]
pub struct Limits {
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// A request's header must arrive within this, and a kept-alive connection's next request
    /// must start within it.
    pub header_timeout: Duration,
    /// TLS with this configuration (the handshake, too, must finish within `header_timeout`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 4096, header_timeout: Duration::from_secs(10), tls: None }
    }
}

/// Binds `listen` (`host:port`) with a deep accept queue: with the default (1,024) a burst of
/// connections overflows it before the accept loop drains it, and the kernel drops SYNs that
/// clients then retry a second later.
pub async fn bind(listen: &str) -> std::io::Result<TcpListener> {
    let addr = tokio::net::lookup_host(listen)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{listen} resolves to no address")))?;
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // The kernel caps it at net.core.somaxconn.
    socket.listen(4096)
}

/// What an over-cap connection of listener `name` is told before it is closed.
fn busy(name: &str) -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "code": "SYN003",
        "message": "too many open connections",
        "hint": format!("retry shortly; raise {name}.max_connections if clients need more"),
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` under `limits` until `shutdown` turns true; `name` labels the
/// metrics (`synapse_http_connections{listener}`, `synapse_http_refused_total{listener}`).
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let busy: Arc<[u8]> = busy(name).into();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait instead of spinning (what
                // axum::serve does too).
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("synapse_http_refused_total", "listener" => name).increment(1);
            let busy = busy.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                let wrote = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&busy)).await;
                // Counted in the metric; a log line each would flood the log under attack.
                tracing::debug!(listener = name, %peer, ?wrote, "refused a connection over the cap");
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open = metrics::gauge!("synapse_http_connections", "listener" => name);
        open.increment(1.0);
        let (http, app, watcher) = (http.clone(), app.clone(), graceful.watcher());
        let (tls, handshake) = (limits.tls.clone().map(tokio_rustls::TlsAcceptor::from), limits.header_timeout);
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app);
            let served = match tls {
                None => watcher.watch(http.serve_connection(TokioIo::new(stream), service)).await,
                Some(acceptor) => match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => watcher.watch(http.serve_connection(TokioIo::new(tls), service)).await,
                    Ok(Err(e)) => {
                        metrics::counter!("synapse_tls_handshake_failures_total", "listener" => name).increment(1);
                        tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                        Ok(())
                    }
                    Err(_) => Ok(()), // a handshake that stalls is a slowloris too
                },
            };
            if let Err(e) = served {
                tracing::debug!(listener = name, %peer, error = %e, "connection ended");
            }
            open.decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    // Idle connections end now; requests in flight (not live streams: those watch the same
    // shutdown and end) get a few seconds.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_idle_connections_is_accepted_at_once_and_kept() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (_tx, rx) = watch::channel(false);
        let limits = Limits { max_connections: 3000, header_timeout: Duration::from_secs(8), tls: None };
        tokio::spawn(serve("api", listener, app, limits, rx));
        let (took, open) = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let conns: Vec<std::net::TcpStream> =
                (0..2000).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
            let took = t.elapsed();
            std::thread::sleep(Duration::from_millis(500));
            let open = conns
                .iter()
                .filter(|s| {
                    s.set_nonblocking(true).unwrap();
                    matches!((&**s).read(&mut [0u8; 8]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                })
                .count();
            (took, open)
        })
        .await
        .unwrap();
        assert!(took < Duration::from_secs(5), "2,000 connections took {took:?} to open: the accept queue overflowed");
        assert_eq!(open, 2000, "connections closed before their header timeout");
    }
}
