//! `synapse mesh status|join|leave`: the mesh's membership as the running synapse sees it, a
//! node joining from a donor's snapshot (followed as progress bars), a node leaving (see
//! `synapse_runtime::mesh_membership`). All ask the running synapse (its admin API, scope
//! `admin`).

use std::process::ExitCode;
use std::time::Duration;
use synapse_runtime::admin_client::AdminClient;
use synapse_runtime::config::Config;

#[derive(clap::Args)]
pub struct MeshArgs {
    /// status, join or leave.
    step: String,
    /// join, leave: the node (as named in mesh.nodes).
    node: Option<String>,
    #[command(flatten)]
    admin: crate::admin_args::AdminArgs,
    /// status: follow every joining node until all are members and caught up.
    #[arg(long)]
    watch: bool,
}

pub async fn run(a: MeshArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&a.admin.config)?;
    let Some(mesh) = &config.mesh else { anyhow::bail!("{} has no mesh section", a.admin.config.display()) };
    let api = AdminClient::new(&config, &a.admin.token_env, a.admin.cacert.as_deref()).await?;
    match (a.step.as_str(), a.node.as_deref()) {
        ("status", _) if a.watch => watch(&api, None).await,
        ("status", _) => {
            print_status(&api.get("/v1/mesh").await?);
            Ok(ExitCode::SUCCESS)
        }
        ("join", Some(node)) => {
            if !mesh.nodes.iter().any(|n| n.name == node) {
                anyhow::bail!(
                    "{node} is not in mesh.nodes of {}: add it there (and restart synapse) first",
                    a.admin.config.display()
                );
            }
            api.post(&format!("/v1/mesh/nodes/{node}/join"), &serde_json::json!({})).await?;
            watch(&api, Some(node)).await
        }
        ("leave", Some(node)) => {
            println!("{node}: delivering its writes to every node, then removing its slot, origins and positions…");
            api.post(&format!("/v1/mesh/nodes/{node}/leave"), &serde_json::json!({})).await?;
            print_status(&api.get("/v1/mesh").await?);
            println!("{node} left the mesh: remove it from mesh.nodes");
            Ok(ExitCode::SUCCESS)
        }
        ("join" | "leave", None) => anyhow::bail!("name the node: synapse mesh {} <node> --config …", a.step),
        (other, _) => anyhow::bail!("`{other}` is not a step: status, join or leave"),
    }
}

fn print_status(v: &serde_json::Value) {
    println!("node          id     phase     donor       behind  component");
    for n in v["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<13} {:<6} {:<9} {:<11} {:<7} {}",
            n["name"].as_str().unwrap_or("?"),
            n["id"],
            n["phase"].as_str().unwrap_or("?"),
            n["donor"].as_str().unwrap_or("-"),
            n["records_behind"],
            n["component"].as_str().unwrap_or("-"),
        );
    }
}

/// A bar per joining node (or `only`): rows copied while it copies, then the log records it
/// has still to apply, redrawn twice a second until each is a member and caught up.
async fn watch(api: &AdminClient, only: Option<&str>) -> anyhow::Result<ExitCode> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<12} {spinner} {msg}")?;
    let mut shown: std::collections::BTreeMap<String, ProgressBar> = std::collections::BTreeMap::new();
    loop {
        let status = api.get("/v1/mesh").await?;
        let mut pending = false;
        for n in status["nodes"].as_array().into_iter().flatten() {
            let name = n["name"].as_str().unwrap_or("?").to_owned();
            let settled = n["caught_up"] == true || n["phase"] == "left";
            if only.is_some_and(|o| o != name) || (only.is_none() && settled && !shown.contains_key(&name)) {
                continue;
            }
            let bar = shown.entry(name.clone()).or_insert_with(|| {
                let b = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
                b.set_prefix(name.clone());
                b
            });
            let join = &n["join"];
            let msg = match n["phase"].as_str().unwrap_or("?") {
                "joining" => format!(
                    "copying from {}: {}/{} tables, {} rows",
                    n["donor"].as_str().unwrap_or("?"),
                    join["tables_done"],
                    join["tables_total"],
                    join["rows_copied"]
                ),
                "member" if n["caught_up"] == true => "member, caught up".to_owned(),
                "member" => format!("member, catching up: {} log records behind", n["records_behind"]),
                "waiting" => "waiting to be joined".to_owned(),
                other => format!("{other} ({})", n["component"].as_str().unwrap_or("-")),
            };
            bar.set_message(msg);
            bar.tick();
            pending |= !settled;
        }
        if !pending {
            for b in shown.values() {
                b.finish();
            }
            print_status(&status);
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
