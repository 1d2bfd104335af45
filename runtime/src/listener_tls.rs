//! TLS on synapse's own listeners: a certificate chain and key from PEM files, re-read when
//! either file changes, so a renewed certificate (cert-manager, certbot) is served without a
//! restart. A renewal that cannot be read keeps the current certificate and says why.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// How often the files are checked for a change.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The files of one listener's certificate.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, PEM: the server's certificate first, then intermediates.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Serves the certificate last read from [`TlsFiles`].
#[derive(Debug)]
pub struct Reloading {
    files: TlsFiles,
    /// `name` for logs and metrics (`api`, `ops`).
    name: &'static str,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

fn modified(files: &TlsFiles) -> Option<SystemTime> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    m(&files.cert).max(m(&files.key))
}

/// Reads and checks the pair; the error names the file and what is wrong with it.
fn load(files: &TlsFiles, field: &str) -> Result<CertifiedKey, String> {
    let shown = |p: &Path| p.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("{field}.cert: cannot read {}: {e}", shown(&files.cert)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{field}.cert: {} is not PEM certificates: {e}", shown(&files.cert)))?;
    if chain.is_empty() {
        return Err(format!("{field}.cert: {} holds no certificate", shown(&files.cert)));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{field}.key: cannot read a private key from {}: {e}", shown(&files.key)))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        format!("{field}: the key in {} does not fit the certificate in {}: {e}", shown(&files.key), shown(&files.cert))
    })?;
    Ok(certified)
}

impl Reloading {
    /// Reads the files now (an error is a configuration error at start-up).
    pub fn new(name: &'static str, files: TlsFiles) -> Result<Arc<Reloading>, String> {
        let stamp = modified(&files);
        let key = load(&files, &format!("{name}.tls"))?;
        Ok(Arc::new(Reloading { files, name, current: RwLock::new((Arc::new(key), stamp)) }))
    }

    /// Re-reads the files if they changed since the last read; returns whether a new
    /// certificate is now served.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = modified(&self.files);
        let seen = self.current.read().map(|c| c.1).unwrap_or(None);
        if stamp == seen {
            return false;
        }
        match load(&self.files, &format!("{}.tls", self.name)) {
            Ok(key) => {
                if let Ok(mut c) = self.current.write() {
                    *c = (Arc::new(key), stamp);
                }
                tracing::info!(listener = self.name, cert = %self.files.cert.display(), "serving the renewed TLS certificate");
                metrics::counter!("synapse_tls_reloads_total", "listener" => self.name, "outcome" => "ok").increment(1);
                true
            }
            Err(e) => {
                // A renewal written in two steps may be caught half-way: keep serving the
                // current pair and try again at the next change.
                if let Ok(mut c) = self.current.write() {
                    c.1 = stamp;
                }
                tracing::warn!(listener = self.name, error = %e, "the renewed TLS certificate cannot be used; still serving the previous one");
                metrics::counter!("synapse_tls_reloads_total", "listener" => self.name, "outcome" => "failed")
                    .increment(1);
                false
            }
        }
    }

    /// The server configuration for a TLS acceptor (HTTP/1.1 only, as the listeners serve).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{}.tls: {e}", self.name))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Checks the files every few seconds until the process ends.
    pub fn watch(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            loop {
                tick.tick().await;
                self.reload_if_changed();
            }
        });
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

/// TLS for listener `name` from `files`, kept current by a watch task; the error names the
/// field and the file.
pub fn serve_with(name: &'static str, files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    let reloading = Reloading::new(name, files.clone())?;
    let config = reloading.server_config()?;
    reloading.watch();
    Ok(config)
}
