//! Real changes captured from PostgreSQL into the embedded log, rendered as CloudEvents and
//! validated against the published JSON Schema.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};
use synapse_capture::{Capture, CaptureConfig};
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_log::{ChangeLog, EmbeddedLog};
use synapse_schemas::cloudevent::{change_event, schema_change_event, EventContext, UNAVAILABLE_VALUE};
use synapse_schemas::{LogRecord, CHANGE_EVENT_SCHEMA};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_events_validate_against_the_published_schema() {
    let pg = LocalCluster::start(ClusterOptions::default()).unwrap();
    pg.create_database("app").unwrap();
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY, n numeric, j jsonb, a int[], big text, at timestamptz)")
        .unwrap();
    let capture = Capture::connect(CaptureConfig::new("a", pg.url("app").parse().unwrap())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    capture.prepare(&log).await.unwrap();
    let (stop, rx) = watch::channel(false);
    let l = log.clone();
    let task = tokio::spawn(async move { capture.stream(l, rx).await });
    // One transaction each (psql -c would run them as one).
    for sql in [
        "INSERT INTO t VALUES (1, 1.50, '{\"k\": [1]}', '{1,2}', (SELECT string_agg(md5(x::text), '') FROM generate_series(1, 2000) x), now())",
        "UPDATE t SET n = 2",
        "ALTER TABLE t ADD COLUMN extra text",
        "UPDATE t SET extra = 'x'",
        "DELETE FROM t",
    ] {
        pg.psql("app", sql).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let r = log.read(0, 1000).await.unwrap();
        // Five transactions: the ALTER TABLE is one of its own (its schema change record).
        if r.iter().filter(|(_, r)| matches!(r, LogRecord::Commit(_))).count() >= 5 {
            break r;
        }
        assert!(Instant::now() < deadline, "capture did not write the changes: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    let schema: serde_json::Value = serde_json::from_str(CHANGE_EVENT_SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut begin = None;
    let mut rels = HashMap::new();
    let mut ops = Vec::new();
    let mut schema_changes = 0;
    let mut ddl = 0;
    for (_, r) in records {
        match r {
            LogRecord::Begin(b) => begin = Some(b),
            LogRecord::Relation(rel) => {
                let b = begin.as_ref().unwrap();
                let e = schema_change_event(&EventContext { node: "a", database: "app", begin: b }, &rel, 0);
                assert!(validator.is_valid(&e), "{e}");
                schema_changes += 1;
                rels.insert(rel.key(), rel);
            }
            LogRecord::Change(c) => {
                let b = begin.as_ref().unwrap();
                let rel = match rels.get(&c.relation) {
                    Some(r) => r.clone(),
                    None => log.relation(c.relation).await.unwrap().unwrap(),
                };
                let e = change_event(&EventContext { node: "a", database: "app", begin: b }, &rel, &c);
                let errors: Vec<String> = validator.iter_errors(&e).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{e}: {errors:?}");
                ops.push(e["data"]["op"].as_str().unwrap().to_owned());
                if ops.len() == 1 {
                    assert_eq!(e["data"]["after"]["a"], serde_json::json!([1, 2]));
                    assert_eq!(e["data"]["after"]["n"], "1.50");
                    assert!(e["data"]["after"]["at"].as_str().unwrap().ends_with("+00"), "{e}");
                }
                if ops.len() == 2 {
                    assert_eq!(e["data"]["after"]["big"], UNAVAILABLE_VALUE, "unchanged TOAST must not read as null");
                }
            }
            LogRecord::Schema(s) => {
                assert_eq!((s.tag.as_str(), s.tables.as_slice()), ("ALTER TABLE", &["public.t".to_owned()][..]));
                ddl += 1;
            }
            _ => {}
        }
    }
    assert_eq!(ddl, 1, "the ALTER TABLE, once");
    assert_eq!(ops, ["c", "u", "u", "d"]);
    assert_eq!(schema_changes, 2, "one relation version before and one after ALTER TABLE");
}
