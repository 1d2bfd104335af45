//! SynapseDB's runtime: what `synapse run` does, as a library the CLI, the benchmarks and the
//! tests call.
//!
//! ```text
//!  config file ──► config::Config::load ──► pipeline::start ──► per source:
//!                  (interpolation,           │                  capture ─► log ─► appliers
//!                   validation)              │                               └─► webhooks, stream API
//!                                            ├─► source_group (Kafka consumer group: which
//!                                            │    member runs which source)
//!                                            └─► ops: /metrics /livez /readyz, admin /repair/*
//! ```
//!
//! Guarantees:
//! * Every component runs under [`pipeline::supervise`]: a transient error is retried with
//!   backoff; a definite one stops that component, is logged with its code and hint and shown
//!   in `/readyz`.
//! * [`run`] returns when a shutdown is asked for (SIGINT/SIGTERM) after every component
//!   stopped at a clean point (positions stored; nothing applied twice on restart).

pub mod config;
pub mod doctor;
pub mod ops;
pub mod pipeline;
pub mod repair;
mod source_group;

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

/// `synapse run`: serves the ops endpoints (and the admin API's repair routes) when
/// `ops.listen` is set, starts every pipeline of `config` and runs them until SIGINT/SIGTERM.
pub async fn run(config: config::Config) -> anyhow::Result<()> {
    let health = Arc::new(ops::Health::default());
    if !config.ops.listen.is_empty() {
        let (listen, h) = (config.ops.listen.clone(), health.clone());
        let admin = Arc::new(repair::RepairService::new(config.clone())).router();
        tokio::spawn(async move {
            if let Err(e) = ops::serve_with(&listen, h, admin).await {
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
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = signal_stop.send(true);
    });
    pipeline::wait(running, &stop).await?;
    Ok(())
}
