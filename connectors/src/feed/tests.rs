use super::*;
use synapse_log::EmbeddedLog;
use synapse_schemas::{Column, Commit, Datum, Lsn, ReplicaIdentity};

fn rel() -> Relation {
    let col = |name: &str, oid: u32, key: bool| Column {
        name: name.into(),
        type_oid: oid,
        type_modifier: -1,
        type_name: "x".into(),
        base_type_oid: oid,
        element_type_oid: 0,
        is_key: key,
        type_defs: Vec::new(),
    };
    Relation {
        oid: 7,
        schema: "public".into(),
        table: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![col("id", 20, true), col("status", 25, false)],
    }
}

/// A transaction inserting ids `ids` with status "s<id>".
fn txn(lsn: u64, ids: std::ops::Range<u32>) -> Vec<LogRecord> {
    let r = rel();
    let mut v = vec![
        LogRecord::Begin(Begin { commit_lsn: Lsn(lsn), xid: 1, commit_time_us: lsn as i64, origin: None }),
        LogRecord::Relation(r.clone()),
    ];
    let n = ids.len() as u32;
    for (i, id) in ids.enumerate() {
        v.push(LogRecord::Change(RowChange {
            index: i as u32 + 1,
            relation: r.key(),
            op: Op::Insert,
            before: None,
            after: Some(vec![Datum::Text(id.to_string()), Datum::Text(format!("s{id}"))].into()),
        }));
    }
    v.push(LogRecord::Commit(Commit {
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 1),
        commit_time_us: lsn as i64,
        event_count: n,
    }));
    v
}

async fn all(feed: &mut ChangeFeed<EmbeddedLog>) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        let b = feed.next_batch(1000, Duration::ZERO).await.unwrap();
        if b.events.is_empty() {
            return out;
        }
        out.extend(b.events);
    }
}

fn src() -> SourceInfo {
    SourceInfo { node: "a".into(), database: "app".into() }
}

#[tokio::test]
async fn committed_only_resumable_and_filtered() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap());
    log.append(txn(100, 0..3)).await.unwrap();
    // A transaction the capture abandoned, then the same one complete.
    let t = txn(200, 3..6);
    log.append(t[..3].to_vec()).await.unwrap();
    log.append(vec![LogRecord::Discarded { commit_lsn: Lsn(200) }]).await.unwrap();
    log.append(t).await.unwrap();
    // An open transaction: invisible until its commit.
    let t3 = txn(300, 6..8);
    log.append(t3[..3].to_vec()).await.unwrap();

    let mut feed = ChangeFeed::open(log.clone(), src(), None, Selector::default()).await.unwrap();
    let events = all(&mut feed).await;
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, ["a/0/64/1", "a/0/64/2", "a/0/64/3", "a/0/C8/1", "a/0/C8/2", "a/0/C8/3"]);
    assert_eq!(feed.position().unwrap().to_string(), "0/C8/4");
    log.append(t3[3..].to_vec()).await.unwrap();
    assert_eq!(all(&mut feed).await.len(), 2);

    // Resume after every possible cursor: exactly the rest, nothing twice.
    let every: Vec<Event> =
        all(&mut ChangeFeed::open(log.clone(), src(), None, Selector::default()).await.unwrap()).await;
    for (i, e) in every.iter().enumerate() {
        let mut f = ChangeFeed::open(log.clone(), src(), Some(e.cursor), Selector::default()).await.unwrap();
        let rest: Vec<Cursor> = all(&mut f).await.iter().map(|e| e.cursor).collect();
        let want: Vec<Cursor> = every[i + 1..].iter().map(|e| e.cursor).collect();
        assert_eq!(rest, want, "after {}", e.cursor);
    }

    let sel = Selector { filter: Some("status = 's4' or id >= 7".parse().unwrap()), ..Default::default() };
    let mut f = ChangeFeed::open(log.clone(), src(), None, sel).await.unwrap();
    let got: Vec<String> = all(&mut f).await.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, ["a/0/C8/2", "a/0/12C/2"]);
    let sel = Selector { tables: Some(["public.other".to_string()].into()), ..Default::default() };
    let mut f = ChangeFeed::open(log.clone(), src(), None, sel).await.unwrap();
    let b = f.next_batch(10, Duration::ZERO).await.unwrap();
    assert!(b.events.is_empty());
    assert_eq!(b.position.unwrap().to_string(), "0/12C/3", "filtered traffic moves the position");
}

#[tokio::test]
async fn a_transaction_larger_than_the_buffer_streams_through() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap());
    let n = BUFFER_RECORDS as u32 * 2 + 10;
    let big = txn(100, 0..n);
    log.append(big[..BUFFER_RECORDS * 2].to_vec()).await.unwrap();
    let mut feed = ChangeFeed::open(log.clone(), src(), None, Selector::default()).await.unwrap();
    assert!(all(&mut feed).await.is_empty(), "not committed yet");
    log.append(big[BUFFER_RECORDS * 2..].to_vec()).await.unwrap();
    log.append(txn(200, 0..1)).await.unwrap();
    let events = all(&mut feed).await;
    assert_eq!(events.len() as u32, n + 1);
    assert!(events.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert_eq!(events[0].keys[0], events[0].keys[1]);
    assert_ne!(events[0].keys[0], events[1].keys[0]);
}

#[tokio::test]
async fn a_schema_change_is_reported_to_a_reader_that_resumed_after_the_old_definition() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap());
    log.append(txn(100, 0..2)).await.unwrap();
    // The table gains a column; the next transaction carries the new definition.
    let mut v2 = rel();
    v2.columns.push(Column { name: "extra".into(), ..v2.columns[1].clone() });
    let mut t = txn(200, 5..6);
    t[1] = LogRecord::Relation(v2.clone());
    if let LogRecord::Change(c) = &mut t[2] {
        c.relation = v2.key();
        c.after = Some(vec![Datum::Text("5".into()), Datum::Text("s5".into()), Datum::Null].into());
    }
    log.append(t).await.unwrap();
    let resume = Cursor { commit_lsn: Lsn(100), index: 2 };
    let mut f = ChangeFeed::open(log.clone(), src(), Some(resume), Selector::default()).await.unwrap();
    let events = all(&mut f).await;
    assert_eq!(events.iter().map(|e| e.op).collect::<Vec<_>>(), [Operation::Schema, Operation::Insert]);
    let schema: serde_json::Value = serde_json::from_slice(&events[0].body).unwrap();
    assert_eq!(schema["data"]["columns"].as_array().unwrap().len(), 3);
    // From the very beginning the first definition is not a change; the second is.
    let mut f = ChangeFeed::open(log.clone(), src(), None, Selector::default()).await.unwrap();
    let ops: Vec<Operation> = all(&mut f).await.iter().map(|e| e.op).collect();
    assert_eq!(ops, [Operation::Insert, Operation::Insert, Operation::Schema, Operation::Insert]);
}

#[tokio::test]
async fn a_ddl_statement_is_an_event_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap());
    let mut t = txn(100, 0..2);
    let ddl = synapse_schemas::SchemaChange {
        tag: "ALTER TABLE".into(),
        sql: "UPDATE t SET v = 1; ALTER TABLE t ADD COLUMN w int; ANALYZE t".into(),
        nth: 0,
        search_path: "public".into(),
        tables: vec!["public.t".into()],
        joined: vec![],
        shapes: vec![],
        copy: vec![],
    };
    t.insert(3, LogRecord::Schema(ddl));
    log.append(t).await.unwrap();
    let mut f = ChangeFeed::open(log.clone(), src(), None, Selector::default()).await.unwrap();
    let events = all(&mut f).await;
    assert_eq!(
        events.iter().map(|e| e.op).collect::<Vec<_>>(),
        [Operation::Insert, Operation::Schema, Operation::Insert]
    );
    let body: serde_json::Value = serde_json::from_slice(&events[1].body).unwrap();
    assert_eq!(body["type"], cloudevent::DDL_TYPE);
    assert_eq!(body["data"]["statement"], "ALTER TABLE t ADD COLUMN w int");
    assert!(events[1].barrier);
    // Other tables' readers are not told; a reader resuming after it is not told again.
    let sel = Selector { tables: Some(["public.other".to_string()].into()), ..Default::default() };
    assert!(all(&mut ChangeFeed::open(log.clone(), src(), None, sel).await.unwrap()).await.is_empty());
    let mut f = ChangeFeed::open(log.clone(), src(), Some(events[1].cursor), Selector::default()).await.unwrap();
    assert_eq!(all(&mut f).await.iter().map(|e| e.op).collect::<Vec<_>>(), [Operation::Insert]);
}

#[tokio::test]
async fn a_gap_mark_reaches_every_reader_once_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap());
    log.append(txn(100, 0..2)).await.unwrap();
    let mark = ResyncMark { after: Lsn(101), source_wal: Some(Lsn(900)), found_at_us: 5, reason: "slot".into() };
    log.append(vec![LogRecord::Resync(mark.clone())]).await.unwrap();
    log.append(txn(1_000, 5..6)).await.unwrap();
    // A reader of another table only, of deletes only: told all the same.
    let sel = Selector {
        tables: Some(["public.other".to_string()].into()),
        operations: Some([Operation::Delete].into()),
        filter: None,
    };
    let mut f = ChangeFeed::open(log.clone(), src(), None, sel).await.unwrap();
    let events = all(&mut f).await;
    assert_eq!(events.iter().map(|e| e.op).collect::<Vec<_>>(), [Operation::Resync]);
    assert!(events[0].barrier, "ordered against every other event");
    let body: serde_json::Value = serde_json::from_slice(&events[0].body).unwrap();
    assert_eq!(body["type"], cloudevent::RESYNC_TYPE);
    assert_eq!(body["data"]["snapshot"], "/v1/streams/a/snapshot");
    assert_eq!(f.position(), Some(Cursor { commit_lsn: Lsn(1_000), index: 2 }));
    // Between the transactions for a reader of everything; after it, never again.
    let mut f = ChangeFeed::open(log.clone(), src(), None, Selector::default()).await.unwrap();
    let ops: Vec<Operation> = all(&mut f).await.iter().map(|e| e.op).collect();
    assert_eq!(ops, [Operation::Insert, Operation::Insert, Operation::Resync, Operation::Insert]);
    let mut f = ChangeFeed::open(log.clone(), src(), Some(mark.cursor()), Selector::default()).await.unwrap();
    let ops: Vec<Operation> = all(&mut f).await.iter().map(|e| e.op).collect();
    assert_eq!(ops, [Operation::Insert]);
}

#[tokio::test]
async fn gone_cursor_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap());
    log.append(txn(100, 0..3)).await.unwrap();
    log.append(txn(200, 0..3)).await.unwrap();
    log.append(txn(300, 0..3)).await.unwrap();
    log.commit_consumer("x", 12).await.unwrap();
    assert!(log.apply_retention(None).await.unwrap() > 0);
    let after = Cursor { commit_lsn: Lsn(100), index: 1 };
    match ChangeFeed::open(log.clone(), src(), Some(after), Selector::default()).await {
        Err(ConnectorError::CursorGone { oldest, .. }) => assert_eq!(oldest, Some(Lsn(300))),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Without a cursor: from the oldest retained transaction.
    let mut f = ChangeFeed::open(log.clone(), src(), None, Selector::default()).await.unwrap();
    assert_eq!(all(&mut f).await[0].id, "a/0/12C/1");
}
