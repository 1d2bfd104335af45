//! Exported snapshots on a real cluster: several at once in one process, for a node whose name
//! holds characters a slot name may not (`eu-West.1`).
#![allow(clippy::unwrap_used)]

use synapse_capture::snapshot::SnapshotSession;
use synapse_localpg::{ClusterOptions, LocalCluster};

#[tokio::test]
async fn concurrent_snapshots_of_any_node_name() {
    let pg = LocalCluster::start(ClusterOptions::default()).unwrap();
    let source: synapse_postgres::PgConfig = pg.url("postgres").parse().unwrap();
    let a = SnapshotSession::begin(&source, "synapse_eu-West.1_api").await.unwrap();
    let b = SnapshotSession::begin(&source, "synapse_eu-West.1_api").await.unwrap();
    let slots =
        pg.psql("postgres", "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots").unwrap();
    assert_eq!(slots.matches("synapse_eu_west_1_api_snap_").count(), 2, "{slots}");
    drop((a, b));
}
