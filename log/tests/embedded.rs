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

/// A process killed while creating a new log leaves at most `<file>.new` (half written): the
/// next start replaces it and opens a working log; the log file itself is only ever a whole
/// store (it is renamed into place once committed and synced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_creating_the_log_leaves_nothing_that_blocks_the_next_start() {
    use synapse_log::ChangeLog;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n1.redb");
    std::fs::write(dir.path().join("n1.redb.new"), b"redb\x1a\x0a\xa9\x0d\x0a half a header").unwrap();
    let log = EmbeddedLog::open(&path, Default::default()).unwrap();
    log.append(common::txn(100, 2, 1_000)).await.unwrap();
    assert_eq!(log.next_offset(), 4);
    drop(log);
    assert!(!dir.path().join("n1.redb.new").exists(), "the half-written file is gone");
    let log = EmbeddedLog::open(&path, Default::default()).unwrap();
    assert_eq!(log.next_offset(), 4, "reopened with what was appended");
}
