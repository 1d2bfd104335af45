//! A vector index end to end at the scale of issue 22: a real PostgreSQL table of 20,000
//! vectors of 64 dimensions in a `real[]` column, `synapse run` with `vector_indexes:`, the
//! HTTP API. The index loads the table from a snapshot, follows inserts, updates (of the vector
//! and of a filter column) and deletes while synapse is killed -9 in the middle of a
//! transaction's batches and restarted, and ends holding exactly the source's rows with a
//! usable vector — checked on the store's files by every key and every vector, and through the
//! API by sampled rows' own vectors finding them first — with filters respected, the found
//! rows' current values (`include`), a bad row in the dead letters, and a search after a write
//! that waits for it (`after_lsn`).
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

const DIMS: usize = 64;
const ROWS: u64 = 20_000;

/// Row `id`'s vector in generation `g`: pseudo-random components in [-1, 1) (the shader hash
/// `fract(sin(x) · 43758.5453)`), the same in SQL and here. (`sin(id · k)` made chains of
/// near-duplicates — ids 710 apart, 710 ≈ 113 · 2π — which no real embedding set has.)
fn vector_sql(id: &str, g: i32) -> String {
    format!(
        "ARRAY(SELECT (2 * (s - floor(s)) - 1)::real FROM generate_series(1, {DIMS}) k,
           LATERAL (SELECT sin(({id})::float8 * 12.9898::float8 + k::float8 * 78.233::float8 + {g}::float8 * 37.719::float8) * 43758.5453::float8 AS s) h)"
    )
}

fn vector(id: i64, g: i32) -> Vec<f32> {
    (1..=DIMS as i64)
        .map(|k| {
            let s = (id as f64 * 12.9898 + k as f64 * 78.233 + g as f64 * 37.719).sin() * 43758.5453;
            (2.0 * (s - s.floor()) - 1.0) as f32
        })
        .collect()
}

fn post(api: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{api}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .json(body)
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

fn get(api: &str, path: &str) -> Value {
    reqwest::blocking::Client::new()
        .get(format!("http://{api}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(5))
        .send()
        .ok()
        .and_then(|r| r.json().ok())
        .unwrap_or(Value::Null)
}

#[test]
fn a_vector_index_follows_its_table_through_kill_9() {
    let source = LocalCluster::start(ClusterOptions::default()).unwrap();
    source.create_database("app").unwrap();
    source
        .psql(
            "app",
            &format!(
                "CREATE TABLE docs (id int PRIMARY KEY, lang text NOT NULL, embedding real[]);
                 INSERT INTO docs SELECT g, CASE WHEN g % 3 = 0 THEN 'de' ELSE 'en' END, {} FROM generate_series(1, {ROWS}) g;
                 INSERT INTO docs VALUES (-1, 'en', '{{1,2,3}}')",
                vector_sql("g", 0)
            ),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ops = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let config = dir.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {}\nsources:\n  - name: a\n    url: {}\n    heartbeat_interval_secs: 0.5\n\
             vector_indexes:\n  - name: docs\n    source: a\n    table: public.docs\n    column: embedding\n    dimensions: {DIMS}\n    distance: euclidean\n    filters: [lang]\n    batch_wait_ms: 50\n    batch_rows: 200\n\
             ops:\n  listen: \"{ops}\"\napi:\n  listen: \"{api}\"\n  tokens:\n    - {{name: admin, token: {ADMIN_TOKEN}, admin: true}}\n",
            dir.path().join("log").display(),
            source.url("app"),
        ),
    )
    .unwrap();
    let log = dir.path().join("synapse.log");
    let mut child = spawn_run(&config, &log);
    let wait_items = |want: u64, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = get(&api, "/v1/indexes/docs");
            // Loaded (a position) and holding `want` rows.
            if s["items"].as_u64() == Some(want) && !s["cursor"].is_null() {
                return s;
            }
            assert!(Instant::now() < deadline, "index at {s}, want {want} items\n{}", common::log_tail(&log));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let started = Instant::now();
    let loaded = wait_items(ROWS, 600);
    println!("loaded {ROWS} rows in {:.1} s: {loaded}", started.elapsed().as_secs_f64());
    assert_eq!(loaded["dead_letters"], 1, "{loaded}");
    assert_eq!(loaded["dead"][0]["key"], "-1");

    // Writes, each round one transaction of 1,000 changes: new rows, moved vectors, rows
    // changing language, deletes. In round 3 synapse is killed -9 as soon as the index has
    // committed the first of the transaction's batches (200 changes each): the rest are in
    // flight, and must be applied once, after the restart, from the stored cursor.
    for round in 1..=6 {
        let base = 100_000 * round;
        let before = get(&api, "/v1/indexes/docs")["cursor"].clone();
        source
            .psql(
                "app",
                &format!(
                    "INSERT INTO docs SELECT g, 'en', {} FROM generate_series({base}, {base} + 499) g;
                     UPDATE docs SET embedding = {} WHERE id BETWEEN {} AND {};
                     UPDATE docs SET lang = 'fr' WHERE id BETWEEN {} AND {};
                     DELETE FROM docs WHERE id BETWEEN {} AND {}",
                    vector_sql("g", 0),
                    vector_sql("id", round),
                    round * 1000,
                    round * 1000 + 299,
                    round * 1000 + 300,
                    round * 1000 + 399,
                    round * 1000 + 400,
                    round * 1000 + 499,
                ),
            )
            .unwrap();
        if round == 3 {
            let deadline = Instant::now() + Duration::from_secs(60);
            let moved = loop {
                let now = get(&api, "/v1/indexes/docs");
                if now["cursor"] != before && !now["cursor"].is_null() {
                    break now;
                }
                assert!(Instant::now() < deadline, "the index did not move past {before}");
                std::thread::sleep(Duration::from_millis(5));
            };
            drop(child); // SIGKILL
            println!("killed with the index at {} ({} items)", moved["cursor"], moved["items"]);
            child = spawn_run(&config, &log);
            common::wait_ready(&ops, &log, 120);
        }
    }
    let lsn = source.psql("app", "SELECT pg_current_wal_lsn()").unwrap();
    let probe = vector(424_242, 0);
    source.psql("app", &format!("INSERT INTO docs VALUES (424242, 'de', {})", vector_sql("424242", 0))).unwrap();
    let after = source.psql("app", "SELECT pg_current_wal_lsn()").unwrap();
    // Read-your-writes: a search after the write waits until the index holds it.
    let (status, found) = post(
        &api,
        "/v1/indexes/docs/search",
        &json!({"vector": probe, "k": 3, "after_lsn": after, "timeout_secs": 60}),
    );
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["hits"][0]["key"], "424242", "{found}");
    let reflects = format!("SELECT '{}'::pg_lsn >= '{lsn}'::pg_lsn", found["lsn"].as_str().unwrap());
    assert_eq!(source.psql("app", &reflects).unwrap(), "t", "the answer names the position it reflects: {found}");

    // Exactly the source's rows with a usable vector.
    let want: u64 = source
        .psql("app", &format!("SELECT count(*) FROM docs WHERE cardinality(embedding) = {DIMS}"))
        .unwrap()
        .parse()
        .unwrap();
    let status = wait_items(want, 60);
    let rows = source.psql("app", "SELECT string_agg(id || ':' || lang, ',' ORDER BY random()) FROM (SELECT * FROM docs WHERE id > 0 ORDER BY random() LIMIT 150) d").unwrap();
    let mut missed = Vec::new();
    for row in rows.split(',') {
        let (id, lang) = row.split_once(':').unwrap();
        let id: i64 = id.parse().unwrap();
        let generation: i32 = source
            .psql("app", &format!("SELECT CASE WHEN id BETWEEN 1000 AND 6999 AND (id % 1000) < 300 THEN (id / 1000)::int ELSE 0 END FROM docs WHERE id = {id}"))
            .unwrap()
            .parse()
            .unwrap();
        let v = vector(id, generation);
        let (s, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": v, "k": 5}));
        assert_eq!(s, 200, "{r}");
        // An approximate index: a row's own vector finds it first nearly always, not always
        // (an HNSW graph can leave a point unreachable; runs here missed none, an earlier
        // graph library 2 of 300).
        if r["hits"][0]["key"].as_str() != Some(id.to_string().as_str()) {
            missed.push(format!("row {id} (generation {generation}): {r}"));
        }
        let (_, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": v, "k": 5, "filter": {"lang": lang}}));
        if r["hits"][0]["key"].as_str() != Some(id.to_string().as_str()) {
            missed.push(format!("row {id} under its language {lang}: {r}"));
        }
        for h in r["hits"].as_array().unwrap() {
            let key = h["key"].as_str().unwrap();
            assert_eq!(source.psql("app", &format!("SELECT lang FROM docs WHERE id = {key}")).unwrap(), lang);
        }
    }
    println!("{} of 300 searches by a row's own vector missed it", missed.len());
    assert!(
        missed.len() <= 6,
        "of 300 searches by a row's own vector, {} missed it:\n{}",
        missed.len(),
        missed.join("\n")
    );
    // Deleted rows are gone; bad requests are named.
    let (_, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": vector(1450, 0), "k": 1}));
    assert_ne!(r["hits"][0]["key"], "1450", "a deleted row is still found: {r}");
    // The found rows' current values, read from the source.
    let (s, r) =
        post(&api, "/v1/indexes/docs/search", &json!({"vector": vector(1350, 0), "k": 3, "include": ["lang", "id"]}));
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["hits"][0]["key"], "1350", "{r}");
    assert_eq!(r["hits"][0]["row"], json!({"lang": "fr", "id": 1350}), "{r}");
    for h in r["hits"].as_array().unwrap() {
        let lang =
            source.psql("app", &format!("SELECT lang FROM docs WHERE id = {}", h["key"].as_str().unwrap())).unwrap();
        assert_eq!(h["row"]["lang"], lang.as_str(), "{r}");
    }
    let (s, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": probe, "include": ["title"]}));
    assert_eq!(s, 400, "{r}");
    assert!(r.to_string().contains("include") && r.to_string().contains("title"), "{r}");
    let (s, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": [1.0, 2.0], "k": 5}));
    assert_eq!(s, 400);
    assert!(r.to_string().contains("vector"), "{r}");
    let (s, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": probe, "filter": {"owner": "x"}}));
    assert_eq!(s, 400, "{r}");
    println!("index after the writes: {status}");
    // The graph holds every row's current node, and the moves and deletes left waypoints.
    let (items, nodes) = (status["items"].as_u64().unwrap(), status["graph_nodes"].as_u64().unwrap());
    assert!(nodes > items, "graph_nodes {nodes}, items {items}: {status}");
    assert!(status["orphans"].is_u64(), "{status}");
    let metrics = reqwest::blocking::get(format!("http://{ops}/metrics")).unwrap().text().unwrap();
    for m in ["synapse_vector_graph_nodes{", "synapse_vector_orphans{", "synapse_vector_graph_rebuilds_total{"] {
        assert!(metrics.contains(m), "{m} missing from /metrics");
    }
    drop(child);

    // The store's own files, synapse stopped: exactly the source's keys, each with exactly the
    // source's vector.
    let store = synapse_connectors::vector::store::Store::open(
        &dir.path().join("log/indexes/docs"),
        &synapse_connectors::vector::store::StoreSpec::new(DIMS, synapse_connectors::vector::store::Metric::Euclidean),
    )
    .unwrap();
    let rows = source
        .psql(
            "app",
            &format!(
                "SELECT id || ';' || array_to_string(embedding, ',') FROM docs WHERE cardinality(embedding) = {DIMS}"
            ),
        )
        .unwrap();
    let mut want: Vec<String> = Vec::new();
    for line in rows.lines() {
        let (id, v) = line.split_once(';').unwrap();
        let v: Vec<f32> = v.split(',').map(|x| x.parse().unwrap()).collect();
        assert_eq!(store.vector(id).unwrap().as_ref(), Some(&v), "row {id}'s vector in the index");
        want.push(id.to_owned());
    }
    let mut have = store.keys().unwrap();
    have.sort();
    want.sort();
    assert_eq!(have.len(), want.len());
    assert!(have == want, "the index's keys differ from the source's rows");
}
