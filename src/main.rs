//! The `synapse` command line: parses arguments and calls the crates. What `synapse run` does
//! is in `synapse-runtime`; the benchmarks are the `synapse-bench` binary (bench/).

mod admin_args;
mod mesh;
mod quickstart;
mod quickstart_mesh;
mod repair;
mod shards;
mod status;
mod telemetry;

use clap::{Parser, Subcommand};

/// The pipeline allocates a string per column value; glibc's malloc/free were ~16% of synapse's
/// CPU in the P1 profile (`synapse-bench --profile`). mimalloc's thread-local free lists cut that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns freed memory to the OS 100 ms after it is freed (mimalloc's default is 10 ms; it
/// was 0 from `d847e6b`, for P7's peak RSS). Purging at once made every batch buffer fault in
/// fresh, zeroed 2 MiB pages: after the capture's read pacing, 41 % of synapse's CPU in P1 was
/// page faults and 6 % `madvise`. `synapse-bench --scenarios P1,P2,P4,P7 --repeat 3`, same
/// build, `MIMALLOC_PURGE_DELAY=0|100`: P7t (1 GB transaction, × the source's own time) 4.0×
/// → 3.0× (PostgreSQL's subscription 3.7–3.8×), P7 peak RSS 163 → 212 MiB (198–218; goal
/// < 256), P3 1.28× → 1.38×, P1 and P2 within noise. With no purging at all P7t was 2.7× but
/// protocol 1's peak RSS 303 MiB.
#[allow(unsafe_code)]
fn purge_freed_memory_soon() {
    // `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (include/mimalloc.h); the -sys
    // crate only names the v2 constants.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // mimalloc's own variable, when set, decides (it is read at start-up).
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets a process-wide allocator option; mimalloc documents it as callable at any
    // time from any thread, and it takes plain integers.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 100) };
}
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use synapse_runtime::config::Config;

#[derive(Parser)]
#[command(name = "synapse", version, about = "Change-data-capture replication and streaming for PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What the running synapse runs: nodes, captures and appliers with state, lag and the fix
    /// of anything parked (exit 1 unless every part runs); --watch redraws every 2 s.
    Status(status::StatusArgs),
    /// Deliver a webhook endpoint's events again, from a time (--since 2026-11-26T10:00:00Z) or a
    /// cursor (--cursor, as an event's `synapsecursor`), on the running synapse.
    Replay {
        /// The endpoint (as named in webhooks: or created through the API).
        endpoint: String,
        #[arg(long, conflicts_with = "cursor", required_unless_present = "cursor")]
        since: Option<String>,
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        admin: admin_args::AdminArgs,
    },
    /// Print a completion script for a shell (bash, zsh, fish, elvish, powershell), e.g.
    /// `synapse completions bash > /etc/bash_completion.d/synapse`.
    Completions { shell: clap_complete::Shell },
    /// Move a shard set to the placement of its `resharding` section, step by step: plan,
    /// start, status, verify, switch, reverse, finish (see the README's "Resharding").
    Shards(shards::ShardsArgs),
    /// The mesh's membership: status [--watch], or join a node from a donor's snapshot while
    /// every node keeps writing (see the README's "Adding and removing a region").
    Mesh(mesh::MeshArgs),
    /// Run the pipelines of a configuration file until SIGINT/SIGTERM.
    Run {
        /// The configuration file (YAML, or TOML by its .toml ending); see deploy/synapse.example.yaml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file without connecting anywhere.
    Validate {
        /// The configuration file (YAML, or TOML by its .toml ending); see deploy/synapse.example.yaml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check sources and targets for what replication needs, with the fix for each problem.
    Doctor {
        /// The configuration file (YAML, or TOML by its .toml ending); see deploy/synapse.example.yaml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Try every parked component of the running `synapse run` again now (what SIGHUP does),
    /// through its API with an `admin` token; prints what was parked.
    Resume {
        /// The configuration file the process runs (its api.listen is where to ask).
        #[arg(long, short)]
        config: PathBuf,
        /// The environment variable holding the admin token.
        #[arg(long, default_value = "SYNAPSE_TOKEN")]
        token_env: String,
        /// Accept the gap source NAME's capture is parked on (CAP011): it makes a new slot and
        /// goes on, and stream and webhook consumers are told; then `synapse repair fix`
        /// restores on the targets what the gap lost. Repeatable.
        #[arg(long, value_name = "NAME")]
        accept_gap: Vec<String>,
        /// With api.tls: the CA certificate (PEM) that signed the API's certificate, if the
        /// system's roots do not hold it.
        #[arg(long, value_name = "FILE")]
        cacert: Option<PathBuf>,
    },
    /// Have a target pass one schema change of a source (parked there with APP009): after you
    /// made it by hand, or decided the target does without it. Recorded on the target in
    /// `synapse.schema_skips` with who and when; then `synapse resume`.
    SkipDdl {
        /// The configuration file (the target's URL is read from it).
        #[arg(long, short)]
        config: PathBuf,
        /// The source whose change it is.
        #[arg(long)]
        source: String,
        /// The target that passes it.
        #[arg(long)]
        target: String,
        /// The change's log offset, as APP009 names it.
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=i64::MAX as u64))]
        offset: u64,
        /// Who decided (recorded; default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Compare tables between nodes: Merkle digests computed on each node, then only the rows of
    /// differing buckets (`check` only reads; `fix` and `track` write).
    #[command(subcommand)]
    Repair(RepairCommand),
    /// See live replication: two local demo nodes, or --source/--target URLs.
    Quickstart {
        /// Your source database's URL (postgres://user:password@host:5432/db); with --target
        /// instead of the two local demo nodes.
        #[arg(long, requires = "target")]
        source: Option<String>,
        /// The database to replicate into (an empty database: tables are created and copied).
        #[arg(long, requires = "source")]
        target: Option<String>,
        /// Where the log lives (resume by rerunning with the same directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<f64>,
        /// Address for /metrics, /livez, /readyz ("" disables).
        #[arg(long, default_value = "127.0.0.1:9187")]
        ops_listen: String,
        /// Address of the streaming and webhook API ("" disables).
        #[arg(long, default_value = synapse_runtime::config::defaults::API_LISTEN)]
        api_listen: String,
        /// Instead: a writable mesh of this many local nodes (2–5), showing a concurrent update
        /// resolved and a counter converging.
        #[arg(long, conflicts_with_all = ["source", "target"])]
        regions: Option<usize>,
    },
}

#[derive(Subcommand)]
enum RepairCommand {
    /// Report the keys whose rows differ between nodes (exit 1 if any differ).
    Check(repair::Selection),
    /// Resolve the rows mesh nodes hold differently through the resolver (causality decides),
    /// written like the applier writes them (origin `repair`); --dry-run shows what would change.
    Fix(repair::FixArgs),
    /// Keep the tables' bucket digests current on every node (triggers record each write's
    /// change to its bucket), so later checks read them instead of scanning: cost by changes.
    /// --stop removes it.
    Track(repair::TrackArgs),
}

fn main() -> ExitCode {
    // An explicit MIMALLOC_PURGE_DELAY in the environment still wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        purge_freed_memory_soon();
    }
    let cli = Cli::parse();
    let quiet = !matches!(cli.command, Command::Run { .. });
    // Flushes buffered spans when main returns (after the runtime, declared below, is gone).
    let _telemetry = telemetry::init(if quiet { "warn" } else { "info" });
    let _ = synapse_runtime::ops::metrics_handle();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<ExitCode> = rt.block_on(async {
        match cli.command {
            Command::Status(a) => Ok(status::run(a).await.unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            })),
            Command::Replay { endpoint, since, cursor, admin } => {
                let config = Config::load(&admin.config)?;
                let api =
                    synapse_runtime::admin_client::AdminClient::new(&config, &admin.token_env, admin.cacert.as_deref())
                        .await?;
                let body = match (since, cursor) {
                    (Some(t), _) => serde_json::json!({ "since": t }),
                    (None, c) => serde_json::json!({ "cursor": c }),
                };
                let v = api.post(&format!("/v1/endpoints/{endpoint}/replay"), &body).await?;
                println!("{endpoint}: delivering again from {}", v["replay_from"]);
                Ok(ExitCode::SUCCESS)
            }
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(shell, &mut Cli::command(), "synapse", &mut std::io::stdout());
                Ok(ExitCode::SUCCESS)
            }
            Command::Run { config } => {
                synapse_runtime::run(Config::load(&config)?, Some(config)).await.map(|_| ExitCode::SUCCESS)
            }
            // Exit 1 from verify means "rows differ" (like repair check).
            Command::Shards(a) => Ok(shards::run(a).await.unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            })),
            Command::Mesh(a) => Ok(mesh::run(a).await.unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            })),
            Command::Validate { config } => {
                let c = Config::load(&config)?;
                println!("{}: ok ({})", config.display(), c.summary());
                Ok(ExitCode::SUCCESS)
            }
            Command::Resume { config, token_env, accept_gap, cacert } => {
                resume(&Config::load(&config)?, &token_env, &accept_gap, cacert.as_deref()).await
            }
            Command::SkipDdl { config, source, target, offset, by } => {
                skip_ddl(&Config::load(&config)?, &source, &target, offset, by).await
            }
            Command::Doctor { config } => {
                let c = Config::load(&config)?;
                let failed = synapse_runtime::doctor::run(&c).await;
                if failed == 0 {
                    println!("all checks passed");
                    Ok(ExitCode::SUCCESS)
                } else {
                    println!("{failed} check(s) failed");
                    Ok(ExitCode::FAILURE)
                }
            }
            // Exit 1 means "rows differ" here (like diff), so a failed check exits 2.
            Command::Repair(RepairCommand::Check(o)) => Ok(repair::run_check(o).await.unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            })),
            Command::Repair(RepairCommand::Track(o)) => repair::run_track(o).await.map(|_| ExitCode::SUCCESS),
            Command::Repair(RepairCommand::Fix(o)) => Ok(repair::run_fix(o).await.unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            })),
            Command::Quickstart { regions: Some(n), duration, ops_listen, .. } => {
                quickstart_mesh::run(n, duration.map(Duration::from_secs_f64), ops_listen)
                    .await
                    .map(|_| ExitCode::SUCCESS)
            }
            Command::Quickstart { source, target, data_dir, duration, ops_listen, api_listen, regions: None } => {
                let opts = quickstart::Options {
                    source,
                    target,
                    data_dir,
                    duration: duration.map(Duration::from_secs_f64),
                    ops_listen,
                    api_listen,
                };
                quickstart::run(opts).await.map(|_| ExitCode::SUCCESS)
            }
        }
    });
    // Connections and blocking tasks must not hold the process open after the work is done.
    rt.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `synapse skip-ddl`: records the change to pass in the target's `synapse.schema_skips`.
async fn skip_ddl(
    config: &Config,
    source: &str,
    target: &str,
    offset: u64,
    by: Option<String>,
) -> anyhow::Result<ExitCode> {
    if !config.sources.iter().any(|s| s.name == source) {
        anyhow::bail!("--source: no source is named `{source}` in the configuration");
    }
    let Some(t) = config.targets.iter().find(|t| t.name == target) else {
        anyhow::bail!("--target: no target is named `{target}` in the configuration");
    };
    let by = by.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into());
    let pg = t.url.pg_config().map_err(|e| anyhow::anyhow!("targets[{target}].url: {e}"))?;
    let client = synapse_postgres::connect(&pg, "recording a schema change to skip")
        .await
        .map_err(|e| anyhow::anyhow!("connecting to target {target}: {e}"))?;
    let recorded =
        synapse_apply::target::record_schema_skip(&client, source, offset, &format!("synapse skip-ddl by {by}"))
            .await
            .map_err(|e| anyhow::anyhow!("target {target}: {e}"))?;
    if !recorded {
        println!("already recorded: target {target} passes source {source}'s schema change at log offset {offset}");
    } else {
        println!("recorded: target {target} passes source {source}'s schema change at log offset {offset}");
    }
    println!("next: `synapse resume` (or wait for the next retry)");
    Ok(ExitCode::SUCCESS)
}

/// `synapse resume`: `POST /v1/components/resume` on the configuration's API.
async fn resume(
    config: &Config,
    token_env: &str,
    accept_gap: &[String],
    cacert: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let api = synapse_runtime::admin_client::AdminClient::new(config, token_env, cacert).await?;
    let body = api.post("/v1/components/resume", &serde_json::json!({ "accept_gap": accept_gap })).await?;
    match body["resumed"].as_array() {
        Some(parked) if !parked.is_empty() => {
            for p in parked {
                println!("trying again: {}", p.as_str().unwrap_or("?"));
            }
        }
        _ => println!("nothing is parked"),
    }
    for source in accept_gap {
        println!("gap accepted: capture/{source} makes a new slot; then run `synapse repair fix` for its targets");
    }
    Ok(ExitCode::SUCCESS)
}
