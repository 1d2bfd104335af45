use synapse_log::LogError;

/// Errors of the apply stage, classified once here.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("target statement failed while {context}")]
    Target {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("reading the change log failed")]
    Log(#[from] LogError),
    #[error("change at offset {offset} refers to relation {oid} version {version:x}, which the log does not know")]
    UnknownRelation { offset: u64, oid: u32, version: u64 },
    /// A logged change whose values do not fit its relation (a damaged log): never applied.
    #[error("change at offset {offset} on {table} has {values} values, but the table's logged definition has {columns} columns")]
    Malformed { offset: u64, table: String, values: usize, columns: usize },
    #[error("table {table} on the target cannot take the change: {message}")]
    Schema { table: String, message: String },
    #[error("initial copy failed")]
    Copy(#[source] synapse_capture::CaptureError),
    /// The table's merge function failed or returned something other than a JSON object.
    #[error("merge function {function} failed on {table} key {key}: {message}")]
    MergeFunction { function: String, table: String, key: String, message: String },
    /// Another applier of the same source holds this target (a second process with the same
    /// configuration, or the previous owner of a source handed over by the consumer group).
    #[error("another applier of source {node} is running against this target (advisory lock held by PID {holder:?})")]
    Busy { node: String, holder: Option<i32> },
    /// A local write took a unique value of a mesh table between the applier's collision check
    /// and its write; the retry sees that row and resolves the collision.
    #[error("a local write on {table} took a unique value while the applier was resolving it")]
    UniqueRace {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A schema change of the source that the target cannot run (or that cannot be told apart
    /// in its text): this target stops before it, the others go on.
    #[error("schema change `{tag}` of source {source_node} at log offset {offset} cannot run on this target: {message} (statement: {statement})")]
    SchemaChange { source_node: String, offset: u64, tag: String, statement: String, message: String },
    /// A change a shard cannot place: its table's shard key is not logged with every change,
    /// or a moved row lacks a value. That shard's applier stops here; the others go on.
    #[error("shard {shard}: table {table} cannot be routed: {message}")]
    Shard { table: String, shard: String, message: String },
    /// A node cannot join the mesh as it is (rows in its mesh tables, a table the donor's
    /// definition cannot make there): it stays out; the rest of the mesh goes on.
    #[error("mesh node {node} cannot join: {message}")]
    Join { node: String, message: String },
    /// A node in `mesh.nodes` that has not joined, with `mesh.on_new_node: wait`.
    #[error("mesh node {node} has not joined the mesh (mesh.on_new_node: wait); it would join from {donor}")]
    NotJoined { node: String, donor: String },
    /// The donor a node would join from is not a member yet (itself joining, or unreachable).
    #[error("mesh node {node} cannot join from {donor} yet: {donor} is not a member of the mesh")]
    DonorNotMember { node: String, donor: String },
    /// A new node cannot tell whether the mesh it is configured in has members (to join it)
    /// or none (to found it with the others): some nodes do not answer.
    #[error("mesh node {node} cannot tell whether the mesh has members yet: no answer from {silent}")]
    MembershipUnknown { node: String, silent: String },
    /// A node that left the mesh is still in `mesh.nodes`.
    #[error("mesh node {node} left the mesh")]
    LeftMesh { node: String },
    /// A statement sent ahead (pipelined) ended without its result: its task panicked or the
    /// runtime is stopping. The group is not committed; the applier retries from its position.
    #[error("a statement sent to the target ended without a result")]
    Pipelined(#[source] tokio::task::JoinError),
    /// The target's `synapse.*` tables could not be brought to this release's version.
    #[error("target: {0}")]
    NodeSchema(#[from] synapse_postgres::node_schema::NodeSchemaError),
}

impl ApplyError {
    pub fn target(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        let context = context.into();
        move |source| ApplyError::Target { context, source }
    }

    fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Target { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }
}

impl synapse_error::Classify for ApplyError {
    fn code(&self) -> &'static str {
        match self {
            ApplyError::Target { .. } => "APP001",
            ApplyError::Log(e) => e.code(),
            ApplyError::UnknownRelation { .. } => "APP002",
            ApplyError::Schema { .. } => "APP003",
            ApplyError::Copy(e) => e.code(),
            ApplyError::UniqueRace { .. } => "APP004",
            ApplyError::MergeFunction { .. } => "APP005",
            ApplyError::Busy { .. } => "APP006",
            ApplyError::NodeSchema(_) => "APP007",
            ApplyError::Malformed { .. } => "APP008",
            ApplyError::SchemaChange { .. } => "APP009",
            ApplyError::Shard { .. } => "APP010",
            ApplyError::Join { .. } => "APP011",
            ApplyError::NotJoined { .. } => "APP012",
            ApplyError::DonorNotMember { .. } => "APP013",
            ApplyError::LeftMesh { .. } => "APP014",
            ApplyError::MembershipUnknown { .. } => "APP015",
            ApplyError::Pipelined(_) => "APP016",
        }
    }

    /// Transient: connection loss, deadlock, serialization failure, shutdown/restart of the
    /// target, resource exhaustion, lock timeouts and objects still in use (a replication origin
    /// held by our own just-crashed session). The applier rolls back and retries from its stored position.
    fn is_transient(&self) -> bool {
        match self {
            ApplyError::Target { source, .. } => synapse_postgres::is_transient(source),
            ApplyError::Log(e) => e.is_transient(),
            ApplyError::Copy(e) => e.is_transient(),
            ApplyError::UniqueRace { .. }
            | ApplyError::Busy { .. }
            | ApplyError::DonorNotMember { .. }
            | ApplyError::MembershipUnknown { .. }
            | ApplyError::Pipelined(_) => true,
            ApplyError::NodeSchema(e) => e.is_transient(),
            _ => false,
        }
    }

    fn hint(&self) -> &'static str {
        if let ApplyError::Target { source, .. } = self {
            if synapse_postgres::tls::is_tls_refusal(source) {
                return synapse_postgres::tls::HINT;
            }
        }
        if let ApplyError::SchemaChange { .. } = self {
            return "make the change on the target by hand (or make the target accept it), then have the applier \
                    skip it: `synapse skip-ddl --source <source> --target <target> --offset <offset>` (it records \
                    the skip in the target's synapse.schema_skips), and `synapse resume` (or wait for the next retry)";
        }
        match self.sqlstate() {
            // not null, foreign key, check, exclusion: a rule the target has and the source not.
            Some("23502" | "23503" | "23514" | "23P01") => {
                "the target refuses the row by a constraint the source does not have: align the target table's \
                 constraints with the source's (or fix the row at the source); the applier retries by itself \
                 (supervision.park_retry_secs) or at once on SIGHUP / POST /v1/components/resume"
            }
            Some(c) if c.starts_with("23") => {
                "the target already holds conflicting rows: empty the target table or let synapse copy it (drop its row in synapse.table_sync)"
            }
            Some("42P01") | Some("42703") | Some("42704") => {
                "the target schema differs from the source: create the missing table, column or type on the target"
            }
            _ => match self {
                ApplyError::Schema { .. } => "align the target table with the source definition",
                ApplyError::Shard { .. } => {
                    "change the table as the message says (or its rule under targets[].sharding), then resume the \
                     shard's applier (`synapse resume`); the other shards keep applying"
                }
                ApplyError::Join { .. } => {
                    "make the joining node as the message says (empty its mesh tables, or create the types and \
                     functions its tables use), then `synapse resume`: the join starts over from a new snapshot; \
                     the other nodes keep replicating"
                }
                ApplyError::NotJoined { .. } => {
                    "run `synapse mesh join <node>` (POST /v1/mesh/nodes/<node>/join): it copies the mesh tables \
                     with their versions from the donor, then the node catches up; or set mesh.on_new_node: join"
                }
                ApplyError::DonorNotMember { .. } => {
                    "retried until the donor is a member; name another with mesh.nodes[].join_from if it never is"
                }
                ApplyError::MembershipUnknown { .. } => {
                    "retried until every node answers: a new node founds a mesh only when no node is a member, \
                     and never decides that while some node is unreachable (it could hold the data)"
                }
                ApplyError::LeftMesh { .. } => {
                    "remove the node from mesh.nodes (it left: its slots and positions are gone); to bring it back, \
                     empty its mesh tables and add it under a new id, and it joins again"
                }
                ApplyError::UnknownRelation { .. } => "the log lost its relation registry: re-create the log directory",
                ApplyError::Malformed { .. } => {
                    "the log is damaged at that offset: restore the log directory from a backup, or re-create it and \
                     re-sync the targets (synapse repair fix); report it with the release"
                }
                ApplyError::Log(e) => e.hint(),
                ApplyError::Copy(e) => e.hint(),
                ApplyError::NodeSchema(e) => e.hint(),
                ApplyError::UniqueRace { .. } => "none: retried at once; frequent retries mean many concurrent claims of one value",
                ApplyError::Busy { .. } => {
                    "retried until the other applier stops; if it never does, find the process \
                     (pg_stat_activity.pid on the target) and stop it — one applier per source and target"
                }
                ApplyError::MergeFunction { .. } => {
                    "fix the function on every node (it gets two rows as jsonb and returns a jsonb object of column values; see the cause) and restart: the transaction was not applied"
                }
                _ => "see the cause; transient errors are retried automatically",
            },
        }
    }
}
