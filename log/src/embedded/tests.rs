use super::*;
use synapse_error::Classify;
use synapse_schemas::{Begin, Commit, Datum, Op, ReplicaIdentity, RowChange};

fn txn(lsn: u64, rows: u32) -> Vec<LogRecord> {
    let mut v = vec![LogRecord::Begin(Begin { commit_lsn: Lsn(lsn), xid: 1, commit_time_us: 0, origin: None })];
    for i in 1..=rows {
        v.push(LogRecord::Change(RowChange {
            index: i,
            relation: RelationKey { oid: 1, version: 2 },
            op: Op::Insert,
            before: None,
            after: Some(vec![Datum::Text(i.to_string()), Datum::Null, Datum::UnchangedToast].into()),
        }));
    }
    v.push(LogRecord::Commit(Commit {
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 8),
        commit_time_us: 0,
        event_count: rows,
    }));
    v
}

#[tokio::test]
async fn append_read_reopen_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.redb");
    let log = EmbeddedLog::open(&path, Default::default()).unwrap();
    assert_eq!(log.recover_writer().await.unwrap(), WriterState::default());
    let t1 = txn(100, 3);
    assert_eq!(log.append(t1.clone()).await.unwrap(), 4);
    // Half of a second transaction, then the writer "crashes".
    let t2 = txn(200, 3);
    log.append(t2[..2].to_vec()).await.unwrap();
    drop(log);

    let log = EmbeddedLog::open(&path, Default::default()).unwrap();
    let st = log.recover_writer().await.unwrap();
    assert_eq!(st, WriterState { last_commit_end: Some(Lsn(108)), next_offset: 8, source: None });
    let all = log.read(0, 100).await.unwrap();
    assert_eq!(all.len(), 8);
    assert_eq!(all[..5].iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(), t1);
    assert_eq!(all[7].1, LogRecord::Discarded { commit_lsn: Lsn(200) });
    // Recovery is idempotent: nothing is open any more.
    assert_eq!(log.recover_writer().await.unwrap().next_offset, 8);
}

#[tokio::test]
async fn relations_registry_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    let rel = Relation {
        oid: 5,
        schema: "public".into(),
        table: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![],
    };
    let mark = synapse_schemas::ResyncMark { after: Lsn(0), source_wal: None, found_at_us: 0, reason: "x".into() };
    log.append(vec![LogRecord::Relation(rel.clone()), LogRecord::Resync(mark.clone())]).await.unwrap();
    log.append(txn(300, 10)).await.unwrap();
    assert_eq!(log.relation(rel.key()).await.unwrap(), Some(rel.clone()));
    assert_eq!(log.previous_relation(5, 0).await.unwrap(), None);
    assert_eq!(log.previous_relation(5, 1).await.unwrap(), Some(rel.key()));
    assert_eq!(log.apply_retention(None).await.unwrap(), 0, "no consumer registered: keep all");
    log.commit_consumer("apply", 6).await.unwrap();
    log.commit_consumer("webhooks", 4).await.unwrap();
    // Retention drops whole chunks: the relation's and the mark's chunk (offsets 0-1) is
    // below every consumer, the transaction's chunk (offsets 2-13) is not.
    assert_eq!(log.apply_retention(None).await.unwrap(), 2);
    assert_eq!(log.read(0, 1).await.unwrap()[0].0, 2);
    assert_eq!(log.read(5, 1).await.unwrap()[0].0, 5);
    assert_eq!(log.resync_marks().await.unwrap(), vec![(1, mark)], "a mark outlives its record");
    log.commit_consumer("webhooks", 14).await.unwrap();
    log.commit_consumer("apply", 14).await.unwrap();
    log.append(txn(400, 1)).await.unwrap();
    assert_eq!(log.apply_retention(None).await.unwrap(), 12);
    assert_eq!(log.consumer_position("apply").await.unwrap(), Some(14));
}

#[tokio::test]
async fn seek_by_cursor_and_time_and_exact_gone_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    let at = |lsn: u64, index: u32| Cursor { commit_lsn: Lsn(lsn), index };
    assert_eq!(log.head_cursor().await.unwrap(), None);
    assert_eq!(log.seek(at(0, 0)).await.unwrap(), Seek::At(0));
    // Three 5000-row transactions (5002 records each): chunks of 4096 cut through them.
    for (i, lsn) in [100u64, 200, 300].into_iter().enumerate() {
        let mut t = txn(lsn, 5000);
        for r in &mut t {
            match r {
                LogRecord::Begin(b) => b.commit_time_us = 1000 * (i as i64 + 1),
                LogRecord::Commit(c) => c.commit_time_us = 1000 * (i as i64 + 1),
                _ => {}
            }
        }
        log.append(t).await.unwrap();
    }
    // A transaction in progress (Begin written, Commit not yet).
    log.append(txn(400, 3)[..2].to_vec()).await.unwrap();
    assert_eq!(log.head_cursor().await.unwrap(), Some(at(300, 5001)));
    assert_eq!(log.seek(at(100, 17)).await.unwrap(), Seek::At(0), "inside: from its Begin");
    assert_eq!(log.seek(at(100, 5000)).await.unwrap(), Seek::At(5002), "after its last event: next txn");
    assert_eq!(log.seek(at(150, 0)).await.unwrap(), Seek::At(5002), "between transactions");
    assert_eq!(log.seek(at(400, 0)).await.unwrap(), Seek::At(15006), "open transaction");
    assert_eq!(log.seek(at(500, 0)).await.unwrap(), Seek::At(15008), "beyond: the head");
    assert_eq!(log.cursor_at_time(1500).await.unwrap(), Some(at(200, 0)));
    assert_eq!(log.cursor_at_time(9000).await.unwrap(), None);

    // Consumers passed the first transaction and part of the second: each append starts a
    // chunk, so chunks [0, 4096), [4096, 5002), [5002, 9098) go: txn 100 completely, 200 partly.
    log.commit_consumer("apply", 9100).await.unwrap();
    assert_eq!(log.apply_retention(None).await.unwrap(), 9098);
    let gone = Seek::Gone { oldest: Some(Lsn(300)) };
    assert_eq!(log.seek(at(100, 3)).await.unwrap(), gone, "rest of txn 100 deleted");
    assert_eq!(log.seek(at(50, 0)).await.unwrap(), gone);
    assert_eq!(log.seek(at(150, 0)).await.unwrap(), gone, "txn 200 lost its beginning");
    assert_eq!(log.seek(at(100, 5000)).await.unwrap(), gone, "txn 200 lost its beginning");
    assert_eq!(log.seek(at(200, 4000)).await.unwrap(), gone);
    assert_eq!(log.seek(at(200, 5000)).await.unwrap(), Seek::At(10004), "done with txn 200");
    assert_eq!(log.seek(at(300, 1)).await.unwrap(), Seek::At(10004));
    assert_eq!(log.head_cursor().await.unwrap(), Some(at(300, 5001)));
    log.remove_consumer("apply").await.unwrap();
    assert_eq!(log.consumer_position("apply").await.unwrap(), None);
}

#[tokio::test]
async fn time_window_keeps_recent_transactions_for_stream_readers() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    for (lsn, time) in [(100u64, 1_000i64), (200, 2_000), (300, 3_000)] {
        let mut t = txn(lsn, 3);
        for r in &mut t {
            match r {
                LogRecord::Begin(b) => b.commit_time_us = time,
                LogRecord::Commit(c) => c.commit_time_us = time,
                _ => {}
            }
        }
        log.append(t).await.unwrap();
    }
    // No consumer: the window alone decides. Transactions 100 and 200 are older than 2,500.
    assert_eq!(log.apply_retention(Some(2_500)).await.unwrap(), 10);
    assert_eq!(log.read(0, 1).await.unwrap()[0].0, 10);
    // A consumer behind the window holds more back; one ahead of it does not shorten it.
    log.commit_consumer("webhook:x", 10).await.unwrap();
    log.append(txn(400, 3)).await.unwrap();
    assert_eq!(log.apply_retention(Some(i64::MAX)).await.unwrap(), 0);
    log.commit_consumer("webhook:x", 20).await.unwrap();
    assert_eq!(log.apply_retention(Some(0)).await.unwrap(), 0, "everything is inside the window");
}

#[tokio::test]
async fn corrupt_record_is_reported_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    log.append(txn(1, 1)).await.unwrap();
    {
        let guard = log.inner.db.read().unwrap();
        let tx = guard.as_ref().unwrap().begin_write().unwrap();
        let mut chunk = 3u32.to_le_bytes().to_vec();
        chunk.extend([0xffu8, 0xff, 0xff]);
        tx.open_table(RECORDS).unwrap().insert(0, chunk.as_slice()).unwrap();
        tx.commit().unwrap();
    }
    let err = log.read(0, 10).await.unwrap_err();
    assert!(matches!(err, LogError::Corrupt { offset: 0, .. }), "{err}");
    assert_eq!(err.code(), "LOG002");
}

#[tokio::test]
async fn readers_wake_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    let reader = log.clone();
    let waiter = tokio::spawn(async move { reader.wait_readable(0, Duration::from_secs(30)).await });
    log.append(txn(1, 1)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
}

/// A batch is readable early (`read_early`) from before its write, not by `read`; consumer
/// positions never pass the durable records; a failed write drops everything staged and
/// readable early and tells readers of the old epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_reads_see_a_batch_before_its_fsync_and_learn_of_a_failed_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.redb");
    let log = EmbeddedLog::open(&path, Default::default()).unwrap();
    assert!(log.reads_early());
    log.append(txn(100, 3)).await.unwrap();
    let durable = log.read(0, 100).await.unwrap();
    assert_eq!(log.read_early(0, 100, 0).await.unwrap(), durable, "the tail holds what the file holds");
    assert_eq!(log.read_early(2, 2, 0).await.unwrap(), durable[2..4].to_vec());

    // A batch being written: published, its store transaction not yet committed.
    let rel = Relation {
        oid: 9,
        schema: "public".into(),
        table: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![],
    };
    let mut pending = txn(200, 2);
    pending.insert(1, LogRecord::Relation(rel.clone()));
    assert_eq!(log.inner.stage(pending.clone()).unwrap(), 10);
    assert_eq!((log.next_offset(), log.early_head()), (5, 10));
    assert!(log.read(5, 10).await.unwrap().is_empty(), "not durable: not for read");
    let early = log.read_early(5, 10, 0).await.unwrap();
    assert_eq!(early.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![5, 6, 7, 8, 9]);
    assert_eq!(early.into_iter().map(|(_, r)| r).collect::<Vec<_>>(), pending);
    assert_eq!(log.relation(rel.key()).await.unwrap(), Some(rel), "registered by the batch being written");
    log.commit_consumer("apply", 10).await.unwrap();
    assert_eq!(log.consumer_position("apply").await.unwrap(), Some(5), "clamped to the durable records");

    // The store fails (here: its file replaced by a directory, so reopening it fails).
    *log.inner.db.write().unwrap() = None;
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let err = log.append(txn(300, 1)).await.unwrap_err();
    assert!(matches!(err, LogError::Storage { .. }), "{err}");
    assert_eq!(log.early_head(), 5, "nothing past the durable records is readable early");
    let err = log.read_early(5, 10, 0).await.unwrap_err();
    assert!(matches!(err, LogError::Rewound { offset: 5 }), "{err}");
    assert_eq!(err.code(), "LOG012");
    assert!(err.is_transient());
    assert!(log.read_early(0, 10, log.early_epoch()).await.unwrap().len() == 5, "durable records stay readable");
}

/// Batches staged while a write runs are readable early at once, and the next write takes
/// them all (one fsync); each stage's future resolves once its records are durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_are_readable_at_once_and_written_together() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    let first = log.stage(txn(100, 2));
    let second = log.stage(txn(200, 3));
    assert_eq!((log.next_offset(), log.early_head()), (0, 9));
    assert_eq!(log.read_early(0, 100, 0).await.unwrap().len(), 9);
    // The second's future writes both; the first's then finds its records durable.
    assert_eq!(second.await.unwrap(), 8);
    assert_eq!(log.next_offset(), 9);
    assert_eq!(first.await.unwrap(), 3);
    let read = log.read(0, 100).await.unwrap();
    assert_eq!(read.into_iter().map(|(_, r)| r).collect::<Vec<_>>(), [txn(100, 2), txn(200, 3)].concat());
    assert_eq!(log.seek(Cursor { commit_lsn: Lsn(200), index: 0 }).await.unwrap(), Seek::At(4));
}

/// A write fails (a full disk) while the writer keeps staging: whatever it stages before it
/// learns of the failure follows records that are gone, so the log refuses it until the writer
/// recovers. (Staged at the durable head, it was written ahead of the records capture decoded
/// again on resuming, and appliers skipped those as already applied: rows lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_staged_after_a_failed_write_is_written_before_the_writer_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.redb");
    let aside = dir.path().join("aside.redb");
    let log = EmbeddedLog::open(&path, Default::default()).unwrap();
    log.recover_writer().await.unwrap();
    log.append(txn(100, 1)).await.unwrap();

    // The store fails: its file moved aside and a directory in its place.
    *log.inner.db.write().unwrap() = None;
    std::fs::rename(&path, &aside).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert!(log.append(txn(200, 1)).await.is_err());
    // The writer has not seen the failure yet and stages the transaction after the lost one.
    let err = log.stage(txn(300, 1)).await.unwrap_err();
    assert!(matches!(err, LogError::NotRecovered { offset: 3 }), "{err}");
    assert_eq!(err.code(), "LOG013");
    assert!(err.is_transient());
    assert_eq!(log.early_head(), 3, "nothing refused is readable early");

    // Space again; the writer recovers and resumes after the last durable commit.
    std::fs::remove_dir(&path).unwrap();
    std::fs::rename(&aside, &path).unwrap();
    assert_eq!(log.recover_writer().await.unwrap().last_commit_end, Some(Lsn(108)));
    log.append(txn(200, 1)).await.unwrap();
    log.append(txn(300, 1)).await.unwrap();
    let read = log.read(0, 100).await.unwrap();
    assert_eq!(read.into_iter().map(|(_, r)| r).collect::<Vec<_>>(), [txn(100, 1), txn(200, 1), txn(300, 1)].concat());
}

/// A commit can reach the disk and still report an I/O error: the store's head is then past the
/// one the log knows. Records are never written at other offsets than readers were given, and
/// the recovered writer goes on after the store's head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_recovers_from_the_store_head_not_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    log.append(txn(100, 1)).await.unwrap();
    // As if the last commit had written two records more and then reported a failure.
    log.inner
        .with_db(|_, db| {
            let tx = db.begin_write().map_err(write_err)?;
            tx.open_table(META).map_err(write_err)?.insert(NEXT_OFFSET, 5).map_err(write_err)?;
            tx.commit().map_err(write_err)?;
            Ok(())
        })
        .unwrap();
    let err = log.append(txn(200, 1)).await.unwrap_err();
    assert!(matches!(err, LogError::Storage { .. }), "{err}");
    assert!(format!("{:?}", err).contains("staged at offset 3 but the store's next offset is 5"), "{err:?}");
    assert_eq!(log.recover_writer().await.unwrap().next_offset, 5);
    assert_eq!((log.next_offset(), log.early_head()), (5, 5));
    assert_eq!(log.append(txn(200, 1)).await.unwrap(), 7);
    assert_eq!(log.read(5, 10).await.unwrap().into_iter().map(|(_, r)| r).collect::<Vec<_>>(), txn(200, 1));
}
