//! The source PostgreSQL crashes and restarts while synapse streams: capture reconnects, the
//! slot may resend transactions the log already holds (they are skipped), nothing is lost.
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, wait_equal, Nodes};
use std::time::Duration;

#[test]
fn source_crash_and_restart_mid_stream() {
    let nodes = Nodes::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
         CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO counters VALUES (1, 0);",
    );
    let config = nodes.config("");
    let log = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    for round in 0..3i64 {
        // 40 transactions of 2,000 rows, each bumping the counter once.
        nodes
            .source
            .psql(
                "app",
                &format!(
                    "DO $$ BEGIN FOR i IN 0..39 LOOP
                        INSERT INTO items SELECT g, g FROM generate_series({base} + i * 2000 + 1, {base} + (i + 1) * 2000) g;
                        UPDATE counters SET n = n + 1;
                        COMMIT;
                     END LOOP; END $$",
                    base = round * 100_000
                ),
            )
            .unwrap();
        nodes.source.stop("immediate").unwrap(); // a crash while synapse is still catching up
        std::thread::sleep(Duration::from_millis(300));
        nodes.source.restart().unwrap();
    }
    let q = "SELECT count(*) || ':' || sum(v) || ':' || (SELECT n FROM counters) FROM items";
    wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(120));
    assert_eq!(nodes.target.psql("app", "SELECT n FROM counters").unwrap(), "120");
    assert!(child.try_wait().unwrap().is_none(), "synapse exited on a transient source failure");
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("transient error, retrying"), "the restarts were not noticed:\n{text}");
    assert!(text.contains("reconnecting the source SQL connection"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}
