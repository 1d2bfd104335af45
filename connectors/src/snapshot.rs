//! Consistent snapshots for stream readers (Debezium's read events, Electric's initial shape):
//! every selected table's current rows, then the cursor the change stream continues after —
//! nothing missing between the two, nothing in both.
//!
//! How: a temporary logical slot exports a snapshot; the rows are read inside it, and the slot's
//! consistent point becomes the resume cursor `<consistent_point>/0`: a transaction committed
//! at or after it is in the change stream and not in the snapshot.

use crate::feed::{Selector, SourceInfo};
use crate::ConnectorError;
use bytes::Bytes;
use synapse_capture::catalog::{describe_table, select_tables, TypeResolver};
use synapse_capture::snapshot::SnapshotSession;
use synapse_postgres::quote;
use synapse_schemas::cloudevent::{row_json, write_snapshot_event};
use synapse_schemas::{Cursor, Datum, Tuple};
use tokio::sync::mpsc;
use tokio_postgres::SimpleQueryMessage;

/// Rows fetched per round trip (and per chunk sent to the client).
const FETCH_ROWS: usize = 1_000;

/// Refuses while the capture's slot is missing or lost. The snapshot's resume cursor is its own
/// slot's consistent point; only a capture slot made before it guarantees the log will hold
/// every change after that point (a slot made later starts later, and the changes in between
/// would be in neither).
pub async fn ensure_capturing(source: &crate::api::SnapshotSource, node: &str) -> Result<(), ConnectorError> {
    let sql = synapse_capture::CaptureError::sql;
    let client =
        synapse_postgres::connect(&source.config, "snapshot").await.map_err(sql("connecting to the source"))?;
    let slot = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND wal_status IS DISTINCT FROM 'lost'",
            &[&source.capture_slot],
        )
        .await
        .map_err(sql("reading the capture's slot"))?;
    match slot {
        Some(_) => Ok(()),
        None => Err(ConnectorError::NotCapturing { node: node.to_owned(), slot: source.capture_slot.clone() }),
    }
}

/// Streams the snapshot as JSON lines into `out`; returns the resume cursor. Stops early
/// (without error) if the receiver goes away.
pub async fn stream_snapshot(
    source: &crate::api::SnapshotSource,
    info: &SourceInfo,
    selector: &Selector,
    out: &mpsc::Sender<Bytes>,
) -> Result<Cursor, ConnectorError> {
    let session = SnapshotSession::begin(&source.config, &format!("synapse_{}_api", info.node)).await?;
    let resume = Cursor { commit_lsn: session.consistent_point, index: 0 };
    let taken_us = synapse_schemas::unix_micros_now();
    let client = session.connect().await?;
    // The captured tables only: a snapshot shows nothing the stream would not.
    let (tables, _without_key) = select_tables(&client, &source.tables).await?;
    let mut types = TypeResolver::default();
    let mut seq: u32 = 0;
    for table in tables.iter().filter(|t| selector.tables.as_ref().is_none_or(|s| s.contains(&t.display()))) {
        let rel = describe_table(&client, &mut types, table).await?;
        let cols: Vec<String> = rel.columns.iter().map(|c| quote::ident(&c.name)).collect();
        let read = |e| ConnectorError::Snapshot { table: table.display(), source: e };
        client
            .batch_execute(&format!(
                "DECLARE synapse_snapshot NO SCROLL CURSOR FOR SELECT {} FROM ONLY {}",
                cols.join(", "),
                rel.quoted_name()
            ))
            .await
            .map_err(read)?;
        loop {
            let msgs = client.simple_query(&format!("FETCH {FETCH_ROWS} FROM synapse_snapshot")).await.map_err(read)?;
            let mut chunk = Vec::with_capacity(FETCH_ROWS * 256);
            let mut rows = 0;
            for m in &msgs {
                let SimpleQueryMessage::Row(row) = m else { continue };
                rows += 1;
                let values: Vec<Datum> = (0..rel.columns.len())
                    .map(|i| row.get(i).map_or(Datum::Null, |v| Datum::Text(v.to_owned())))
                    .collect();
                let tuple = Tuple::from(values);
                if let Some(f) = &selector.filter {
                    if !f.matches(&row_json(&rel, &tuple)) {
                        continue;
                    }
                }
                seq = seq.saturating_add(1);
                write_snapshot_event(&info.node, &info.database, &rel, &tuple, resume, seq, taken_us, &mut chunk);
                chunk.push(b'\n');
            }
            if !chunk.is_empty() && out.send(Bytes::from(chunk)).await.is_err() {
                return Ok(resume);
            }
            if rows < FETCH_ROWS {
                break;
            }
        }
        client.batch_execute("CLOSE synapse_snapshot").await.map_err(read)?;
    }
    metrics::counter!("synapse_stream_snapshot_rows_total", "stream" => info.node.clone()).increment(u64::from(seq));
    Ok(resume)
}
