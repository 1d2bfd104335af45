//! The node schema's migrations on a real cluster: a fresh node, a node set up before
//! versioning, a node from a newer release, and several processes migrating one node at once.
#![allow(clippy::unwrap_used)]

use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_postgres::node_schema::{self, Migrated, NodeSchemaError, LATEST};

#[tokio::test]
async fn nodes_are_migrated_once_adopted_or_refused() {
    let cluster = LocalCluster::start(ClusterOptions::default()).unwrap();
    let client_of = |db: &str| {
        cluster.create_database(db).unwrap();
        let url = cluster.url(db);
        async move { synapse_postgres::connect_str(&url, "node schema test").await.unwrap() }
    };

    // A fresh node: migrated from 0 to the latest version, once.
    let fresh = client_of("fresh").await;
    assert_eq!(node_schema::version(&fresh).await.unwrap(), 0);
    assert_eq!(node_schema::migrate(&fresh).await.unwrap(), Migrated { from: 0, to: LATEST });
    assert_eq!(node_schema::migrate(&fresh).await.unwrap(), Migrated { from: LATEST, to: LATEST });
    let rows = cluster
        .psql("fresh", "SELECT string_agg(version::text || ':' || description, ';') FROM synapse.schema_version")
        .unwrap();
    assert!(rows.starts_with("1:apply state"), "{rows}");
    let tables = cluster.psql("fresh", "SELECT count(*) FROM pg_tables WHERE schemaname = 'synapse'").unwrap();
    assert_eq!(
        tables, "14",
        "applied, table_sync, row_version, conflicts, burials, purge_rounds, schema_skips, mesh_tables, \
         mesh_membership, 4 repair tables, schema_version"
    );

    // A node an earlier release set up (its first repair layout, no version table): adopted,
    // its tables brought to the current shape, its rows kept.
    let old = client_of("old").await;
    old.batch_execute(
        "CREATE SCHEMA synapse;
         CREATE TABLE synapse.applied (source_node text PRIMARY KEY, next_offset bigint NOT NULL,
             commit_lsn pg_lsn NOT NULL, commit_time timestamptz, updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO synapse.applied VALUES ('a', 42, '0/10', NULL, now());
         CREATE TABLE synapse.repair_tracked (tbl text PRIMARY KEY, bits integer NOT NULL,
             key_hash text NOT NULL, row_hash text NOT NULL, tracked_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO synapse.repair_tracked (tbl, bits, key_hash, row_hash) VALUES ('public.t', 8, 'k', 'r');",
    )
    .await
    .unwrap();
    assert_eq!(node_schema::migrate(&old).await.unwrap(), Migrated { from: 0, to: LATEST });
    let kept = cluster.psql("old", "SELECT next_offset FROM synapse.applied WHERE source_node = 'a'").unwrap();
    assert_eq!(kept, "42");
    let layout = cluster.psql("old", "SELECT layout || ',' || gen FROM synapse.repair_tracked").unwrap();
    assert_eq!(layout, "1,0", "an old tracking reads as layout 1 (re-tracked before use)");

    // A node a newer release migrated: refused, definite, saying which release to run.
    let newer = client_of("newer").await;
    node_schema::migrate(&newer).await.unwrap();
    newer
        .execute(
            "INSERT INTO synapse.schema_version (version, description) VALUES ($1, 'from the future')",
            &[&(LATEST + 1)],
        )
        .await
        .unwrap();
    let e = node_schema::migrate(&newer).await.unwrap_err();
    assert!(matches!(e, NodeSchemaError::Newer { found, known } if found == LATEST + 1 && known == LATEST), "{e}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains(&format!("version {}", LATEST + 1)) && e.hint().contains("release"), "{e}");

    // Several processes starting on one fresh node: each succeeds, each migration runs once.
    cluster.create_database("race").unwrap();
    let url = cluster.url("race");
    let racers: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = synapse_postgres::connect_str(&url, "racer").await.unwrap();
                node_schema::migrate(&client).await.map(|m| m.to)
            })
        })
        .collect();
    for r in racers {
        assert_eq!(r.await.unwrap().unwrap(), LATEST);
    }
    let applied = cluster.psql("race", "SELECT count(*) || '/' || max(version) FROM synapse.schema_version").unwrap();
    assert_eq!(applied, format!("{}/{LATEST}", node_schema::MIGRATIONS.len()));
}
