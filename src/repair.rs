//! `synapse repair check` and `synapse repair fix`: compare tables between nodes of a
//! configuration and, for a mesh, resolve what differs (see `synapse-repair`).

use crate::config::Config;
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;
use synapse_repair::check::{check, CheckOptions, Report};
use synapse_repair::fix::{fix, FixNode, FixOptions, FixReport};
use synapse_repair::node::Node;
use synapse_repair::one_way::{fix_one_way, OneWayTarget};

/// What to compare, shared by `check` and `fix`.
#[derive(clap::Args)]
pub struct Selection {
    #[arg(long, short)]
    config: std::path::PathBuf,
    /// `schema.table` to compare (repeatable); default: the mesh tables, else every source's tables.
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Node names (mesh nodes, sources or targets) to compare; default: every mesh node, else
    /// every source and target.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// log2 of the Merkle tree's bucket count; a differing bucket is split in 32 sub-buckets.
    /// 12 (4,096 buckets) suits up to a few million rows; add one per doubling beyond.
    #[arg(long, default_value_t = 12)]
    bits: u8,
    /// Seconds to wait for the appliers between the nodes to apply what each node had
    /// committed when the check read it (changes in flight are then not taken for drift).
    #[arg(long, default_value_t = 60.0)]
    cut_timeout: f64,
    /// Compare the snapshots as they are, without waiting for appliers (a stopped pipeline):
    /// changes still in flight may be reported as differences.
    #[arg(long)]
    no_wait: bool,
    /// Print the reports as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct FixArgs {
    #[command(flatten)]
    selection: Selection,
    /// Show what would change on each node, then roll everything back.
    #[arg(long)]
    dry_run: bool,
    /// Where nodes hold the same version of a row with different data (written outside the
    /// mesh), this node's row wins.
    #[arg(long)]
    prefer: Option<String>,
}

struct Resolved {
    config: Config,
    nodes: Vec<(String, tokio_postgres::Config)>,
    tables: Vec<String>,
    options: CheckOptions,
}

fn resolve(o: &Selection) -> anyhow::Result<Resolved> {
    let config = Config::load(&o.config)?;
    let timeout = (!o.no_wait).then_some(o.cut_timeout);
    plan(config, &o.config.display().to_string(), &o.tables, &o.nodes, o.bits, timeout)
}

/// What to compare: the named (or default) nodes and tables of `config`, and how.
fn plan(
    config: Config,
    source: &str,
    tables: &[String],
    nodes: &[String],
    bits: u8,
    cut_timeout: Option<f64>,
) -> anyhow::Result<Resolved> {
    let mut known: Vec<(String, tokio_postgres::Config)> = Vec::new();
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
    Ok(Resolved { config, nodes, tables, options })
}

/// Exit status: 0 identical, 1 differences found (like `diff`); errors are reported by the caller.
pub async fn run_check(o: Selection) -> anyhow::Result<ExitCode> {
    let r = resolve(&o)?;
    // Connected all at once; an error names the first node in order that failed.
    let mut nodes = Vec::new();
    for node in futures_util::future::join_all(r.nodes.iter().map(|(name, pg)| Node::connect(name, pg))).await {
        nodes.push(node.map_err(with_hint)?);
    }
    let mut reports: Vec<Report> = Vec::new();
    for table in &r.tables {
        reports.push(check(&nodes.iter().collect::<Vec<_>>(), table, &r.options).await.map_err(with_hint)?);
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print!("{}", human(r));
        }
    }
    let differ = reports.iter().any(|r| !r.differing.is_empty());
    Ok(if differ { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

#[derive(clap::Args)]
pub struct TrackArgs {
    #[command(flatten)]
    selection: Selection,
    /// Stop tracking instead: drop the triggers, the bucket index and the digests.
    #[arg(long)]
    stop: bool,
}

/// Installs (or with --stop removes) digest tracking for the selected tables on the selected
/// nodes (same bits on all).
pub async fn run_track(args: TrackArgs) -> anyhow::Result<()> {
    let o = args.selection;
    let r = resolve(&o)?;
    for (name, pg) in &r.nodes {
        let node = Node::connect(name, pg).await.map_err(with_hint)?;
        for table in &r.tables {
            let shape = node.describe(table).await.map_err(with_hint)?;
            if args.stop {
                node.untrack(&shape).await.map_err(with_hint)?;
                println!("{table} on {name}: no longer tracked");
                continue;
            }
            let started = std::time::Instant::now();
            let indexed = node.track(&shape, o.bits).await.map_err(with_hint)?;
            println!(
                "{table} on {name}: digests tracked with {} bits ({} ms){}",
                o.bits,
                started.elapsed().as_millis(),
                if indexed {
                    ""
                } else {
                    "; no bucket index (the key is hashed through its text): differing buckets are found by a scan"
                }
            );
        }
    }
    Ok(())
}

/// Exit status: 0 every difference found was resolved (or none), 1 some remain; errors are
/// reported by the caller.
pub async fn run_fix(o: FixArgs) -> anyhow::Result<ExitCode> {
    let r = resolve(&o.selection)?;
    let out =
        fix_tables(&r, &o.selection.config.display().to_string(), o.dry_run, o.prefer.clone()).await.map_err(|e| {
            match e {
                FixError::Request(message) => anyhow::anyhow!(message),
                FixError::Repair(e) => with_hint(e),
                FixError::Describe { table, error } => {
                    anyhow::anyhow!("[{}] {table}: {error}\n  hint: {}", error.code(), error.hint())
                }
            }
        })?;
    if o.selection.json {
        let json: Vec<_> = out.iter().map(|(c, f)| serde_json::json!({"check": c, "fix": f})).collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for (c, f) in &out {
            print!("{}", human(c));
            if let Some(f) = f {
                print!("{}", human_fix(f));
            }
        }
    }
    let left = out.iter().any(|(_, f)| f.as_ref().is_some_and(|f| !f.unresolved.is_empty()));
    Ok(if left { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Why a fix did not run (or stopped): the request, a node, or the mesh's view of a table.
enum FixError {
    Request(String),
    Repair(synapse_repair::RepairError),
    Describe { table: String, error: synapse_apply::ApplyError },
}

/// Checks each table of `r` and resolves what differs (see `synapse_repair::fix`), for the
/// CLI and the admin API. `source` names the configuration in errors.
async fn fix_tables(
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
    let source_node = Node::connect(origin, origin_pg).await.map_err(FixError::Repair)?;
    let mut targets = Vec::new();
    for (name, pg) in r.nodes.iter().filter(|(n, _)| n != origin) {
        targets.push(OneWayTarget::connect(name, pg).await.map_err(FixError::Repair)?);
    }
    let mut out = Vec::new();
    for table in &r.tables {
        let mut compared = vec![&source_node];
        compared.extend(targets.iter().map(|t| &t.node));
        let report = check(&compared, table, &r.options).await.map_err(FixError::Repair)?;
        let fixed = if report.differing.is_empty() {
            None
        } else {
            let shape = source_node.describe(table).await.map_err(FixError::Repair)?;
            Some(
                fix_one_way(&source_node, &targets, &shape, &report.differing, dry_run)
                    .await
                    .map_err(FixError::Repair)?,
            )
        };
        out.push((report, fixed));
    }
    Ok(out)
}

fn with_hint(e: synapse_repair::RepairError) -> anyhow::Error {
    anyhow::anyhow!("[{}] {}\n  hint: {}", e.code(), e.full_message(), e.hint())
}

fn key_text(k: &[String]) -> String {
    k.join(",")
}

fn human(r: &Report) -> String {
    let mut out = format!(
        "{} on {}: {} rows; {} of {} buckets ({}, {}) differ ({} {} compared)",
        r.table,
        r.nodes.join(", "),
        r.rows.iter().map(u64::to_string).collect::<Vec<_>>().join(" / "),
        r.differing_buckets,
        r.buckets,
        r.buckets_by,
        r.digests,
        r.compared,
        if r.digests == "tracked" { "bucket pairs" } else { "tree nodes" },
    );
    if !r.changing.is_empty() {
        out.push_str(&format!("; {} key(s) changing during the check, left for the next one", r.changing.len()));
    }
    if r.differing.is_empty() {
        out.push_str(": identical\n");
        return out;
    }
    out.push_str(&format!(": {} key(s) differ\n", r.differing.len()));
    for d in &r.differing {
        let mut parts = Vec::new();
        if !d.missing_on.is_empty() {
            parts.push(format!("missing on {}", d.missing_on.join(",")));
        }
        if d.holders.len() > 1 {
            parts.push(format!(
                "different rows: {}",
                d.holders.iter().map(|g| g.join(",")).collect::<Vec<_>>().join(" | ")
            ));
        }
        out.push_str(&format!("  {}: {}\n", key_text(&d.key), parts.join("; ")));
    }
    out
}

fn human_fix(f: &FixReport) -> String {
    let verb = if f.dry_run { "would change (dry run, rolled back)" } else { "changed" };
    let mut out = String::new();
    for n in &f.nodes {
        let list = |v: &[Vec<String>]| v.iter().map(|k| key_text(k)).collect::<Vec<_>>().join(" ");
        let mut parts = Vec::new();
        for (label, v) in [("inserted", &n.inserted), ("updated", &n.updated), ("deleted", &n.deleted)] {
            if !v.is_empty() {
                parts.push(format!("{label} {}", list(v)));
            }
        }
        if !n.versions_only.is_empty() {
            parts.push(format!("metadata only {}", list(&n.versions_only)));
        }
        if n.conflicts > 0 {
            parts.push(format!("{} conflict(s) logged", n.conflicts));
        }
        if parts.is_empty() {
            parts.push("nothing".into());
        }
        out.push_str(&format!("  {verb} on {}: {}\n", n.node, parts.join("; ")));
    }
    for u in &f.unresolved {
        out.push_str(&format!("  unresolved {}: {}\n", key_text(&u.key), u.reason));
    }
    out
}

/// The admin API's repair checks, served by `synapse run` on the ops address: connections to
/// the nodes stay open between requests (a check of tracked digests then costs milliseconds),
/// and checks run one at a time (a connection holds one snapshot).
pub struct RepairService {
    config: Config,
    nodes: tokio::sync::Mutex<HashMap<String, Node>>,
}

/// `POST /repair/check` and `POST /repair/fix` body: every field optional, as the CLI's options.
#[derive(serde::Deserialize, Default)]
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

/// A failed request: HTTP status and a body naming the code, the error and what to do.
pub struct ApiError(axum::http::StatusCode, serde_json::Value);

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

fn bad_request(message: String) -> ApiError {
    ApiError(axum::http::StatusCode::BAD_REQUEST, serde_json::json!({"error": message}))
}

fn repair_error(e: synapse_repair::RepairError) -> ApiError {
    let status = if e.is_transient() {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY
    };
    ApiError(status, serde_json::json!({"code": e.code(), "error": e.full_message(), "hint": e.hint()}))
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
            return Err(bad_request("dry_run and prefer are options of POST /repair/fix, not of a check".into()));
        }
        let r = self.plan(&req)?;
        let mut open = self.nodes.lock().await;
        for (name, pg) in &r.nodes {
            if !open.contains_key(name) {
                let node = Node::connect(name, pg).await.map_err(repair_error)?;
                open.insert(name.clone(), node);
            }
        }
        let nodes: Vec<&Node> = r.nodes.iter().filter_map(|(n, _)| open.get(n)).collect();
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
                ApiError(
                    status,
                    serde_json::json!({"code": error.code(), "error": format!("{table}: {error}"), "hint": error.hint()}),
                )
            }
        })?;
        Ok(out.iter().map(|(c, f)| serde_json::json!({"check": c, "fix": f})).collect())
    }

    /// `POST /repair/check` and `POST /repair/fix`.
    pub fn router(self: std::sync::Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(
                "/repair/fix",
                axum::routing::post(
                    |axum::extract::State(s): axum::extract::State<std::sync::Arc<RepairService>>,
                     body: Option<axum::Json<RepairRequest>>| async move {
                        s.fix(body.map(|b| b.0).unwrap_or_default()).await.map(axum::Json)
                    },
                ),
            )
            .route(
                "/repair/check",
                axum::routing::post(
                    |axum::extract::State(s): axum::extract::State<std::sync::Arc<RepairService>>,
                     body: Option<axum::Json<RepairRequest>>| async move {
                        s.check(body.map(|b| b.0).unwrap_or_default()).await.map(axum::Json)
                    },
                ),
            )
            .with_state(self)
    }
}
