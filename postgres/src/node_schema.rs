//! SynapseDB's own tables on every node it writes to (`synapse.*`), as ordered migrations with
//! one owner: this module. `synapse.schema_version` holds a row per migration applied.
//!
//! Guarantees of [`migrate`]:
//! * A node is brought to [`LATEST`] in one transaction, under an advisory lock, so appliers,
//!   repair and the mesh starting together on one node migrate it once; a failure leaves it at
//!   its previous version.
//! * A node at a version newer than this build knows is refused ([`NodeSchemaError::Newer`]),
//!   never written with an older layout.
//! * Migration 1 is the layout from before versioning, written idempotently (`IF NOT EXISTS`),
//!   so a node an earlier release set up is adopted as version 1 and migrated from there.
//!   Later migrations are idempotent too: a node whose version table was lost is adopted the
//!   same way and every migration runs again over what it already has.
//!
//! Adding a migration: append to [`MIGRATIONS`] (never edit a released one) and raise nothing
//! else — [`LATEST`] is the last entry's version. See docs/decisions/0010-node-schema.md.

use tokio_postgres::Client;

/// One step of the node schema.
pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order; versions are 1, 2, 3… without gaps.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "apply state, mesh versions and conflicts, repair digests (the layout before versioning)",
        sql: V1,
    },
    Migration { version: 2, description: "tombstone purge marks and completed purge rounds", sql: V2 },
    Migration { version: 3, description: "schema changes an operator had the applier skip", sql: V3 },
    Migration { version: 4, description: "tables owed a copy after joining a running capture", sql: V4 },
    Migration { version: 5, description: "mesh tables and their column strategies, per node", sql: V5 },
    Migration { version: 6, description: "a node-wide counter for version vector entries", sql: V6 },
    Migration { version: 7, description: "this node's membership of the mesh (joining, member, left)", sql: V7 },
];

/// The version this build reads and writes.
pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Serializes migrations of one node (any other advisory lock number of SynapseDB differs).
/// Anything else that creates objects in schema `synapse` takes it too: two transactions
/// running `CREATE SCHEMA IF NOT EXISTS` at once make one fail with a unique violation.
pub const LOCK: i64 = 7_305_900;

#[derive(Debug, thiserror::Error)]
pub enum NodeSchemaError {
    #[error(
        "the node's synapse schema is at version {found}, newer than this synapse ({known}): a newer release set it up"
    )]
    Newer { found: i32, known: i32 },
    #[error("migrating the node's synapse schema from version {from} failed")]
    Sql {
        from: i32,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl NodeSchemaError {
    /// Transient: the migration can succeed when retried (connection lost, lock busy…).
    pub fn is_transient(&self) -> bool {
        match self {
            NodeSchemaError::Newer { .. } => false,
            NodeSchemaError::Sql { source, .. } => crate::is_transient(source),
        }
    }

    pub fn hint(&self) -> &'static str {
        match self {
            NodeSchemaError::Newer { .. } => {
                "run the synapse release that set this node up (or newer): an older one would write an outdated layout"
            }
            NodeSchemaError::Sql { .. } => {
                "see the cause; the role needs CREATE on the database (for the synapse schema) — `synapse doctor` checks it"
            }
        }
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub from: i32,
    pub to: i32,
}

/// Brings the node behind `client` to [`LATEST`] (see the module's guarantees).
pub async fn migrate(client: &Client) -> Result<Migrated, NodeSchemaError> {
    // The common case — already current — takes no lock and writes nothing.
    let current = version(client).await.map_err(|source| NodeSchemaError::Sql { from: 0, source })?;
    check(current)?;
    if current == LATEST {
        return Ok(Migrated { from: current, to: current });
    }
    let sql_error = |from| move |source| NodeSchemaError::Sql { from, source };
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL client_min_messages = warning; SELECT pg_advisory_xact_lock({LOCK});
             CREATE SCHEMA IF NOT EXISTS synapse;
             CREATE TABLE IF NOT EXISTS synapse.schema_version (
                 version integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 applied_by text NOT NULL DEFAULT current_user);"
        ))
        .await
        .map_err(sql_error(current))?;
    // Read again under the lock: another process may have migrated meanwhile.
    let result = async {
        let from = version(client).await.map_err(sql_error(current))?;
        check(from)?;
        for m in MIGRATIONS.iter().filter(|m| m.version > from) {
            client.batch_execute(m.sql).await.map_err(sql_error(from))?;
            client
                .execute(
                    "INSERT INTO synapse.schema_version (version, description) VALUES ($1, $2)",
                    &[&m.version, &m.description],
                )
                .await
                .map_err(sql_error(from))?;
        }
        client.batch_execute("COMMIT").await.map_err(sql_error(from))?;
        Ok(Migrated { from, to: LATEST })
    }
    .await;
    if result.is_err() {
        // The connection may be gone; the server rolls back either way.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    let migrated = result?;
    if migrated.from != migrated.to {
        tracing::info!(from = migrated.from, to = migrated.to, "migrated the node's synapse schema");
    }
    Ok(migrated)
}

/// The node's version: 0 when it has no `synapse.schema_version` (never set up, or set up by a
/// release before versioning: migration 1 adopts both).
pub async fn version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    // Outside a transaction: on a node without the table the statement fails alone.
    match client.query_one("SELECT coalesce(max(version), 0) FROM synapse.schema_version", &[]).await {
        Ok(row) => Ok(row.get(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(0),
        Err(e) => Err(e),
    }
}

fn check(found: i32) -> Result<(), NodeSchemaError> {
    if found > LATEST {
        return Err(NodeSchemaError::Newer { found, known: LATEST });
    }
    Ok(())
}

/// Version 1: the tables of every stage as they were before versioning (idempotent, to adopt
/// nodes set up then; the `ADD COLUMN IF NOT EXISTS` lines bring those nodes to the same shape).
const V1: &str = r#"
CREATE SCHEMA IF NOT EXISTS synapse;

-- Apply: position and sync state live in the target, next to the data they describe, so one
-- target transaction commits both (exactly-once effect).
CREATE TABLE IF NOT EXISTS synapse.applied (
    source_node text PRIMARY KEY,
    next_offset bigint NOT NULL,
    commit_lsn pg_lsn NOT NULL,
    commit_time timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS synapse.table_sync (
    source_node text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    state text NOT NULL CHECK (state IN ('copying', 'ready')),
    sync_lsn pg_lsn,
    rows_copied bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_node, schema_name, table_name)
);

-- Mesh: each row's version (vector, hybrid clock, per-column stamps), conflicts, burials.
CREATE TABLE IF NOT EXISTS synapse.row_version (
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    vv jsonb NOT NULL,
    hlc_ms bigint NOT NULL,
    hlc_lc integer NOT NULL,
    node integer NOT NULL,
    live boolean NOT NULL,
    cols jsonb NOT NULL,
    PRIMARY KEY (tbl, pk)
);
-- Kept inline so a change of this row never arrives as "unchanged TOAST" without its value.
-- Every write of a row rewrites its version: free space per page keeps those updates HOT.
ALTER TABLE synapse.row_version ALTER COLUMN vv SET STORAGE MAIN, ALTER COLUMN cols SET STORAGE MAIN, SET (fillfactor = 50);
CREATE TABLE IF NOT EXISTS synapse.conflicts (
    id bigserial PRIMARY KEY,
    detected_at timestamptz NOT NULL DEFAULT now(),
    source_node text NOT NULL,
    table_name text NOT NULL,
    pk jsonb NOT NULL,
    kind text NOT NULL,
    resolution text NOT NULL,
    local jsonb NOT NULL,
    remote jsonb NOT NULL,
    result jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS conflicts_by_row ON synapse.conflicts (table_name, pk);
-- Rows the applier buried (lost a unique-key collision) whose burial is not yet announced.
CREATE TABLE IF NOT EXISTS synapse.burials (
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    PRIMARY KEY (tbl, pk)
);

-- Repair: digests kept current by triggers, per table and bucket a row with the bucket's
-- digest and, in two arrays, its sub-buckets' (sums mod 2^64 as bigint); the deltas statements
-- recorded since the last fold, per sub-bucket (append-only: writers never contend on a digest
-- row); and what the digests were made with. Tracking layout 2: a fold touches one row per
-- changed bucket, where layout 1 (a row per sub-bucket in repair_subdigest besides the
-- bucket's) touched two (fold of 100 changes, pgbench, generic plans: 1.49–1.67 → 1.10–1.14
-- ms). A table tracked in layout 1 is scanned until tracked again; repair_subdigest stays for
-- the TRUNCATE triggers of such trackings.
CREATE TABLE IF NOT EXISTS synapse.repair_digest (
    tbl text NOT NULL, bucket bigint NOT NULL, n bigint NOT NULL, s bigint NOT NULL, PRIMARY KEY (tbl, bucket));
CREATE TABLE IF NOT EXISTS synapse.repair_delta (tbl text NOT NULL, bucket bigint NOT NULL, n bigint NOT NULL, s numeric NOT NULL);
CREATE INDEX IF NOT EXISTS repair_delta_tbl ON synapse.repair_delta (tbl);
-- gen: the fold that last changed a bucket (readers holding older digests read only newer
-- rows); sub_n, sub_s: the bucket's sub-buckets' row counts and hash sums, in sub-bucket order.
ALTER TABLE synapse.repair_digest ADD COLUMN IF NOT EXISTS gen bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS sub_n bigint[], ADD COLUMN IF NOT EXISTS sub_s bigint[];
CREATE TABLE IF NOT EXISTS synapse.repair_tracked (
    tbl text PRIMARY KEY, bits integer NOT NULL, key_hash text NOT NULL, row_hash text NOT NULL,
    tracked_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS synapse.repair_subdigest (
    tbl text NOT NULL, bucket bigint NOT NULL, n bigint NOT NULL, s bigint NOT NULL, PRIMARY KEY (tbl, bucket));
-- gen: the last fold's number.
ALTER TABLE synapse.repair_tracked ADD COLUMN IF NOT EXISTS sub_bits integer,
    ADD COLUMN IF NOT EXISTS gen bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS layout integer NOT NULL DEFAULT 1;
-- Every fold updates a digest row per changed bucket: room on each page keeps those updates
-- HOT (no index entry), measured 3.5 → 2.1 ms a fold of 100 changes. For the same reason gen
-- has no index: finding the newer buckets scans a few thousand rows (~0.5 ms).
ALTER TABLE synapse.repair_digest SET (fillfactor = 50);
"#;

/// Tombstone purging in rounds (`synapse_apply::tombstones`): a tombstone every node agreed on
/// is first marked with its round on every node, and counts as no version from then on; the
/// round is recorded complete once every node is marked, and only then are marked tombstones
/// deleted — on a node the round could not reach, by a later round. Written idempotently all
/// the same: a node whose version table was lost is adopted at 0 and migrated again.
const V2: &str = r#"
ALTER TABLE synapse.row_version ADD COLUMN IF NOT EXISTS purge_round bigint;
CREATE TABLE IF NOT EXISTS synapse.purge_rounds (round bigint PRIMARY KEY, completed_at timestamptz NOT NULL DEFAULT now());
"#;

/// Schema changes of a source that an operator made on the target by hand (or chose not to
/// make): the applier passes the one at this log offset instead of running it. Who and when are
/// kept, as an audit of the divergence accepted.
const V3: &str = r#"
CREATE TABLE IF NOT EXISTS synapse.schema_skips (
    source_node text NOT NULL,
    log_offset bigint NOT NULL,
    skipped_by text NOT NULL DEFAULT current_user,
    skipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_node, log_offset)
);
"#;

/// A table that joined a source's publication while it ran, holding rows the log lacks
/// (`CREATE TABLE … AS`, a key added to a filled table), is `owed` a copy on each target until
/// the runtime has made it; its streamed changes apply meanwhile.
const V4: &str = r#"
ALTER TABLE synapse.table_sync DROP CONSTRAINT IF EXISTS table_sync_state_check;
ALTER TABLE synapse.table_sync ADD CONSTRAINT table_sync_state_check CHECK (state IN ('copying', 'ready', 'owed'));
"#;

/// The mesh tables of this node with their column strategies (`{"column": "counter"}`; unnamed
/// columns are `lww`): what the trigger generator reads when a schema change on the node
/// reshapes one (`synapse.mesh_install_triggers`). `rel` finds the table from the event
/// trigger, and notices a rename.
const V5: &str = r#"
CREATE TABLE IF NOT EXISTS synapse.mesh_tables (
    tbl text PRIMARY KEY,
    rel oid NOT NULL,
    node integer NOT NULL,
    strategies jsonb NOT NULL DEFAULT '{}'
);
"#;

/// A node's entry in a row's version vector comes from this counter, not from the row's previous
/// entry + 1: a row whose versions were purged (its tombstone, everywhere) is versioned again
/// from nothing, and +1 then reissued counters that versions still held or in flight elsewhere
/// had used — two different writes with one vector, each node keeping whichever it saw first
/// (found by the mesh test: equal vectors, different rows, after a purge round). A counter never
/// reissues. It starts above any count of writes +1 gave before.
const V6: &str = r#"
CREATE SEQUENCE IF NOT EXISTS synapse.version_counter AS bigint START WITH 1000000000;
GRANT USAGE ON SEQUENCE synapse.version_counter TO PUBLIC;
"#;

/// This node's membership of a mesh, one row (its own): `joining` from a donor until the copy
/// of the mesh tables and their versions commits — in the same transaction as `member` — and
/// `left` once it left. Kept in the node's database, next to the data it describes, so a copy
/// and its state cannot disagree after a crash.
const V7: &str = r#"
CREATE TABLE IF NOT EXISTS synapse.mesh_membership (
    node text PRIMARY KEY,
    node_id integer NOT NULL,
    state text NOT NULL CHECK (state IN ('joining', 'member', 'left')),
    donor text,
    snapshot_lsn pg_lsn,
    rows_copied bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    joined_at timestamptz,
    left_at timestamptz
);
"#;
