//! Repair as the runtime serves it: which nodes and tables of a configuration to compare
//! ([`plan`]), checking and resolving them ([`fix_tables`]), and the admin API's
//! `POST /v1/repair/check` and `POST /v1/repair/fix` ([`RepairService`]). The algorithms are in
//! `synapse-repair`; the CLI's printing is in the binary.

use crate::config::Config;
use axum::extract::rejection::JsonRejection;
use std::collections::HashMap;
use std::time::Duration;
use synapse_apply::shards::ShardAssignment;
use synapse_error::Classify;
use synapse_repair::check::{check, CheckOptions, Report};
use synapse_repair::fix::{fix, FixNode, FixOptions, FixReport};
use synapse_repair::node::Node;
use synapse_repair::one_way::{fix_one_way, OneWayTarget};

/// What a check or fix compares: the configuration, the nodes (name and connection), the
/// tables, and the check's options.
pub struct Resolved {
    pub config: Config,
    pub nodes: Vec<(String, synapse_postgres::PgConfig)>,
    pub tables: Vec<String>,
    pub options: CheckOptions,
    /// Set when one compared node is a shard of a shard set: the others (its source) are
    /// compared by that shard's rows only.
    pub shard: Option<(String, ShardAssignment)>,
}

impl Resolved {
    /// A connection to compared node `name`: a source compared with a shard reads only that
    /// shard's rows.
    pub async fn connect(
        &self,
        name: &str,
        pg: &synapse_postgres::PgConfig,
    ) -> Result<Node, synapse_repair::RepairError> {
        let mut node = Node::connect(name, pg).await?;
        if let Some((shard_node, shard)) = &self.shard {
            if shard_node != name {
                filter_to_shard(&mut node, shard, &self.tables);
            }
        }
        Ok(node)
    }

    /// What a kept connection to `name` is cached under: the same node read for another
    /// shard is another connection.
    pub fn cache_key(&self, name: &str) -> String {
        match &self.shard {
            Some((shard_node, _)) if shard_node != name => format!("{name}@{shard_node}"),
            _ => name.to_owned(),
        }
    }
}

/// Makes `node` (a shard's source) read only the rows `shard` holds of each of `tables`.
fn filter_to_shard(node: &mut Node, shard: &ShardAssignment, tables: &[String]) {
    for table in tables {
        if let Some(rows) = shard.rows_sql(table) {
            node.filter_rows(table, rows);
        }
    }
}

/// What to compare: the named (or default) nodes and tables of `config`, and how.
pub fn plan(
    config: Config,
    source: &str,
    tables: &[String],
    nodes: &[String],
    bits: u8,
    cut_timeout: Option<f64>,
) -> anyhow::Result<Resolved> {
    let mut known: Vec<(String, synapse_postgres::PgConfig)> = Vec::new();
    let mut add = |name: &str, url: &crate::config::SecretUrl| -> anyhow::Result<()> {
        if !known.iter().any(|(n, _)| n == name) {
            known.push((name.to_owned(), url.pg_config().map_err(|e| anyhow::anyhow!("node {name}: {e}"))?));
        }
        Ok(())
    };
    if let Some(m) = &config.mesh {
        for n in &m.nodes {
            add(&n.name, &n.url)?;
        }
    }
    for s in &config.sources {
        add(&s.name, &s.url)?;
    }
    for t in &config.targets {
        add(&t.name, &t.url)?;
    }
    let mut names: Vec<String> = if nodes.is_empty() {
        match &config.mesh {
            Some(m) => m.nodes.iter().map(|n| n.name.clone()).collect(),
            None => known.iter().map(|(n, _)| n.clone()).collect(),
        }
    } else {
        nodes.to_vec()
    };
    // Hub-and-spoke: spokes exchange changes only through the hub, so the cut must pass
    // through it (and the hub holds the same rows: comparing it too costs one more scan).
    let hub = config.mesh.as_ref().and_then(|m| m.hub.clone());
    if let Some(h) = hub.as_ref().filter(|h| names.len() >= 2 && !names.contains(h)) {
        eprintln!("note: comparing hub {h} too: the spokes' changes in flight travel through it");
        names.push(h.clone());
    }
    if names.len() < 2 {
        anyhow::bail!("--nodes: name at least two nodes of the configuration to compare");
    }
    let mut nodes = Vec::new();
    for name in &names {
        let Some((_, pg)) = known.iter().find(|(n, _)| n == name) else {
            anyhow::bail!(
                "--nodes: `{name}` is not a node of {source} (known: {})",
                known.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            );
        };
        if nodes.iter().any(|(n, _)| n == name) {
            anyhow::bail!("--nodes: `{name}` is named twice");
        }
        nodes.push((name.clone(), pg.clone()));
    }
    let tables: Vec<String> = if !tables.is_empty() {
        tables.to_vec()
    } else if let Some(m) = &config.mesh {
        m.tables.clone()
    } else {
        // Every table once, in the order the sources name them (several sources may share one).
        let mut t: Vec<String> = Vec::new();
        for name in config.sources.iter().flat_map(|s| &s.tables) {
            if !t.contains(name) {
                t.push(name.clone());
            }
        }
        t
    };
    if tables.is_empty() {
        anyhow::bail!("--table: no tables to compare (the configuration names none)");
    }
    if let Some(t) = cut_timeout.filter(|t| !(0.0..=86_400.0).contains(t)) {
        anyhow::bail!("--cut-timeout: {t} is not a number of seconds from 0 to 86400");
    }
    let cut_timeout = cut_timeout.map(Duration::from_secs_f64);
    // The appliers between the compared nodes, as the pipeline runs them.
    let mut pipeline = config.clone();
    pipeline.expand_mesh();
    let mut appliers = Vec::new();
    for t in pipeline.targets.iter().filter(|t| nodes.iter().any(|(n, _)| *n == t.name)) {
        for s in pipeline.sources_of(t).filter(|s| nodes.iter().any(|(n, _)| *n == s.name)) {
            appliers.push((s.name.clone(), t.name.clone()));
        }
    }
    // Rows of differing buckets are remembered next to the log, per table.
    let cache_dir = Some(config.log.dir.join("repair-cache"));
    let cut_rounds = if hub.is_some() { 2 } else { 1 };
    let options = CheckOptions { bits, cut_timeout, appliers: Some(appliers), cache_dir, cut_rounds };
    // A shard holds only its rows of the source: it is compared with those, one at a time.
    let shards: Vec<(String, ShardAssignment)> = nodes
        .iter()
        .filter_map(|(n, _)| Some((n.clone(), config.targets.iter().find(|t| &t.name == n)?.shard.clone()?)))
        .collect();
    if shards.len() > 1 {
        anyhow::bail!(
            "--nodes: {} are shards, and each holds other rows of the source: compare one shard at a time \
             with its source (e.g. --nodes {},{})",
            shards.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
            source,
            shards[0].0
        );
    }
    Ok(Resolved { config, nodes, tables, options, shard: shards.into_iter().next() })
}

/// Why a fix did not run (or stopped): the request, a node, or the mesh's view of a table.
pub enum FixError {
    Request(String),
    Repair(synapse_repair::RepairError),
    Describe { table: String, error: synapse_apply::ApplyError },
}

/// Checks each table of `r` and resolves what differs (see `synapse_repair::fix`), for the
/// CLI and the admin API. `source` names the configuration in errors.
pub async fn fix_tables(
    r: &Resolved,
    source: &str,
    dry_run: bool,
    prefer: Option<String>,
) -> Result<Vec<(Report, Option<FixReport>)>, FixError> {
    let Some(mesh) = &r.config.mesh else {
        if prefer.is_some() {
            return Err(FixError::Request(format!(
                "--prefer: {source} has no mesh; one-way targets always take their source's rows"
            )));
        }
        return fix_one_way_tables(r, source, dry_run).await;
    };
    if let Some(p) = &prefer {
        if !r.nodes.iter().any(|(n, _)| n == p) {
            return Err(FixError::Request(format!("--prefer: `{p}` is not one of the nodes compared")));
        }
    }
    if let Some(table) = r.tables.iter().find(|t| !mesh.tables.contains(t)) {
        return Err(FixError::Request(format!(
            "--table: {table} is not a mesh table (mesh.tables lists the tables repair fix can resolve)"
        )));
    }
    let mut ids = Vec::new();
    for (name, _) in &r.nodes {
        let Some(m) = mesh.nodes.iter().find(|n| &n.name == name) else {
            return Err(FixError::Request(format!(
                "--nodes: `{name}` is not a mesh node (repair fix works between mesh nodes)"
            )));
        };
        ids.push(synapse_resolver::NodeId(m.id));
    }
    let policies = mesh.policies();
    let mut nodes = Vec::new();
    for ((name, pg), id) in r.nodes.iter().zip(ids) {
        nodes.push(FixNode::connect(name, id, pg).await.map_err(FixError::Repair)?);
    }
    let none = synapse_resolver::TablePolicy::default();
    let mut out: Vec<(Report, Option<FixReport>)> = Vec::new();
    for table in &r.tables {
        let report = check(&nodes.iter().map(|n| &n.node).collect::<Vec<_>>(), table, &r.options)
            .await
            .map_err(FixError::Repair)?;
        let fixed = if report.differing.is_empty() {
            None
        } else {
            let info =
                synapse_apply::mesh::describe(nodes[0].node.client(), table, policies.get(table).unwrap_or(&none))
                    .await
                    .map_err(|error| FixError::Describe { table: table.clone(), error })?;
            let keys: Vec<Vec<String>> = report.differing.iter().map(|d| d.key.clone()).collect();
            let options = FixOptions { dry_run, prefer: prefer.clone() };
            Some(fix(&nodes, &info, &policies, &keys, &options).await.map_err(FixError::Repair)?)
        };
        out.push((report, fixed));
    }
    Ok(out)
}

/// Without a mesh: the compared nodes must be one source and targets that apply it; each
/// target is made to hold the source's rows (see `synapse_repair::one_way`).
async fn fix_one_way_tables(
    r: &Resolved,
    source: &str,
    dry_run: bool,
) -> Result<Vec<(Report, Option<FixReport>)>, FixError> {
    let appliers = r.options.appliers.clone().unwrap_or_default();
    let applies = |target: &str, from: &str| appliers.iter().any(|(s, t)| s == from && t == target);
    let origin = r.nodes.iter().find(|(s, _)| r.nodes.iter().all(|(t, _)| t == s || applies(t, s)));
    let Some((origin, origin_pg)) = origin else {
        return Err(FixError::Request(format!(
            "--nodes: without a mesh, repair fix makes targets equal to their source: name one source of {source} \
             and targets that apply it (these nodes: {})",
            r.nodes.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        )));
    };
    let targets: Vec<_> = r.nodes.iter().filter(|(n, _)| n != origin).cloned().collect();
    let shard = r.shard.as_ref().map(|(_, s)| s);
    fix_from_source((origin, origin_pg), &targets, shard, &r.tables, &r.options, dry_run)
        .await
        .map_err(FixError::Repair)
}

/// Makes each of `targets` hold `source`'s rows of `tables` (the rows of `shard`, when the
/// targets are that shard): a check per table (with a cut: changes in flight are not drift),
/// then a one-way fix of what differs.
async fn fix_from_source(
    (origin, origin_pg): (&str, &synapse_postgres::PgConfig),
    targets: &[(String, synapse_postgres::PgConfig)],
    shard: Option<&ShardAssignment>,
    tables: &[String],
    options: &CheckOptions,
    dry_run: bool,
) -> Result<Vec<(Report, Option<FixReport>)>, synapse_repair::RepairError> {
    let mut source_node = Node::connect(origin, origin_pg).await?;
    if let Some(shard) = shard {
        filter_to_shard(&mut source_node, shard, tables);
    }
    let mut writers = Vec::new();
    for (name, pg) in targets {
        writers.push(OneWayTarget::connect(name, pg).await?);
    }
    let mut out = Vec::new();
    for table in tables {
        let mut compared = vec![&source_node];
        compared.extend(writers.iter().map(|t| &t.node));
        let report = check(&compared, table, options).await?;
        let fixed = if report.differing.is_empty() {
            None
        } else {
            let shape = source_node.describe(table).await?;
            Some(fix_one_way(&source_node, &writers, &shape, &report.differing, dry_run).await?)
        };
        out.push((report, fixed));
    }
    Ok(out)
}

type Targets = Vec<(String, synapse_postgres::PgConfig)>;

/// A target a re-sync makes whole: its name, database, and its shard (rows) if it is one.
#[derive(Clone, Debug)]
pub struct ResyncTarget {
    pub name: String,
    pub pg: synapse_postgres::PgConfig,
    pub shard: Option<ShardAssignment>,
}

/// How long a re-sync waits for the appliers to pass a check's cut.
const RESYNC_CUT_TIMEOUT: Duration = Duration::from_secs(300);

/// Re-syncs the `targets` of `source` after its capture crossed a gap (`on_gap: resync`):
/// each is made to hold the source's rows of `tables`, as `synapse repair fix` would, while
/// the pipeline streams on (see docs/decisions/0011-resync-by-repair.md). Returns the rows
/// changed on the targets.
pub async fn resync_targets(
    (source, source_pg): (&str, &synapse_postgres::PgConfig),
    targets: &[ResyncTarget],
    tables: &[String],
) -> Result<u64, synapse_repair::RepairError> {
    if targets.is_empty() || tables.is_empty() {
        return Ok(0);
    }
    // Plain targets are compared with the whole source together; each shard with its rows.
    let plain: Targets = targets.iter().filter(|t| t.shard.is_none()).map(|t| (t.name.clone(), t.pg.clone())).collect();
    let mut groups: Vec<(Targets, Option<&ShardAssignment>)> = Vec::new();
    if !plain.is_empty() {
        groups.push((plain, None));
    }
    for t in targets {
        if let Some(shard) = &t.shard {
            groups.push((vec![(t.name.clone(), t.pg.clone())], Some(shard)));
        }
    }
    let mut rows = 0;
    for (group, shard) in groups {
        let options = CheckOptions {
            bits: 12,
            cut_timeout: Some(RESYNC_CUT_TIMEOUT),
            appliers: Some(group.iter().map(|(t, _)| (source.to_owned(), t.clone())).collect()),
            cache_dir: None,
            cut_rounds: 1,
        };
        let reports = fix_from_source((source, source_pg), &group, shard, tables, &options, false).await?;
        for (check, fix) in &reports {
            let changed: usize =
                fix.iter().flat_map(|f| &f.nodes).map(|n| n.inserted.len() + n.updated.len() + n.deleted.len()).sum();
            tracing::info!(source, table = %check.table, differing = check.differing.len(), changed, "re-synced a table");
            rows += changed as u64;
        }
    }
    Ok(rows)
}

/// The admin API's repair checks, served by `synapse run` on the ops address: connections to
/// the nodes stay open between requests (a check of tracked digests then costs milliseconds),
/// and checks run one at a time (a connection holds one snapshot).
pub struct RepairService {
    config: Config,
    nodes: tokio::sync::Mutex<HashMap<String, Node>>,
}

/// `POST /v1/repair/check` and `POST /v1/repair/fix` body: every field optional, as the CLI's options.
#[derive(serde::Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepairRequest {
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub nodes: Vec<String>,
    pub bits: Option<u8>,
    pub cut_timeout_secs: Option<f64>,
    #[serde(default)]
    pub no_wait: bool,
    /// Fix only: show what would change, then roll everything back.
    #[serde(default)]
    pub dry_run: bool,
    /// Fix only: the node whose row wins where nodes hold one version with different data.
    pub prefer: Option<String>,
}

type Service = axum::extract::State<std::sync::Arc<RepairService>>;

/// Compares the mesh tables (or a target with its source) by Merkle digests at one cut and
/// lists the rows that differ.
#[utoipa::path(post, path = "/v1/repair/check", tag = "repair", security(("token" = ["repair"])),
    request_body(content = RepairRequest, description = "every field optional (`{}`: every table, every node)"),
    responses((status = 200, description = "per table: buckets compared, rows that differ, bytes read", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn check_route(
    axum::extract::State(s): Service,
    body: Result<axum::Json<RepairRequest>, JsonRejection>,
) -> Result<axum::Json<Vec<Report>>, ApiError> {
    s.check(request(body)?).await.map(axum::Json)
}

/// Checks, then repairs each differing row through the resolver (`dry_run`: shows what would
/// change and rolls it back).
#[utoipa::path(post, path = "/v1/repair/fix", tag = "repair", security(("token" = ["repair"])),
    request_body(content = RepairRequest, description = "every field optional"),
    responses((status = 200, description = "per table: the check and the rows changed", body = Object), synapse_connectors::openapi::Errors))]
pub(crate) async fn fix_route(
    axum::extract::State(s): Service,
    body: Result<axum::Json<RepairRequest>, JsonRejection>,
) -> Result<axum::Json<Vec<serde_json::Value>>, ApiError> {
    s.fix(request(body)?).await.map(axum::Json)
}

/// A failed request: HTTP status and a body naming the code, the error and what to do.
pub struct ApiError(axum::http::StatusCode, serde_json::Value);

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

/// The request body (`{}`: every option at its default). A body that is not a request (bad
/// JSON, an unknown field) is refused in the common error shape.
fn request(body: Result<axum::Json<RepairRequest>, JsonRejection>) -> Result<RepairRequest, ApiError> {
    match body {
        Ok(axum::Json(r)) => Ok(r),
        Err(e) => Err(ApiError(
            e.status(),
            synapse_error::body(
                "REP007",
                &e.body_text(),
                "send a JSON object with only these fields: tables, nodes, bits, cut_timeout_secs, no_wait, dry_run, prefer",
            ),
        )),
    }
}

/// A request field the plan refused (`--nodes`, `--table`…): the same body shape as every error.
fn bad_request(message: String) -> ApiError {
    let body = synapse_error::body("REP007", &message, "fix the named field of the request body and retry");
    ApiError(axum::http::StatusCode::BAD_REQUEST, body)
}

fn repair_error(e: synapse_repair::RepairError) -> ApiError {
    let status = if e.is_transient() {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY
    };
    ApiError(status, e.body())
}

impl RepairService {
    pub fn new(config: Config) -> RepairService {
        RepairService { config, nodes: tokio::sync::Mutex::new(HashMap::new()) }
    }

    /// The request's plan; a bad field is a 400 naming it.
    fn plan(&self, req: &RepairRequest) -> Result<Resolved, ApiError> {
        let timeout = (!req.no_wait).then_some(req.cut_timeout_secs.unwrap_or(60.0));
        plan(self.config.clone(), "the configuration", &req.tables, &req.nodes, req.bits.unwrap_or(12), timeout)
            .map_err(|e| bad_request(format!("{e:#}")))
    }

    pub async fn check(&self, req: RepairRequest) -> Result<Vec<Report>, ApiError> {
        if req.dry_run || req.prefer.is_some() {
            return Err(bad_request("dry_run and prefer are options of POST /v1/repair/fix, not of a check".into()));
        }
        let r = self.plan(&req)?;
        let mut open = self.nodes.lock().await;
        for (name, pg) in &r.nodes {
            if let std::collections::hash_map::Entry::Vacant(e) = open.entry(r.cache_key(name)) {
                e.insert(r.connect(name, pg).await.map_err(repair_error)?);
            }
        }
        let nodes: Vec<&Node> = r.nodes.iter().filter_map(|(n, _)| open.get(&r.cache_key(n))).collect();
        let mut reports = Vec::new();
        let mut failed = None;
        for table in &r.tables {
            match check(&nodes, table, &r.options).await {
                Ok(report) => reports.push(report),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(nodes);
        match failed {
            None => Ok(reports),
            Some(e) => {
                // The sessions' state is unknown after a failure: connect afresh next time.
                for (name, _) in &r.nodes {
                    open.remove(name);
                }
                Err(repair_error(e))
            }
        }
    }

    /// Checks and resolves what differs, as `synapse repair fix`: one `{check, fix}` per table.
    /// Fixes connect afresh (their writing sessions carry the replication origin "repair") and
    /// run one at a time with the service's checks.
    pub async fn fix(&self, req: RepairRequest) -> Result<Vec<serde_json::Value>, ApiError> {
        let r = self.plan(&req)?;
        let _one_at_a_time = self.nodes.lock().await;
        let out = fix_tables(&r, "the configuration", req.dry_run, req.prefer).await.map_err(|e| match e {
            FixError::Request(message) => bad_request(message),
            FixError::Repair(e) => repair_error(e),
            FixError::Describe { table, error } => {
                let status = if error.is_transient() {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::UNPROCESSABLE_ENTITY
                };
                let message = format!("{table}: {}", error.chain());
                ApiError(status, synapse_error::body(error.code(), &message, error.hint()))
            }
        })?;
        Ok(out.iter().map(|(c, f)| serde_json::json!({"check": c, "fix": f})).collect())
    }

    /// `POST /v1/repair/check` and `POST /v1/repair/fix` (the API adds the `repair` scope).
    pub fn router(self: std::sync::Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/v1/repair/fix", axum::routing::post(fix_route))
            .route("/v1/repair/check", axum::routing::post(check_route))
            .with_state(self)
    }
}
