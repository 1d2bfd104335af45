//! Keeps one [`Store`] in step with a table's vector column: first every row from an exported
//! snapshot, then the change stream from the snapshot's position, in micro-batches.
//!
//! Guarantees, on top of the store's:
//! * **Nothing missed, nothing twice.** The load reads the rows of a snapshot whose consistent
//!   point becomes the stream position (the stream API's snapshots do the same,
//!   [`crate::snapshot`]); the load sets no position until its last row is in, so a load cut
//!   short starts over from a new snapshot with a truncate.
//! * **Order per key.** A batch keeps each key's last change (an insert then a delete of one
//!   key deletes it; a delete then an insert keeps the insert); a truncate drops what came
//!   before it in the batch. A change that moves a row to another key deletes the old key.
//! * **A gap reloads.** A `resync` event (the source lost changes) reloads the index from a new
//!   snapshot instead of leaving rows the stream never corrected.

use super::row;
use super::store::{Batch, DeadLetter, Store, Upsert};
use crate::feed::{ChangeFeed, Event, Operation, Selector, SourceInfo};
use crate::ConnectorError;
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use synapse_log::ChangeLog;
use synapse_schemas::Cursor;

/// One index's table and columns.
#[derive(Clone, Debug)]
pub struct IndexSpec {
    pub name: String,
    /// `schema.table`.
    pub table: String,
    /// The vector column.
    pub column: String,
    /// Columns whose values searches may filter on.
    pub filters: Vec<String>,
    /// A batch is applied after this many changes…
    pub batch_rows: usize,
    /// …or this long after its first.
    pub batch_wait: Duration,
}

/// Each key's last change in a batch.
#[derive(Debug, Clone, PartialEq)]
enum Last {
    Upsert(Upsert),
    Delete,
    Dead(String),
}

/// The store batch the stream `events` make (see the module's guarantees); `reload` when one
/// of them is a gap. `current` gives a key's stored vector, for an update that left a TOASTed
/// vector unchanged (the stream then does not carry it).
pub fn batch_of(
    spec: &IndexSpec,
    keys: &[String],
    events: &[Event],
    cursor: Option<Cursor>,
    current: impl Fn(&str) -> Option<Vec<f32>>,
) -> Result<(Batch, bool), ConnectorError> {
    let mut last: BTreeMap<String, Last> = BTreeMap::new();
    let mut batch = Batch { cursor, ..Default::default() };
    let mut reload = false;
    for e in events {
        match e.op {
            Operation::Truncate => {
                batch.truncate = true;
                last.clear();
                continue;
            }
            Operation::Resync => {
                reload = true;
                continue;
            }
            Operation::Schema => continue,
            _ => {}
        }
        let body: Json = serde_json::from_slice(&e.body)
            .map_err(|err| ConnectorError::Index(format!("event {} is not JSON: {err}", e.id)))?;
        let row_of = |side: &str| body["data"][side].as_object().cloned();
        let (before, after) = (row_of("before"), row_of("after"));
        let old_key = before.as_ref().and_then(|r| row::key(r, keys));
        match (e.op, after) {
            (Operation::Delete, _) | (_, None) => {
                if let Some(k) = old_key {
                    last.insert(k, Last::Delete);
                }
            }
            (_, Some(after)) => {
                let Some(key) = row::key(&after, keys) else { continue };
                if let Some(old) = old_key.filter(|o| *o != key) {
                    last.insert(old, Last::Delete);
                }
                let value = after.get(&spec.column).cloned().unwrap_or(Json::Null);
                let unchanged = value.as_str() == Some(synapse_schemas::cloudevent::UNAVAILABLE_VALUE);
                let vector = match unchanged {
                    // The vector was not written: the stored one stands (taken from this batch
                    // if it set one).
                    true => match last.get(&key) {
                        Some(Last::Upsert(u)) => Ok(u.vector.clone()),
                        _ => current(&key).ok_or_else(|| {
                            "the vector was not sent (unchanged TOAST) and the index has none for this key".to_owned()
                        }),
                    },
                    false => row::vector(&value),
                };
                let entry = match vector {
                    Ok(vector) => {
                        Last::Upsert(Upsert { key: key.clone(), vector, filters: row::filters(&after, &spec.filters) })
                    }
                    Err(reason) => Last::Dead(reason),
                };
                last.insert(key, entry);
            }
        }
    }
    for (key, l) in last {
        match l {
            Last::Upsert(u) => batch.upserts.push(u),
            Last::Delete => batch.deletes.push(key),
            Last::Dead(reason) => batch.dead.push(DeadLetter { key, reason, cursor }),
        }
    }
    Ok((batch, reload))
}

/// Applies `batch` on a blocking thread (an LMDB write and a graph update).
pub async fn apply(store: &Arc<Store>, batch: Batch) -> Result<super::store::Applied, ConnectorError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.apply(&batch))
        .await
        .map_err(|e| ConnectorError::Index(format!("the index's writer stopped: {e}")))?
        .map_err(|e| ConnectorError::Index(e.to_string()))
}

/// Follows the stream from the store's position until `shutdown` (the load is the caller's:
/// a store without a position must be loaded first). `read` holds the log offset below which
/// every record is in the store (for reads at a position). Returns `Ok(true)` when a gap asks
/// for a reload.
pub async fn follow<L: ChangeLog + Send + Sync + 'static>(
    log: Arc<L>,
    source: SourceInfo,
    store: &Arc<Store>,
    spec: &IndexSpec,
    keys: &[String],
    read: &std::sync::atomic::AtomicU64,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<bool, ConnectorError> {
    // The position the store last committed: an idle poll that did not move it writes nothing.
    let mut stored = store.cursor().map_err(|e| ConnectorError::Index(e.to_string()))?;
    let selector = Selector { tables: Some([spec.table.clone()].into()), ..Default::default() };
    let mut feed = ChangeFeed::open(log, source, stored, selector).await?;
    loop {
        let batch = tokio::select! {
            b = feed.next_batch(spec.batch_rows, spec.batch_wait) => b?,
            _ = shutdown.wait_for(|s| *s) => return Ok(false),
        };
        if batch.position.is_none() || (batch.events.is_empty() && batch.position == stored) {
            read.store(feed.retention_offset(), std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let current = |k: &str| store.vector(k).ok().flatten();
        let (b, reload) = batch_of(spec, keys, &batch.events, batch.position, current)?;
        let rows = b.upserts.len() + b.deletes.len();
        let started = std::time::Instant::now();
        let applied = apply(store, b).await?;
        stored = batch.position;
        let labels = [("index", spec.name.clone())];
        metrics::counter!("synapse_vector_rows_total", &labels).increment(rows as u64);
        metrics::histogram!("synapse_vector_batch_seconds", &labels).record(started.elapsed().as_secs_f64());
        if let Some(e) = batch.events.last() {
            let lag = (synapse_schemas::unix_micros_now() - e.commit_time_us).max(0) as f64 / 1e6;
            metrics::gauge!("synapse_vector_lag_seconds", &labels).set(lag);
        }
        if let Ok(stats) = store.stats() {
            metrics::gauge!("synapse_vector_graph_nodes", &labels).set(stats.graph_nodes as f64);
            metrics::gauge!("synapse_vector_orphans", &labels).set(stats.orphans as f64);
        }
        metrics::counter!("synapse_vector_graph_rebuilds_total", &labels).absolute(store.graph_rebuilds());
        read.store(feed.retention_offset(), std::sync::atomic::Ordering::Relaxed);
        if applied.dead > 0 {
            tracing::warn!(index = %spec.name, dead = applied.dead, "rows without a usable vector: in the index's dead letters");
        }
        if reload {
            return Ok(true);
        }
    }
}

/// The primary key columns of `table` (`schema.table`), in key order: a row's key in the index.
pub async fn key_columns(client: &tokio_postgres::Client, table: &str) -> Result<Vec<String>, ConnectorError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY k.ord",
            &[&table],
        )
        .await
        .map_err(|source| ConnectorError::Snapshot { table: table.to_owned(), source })?;
    let keys: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    if keys.is_empty() {
        return Err(ConnectorError::Index(format!("{table} has no primary key: an index keys its rows by it")));
    }
    Ok(keys)
}

/// Rows read per round trip of the load (and applied per batch).
const LOAD_ROWS: i64 = 2_000;

/// Loads every row of the table from a snapshot of `source` taken now, then sets the store's
/// position to the snapshot's consistent point (see the module's guarantees); `loaded` counts
/// the rows read. Returns the key columns.
pub async fn load(
    source: &crate::api::SnapshotSource,
    node: &str,
    store: &Arc<Store>,
    spec: &IndexSpec,
    loaded: &std::sync::atomic::AtomicU64,
) -> Result<Vec<String>, ConnectorError> {
    crate::snapshot::ensure_capturing(source, node).await?;
    let session = synapse_capture::snapshot::SnapshotSession::begin(&source.config, &source.capture_slot).await?;
    let client = session.connect().await?;
    let keys = key_columns(&client, &spec.table).await?;
    let table = spec
        .table
        .split_once('.')
        .map(|(s, t)| format!("{}.{}", synapse_postgres::quote::ident(s), synapse_postgres::quote::ident(t)))
        .ok_or_else(|| ConnectorError::Index(format!("{} is not schema.table", spec.table)))?;
    let snapshot_error = |source| ConnectorError::Snapshot { table: spec.table.clone(), source };
    client
        .batch_execute(&format!(
            "DECLARE synapse_vector_load NO SCROLL CURSOR FOR SELECT to_jsonb(t)::text FROM {table} t"
        ))
        .await
        .map_err(snapshot_error)?;
    let mut first = true;
    loop {
        let rows = client
            .query(&format!("FETCH {LOAD_ROWS} FROM synapse_vector_load"), &[])
            .await
            .map_err(|source| ConnectorError::Snapshot { table: spec.table.clone(), source })?;
        let mut batch = Batch { truncate: first, ..Default::default() };
        first = false;
        for r in &rows {
            let text: String = r.get(0);
            let Ok(Json::Object(row)) = serde_json::from_str::<Json>(&text) else { continue };
            let Some(key) = row::key(&row, &keys) else { continue };
            match row::vector(row.get(&spec.column).unwrap_or(&Json::Null)) {
                Ok(vector) => batch.upserts.push(Upsert { key, vector, filters: row::filters(&row, &spec.filters) }),
                Err(reason) => batch.dead.push(DeadLetter { key, reason, cursor: None }),
            }
        }
        let n = rows.len() as u64;
        if n > 0 || batch.truncate {
            apply(store, batch).await?;
        }
        loaded.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if n < LOAD_ROWS as u64 {
            break;
        }
    }
    let at = Cursor { commit_lsn: session.consistent_point, index: 0 };
    apply(store, Batch { cursor: Some(at), ..Default::default() }).await?;
    tracing::info!(index = %spec.name, rows = loaded.load(std::sync::atomic::Ordering::Relaxed), position = %at, "vector index loaded from a snapshot");
    Ok(keys)
}

/// Reads a JSON object's filter values as a filter (a body's `filter` field).
pub fn filter_of(value: &Json) -> Result<Map<String, Json>, String> {
    match value {
        Json::Null => Ok(Map::new()),
        Json::Object(m) if m.values().all(|v| !v.is_object() && !v.is_array()) => Ok(m.clone()),
        _ => Err("give an object of column: value pairs (each value a string, number, boolean or null)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn spec() -> IndexSpec {
        IndexSpec {
            name: "docs".into(),
            table: "public.docs".into(),
            column: "embedding".into(),
            filters: vec!["lang".into()],
            batch_rows: 100,
            batch_wait: Duration::from_millis(10),
        }
    }

    fn event(op: Operation, before: Json, after: Json) -> Event {
        let body = json!({"data": {"before": before, "after": after}});
        Event {
            cursor: Cursor::default(),
            id: "n/0".into(),
            table: Arc::from("public.docs"),
            op,
            keys: [0, 0],
            barrier: false,
            commit_time_us: 0,
            txn_offset: 0,
            body: Bytes::from(body.to_string()),
            relation: None,
        }
    }

    #[test]
    fn each_keys_last_change_wins_in_order() {
        let keys = vec!["id".to_owned()];
        let events = [
            event(Operation::Insert, json!(null), json!({"id": 1, "embedding": [1, 0], "lang": "en"})),
            event(Operation::Delete, json!({"id": 1}), json!(null)),
            event(Operation::Delete, json!({"id": 2}), json!(null)),
            event(Operation::Insert, json!(null), json!({"id": 2, "embedding": "{0,1}", "lang": "de"})),
            // A key change: 3 moves to 4.
            event(Operation::Update, json!({"id": 3}), json!({"id": 4, "embedding": "[1,1]", "lang": null})),
            event(Operation::Insert, json!(null), json!({"id": 5, "embedding": "oops"})),
            // The vector not sent (unchanged TOAST): the stored one stands, new filters apply.
            event(
                Operation::Update,
                json!({"id": 6}),
                json!({"id": 6, "embedding": synapse_schemas::cloudevent::UNAVAILABLE_VALUE, "lang": "fr"}),
            ),
        ];
        let stored = |k: &str| (k == "6").then(|| vec![0.5, 0.5]);
        let (b, reload) = batch_of(&spec(), &keys, &events, None, stored).unwrap();
        assert!(!reload && !b.truncate);
        let ups: Vec<(&str, &[f32])> = b.upserts.iter().map(|u| (u.key.as_str(), u.vector.as_slice())).collect();
        assert_eq!(ups, [("2", &[0.0, 1.0][..]), ("4", &[1.0, 1.0][..]), ("6", &[0.5, 0.5][..])]);
        assert_eq!(b.upserts[2].filters["lang"], "fr");
        assert_eq!(b.deletes, ["1", "3"]);
        assert_eq!(b.dead.len(), 1);
        assert!(b.dead[0].reason.contains("not an array"), "{:?}", b.dead);
    }

    #[test]
    fn a_truncate_drops_what_came_before_and_a_gap_asks_for_a_reload() {
        let keys = vec!["id".to_owned()];
        let events = [
            event(Operation::Insert, json!(null), json!({"id": 1, "embedding": [1, 0]})),
            event(Operation::Truncate, json!(null), json!(null)),
            event(Operation::Insert, json!(null), json!({"id": 2, "embedding": [0, 1]})),
            event(Operation::Resync, json!(null), json!(null)),
        ];
        let (b, reload) = batch_of(&spec(), &keys, &events, None, |_| None).unwrap();
        assert!(b.truncate && reload);
        assert_eq!(b.upserts.iter().map(|u| u.key.as_str()).collect::<Vec<_>>(), ["2"]);
    }

    #[test]
    fn filters_are_flat_objects() {
        assert!(filter_of(&json!({"lang": "en", "n": 1})).is_ok());
        assert!(filter_of(&json!({"lang": ["en"]})).is_err());
        assert!(filter_of(&json!("en")).is_err());
    }
}
