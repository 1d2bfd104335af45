//! The consistent initial snapshot, split from streaming as in Materialize.
//!
//! A temporary slot is created with `EXPORT_SNAPSHOT`: its snapshot shows exactly what committed
//! before its `consistent_point`, and every later commit is in the WAL the main slot (created
//! earlier) retains. The copier imports the snapshot on as many connections as it copies chunks
//! in parallel (`SET TRANSACTION SNAPSHOT`), and each table records `consistent_point` as its
//! sync LSN: the applier applies a streamed change to that table only if its commit LSN is at or
//! past it. No gap, no duplicate.

use crate::catalog::SourceTable;
use crate::transport::ReplicationConnection;
use crate::CaptureError;
use bytes::Bytes;
use futures_util::Stream;
use synapse_postgres::quote;
use synapse_schemas::{Lsn, Relation};
use tokio_postgres::Client;

/// An exported snapshot, held open until dropped.
pub struct SnapshotSession {
    // Holding the connection keeps the exported snapshot importable; it must run no command.
    _holder: ReplicationConnection,
    pub consistent_point: Lsn,
    snapshot: String,
    source: synapse_postgres::PgConfig,
}

/// A range of heap pages of one table: `[first_page, end_page)`, open-ended for the last chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub first_page: i64,
    pub end_page: Option<i64>,
}

impl SnapshotSession {
    pub async fn begin(source: &synapse_postgres::PgConfig, slot_hint: &str) -> Result<Self, CaptureError> {
        let mut conn = ReplicationConnection::connect(source, "synapse-snapshot").await?;
        // Temporary (gone with the session); unique per session, as the copies into several
        // targets of one source run at once in one process. Slot names are at most 63 bytes.
        static SESSIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let suffix = format!("_snap_{}_{n}", std::process::id());
        // Slot names take only a-z, 0-9 and `_`: a node named `eu-west` must still work.
        let hint: String = slot_hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .take(63 - suffix.len())
            .collect();
        let name = format!("{hint}{suffix}");
        let slot = conn.create_slot(&name, true, true).await?;
        let snapshot = slot.snapshot.ok_or_else(|| CaptureError::Protocol("no snapshot exported".into()))?;
        tracing::info!(consistent_point = %Lsn(slot.consistent_point), %snapshot, "exported initial snapshot");
        Ok(SnapshotSession {
            _holder: conn,
            consistent_point: Lsn(slot.consistent_point),
            snapshot,
            source: source.clone(),
        })
    }

    /// A new connection inside the snapshot (a read-only repeatable-read transaction).
    pub async fn connect(&self) -> Result<Client, CaptureError> {
        let client = synapse_postgres::connect(&self.source, "snapshot")
            .await
            .map_err(CaptureError::sql("connecting for the snapshot"))?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}';
                 SET LOCAL DateStyle = ISO; SET LOCAL TimeZone = 'UTC'; SET LOCAL IntervalStyle = iso_8601;
                 SET LOCAL extra_float_digits = 3",
                self.snapshot
            ))
            .await
            .map_err(CaptureError::sql("importing the snapshot"))?;
        Ok(client)
    }

    /// Splits `table` into about four chunks per worker (so workers stay balanced), none smaller
    /// than `min_chunk_pages`, using its size in the snapshot.
    pub async fn chunks(
        &self,
        client: &Client,
        table: &SourceTable,
        workers: usize,
        min_chunk_pages: i64,
    ) -> Result<Vec<Chunk>, CaptureError> {
        let pages: i64 = client
            .query_one("SELECT (pg_relation_size($1::oid) / current_setting('block_size')::int8)::int8", &[&table.oid])
            .await
            .map_err(CaptureError::sql(format!("sizing {}", table.display())))?
            .get(0);
        let chunk_pages = (pages / (workers.max(1) as i64 * 4)).max(min_chunk_pages).max(1);
        let mut chunks = Vec::new();
        let mut first = 0;
        while first + chunk_pages < pages {
            chunks.push(Chunk { first_page: first, end_page: Some(first + chunk_pages) });
            first += chunk_pages;
        }
        chunks.push(Chunk { first_page: first, end_page: None });
        Ok(chunks)
    }

    /// Streams one chunk in COPY text (or binary) format, on `client` (from
    /// [`SnapshotSession::connect`]); `rows`, a predicate, keeps only the rows it holds for
    /// (a shard's).
    pub async fn copy_out(
        client: &Client,
        rel: &Relation,
        chunk: Chunk,
        binary: bool,
        rows: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Bytes, tokio_postgres::Error>>, CaptureError> {
        let cols: Vec<String> = rel.columns.iter().map(|c| quote::ident(&c.name)).collect();
        let mut filter = format!("ctid >= '({},0)'::tid", chunk.first_page);
        if let Some(end) = chunk.end_page {
            filter.push_str(&format!(" AND ctid < '({end},0)'::tid"));
        }
        if let Some(rows) = rows {
            filter.push_str(&format!(" AND ({rows})"));
        }
        let sql = format!(
            "COPY (SELECT {} FROM ONLY {} WHERE {filter}) TO STDOUT{}",
            cols.join(", "),
            rel.quoted_name(),
            if binary { " (FORMAT binary)" } else { "" }
        );
        client.copy_out(&sql).await.map_err(CaptureError::sql(format!("copying {}", rel.name())))
    }
}
