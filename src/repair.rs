//! `synapse repair check`: compares tables between nodes of a configuration (see
//! `synapse-repair`). Reads only.

use crate::config::Config;
use std::process::ExitCode;
use synapse_repair::node::{check, Node, Report};

#[derive(clap::Args)]
pub struct CheckOptions {
    #[arg(long, short)]
    config: std::path::PathBuf,
    /// `schema.table` to compare (repeatable); default: the mesh tables, else every source's tables.
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Node names (mesh nodes, sources or targets) to compare, the first against each other;
    /// default: every mesh node, else every source and target.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// log2 of the bucket count (about one bucket per 16–64 rows; 12 = 4096 buckets).
    #[arg(long, default_value_t = 12)]
    bits: u8,
    /// Print the reports as JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Exit status: 0 identical, 1 differences found (like `diff`); errors are reported by the caller.
pub async fn run_check(o: CheckOptions) -> anyhow::Result<ExitCode> {
    let config = Config::load(&o.config)?;
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
    let names: Vec<String> = if o.nodes.is_empty() {
        match &config.mesh {
            Some(m) => m.nodes.iter().map(|n| n.name.clone()).collect(),
            None => known.iter().map(|(n, _)| n.clone()).collect(),
        }
    } else {
        o.nodes.clone()
    };
    if names.len() < 2 {
        anyhow::bail!("--nodes: name at least two nodes of the configuration to compare");
    }
    let tables: Vec<String> = if !o.tables.is_empty() {
        o.tables.clone()
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
    let mut nodes = Vec::new();
    for name in &names {
        let Some((_, pg)) = known.iter().find(|(n, _)| n == name) else {
            anyhow::bail!(
                "--nodes: `{name}` is not a node of {} (known: {})",
                o.config.display(),
                known.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            );
        };
        nodes.push(Node::connect(name, pg).await.map_err(with_hint)?);
    }
    let mut reports: Vec<Report> = Vec::new();
    for table in &tables {
        for other in &nodes[1..] {
            reports.push(check(&nodes[0], other, table, o.bits).await.map_err(with_hint)?);
        }
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print!("{}", human(r));
        }
    }
    let differ = reports.iter().any(|r| !r.diff.is_empty());
    Ok(if differ { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn with_hint(e: synapse_repair::RepairError) -> anyhow::Error {
    anyhow::anyhow!("[{}] {e}\n  hint: {}", e.code(), e.hint())
}

fn human(r: &Report) -> String {
    let [a, b] = &r.nodes;
    let mut out = format!(
        "{} {a} ↔ {b}: {} / {} rows; {} of {} buckets differ ({} tree nodes compared)",
        r.table, r.rows[0], r.rows[1], r.differing_buckets, r.buckets, r.compared
    );
    if r.diff.is_empty() {
        out.push_str(": identical\n");
        return out;
    }
    out.push('\n');
    let keys = |v: &[Vec<String>]| v.iter().map(|k| k.join(",")).collect::<Vec<_>>().join(" ");
    for (label, v) in [
        (format!("only on {a}"), &r.diff.only_left),
        (format!("only on {b}"), &r.diff.only_right),
        ("differ".to_owned(), &r.diff.differ),
    ] {
        if !v.is_empty() {
            out.push_str(&format!("  {label} ({}): {}\n", v.len(), keys(v)));
        }
    }
    out
}
