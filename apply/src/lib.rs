//! Apply: replay one source node's change log into a target PostgreSQL, exactly once.
//!
//! ```text
//!  the log ──read(from)──▶ Applier ──▶ target PostgreSQL
//!                           │  BEGIN; ⟨changes of N whole source txns, batched per table⟩;
//!                           │  UPSERT synapse.applied(node, next_offset); COMMIT
//!                           └─ position read back from synapse.applied on (re)start
//! ```
//!
//! [`Applier`] is the boundary type. Its guarantees:
//! * **Exactly-once effect**: the log position is stored in the same target transaction as the
//!   changes, so after any crash the applier resumes exactly after the last committed change.
//! * **Atomicity**: a source transaction is never split across target transactions; several
//!   may be grouped into one (up to `max_txns_per_commit`) for throughput.
//! * **Ordering**: source transactions apply in commit order; within a target transaction,
//!   changes to one table keep their order (see `batch.rs` for why tables may interleave).
//! * **Loop prevention**: the session runs with `session_replication_role = replica` and a
//!   replication origin `synapse_<node>@<target database>`, so a capture on the target can tell applied changes
//!   from local ones.
//! * **Retries**: deadlocks, serialization failures and connection loss roll back and retry
//!   from the stored position (see `ApplyError::is_transient`).
//! * **Concurrency**: one applier per (source node, target), enforced in the target: a session
//!   holds an advisory lock for its source, and a second applier waits (`APP006`, transient)
//!   until the first stops or its connection closes.

mod batch;
pub mod copy_binary;
mod error;
pub mod initial_copy;
pub mod mesh;
mod pipeline;
mod resume;
mod schema_change;
pub mod shards;
pub mod target;
pub mod tombstones;

pub use error::ApplyError;

use batch::PendingChanges;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synapse_log::{ChangeLog, Offset};
use synapse_schemas::{Begin, Commit, LogRecord, Lsn, Relation, RelationKey};
use target::TargetTable;
use tokio::sync::watch;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Statement};
use tracing::Instrument;

/// When the log has nothing more, the reader waits this long before reporting "caught up" (the
/// applier then marks everything read as applied, also when it held no transaction). Groups do
/// not wait for it: one commits as soon as nothing more is ready.
const LINGER: Duration = Duration::from_millis(2);
/// A group is committed once it is this old, even while more keeps arriving (bounds latency
/// while a backlog is read). Otherwise a group ends when the reader has nothing more ready
/// (adaptive group commit): under steady load, waiting for a group age instead (10 ms) made
/// commit → applied p50 7.4 ms and p99 51 ms at 5k txns/s (bench P4).
const MAX_GROUP_AGE: Duration = Duration::from_millis(200);

/// Reads the log ahead of the applier on its own task, so decoding the next records overlaps
/// with the target executing the current ones. An empty batch means "caught up". It reads
/// early (`ChangeLog::read_early`): a batch is applied while the log still writes it, not after
/// its fsync; the stored commit LSN makes that safe (see `resume.rs`).
struct ReadAhead {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<(Offset, LogRecord)>, ApplyError>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadAhead {
    fn spawn<L: ChangeLog + Clone>(log: &L, from: Offset, batch: usize, labels: &[(&'static str, String)]) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let log = log.clone();
        let read_seconds = metrics::histogram!("synapse_apply_log_read_seconds", labels);
        let task = tokio::spawn(async move {
            let mut pos = from;
            let mut announced = false;
            let epoch = log.early_epoch();
            loop {
                let started = Instant::now();
                let records = match log.read_early(pos, batch, epoch).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                read_seconds.record(started.elapsed().as_secs_f64());
                if let Some((last, _)) = records.last() {
                    pos = last + 1;
                    announced = false;
                    if tx.send(Ok(records)).await.is_err() {
                        return;
                    }
                } else if !announced {
                    log.wait_early(pos, LINGER).await;
                    if log.early_head() <= pos {
                        announced = true;
                        if tx.send(Ok(Vec::new())).await.is_err() {
                            return;
                        }
                    }
                } else {
                    log.wait_early(pos, Duration::from_millis(500)).await;
                }
            }
        });
        ReadAhead { rx, task }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub mod defaults {
    /// Source transactions per target transaction: enough to amortise the commit (and its fsync)
    /// of small OLTP transactions; large ones are never split regardless.
    pub const MAX_TXNS_PER_COMMIT: usize = 2_000;
    /// Rows queued before statements are sent, bounding memory for huge transactions.
    pub const MAX_ROWS_PER_FLUSH: usize = 20_000;
    /// Records per log read.
    pub const READ_BATCH: usize = 8_192;
}

#[derive(Clone, Debug)]
pub struct ApplyConfig {
    /// The source node whose stream this applies (names the position row and the origin).
    pub node: String,
    pub target: synapse_postgres::PgConfig,
    /// Names this applier among the log's consumers (retention).
    pub consumer: String,
    pub max_txns_per_commit: usize,
    pub max_rows_per_flush: usize,
    pub read_batch: usize,
    /// Set when the target is a writable node of a mesh: changes are resolved against its rows
    /// (see [`mesh`]) instead of written as they come.
    pub mesh: Option<MeshApply>,
    /// What the target does with the source's schema changes.
    pub ddl: DdlPolicy,
    /// Woken after a commit that recorded a copy owed (a table joined holding rows): the
    /// runtime's task that makes such copies.
    pub copies_owed: Option<Arc<tokio::sync::Notify>>,
    /// Set when the target is one shard of a shard set: only the rows it owns are applied.
    pub shard: Option<shards::ShardAssignment>,
    /// `false`: group commits do not wait for the target's WAL flush (PostgreSQL's own
    /// subscriptions default to this). Safe for exactly-once: a target crash loses the newest
    /// groups *with* their stored position, so they are applied again from the log; the
    /// position reported to the log for retention is always one committed durably (see
    /// `Session::commit`). `true` (the default here; the runtime's targets default to
    /// `false`): every group commit is flushed, e.g. for a node whose own capture forwards what
    /// it applies, which sees it only once flushed.
    pub synchronous_commit: bool,
}

/// What a target does with a source's schema change (the source's `ddl:` setting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DdlPolicy {
    /// Runs it in its place, with the rows (the default).
    #[default]
    Apply,
    /// Leaves the targets' schemas to the operator: the change reaches consumers of the stream
    /// only; a target table that lacks a new column gains it (untyped defaults aside) when the
    /// first row carrying it arrives.
    Events,
    /// Parks each target at the change (`APP009`), for the operator to make it there by hand and
    /// record it in `synapse.schema_skips`: migrations reviewed per target.
    Stop,
}

/// What an applier into a mesh node needs: the mesh tables and their column strategies.
#[derive(Clone, Debug, Default)]
pub struct MeshApply {
    /// `schema.table` → per-column strategies (tables without an entry: all `lww`).
    pub policies: HashMap<String, synapse_resolver::TablePolicy>,
    /// The tables as installed on the target (key and columns).
    pub tables: HashMap<String, mesh::MeshTable>,
    /// The target's own id in the mesh (announces its unique-key burials).
    pub node: synapse_resolver::NodeId,
    /// The target's own name: a schema change a hub sends back to the node it came from (its
    /// transaction's replication origin names this node) is not run a second time.
    pub name: String,
    /// On the hub of a hub-and-spoke mesh, its capture's publication: each schema change it
    /// applies is emitted again there, as its own event trigger would have, so the hub passes
    /// it on to the other spokes with the rows it applied (its event triggers do not fire for
    /// an applier).
    pub forward_ddl: Option<String>,
}

impl ApplyConfig {
    /// The labels of this applier's metrics: `source` (the node) and `target` (the consumer
    /// name without its `apply-` prefix).
    pub fn metric_labels(&self) -> [(&'static str, String); 2] {
        let target = self.consumer.strip_prefix("apply-").unwrap_or(&self.consumer).to_owned();
        [("source", self.node.clone()), ("target", target)]
    }

    pub fn new(node: &str, target: synapse_postgres::PgConfig, consumer: &str) -> Self {
        ApplyConfig {
            node: node.to_owned(),
            target,
            consumer: consumer.to_owned(),
            max_txns_per_commit: defaults::MAX_TXNS_PER_COMMIT,
            max_rows_per_flush: defaults::MAX_ROWS_PER_FLUSH,
            read_batch: defaults::READ_BATCH,
            mesh: None,
            ddl: DdlPolicy::Apply,
            copies_owed: None,
            shard: None,
            synchronous_commit: true,
        }
    }
}

#[derive(Debug, Default)]
pub struct ApplyStats {
    pub transactions: AtomicU64,
    pub rows: AtomicU64,
    /// Every log record below this offset is applied on the target (committed there).
    pub next_offset: AtomicU64,
    pub applied_lsn: AtomicU64,
    pub last_commit_time_us: AtomicI64,
    pub rows_copied: AtomicU64,
    /// The initial copy's chunks (page ranges of the source tables): how many, how many done
    /// (progress and ETA for `synapse status` and the console).
    pub copy_chunks: AtomicU64,
    pub copy_chunks_done: AtomicU64,
    /// Streamed inserts written through COPY in binary, and in text (a table with a type or
    /// a value that has no binary form, `copy_binary.rs`).
    pub copied_binary: AtomicU64,
    pub copied_text: AtomicU64,
}

impl ApplyStats {
    /// Seconds since the source committed the newest transaction applied here, while `behind`
    /// log records remain to apply (0 when none do: nothing waits).
    pub fn lag_seconds(&self, behind: u64) -> f64 {
        let t = self.last_commit_time_us.load(Ordering::Relaxed);
        if behind == 0 || t == 0 {
            return 0.0;
        }
        ((synapse_schemas::unix_micros_now() - t) as f64 / 1e6).max(0.0)
    }
}

/// The applier of one source node's stream into one target. See the crate docs.
pub struct Applier {
    config: ApplyConfig,
    stats: Arc<ApplyStats>,
    /// Offset ranges of transactions the log marked `Discarded`, skipped on re-read.
    discarded: Mutex<Vec<(Offset, Offset)>>,
    any_discarded: std::sync::atomic::AtomicBool,
    /// [`ApplyConfig::metric_labels`], made once: the metrics of every flush and commit use them.
    labels: [(&'static str, String); 2],
    /// `labels` plus `format` = binary, text (`synapse_apply_copy_rows_total`), made once.
    copy_labels: [[(&'static str, String); 3]; 2],
}

pub async fn connect_target(config: &synapse_postgres::PgConfig) -> Result<Client, ApplyError> {
    synapse_postgres::connect(config, "target").await.map_err(ApplyError::target("connecting to the target"))
}

/// The replication origin of an applier of `node` into `target` (see
/// [`synapse_schemas::applied_origin`]).
pub fn origin_name(node: &str, target: &synapse_postgres::PgConfig) -> String {
    synapse_schemas::applied_origin(node, target.get_dbname().or(target.get_user()).unwrap_or("postgres"))
}

/// Makes `client` a session that writes as SynapseDB: triggers and rules of the replica role,
/// and every commit stamped with replication origin `origin` (created if missing), so a capture
/// on this node can tell these writes from the node's own.
pub async fn replica_session(client: &tokio_postgres::Client, origin: &str) -> Result<(), ApplyError> {
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica;
             SELECT pg_replication_origin_create('{origin}') WHERE NOT EXISTS
                 (SELECT 1 FROM pg_replication_origin WHERE roname = '{origin}');"
        ))
        .await
        .map_err(ApplyError::target("setting up a replica session"))?;
    // A previous session of ours may hold the origin for a moment after a crash, until the
    // server notices its connection is gone: SQLSTATE 55006, retried by the supervisor.
    client
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .map_err(ApplyError::target(format!("binding replication origin {origin}")))?;
    Ok(())
}

/// A relation version, the target table its changes go to, and the LSN from which its changes
/// are new to the target (set when the initial copy took the table at a snapshot; `Lsn::MAX`
/// while a copy is unfinished).
struct Bound {
    rel: Arc<Relation>,
    table: Arc<TargetTable>,
    apply_from: Option<Lsn>,
    /// Which of its rows this shard holds (`None`: not a shard; every row).
    route: Option<Arc<shards::Route>>,
}

struct OpenTxn {
    begin: Begin,
    begin_offset: Offset,
}

struct Session<'a, L> {
    applier: &'a Applier,
    log: &'a L,
    client: Arc<Client>,
    /// Statements sent to `client` whose results are read later (at the group's commit).
    pipeline: pipeline::Pipeline,
    statements: HashMap<String, Statement>,
    tables: HashMap<RelationKey, Bound>,
    sync: HashMap<(String, String), (String, Option<Lsn>)>,
    pending: PendingChanges,
    /// Buffered changes of mesh tables (resolved at commit), when the target is a mesh node.
    mesh: Option<mesh::MeshBuffer>,
    in_target_txn: bool,
    /// The group being built queued unique-key burials in `synapse.burials`: announced once
    /// its commit is known (a group's flag moves to its [`InFlightCommit`]).
    burials_pending: bool,
    /// A connection without the replication origin, for announcing burials.
    announcer: Option<Client>,
    txns_in_group: usize,
    last_commit: Option<Commit>,
    committed_offset: Offset,
    /// The commit LSN of the last transaction in a committed target transaction (this session).
    committed_through: Option<Lsn>,
    last_consumer_commit: Instant,
    /// The position report to the log still running, if any (see `Session::report_position`).
    reporting: Option<tokio::task::JoinHandle<()>>,
    group_started: Instant,
    /// A schema change ran in this group: commit at its transaction's end (an enum's new
    /// value cannot be used in the transaction that added it; the target's locks go sooner).
    schema_changed: bool,
    /// This group recorded a copy owed: say so once it is committed.
    copy_owed: bool,
    /// With tracing on: when the open transaction's `Begin` was read, and the group's
    /// transactions (commit position, read at) whose apply spans its commit ends.
    txn_read_at: Option<std::time::SystemTime>,
    traced: Vec<(Lsn, std::time::SystemTime)>,
    /// The last group's commit, sent and not yet read: the next group goes out behind it.
    in_flight: Option<InFlightCommit>,
    /// [`POSITION_UPSERT`] and [`ORIGIN_PROGRESS`], prepared when the session starts: parsing
    /// and planning the upsert on every group cost the target ~0.04 ms of a five-row group's
    /// 0.27 ms (pgbench, BENCHMARKS.md stop 45).
    position: Statement,
    origin_progress: Statement,
}

/// The applied position, stored in the transaction of the changes it covers (`$1` node, `$2`
/// next offset, `$3` commit LSN, `$4` commit time in seconds since the Unix epoch).
const POSITION_UPSERT: &str =
    "INSERT INTO synapse.applied (source_node, next_offset, commit_lsn, commit_time, updated_at)
     VALUES ($1, $2, $3, to_timestamp($4::float8), now())
     ON CONFLICT (source_node) DO UPDATE SET next_offset = excluded.next_offset,
         commit_lsn = excluded.commit_lsn, commit_time = excluded.commit_time, updated_at = now()";
/// Puts the source's commit LSN and time into this transaction's commit record, so
/// PostgreSQL's own `pg_replication_origin_status` follows ours.
const ORIGIN_PROGRESS: &str = "SELECT pg_replication_origin_xact_setup($1, to_timestamp($2::float8))";

/// A group whose COMMIT was sent, and what becomes true once its result is read.
struct InFlightCommit {
    /// The pipeline's mark right after the COMMIT.
    mark: u64,
    next_offset: Offset,
    lsn: Lsn,
    commit_time_us: i64,
    txns: usize,
    report: bool,
    copy_owed: bool,
    /// It queued unique-key burials: announced once it is known committed (not before: the
    /// next group's burials, queued meanwhile, are not committed yet).
    burials: bool,
    traced: Vec<(Lsn, std::time::SystemTime)>,
    sent_at: Instant,
}

impl Applier {
    pub fn new(config: ApplyConfig) -> Self {
        Self::with_stats(config, Arc::default())
    }

    /// An applier reporting into `stats` (made before the applier, so they can be listed while
    /// it waits for what it needs).
    pub fn with_stats(config: ApplyConfig, stats: Arc<ApplyStats>) -> Self {
        let labels = config.metric_labels();
        let copy_labels = ["binary", "text"].map(|f| {
            let [a, b] = labels.clone();
            [a, b, ("format", f.to_owned())]
        });
        Applier {
            config,
            stats,
            discarded: Mutex::new(Vec::new()),
            any_discarded: Default::default(),
            labels,
            copy_labels,
        }
    }

    pub fn stats(&self) -> Arc<ApplyStats> {
        self.stats.clone()
    }

    /// Applies until `shutdown` turns true or an error occurs. Safe to call again after an error:
    /// it resumes from the position stored in the target.
    pub async fn run<L: ChangeLog + Clone>(&self, log: &L, shutdown: watch::Receiver<bool>) -> Result<(), ApplyError> {
        let span = tracing::info_span!("apply", node = %self.config.node, consumer = %self.config.consumer);
        self.run_session(log, shutdown).instrument(span).await
    }

    async fn run_session<L: ChangeLog + Clone>(
        &self,
        log: &L,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ApplyError> {
        let client = connect_target(&self.config.target).await?;
        target::setup_state(&client).await?;
        let origin = origin_name(&self.config.node, &self.config.target);
        // Before the origin: a second session's origin binding fails too (55006), but says
        // less about why.
        target::lock_applier(&client, &self.config.node).await?;
        replica_session(&client, &origin).await?;
        if !self.config.synchronous_commit {
            client
                .batch_execute("SET synchronous_commit = off")
                .await
                .map_err(ApplyError::target("setting synchronous_commit"))?;
        }
        let stored = target::load_position(&client, &self.config.node).await?;
        let resume::Resume { from: start, skip_through } = resume::resume_point(log, stored, &self.labels).await?;
        // Transactions committed at or before this LSN are applied here: the stored one, then
        // each one applied. A source's log holds its transactions in commit order, so one at or
        // below it is a replay (the log lost and rewrote records, see resume.rs) or a copy the
        // log holds twice (a producer retry on Kafka): passed over, never applied again.
        // (A realignment's `skip_through` is this same stored LSN.)
        let stored_floor = stored.map(|(_, lsn)| lsn).filter(|l| l.0 > 0);
        let mut applied_through = stored_floor;
        // Skips expected after a realignment are not duplicates: silent until the first
        // transaction past the floor.
        let mut realigning = skip_through.is_some();
        let sync = target::load_sync(&client, &self.config.node).await?;
        let position =
            client.prepare(POSITION_UPSERT).await.map_err(ApplyError::target("preparing the position upsert"))?;
        let origin_progress =
            client.prepare(ORIGIN_PROGRESS).await.map_err(ApplyError::target("preparing the origin progress call"))?;
        tracing::info!(next_offset = start, "applier resuming");
        let mut s = Session {
            applier: self,
            log,
            client: Arc::new(client),
            pipeline: pipeline::Pipeline::default(),
            statements: HashMap::new(),
            tables: HashMap::new(),
            sync,
            pending: PendingChanges::default(),
            mesh: self.config.mesh.as_ref().map(|m| mesh::MeshBuffer::new(&m.tables)),
            in_target_txn: false,
            burials_pending: false,
            announcer: None,
            txns_in_group: 0,
            last_commit: None,
            committed_offset: start,
            committed_through: None,
            last_consumer_commit: Instant::now(),
            reporting: None,
            group_started: Instant::now(),
            schema_changed: false,
            copy_owed: false,
            txn_read_at: None,
            traced: Vec::new(),
            in_flight: None,
            position,
            origin_progress,
        };
        // A crash may have left burials queued.
        s.announce_burials(true).await?;
        self.stats.next_offset.store(start, Ordering::Relaxed);
        let mut pos = start;
        let mut open: Option<OpenTxn> = None;
        let mut ahead = ReadAhead::spawn(log, start, self.config.read_batch, &self.labels);
        loop {
            if *shutdown.borrow() {
                if s.in_target_txn && open.is_none() {
                    s.commit(pos).await?;
                }
                return s.finish_commit().await;
            }
            let records = tokio::select! {
                r = ahead.rx.recv() => match r {
                    Some(r) => r?,
                    // The reader only stops early by panicking; report that.
                    None => match (&mut ahead.task).await {
                        Err(e) => return Err(ApplyError::Log(synapse_log::LogError::TaskFailed(e))),
                        Ok(()) => {
                            ahead = ReadAhead::spawn(log, pos, self.config.read_batch, &self.labels);
                            continue;
                        }
                    },
                },
                _ = shutdown.changed() => continue,
            };
            if records.is_empty() {
                // Caught up: what is grouped so far becomes visible on the target.
                if s.in_target_txn && open.is_none() {
                    s.commit(pos).await?;
                }
                s.finish_commit().await?;
                if !s.in_target_txn && open.is_none() {
                    // Everything before `pos` is applied (or was not for this target): what a
                    // read at a cut waits for, also when the last records held no transaction.
                    self.stats.next_offset.store(pos, Ordering::Relaxed);
                }
                s.report_lag(pos);
                continue;
            }
            let mut restart = false;
            for (offset, record) in records {
                pos = offset + 1;
                if self.is_discarded(offset) {
                    continue;
                }
                match record {
                    LogRecord::Begin(b) => {
                        if applied_through.is_some_and(|floor| b.commit_lsn <= floor) {
                            // Applied already: left unopened, so its records are passed over
                            // like those of a foreign table.
                            if !realigning {
                                tracing::warn!(offset, commit_lsn = %b.commit_lsn,
                                    "the log holds a transaction this target applied already (a duplicate write or a replay): passed over");
                                metrics::counter!("synapse_apply_duplicates_skipped_total", &self.labels).increment(1);
                            }
                            continue;
                        }
                        realigning = false;
                        if !s.in_target_txn && s.in_flight.as_ref().is_some_and(|c| c.burials) {
                            // Its burials are announced before this group takes any lock.
                            s.finish_commit().await?;
                        }
                        if !s.in_target_txn {
                            // Sent ahead: its result is read with the group's statements.
                            let client = s.client.clone();
                            s.pipeline
                                .send(async move {
                                    client
                                        .batch_execute("BEGIN")
                                        .await
                                        .map_err(ApplyError::target("beginning a target transaction"))
                                })
                                .await;
                            s.in_target_txn = true;
                            s.group_started = Instant::now();
                        }
                        if synapse_schemas::trace::enabled() {
                            s.txn_read_at = Some(std::time::SystemTime::now());
                        }
                        open = Some(OpenTxn { begin: b, begin_offset: offset });
                    }
                    LogRecord::Relation(_) => {} // registered in the log; looked up by key on use
                    LogRecord::Change(c) => {
                        let Some(t) = open.as_ref() else { continue };
                        let Some((rel, table, route)) = s.table(offset, c.relation, t.begin.commit_lsn).await? else {
                            continue;
                        };
                        // Values are indexed by the relation's columns: a damaged record must stop
                        // here, named, not index past the end further down.
                        let widths = c.after.iter().map(|a| a.len()).chain(c.before.iter().map(|(_, b)| b.len()));
                        if let Some(values) = widths.into_iter().find(|n| *n != rel.columns.len()) {
                            return Err(ApplyError::Malformed {
                                offset,
                                table: rel.name(),
                                values,
                                columns: rel.columns.len(),
                            });
                        }
                        let c = match (&route, &self.config.shard) {
                            (Some(route), Some(shard)) => match shard.route_change(route, &rel, offset, c)? {
                                Some(c) => c,
                                None => continue, // another shard's row
                            },
                            _ => c,
                        };
                        if let Some(buffer) = s.mesh.as_mut() {
                            if buffer.table(&rel.name()).is_some() || mesh::is_row_version(&rel) {
                                buffer.push(&rel, c)?;
                                continue;
                            }
                        }
                        s.pending.push(&rel, &table, c);
                        if s.pending.rows() >= self.config.max_rows_per_flush {
                            s.flush().await?;
                        }
                    }
                    LogRecord::Truncate(tr) => {
                        let Some(t) = open.as_ref() else { continue };
                        s.flush().await?;
                        s.flush_mesh().await?;
                        let mut names = Vec::new();
                        for k in &tr.relations {
                            if let Some((_, table, _)) = s.table(offset, *k, t.begin.commit_lsn).await? {
                                names.push(table.name.clone());
                            }
                        }
                        if !names.is_empty() {
                            let sql = format!(
                                "TRUNCATE {}{}{}",
                                names.join(", "),
                                if tr.restart_identity { " RESTART IDENTITY" } else { "" },
                                if tr.cascade { " CASCADE" } else { "" }
                            );
                            s.client.batch_execute(&sql).await.map_err(ApplyError::target(format!("running {sql}")))?;
                        }
                    }
                    LogRecord::Commit(c) => {
                        if open.take().is_some() {
                            if let Some(at) = s.txn_read_at.take() {
                                s.traced.push((c.commit_lsn, at));
                            }
                            s.txns_in_group += 1;
                            applied_through = Some(c.commit_lsn);
                            s.last_commit = Some(c);
                            let mesh_full = s.mesh.as_ref().is_some_and(|m| m.rows() >= self.config.max_rows_per_flush);
                            let age = s.group_started.elapsed();
                            if s.txns_in_group >= self.config.max_txns_per_commit
                                || mesh_full
                                || age >= MAX_GROUP_AGE
                                || s.schema_changed
                            {
                                s.commit(pos).await?;
                            }
                        }
                    }
                    // The gap's re-sync repairs the target (runtime's `resync/<source>` task).
                    // LSNs after a gap may start over (another server): none is skipped by them.
                    LogRecord::Resync(_) => applied_through = None,
                    LogRecord::Schema(change) => {
                        if open.is_none() {
                            continue;
                        }
                        let origin = open.as_ref().and_then(|t| t.begin.origin.as_deref());
                        if s.is_own_echo(origin) {
                            tracing::debug!(offset, tag = %change.tag, "a schema change of this node's, sent back by the hub: ran here already");
                            continue;
                        }
                        // Rows of the old shape first, in this same target transaction.
                        s.flush().await?;
                        s.flush_mesh().await?;
                        let commit_lsn = open.as_ref().map(|t| t.begin.commit_lsn).unwrap_or_default();
                        s.schema_change(offset, commit_lsn, &change).await?;
                    }
                    LogRecord::Discarded { commit_lsn } => {
                        if let Some(t) = open.take() {
                            tracing::warn!(%commit_lsn, "the log discarded a partly written transaction; rolling back and re-reading");
                            self.discarded.lock().map(|mut d| d.push((t.begin_offset, offset))).ok();
                            self.any_discarded.store(true, Ordering::Relaxed);
                            s.rollback().await?;
                            pos = s.committed_offset;
                            // The group's transactions are rolled back with it: applied again.
                            applied_through = s.committed_through.or(stored_floor);
                            restart = true;
                            break;
                        }
                    }
                }
            }
            if restart {
                ahead = ReadAhead::spawn(log, pos, self.config.read_batch, &self.labels);
            } else if s.in_target_txn && open.is_none() && ahead.rx.is_empty() {
                // Nothing more is ready: what is grouped becomes visible now, and what arrives
                // while it commits joins the next group.
                s.commit(pos).await?;
            }
            s.report_lag(pos);
        }
    }

    fn is_discarded(&self, offset: Offset) -> bool {
        if !self.any_discarded.load(Ordering::Relaxed) {
            return false; // the common case, without taking the lock per record
        }
        self.discarded.lock().map(|d| d.iter().any(|(a, b)| (*a..=*b).contains(&offset))).unwrap_or(false)
    }
}

impl<L: ChangeLog + Clone> Session<'_, L> {
    /// The relation and target table for a change, or None when the change must be skipped
    /// because the initial copy already contains it.
    async fn table(
        &mut self,
        offset: Offset,
        key: RelationKey,
        commit_lsn: Lsn,
    ) -> Result<Option<(Arc<Relation>, Arc<TargetTable>, Option<Arc<shards::Route>>)>, ApplyError> {
        if !self.tables.contains_key(&key) {
            let rel = self.log.relation(key).await?.ok_or(ApplyError::UnknownRelation {
                offset,
                oid: key.oid,
                version: key.version,
            })?;
            let is_mesh = self.mesh.as_ref().is_some_and(|m| m.table(&rel.name()).is_some());
            let table = match target::ensure_table(&self.client, &rel, !is_mesh).await {
                Ok(t) => t,
                // Behind a BEGIN sent ahead: if that failed, it is the cause.
                Err(e) => return Err(self.pipeline.first_error(e).await),
            };
            if is_mesh {
                self.describe_mesh_table(&rel.name()).await?;
            }
            let apply_from = match self.sync.get(&(rel.schema.clone(), rel.table.clone())) {
                Some((state, lsn)) if state == "ready" => *lsn,
                // Joined the publication while running: streamed from then on, copied beside.
                Some((state, _)) if state == "owed" => None,
                Some(_) => Some(Lsn(u64::MAX)),
                None => None,
            };
            let route = match &self.applier.config.shard {
                Some(shard) => Some(Arc::new(shard.route(&rel)?)),
                None => None,
            };
            self.tables.insert(key, Bound { rel: Arc::new(rel), table: Arc::new(table), apply_from, route });
        }
        let Some(b) = self.tables.get(&key) else { return Ok(None) };
        // Copied at a snapshot: only commits at or after its consistent point are new to it.
        if b.apply_from.is_some_and(|from| commit_lsn < from) {
            return Ok(None);
        }
        Ok(Some((b.rel.clone(), b.table.clone(), b.route.clone())))
    }

    /// A mesh table described again from this node's catalog, when a relation of it is bound
    /// (at start, and after every schema change a peer sends): this node's own schema changes
    /// since it was described (a column added, dropped, renamed) are then known.
    async fn describe_mesh_table(&mut self, name: &str) -> Result<(), ApplyError> {
        let (Some(buffer), Some(cfg)) = (self.mesh.as_mut(), self.applier.config.mesh.as_ref()) else {
            return Ok(());
        };
        let none = synapse_resolver::TablePolicy::default();
        buffer.set_table(mesh::describe(&self.client, name, cfg.policies.get(name).unwrap_or(&none)).await?);
        Ok(())
    }

    /// After a replicated schema change: the mesh tables it touched get triggers of their new
    /// shape on this node, in this transaction, and are described again.
    async fn reshape_mesh_tables(&mut self, tables: &[String]) -> Result<(), ApplyError> {
        for name in tables {
            if self.mesh.as_ref().is_some_and(|m| m.table(name).is_some()) {
                mesh::refresh_triggers(&self.client, name).await?;
                self.describe_mesh_table(name).await?;
            }
        }
        Ok(())
    }

    /// Writes the queued changes and waits for every statement sent so far.
    async fn flush(&mut self) -> Result<(), ApplyError> {
        self.send_changes(true).await
    }

    /// Sends the queued changes; with `settle`, also waits for their results (else the
    /// commit reads them, one round trip for the group).
    async fn send_changes(&mut self, settle: bool) -> Result<(), ApplyError> {
        let started = Instant::now();
        let (rows, copied) = self.pending.flush(&self.client, &mut self.statements, &mut self.pipeline).await?;
        if settle {
            self.pipeline.settle().await?;
        }
        metrics::histogram!("synapse_apply_statements_seconds", &self.applier.labels)
            .record(started.elapsed().as_secs_f64());
        self.applier.stats.copied_binary.fetch_add(copied.binary, Ordering::Relaxed);
        self.applier.stats.copied_text.fetch_add(copied.text, Ordering::Relaxed);
        for (labels, n) in self.applier.copy_labels.iter().zip([copied.binary, copied.text]) {
            if n > 0 {
                metrics::counter!("synapse_apply_copy_rows_total", labels).increment(n);
            }
        }
        self.applier.stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        metrics::counter!("synapse_apply_rows_total", &self.applier.labels).increment(rows as u64);
        Ok(())
    }

    /// Resolves and writes the buffered mesh changes. Only at a transaction boundary or a
    /// truncate: a row's change and its version arrive apart within a transaction.
    async fn flush_mesh(&mut self) -> Result<(), ApplyError> {
        let (Some(buffer), Some(cfg)) = (self.mesh.as_mut(), self.applier.config.mesh.as_ref()) else {
            return Ok(());
        };
        if buffer.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let (written, conflicts, buried) =
            buffer.apply(&self.client, &mut self.statements, &self.applier.config.node, &cfg.policies).await?;
        self.burials_pending |= buried > 0;
        metrics::histogram!("synapse_apply_mesh_resolve_seconds", &self.applier.labels)
            .record(started.elapsed().as_secs_f64());
        self.applier.stats.rows.fetch_add(written, Ordering::Relaxed);
        metrics::counter!("synapse_apply_rows_total", &self.applier.labels).increment(written);
        if conflicts > 0 {
            tracing::debug!(conflicts, "concurrent versions merged");
        }
        Ok(())
    }

    /// One span per transaction of the committed group: read from the log → committed on the
    /// target, a child of the transaction's capture span (`synapse_schemas::trace`).
    fn trace_group(&self, traced: Vec<(Lsn, std::time::SystemTime)>) {
        if traced.is_empty() {
            return;
        }
        use synapse_schemas::trace::{self, KeyValue, Recorded, SpanKind};
        let end = std::time::SystemTime::now();
        let source = &self.applier.config.node;
        let target = self.applier.labels[1].1.clone();
        for (lsn, start) in traced {
            trace::record(Recorded {
                name: "apply",
                trace: trace::transaction_trace(source, lsn),
                span: None,
                parent: Some(trace::capture_span(source, lsn)),
                kind: SpanKind::Consumer,
                start,
                end,
                attributes: vec![
                    KeyValue::new("synapse.source", source.clone()),
                    KeyValue::new("synapse.target", target.clone()),
                    KeyValue::new("synapse.commit_lsn", lsn.to_string()),
                ],
                links: &[],
                error: None,
            });
        }
    }

    async fn commit(&mut self, next_offset: Offset) -> Result<(), ApplyError> {
        // With "group committed" below: which resolved rows committed (tests/mesh.rs reads it).
        tracing::trace!(next_offset, "group resolving");
        self.send_changes(false).await?;
        if let Err(e) = self.flush_mesh().await {
            return Err(self.pipeline.first_error(e).await);
        }
        // The group before must be known committed before this one's COMMIT is sent: a COMMIT
        // can fail (a deferred constraint), and this one, run after it, would then store a
        // position past transactions that were rolled back. This group's statements went out
        // behind it already; the target ran that COMMIT while this group was read.
        self.finish_commit().await?;
        let started = Instant::now();
        let node = &self.applier.config.node;
        let (lsn, time) = self.last_commit.as_ref().map(|c| (c.commit_lsn, c.commit_time_us)).unwrap_or_default();
        // Position, origin progress and COMMIT sent together behind the group's statements
        // (and its BEGIN): one round trip for the whole group; its result is read once the
        // next group's statements are sent behind it (`finish_commit`). The per-group cost is
        // what bounds OLTP catch-up (bench P2) and commit → applied latency (P4).
        let ts = time as f64 / 1e6;
        // The position reported to the log (retention) must survive a target crash: without
        // synchronous commits, the group that reports it is flushed (and all before it).
        // Due once a second, and only when the previous report is done: one still waiting behind
        // the log's fsync would otherwise make every group until then a synchronous commit.
        let report = self.last_consumer_commit.elapsed() >= Duration::from_secs(1)
            && self.reporting.as_ref().is_none_or(|r| r.is_finished())
            && self.in_flight.as_ref().is_none_or(|c| !c.report);
        let commit_sql = if report && !self.applier.config.synchronous_commit {
            "SET LOCAL synchronous_commit = on; COMMIT"
        } else {
            "COMMIT"
        };
        let (client, position, origin) = (self.client.clone(), self.position.clone(), self.origin_progress.clone());
        let (node, offset, pg_lsn) = (node.clone(), next_offset as i64, PgLsn::from(lsn.0));
        self.pipeline
            .send(async move {
                // Joined, so all three go out at the first poll, in this order (one round trip).
                futures_util::future::try_join3(
                    client.execute(&position, &[&node, &offset, &pg_lsn, &ts]),
                    client.execute(&origin, &[&pg_lsn, &ts]),
                    client.batch_execute(commit_sql),
                )
                .await
                .map(|_| ())
                .map_err(ApplyError::target("storing the applied position and committing"))
            })
            .await;
        let sent = InFlightCommit {
            mark: self.pipeline.mark(),
            next_offset,
            lsn,
            commit_time_us: time,
            txns: std::mem::take(&mut self.txns_in_group),
            report,
            copy_owed: std::mem::take(&mut self.copy_owed),
            burials: std::mem::take(&mut self.burials_pending),
            traced: std::mem::take(&mut self.traced),
            sent_at: started,
        };
        self.in_target_txn = false;
        self.schema_changed = false;
        self.in_flight = Some(sent);
        Ok(())
    }

    /// Reads the result of the group commit in flight, if any, records what it made true
    /// (counts, the committed position, the report to the log) and announces its burials.
    /// Never while a group is open on this connection when the commit queued burials: the
    /// announcement waits for row locks that group may hold, and that group commits only after
    /// this returns (seen as a lock timeout in `tests/mesh_join.rs`).
    async fn finish_commit(&mut self) -> Result<(), ApplyError> {
        let due = self.settle_commit().await?;
        self.announce_burials(due).await
    }

    /// [`Session::finish_commit`] but the announcement: whether burials are due.
    async fn settle_commit(&mut self) -> Result<bool, ApplyError> {
        let Some(c) = self.in_flight.take() else { return Ok(false) };
        self.pipeline.settle_through(c.mark).await?;
        metrics::histogram!("synapse_apply_commit_seconds", &self.applier.labels)
            .record(c.sent_at.elapsed().as_secs_f64());
        self.trace_group(c.traced);
        let stats = &self.applier.stats;
        stats.transactions.fetch_add(c.txns as u64, Ordering::Relaxed);
        metrics::counter!("synapse_apply_transactions_total", &self.applier.labels).increment(c.txns as u64);
        if c.copy_owed {
            if let Some(wake) = &self.applier.config.copies_owed {
                wake.notify_one();
            }
        }
        tracing::trace!(next_offset = c.next_offset, lsn = %c.lsn, txns = c.txns, "group committed");
        self.committed_offset = c.next_offset;
        if c.lsn.0 > 0 {
            self.committed_through = Some(c.lsn);
        }
        stats.next_offset.store(c.next_offset, Ordering::Relaxed);
        if c.lsn.0 > 0 {
            stats.applied_lsn.store(c.lsn.0, Ordering::Relaxed);
            stats.last_commit_time_us.store(c.commit_time_us, Ordering::Relaxed);
        }
        if c.report {
            self.report_position(c.next_offset);
        }
        Ok(c.burials)
    }

    /// Tells the log (retention) that everything below `next` is applied, on a task of its own:
    /// the report is a write to the log, which waits behind the capture's write and fsync, and
    /// the applier must not (bench P4's stalls). Positions are advisory there and only grow: a
    /// report that fails is replaced by the next (`commit` starts one only after the last ended).
    fn report_position(&mut self, next: Offset) {
        let log = self.log.clone();
        let consumer = self.applier.config.consumer.clone();
        self.reporting = Some(tokio::spawn(async move {
            if let Err(e) = log.commit_consumer(&consumer, next).await {
                tracing::warn!(%consumer, error = %e, "reporting the applied position to the log failed; the next report retries");
            }
        }));
        self.last_consumer_commit = Instant::now();
    }

    /// Turns the unique-key burials committed here into events every node applies, on a
    /// connection of its own: this session's commits carry the replication origin, so the
    /// capture would leave them out. A crash before this leaves them queued in
    /// `synapse.burials`; a new session announces them first. Only when `due`: a group
    /// committed that queued some.
    async fn announce_burials(&mut self, due: bool) -> Result<(), ApplyError> {
        let Some(cfg) = self.applier.config.mesh.as_ref() else { return Ok(()) };
        if !due {
            return Ok(());
        }
        if self.announcer.is_none() {
            self.announcer = Some(connect_target(&self.applier.config.target).await?);
        }
        if let Some(client) = &self.announcer {
            let n = mesh::announce_burials(client, cfg.node).await?;
            tracing::trace!(announced = n, "mesh burials announced");
            metrics::counter!("synapse_mesh_burials_announced_total").increment(n);
        }
        Ok(())
    }

    async fn rollback(&mut self) -> Result<(), ApplyError> {
        // The group before this one stays committed: its result first; its burials once this
        // one's locks are gone.
        let due = self.settle_commit().await?;
        self.pending = PendingChanges::default();
        if let Some(m) = self.mesh.as_mut() {
            m.clear();
        }
        self.txns_in_group = 0;
        // Rolled back with the group.
        self.burials_pending = false;
        self.pipeline.clear();
        if self.in_target_txn {
            self.client.batch_execute("ROLLBACK").await.map_err(ApplyError::target("rolling back"))?;
            self.in_target_txn = false;
        }
        self.announce_burials(due).await
    }

    fn report_lag(&self, pos: Offset) {
        let behind = self.log.records_behind(pos);
        // One gauge per (source, target): on Kafka a source is one partition
        // (`<prefix>.<node>.changes`, partition 0), so this is the lag per partition and consumer.
        let labels = &self.applier.labels;
        metrics::gauge!("synapse_apply_lag_records", labels).set(behind as f64);
        metrics::gauge!("synapse_apply_lag_seconds", labels).set(self.applier.stats.lag_seconds(behind));
    }
}
