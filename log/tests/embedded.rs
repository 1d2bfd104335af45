//! The log contract (`common::contract`) on the embedded log, the same suite the Kafka log
//! passes: one definition of what a `ChangeLog` promises.
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

mod common;

use synapse_log::EmbeddedLog;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_contract_holds_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n1.redb");
    common::contract(|| async { EmbeddedLog::open(&path, Default::default()).unwrap() }, false).await;
}
