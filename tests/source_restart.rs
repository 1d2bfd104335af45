//! The source PostgreSQL crashes and restarts while synapse streams: capture reconnects, the
//! slot may resend transactions the log already holds (they are skipped), nothing is lost.
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_survived, spawn_run, Nodes, ITEMS_SCHEMA};
use std::time::Duration;

#[test]
fn source_crash_and_restart_mid_stream() {
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let config = nodes.config("");
    let log = nodes.dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    // The crashes must land in streaming: one during the initial copy re-copies the tables
    // instead, and the capture's stream never meets its broken SQL connection (seen once in CI).
    nodes.wait_copied(2, Duration::from_secs(60), &log);
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
    let text = assert_survived(&nodes, &mut child, &log, 120);
    assert!(text.contains("reconnecting the source SQL connection"), "{text}");
}
