//! The target PostgreSQL crashes and restarts mid-stream: synapse retries, nothing is lost or
//! applied twice.
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_survived, spawn_run, Nodes, ITEMS_SCHEMA};
use std::time::Duration;

#[test]
fn target_crash_and_restart_mid_stream() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let config = nodes.config("");
    let log = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    let url = nodes.source.url("app");
    let writer = std::thread::spawn(move || {
        let psql_loop = "DO $$ BEGIN FOR i IN 1..3000 LOOP
                INSERT INTO items VALUES (i, i); UPDATE counters SET n = n + 1; COMMIT;
                PERFORM pg_sleep(0.001);
             END LOOP; END $$;";
        let (client, rt) = {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (client, conn) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
            rt.spawn(conn);
            (client, rt)
        };
        rt.block_on(client.batch_execute(psql_loop)).unwrap();
    });
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        nodes.target.stop("immediate").unwrap(); // a crash: recovery on start
        std::thread::sleep(Duration::from_millis(500));
        nodes.target.restart().unwrap();
    }
    writer.join().unwrap();
    assert_survived(&nodes, &mut child, &log, 3000);
}

/// A target removed from the configuration no longer holds the log's retention: on the next
/// start its position in the source's log is forgotten (the one kept by the remaining target
/// stays), so the log can drop what that target never read.
#[test]
fn a_removed_target_no_longer_holds_log_retention() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    nodes.target.create_database("app2").unwrap();
    let config = nodes.config("");
    let two = std::fs::read_to_string(&config)
        .unwrap()
        .replace("ops:\n", &format!("  - name: c\n    url: {}\nops:\n", nodes.target.url("app2")));
    std::fs::write(&config, &two).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (1, 1)").unwrap();
    let q = "SELECT count(*) FROM items";
    if let Err(e) = synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", q, Duration::from_secs(60)) {
        panic!("{e}\n{two}\n{}", common::log_tail(&log));
    }
    let in_c = || nodes.target.psql("app2", "SELECT count(*) FROM items").unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while in_c() != "1" {
        assert!(std::time::Instant::now() < deadline, "target c never applied:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Appliers record their log position at most once a second, after a commit.
    std::thread::sleep(Duration::from_millis(1200));
    nodes.source.psql("app", "INSERT INTO items VALUES (5, 5)").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while in_c() != "2" || nodes.target.psql("app", q).unwrap_or_default() != "2" {
        assert!(std::time::Instant::now() < deadline, "the second row did not arrive:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let consumers = || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use synapse_log::ChangeLog;
            let path = nodes.dir.path().join("log/a.redb");
            let log = synapse_log::EmbeddedLog::open(&path, Default::default()).unwrap();
            log.consumers().await.unwrap().into_iter().map(|(n, _)| n).collect::<Vec<_>>()
        })
    };
    assert_eq!(consumers(), ["apply-b", "apply-c"]);

    // c is removed from the configuration.
    let one = two.replace(&format!("  - name: c\n    url: {}\n", nodes.target.url("app2")), "");
    std::fs::write(&config, one).unwrap();
    let mut child = spawn_run(&config, &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (2, 2)").unwrap();
    common::wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(60));
    assert!(
        std::fs::read_to_string(&log).unwrap().contains("forgot the log position of a target"),
        "{}",
        common::log_tail(&log)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(consumers(), ["apply-b"]);
}
