//! `check` on two real PostgreSQL nodes diverged by direct writes: it finds exactly the keys
//! written differently — inserts, updates, deletes, NULLs, TOASTed values, common types, types
//! without a hash function — and
//! reports an unreachable node as a clear, retryable error.
#![allow(clippy::unwrap_used)]

use synapse_error::Classify;
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_repair::check::{check, CheckOptions, KeyDiff, Report};
use synapse_repair::node::Node;

const SCHEMA: &str = "CREATE TABLE items (
    id bigint PRIMARY KEY, a int, b text, n numeric, r double precision, t timestamptz, d date,
    j jsonb, arr int[], bin bytea, flag bool, u uuid, big text, js json, p point);
    INSERT INTO items SELECT g, g % 97, 'row ' || g, g / 7.0, g / 3.0, '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 minute',
        '2026-01-01'::date + g % 365, jsonb_build_object('g', g, 'tags', jsonb_build_array('x', g % 5)),
        ARRAY[g, g % 3], decode(md5(g::text), 'hex'), g % 2 = 0, md5(g::text)::uuid,
        CASE WHEN g % 1000 = 0 THEN repeat(md5(g::text), 400) END, json_build_object('g', g), point(g, 0)
    FROM generate_series(1, 20000) g;
    CREATE TABLE pairs (k1 int, k2 text, v text, PRIMARY KEY (k2, k1));
    INSERT INTO pairs SELECT g, 'k' || (g % 10), NULL FROM generate_series(1, 500) g;";

/// (key, nodes missing it, groups of nodes holding equal rows) per differing key.
fn keys(r: &Report) -> Vec<(String, Vec<&str>, usize)> {
    r.differing
        .iter()
        .map(|KeyDiff { key, missing_on, holders }| {
            (key.join(","), missing_on.iter().map(String::as_str).collect(), holders.len())
        })
        .collect()
}

/// A cluster with database `app` holding `SCHEMA`.
fn cluster() -> LocalCluster {
    let n = LocalCluster::start(ClusterOptions::default()).unwrap();
    n.create_database("app").unwrap();
    n.psql("app", SCHEMA).unwrap();
    n
}

/// Nodes that run no pipeline: nothing is in flight, no cut to wait for.
fn at(bits: u8) -> CheckOptions {
    CheckOptions {
        bits,
        cut_timeout: Some(std::time::Duration::from_secs(5)),
        appliers: None,
        cache_dir: None,
        cut_rounds: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_exactly_the_diverged_keys() {
    let (a, b) = (cluster(), cluster());
    // Different session settings on the two nodes must not look like divergence.
    b.psql("app", "ALTER DATABASE app SET TimeZone = 'Asia/Tokyo'; ALTER DATABASE app SET DateStyle = 'SQL, DMY'")
        .unwrap();
    // Direct writes on one node or the other: the drift a check must find.
    b.psql(
        "app",
        "UPDATE items SET b = NULL WHERE id = 5;
         UPDATE items SET big = big || 'x' WHERE id = 3000;         -- a TOASTed value
         UPDATE items SET t = t + interval '1 microsecond' WHERE id = 77;
         UPDATE items SET j = '{\"g\": 12, \"tags\": [\"x\", 2]}' WHERE id = 12;  -- the same jsonb, written differently
         DELETE FROM items WHERE id IN (9, 19999);
         INSERT INTO items (id, b) VALUES (30001, 'new'), (30002, NULL);
         UPDATE pairs SET v = '' WHERE k1 = 4 AND k2 = 'k4';
         UPDATE items SET js = '{\"g\":88}' WHERE id = 88;                 -- json (no hash): compared as text
         UPDATE items SET p = point(44, 1) WHERE id = 44;",
    )
    .unwrap();
    a.psql("app", "UPDATE items SET r = r + 1e-12 WHERE id = 600; UPDATE items SET b = 'row 5' WHERE id = 6").unwrap();

    let url = |n: &LocalCluster| n.url("app").parse::<synapse_postgres::PgConfig>().unwrap();
    let (na, nb) = (Node::connect("a", &url(&a)).await.unwrap(), Node::connect("b", &url(&b)).await.unwrap());
    let both = [&na, &nb];
    let report = check(&both, "public.items", &at(12)).await.unwrap();
    let (a_only, b_only) = (vec!["b"], vec!["a"]);
    let mut expected: Vec<(String, Vec<&str>, usize)> = Vec::new();
    for k in [9, 19999] {
        expected.push((k.to_string(), a_only.clone(), 1));
    }
    for k in [30001, 30002] {
        expected.push((k.to_string(), b_only.clone(), 1));
    }
    for k in [3000, 44, 5, 6, 600, 77, 88] {
        expected.push((k.to_string(), vec![], 2));
    }
    let mut found = keys(&report);
    found.sort_by_key(|(k, _, _)| k.parse::<i64>().unwrap());
    expected.sort_by_key(|(k, _, _)| k.parse::<i64>().unwrap());
    assert_eq!(found, expected, "{report:?}");
    assert!(report.changing.is_empty() && report.cut.is_empty(), "no appliers, nothing in flight: {report:?}");
    assert_eq!(report.rows, [20000, 20000]);
    assert!(report.differing_buckets <= 13, "{report:?}");
    // Two paths per differing bucket through 13 levels at most.
    assert!(report.compared <= 2 * 13 * report.differing_buckets + 1, "{report:?}");
    println!(
        "{} rows, {} buckets: {} differing, {} node pairs compared, {} keys differ",
        report.rows[0],
        report.buckets,
        report.differing_buckets,
        report.compared,
        report.differing.len()
    );

    // A composite key, a NULL that became an empty string.
    let report = check(&both, "public.pairs", &at(4)).await.unwrap();
    assert_eq!(keys(&report), [("k4,4".to_string(), vec![], 2)], "key columns in key order (k2, k1)");

    // Equal tables: one comparison, nothing fetched.
    b.psql(
        "app",
        "CREATE TABLE same AS SELECT g AS id FROM generate_series(1, 100) g; ALTER TABLE same ADD PRIMARY KEY (id)",
    )
    .unwrap();
    a.psql(
        "app",
        "CREATE TABLE same AS SELECT g AS id FROM generate_series(1, 100) g; ALTER TABLE same ADD PRIMARY KEY (id)",
    )
    .unwrap();
    let report = check(&both, "public.same", &at(8)).await.unwrap();
    assert_eq!((report.compared, report.differing.len()), (1, 0));
    // On nodes where no applier ever ran (no synapse.applied) and nothing is tracked (no
    // synapse.repair_tracked), checks leave no error in the servers' logs.
    for n in [&a, &b] {
        let log = n.server_log();
        assert!(!log.contains("ERROR:"), "{log}");
    }

    // Bad requests name the table and the node.
    let e = check(&both, "public.missing", &at(8)).await.unwrap_err();
    assert_eq!(e.to_string(), "table public.missing: it does not exist on node a");
    a.psql("app", "CREATE TABLE nokey (v int)").unwrap();
    b.psql("app", "CREATE TABLE nokey (v int)").unwrap();
    let e = check(&both, "public.nokey", &at(8)).await.unwrap_err();
    assert!(e.to_string().contains("no primary key on node a"), "{e}");
    b.psql("app", "ALTER TABLE same ADD COLUMN extra int").unwrap();
    let e = check(&both, "public.same", &at(8)).await.unwrap_err();
    assert!(e.to_string().contains("columns differ"), "{e}");
}

#[tokio::test]
async fn an_unreachable_node_is_a_retryable_error_naming_it() {
    let port = synapse_localpg::free_port().unwrap(); // reserved: nothing listens on it
    let config = format!("postgres://postgres@127.0.0.1:{port}/app").parse().unwrap();
    let e = Node::connect("eu", &config).await.err().unwrap();
    assert!(e.to_string().starts_with("node eu: connecting"), "{e}");
    assert!(e.is_transient());
    assert_eq!(e.code(), "REP003");
}

/// Digests kept current by `track` equal a fresh scan after every kind of write — bulk and
/// single-row, key changes, TRUNCATE (which stops tracking until tracked again), writes in the
/// replica role (as appliers make them), read in full or only the buckets changed since, from
/// sessions with other date and time settings — and a check then reads them instead of
/// scanning, with the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_digests_stay_equal_to_a_scan() {
    let (a, b) = (cluster(), cluster());
    let url = |n: &LocalCluster| n.url("app").parse::<synapse_postgres::PgConfig>().unwrap();
    let (na, nb) = (Node::connect("a", &url(&a)).await.unwrap(), Node::connect("b", &url(&b)).await.unwrap());
    for (n, table) in [(&na, "public.items"), (&nb, "public.items"), (&na, "public.pairs"), (&nb, "public.pairs")] {
        let shape = n.describe(table).await.unwrap();
        let indexed = n.track(&shape, 10).await.unwrap();
        // items' key is a bigint (an immutable hash): indexed; pairs' composite key also.
        assert!(indexed, "{table}");
        assert_eq!(n.tracked_bits(&shape).await.unwrap(), Some(10));
    }
    // Writers with other session settings than the check's.
    b.psql("app", "ALTER DATABASE app SET TimeZone = 'Asia/Tokyo'; ALTER DATABASE app SET DateStyle = 'SQL, DMY'")
        .unwrap();
    let writes = "UPDATE items SET b = b || '!' WHERE id % 10 = 3;                       -- bulk
         UPDATE items SET t = t + interval '1 second', js = '{\"x\": 1}' WHERE id = 7;
         UPDATE items SET id = id + 100000 WHERE id = 50;                            -- a key change
         DELETE FROM items WHERE id BETWEEN 100 AND 120;
         INSERT INTO items (id, b, d, arr) VALUES (40001, 'new', '2026-02-03', '{1,NULL}');
         TRUNCATE pairs; INSERT INTO pairs SELECT g, 'k' || (g % 10), 'v' FROM generate_series(1, 300) g;
         SET session_replication_role = replica; UPDATE items SET a = -a WHERE id = 9;";
    a.psql("app", writes).unwrap();
    b.psql("app", writes).unwrap();
    // And drift: one more change on b only.
    b.psql("app", "UPDATE items SET big = 'drift' WHERE id = 11; DELETE FROM pairs WHERE k1 = 5").unwrap();

    for (n, cluster) in [(&na, &a), (&nb, &b)] {
        let shape = n.describe("public.items").await.unwrap();
        let scanned = n.digests(&shape, 10).await.unwrap();
        let read = n.tracked_digests(&shape.name, 10, &[]).await.unwrap();
        let (tracked, folded) = (read.buckets, read.folded);
        assert!(folded > 0, "items on {}: no changes recorded", n.name);
        assert_eq!(tracked, scanned, "items on {}: tracked digests differ from a scan", n.name);
        // So do its sub-bucket digests (the bulk update changed several in most buckets).
        sub_digests_equal_a_scan(cluster, "public.items").await;
        // pairs was truncated: not tracked any more, and its digests are not read as if it were.
        let shape = n.describe("public.pairs").await.unwrap();
        assert_eq!(n.tracked_bits(&shape).await.unwrap(), None);
        let Err(stopped) = n.tracked_digests(&shape.name, 10, &[]).await else { panic!("pairs read as tracked") };
        assert!(stopped.to_string().contains("tracking stopped"), "{stopped}");
    }
    let both = [&na, &nb];
    let report = check(&both, "public.items", &at(10)).await.unwrap();
    assert_eq!((report.digests.as_str(), report.folded), ("tracked", 0), "already folded above: {report:?}");
    assert_eq!(keys(&report), [("11".to_string(), vec![], 2)], "{report:?}");
    // pairs was truncated: its tracking stopped (digests start over), checks scan…
    let report = check(&both, "public.pairs", &at(10)).await.unwrap();
    assert_eq!(report.digests, "scanned");
    assert_eq!(keys(&report), [("k5,5".to_string(), vec!["b"], 1)], "{report:?}");
    // …until it is tracked again.
    for n in [&na, &nb] {
        n.track(&n.describe("public.pairs").await.unwrap(), 10).await.unwrap();
    }
    let report = check(&both, "public.pairs", &at(10)).await.unwrap();
    assert_eq!(report.digests, "tracked");
    assert_eq!(keys(&report), [("k5,5".to_string(), vec!["b"], 1)], "{report:?}");
    // More writes: a session that read the digests before reads only the buckets folded
    // since, and still equals a scan.
    // pairs holds 300 rows in 1,024 buckets: most of its inserts land in buckets without a
    // digest row yet.
    for n in [&a, &b] {
        n.psql("app", "UPDATE items SET a = a + 1 WHERE id % 97 = 5; DELETE FROM items WHERE id = 77; INSERT INTO items (id) VALUES (50001);
                       INSERT INTO pairs SELECT g, 'new' || (g % 7), 'v' FROM generate_series(1, 400) g; DELETE FROM pairs WHERE k1 % 50 = 0")
            .unwrap();
    }
    for (n, cluster) in [(&na, &a), (&nb, &b)] {
        for table in ["public.items", "public.pairs"] {
            let shape = n.describe(table).await.unwrap();
            let read = n.tracked_digests(&shape.name, 10, &[]).await.unwrap();
            let (tracked, folded) = (read.buckets, read.folded);
            assert!(folded > 0);
            assert_eq!(tracked, n.digests(&shape, 10).await.unwrap(), "{table} on {}: incremental read", n.name);
            sub_digests_equal_a_scan(cluster, table).await;
        }
    }

    // Checks that keep the rows of differing buckets between them: drift appearing and going
    // away inside a remembered bucket is seen (its digests changed), through the sub-bucket
    // digests and index.
    let cache = std::env::temp_dir().join(format!("synapse-repair-cache-{}", std::process::id()));
    let cached = CheckOptions { cache_dir: Some(cache.clone()), ..at(10) };
    let report = check(&both, "public.items", &cached).await.unwrap();
    assert_eq!((report.digests.as_str(), keys(&report)), ("tracked", vec![("11".to_string(), vec![], 2)]));
    let neighbour = a
        .psql(
            "app",
            "SELECT id FROM items WHERE id <> 11
               AND (hashint8extended(id, 0) >> 54) & 1023 = (hashint8extended(11::int8, 0) >> 54) & 1023 LIMIT 1",
        )
        .unwrap();
    b.psql("app", &format!("UPDATE items SET a = a + 1000 WHERE id = {neighbour}")).unwrap();
    let report = check(&both, "public.items", &cached).await.unwrap();
    assert_eq!(report.reused_buckets, 0, "{report:?}");
    let mut both_keys = vec![("11".to_string(), vec![], 2), (neighbour.clone(), vec![], 2)];
    both_keys.sort();
    assert_eq!(keys(&report), both_keys, "{report:?}");
    a.psql("app", "UPDATE items SET big = 'drift' WHERE id = 11").unwrap();
    let report = check(&both, "public.items", &cached).await.unwrap();
    assert_eq!(keys(&report), [(neighbour.clone(), vec![], 2)], "{report:?}");
    // Two keys of one sub-bucket drift one after the other: the second time their sub-bucket
    // differed before and still does, with other digests: its rows are read again, not taken
    // from the last check.
    let pair = a
        .psql(
            "app",
            &format!(
                "SELECT min(id) || ' ' || max(id) FROM items WHERE id NOT IN (11, {neighbour})
                 GROUP BY (hashint8extended(id, 0) >> 49) & 32767 HAVING count(*) > 1 LIMIT 1"
            ),
        )
        .unwrap();
    let (p, q) = pair.trim().split_once(' ').unwrap();
    let mut expected = vec![(neighbour.clone(), vec![], 2)];
    for k in [p, q] {
        b.psql("app", &format!("UPDATE items SET a = a + 1000 WHERE id = {k}")).unwrap();
        let report = check(&both, "public.items", &cached).await.unwrap();
        expected.push((k.to_string(), vec![], 2));
        expected.sort();
        assert_eq!(keys(&report), expected, "{report:?}");
    }
    b.psql("app", &format!("UPDATE items SET a = a - 1000 WHERE id IN ({p}, {q})")).unwrap();
    let _ = std::fs::remove_dir_all(&cache);

    // A node tracked by a release before the layout column (and before the node schema had
    // versions): scanned, same answer, until tracked again (which migrates it).
    a.psql("app", "ALTER TABLE synapse.repair_tracked DROP COLUMN layout; DROP TABLE synapse.schema_version").unwrap();
    let report = check(&both, "public.items", &at(10)).await.unwrap();
    assert_eq!((report.digests.as_str(), keys(&report)), ("scanned", vec![(neighbour.clone(), vec![], 2)]));
    na.track(&na.describe("public.items").await.unwrap(), 10).await.unwrap();
    let report = check(&both, "public.items", &at(10)).await.unwrap();
    assert_eq!((report.digests.as_str(), keys(&report)), ("tracked", vec![(neighbour.clone(), vec![], 2)]));

    // Another bucket count than tracked: scanned, same answer.
    let report = check(&both, "public.items", &at(8)).await.unwrap();
    assert_eq!((report.digests.as_str(), keys(&report)), ("scanned", vec![(neighbour, vec![], 2)]));

    // Untracked on one node: scanned again, and writes there record nothing any more.
    let shape = na.describe("public.items").await.unwrap();
    na.untrack(&shape).await.unwrap();
    na.untrack(&shape).await.unwrap();
    assert_eq!(na.tracked_bits(&shape).await.unwrap(), None);
    a.psql("app", "UPDATE items SET a = 0 WHERE id = 1").unwrap();
    assert_eq!(
        a.psql("app", "SELECT count(*) FROM synapse.repair_delta").unwrap()
            + " "
            + &a.psql("app", "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'synapse_repair_%'").unwrap(),
        "0 1",
        "items' triggers and index are gone (pairs' index stays)"
    );
    let report = check(&both, "public.items", &at(10)).await.unwrap();
    assert_eq!(report.digests, "scanned");
}

/// The sub-bucket digests of `table` (tracked with 10 bits) as a session that knows none of
/// them reads them equal those a scan computes, in one snapshot.
async fn sub_digests_equal_a_scan(cluster: &LocalCluster, table: &str) {
    let fresh = Node::connect("fresh", &cluster.url("app").parse().unwrap()).await.unwrap();
    let shape = fresh.describe(table).await.unwrap();
    let every: Vec<usize> = (0..1 << 10).collect();
    fresh.client().batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
    let scanned = fresh.stage(&shape, 10, 15, &every).await.unwrap();
    let tracked = fresh.tracked_sub_digests(&shape, &every).await.unwrap();
    fresh.client().batch_execute("COMMIT").await.unwrap();
    assert_eq!(tracked.len(), scanned.len(), "{table}: sub-buckets holding rows");
    assert!(tracked == scanned, "{table}: tracked sub-bucket digests differ from a scan");
}

/// A session kept between checks (the admin API's) reads only what changed: tracked digests in
/// the round trip that opens the snapshot, sub-bucket digests it already knows, rows of
/// differing buckets remembered from the last check. Round after round of writes — alike on
/// both nodes, on one only, drift written away again — with other sessions folding changes
/// before it, its reports must equal those of fresh sessions without any cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_reports_what_fresh_sessions_report() {
    let (a, b) = (cluster(), cluster());
    let url = |n: &LocalCluster| n.url("app").parse::<synapse_postgres::PgConfig>().unwrap();
    let (na, nb) = (Node::connect("a", &url(&a)).await.unwrap(), Node::connect("b", &url(&b)).await.unwrap());
    // Few buckets (64, 2,048 sub-buckets): changes and drift share buckets and sub-buckets.
    const BITS: u8 = 6;
    for n in [&na, &nb] {
        let shape = n.describe("public.items").await.unwrap();
        n.track(&shape, BITS).await.unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    let kept = CheckOptions { cache_dir: Some(cache.path().to_owned()), ..at(BITS) };
    let (mut expected_drift, mut reused) = (0, 0);
    for round in 0..12u64 {
        let alike = format!("UPDATE items SET a = a + 1 WHERE id % 2000 = {round}");
        a.psql("app", &alike).unwrap();
        b.psql("app", &alike).unwrap();
        // Drift on one node or the other, and in some rounds the earlier drift written away.
        // The same few keys again and again: their buckets differ, stop differing, differ again.
        let id = 1000 + (round % 3) * 37;
        let drifted = if round % 2 == 0 { &a } else { &b };
        drifted.psql("app", &format!("UPDATE items SET b = 'drift {round}' WHERE id = {id}")).unwrap();
        expected_drift += 1;
        if round % 4 == 3 {
            let undo = "UPDATE items SET b = 'row ' || id WHERE id BETWEEN 1000 AND 1074";
            a.psql("app", undo).unwrap();
            b.psql("app", undo).unwrap();
            expected_drift = 0;
        }
        // Other sessions fold too: before the kept one (which then finds one fold it did not
        // make), or before more writes (two folds since its last read), or after it.
        let (fa, fb) = (Node::connect("a", &url(&a)).await.unwrap(), Node::connect("b", &url(&b)).await.unwrap());
        let fresh_first = round % 3 != 0;
        let mut fresh = None;
        if fresh_first {
            fresh = Some(check(&[&fa, &fb], "public.items", &at(BITS)).await.unwrap());
        }
        if round % 3 == 2 {
            let more = format!("UPDATE items SET a = a + 1 WHERE id % 1000 = {round}");
            a.psql("app", &more).unwrap();
            b.psql("app", &more).unwrap();
        }
        let warm = check(&[&na, &nb], "public.items", &kept).await.unwrap();
        if !fresh_first {
            fresh = Some(check(&[&fa, &fb], "public.items", &at(BITS)).await.unwrap());
        }
        let fresh = fresh.unwrap();
        assert_eq!(warm.digests, "tracked", "round {round}");
        assert_eq!(warm.differing, fresh.differing, "round {round}: kept session vs fresh sessions");
        assert_eq!(warm.differing.len(), expected_drift, "round {round}: {:?}", keys(&warm));
        reused += warm.reused_buckets;
    }
    // Unchanged differing buckets were taken from the last check (else this tested nothing).
    assert!(reused > 0, "no bucket was ever reused");
}

/// Key-range buckets (an integer key): negative keys, keys beyond the other node's range, a
/// node holding nothing — every reported key is a real difference and every difference is
/// reported, as with hash buckets (the composite-key table beside it); one far outlier key
/// makes the check fall back to hash buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_range_buckets_find_every_difference() {
    let schema = "CREATE TABLE r (id int PRIMARY KEY, v text);
        CREATE TABLE h (id int, k text, v text, PRIMARY KEY (id, k));";
    let (a, b) = (
        LocalCluster::start(ClusterOptions::default()).unwrap(),
        LocalCluster::start(ClusterOptions::default()).unwrap(),
    );
    for n in [&a, &b] {
        n.create_database("app").unwrap();
        n.psql("app", schema).unwrap();
    }
    let url = |n: &LocalCluster| n.url("app").parse::<synapse_postgres::PgConfig>().unwrap();
    let (na, nb) = (Node::connect("a", &url(&a)).await.unwrap(), Node::connect("b", &url(&b)).await.unwrap());
    // Keys -50000, -49993, …, 49995: 14,286 rows. ANALYZE: key ranges need a row estimate.
    let fill = "INSERT INTO r SELECT g, 'v' || g FROM generate_series(-50000, 50000, 7) g;
                INSERT INTO h SELECT g, 'k', 'v' || g FROM generate_series(-50000, 50000, 7) g; ANALYZE r, h;";
    a.psql("app", fill).unwrap();
    b.psql("app", "ANALYZE r, h").unwrap();
    let sorted = |r: &Report| {
        let mut keys: Vec<String> = r.differing.iter().map(|d| d.key.join(",")).collect();
        keys.sort();
        keys
    };
    // b holds nothing: every key of a differs (missing on b).
    for (table, by) in [("public.r", "key range -50000..49995"), ("public.h", "key hash")] {
        let report = check(&[&na, &nb], table, &at(8)).await.unwrap();
        assert_eq!(report.buckets_by, by, "{table}");
        assert_eq!(report.differing.len(), 14286, "{table}");
        assert!(report.differing.iter().all(|d| d.missing_on == ["b"]), "{table}");
    }
    b.psql("app", fill).unwrap();
    // Drift at both ends, in the middle, and beyond a's smallest and largest keys.
    b.psql(
        "app",
        "UPDATE r SET v = 'x' WHERE id IN (-50000, -49993, 49995); DELETE FROM r WHERE id IN (1, 8);
         INSERT INTO r VALUES (-60000, 'low'), (60000, 'high'), (3, 'new');
         UPDATE h SET v = 'x' WHERE id IN (-50000, -49993, 49995); DELETE FROM h WHERE id IN (1, 8);
         INSERT INTO h VALUES (3, 'k', 'new');",
    )
    .unwrap();
    let report = check(&[&na, &nb], "public.r", &at(8)).await.unwrap();
    assert_eq!(report.buckets_by, "key range -60000..60000", "{report:?}");
    let mut expected = ["-50000", "-49993", "49995", "1", "8", "-60000", "60000", "3"].map(String::from).to_vec();
    expected.sort();
    assert_eq!(sorted(&report), expected);
    let report = check(&[&na, &nb], "public.h", &at(8)).await.unwrap();
    assert_eq!(report.buckets_by, "key hash");
    let mut expected = ["-50000,k", "-49993,k", "49995,k", "1,k", "8,k", "3,k"].map(String::from).to_vec();
    expected.sort();
    assert_eq!(sorted(&report), expected);
    // One far key: equal ranges would hold every row in one bucket; hash buckets instead.
    b.psql("app", "INSERT INTO r VALUES (2000000000, 'far')").unwrap();
    let report = check(&[&na, &nb], "public.r", &at(8)).await.unwrap();
    assert_eq!(report.buckets_by, "key hash", "{report:?}");
    expected.clear();
    expected.extend(["-50000", "-49993", "49995", "1", "8", "-60000", "60000", "3", "2000000000"].map(String::from));
    expected.sort();
    assert_eq!(sorted(&report), expected);
}
