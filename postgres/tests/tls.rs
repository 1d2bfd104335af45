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

/// SQL connections never send a password in clear, nor as MD5, without TLS — unless
/// `require_auth` names that method. The guard refuses the server's request before
/// tokio-postgres answers it; SCRAM (which reveals nothing) goes through; `prefer` against a
/// server without TLS is guarded the same way.
#[tokio::test]
async fn a_password_is_never_sent_in_clear_on_sql_connections() {
    const HBA: &str = "local all all trust
host all clear 127.0.0.1/32 password
host all hashed 127.0.0.1/32 md5
host all scram 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
";
    let cluster = LocalCluster::start(ClusterOptions { hba: Some(HBA.into()), ..Default::default() }).unwrap();
    cluster
        .psql(
            "postgres",
            "CREATE ROLE clear LOGIN PASSWORD 'pw-9'; CREATE ROLE scram LOGIN PASSWORD 'pw-9';
             SET password_encryption = 'md5'; CREATE ROLE hashed LOGIN PASSWORD 'pw-9';",
        )
        .unwrap();
    let port = cluster.port();
    let connect = |user: &str, query: &str| {
        let url = format!("postgres://{user}:pw-9@127.0.0.1:{port}/postgres?{query}");
        async move { synapse_postgres::connect(&url.parse().unwrap(), "guard test").await }
    };
    for (user, query, method) in [
        ("clear", "sslmode=disable", "in clear"),
        ("clear", "sslmode=prefer", "in clear"),
        ("hashed", "", "as an MD5 hash"),
    ] {
        let e = connect(user, query).await.err().unwrap();
        assert!(synapse_postgres::guard::is_refusal(&e), "{user} {query}: {e:?}");
        assert!(!is_transient(&e), "a setting to change, not a fault to retry");
        let mut text = e.to_string();
        let mut next = std::error::Error::source(&e);
        while let Some(cause) = next {
            text = format!("{text}: {cause}");
            next = cause.source();
        }
        assert!(text.contains(method) && text.contains("require_auth="), "{text}");
    }
    // The risk accepted by name; SCRAM without TLS (it reveals nothing).
    let c = connect("clear", "sslmode=disable&require_auth=password").await.unwrap();
    assert_eq!(c.query_one("SELECT current_user::text", &[]).await.unwrap().get::<_, String>(0), "clear");
    let c = connect("hashed", "require_auth=md5").await.unwrap();
    c.query_one("SELECT 1", &[]).await.unwrap();
    let c = connect("scram", "sslmode=disable").await.unwrap();
    c.query_one("SELECT 1", &[]).await.unwrap();
    // Nothing listening: an ordinary, transient connection error.
    let dead = synapse_localpg::free_port().unwrap();
    let url = format!("postgres://clear:pw-9@127.0.0.1:{dead}/postgres?sslmode=disable");
    let e = synapse_postgres::connect(&url.parse().unwrap(), "guard test").await.err().unwrap();
    assert!(is_transient(&e) && !synapse_postgres::guard::is_refusal(&e), "{e:?}");
}
