//! The `ChangeLog` contract shared by the tests of both logs (embedded and Kafka).
#![allow(clippy::unwrap_used, dead_code)] // a failed setup step should fail the test loudly

use std::time::Duration;
use synapse_log::{ChangeLog, Offset, Seek, SourceIdentity, WriterState};
use synapse_schemas::{
    Begin, Commit, Cursor, Datum, LogRecord, Lsn, Op, Relation, RelationKey, ReplicaIdentity, ResyncMark, RowChange,
};

pub fn txn(lsn: u64, rows: u32, time_us: i64) -> Vec<LogRecord> {
    let mut v = vec![LogRecord::Begin(Begin { commit_lsn: Lsn(lsn), xid: 1, commit_time_us: time_us, origin: None })];
    for i in 1..=rows {
        v.push(LogRecord::Change(RowChange {
            index: i,
            relation: RelationKey { oid: 5, version: 1 },
            op: Op::Insert,
            before: None,
            after: Some(vec![Datum::Text(i.to_string()), Datum::Null].into()),
        }));
    }
    v.push(LogRecord::Commit(Commit {
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 8),
        commit_time_us: time_us,
        event_count: rows,
    }));
    v
}

/// The `ChangeLog` contract, for any implementation. `open` opens the log (again: after a
/// "crash" the previous handle is dropped first); `shared` says whether a second handle may be
/// open at once (another process reading the same log: Kafka yes, the embedded file no).
/// Every record from `from` to the head. A read may return fewer records than are there (a
/// Kafka read stops when the next message is slow to arrive): callers read on, as these do.
pub async fn read_all<L: ChangeLog>(log: &L, from: Offset) -> Vec<(Offset, LogRecord)> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < log.next_offset() {
        let got = log.read(pos, 100).await.unwrap();
        let Some((last, _)) = got.last() else { break };
        pos = last + 1;
        out.extend(got);
    }
    out
}

pub async fn contract<L, F, Fut>(open: F, shared: bool)
where
    L: ChangeLog + Clone + Send + Sync + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = L>,
{
    let log = open().await;
    assert_eq!(log.recover_writer().await.unwrap(), WriterState::default());
    let source = SourceIdentity { system_id: "7312".into(), timeline: 1, slot: "synapse_a".into(), confirmed: Lsn(90) };
    log.record_source(&source).await.unwrap();
    let rel = Relation {
        oid: 5,
        schema: "public".into(),
        table: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![],
    };
    let r0 = log.append(vec![LogRecord::Relation(rel.clone())]).await.unwrap();
    let t1 = txn(100, 3, 1_000);
    let t1_end = log.append(t1.clone()).await.unwrap();
    assert!(t1_end > r0);
    log.commit_consumer("apply", 3).await.unwrap();
    // Half of a second transaction, then the writer "crashes".
    let t2 = txn(200, 3, 2_000);
    log.append(t2[..2].to_vec()).await.unwrap();
    drop(log);

    let log = open().await;
    assert_eq!(log.relation(rel.key()).await.unwrap(), Some(rel.clone()));
    assert_eq!(log.previous_relation(5, r0 + 1).await.unwrap(), Some(rel.key()));
    assert_eq!(log.previous_relation(5, r0).await.unwrap(), None);
    assert_eq!(log.consumer_position("apply").await.unwrap(), Some(3));
    let st = log.recover_writer().await.unwrap();
    let all = read_all(&log, 0).await;
    assert_eq!(all.len(), 9);
    let offsets: Vec<u64> = all.iter().map(|(o, _)| *o).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "offsets grow: {offsets:?}");
    assert_eq!(offsets[5], t1_end);
    assert_eq!(st, WriterState { last_commit_end: Some(Lsn(108)), next_offset: offsets[8] + 1, source: Some(source) });
    assert_eq!(all[1..6].iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(), t1);
    assert_eq!(all[8].1, LogRecord::Discarded { commit_lsn: Lsn(200) });
    assert_eq!(log.recover_writer().await.unwrap().next_offset, log.next_offset(), "recovery is idempotent");
    // Reads continue from any `last + 1`, also past the last record of a message.
    for (i, o) in offsets.iter().enumerate() {
        let rest: Vec<u64> = read_all(&log, o + 1).await.iter().map(|(o, _)| *o).collect();
        assert_eq!(rest, offsets[i + 1..], "after {o}");
    }

    // The transaction again, complete; then seeks.
    let t2_end = log.append(txn(200, 3, 2_000)).await.unwrap();
    let t2_offsets: Vec<u64> = read_all(&log, offsets[8] + 1).await.iter().map(|(o, _)| *o).collect();
    assert_eq!(t2_offsets.len(), 5);
    let at = |lsn: u64, index: u32| Cursor { commit_lsn: Lsn(lsn), index };
    assert_eq!(log.head_cursor().await.unwrap(), Some(at(200, 4)));
    assert_eq!(log.seek(at(100, 2)).await.unwrap(), Seek::At(offsets[1]), "inside: from its Begin");
    let Seek::At(after_t1) = log.seek(at(100, 3)).await.unwrap() else { panic!("gone") };
    assert_eq!(log.read(after_t1, 1).await.unwrap()[0].0, offsets[6], "after its last event: next record");
    let Seek::At(between) = log.seek(at(150, 0)).await.unwrap() else { panic!("gone") };
    assert_eq!(log.read(between, 1).await.unwrap()[0].0, t2_offsets[0], "between transactions");
    let Seek::At(beyond) = log.seek(at(300, 0)).await.unwrap() else { panic!("gone") };
    assert!(log.read(beyond, 10).await.unwrap().is_empty(), "beyond: the head");
    assert_eq!(log.cursor_at_time(1_500).await.unwrap(), Some(at(200, 0)));
    assert_eq!(log.cursor_at_time(9_000).await.unwrap(), None);
    // A new reader (another process) sees the head and reads from anywhere inside a message.
    for from in t2_offsets.iter().copied().filter(|_| shared) {
        let fresh = open().await;
        assert_eq!(fresh.next_offset(), log.next_offset());
        let got: Vec<u64> = read_all(&fresh, from).await.iter().map(|(o, _)| *o).collect();
        assert_eq!(got, t2_offsets.iter().copied().filter(|o| *o >= from).collect::<Vec<_>>(), "from {from}");
    }
    let names: Vec<String> = log.consumers().await.unwrap().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"apply".to_string()), "{names:?}");
    log.remove_consumer("apply").await.unwrap();
    assert_eq!(log.consumer_position("apply").await.unwrap(), None);
    assert!(log.consumers().await.unwrap().iter().all(|(n, _)| n != "apply"), "removed from the list");

    // A reader waiting at the head wakes when the writer appends.
    let reader = log.clone();
    let started = std::time::Instant::now();
    reader.wait_readable(t2_end + 1, Duration::from_millis(300)).await;
    assert!(started.elapsed() >= Duration::from_millis(250), "nothing after the last record: the wait lasts");
    let waiter = tokio::spawn(async move { reader.wait_readable(t2_end + 1, Duration::from_secs(30)).await });
    log.append(txn(300, 1, 3_000)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    let tail = read_all(&log, t2_end + 1).await;
    assert_eq!(tail.len(), 3);
    // Lag in records (offsets are not dense: counted, not subtracted).
    assert_eq!(log.records_behind(tail[2].0 + 1), 0, "caught up");
    assert_eq!(log.records_behind(tail[0].0), 3);
    assert_eq!(log.records_behind(t2_offsets[0]), 8, "the 5 of the second transaction, then 3");

    // A gap mark between transactions: listed with its offset, also after a reopen, and a
    // reader at the cursor after the transaction before it reads the mark next.
    assert!(log.resync_marks().await.unwrap().is_empty());
    let mark = ResyncMark { after: Lsn(308), source_wal: Some(Lsn(9_000)), found_at_us: 4_000, reason: "slot".into() };
    let at_mark = log.append(vec![LogRecord::Resync(mark.clone())]).await.unwrap();
    log.append(txn(10_000, 1, 5_000)).await.unwrap();
    assert_eq!(log.resync_marks().await.unwrap(), vec![(at_mark, mark.clone())]);
    let Seek::At(next) = log.seek(at(300, 2)).await.unwrap() else { panic!("gone") };
    assert_eq!(log.read(next, 1).await.unwrap(), vec![(at_mark, LogRecord::Resync(mark.clone()))]);
    let Seek::At(past) = log.seek(mark.cursor()).await.unwrap() else { panic!("gone") };
    assert!(
        matches!(log.read(past, 1).await.unwrap()[0].1, LogRecord::Begin(_)),
        "after the mark: the next transaction"
    );
    drop(log);
    let log = open().await;
    let moved =
        SourceIdentity { system_id: "9001".into(), timeline: 2, slot: "synapse_a".into(), confirmed: Lsn(20_000) };
    log.record_source(&moved).await.unwrap();
    assert_eq!(log.recover_writer().await.unwrap().source.as_ref(), Some(&moved));
    assert_eq!(log.resync_marks().await.unwrap(), vec![(at_mark, mark)], "a reopened log knows its marks");
    drop(log);
    assert_eq!(open().await.recover_writer().await.unwrap().source, Some(moved), "the last identity recorded");
}
