//! Sessions that version the same mesh row at once, against a real PostgreSQL cluster: a local
//! write, an applier and a tombstone purge. Each must see the version the others committed
//! before it got the row's lock, never overwrite it.
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use synapse_apply::mesh::{self, MeshBuffer, StoredRow, StoredVersion};
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_resolver::NodeId;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Node 2 of a mesh of `accounts`, and a session on it that writes locally.
async fn mesh_node() -> (LocalCluster, String, tokio_postgres::Client) {
    let (pg, url, writer, _) = mesh_node_with_table().await;
    (pg, url, writer)
}

/// [`mesh_node`], with the installed table an applier resolves against.
async fn mesh_node_with_table() -> (LocalCluster, String, tokio_postgres::Client, mesh::MeshTable) {
    let pg = LocalCluster::start(ClusterOptions::default()).unwrap();
    pg.create_database("app").unwrap();
    pg.psql("app", "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)").unwrap();
    let url = pg.url("app");
    let writer = connect(&url).await;
    let mut tables = mesh::install(&writer, NodeId(2), &["public.accounts".to_owned()], &HashMap::new()).await.unwrap();
    (pg, url, writer, tables.remove(0))
}

/// A purge's session on row 34's tombstone (node 3's delete, marked by purge round 7): in a
/// transaction that holds the tombstone's lock, as the purge's delete will.
async fn purge_holding_the_tombstone(pg: &LocalCluster, url: &str) -> tokio_postgres::Client {
    pg.psql(
        "app",
        "INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols, purge_round)
             VALUES ('public.accounts', '[\"34\"]', '{\"3\": 843}', 9000000000000, 4, 3, false, '{}', 7)",
    )
    .unwrap();
    let purge = connect(url).await;
    purge
        .batch_execute(
            "BEGIN; SELECT 1 FROM synapse.row_version WHERE tbl = 'public.accounts' AND pk = '[\"34\"]' FOR UPDATE",
        )
        .await
        .unwrap();
    purge
}

/// Row 34's version on the node, as the tests check it.
struct Version {
    /// Node 3's entry of the vector.
    peer: Option<i64>,
    /// Whether the vector has node 2's entry.
    mine: bool,
    live: bool,
    /// HLC wall and logical parts, and the node that wrote it.
    clock: (i64, i32, i32),
}

async fn version_of_34(c: &tokio_postgres::Client) -> Version {
    let r = c
        .query_one(
            "SELECT (vv ->> '3')::int8, vv ? '2', live, hlc_ms, hlc_lc, node
             FROM synapse.row_version WHERE tbl = 'public.accounts' AND pk = '[\"34\"]'",
            &[],
        )
        .await
        .unwrap();
    Version { peer: r.get(0), mine: r.get(1), live: r.get(2), clock: (r.get(3), r.get(4), r.get(5)) }
}

/// The application inserts row 34 on the node, in a task: the test holds another session's
/// lock meanwhile.
fn insert_34(writer: tokio_postgres::Client) -> JoinHandle<Result<tokio_postgres::Client, tokio_postgres::Error>> {
    tokio::spawn(async move { writer.execute("INSERT INTO accounts VALUES (34, 10)", &[]).await.map(|_| writer) })
}

/// Found by the mesh test's trace (seed 2): the row had no version (its tombstone purged), an
/// applier inserted a peer's delete, and a local insert of the same key read no version (the
/// applier's was not yet committed), built one from nothing, then overwrote the peer's once its
/// upsert stopped waiting. The peer's entry was lost on this node only, so the row's tombstone
/// was never agreed and the nodes' histories parted. The local write must wait for the
/// applier's version and build on it.
#[tokio::test]
async fn a_local_write_builds_on_a_peers_version_committed_while_it_waits() {
    let (_pg, url, writer) = mesh_node().await;

    // The applier's steps for a peer's delete of row 34 (`buffer.rs`, `writes.rs`): reserve the
    // version, lock it, write the resolved one. Its HLC is far ahead of the wall clock, so the
    // local write's HLC shows whether it read this version.
    let applier = connect(&url).await;
    applier
        .batch_execute(
            "BEGIN; SET LOCAL session_replication_role = replica;
             INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
                 VALUES ('public.accounts', '[\"34\"]', '{}', 0, 0, 0, false, '{}') ON CONFLICT (tbl, pk) DO NOTHING;
             SELECT 1 FROM synapse.row_version WHERE tbl = 'public.accounts' AND pk = '[\"34\"]' FOR UPDATE;
             INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
                 VALUES ('public.accounts', '[\"34\"]', '{\"3\": 843}', 9000000000000, 4, 3, false, '{}')
                 ON CONFLICT (tbl, pk) DO UPDATE SET vv = excluded.vv, hlc_ms = excluded.hlc_ms,
                     hlc_lc = excluded.hlc_lc, node = excluded.node, live = excluded.live, cols = excluded.cols;",
        )
        .await
        .unwrap();
    let writing = insert_34(writer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!writing.is_finished(), "the local write must wait for the applier's version of the row");
    applier.batch_execute("COMMIT").await.unwrap();
    let writer = tokio::time::timeout(Duration::from_secs(10), writing).await.unwrap().unwrap().unwrap();

    let v = version_of_34(&writer).await;
    assert_eq!(v.peer, Some(843), "the peer's entry must survive the local write, which saw its delete");
    assert!(v.mine, "the local write adds this node's entry");
    assert!(v.live, "the local insert revives the row");
    assert_eq!(v.clock, (9_000_000_000_000, 5, 2), "the local write's clock orders after the version it built on");
}

/// A purge that deletes the row's tombstone while the local write waits for the tombstone's
/// lock: the write finds no version once it gets the lock. It must reserve one and build on
/// none, which is what every node agreed when the purge ran, not fail the application's
/// statement.
#[tokio::test]
async fn a_local_write_survives_a_purge_of_its_rows_tombstone() {
    let (pg, url, writer) = mesh_node().await;
    // The purge's session holds the tombstone's lock, so the write waits for it; the purge
    // deletes the row and commits.
    let purge = purge_holding_the_tombstone(&pg, &url).await;
    let writing = insert_34(writer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!writing.is_finished(), "the local write must wait for the purge's lock on the version");
    purge
        .batch_execute("DELETE FROM synapse.row_version WHERE NOT live AND purge_round = ANY('{7}'); COMMIT")
        .await
        .unwrap();
    let writer = tokio::time::timeout(Duration::from_secs(10), writing)
        .await
        .unwrap()
        .unwrap()
        .expect("the local write must not fail because a purge removed its row's tombstone");

    let v = version_of_34(&writer).await;
    assert!(v.peer.is_none() && v.mine && v.live, "a new version of this node alone, live");
    let (ms, lc, node) = v.clock;
    assert!(ms < 9_000_000_000_000 && lc == 0 && node == 2, "built on no version: clock {ms}.{lc} of node {node}");
}

/// An application transaction under REPEATABLE READ whose snapshot is older than a peer's
/// version of the row (an applier committed it since): the local write can neither build on a
/// version it cannot see nor overwrite it. It fails with a serialization error, as a write of
/// a row changed since the snapshot does, for the application to retry; it must not wait
/// forever for a version its snapshot will never show, nor lose the peer's entry.
#[tokio::test]
async fn a_repeatable_read_write_over_a_newer_peer_version_fails_to_serialize() {
    let (pg, _url, writer) = mesh_node().await;
    writer.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM accounts").await.unwrap();
    pg.psql(
        "app",
        "INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
             VALUES ('public.accounts', '[\"34\"]', '{\"3\": 843}', 9000000000000, 4, 3, false, '{}')",
    )
    .unwrap();
    let err =
        tokio::time::timeout(Duration::from_secs(10), writer.execute("INSERT INTO accounts VALUES (34, 10)", &[]))
            .await
            .expect("the local write must not wait for a version its snapshot cannot show")
            .expect_err("the local write must not build a version over one it cannot see");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE), "{err:?}");
    writer.batch_execute("ROLLBACK").await.unwrap();

    let v = version_of_34(&writer).await;
    assert_eq!((v.peer, v.mine, v.live), (Some(843), false, false), "the peer's version stays as it was");
}

/// The applier's side of the same window: its reservation found the tombstone, a purge deleted
/// it and a local write versioned the key anew before the applier got its lock, which then
/// locked nothing. Resolving a peer's delete against no version, it overwrote the local write's
/// version (this node's entry lost here only). It must reserve again and resolve against it.
#[tokio::test]
async fn an_applier_resolves_against_a_local_write_made_after_a_purge() {
    let (pg, url, _, table) = mesh_node_with_table().await;
    // One session purges the tombstone and then writes the key locally, both committed while
    // the applier waits for the tombstone's lock: the order a slow applier can meet.
    let purge = purge_holding_the_tombstone(&pg, &url).await;
    let applier = connect(&url).await;
    let mut buffer = MeshBuffer::new(&HashMap::from([(table.name(), table.clone())]));
    // Node 1's delete of row 34, written where the row was already purged: from no version.
    let delete = StoredRow {
        values: None,
        version: Some(StoredVersion {
            vv: "{\"1\": 1}".into(),
            hlc_ms: 5000,
            hlc_lc: 0,
            node: 1,
            live: false,
            cols: "{\"balance\": {\"v\": \"3\"}}".into(),
        }),
    };
    buffer.push_stored(&table, vec!["34".into()], &delete).unwrap();
    applier.batch_execute("BEGIN; SET LOCAL session_replication_role = replica").await.unwrap();
    let applying = tokio::spawn(async move {
        buffer.apply(&applier, &mut HashMap::new(), "n1", &HashMap::new()).await.map(|_| applier)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!applying.is_finished(), "the applier must wait for the purge's lock on the version");
    purge
        .batch_execute(
            "DELETE FROM synapse.row_version WHERE NOT live AND purge_round = ANY('{7}');
             INSERT INTO accounts VALUES (34, 10);
             COMMIT",
        )
        .await
        .unwrap();
    let applier = tokio::time::timeout(Duration::from_secs(10), applying).await.unwrap().unwrap().unwrap();
    applier.batch_execute("COMMIT").await.unwrap();

    let vv = pg
        .psql("app", "SELECT vv::text FROM synapse.row_version WHERE tbl = 'public.accounts' AND pk = '[\"34\"]'")
        .unwrap();
    let vv: BTreeMap<String, i64> = serde_json::from_str(&vv).unwrap();
    assert!(vv.contains_key("1") && vv.contains_key("2"), "the peer's delete merged with the local write: {vv:?}");
    assert!(!vv.contains_key("3"), "the purged tombstone's history is gone: {vv:?}");
}
