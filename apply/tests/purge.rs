//! Tombstone purging against real PostgreSQL: a node a round could not finish on must not
//! resolve the other nodes' new writes of a purged key against its leftover tombstone.
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use synapse_apply::mesh::{self, MeshBuffer, StoredRow, StoredVersion};
use synapse_apply::tombstones::{purge_round, PurgeNode};
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_resolver::NodeId;
use tokio_postgres::NoTls;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// A tombstone of key 7 that has seen many writes of nodes 1–3.
const TOMBSTONE: &str = "INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
    VALUES ('public.accounts', '[\"7\"]', '{\"1\": 2, \"2\": 11, \"3\": 12}', 4000, 0, 2, false, '{\"note\": {\"v\": \"old\"}}')";

/// What node 3 holds for key 7 after receiving node 1's first write of the key since node 1
/// purged it: versioned from nothing, so the tombstone's vector dominates its vector.
async fn receive_fresh_write(pg: &LocalCluster, db: &str) -> String {
    let client = connect(&pg.url(db)).await;
    let tables = mesh::install(&client, NodeId(3), &["public.accounts".to_owned()], &HashMap::new()).await.unwrap();
    let mut tables: HashMap<String, mesh::MeshTable> = tables.into_iter().map(|t| (t.name(), t)).collect();
    let info = tables.remove("public.accounts").unwrap();
    let mut buffer = MeshBuffer::new(&HashMap::from([(info.name(), info.clone())]));
    let row = StoredRow {
        values: Some(BTreeMap::from([("note".to_owned(), Some("fresh".to_owned()))])),
        version: Some(StoredVersion {
            vv: "{\"1\": 1}".into(),
            hlc_ms: 5000,
            hlc_lc: 0,
            node: 1,
            live: true,
            cols: "{\"note\": {\"at\": [5000, 0, 1]}}".into(),
        }),
    };
    buffer.push_stored(&info, vec!["7".into()], &row).unwrap();
    client.batch_execute("BEGIN; SET LOCAL session_replication_role = replica").await.unwrap();
    buffer.apply(&client, &mut HashMap::new(), "n1", &HashMap::new()).await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    pg.psql(
        db,
        "SELECT coalesce((SELECT note FROM accounts WHERE id = 7), '-') || ' ' || v.vv::text || ' '
             || coalesce(v.purge_round::text, 'unmarked')
         FROM synapse.row_version v WHERE v.pk = '[\"7\"]'",
    )
    .unwrap()
}

#[tokio::test]
async fn a_marked_tombstone_does_not_swallow_a_write_made_where_it_is_purged() {
    let pg = LocalCluster::start(ClusterOptions::default()).unwrap();
    for db in ["marked", "unmarked"] {
        pg.create_database(db).unwrap();
        pg.psql(db, "CREATE TABLE accounts (id int PRIMARY KEY, note text)").unwrap();
        let client = connect(&pg.url(db)).await;
        synapse_postgres::node_schema::migrate(&client).await.unwrap();
        pg.psql(db, TOMBSTONE).unwrap();
    }
    pg.psql("marked", "UPDATE synapse.row_version SET purge_round = 42").unwrap();

    // Marked by a round: every node agreed on it, so a version it dominates is a new write.
    assert_eq!(receive_fresh_write(&pg, "marked").await, "fresh {\"1\": 1} unmarked");
    // Not marked, the same tombstone still wins over an old version: that is its purpose.
    assert_eq!(
        receive_fresh_write(&pg, "unmarked").await,
        "- {\"1\": 2, \"2\": 11, \"3\": 12} unmarked",
        "an unmarked tombstone dominates the version"
    );
}

/// Keeps the databases' slots confirmed up to the current WAL position, as a capture keeping up
/// would.
fn advance_slots(pg: &LocalCluster, dbs: &[&'static str]) -> tokio::task::JoinHandle<()> {
    let urls: Vec<(String, String)> = dbs.iter().map(|db| (pg.url(db), format!("slot_{db}"))).collect();
    tokio::spawn(async move {
        let mut clients = Vec::new();
        for (url, slot) in urls {
            clients.push((connect(&url).await, slot));
        }
        loop {
            for (c, slot) in &clients {
                c.execute("SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())", &[slot]).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test]
async fn a_round_finishes_on_a_node_it_could_not_reach_and_waits_for_completion() {
    let pg = LocalCluster::start(ClusterOptions::default()).unwrap();
    let dbs = ["a", "b"];
    let mut nodes = Vec::new();
    for db in dbs {
        pg.create_database(db).unwrap();
        pg.psql(db, "CREATE TABLE accounts (id int PRIMARY KEY, note text)").unwrap();
        let client = connect(&pg.url(db)).await;
        synapse_postgres::node_schema::migrate(&client).await.unwrap();
        pg.psql(db, &format!("SELECT pg_create_logical_replication_slot('slot_{db}', 'pgoutput')")).unwrap();
        pg.psql(db, TOMBSTONE).unwrap();
        nodes.push(PurgeNode {
            name: db.into(),
            target: synapse_postgres::PgConfig::from_pg(pg.url(db).parse().unwrap()),
            slot: format!("slot_{db}"),
            applies: Vec::new(),
        });
    }
    let advancing = advance_slots(&pg, &dbs);
    // Node b was cut off in an earlier round: round 42 completed on a, its mark left on b. Round
    // 43 never completed anywhere: its mark (b's key 8) must stay until a round agrees again.
    pg.psql("a", "INSERT INTO synapse.purge_rounds (round) VALUES (42)").unwrap();
    pg.psql(
        "b",
        "INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols, purge_round)
             VALUES ('public.accounts', '[\"9\"]', '{\"1\": 1}', 3000, 0, 1, false, '{}', 42),
                    ('public.accounts', '[\"8\"]', '{\"1\": 1}', 3000, 0, 1, false, '{}', 43)",
    )
    .unwrap();

    let purged = purge_round(&nodes, |_| Some(0), 1, 100, Duration::from_secs(30), 100).await.unwrap();
    advancing.abort();
    assert_eq!(purged.agreed, 1, "key 7's tombstone, the same on both nodes");
    assert_eq!(purged.deleted, 3, "key 7 on both nodes, and b's leftover of round 42");
    for db in dbs {
        let left = pg
            .psql(db, "SELECT string_agg(pk::text || ':' || purge_round, ',' ORDER BY pk) FROM synapse.row_version")
            .unwrap();
        let expected = if db == "b" { "[\"8\"]:43" } else { "" };
        assert_eq!(left, expected, "tombstones left on {db}");
        // Round 42 forgotten once finished everywhere; this round's record is the next one's.
        assert_eq!(pg.psql(db, "SELECT string_agg(round::text, ',') FROM synapse.purge_rounds").unwrap(), "100");
    }
}
