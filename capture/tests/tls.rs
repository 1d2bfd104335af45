//! The replication connection's safety: over TLS on a real cluster with a private CA, SCRAM with
//! channel binding over a verified connection; a password never sent in clear unless the URL
//! allows it; a certificate from an untrusted CA refused for good; a hostile peer's oversized
//! frame refused without trusting its length.
#![allow(clippy::unwrap_used)]

use synapse_capture::transport::ReplicationConnection;
use synapse_capture::CaptureError;
use synapse_error::Classify;
use synapse_localpg::certs::TestCa;
use synapse_localpg::{ClusterOptions, LocalCluster};

/// `rep` logs in with SCRAM over TLS, or with a clear-text password without it (a server
/// set up carelessly); everyone else is trusted over TLS (the test's own psql).
const HBA: &str = "local all all trust
hostssl all rep 127.0.0.1/32 scram-sha-256
host all rep 127.0.0.1/32 password
hostssl all all 127.0.0.1/32 trust
";

#[tokio::test]
async fn replication_over_tls_binds_scram_to_the_channel_and_never_leaks_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("synapse test CA").unwrap();
    let (ca_pem, other_pem) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&other_pem, TestCa::new("another CA").unwrap().pem()).unwrap();
    let server = ca.issue("localhost", &["localhost"]).unwrap();
    let pg =
        LocalCluster::start(ClusterOptions { tls: Some(server), hba: Some(HBA.into()), ..Default::default() }).unwrap();
    pg.psql("postgres", "CREATE ROLE rep LOGIN REPLICATION PASSWORD 'pw-never-in-clear'").unwrap();
    let port = pg.port();
    let connect = |host: &str, query: String| {
        let url = format!("postgres://rep:pw-never-in-clear@{host}:{port}/postgres?{query}");
        async move { ReplicationConnection::connect(&url.parse().unwrap(), "tls test").await }
    };

    // Verified TLS, SCRAM-SHA-256-PLUS: the server checks our channel binding.
    let mut c = connect("localhost", format!("sslmode=verify-full&sslrootcert={}", ca_pem.display())).await.unwrap();
    c.identify_system().await.unwrap();

    // No TLS: the server asks for the password in clear, and does not get it.
    let e = connect("127.0.0.1", "sslmode=disable".into()).await.err().unwrap();
    assert!(matches!(e, CaptureError::AuthRefused { method: "password", tls: false }), "{e:?}");
    assert_eq!(e.code(), "CAP014");
    assert!(!e.is_transient());
    // Unless the URL accepts that risk by name.
    let mut c = connect("127.0.0.1", "sslmode=disable&require_auth=password".into()).await.unwrap();
    c.identify_system().await.unwrap();
    // require_auth holds over TLS too: SCRAM is not what it allows.
    let e = connect("localhost", format!("sslmode=verify-full&sslrootcert={}&require_auth=md5", ca_pem.display()))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, CaptureError::AuthRefused { method: "scram-sha-256", tls: true }), "{e:?}");

    // A certificate from a CA we do not trust, or for another name: refused, for good.
    for (host, root) in [("localhost", &other_pem), ("127.0.0.1", &ca_pem)] {
        let e = connect(host, format!("sslmode=verify-full&sslrootcert={}", root.display())).await.err().unwrap();
        assert!(matches!(e, CaptureError::Tls { .. }) && !e.is_transient(), "{host}: {e:?}");
        assert_eq!(e.code(), "CAP013");
    }
}

/// A peer announcing a 2 GiB message is refused at once (a definite protocol error), not
/// trusted with an allocation and a wait.
#[tokio::test]
async fn an_oversized_frame_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut startup = [0u8; 512];
        let _ = s.read(&mut startup).await;
        // An authentication request claiming 0x7ffffff0 bytes, then silence.
        s.write_all(&[b'R', 0x7f, 0xff, 0xff, 0xf0, 0, 0, 0, 0]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    });
    let url = format!("postgres://u@127.0.0.1:{port}/db?sslmode=disable");
    let started = std::time::Instant::now();
    let e = ReplicationConnection::connect(&url.parse().unwrap(), "frame test").await.err().unwrap();
    assert!(matches!(&e, CaptureError::Protocol(m) if m.contains("exceeds")), "{e:?}");
    assert!(!e.is_transient() && started.elapsed() < std::time::Duration::from_secs(5));
}
