//! TLS to PostgreSQL on a real cluster that takes only TLS connections (`hostssl`), with a
//! private CA made by the test: each `sslmode` does what libpq's does, and a refused
//! certificate is a definite error, never retried as a network failure.
#![allow(clippy::unwrap_used)]

use synapse_localpg::certs::TestCa;
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_postgres::{is_transient, tls::is_tls_refusal, PgConfig};

const HOSTSSL_ONLY: &str = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n";

#[tokio::test]
async fn each_sslmode_connects_or_refuses_as_libpq() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("synapse test CA").unwrap();
    let other = TestCa::new("some other CA").unwrap();
    let (ca_pem, other_pem) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&other_pem, other.pem()).unwrap();
    let server = ca.issue("localhost", &["localhost"]).unwrap();
    let cluster =
        LocalCluster::start(ClusterOptions { tls: Some(server), hba: Some(HOSTSSL_ONLY.into()), ..Default::default() })
            .unwrap();
    let port = cluster.port();
    let url = |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/postgres?{query}");
    let connect = |text: String| async move {
        let config: PgConfig = text.parse().unwrap();
        synapse_postgres::connect(&config, "tls test").await
    };
    let encrypted = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    // verify-full: the chain leads to our CA and the certificate names the host.
    let full = format!("sslmode=verify-full&sslrootcert={}", ca_pem.display());
    let c = connect(url("localhost", &full)).await.unwrap();
    assert!(c.query_one(encrypted, &[]).await.unwrap().get::<_, bool>(0));
    // …but not 127.0.0.1, which the certificate does not name: refused, for good.
    let e = connect(url("127.0.0.1", &full)).await.unwrap_err();
    assert!(is_tls_refusal(&e) && !is_transient(&e), "{e:?}");
    assert!(format!("{e:?}").contains("NotValidForName"), "{e:?}");
    // verify-ca checks the chain only.
    let ca_only = format!("sslmode=verify-ca&sslrootcert={}", ca_pem.display());
    let c = connect(url("127.0.0.1", &ca_only)).await.unwrap();
    assert!(c.query_one(encrypted, &[]).await.unwrap().get::<_, bool>(0));
    // A certificate from a CA we do not trust: refused by verify-ca, and by require with a
    // root file (libpq checks the chain then too).
    for mode in ["verify-ca", "verify-full", "require"] {
        let e = connect(url("localhost", &format!("sslmode={mode}&sslrootcert={}", other_pem.display())))
            .await
            .unwrap_err();
        assert!(is_tls_refusal(&e) && !is_transient(&e), "{mode}: {e:?}");
        assert!(format!("{e:?}").contains("UnknownIssuer"), "{mode}: {e:?}");
    }
    // require and prefer (the default) encrypt without checking the certificate.
    for query in ["sslmode=require", "sslmode=prefer", ""] {
        let c = connect(url("127.0.0.1", query)).await.unwrap();
        assert!(c.query_one(encrypted, &[]).await.unwrap().get::<_, bool>(0), "{query}");
    }
    // disable: the server accepts no connection without TLS (a definite error, 28000).
    let e = connect(url("127.0.0.1", "sslmode=disable")).await.unwrap_err();
    assert!(!is_transient(&e), "{e:?}");
    assert!(e.to_string().contains("no encryption") || format!("{e:?}").contains("28000"), "{e:?}");
    // key=value form, too.
    let kv = format!(
        "host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        ca_pem.display()
    );
    connect(kv).await.unwrap();
}

/// A server without TLS: `require` and stricter modes refuse it; `prefer` goes on in clear.
#[tokio::test]
async fn a_server_without_tls_is_refused_where_tls_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, TestCa::new("synapse test CA").unwrap().pem()).unwrap();
    let cluster = LocalCluster::start(ClusterOptions::default()).unwrap();
    let url = |mode: &str| format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}", cluster.port());
    for mode in ["require", "verify-ca", "verify-full"] {
        let config: PgConfig = format!("{}&sslrootcert={}", url(mode), ca_pem.display()).parse().unwrap();
        let e = synapse_postgres::connect(&config, "tls test").await.unwrap_err();
        assert!(is_tls_refusal(&e) && !is_transient(&e), "{mode}: {e:?}");
    }
    let config: PgConfig = url("prefer").parse().unwrap();
    synapse_postgres::connect(&config, "tls test").await.unwrap();
}
