//! Capture → embedded log → apply against two real PostgreSQL clusters.
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

use std::sync::Arc;
use std::time::{Duration, Instant};
use synapse_apply::{initial_copy, Applier, ApplyConfig};
use synapse_capture::{Capture, CaptureConfig};
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_log::EmbeddedLog;
use tokio::sync::watch;

struct Pipeline {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn start(source: &LocalCluster, target: &LocalCluster, dir: &std::path::Path) -> Pipeline {
    let mut cfg = CaptureConfig::new("a", source.url("app").parse().unwrap());
    cfg.heartbeat_interval = Duration::from_millis(500);
    let capture = Arc::new(Capture::connect(cfg).await.unwrap());
    let prepared = capture.prepare().await.unwrap();
    let log = EmbeddedLog::open(&dir.join("a.redb"), Default::default()).unwrap();
    let (stop, rx) = watch::channel(false);
    let target_cfg: tokio_postgres::Config = target.url("app").parse().unwrap();
    let applier = Arc::new(Applier::new(ApplyConfig::new("a", target_cfg.clone(), "apply-b")));
    let c = capture.clone();
    let l = log.clone();
    let r = rx.clone();
    let cap_task = tokio::spawn(async move { c.stream(l, r).await.unwrap() });
    initial_copy::run(&capture, &prepared.tables, &target_cfg, 2, applier.stats()).await.unwrap();
    let apply_task = tokio::spawn(async move { applier.run(&log, rx).await.unwrap() });
    Pipeline { stop, tasks: vec![cap_task, apply_task] }
}

async fn wait_equal(source: &LocalCluster, target: &LocalCluster, query: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let want = source.psql("app", query).unwrap();
        let got = target.psql("app", query).unwrap_or_default();
        if want == got {
            return;
        }
        assert!(Instant::now() < deadline, "target never matched source\nsource: {want}\ntarget: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_then_streams_every_operation() {
    let source = LocalCluster::start(ClusterOptions::default()).unwrap();
    let target = LocalCluster::start(ClusterOptions::default()).unwrap();
    source.create_database("app").unwrap();
    target.create_database("app").unwrap();
    source
        .psql(
            "app",
            "CREATE TABLE users (id bigint PRIMARY KEY, name text, score numeric(10,2), tags text[], doc jsonb);
             INSERT INTO users SELECT g, 'user ' || g, g * 1.5, ARRAY['a', 'b'], jsonb_build_object('n', g) FROM generate_series(1, 1000) g;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _p = start(&source, &target, dir.path()).await;
    let q = "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM users t";
    wait_equal(&source, &target, q).await;
    source
        .psql(
            "app",
            "INSERT INTO users VALUES (5000, 'new', 1, '{}', '{}');
             UPDATE users SET score = score + 1 WHERE id % 3 = 0;
             DELETE FROM users WHERE id % 7 = 0;
             UPDATE users SET id = 6000 WHERE id = 1;",
        )
        .unwrap();
    wait_equal(&source, &target, q).await;
    source.psql("app", "TRUNCATE users; INSERT INTO users VALUES (1, 'again', 2, NULL, NULL)").unwrap();
    wait_equal(&source, &target, q).await;
}
