//! `synapse repair check` and `synapse repair fix`: compare tables between nodes of a
//! configuration and, for a mesh, resolve what differs (see `synapse-repair`).

use std::process::ExitCode;
use synapse_error::Classify;
use synapse_repair::check::{check, Report};
use synapse_repair::fix::FixReport;
use synapse_repair::node::Node;
use synapse_runtime::config::Config;
use synapse_runtime::repair::{fix_tables, plan, FixError, Resolved};

/// What to compare, shared by `check` and `fix`.
#[derive(clap::Args)]
pub struct Selection {
    /// The configuration file naming the nodes (mesh nodes, sources, targets).
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

fn resolve(o: &Selection) -> anyhow::Result<Resolved> {
    let config = Config::load(&o.config)?;
    let timeout = (!o.no_wait).then_some(o.cut_timeout);
    plan(config, &o.config.display().to_string(), &o.tables, &o.nodes, o.bits, timeout)
}

/// Exit status: 0 identical, 1 differences found (like `diff`); errors are reported by the caller.
pub async fn run_check(o: Selection) -> anyhow::Result<ExitCode> {
    let r = resolve(&o)?;
    // Connected all at once; an error names the first node in order that failed.
    let mut nodes = Vec::new();
    for node in futures_util::future::join_all(r.nodes.iter().map(|(name, pg)| r.connect(name, pg))).await {
        nodes.push(node.map_err(with_hint)?);
    }
    let mut reports: Vec<Report> = Vec::new();
    let bar = progress(r.tables.len(), "repair check")?;
    for table in &r.tables {
        bar.set_message(table.clone());
        reports.push(check(&nodes.iter().collect::<Vec<_>>(), table, &r.options).await.map_err(with_hint)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
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
    let bar = progress(r.tables.len(), if o.dry_run { "repair fix --dry-run" } else { "repair fix" })?;
    bar.set_message(format!("checking and fixing {} table(s) at one cut", r.tables.len()));
    let out = fix_tables(&r, &o.selection.config.display().to_string(), o.dry_run, o.prefer.clone()).await;
    bar.finish_and_clear();
    let out = out.map_err(|e| match e {
        FixError::Request(message) => anyhow::anyhow!(message),
        FixError::Repair(e) => with_hint(e),
        FixError::Describe { table, error } => {
            anyhow::anyhow!("[{}] {table}: {error}\n  hint: {}", error.code(), error.hint())
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

/// A bar over the tables on stderr (with elapsed time and ETA; hidden when stderr is not a
/// terminal, so scripts and `--json` output stay clean).
fn progress(tables: usize, what: &str) -> anyhow::Result<indicatif::ProgressBar> {
    let bar = indicatif::ProgressBar::new(tables as u64).with_style(indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} tables · {elapsed} elapsed · ETA {eta} · {msg}",
    )?);
    bar.set_prefix(what.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    Ok(bar)
}

fn with_hint(e: synapse_repair::RepairError) -> anyhow::Error {
    anyhow::anyhow!("[{}] {}\n  hint: {}", e.code(), e.chain(), e.hint())
}

fn key_text(k: &[String]) -> String {
    k.join(",")
}

pub(crate) fn human(r: &Report) -> String {
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
