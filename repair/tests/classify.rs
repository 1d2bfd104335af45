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

    // A server that is not there at all: refused before any SQLSTATE.
    let port = cluster.port();
    drop(cluster);
    let refused = || {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(synapse_postgres::connect_str(&url, "refused")).unwrap_err()
        })
        .join()
        .unwrap()
    };
    assert_eq!(stages(refused), [true; 3], "a refused connection: capture, apply, repair");
}
