//! The initial copy: every captured table not yet synced is copied from one exported snapshot
//! straight into the target (COPY out → COPY in), in parallel chunks, with no detour through the
//! log. Each finished table is marked `ready` in `synapse.table_sync` with the snapshot's
//! consistent point as its sync LSN; the applier applies streamed changes to it only from there.
//!
//! Resumable per table: a rerun skips `ready` tables and re-copies (after truncating) a table
//! left `copying` by a crash, at a new snapshot with its own sync LSN.

use crate::{connect_target, target, ApplyError, ApplyStats};
use futures_util::{SinkExt, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use synapse_capture::catalog::{self, SourceTable, TypeResolver};
use synapse_capture::snapshot::{Chunk, SnapshotSession};
use synapse_capture::Capture;
use synapse_postgres::quote;
use synapse_schemas::Relation;

/// Smallest chunk: 1,024 pages (8 MiB of heap), big enough that per-chunk setup is noise.
pub const MIN_CHUNK_PAGES: i64 = 1_024;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub tables_copied: usize,
    pub tables_already_synced: usize,
    pub rows: u64,
}

struct Job {
    table: usize,
    chunk: Chunk,
}

/// How many of `tables` the target has not synced yet from source `node` (0: nothing to copy,
/// the applier can stream at once).
pub async fn pending(
    tables: &[SourceTable],
    target_config: &synapse_postgres::PgConfig,
    node: &str,
) -> Result<usize, ApplyError> {
    let client = connect_target(target_config).await?;
    target::setup_state(&client).await?;
    let sync = target::load_sync(&client, node).await?;
    Ok(tables
        .iter()
        .filter(|t| !matches!(sync.get(&(t.schema.clone(), t.name.clone())), Some((state, _)) if state == "ready"))
        .count())
}

/// Copies the tables of `capture` that the target has not synced yet, using `parallelism`
/// connection pairs. Into a shard (`shard`), only the rows it holds.
pub async fn run(
    capture: &Capture,
    tables: &[SourceTable],
    target_config: &synapse_postgres::PgConfig,
    shard: Option<&crate::shards::ShardAssignment>,
    parallelism: usize,
    stats: Arc<ApplyStats>,
) -> Result<CopyReport, ApplyError> {
    let node = capture.config().node.clone();
    let client = connect_target(target_config).await?;
    target::setup_state(&client).await?;
    let sync = target::load_sync(&client, &node).await?;
    let mut report = CopyReport::default();
    let mut todo = Vec::new();
    for t in tables {
        match sync.get(&(t.schema.clone(), t.name.clone())) {
            Some((state, _)) if state == "ready" => report.tables_already_synced += 1,
            other => todo.push((t.clone(), other.is_some())),
        }
    }
    if todo.is_empty() {
        return Ok(report);
    }
    let started = std::time::Instant::now();
    let session =
        SnapshotSession::begin(&capture.config().source, &capture.config().slot).await.map_err(ApplyError::Copy)?;
    let planner = session.connect().await.map_err(ApplyError::Copy)?;
    let mut types = TypeResolver::default();
    let mut rels: Vec<(Relation, String, bool, Option<String>)> = Vec::new();
    let mut jobs = VecDeque::new();
    let mut remaining = HashMap::new();
    for (i, (t, was_copying)) in todo.iter().enumerate() {
        let rel = catalog::describe_table(&planner, &mut types, t).await.map_err(ApplyError::Copy)?;
        let rows = shard.map(|s| s.copy_filter(&rel)).transpose()?.flatten();
        let table = target::ensure_table(&client, &rel, true).await?;
        if *was_copying {
            tracing::info!(table = %t.display(), "re-copying a table whose copy was interrupted");
            client
                .batch_execute(&format!("TRUNCATE {}", table.name))
                .await
                .map_err(ApplyError::target("truncating a partly copied table"))?;
        }
        client
            .execute(
                "INSERT INTO synapse.table_sync (source_node, schema_name, table_name, state) VALUES ($1, $2, $3, 'copying')
                 ON CONFLICT (source_node, schema_name, table_name) DO UPDATE SET state = 'copying', sync_lsn = NULL, updated_at = now()",
                &[&node, &t.schema, &t.name],
            )
            .await
            .map_err(ApplyError::target("recording copy state"))?;
        let chunks = session.chunks(&planner, t, parallelism, MIN_CHUNK_PAGES).await.map_err(ApplyError::Copy)?;
        remaining.insert(i, (chunks.len(), 0u64));
        jobs.extend(chunks.into_iter().map(|chunk| Job { table: i, chunk }));
        let cols: Vec<String> = rel.columns.iter().map(|c| quote::ident(&c.name)).collect();
        // Binary COPY skips the text output and input functions on both servers.
        let binary = table.binary_compatible(&rel);
        let copy_in = format!(
            "COPY {} ({}) FROM STDIN{}",
            table.name,
            cols.join(", "),
            if binary { " (FORMAT binary)" } else { "" }
        );
        rels.push((rel, copy_in, binary, rows));
    }
    drop(planner);
    stats.copy_chunks.store(jobs.len() as u64, Ordering::Relaxed);
    stats.copy_chunks_done.store(0, Ordering::Relaxed);
    tracing::info!(
        tables = todo.len(),
        chunks = jobs.len(),
        parallelism,
        setup_ms = started.elapsed().as_millis() as u64,
        "initial copy starting"
    );
    let jobs = Mutex::new(jobs);
    let remaining = Mutex::new(remaining);
    // Shared by reference: each worker's future owns only its number.
    let (jobs_ref, remaining_ref, rels_ref, node_ref, session_ref, stats_ref) =
        (&jobs, &remaining, &rels, &node, &session, &stats);
    let workers = (0..parallelism.max(1)).map(|k| async move {
        let (jobs, remaining, rels, node, session, stats) =
            (jobs_ref, remaining_ref, rels_ref, node_ref, session_ref, stats_ref);
        let source = session.connect().await.map_err(ApplyError::Copy)?;
        let target = connect_target(target_config).await?;
        // Copied rows carry a SynapseDB origin like applied ones (one origin per worker: on
        // PostgreSQL 15 an origin binds to one session at a time).
        crate::replica_session(&target, &format!("{}_copy{k}", crate::origin_name(node, target_config))).await?;
        loop {
            let Some(job) = jobs.lock().ok().and_then(|mut j| j.pop_front()) else { return Ok::<_, ApplyError>(()) };
            let (rel, copy_in, binary, rows) = &rels[job.table];
            let out = SnapshotSession::copy_out(&source, rel, job.chunk, *binary, rows.as_deref())
                .await
                .map_err(ApplyError::Copy)?;
            let sink = target.copy_in::<_, bytes::Bytes>(copy_in.as_str()).await.map_err(ApplyError::target(format!("copying into {}", rel.name())))?;
            futures_util::pin_mut!(out);
            futures_util::pin_mut!(sink);
            while let Some(data) = out.next().await {
                let data = data.map_err(ApplyError::target(format!("reading {} from the source", rel.name())))?;
                // `feed`, not `send`: the source sends one message per row, and flushing each
                // would cost a syscall per row.
                sink.feed(data).await.map_err(ApplyError::target(format!("copying into {}", rel.name())))?;
            }
            let rows = sink.finish().await.map_err(ApplyError::target(format!("copying into {}", rel.name())))?;
            stats.rows_copied.fetch_add(rows, Ordering::Relaxed);
            stats.copy_chunks_done.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("synapse_copy_rows_total", "source" => node.to_string()).increment(rows);
            let done = {
                let mut r = remaining.lock().map_err(|_| ApplyError::Schema { table: rel.name(), message: "copy state poisoned".into() })?;
                let e = r.entry(job.table).or_insert((1, 0));
                e.0 -= 1;
                e.1 += rows;
                (e.0 == 0).then_some(e.1)
            };
            if let Some(total) = done {
                target
                    .execute(
                        "UPDATE synapse.table_sync SET state = 'ready', sync_lsn = $4::text::pg_lsn, rows_copied = $5, updated_at = now()
                         WHERE source_node = $1 AND schema_name = $2 AND table_name = $3",
                        &[&node, &rel.schema, &rel.table, &session.consistent_point.to_string(), &(total as i64)],
                    )
                    .await
                    .map_err(ApplyError::target("recording copy completion"))?;
                tracing::info!(table = %rel.name(), rows = total, elapsed_ms = started.elapsed().as_millis() as u64, "table copied");
            }
        }
    });
    for r in futures_util::future::join_all(workers).await {
        r?;
    }
    report.tables_copied = todo.len();
    report.rows = remaining.lock().map(|r| r.values().map(|v| v.1).sum()).unwrap_or(0);
    Ok(report)
}
