//! SynapseDB's runtime: what `synapse run` does, as a library the CLI, the benchmarks and the
//! tests call.
//!
//! ```text
//!  config file ──► config::Config::load ──► pipeline::start ──► per source:
//!                  (interpolation,           │                  capture ─► log ─► appliers
//!                   validation)              │                               └─► webhooks, stream API
//!                                            ├─► source_group (Kafka consumer group: which
//!                                            │    member runs which source)
//!                                            ├─► ops: /metrics /livez /readyz (nothing else)
//!                                            └─► API (tokens with scopes, audited): streams,
//!                                                 endpoints, admin (repair, components, audit)
//! ```
//!
//! Guarantees:
//! * Every component runs under [`pipeline::supervise`] and in a task of its own that waits
//!   only for what it needs: a transient error is retried with backoff; a definite one parks
//!   that component alone (logged with its code and hint, shown in `/readyz` and
//!   `synapse_component_state`), retried every `supervision.park_retry_secs` or on SIGHUP; the
//!   other components keep running. The process exits on it only with `exit_on_park`.
//! * [`run`] returns when a shutdown is asked for (SIGINT/SIGTERM) after every component
//!   stopped at a clean point (positions stored; nothing applied twice on restart).

pub mod admin;
pub mod admin_client;
pub mod config;
pub mod conflicts;
pub mod console;
pub mod doctor;
mod gaps;
pub mod listener;
pub mod listener_tls;
pub mod mesh_membership;
pub mod metric_catalog;
pub mod openapi;
pub mod ops;
pub mod pipeline;
pub mod positions;
pub mod repair;
pub mod resharding;
mod source_group;
pub mod vector_indexes;

use std::sync::Arc;

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// `synapse run`: serves the ops endpoints when `ops.listen` is set, starts every pipeline of
/// `config` and runs them until SIGINT/SIGTERM. With the file `config` came from, SIGHUP also
/// re-reads its `api.tokens` (rotation without a restart).
pub async fn run(config: config::Config, file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let health = Arc::new(ops::Health::new(config.supervision.policy()));
    // SIGHUP: try every parked component again now (after fixing what parked it).
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let h = health.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let parked = h.parked();
                tracing::info!(parked = parked.len(), "SIGHUP: trying parked components again");
                h.resume_parked();
            }
        });
    }
    if !config.ops.listen.is_empty() {
        let tls = config.ops.tls.as_ref().map(|f| listener_tls::serve_with("ops", f)).transpose();
        let tls = tls.map_err(anyhow::Error::msg)?;
        let (listen, h) = (config.ops.listen.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = ops::serve(&listen, h, tls).await {
                tracing::error!(error = %e, "ops server stopped");
            }
        });
    }
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let starting = pipeline::start(&config, health, shutdown);
    tokio::pin!(starting);
    let running = tokio::select! {
        r = &mut starting => r?,
        _ = shutdown_signal() => return Ok(()),
    };
    if let (Some(auth), Some(file)) = (running.auth.clone(), file) {
        reload_tokens_on_hangup(auth, file);
    }
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = signal_stop.send(true);
    });
    pipeline::wait(running, &stop).await?;
    Ok(())
}

/// On SIGHUP, serves the `api.tokens` of the configuration file as it is now; a file that no
/// longer loads keeps the current tokens (and says why).
fn reload_tokens_on_hangup(auth: Arc<synapse_connectors::auth::Auth>, file: std::path::PathBuf) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match config::Config::load(&file) {
                Ok(c) => {
                    let tokens = c.api.api_tokens();
                    let names: Vec<String> = tokens.iter().map(|t| t.name.clone()).collect();
                    auth.replace(tokens);
                    tracing::info!(tokens = ?names, "SIGHUP: api.tokens re-read");
                    metrics::counter!("synapse_token_reloads_total", "outcome" => "ok").increment(1);
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the configuration does not load; the API keeps its current tokens");
                    metrics::counter!("synapse_token_reloads_total", "outcome" => "failed").increment(1);
                }
            }
        }
    });
}
