//! Announcing a unique-key burial against a real PostgreSQL cluster, while an applier revives
//! the buried row in a transaction that commits during the announcement.
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

use std::collections::HashMap;
use std::time::Duration;
use synapse_apply::mesh;
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_resolver::NodeId;
use tokio_postgres::NoTls;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Found by the mesh test (seed 2): the announcement read the version without a lock, saw the
/// tombstone, then waited for the applier's lock and stamped the revived version dead while its
/// row stayed; every other node deleted the row this one kept.
#[tokio::test]
async fn a_burial_revived_while_it_is_announced_stays_live() {
    let pg = LocalCluster::start(ClusterOptions::default()).unwrap();
    pg.create_database("app").unwrap();
    pg.psql("app", "CREATE TABLE members (id int PRIMARY KEY, email text NOT NULL UNIQUE)").unwrap();
    let url = pg.url("app");
    let announcer = connect(&url).await;
    mesh::install(&announcer, NodeId(1), &["public.members".to_owned()], &HashMap::new()).await.unwrap();
    // Row 5 lost a collision on this node: deleted, its version kept as a tombstone, queued.
    pg.psql(
        "app",
        "INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
             VALUES ('public.members', '[\"5\"]', '{\"2\": 2, \"3\": 3}', 1000, 0, 3, false, '{}');
         INSERT INTO synapse.burials VALUES ('public.members', '[\"5\"]');",
    )
    .unwrap();

    // An applier applies a later remote insert of row 5: version locked first, then the row.
    let applier = connect(&url).await;
    applier
        .batch_execute(
            "BEGIN; SET LOCAL session_replication_role = replica;
             SELECT 1 FROM synapse.row_version WHERE tbl = 'public.members' AND pk = '[\"5\"]' FOR UPDATE;
             INSERT INTO members VALUES (5, 'm8@example.com');
             UPDATE synapse.row_version SET vv = '{\"2\": 2, \"3\": 4}', hlc_ms = 2000, live = true
                 WHERE tbl = 'public.members' AND pk = '[\"5\"]';",
        )
        .await
        .unwrap();
    let announcing = tokio::spawn(async move { mesh::announce_burials(&announcer, NodeId(1)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!announcing.is_finished(), "the announcement must wait for the applier's lock on the version");
    applier.batch_execute("COMMIT").await.unwrap();

    let announced = tokio::time::timeout(Duration::from_secs(10), announcing).await.unwrap().unwrap().unwrap();
    assert_eq!(announced, 0, "a row revived since its burial is not announced dead");
    let state = pg
        .psql(
            "app",
            "SELECT v.live || ' ' || v.vv::text || ' ' || (SELECT count(*) FROM members WHERE id = 5)
                 || ' ' || (SELECT count(*) FROM synapse.burials)
             FROM synapse.row_version v WHERE tbl = 'public.members' AND pk = '[\"5\"]'",
        )
        .unwrap();
    assert_eq!(state, "true {\"2\": 2, \"3\": 4} 1 0", "live version, row kept, queue emptied");
}
