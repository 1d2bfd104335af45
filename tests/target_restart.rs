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
