//! A node joining a running mesh from a donor, while every node keeps writing.
//!
//! ```text
//!  donor A                                  joining node D (one transaction)
//!  temporary slot, EXPORT_SNAPSHOT ─ cp ──▶ mesh tables           (COPY, rows as of cp)
//!  synapse.row_version (in the snapshot) ─▶ synapse.row_version   (every row's version)
//!  synapse.applied (in the snapshot) ─────▶ synapse.applied       (where D starts per log)
//!                                           synapse.table_sync    (A's log: from cp on)
//!                                           synapse.mesh_membership = member
//! ```
//!
//! Guarantees, given the donor is a member and the caller read `donor_log_end` (the donor's
//! log end) before calling [`copy`]:
//! * **Nothing missed, nothing twice.** The copy shows exactly the commits before the
//!   snapshot's consistent point `cp`. The donor's own changes reach D from its log from
//!   `donor_log_end` on, each table applying only commits at or past `cp` (records before
//!   `donor_log_end` committed before the slot existed, so before `cp`). Every other node's
//!   changes reach D from the position the donor had applied at the snapshot — read inside the
//!   snapshot, and written by the donor's applier in the same transaction as the rows.
//! * **Causality kept.** Each row's version (vector, clock, column stamps, counter totals, set
//!   dots, tombstones and their purge marks) is copied with it, so D resolves later changes as
//!   the donor would, and rows older than the mesh stay a shared baseline.
//! * **Atomic and resumable.** Rows, versions, positions and the `member` state commit in one
//!   transaction on D: after a crash D holds none of it and the join starts over.
//! * **Not captured as D's writes.** The copy writes as a replica (no trigger fires) with a
//!   replication origin, so D's capture, once it exists, never sends the copy to the others.

use super::*;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use synapse_capture::snapshot::SnapshotSession;
use synapse_schemas::Lsn;

/// Where a node stands in its mesh (its own row of `synapse.mesh_membership`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// Never part of this mesh: nothing of SynapseDB's on it.
    New,
    /// Set up as a mesh node by a release before membership was recorded: a member.
    Installed,
    /// A join from `donor` began and has not committed.
    Joining {
        donor: String,
    },
    Member,
    Left,
}

/// The membership of node `node` as recorded on it (its node schema must be current).
pub async fn membership(client: &Client, node: &str) -> Result<Membership, ApplyError> {
    let row = client
        .query_opt("SELECT state, donor FROM synapse.mesh_membership WHERE node = $1", &[&node])
        .await
        .map_err(ApplyError::target("reading the mesh membership"))?;
    Ok(match row {
        Some(r) => match r.get::<_, &str>(0) {
            "joining" => Membership::Joining { donor: r.get::<_, Option<String>>(1).unwrap_or_default() },
            "left" => Membership::Left,
            _ => Membership::Member,
        },
        None => {
            let installed: bool = client
                .query_one("SELECT EXISTS (SELECT 1 FROM synapse.mesh_tables)", &[])
                .await
                .map_err(ApplyError::target("reading the mesh membership"))?
                .get(0);
            if installed {
                Membership::Installed
            } else {
                Membership::New
            }
        }
    })
}

/// Records node `node` (id `id`) as `state` (`joining` from `donor`, `member` or `left`).
pub async fn record_membership(
    client: &Client,
    node: &str,
    id: NodeId,
    state: &str,
    donor: Option<&str>,
) -> Result<(), ApplyError> {
    client
        .execute(
            "INSERT INTO synapse.mesh_membership (node, node_id, state, donor, joined_at, left_at)
             VALUES ($1, $2, $3, $4, CASE WHEN $3 = 'member' THEN now() END, CASE WHEN $3 = 'left' THEN now() END)
             ON CONFLICT (node) DO UPDATE SET node_id = excluded.node_id, state = excluded.state,
                 donor = coalesce(excluded.donor, synapse.mesh_membership.donor),
                 started_at = CASE WHEN excluded.state = 'joining' THEN now() ELSE synapse.mesh_membership.started_at END,
                 joined_at = coalesce(excluded.joined_at, synapse.mesh_membership.joined_at),
                 left_at = excluded.left_at",
            &[&node, &i32::from(id.0), &state, &donor],
        )
        .await
        .map_err(ApplyError::target("recording the mesh membership"))?;
    Ok(())
}

/// Live figures of one join, for the admin API, metrics and the CLI's progress bar.
#[derive(Debug, Default)]
pub struct JoinProgress {
    pub tables_total: AtomicU64,
    pub tables_done: AtomicU64,
    pub rows_copied: AtomicU64,
    /// The snapshot's consistent point once taken (0 before).
    pub snapshot_lsn: AtomicU64,
}

/// What a join needs to know.
pub struct JoinSpec<'a> {
    pub node: &'a str,
    pub target: &'a synapse_postgres::PgConfig,
    pub donor: &'a str,
    /// The donor's connection (a replication connection is opened on it for the snapshot).
    pub donor_source: &'a synapse_postgres::PgConfig,
    /// Names the temporary slot (the donor's slot name).
    pub slot_hint: &'a str,
    /// The mesh tables, `schema.table`.
    pub tables: &'a [String],
    /// The nodes whose logs `node` applies.
    pub sources: &'a [String],
    /// The donor's log end, read before calling [`copy`].
    pub donor_log_end: u64,
}

/// What a finished join copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinReport {
    pub rows: u64,
    pub versions: u64,
    pub snapshot_lsn: Lsn,
    /// Per source log, the offset `node` applies from.
    pub starts: Vec<(String, u64)>,
}

/// The positions node `donor` had applied, as (next offset, commit LSN) per source log.
async fn applied_positions(client: &Client) -> Result<HashMap<String, (i64, String)>, ApplyError> {
    let rows = client
        .query("SELECT source_node, next_offset, commit_lsn::text FROM synapse.applied", &[])
        .await
        .map_err(ApplyError::target("reading the donor's applied positions in its snapshot"))?;
    Ok(rows.into_iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
}

/// Creates the mesh tables `node` lacks as the donor has them, and checks that those it has
/// hold no rows: a joining node starts empty, or its rows would be neither versioned nor on the
/// other nodes. Returns the tables it created.
pub async fn prepare_tables(
    donor: &Client,
    node: &Client,
    name: &str,
    tables: &[String],
) -> Result<Vec<String>, ApplyError> {
    let mut missing = Vec::new();
    for t in tables {
        let exists: bool = node
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[t])
            .await
            .map_err(ApplyError::target(format!("looking up {t}")))?
            .get(0);
        if !exists {
            missing.push(t.clone());
        }
    }
    if !missing.is_empty() {
        let statements = synapse_postgres::table_ddl::create_statements(donor, &missing)
            .await
            .map_err(ApplyError::target("reading the mesh tables' definitions on the donor"))?;
        // SynapseDB's own doing, not a schema change of the application's to capture.
        let sql = format!("BEGIN; SET LOCAL synapse.own_ddl = on; {}; COMMIT", statements.join(";\n"));
        node.batch_execute(&sql).await.map_err(|e| ApplyError::Join {
            node: name.to_owned(),
            message: format!(
                "creating {} as the donor has them failed: {} (statements: {})",
                missing.join(", "),
                e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string()),
                statements.join("; ")
            ),
        })?;
        tracing::info!(tables = %missing.join(", "), "created the mesh tables the joining node lacked");
    }
    for t in tables {
        let rows: bool = node
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {})", quoted_name(t)), &[])
            .await
            .map_err(ApplyError::target(format!("checking that {t} is empty")))?
            .get(0);
        if rows {
            return Err(ApplyError::Join {
                node: name.to_owned(),
                message: format!(
                    "table {t} holds rows: a joining node starts empty (the join copies every row, with its version, from the donor)"
                ),
            });
        }
    }
    Ok(missing)
}

/// Copies the mesh tables and their versions from the donor's snapshot into the joining node
/// and records where it applies each source log from (see the module's guarantees).
pub async fn copy(spec: &JoinSpec<'_>, progress: &JoinProgress) -> Result<JoinReport, ApplyError> {
    let session = SnapshotSession::begin(spec.donor_source, spec.slot_hint).await.map_err(ApplyError::Copy)?;
    let cp = session.consistent_point;
    progress.snapshot_lsn.store(cp.0, Ordering::Relaxed);
    let src = session.connect().await.map_err(ApplyError::Copy)?;
    let applied = applied_positions(&src).await?;
    let dst = crate::connect_target(spec.target).await?;
    crate::replica_session(&dst, &format!("{}_join", crate::origin_name(spec.donor, spec.target))).await?;
    dst.batch_execute("BEGIN").await.map_err(ApplyError::target("beginning the join's transaction"))?;
    let result = copy_in_transaction(spec, progress, &src, &dst, cp, &applied).await;
    match result {
        Ok(report) => {
            dst.batch_execute("COMMIT").await.map_err(ApplyError::target("committing the join"))?;
            Ok(report)
        }
        Err(e) => {
            let _ = dst.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn copy_in_transaction(
    spec: &JoinSpec<'_>,
    progress: &JoinProgress,
    src: &Client,
    dst: &Client,
    cp: Lsn,
    applied: &HashMap<String, (i64, String)>,
) -> Result<JoinReport, ApplyError> {
    progress.tables_total.store(spec.tables.len() as u64 + 1, Ordering::Relaxed);
    let mut names = Vec::new();
    let mut rows = 0;
    for t in spec.tables {
        let r = src
            .query_one(
                "SELECT n.nspname::text, c.relname::text, quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                        (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
                          WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped AND attgenerated = '')
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::text::regclass",
                &[t],
            )
            .await
            .map_err(ApplyError::target(format!("describing {t} on the donor")))?;
        let (quoted, cols): (String, String) = (r.get(2), r.get(3));
        names.push((r.get::<_, String>(0), r.get::<_, String>(1)));
        let n = copy_stream(
            src,
            dst,
            &format!("COPY {quoted} ({cols}) TO STDOUT"),
            &format!("COPY {quoted} ({cols}) FROM STDIN"),
            t,
            progress,
        )
        .await?;
        rows += n;
        progress.tables_done.fetch_add(1, Ordering::Relaxed);
        tracing::info!(table = %t, rows = n, "join: table copied");
    }
    let listed: Vec<String> = spec.tables.iter().map(|t| quote::literal(t)).collect();
    let version_cols = "tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols, purge_round";
    dst.execute("DELETE FROM synapse.row_version WHERE tbl = ANY($1)", &[&spec.tables])
        .await
        .map_err(ApplyError::target("clearing row versions before the join's copy"))?;
    let versions = copy_stream(
        src,
        dst,
        &format!(
            "COPY (SELECT {version_cols} FROM synapse.row_version WHERE tbl IN ({})) TO STDOUT",
            listed.join(", ")
        ),
        &format!("COPY synapse.row_version ({version_cols}) FROM STDIN"),
        "synapse.row_version",
        progress,
    )
    .await?;
    progress.tables_done.fetch_add(1, Ordering::Relaxed);
    // Rounds whose marked tombstones count as no version: as on the donor.
    let rounds: Vec<i64> = src
        .query("SELECT round FROM synapse.purge_rounds", &[])
        .await
        .map_err(ApplyError::target("reading the donor's purge rounds"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    dst.execute(
        "INSERT INTO synapse.purge_rounds (round) SELECT unnest($1::int8[]) ON CONFLICT DO NOTHING",
        &[&rounds],
    )
    .await
    .map_err(ApplyError::target("recording the donor's purge rounds"))?;
    let mut starts = Vec::new();
    let upsert = "INSERT INTO synapse.applied (source_node, next_offset, commit_lsn, updated_at) VALUES ($1, $2, $3::text::pg_lsn, now())
                  ON CONFLICT (source_node) DO UPDATE SET next_offset = excluded.next_offset, commit_lsn = excluded.commit_lsn,
                      commit_time = NULL, updated_at = now()";
    for s in spec.sources {
        let start = if s == spec.donor {
            let at = spec.donor_log_end as i64;
            dst.execute(upsert, &[s, &at, &cp.to_string()])
                .await
                .map_err(ApplyError::target("recording a start position"))?;
            let mut synced = names.clone();
            synced.push((ROW_VERSION_SCHEMA.to_owned(), ROW_VERSION_TABLE.to_owned()));
            for (schema, table) in &synced {
                dst.execute(
                    "INSERT INTO synapse.table_sync (source_node, schema_name, table_name, state, sync_lsn)
                     VALUES ($1, $2, $3, 'ready', $4::text::pg_lsn)
                     ON CONFLICT (source_node, schema_name, table_name) DO UPDATE SET state = 'ready', sync_lsn = excluded.sync_lsn, updated_at = now()",
                    &[s, schema, table, &cp.to_string()],
                )
                .await
                .map_err(ApplyError::target("recording the tables' sync point"))?;
            }
            at
        } else if let Some((at, lsn)) = applied.get(s) {
            dst.execute(upsert, &[s, at, lsn]).await.map_err(ApplyError::target("recording a start position"))?;
            *at
        } else {
            // The donor had applied nothing of it: neither does this node.
            dst.execute("DELETE FROM synapse.applied WHERE source_node = $1", &[s])
                .await
                .map_err(ApplyError::target("recording a start position"))?;
            0
        };
        starts.push((s.clone(), start as u64));
    }
    dst.execute(
        "UPDATE synapse.mesh_membership SET state = 'member', snapshot_lsn = $2::text::pg_lsn, rows_copied = $3, joined_at = now()
         WHERE node = $1",
        &[&spec.node, &cp.to_string(), &(rows as i64)],
    )
    .await
    .map_err(ApplyError::target("recording the node a member"))?;
    Ok(JoinReport { rows, versions, snapshot_lsn: cp, starts })
}

/// Streams one COPY from the donor's snapshot into the joining node's transaction.
async fn copy_stream(
    src: &Client,
    dst: &Client,
    out: &str,
    into: &str,
    what: &str,
    progress: &JoinProgress,
) -> Result<u64, ApplyError> {
    let stream = src.copy_out(out).await.map_err(ApplyError::target(format!("reading {what} on the donor")))?;
    let sink =
        dst.copy_in::<_, bytes::Bytes>(into).await.map_err(ApplyError::target(format!("copying into {what}")))?;
    futures_util::pin_mut!(stream);
    futures_util::pin_mut!(sink);
    let mut lines = 0u64;
    while let Some(data) = stream.next().await {
        let data = data.map_err(ApplyError::target(format!("reading {what} on the donor")))?;
        // One message per row in text COPY: the count is the progress.
        lines += 1;
        if lines.is_multiple_of(1024) {
            progress.rows_copied.fetch_add(1024, Ordering::Relaxed);
        }
        sink.feed(data).await.map_err(ApplyError::target(format!("copying into {what}")))?;
    }
    let n = sink.finish().await.map_err(ApplyError::target(format!("copying into {what}")))?;
    progress.rows_copied.fetch_add(lines % 1024, Ordering::Relaxed);
    Ok(n)
}
