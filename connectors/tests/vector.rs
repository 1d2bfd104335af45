//! The vector index against real components: the load from a PostgreSQL snapshot (a real
//! cluster, a real exported snapshot), and following a real embedded log's committed changes.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Map, Value};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_connectors::api::SnapshotSource;
use synapse_connectors::feed::SourceInfo;
use synapse_connectors::vector::maintain::{follow, load, IndexSpec};
use synapse_connectors::vector::store::{Metric, Store, StoreSpec};
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_log::{ChangeLog, EmbeddedLog};
use synapse_schemas::{
    Begin, Column, Commit, Datum, LogRecord, Lsn, OldValues, Op, Relation, ReplicaIdentity, RowChange,
};

fn spec() -> IndexSpec {
    IndexSpec {
        name: "docs".into(),
        table: "public.docs".into(),
        column: "embedding".into(),
        filters: vec!["lang".into()],
        batch_rows: 500,
        batch_wait: Duration::from_millis(20),
    }
}

fn store(dir: &std::path::Path) -> Arc<Store> {
    Arc::new(Store::open(dir, &StoreSpec { max_bytes: 256 << 20, ..StoreSpec::new(8, Metric::Euclidean) }).unwrap())
}

fn lang(l: &str) -> Map<String, Value> {
    [("lang".to_owned(), json!(l))].into_iter().collect()
}

/// Every row of a real table from an exported snapshot: rows with a usable vector indexed
/// (found first by their own vector, filtered by `lang`), the others dead letters with the
/// reason, and the stream position set to the snapshot's consistent point.
#[tokio::test]
async fn the_load_takes_every_row_of_a_snapshot() {
    let cluster = LocalCluster::start(ClusterOptions::default()).unwrap();
    cluster.create_database("app").unwrap();
    cluster
        .psql(
            "app",
            "CREATE TABLE docs (id int PRIMARY KEY, lang text, embedding real[]);
             INSERT INTO docs SELECT g, CASE WHEN g % 2 = 0 THEN 'en' ELSE 'de' END,
                 ARRAY(SELECT sin(g * k)::real FROM generate_series(1, 8) k) FROM generate_series(1, 3000) g;
             INSERT INTO docs VALUES (-1, 'en', '{1,2,3}'), (-2, 'en', NULL)",
        )
        .unwrap();
    // The capture's slot (a snapshot is refused without one).
    cluster.psql("app", "SELECT pg_create_logical_replication_slot('synapse_docs', 'pgoutput')").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let source = SnapshotSource {
        config: cluster.url("app").parse().unwrap(),
        capture_slot: "synapse_docs".into(),
        tables: vec![],
    };
    let loaded = AtomicU64::new(0);
    let keys = load(&source, "a", &store, &spec(), &loaded).await.unwrap();
    assert_eq!(keys, ["id"]);
    assert_eq!(loaded.into_inner(), 3002);
    let stats = store.stats().unwrap();
    assert_eq!((stats.items, stats.dead_letters), (3000, 2));
    let at = stats.cursor.expect("the load sets the stream position");
    let lsn: String = cluster.psql("app", "SELECT confirmed_flush_lsn FROM pg_replication_slots").unwrap();
    assert!(at.commit_lsn >= lsn.parse::<Lsn>().unwrap(), "{at} is before the slot's start {lsn}");
    let dead = store.dead_letters(10).unwrap();
    assert!(dead.iter().any(|d| d.key == "-1" && d.reason.contains("3 components")), "{dead:?}");
    assert!(dead.iter().any(|d| d.key == "-2" && d.reason.contains("NULL")), "{dead:?}");
    for id in [7, 1234, 2999] {
        let v: Vec<f32> = (1..=8).map(|k| ((id * k) as f64).sin() as f32).collect();
        let (hits, _) = store.search(&v, 5, &Map::new()).unwrap();
        assert_eq!(hits[0].key, id.to_string());
        let other = if id % 2 == 0 { "de" } else { "en" };
        let (hits, _) = store.search(&v, 5, &lang(other)).unwrap();
        assert!(hits.iter().all(|h| h.key.parse::<i32>().unwrap() % 2 != id % 2), "{hits:?}");
    }
}

fn relation() -> Relation {
    let col = |name: &str, oid: u32, element: u32, key: bool| Column {
        name: name.into(),
        type_oid: oid,
        type_modifier: -1,
        type_name: "x".into(),
        base_type_oid: oid,
        element_type_oid: element,
        is_key: key,
        type_defs: Vec::new(),
    };
    Relation {
        oid: 42,
        schema: "public".into(),
        table: "docs".into(),
        replica_identity: ReplicaIdentity::Default,
        // int4, text, float4[] (element float4).
        columns: vec![col("id", 23, 0, true), col("lang", 25, 0, false), col("embedding", 1021, 700, false)],
    }
}

/// Following committed changes of a real embedded log: inserts, an update of the vector and
/// the filter value, a delete, a bad vector; the store ends with exactly the live rows and the
/// last transaction's position, and a second follow from there changes nothing.
#[tokio::test]
async fn following_the_log_applies_each_committed_change() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap());
    let store = store(&dir.path().join("index"));
    let rel = relation();
    let row = |id: i32, lang: &str, v: &str| {
        Some(vec![Datum::Text(id.to_string()), Datum::Text(lang.into()), Datum::Text(v.into())].into())
    };
    let txn = |lsn: u64, changes: Vec<RowChange>| {
        let mut recs = vec![
            LogRecord::Begin(Begin { commit_lsn: Lsn(lsn), xid: 1, commit_time_us: 1, origin: None }),
            LogRecord::Relation(rel.clone()),
        ];
        let n = changes.len() as u32;
        recs.extend(changes.into_iter().map(LogRecord::Change));
        recs.push(LogRecord::Commit(Commit {
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 8),
            commit_time_us: 1,
            event_count: n,
        }));
        recs
    };
    let change = |index: u32, op: Op, before: Option<i32>, after| RowChange {
        index,
        relation: rel.key(),
        op,
        before: before.map(|id| (OldValues::Key, vec![Datum::Text(id.to_string()), Datum::Null, Datum::Null].into())),
        after,
    };
    let unit = |i: usize| {
        let mut v = ["0"; 8];
        v[i] = "1";
        format!("{{{}}}", v.join(","))
    };
    log.append(txn(
        0x100,
        vec![
            change(1, Op::Insert, None, row(1, "en", &unit(0))),
            change(2, Op::Insert, None, row(2, "en", &unit(1))),
            change(3, Op::Insert, None, row(3, "de", &unit(2))),
            change(4, Op::Insert, None, row(4, "de", "{1,2}")),
        ],
    ))
    .await
    .unwrap();
    log.append(txn(
        0x200,
        vec![change(1, Op::Update, None, row(2, "de", &unit(3))), change(2, Op::Delete, Some(3), None)],
    ))
    .await
    .unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let keys = vec!["id".to_owned()];
    let task = {
        let (log, store, keys) = (log.clone(), store.clone(), keys.clone());
        let source = SourceInfo { node: "a".into(), database: "app".into() };
        tokio::spawn(async move { follow(log, source, &store, &spec(), &keys, &AtomicU64::new(0), stop).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.cursor().unwrap().is_none_or(|c| c.commit_lsn < Lsn(0x200)) {
        assert!(Instant::now() < deadline, "the index did not reach the second transaction");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    assert!(!task.await.unwrap().unwrap(), "no reload was asked");
    let mut indexed = store.keys().unwrap();
    indexed.sort();
    assert_eq!(indexed, ["1", "2"]);
    assert_eq!(store.dead_letters(10).unwrap()[0].key, "4");
    let probe: Vec<f32> = (0..8).map(|i| if i == 3 { 1.0 } else { 0.0 }).collect();
    let (hits, cursor) = store.search(&probe, 1, &lang("de")).unwrap();
    assert_eq!(hits[0].key, "2", "the update moved 2's vector and its filter value");
    assert_eq!(cursor.unwrap().commit_lsn, Lsn(0x200));
    assert!(store.search(&probe, 2, &lang("en")).unwrap().0.iter().all(|h| h.key == "1"));
}
