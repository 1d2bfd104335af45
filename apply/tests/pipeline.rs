//! Capture → embedded log → apply against two real PostgreSQL clusters.
#![allow(clippy::unwrap_used)] // a failed setup step should fail the test loudly

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use synapse_apply::{initial_copy, Applier, ApplyConfig};
use synapse_capture::{Capture, CaptureConfig};
use synapse_error::Classify;
use synapse_localpg::{ClusterOptions, LocalCluster};
use synapse_log::EmbeddedLog;
use tokio::sync::watch;

struct Pipeline {
    log: EmbeddedLog,
    stats: Arc<synapse_apply::ApplyStats>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn start(source: &LocalCluster, target: &LocalCluster, dir: &std::path::Path) -> Pipeline {
    let mut cfg = CaptureConfig::new("a", source.url("app").parse().unwrap());
    cfg.heartbeat_interval = Duration::from_millis(500);
    let capture = Arc::new(Capture::connect(cfg).await.unwrap());
    let log = EmbeddedLog::open(&dir.join("a.redb"), Default::default()).unwrap();
    let prepared = capture.prepare(&log).await.unwrap();
    let (stop, rx) = watch::channel(false);
    let target_cfg: synapse_postgres::PgConfig = target.url("app").parse().unwrap();
    let applier = Arc::new(Applier::new(ApplyConfig::new("a", target_cfg.clone(), "apply-b")));
    let c = capture.clone();
    let l = log.clone();
    let r = rx.clone();
    let cap_task = tokio::spawn(async move { c.stream(l, r).await.unwrap() });
    initial_copy::run(&capture, &prepared.tables, &target_cfg, None, 2, applier.stats()).await.unwrap();
    let l = log.clone();
    let stats = applier.stats();
    let apply_task = tokio::spawn(async move { applier.run(&l, rx).await.unwrap() });
    Pipeline { log, stats, stop, tasks: vec![cap_task, apply_task] }
}

/// A source and a target cluster, each with an empty database `app`.
fn two_nodes() -> (LocalCluster, LocalCluster) {
    let source = LocalCluster::start(ClusterOptions::default()).unwrap();
    let target = LocalCluster::start(ClusterOptions::default()).unwrap();
    source.create_database("app").unwrap();
    target.create_database("app").unwrap();
    (source, target)
}

async fn wait_equal(source: &LocalCluster, target: &LocalCluster, query: &str) {
    // The poll sleeps: keep it off the runtime's workers, which run the pipeline.
    tokio::task::block_in_place(|| {
        synapse_localpg::wait_until_equal(source, target, "app", query, Duration::from_secs(60))
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_then_streams_every_operation() {
    let (source, target) = two_nodes();
    source
        .psql(
            "app",
            "CREATE TABLE users (id bigint PRIMARY KEY, name text, score numeric(10,2), tags text[], doc jsonb);
             INSERT INTO users SELECT g, 'user ' || g, g * 1.5, ARRAY['a', 'b'], jsonb_build_object('n', g) FROM generate_series(1, 1000) g;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _p = start(&source, &target, dir.path()).await;
    let q = "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM users t";
    wait_equal(&source, &target, q).await;
    source
        .psql(
            "app",
            "INSERT INTO users VALUES (5000, 'new', 1, '{}', '{}');
             UPDATE users SET score = score + 1 WHERE id % 3 = 0;
             DELETE FROM users WHERE id % 7 = 0;
             UPDATE users SET id = 6000 WHERE id = 1;",
        )
        .unwrap();
    wait_equal(&source, &target, q).await;
    source.psql("app", "TRUNCATE users; INSERT INTO users VALUES (1, 'again', 2, NULL, NULL)").unwrap();
    wait_equal(&source, &target, q).await;
}

const TYPES_SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE all_types (
    id bigint PRIMARY KEY, i2 smallint, i4 integer, n numeric(20,6), r real, d double precision, b boolean,
    t text, vc varchar(12), c char(4), by bytea, u uuid, dt date, tm time, tz timetz, ts timestamp,
    tstz timestamptz, iv interval, j json, jb jsonb, ia int[], ta text[], m mood, p posint, ip inet,
    cidr_ cidr, mac macaddr, vb bit varying(8), x xml, money_ money, pt point, tsv tsvector);";

const TYPES_ROWS: &str = r#"
INSERT INTO all_types VALUES
 (1, -32768, 2147483647, 12345678901234.123456, 1.5, 'NaN', true, 'plain', 'varchar', 'ab', '\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '2024-02-29', '23:59:59.999999', '12:00+05:30', '1999-12-31 23:59:59.5', '2000-01-01 00:00:00+00', '1 year 2 mons 3 days 04:05:06.789',
  '{"a": [1, 2]}', '{"b": {"c": null}}', '{1,NULL,3}', '{"with space","quote\"d",NULL}', 'happy', 42, '10.0.0.1/8', '192.168.0.0/16',
  '08:00:2b:01:02:03', B'1011', '<a>x</a>', 12.34, '(1.5,2)', 'fat cats'),
 (2, NULL, NULL, NULL, '-Infinity', 'Infinity', false, '', NULL, NULL, '', NULL, 'infinity', NULL, NULL, '-infinity', NULL, '-00:00:01',
  'null', '[]', '{}', '{}', 'sad', 1, '::1', '::/0', NULL, B'', NULL, -1, NULL, ''),
 (3, 1, 1, -0.000001, 3.4e38, 1e-300, NULL, E'unicode \u00e9\u4e2d\U0001F600 and \t tab', 'x', 'y', NULL, NULL, '0001-01-01', '00:00', NULL,
  '2262-04-11 23:47:16', '1900-06-30 12:34:56.789+02', '0', '1.5e10', '{"k": 1.5e10}', '{{1,2},{3,4}}', '{{a,b},{c,d}}', NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL);"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_every_common_type() {
    let (source, target) = two_nodes();
    source.psql("app", TYPES_SCHEMA).unwrap();
    // The target has neither the enum nor the domain: synapse creates them from the source's
    // definitions, with the labels in order and the domain's constraint.
    source.psql("app", TYPES_ROWS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _p = start(&source, &target, dir.path()).await;
    // Rows 1-3 arrive through the initial copy; now the same values through the stream.
    let q = "SELECT string_agg(t::text, E'\\n' ORDER BY id) FROM all_types t";
    wait_equal(&source, &target, q).await;
    assert_eq!(target.psql("app", "SELECT enum_range(NULL::mood)::text").unwrap(), "{sad,ok,happy}");
    let check = "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = 'posint'::regtype";
    assert_eq!(target.psql("app", check).unwrap(), source.psql("app", check).unwrap());
    source
        .psql(
            "app",
            &(TYPES_ROWS.replace("(1, ", "(1001, ").replace("(2, ", "(1002, ").replace("(3, ", "(1003, ")
                + r#"; UPDATE all_types SET id = id + 10;
                 INSERT INTO all_types SELECT id - 10 + 100, i2, i4, n, r, d, b, t, vc, c, by, u, dt,
                     tm, tz, ts, tstz, iv, j, jb, ia, ta, m, p, ip, cidr_, mac, vb, x, money_, pt, tsv FROM all_types WHERE id < 20;
                 UPDATE all_types SET t = t || '!', ia = CASE WHEN array_ndims(ia) = 1 THEN ia || 9 ELSE ia END, jb = jb || '{"z": 1}', m = 'ok' WHERE id > 100;
                 DELETE FROM all_types WHERE id = 12;"#),
        )
        .unwrap();
    wait_equal(&source, &target, q).await;
}

/// Every type with a binary COPY encoder, in one table.
const BINARY_SCHEMA: &str = "CREATE TABLE bin (id bigint PRIMARY KEY, i2 smallint, i4 integer, f4 real,
    f8 double precision, n numeric(30,8), b boolean, tx text, vc varchar(20), ch char(5), by bytea, u uuid,
    d date, tm time, ts timestamp, tz timestamptz, j json, jb jsonb, o oid)";

/// `n` rows from `first` with edge values (NULLs, infinities, NaN, BC dates, escapes) among
/// random ones; `bytes` is the bytea value of the middle row (others NULL).
fn binary_rows(first: i64, n: i64, bytes: Option<&str>) -> String {
    let bytes = bytes.map_or("NULL::bytea".to_owned(), |b| format!("'{b}'::bytea"));
    format!(
        r#"INSERT INTO bin SELECT g,
            CASE g % 7 WHEN 0 THEN NULL ELSE (g % 65535 - 32767)::int2 END, (g * 7919 - 1000000)::int4,
            (ARRAY['NaN', 'Infinity', '-0', '1.5e-40', '3.4028235e38']::real[])[g % 5 + 1] * (CASE WHEN g % 2 = 0 THEN 1 ELSE random() END)::real,
            (random() - 0.5) * 10 ^ (g % 600 - 300), round(((random() - 0.5) * 10 ^ (g % 30 - 8))::numeric, 8),
            CASE g % 3 WHEN 0 THEN NULL ELSE g % 2 = 0 END,
            E'tab	 newline
 back\slash ' || g || ' é中😀', 'vc ' || g, left('c' || g, 5),
            CASE WHEN g = {first} + {n} / 2 THEN {bytes} END, gen_random_uuid(),
            CASE g % 4 WHEN 0 THEN 'infinity'::date WHEN 1 THEN '0044-03-15 BC'::date ELSE '2000-01-01'::date + (g % 100000 - 50000) END,
            '00:00'::time + g * interval '1.000001 s',
            '2000-01-01'::timestamp + (g - 100) * interval '1 day 00:00:00.5',
            CASE g % 5 WHEN 0 THEN '-infinity'::timestamptz WHEN 1 THEN '0100-02-28 12:00+00 BC'::timestamptz ELSE now() + g * interval '1 year 1 s' END,
            json_build_object('g', g, 's', 'x"y'), jsonb_build_object('g', g, 'a', jsonb_build_array(1, 'two', null)), (g * 13)::oid
          FROM generate_series({first}, {first} + {n} - 1) g"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_go_through_binary_copy_and_fall_back_to_text_for_the_rest_of_a_run() {
    let (source, target) = two_nodes();
    source.psql("app", BINARY_SCHEMA).unwrap();
    // Bytea values print in escape form on this source: a value the binary encoder refuses.
    source.psql("app", "ALTER DATABASE app SET bytea_output = 'escape'").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(&source, &target, dir.path()).await;
    // Compared in one text form: the source prints bytea in escape form, the target in hex.
    let q = "SET bytea_output = hex; SELECT md5(string_agg(t::text, E'\\n' ORDER BY id)) || ' ' || count(*) FROM bin t";
    // One insert run of 300 rows, every bytea NULL: all binary.
    source.psql("app", &binary_rows(1, 301, None)).unwrap();
    wait_equal(&source, &target, q).await;
    let stats = || (p.stats.copied_binary.load(Ordering::Relaxed), p.stats.copied_text.load(Ordering::Relaxed));
    assert_eq!(stats(), (301, 0));
    // The middle row has a bytea printed as escape text: the rows before it stay binary, it and
    // the rest of the run go in text.
    source.psql("app", &binary_rows(1001, 300, Some("a\\000b"))).unwrap();
    wait_equal(&source, &target, q).await;
    assert_eq!(stats(), (301 + 150, 150));
    assert_eq!(target.psql("app", "SELECT encode(by, 'hex') FROM bin WHERE by IS NOT NULL").unwrap(), "610062");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_survive_updates() {
    let (source, target) = two_nodes();
    source.psql("app", "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, tags text[])").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _p = start(&source, &target, dir.path()).await;
    // 32 KB of incompressible text is stored out of line (TOAST); updates of other columns do
    // not send it again.
    source
        .psql(
            "app",
            "INSERT INTO docs SELECT g, 'v1', (SELECT string_agg(md5(x::text || random()::text || g), '') FROM generate_series(1, 1000) x),
                    ARRAY(SELECT md5(x::text || random()::text || g) FROM generate_series(1, 400) x) FROM generate_series(1, 5) g;",
        )
        .unwrap();
    let q = "SELECT string_agg(id || ':' || title || ':' || md5(body) || ':' || md5(tags::text), ',' ORDER BY id) FROM docs";
    wait_equal(&source, &target, q).await;
    source.psql("app", "UPDATE docs SET title = 'v2'; UPDATE docs SET title = 'v3' WHERE id = 1; UPDATE docs SET id = 50 WHERE id = 5").unwrap();
    wait_equal(&source, &target, q).await;
    assert_eq!(target.psql("app", "SELECT count(*) FROM docs WHERE body IS NULL OR tags IS NULL").unwrap(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_concurrent_writes_has_no_gap_and_no_duplicate() {
    let (source, target) = two_nodes();
    source
        .psql(
            "app",
            "CREATE TABLE big (id bigint PRIMARY KEY, v bigint NOT NULL, pad text);
             INSERT INTO big SELECT g, 0, repeat('p', 200) FROM generate_series(1, 200000) g;",
        )
        .unwrap();
    let url = source.url("app");
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let writer = tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let mut i = 0i64;
        while !*stop_rx.borrow_and_update() {
            i += 1;
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO big VALUES ({}, {i}, 'new'); UPDATE big SET v = v + 1 WHERE id = {}; DELETE FROM big WHERE id = {}; COMMIT;",
                    1_000_000 + i,
                    1 + (i * 7919) % 200_000,
                    1 + (i * 104_729) % 200_000
                ))
                .await
                .unwrap();
        }
        i
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let _p = start(&source, &target, dir.path()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_tx.send(true).unwrap();
    let writes = writer.await.unwrap();
    assert!(writes > 50, "only {writes} concurrent transactions");
    let q =
        "SELECT count(*) || ':' || sum(v) || ':' || md5(string_agg(id::text || '=' || v, ',' ORDER BY id)) FROM big";
    wait_equal(&source, &target, q).await;
}

/// Two appliers of one source against one target (a second process with the same
/// configuration, or a source handed over by the consumer group while its previous owner still
/// runs): the second must not apply alongside the first, and must take over once it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_applier_of_the_same_source_waits_for_the_first() {
    let (source, target) = two_nodes();
    source.psql("app", "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = start(&source, &target, dir.path()).await;
    let q = "SELECT count(*) FROM t";
    wait_equal(&source, &target, q).await;
    let log = first.log.clone();
    let second = Applier::new(ApplyConfig::new("a", target.url("app").parse().unwrap(), "apply-b"));
    let (_stop2, rx2) = watch::channel(false);
    let e = second.run(&log, rx2.clone()).await.unwrap_err();
    assert_eq!(e.code(), "APP006", "{e}");
    assert!(e.is_transient(), "{e}");
    drop(first);
    // The first's session ends and its lock with it; the second then runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (stop, rx) = watch::channel(false);
        let run = tokio::spawn({
            let log = log.clone();
            let second = Applier::new(ApplyConfig::new("a", target.url("app").parse().unwrap(), "apply-b"));
            async move { second.run(&log, rx).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !run.is_finished() {
            stop.send(true).unwrap();
            run.await.unwrap().unwrap();
            break;
        }
        let e = run.await.unwrap().unwrap_err();
        assert_eq!(e.code(), "APP006", "{e}");
        assert!(std::time::Instant::now() < deadline, "the lock outlived the first applier");
    }
}

/// Table `public.t (id bigint, v text)` as a relation of a hand-written log.
fn hand_relation(key: bool) -> synapse_schemas::Relation {
    use synapse_schemas::{Column, Relation, ReplicaIdentity};
    let col = |name: &str, oid: u32, key: bool| Column {
        name: name.into(),
        type_oid: oid,
        type_modifier: -1,
        type_name: if oid == 20 { "int8".into() } else { "text".into() },
        base_type_oid: oid,
        element_type_oid: 0,
        is_key: key,
        type_defs: Vec::new(),
    };
    Relation {
        oid: 7,
        schema: "public".into(),
        table: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![col("id", 20, key), col("v", 25, false)],
    }
}

/// A transaction of a hand-written log inserting one row of `values` (their number may be
/// wrong on purpose), with the relation's definition when `rel` is given.
fn hand_txn(
    key: synapse_schemas::RelationKey,
    rel: Option<&synapse_schemas::Relation>,
    lsn: u64,
    values: Vec<String>,
) -> Vec<synapse_schemas::LogRecord> {
    use synapse_schemas::{Begin, Commit, Datum, LogRecord, Lsn, Op, RowChange};
    let mut records = vec![LogRecord::Begin(Begin { commit_lsn: Lsn(lsn), xid: 1, commit_time_us: 1, origin: None })];
    records.extend(rel.map(|r| LogRecord::Relation(r.clone())));
    records.push(LogRecord::Change(RowChange {
        index: 1,
        relation: key,
        op: Op::Insert,
        before: None,
        after: Some(values.into_iter().map(Datum::Text).collect::<Vec<_>>().into()),
    }));
    records.push(LogRecord::Commit(Commit {
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 1),
        commit_time_us: 1,
        event_count: 1,
    }));
    records
}

/// A damaged log record — a change with more values than its relation has columns — stops the
/// applier with a definite error naming the offset and the table; nothing of it is applied and
/// nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_does_not_fit_its_relation_is_refused_by_name() {
    use synapse_log::ChangeLog;
    let (_source, target) = two_nodes();
    target.psql("app", "CREATE TABLE t (id bigint PRIMARY KEY, v text)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    let rel = hand_relation(true);
    let values = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
    log.append(hand_txn(rel.key(), Some(&rel), 100, values(2))).await.unwrap();
    log.append(hand_txn(rel.key(), Some(&rel), 200, values(3))).await.unwrap();
    let applier = Applier::new(ApplyConfig::new("a", target.url("app").parse().unwrap(), "apply-b"));
    let (_stop, rx) = watch::channel(false);
    let e = tokio::time::timeout(Duration::from_secs(30), applier.run(&log, rx)).await.unwrap().unwrap_err();
    assert_eq!(e.code(), "APP008", "{e}");
    assert!(!e.is_transient());
    assert!(
        e.to_string().contains("offset 6") && e.to_string().contains("public.t") && e.to_string().contains("3 values"),
        "{e}"
    );
    // Grouped with the good transaction before it, nothing was committed: a restart (after the
    // log is repaired) applies both from the stored position, exactly once.
    assert_eq!(target.psql("app", "SELECT count(*) FROM t").unwrap(), "0");
}

/// Tables `public.t` and `public.u`, both `(id bigint key, v text)`, as relations of a
/// hand-written log.
fn tables_t_and_u() -> (synapse_schemas::Relation, synapse_schemas::Relation) {
    let t = hand_relation(true);
    let mut u = hand_relation(true);
    u.oid = 8;
    u.table = "u".into();
    (t, u)
}

/// Statements of a group go to the target without waiting for each other's results (one round
/// trip per group). When one fails, the target runs the rest in an aborted transaction and
/// they fail too ("current transaction is aborted"): the error reported must be the first,
/// naming its table and constraint, and nothing of the group may be committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_statement_in_a_pipelined_group_is_the_error_reported() {
    use synapse_log::ChangeLog;
    use synapse_schemas::{LogRecord, Op};
    let (_source, target) = two_nodes();
    // A rule only the target has: the source's row 'bad' breaks it.
    target
        .psql("app", "CREATE TABLE t (id bigint PRIMARY KEY, v text); CREATE TABLE u (id bigint PRIMARY KEY, v text CHECK (v <> 'bad'))")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    let (t, u) = tables_t_and_u();
    // A group: an insert into u, an insert and an update of t — three statements, sent
    // together behind BEGIN and followed by the COMMIT.
    let group = |first: u64, u_value: &str, t_id: &str, lsn: u64| {
        let row = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
        let with_rel = lsn == 100;
        let mut update = hand_txn(t.key(), None, lsn + 20, row("1", &format!("v{lsn}")));
        if let LogRecord::Change(c) = &mut update[1] {
            c.op = Op::Update;
        }
        [
            hand_txn(u.key(), with_rel.then_some(&u), lsn, row(&first.to_string(), u_value)),
            hand_txn(t.key(), with_rel.then_some(&t), lsn + 10, row(t_id, "x")),
            update,
        ]
    };
    let contents = || {
        target.psql("app", "SELECT (SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM u) || ';' || (SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM t)").unwrap()
    };
    let wait_for = |want: &'static str| {
        let contents = &contents;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while contents() != want {
                assert!(std::time::Instant::now() < deadline, "got {}, want {want}", contents());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let applier = Applier::new(ApplyConfig::new("a", target.url("app").parse().unwrap(), "apply-b"));
    let (_stop, rx) = watch::channel(false);
    let running = {
        let log = log.clone();
        tokio::spawn(async move { applier.run(&log, rx).await })
    };
    // The first group prepares the statements, so the second sends them all without a wait.
    for txn in group(1, "ok", "1", 100) {
        log.append(txn).await.unwrap();
    }
    wait_for("1:ok;1:v100").await;
    for txn in group(2, "bad", "2", 200) {
        log.append(txn).await.unwrap();
    }
    let e = tokio::time::timeout(Duration::from_secs(30), running).await.unwrap().unwrap().unwrap_err();
    let cause = std::iter::successors(std::error::Error::source(&e), |s| s.source())
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    assert_eq!(e.code(), "APP001", "{e}: {cause}");
    assert!(e.to_string().contains("public.u"), "the error names the table whose statement failed: {e}");
    assert!(cause.contains("u_v_check"), "the cause is the constraint, not the aborted transaction: {cause}");
    assert!(e.hint().contains("constraint the source does not have"), "{}", e.hint());
    assert!(!e.is_transient());
    assert_eq!(contents(), "1:ok;1:v100", "nothing of the failed group is committed");
    // Once the target takes the row, a restart applies the whole group.
    target.psql("app", "ALTER TABLE u DROP CONSTRAINT u_v_check").unwrap();
    let applier = Applier::new(ApplyConfig::new("a", target.url("app").parse().unwrap(), "apply-b"));
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { applier.run(&log, rx).await });
    wait_for("1:ok,2:bad;1:v200,2:x").await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// A group's COMMIT can fail (a check deferred to it), and the next group's statements are
/// already on their way behind it. The next group's COMMIT must not be sent until the one
/// before it is known committed: else it would store a position past the rolled-back group,
/// which would never be applied. Each source transaction is its own group here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_commit_fails_is_not_passed_by_the_next() {
    use synapse_log::ChangeLog;
    let (_source, target) = two_nodes();
    target
        .psql(
            "app",
            // A check the target runs at COMMIT (a deferred constraint trigger, enabled for the
            // applier's replica sessions too).
            "CREATE TABLE t (id bigint PRIMARY KEY, v text);
             CREATE TABLE u (id bigint PRIMARY KEY, v text);
             CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN IF NEW.v = 'bad' THEN RAISE EXCEPTION 'u refuses %', NEW.v USING ERRCODE = 'check_violation'; END IF;
                 RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER u_checked_at_commit AFTER INSERT ON u
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_bad();
             ALTER TABLE u ENABLE ALWAYS TRIGGER u_checked_at_commit;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    let (t, u) = tables_t_and_u();
    let row = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
    // The second of u's rows fails the check: its group fails at COMMIT.
    log.append(hand_txn(u.key(), Some(&u), 100, row("1", "ok"))).await.unwrap();
    log.append(hand_txn(u.key(), None, 200, row("2", "bad"))).await.unwrap();
    log.append(hand_txn(t.key(), Some(&t), 300, row("1", "after"))).await.unwrap();
    log.append(hand_txn(t.key(), None, 400, row("2", "after"))).await.unwrap();
    let config = || {
        let mut c = ApplyConfig::new("a", target.url("app").parse().unwrap(), "apply-b");
        c.max_txns_per_commit = 1;
        c
    };
    let (_stop, rx) = watch::channel(false);
    let e =
        tokio::time::timeout(Duration::from_secs(30), Applier::new(config()).run(&log, rx)).await.unwrap().unwrap_err();
    let cause = std::iter::successors(std::error::Error::source(&e), |s| s.source())
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    assert_eq!(e.code(), "APP001", "{e}: {cause}");
    assert!(cause.contains("u refuses bad"), "{cause}");
    let state = || {
        target
            .psql(
                "app",
                "SELECT (SELECT count(*) FROM u) || ':' || (SELECT count(*) FROM t) || ':' || \
                 (SELECT commit_lsn::text FROM synapse.applied WHERE source_node = 'a')",
            )
            .unwrap()
    };
    assert_eq!(state(), "1:0:0/64", "only the first group is committed, and the position is its own");
    // With the constraint gone, a restart applies the rest, once.
    target.psql("app", "DROP TRIGGER u_checked_at_commit ON u").unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn({
        let log = log.clone();
        let applier = Applier::new(config());
        async move { applier.run(&log, rx).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while state() != "2:2:0/190" {
        assert!(std::time::Instant::now() < deadline, "got {}", state());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// A log that holds transactions twice (a producer retry on Kafka writes a batch again) must
/// not apply them twice: a transaction at or below the last applied commit LSN is passed over,
/// in the same session and after a restart; one after it still applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_log_holds_twice_is_applied_once() {
    use synapse_log::ChangeLog;
    let (_source, target) = two_nodes();
    // No key: a transaction applied twice would show as a second row.
    target.psql("app", "CREATE TABLE t (id bigint, v text)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
    let rel = hand_relation(false);
    let txn = |n: u64| hand_txn(rel.key(), (n == 1).then_some(&rel), n * 100, vec![n.to_string(), format!("row {n}")]);
    let count = || target.psql("app", "SELECT count(*) || ':' || count(DISTINCT id) || ':' || max(id) FROM t").unwrap();
    for n in [1, 2, 1, 2, 3] {
        log.append(txn(n)).await.unwrap();
    }
    let run = |rows: &'static str| {
        let log = log.clone();
        let url = target.url("app");
        let count = &count;
        async move {
            let applier = Applier::new(ApplyConfig::new("a", url.parse().unwrap(), "apply-b"));
            let (stop, rx) = watch::channel(false);
            let task = tokio::spawn(async move { applier.run(&log, rx).await });
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while count() != rows {
                assert!(std::time::Instant::now() < deadline, "got {}, want {rows}", count());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Let it pass over whatever else it would read, then stop it.
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.send(true).unwrap();
            task.await.unwrap().unwrap();
        }
    };
    run("3:3:3").await;
    assert_eq!(count(), "3:3:3");
    // After a restart the stored commit LSN keeps it: 2 again, then 4.
    log.append(txn(2)).await.unwrap();
    log.append(txn(4)).await.unwrap();
    run("4:4:4").await;
    assert_eq!(count(), "4:4:4");
}

/// The applier reads the log before its fsync, so a target can hold a position the log later
/// loses (a crash). The capture then writes the same transactions again from the slot, at
/// other offsets (here: after the `Discarded` marker of a transaction the crash left half
/// written). The applier must neither apply again what it applied nor skip what it did not:
/// it checks its stored offset against the stored commit LSN and resumes by the LSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_the_log_lost_and_rewrote_elsewhere_resumes_by_commit_lsn() {
    use synapse_log::ChangeLog;
    let (_source, target) = two_nodes();
    // No key: a transaction applied twice would show as a second row.
    target.psql("app", "CREATE TABLE t (id bigint, v text)").unwrap();
    target.create_database("app2").unwrap();
    target.psql("app2", "CREATE TABLE t (id bigint, v text)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rel = hand_relation(false);
    let key = rel.key();
    let txn = |n: u64| hand_txn(key, (n == 1).then_some(&rel), n * 100, vec![n.to_string(), format!("row {n}")]);
    let count =
        |db: &str| target.psql(db, "SELECT count(*) || ':' || count(DISTINCT id) || ':' || max(id) FROM t").unwrap();
    let run = |db: &str, log: EmbeddedLog, rows: u64| {
        let applier = Applier::new(ApplyConfig::new("a", target.url(db).parse().unwrap(), "apply-b"));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move { applier.run(&log, rx).await.unwrap() });
        let want = format!("{rows}:{rows}:{rows}");
        tokio::task::block_in_place(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while count(db) != want {
                assert!(std::time::Instant::now() < deadline, "{db}: {} rows, not {want}", count(db));
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let _ = stop.send(true);
        task
    };

    // What the applier read and applied: transactions 1–3 (0–3, 4–6, 7–9), position 10 / LSN 300.
    for db in ["app", "app2"] {
        let first = EmbeddedLog::open(&dir.path().join(format!("{db}-first.redb")), Default::default()).unwrap();
        for n in 1..=3 {
            first.append(txn(n)).await.unwrap();
        }
        run(db, first, 3).await.unwrap();
    }

    // What the log kept after the crash: transaction 1 and the first half of 2. The capture
    // rewrote 2 and 3 and went on with 4: 3's Begin is now at 10, where the target resumes.
    let path = dir.path().join("app-second.redb");
    let second = EmbeddedLog::open(&path, Default::default()).unwrap();
    second.append(txn(1)).await.unwrap();
    second.append(txn(2)[..2].to_vec()).await.unwrap();
    drop(second);
    let second = EmbeddedLog::open(&path, Default::default()).unwrap();
    assert_eq!(second.recover_writer().await.unwrap().next_offset, 7);
    for n in 2..=4 {
        second.append(txn(n)).await.unwrap();
    }
    assert!(matches!(second.read(10, 1).await.unwrap()[0].1, synapse_schemas::LogRecord::Begin(_)));
    run("app", second, 4).await.unwrap();
    assert_eq!(count("app"), "4:4:4", "transaction 3 applied once, 4 applied");

    // The same, but the applier restarts before the capture wrote its last transaction again:
    // it waits at the head and skips 2 and 3 when they arrive.
    let path = dir.path().join("app2-second.redb");
    let second = EmbeddedLog::open(&path, Default::default()).unwrap();
    second.append(txn(1)).await.unwrap();
    let writer = second.clone();
    let later: Vec<_> = (2..=4).map(txn).collect();
    let rewrite = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for records in later {
            writer.append(records).await.unwrap();
        }
    });
    run("app2", second, 4).await.unwrap();
    rewrite.await.unwrap();
    assert_eq!(count("app2"), "4:4:4");
}
