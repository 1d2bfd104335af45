//! `synapse shards plan|start|status|verify|switch|reverse|finish`: a shard set's move to the
//! placement of its `resharding` section (see `synapse_runtime::resharding`). `plan` and
//! `verify` work from the configuration; the other steps ask the running synapse (its admin
//! API, scope `admin`).

use std::process::ExitCode;
use synapse_repair::check::check;
use synapse_runtime::admin_client::AdminClient;
use synapse_runtime::config::{Config, ReshardRole, TargetConfig};

#[derive(clap::Args)]
pub struct ShardsArgs {
    /// plan, start, status, verify, switch, reverse or finish.
    step: String,
    #[command(flatten)]
    admin: crate::admin_args::AdminArgs,
    /// The shard set (the target's name).
    #[arg(long)]
    set: String,
    /// status: follow the new shards' copy and catch-up as progress bars until every one has
    /// applied its sources' logs up to their heads.
    #[arg(long)]
    watch: bool,
}

fn shards<'a>(config: &'a Config, set: &str) -> Vec<&'a TargetConfig> {
    config.targets.iter().filter(|t| t.shard.as_ref().is_some_and(|s| s.set == set)).collect()
}

fn role(t: &TargetConfig) -> &'static str {
    match t.reshard_role {
        Some(ReshardRole::New) => "new",
        Some(ReshardRole::Retired) => "retired",
        None => "kept",
    }
}

pub async fn run(a: ShardsArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&a.admin.config)?;
    let set = shards(&config, &a.set);
    if set.is_empty() {
        anyhow::bail!("--set: {} is not a shard set of {}", a.set, a.admin.config.display());
    }
    if !set.iter().any(|t| t.reshard_role.is_some()) && a.step != "status" {
        anyhow::bail!("--set: {} has no resharding section: write the placement to move to there first", a.set);
    }
    match a.step.as_str() {
        "plan" => plan(&config, &set),
        "verify" => verify(&config, &set).await,
        "status" | "start" | "switch" | "reverse" | "finish" => {
            let api = AdminClient::new(&config, &a.admin.token_env, a.admin.cacert.as_deref()).await?;
            let path = format!("/v1/shards/{}", a.set);
            let status = match a.step.as_str() {
                "status" if a.watch => return watch(&api, &path).await,
                "status" => api.get(&path).await?,
                step => api.post(&format!("{path}/{step}"), &serde_json::json!({})).await?,
            };
            print_status(&status);
            Ok(ExitCode::SUCCESS)
        }
        other => anyhow::bail!("`{other}` is not a step: plan, start, status, verify, switch, reverse or finish"),
    }
}

fn plan(config: &Config, set: &[&TargetConfig]) -> anyhow::Result<ExitCode> {
    let range =
        |t: &TargetConfig| t.shard.as_ref().map(|s| s.key_range).unwrap_or(synapse_apply::shards::KeyRange::FULL);
    println!("shard        role     key range   rows from");
    for t in set {
        let from: Vec<String> = match t.reshard_role {
            Some(ReshardRole::New) => set
                .iter()
                .filter(|o| o.reshard_role != Some(ReshardRole::New))
                .filter(|o| {
                    let (a, b) = (range(t), range(o));
                    a.start < b.end.unwrap_or(u64::MAX) && b.start < a.end.unwrap_or(u64::MAX)
                })
                .map(|o| o.name.clone())
                .collect(),
            _ => Vec::new(),
        };
        println!("{:<12} {:<8} {:<11} {}", t.name, role(t), range(t).to_string(), from.join(", "));
    }
    if let Some(t) = set.iter().find(|t| t.reshard_role == Some(ReshardRole::New)) {
        let sources: Vec<&str> = config.sources_of(t).map(|s| s.name.as_str()).collect();
        println!(
            "\nstart copies each new shard's rows from a snapshot of {} and applies the log from there; the current \
             placement serves until switch. Then: synapse shards status / verify / switch.",
            sources.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Compares each new shard with its rows of each of its sources (repair check, with a cut).
async fn verify(config: &Config, set: &[&TargetConfig]) -> anyhow::Result<ExitCode> {
    let mut differ = false;
    for t in set.iter().filter(|t| t.reshard_role == Some(ReshardRole::New)) {
        let Some(shard) = &t.shard else { continue };
        for source in config.sources_of(t) {
            let mut tables: Vec<String> = shard.rules.keys().cloned().collect();
            tables.extend(source.tables.iter().filter(|n| !shard.rules.contains_key(*n)).cloned());
            let nodes = [source.name.clone(), t.name.clone()];
            let r =
                synapse_runtime::repair::plan(config.clone(), "the configuration", &tables, &nodes, 12, Some(60.0))?;
            let mut connected = Vec::new();
            for (name, pg) in &r.nodes {
                connected.push(r.connect(name, pg).await?);
            }
            for table in &r.tables {
                let report = check(&connected.iter().collect::<Vec<_>>(), table, &r.options).await?;
                differ |= !report.differing.is_empty();
                print!("{}: {}", t.name, crate::repair::human(&report));
            }
        }
    }
    println!(
        "{}",
        if differ {
            "the new shards differ from their source: do not switch"
        } else {
            "the new shards hold their rows of the source"
        }
    );
    Ok(if differ { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn print_status(v: &serde_json::Value) {
    println!("{} — {}", v["set"].as_str().unwrap_or("?"), v["phase"].as_str().unwrap_or("?"));
    for s in v["shards"].as_array().into_iter().flatten() {
        let applied: Vec<String> = s["appliers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} applied to {} (log offset {})",
                    p["source"].as_str().unwrap_or("?"),
                    p["applied_lsn"].as_str().unwrap_or("?"),
                    p["next_offset"]
                )
            })
            .collect();
        println!(
            "  {:<14} {:<8} {:<10} {:<8} {}",
            s["target"].as_str().unwrap_or("?"),
            s["role"].as_str().unwrap_or("?"),
            s["key_range"].as_str().unwrap_or("-"),
            if s["serving"] == true { "serving" } else { "" },
            if applied.is_empty() { "not running".to_owned() } else { applied.join("; ") }
        );
    }
}

/// `status --watch`: a bar per new shard — rows copied while it copies, then its position in
/// the source's log against the log's head — redrawn twice a second until all have caught up.
async fn watch(api: &AdminClient, path: &str) -> anyhow::Result<ExitCode> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:<14} [{bar:30}] {pos}/{len} log records {msg}")?.progress_chars("=> ");
    let mut shown: std::collections::BTreeMap<String, ProgressBar> = std::collections::BTreeMap::new();
    loop {
        let status = api.get(path).await?;
        if status["phase"] == "not started" {
            print_status(&status);
            println!("the move has not started: synapse shards start");
            return Ok(ExitCode::SUCCESS);
        }
        let head = |source: &str| {
            status["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["source"] == source)
                .and_then(|s| s["log_next_offset"].as_u64())
        };
        let mut behind = false;
        for s in status["shards"].as_array().into_iter().flatten().filter(|s| s["role"] == "new") {
            let name = s["target"].as_str().unwrap_or("?").to_owned();
            let bar = shown.entry(name.clone()).or_insert_with(|| {
                let b = bars.add(ProgressBar::new(0).with_style(style.clone()));
                b.set_prefix(name.clone());
                b
            });
            let appliers = s["appliers"].as_array().cloned().unwrap_or_default();
            if appliers.is_empty() {
                bar.set_message("not running yet");
                behind = true;
                continue;
            }
            let (mut pos, mut len, mut copied) = (0, 0, 0);
            for p in &appliers {
                pos += p["next_offset"].as_u64().unwrap_or(0);
                len += head(p["source"].as_str().unwrap_or("")).unwrap_or(0);
                copied += p["rows_copied"].as_u64().unwrap_or(0);
            }
            behind |= pos < len;
            bar.set_length(len.max(pos));
            bar.set_position(pos);
            bar.set_message(format!("{copied} rows copied{}", if s["serving"] == true { ", serving" } else { "" }));
        }
        if !behind {
            for b in shown.values() {
                b.finish();
            }
            println!(
                "{}: every new shard has caught up ({})",
                status["set"].as_str().unwrap_or("?"),
                status["phase"].as_str().unwrap_or("?")
            );
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
