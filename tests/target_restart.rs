//! The target PostgreSQL crashes and restarts mid-stream: synapse retries, nothing is lost or
//! applied twice.
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, wait_equal, Nodes};
use std::time::Duration;

#[test]
fn target_crash_and_restart_mid_stream() {
    let nodes = Nodes::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
         CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO counters VALUES (1, 0);",
    );
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
    let q = "SELECT count(*) || ':' || sum(v) || ':' || (SELECT n FROM counters) FROM items";
    wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(120));
    assert_eq!(nodes.target.psql("app", "SELECT n FROM counters").unwrap(), "3000");
    assert!(child.try_wait().unwrap().is_none(), "synapse exited on a transient target failure");
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("transient error, retrying"), "the restarts were not noticed:\n{text}");
}
