//! A vector index end to end: a real PostgreSQL table with a `real[]` column, `synapse run`
//! with `vector_indexes:`, the HTTP API. The index loads the table from a snapshot, follows
//! inserts, updates (of the vector and of a filter column) and deletes while synapse is killed
//! -9 and restarted, and ends holding exactly the source's rows with a usable vector — checked
//! by count and by each sampled row's own vector finding it first — with filters respected, a
//! bad row in the dead letters, and a search after a write that waits for it (`after_lsn`).
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

const DIMS: usize = 16;

/// Row `id`'s vector in generation `g` (a distinct direction per id and generation).
fn vector_sql(id: &str, g: i32) -> String {
    format!("ARRAY(SELECT sin(({id}) * k + {g})::real FROM generate_series(1, {DIMS}) k)")
}

fn vector(id: i64, g: i32) -> Vec<f32> {
    (1..=DIMS as i64).map(|k| ((id * k) as f64 + g as f64).sin() as f32).collect()
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
                 INSERT INTO docs SELECT g, CASE WHEN g % 3 = 0 THEN 'de' ELSE 'en' END, {} FROM generate_series(1, 2000) g;
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
             vector_indexes:\n  - name: docs\n    source: a\n    table: public.docs\n    column: embedding\n    dimensions: {DIMS}\n    distance: euclidean\n    filters: [lang]\n    batch_wait_ms: 50\n\
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
    let loaded = wait_items(2000, 120);
    println!("loaded 2,000 rows in {:.1} s: {loaded}", started.elapsed().as_secs_f64());
    assert_eq!(loaded["dead_letters"], 1, "{loaded}");
    assert_eq!(loaded["dead"][0]["key"], "-1");

    // Writes: new rows, moved vectors, rows changing language, deletes; kill -9 midway.
    for round in 1..=6 {
        let base = 10_000 * round;
        source
            .psql(
                "app",
                &format!(
                    "INSERT INTO docs SELECT g, 'en', {} FROM generate_series({base}, {base} + 49) g;
                     UPDATE docs SET embedding = {} WHERE id BETWEEN {} AND {};
                     UPDATE docs SET lang = 'fr' WHERE id BETWEEN {} AND {};
                     DELETE FROM docs WHERE id BETWEEN {} AND {}",
                    vector_sql("g", 0),
                    vector_sql("id", round),
                    round * 100,
                    round * 100 + 29,
                    round * 100 + 30,
                    round * 100 + 39,
                    round * 100 + 40,
                    round * 100 + 49,
                ),
            )
            .unwrap();
        if round == 3 {
            drop(child); // SIGKILL
            child = spawn_run(&config, &log);
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
            .psql("app", &format!("SELECT CASE WHEN id BETWEEN 100 AND 699 AND (id % 100) < 30 THEN (id / 100)::int ELSE 0 END FROM docs WHERE id = {id}"))
            .unwrap()
            .parse()
            .unwrap();
        let v = vector(id, generation);
        let (s, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": v, "k": 5}));
        assert_eq!(s, 200, "{r}");
        // An approximate index: a row's own vector finds it first nearly always, not always
        // (hannoy's graph can leave a point hard to reach: 2 misses in about 3,300 searches here).
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
    assert!(
        missed.len() <= 2,
        "of 300 searches by a row's own vector, {} missed it:\n{}",
        missed.len(),
        missed.join("\n")
    );
    // Deleted rows are gone; bad requests are named.
    let (_, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": vector(140, 1), "k": 1}));
    assert_ne!(r["hits"][0]["key"], "140", "a deleted row is still found: {r}");
    let (s, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": [1.0, 2.0], "k": 5}));
    assert_eq!(s, 400);
    assert!(r.to_string().contains("vector"), "{r}");
    let (s, r) = post(&api, "/v1/indexes/docs/search", &json!({"vector": probe, "filter": {"owner": "x"}}));
    assert_eq!(s, 400, "{r}");
    println!("index after the writes: {status}");
    drop(child);
}
