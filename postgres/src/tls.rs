//! TLS to PostgreSQL with libpq's `sslmode` semantics, on rustls (ring), for both the SQL
//! connections ([`crate::connect`]) and the replication transport.
//!
//! | sslmode | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (default) | when the server offers TLS | no (chain only if `sslrootcert` is given) |
//! | `require` | always | no (chain only if `sslrootcert` is given, as libpq does) |
//! | `verify-ca` | always | chain to a trusted CA |
//! | `verify-full` | always | chain, and the host name (or IP) in the certificate |
//!
//! Trusted CAs: the PEM file `sslrootcert`, or the system's store with `sslrootcert=system`
//! (also what `verify-*` uses when no file is given). `sslcert` + `sslkey`: a client certificate.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// Treated as `prefer` (libpq tries without TLS first; the difference only matters to
    /// servers that accept both).
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// Whether a server without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(self, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl std::str::FromStr for SslMode {
    type Err = ();
    fn from_str(s: &str) -> Result<SslMode, ()> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(()),
        })
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// A file path for an error message: as given, unless it looks like a misplaced `key=value`
/// (in a malformed connection string that may be part of a password).
fn shown(path: &str) -> String {
    if path.contains('=') {
        "(the file named in the URL)".into()
    } else {
        path.to_owned()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trusted CAs: `root` (a PEM file, or `system`), else the system's store.
fn roots(root: Option<&str>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match root {
        Some(path) if path != "system" => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("sslrootcert {}: cannot read PEM certificates ({e})", shown(path)))?;
            if certs.is_empty() {
                return Err(format!("sslrootcert {}: no certificate in the file", shown(path)));
            }
            for c in certs {
                store.add(c).map_err(|e| format!("sslrootcert {}: {e}", shown(path)))?;
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // A store may hold certificates webpki cannot parse; the others still count.
                let _ = store.add(c);
            }
            if store.is_empty() {
                return Err(
                    "no trusted CA: the system's certificate store is empty; give sslrootcert=<PEM file>".into()
                );
            }
        }
    }
    Ok(store)
}

/// The rustls client configuration for `mode` (`None` for `disable`).
pub(crate) fn client_config(
    mode: SslMode,
    root: Option<&str>,
    client: Option<(&str, &str)>,
) -> Result<Option<Arc<ClientConfig>>, String> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyFull | SslMode::VerifyCa => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(root)?), provider.clone())
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
        // As libpq: a root certificate file given with `require` (or `prefer`) checks the chain.
        _ if root.is_some() => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(root)?), provider.clone())
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?;
            Arc::new(ChainOnly(webpki))
        }
        _ => Arc::new(Unverified(provider.clone())),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("sslcert {}: cannot read PEM certificates ({e})", shown(cert)))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey {}: cannot read a PEM key ({e})", shown(key)))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| format!("sslcert/sslkey: {e}"))?
        }
    };
    Ok(Some(Arc::new(config)))
}

/// `verify-ca`: the chain must lead to a trusted CA; the name in the certificate is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name: a name error means the chain was good.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without `sslrootcert`: encrypted, the server's certificate taken as it is
/// (libpq's behaviour; `verify-full` is what stops a man in the middle). The handshake's
/// signatures are still checked, so the session is bound to the certificate shown.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The `tls-server-end-point` channel binding (RFC 5929) of a server certificate: its hash with
/// the hash function of its signature (SHA-256 for MD5 and SHA-1), for SCRAM-SHA-256-PLUS.
/// `None` for a signature algorithm without a defined hash (e.g. Ed25519).
pub fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::oid::db::rfc5912 as oid;
    use x509_cert::der::Decode;
    let parsed = x509_cert::Certificate::from_der(cert).ok()?;
    let alg = parsed.signature_algorithm.oid;
    if [
        oid::SHA_256_WITH_RSA_ENCRYPTION,
        oid::ECDSA_WITH_SHA_256,
        oid::SHA_1_WITH_RSA_ENCRYPTION,
        oid::MD_5_WITH_RSA_ENCRYPTION,
    ]
    .contains(&alg)
    {
        Some(sha2::Sha256::digest(cert).to_vec())
    } else if [oid::SHA_384_WITH_RSA_ENCRYPTION, oid::ECDSA_WITH_SHA_384].contains(&alg) {
        Some(sha2::Sha384::digest(cert).to_vec())
    } else if [oid::SHA_512_WITH_RSA_ENCRYPTION, oid::ECDSA_WITH_SHA_512].contains(&alg) {
        Some(sha2::Sha512::digest(cert).to_vec())
    } else {
        None
    }
}

/// What to do about an error [`is_tls_refusal`] recognises.
pub const HINT: &str =
    "check the URL's sslmode and sslrootcert: with verify-ca or verify-full the server's certificate \
     must chain to a CA in sslrootcert (verify-full: and name the host the URL connects to); require and \
     verify-* need a server with ssl = on";

/// Whether `error` (from a connection attempt) is the server's certificate or TLS being
/// refused — a setup problem no retry cures — rather than a network failure.
pub fn is_tls_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) {
                return true;
            }
        }
        if e.to_string().contains("server does not support TLS") {
            return true;
        }
        next = e.source();
    }
    false
}
