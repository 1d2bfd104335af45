//! `synapse status`: what the running synapse runs, as tables — the mesh's nodes, each source's
//! capture and each applier with its state, lag and (when parked) the error and its fix, the
//! vector indexes (`GET /v1/topology`, scope `admin`). Exit 0 when every part runs, 1 when any
//! is parked or retrying; `--watch` redraws every 2 s.

use serde_json::Value;
use std::process::ExitCode;
use std::time::Duration;
use synapse_runtime::admin_client::AdminClient;
use synapse_runtime::config::Config;

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    admin: crate::admin_args::AdminArgs,
    /// Redraw every 2 s until interrupted.
    #[arg(long)]
    watch: bool,
}

pub async fn run(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&a.admin.config)?;
    let api = AdminClient::new(&config, &a.admin.token_env, a.admin.cacert.as_deref()).await?;
    let mut seen = CopiesSeen::new();
    loop {
        let t = api.get("/v1/topology").await?;
        let text = render(&t, &mut seen);
        if a.watch {
            // Clear the screen and home the cursor, then the new table.
            print!("\x1b[2J\x1b[H{text}");
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        print!("{text}");
        return Ok(if t["ready"] == true { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn secs(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.2}"))
}

/// Per copying applier: when this process first saw it, and how many chunks were done then
/// (the ETA is the rate since).
type CopiesSeen = std::collections::BTreeMap<String, (std::time::Instant, u64)>;

/// A copy's bar: `[#####.....] 12/40 chunks · 3400 rows · ETA 1m 20s`.
fn copy_bar(name: &str, copy: &Value, rows: &Value, seen: &mut CopiesSeen) -> String {
    let (total, done) = (copy["chunks"].as_u64().unwrap_or(0), copy["chunks_done"].as_u64().unwrap_or(0));
    let width = 30usize;
    let filled = if total == 0 { 0 } else { (done as usize * width) / total as usize };
    let (since, first) = *seen.entry(name.to_owned()).or_insert((std::time::Instant::now(), done));
    let elapsed = since.elapsed().as_secs_f64();
    let eta = if done > first && elapsed > 0.0 {
        let secs = (total - done) as f64 * elapsed / (done - first) as f64;
        format!("ETA {}m {:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        "ETA -".to_owned()
    };
    format!(
        "  copying [{}{}] {done}/{total} chunks · {} rows · {eta}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        s(rows)
    )
}

/// The topology as text tables (also what the tests read).
fn render(t: &Value, seen: &mut CopiesSeen) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}", if t["ready"] == true { "ready: every part runs" } else { "NOT READY: see below" });
    let list = |k: &str| t[k].as_array().cloned().unwrap_or_default();
    let nodes = list("nodes");
    if !nodes.is_empty() {
        let _ = writeln!(out, "\n{:<14} {:<10} {:<9} {:>8}  caught up", "node", "region", "phase", "behind");
        for n in &nodes {
            let _ = writeln!(
                out,
                "{:<14} {:<10} {:<9} {:>8}  {}",
                s(&n["name"]),
                s(&n["region"]),
                s(&n["phase"]),
                s(&n["records_behind"]),
                if n["caught_up"] == true { "yes" } else { "no" }
            );
        }
    }
    let _ = writeln!(out, "\n{:<24} {:<10} {:>9} {:>12}  confirmed", "source", "state", "lag (s)", "slot lag B");
    for c in list("sources") {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:>9} {:>12}  {}",
            s(&c["source"]),
            s(&c["component"]["state"]),
            secs(&c["lag_seconds"]),
            s(&c["slot_lag_bytes"]),
            s(&c["confirmed_lsn"])
        );
    }
    let _ = writeln!(out, "\n{:<24} {:<10} {:>9} {:>12}  applied", "source -> target", "state", "lag (s)", "behind");
    let targets = list("targets");
    for a in &targets {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:>9} {:>12}  {}",
            format!("{} -> {}", s(&a["source"]), s(&a["target"])),
            s(&a["component"]["state"]),
            secs(&a["lag_seconds"]),
            s(&a["behind_records"]),
            s(&a["applied_lsn"])
        );
        if a["component"]["state"] == "copying" && a["copy"].is_object() {
            let name = format!("{}->{}", s(&a["source"]), s(&a["target"]));
            let _ = writeln!(out, "{}", copy_bar(&name, &a["copy"], &a["rows_copied"], seen));
        }
    }
    let indexes = list("indexes");
    if !indexes.is_empty() {
        let _ = writeln!(out, "\n{:<24} {:>10} {:>12}  position", "vector index", "items", "dead letters");
        for i in &indexes {
            let _ = writeln!(
                out,
                "{:<24} {:>10} {:>12}  {}",
                s(&i["name"]),
                s(&i["items"]),
                s(&i["dead_letters"]),
                s(&i["lsn"])
            );
        }
    }
    for c in list("components") {
        if c["error"].is_string() {
            let _ =
                writeln!(out, "\n{} is {}: {} {}", s(&c["component"]), s(&c["state"]), s(&c["code"]), s(&c["error"]));
            if c["hint"].is_string() {
                let _ = writeln!(out, "  fix: {}", s(&c["hint"]));
            }
        }
    }
    out
}
