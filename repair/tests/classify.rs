//! One answer to "can a retry cure this?" in every stage: real errors from a real PostgreSQL
//! server (raised with each SQLSTATE, and a connection the server closed), wrapped the way
//! capture, apply and repair wrap them, classified alike.
#![allow(clippy::unwrap_used)]

use synapse_apply::ApplyError;
use synapse_capture::CaptureError;
use synapse_error::Classify;
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_repair::RepairError;

/// Each stage's classification of `error`, in the order capture, apply, repair.
fn stages(mut error: impl FnMut() -> tokio_postgres::Error) -> [bool; 3] {
    [
        CaptureError::Sql { context: "test".into(), source: error() }.is_transient(),
        ApplyError::Target { context: "test".into(), source: error() }.is_transient(),
        RepairError::Node { node: "n".into(), context: "test".into(), source: error() }.is_transient(),
    ]
}

#[tokio::test]
async fn capture_apply_and_repair_classify_server_errors_alike() {
    let cluster = LocalCluster::start(ClusterOptions::default()).unwrap();
    let url = cluster.url("postgres");
    let client = synapse_postgres::connect_str(&url, "classify").await.unwrap();
    // (SQLSTATE, what it is, transient?)
    let cases = [
        ("53300", "too many clients", true),
        ("57P03", "the database system is starting up", true),
        ("57P01", "terminating connection due to administrator command", true),
        ("40001", "serialization failure", true),
        ("40P01", "deadlock detected", true),
        ("55P03", "lock not available", true),
        ("42501", "permission denied", false),
        ("42P01", "undefined table", false),
        ("23505", "unique violation", false),
        ("22003", "numeric value out of range", false),
    ];
    for (code, what, transient) in cases {
        let raise = format!("DO $$ BEGIN RAISE EXCEPTION '{what}' USING ERRCODE = '{code}'; END $$");
        let error = client.batch_execute(&raise).await.unwrap_err();
        assert_eq!(error.code().map(|c| c.code()), Some(code), "the server raised another state");
        assert_eq!(synapse_postgres::is_transient(&error), transient, "{code} ({what})");
        // tokio_postgres::Error is not Clone: raise it once per stage.
        let mut again = Vec::new();
        for _ in 0..3 {
            again.push(client.batch_execute(&raise).await.unwrap_err());
        }
        let answers = stages(|| again.pop().unwrap());
        assert_eq!(answers, [transient; 3], "{code} ({what}): capture, apply, repair");
    }

    // Connection loss: the server ends the session (as a failover or restart does).
    let mut lost = Vec::new();
    for _ in 0..4 {
        let victim = synapse_postgres::connect_str(&url, "victim").await.unwrap();
        let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
        // The first statement after the kill may see the server's FATAL 57P01 or a closed socket.
        let error = loop {
            match victim.batch_execute("SELECT 1").await {
                Err(e) => break e,
                Ok(()) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        lost.push(error);
    }
    assert!(synapse_postgres::is_transient(&lost.pop().unwrap()), "a lost connection is transient");
    assert_eq!(stages(|| lost.pop().unwrap()), [true; 3], "a lost connection: capture, apply, repair");

    // A lock held by someone else: synapse's sessions wait at most lock_timeout (30 s unless the
    // URL sets one), then fail with 55P03, which every stage retries.
    let shown: String = client.query_one("SHOW lock_timeout", &[]).await.unwrap().get(0);
    assert_eq!(shown, "30s");
    client.batch_execute("CREATE TABLE held (id int)").await.unwrap();
    let holder = synapse_postgres::connect_str(&url, "holder").await.unwrap();
    holder.batch_execute("BEGIN; LOCK TABLE held").await.unwrap();
    let short = format!("{url}?options=-c%20lock_timeout%3D150");
    let mut waited = Vec::new();
    for _ in 0..4 {
        let waiter = synapse_postgres::connect_str(&short, "waiter").await.unwrap();
        let started = std::time::Instant::now();
        waited.push(waiter.batch_execute("SELECT * FROM held").await.unwrap_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "the lock wait was not bounded");
    }
    assert_eq!(waited[0].code().map(|c| c.code()), Some("55P03"));
    assert!(synapse_postgres::is_transient(&waited.pop().unwrap()));
    assert_eq!(stages(|| waited.pop().unwrap()), [true; 3], "a lock timeout: capture, apply, repair");
    holder.batch_execute("ROLLBACK").await.unwrap();

    // A server that is not there at all: refused before any SQLSTATE.
    let port = cluster.port();
    drop(cluster);
    let refused = || {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(synapse_postgres::connect(&url.parse().unwrap(), "refused")).unwrap_err()
        })
        .join()
        .unwrap()
    };
    assert_eq!(stages(refused), [true; 3], "a refused connection: capture, apply, repair");
}
