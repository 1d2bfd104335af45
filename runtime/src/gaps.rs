//! A source's slot safety as the pipeline runs it: crossing a gap (a lost or foreign slot, a
//! new timeline) with a mark every stream and webhook reader sees, the re-sync a gap owes the
//! targets (`on_gap: resync`), and the slot-lag policy (docs/decisions/0009-never-silent.md).

use crate::config::SourceConfig;
use crate::ops::{ComponentState, Health};
use crate::pipeline::{chain, ready, supervise, ComponentFailed, Shared, TablesWatch};
use std::sync::Arc;
use std::time::Duration;
use synapse_apply::ApplyError;
use synapse_capture::{Capture, CaptureConfig, CaptureError, CaptureStats};
use synapse_error::Classify;
use synapse_log::{ChangeLog, SourceLog, WriterState};
use synapse_schemas::{LogRecord, ResyncMark};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// A re-sync still owed to a source's targets (`on_gap: resync`) is a consumer position of
/// that name in the source's log, at the gap: durable with the log (and shared by a consumer
/// group), written before the new slot exists, removed once the targets are whole again.
pub const RESYNC_MARK: &str = "resync";

/// How often each target is asked for copies owed (node schema V4's `owed` table state)
/// without being woken: appliers wake the task when they record one; this catches one
/// recorded by another process (a Kafka group's previous owner of the source).
const OWED_COPY_POLL: Duration = Duration::from_secs(60);

/// Crosses `gap`: with `on_gap: resync` (`resync`) records the re-sync owed first (a crash once
/// the new slot exists must still re-sync) and wakes the re-sync task after; for a gap the
/// operator accepted, leaves the targets to `synapse repair fix`. Either way stream and webhook
/// readers are told by a gap mark in the log, and the new slot is recorded as the log's own.
pub(crate) async fn accept_gap(
    capture: &Capture,
    log: &SourceLog,
    history: &WriterState,
    gap: &CaptureError,
    resync: Option<&Notify>,
) -> Result<(), CaptureError> {
    let node = &capture.config().node;
    match resync {
        Some(_) => {
            tracing::warn!(source = %node, code = gap.code(), error = %chain(gap), "crossing the gap (on_gap: resync): the targets are re-synced next");
            log.commit_consumer(RESYNC_MARK, history.next_offset).await?;
        }
        None => {
            tracing::warn!(source = %node, code = gap.code(), error = %chain(gap), "crossing the gap the operator accepted: `synapse repair fix` restores what it lost on the targets");
        }
    }
    // Stream and webhook readers learn of the gap from this mark, in order; a retry after a
    // failure below finds it already written (nothing was captured since).
    let after = history.last_commit_end.unwrap_or_default();
    let marks = log.resync_marks().await?;
    if marks.last().is_none_or(|(_, m)| m.after != after) {
        let (reason, source_wal) = match gap {
            CaptureError::Gap { what, wal_now, .. } => (what.clone(), wal_now.parse().ok()),
            other => (other.to_string(), None),
        };
        let mark = ResyncMark { after, source_wal, found_at_us: synapse_schemas::unix_micros_now(), reason };
        log.append(vec![LogRecord::Resync(mark)]).await?;
    }
    capture.replace_slot(history, log).await?;
    metrics::counter!("synapse_gaps_crossed_total", "source" => node.clone(), "resync" => resync.is_some().to_string())
        .increment(1);
    if let Some(wake) = resync {
        metrics::counter!("synapse_resyncs_total", "source" => node.clone()).increment(1);
        wake.notify_one();
    }
    Ok(())
}

/// The slot-lag policy of a source: while its slot holds more WAL than `max_slot_lag_bytes`, or
/// its newest captured activity is older than `max_slot_lag_secs`, a warning is logged (once
/// per crossing), shown next to the capture in `/readyz` and `synapse_slot_lag_over_limit` is 1.
pub(crate) async fn watch_slot_lag(
    source: SourceConfig,
    stats: Arc<CaptureStats>,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ComponentFailed> {
    use std::sync::atomic::Ordering;
    let component = format!("capture/{}", source.name);
    let mut over = false;
    let mut sd = shutdown;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = sd.wait_for(|s| *s) => return Ok(()),
        }
        let bytes = stats.slot_lag_bytes.load(Ordering::Relaxed).max(0) as u64;
        let secs = stats.lag_seconds();
        let mut reasons = Vec::new();
        if let Some(max) = source.max_slot_lag_bytes.filter(|m| bytes > *m) {
            reasons.push(format!("the slot holds {bytes} bytes of WAL, over max_slot_lag_bytes {max}"));
        }
        if let Some(max) = source.max_slot_lag_secs.filter(|m| secs > *m) {
            reasons.push(format!("the newest captured change is {secs:.0} s old, over max_slot_lag_secs {max}"));
        }
        metrics::gauge!("synapse_slot_lag_over_limit", "source" => source.name.clone()).set(if reasons.is_empty() {
            0.0
        } else {
            1.0
        });
        if reasons.is_empty() {
            if over {
                tracing::info!(source = %source.name, "slot lag back under its limits");
                health.note(&component, None);
            }
            over = false;
            continue;
        }
        let note = format!(
            "{}; the source keeps this WAL until synapse confirms it — check that the capture runs and keeps up; \
             max_slot_wal_keep_size on the source bounds it (a slot past it is invalidated: a gap, CAP011)",
            reasons.join("; ")
        );
        if !over {
            tracing::warn!(source = %source.name, bytes, secs, "{note}");
        }
        over = true;
        health.note(&component, Some(note));
    }
}

/// The task that pays a source's owed re-sync (see [`RESYNC_MARK`]): once the slot exists
/// (the check's cut needs the capture streaming), and again whenever the capture crosses a
/// gap. Shown as `resync/<source>: resyncing` in /readyz while it runs.
pub(crate) fn spawn_resync(
    shared: &Shared,
    source: &SourceConfig,
    capture: &CaptureConfig,
    (mut tables_rx, mut slot_rx): (TablesWatch, watch::Receiver<Option<()>>),
    wake: Arc<Notify>,
    tasks: &mut JoinSet<Result<(), ComponentFailed>>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let config = &shared.config;
    let mut targets = Vec::new();
    for t in config.targets.iter().filter(|t| config.sources_of(t).any(|s| s.name == source.name)) {
        let pg = t.url.pg_config().map_err(anyhow::Error::msg)?;
        targets.push(crate::repair::ResyncTarget { name: t.name.clone(), pg, shard: t.shard.clone() });
    }
    let Some(log) = shared.logs.get(&source.name).cloned() else { return Ok(()) };
    let (h, sd, name, pg) = (shared.health.clone(), shutdown.clone(), source.name.clone(), capture.source.clone());
    let component = format!("resync/{name}");
    tasks.spawn(async move {
        loop {
            if ready(&mut slot_rx, &sd).await.is_none() {
                return Ok(());
            }
            let Some(tables) = ready(&mut tables_rx, &sd).await else { return Ok(()) };
            let Some(owed) = supervise(&component, &h, &sd, || log.consumer_position(RESYNC_MARK)).await? else {
                return Ok(());
            };
            if let Some(at) = owed {
                h.set(&component, ComponentState::Resyncing);
                let names: Vec<String> = tables.iter().map(|t| t.display()).collect();
                tracing::warn!(source = %name, gap_at_offset = at, tables = names.len(), "re-syncing the targets after a gap");
                let run = || crate::repair::resync_targets((&name, &pg), &targets, &names);
                let Some(rows) = supervise(&component, &h, &sd, run).await? else { return Ok(()) };
                if supervise(&component, &h, &sd, || log.remove_consumer(RESYNC_MARK)).await?.is_none() {
                    return Ok(());
                }
                tracing::info!(source = %name, rows_changed = rows, "re-sync done: every target holds the source's rows");
            }
            // Tables that joined the capture while it ran, holding rows the log lacks.
            for t in &targets {
                let (target, target_pg) = (&t.name, &t.pg);
                let Some((owed, since)) = supervise(&component, &h, &sd, || owed_copies(target_pg, &name)).await?
                else {
                    return Ok(());
                };
                if owed.is_empty() {
                    continue;
                }
                h.set(&component, ComponentState::Resyncing);
                tracing::info!(source = %name, target, tables = ?owed, "copying tables that joined the capture holding rows");
                let one = [t.clone()];
                let run = || crate::repair::resync_targets((&name, &pg), &one, &owed);
                let Some(rows) = supervise(&component, &h, &sd, run).await? else { return Ok(()) };
                let done = || copies_made(target_pg, &name, &owed, &since);
                if supervise(&component, &h, &sd, done).await?.is_none() {
                    return Ok(());
                }
                metrics::counter!("synapse_owed_copies_total", "source" => name.clone(), "target" => target.clone())
                    .increment(owed.len() as u64);
                tracing::info!(source = %name, target, tables = ?owed, rows_changed = rows, "owed copies made");
            }
            h.forget(&component);
            let mut sd2 = sd.clone();
            tokio::select! {
                _ = wake.notified() => {}
                // Owed copies are recorded by the appliers (which wake this), on the targets.
                _ = tokio::time::sleep(OWED_COPY_POLL) => {}
                _ = sd2.wait_for(|s| *s) => return Ok(()),
            }
        }
    });
    Ok(())
}

/// The tables `target` owes a copy of for `source` (`schema.table`), and when the latest was
/// marked owed (one marked again after it is owed again).
async fn owed_copies(target: &synapse_postgres::PgConfig, source: &str) -> Result<(Vec<String>, String), ApplyError> {
    let client = synapse_apply::connect_target(target).await?;
    let rows = client
        .query(
            "SELECT schema_name || '.' || table_name, (max(updated_at) OVER ())::text FROM synapse.table_sync
             WHERE source_node = $1 AND state = 'owed' ORDER BY 1",
            &[&source],
        )
        .await;
    match rows {
        Ok(rows) => {
            let since = rows.first().map(|r| r.get(1)).unwrap_or_default();
            Ok((rows.iter().map(|r| r.get(0)).collect(), since))
        }
        // Before its applier set the target up, a target owes nothing.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            Ok((Vec::new(), String::new()))
        }
        Err(e) => Err(ApplyError::target("reading the copies owed")(e)),
    }
}

/// Marks `tables` copied on `target`, unless marked owed again after `since`.
async fn copies_made(
    target: &synapse_postgres::PgConfig,
    source: &str,
    tables: &[String],
    since: &str,
) -> Result<(), ApplyError> {
    let client = synapse_apply::connect_target(target).await?;
    client
        .execute(
            "UPDATE synapse.table_sync SET state = 'ready', updated_at = now()
             WHERE source_node = $1 AND schema_name || '.' || table_name = ANY($2) AND state = 'owed'
               AND updated_at <= $3::text::timestamptz",
            &[&source, &tables, &since],
        )
        .await
        .map_err(ApplyError::target("recording the copies made"))?;
    Ok(())
}
