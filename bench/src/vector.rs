//! Scenario V: the vector index store against faiss's HNSW on the same vectors, in the same run.
//!
//! Vectors: `n` × `dims`, clustered (100 centres, Gaussian spread), and 1,000 queries from the
//! same distribution; the exact top 10 of each query by brute force (the ground truth for both).
//! Ours: the store (`synapse_connectors::vector::store`, usearch HNSW M 16, ef_construction 128,
//! ef_search 100) loaded in batches of 2,000 as the initial load does; faiss: `IndexHNSWFlat`
//! with the same M, efConstruction and efSearch, through Python (`faiss-cpu` from PyPI,
//! installed into `~/.cache/synapse/bench-venv` on first use). Both build on every core and
//! answer the queries one by one on one thread: recall@10, queries/s, p99 latency, and build
//! time. Then the steady update load: 1,000 vector updates/s applied in 200 ms batches for
//! 10 s, each batch's time to commit (the index's share of sync lag; capture and the log add
//! theirs).

use anyhow::Context;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use synapse_connectors::vector::store::{Batch, Metric, Store, StoreSpec, Upsert};
use synapse_schemas::{Cursor, Lsn};

pub struct VectorRun {
    pub n: usize,
    pub dims: usize,
    pub ours_build_secs: f64,
    pub faiss_build_secs: f64,
    pub ours_recall: f64,
    pub faiss_recall: f64,
    pub ours_qps: f64,
    pub faiss_qps: f64,
    pub ours_p99_ms: f64,
    pub faiss_p99_ms: f64,
    /// Per 200-update batch at 1,000 updates/s: p50 and p99 seconds to commit.
    pub batch_p50_secs: f64,
    pub batch_p99_secs: f64,
    /// One batch of each size of random updates: (updates, seconds to commit).
    pub sweep: Vec<(usize, f64)>,
}

const K: usize = 10;
const QUERIES: usize = 1_000;
const CENTRES: usize = 100;

/// A small deterministic generator (xorshift*), so both sides get the same vectors without a
/// shared RNG crate version.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

fn clustered(count: usize, centres: &[Vec<f32>], g: &mut Gen) -> Vec<Vec<f32>> {
    (0..count)
        .map(|_| {
            let c = &centres[(g.next() % centres.len() as u64) as usize];
            c.iter().map(|x| x + 0.1 * g.gauss() as f32).collect()
        })
        .collect()
}

fn exact_top(data: &[Vec<f32>], q: &[f32]) -> Vec<usize> {
    let mut d: Vec<(f32, usize)> =
        data.iter().enumerate().map(|(i, v)| (v.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum(), i)).collect();
    d.select_nth_unstable_by(K, |a, b| a.0.total_cmp(&b.0));
    d.truncate(K);
    d.into_iter().map(|(_, i)| i).collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn write_f32(path: &Path, rows: &[Vec<f32>]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = rows.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// faiss's side, as a Python program over the raw vectors.
const FAISS: &str = r#"
import json, sys, time
import numpy as np, faiss
n, d, q, k = (int(a) for a in sys.argv[1:5])
data = np.fromfile(sys.argv[5], dtype=np.float32).reshape(n, d)
queries = np.fromfile(sys.argv[6], dtype=np.float32).reshape(q, d)
# The build on every core, as the store builds; the queries on one thread, as the store's are timed.
import os
faiss.omp_set_num_threads(os.cpu_count())
index = faiss.IndexHNSWFlat(d, 16)
index.hnsw.efConstruction = 128
t = time.perf_counter(); index.add(data); build = time.perf_counter() - t
faiss.omp_set_num_threads(1)
index.hnsw.efSearch = 100
ids, lat = [], []
for i in range(q):
    t = time.perf_counter(); _, found = index.search(queries[i:i + 1], k); lat.append(time.perf_counter() - t)
    ids.append([int(x) for x in found[0]])
print(json.dumps({"build_secs": build, "latencies": lat, "ids": ids}))
"#;

/// The Python with faiss: a venv under the cache, made (with visible progress) on first use.
fn python() -> anyhow::Result<std::path::PathBuf> {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| "/root".into());
    let venv = home.join(".cache/synapse/bench-venv");
    let py = venv.join("bin/python");
    let ready = Command::new(&py).args(["-c", "import faiss, numpy"]).status().is_ok_and(|s| s.success());
    if !ready {
        eprintln!("V: installing faiss-cpu and numpy into {} (once)", venv.display());
        let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status()?;
        anyhow::ensure!(made.success(), "python3 -m venv {} failed", venv.display());
        let pip = Command::new(venv.join("bin/pip")).args(["install", "faiss-cpu", "numpy"]).status()?;
        anyhow::ensure!(pip.success(), "pip install faiss-cpu numpy failed");
    }
    Ok(py)
}

pub fn run(n: usize, dims: usize, work: &Path) -> anyhow::Result<VectorRun> {
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let centres: Vec<Vec<f32>> =
        (0..CENTRES).map(|_| (0..dims).map(|_| (g.unit() * 2.0 - 1.0) as f32).collect()).collect();
    let data = clustered(n, &centres, &mut g);
    let queries = clustered(QUERIES, &centres, &mut g);
    eprintln!("V: exact top {K} of {QUERIES} queries over {n} × {dims} (brute force)");
    let truth: Vec<Vec<usize>> = queries.iter().map(|q| exact_top(&data, q)).collect();
    let recall = |found: &[Vec<usize>]| {
        let hits: usize = found.iter().zip(&truth).map(|(f, t)| f.iter().filter(|i| t.contains(i)).count()).sum();
        hits as f64 / (QUERIES * K) as f64
    };

    eprintln!("V: loading {n} vectors into the store");
    let spec = StoreSpec { max_bytes: 16 << 30, ..StoreSpec::new(dims, Metric::Euclidean) };
    let store = Store::open(&work.join("index"), &spec)?;
    let started = Instant::now();
    for (b, chunk) in data.chunks(2_000).enumerate() {
        let upserts = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| Upsert { key: (b * 2_000 + i).to_string(), vector: v.clone(), filters: Default::default() })
            .collect();
        store.apply(&Batch { upserts, truncate: b == 0, ..Default::default() })?;
    }
    let at = |lsn: u64| Some(Cursor { commit_lsn: Lsn(lsn), index: 0 });
    store.apply(&Batch { cursor: at(1), ..Default::default() })?;
    let ours_build_secs = started.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(QUERIES);
    let mut found = Vec::with_capacity(QUERIES);
    let all = Instant::now();
    for q in &queries {
        let t = Instant::now();
        let (hits, _) = store.search(q, K, &Default::default())?;
        lat.push(t.elapsed().as_secs_f64());
        found.push(hits.iter().filter_map(|h| h.key.parse().ok()).collect::<Vec<usize>>());
    }
    let ours_qps = QUERIES as f64 / all.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let ours_p99_ms = percentile(&lat, 0.99) * 1e3;
    let ours_recall = recall(&found);

    eprintln!("V: the same with faiss IndexHNSWFlat");
    let (data_path, query_path) = (work.join("data.f32"), work.join("queries.f32"));
    write_f32(&data_path, &data)?;
    write_f32(&query_path, &queries)?;
    let out = Command::new(python()?)
        .args(["-c", FAISS])
        .args([n.to_string(), dims.to_string(), QUERIES.to_string(), K.to_string()])
        .arg(&data_path)
        .arg(&query_path)
        .output()?;
    anyhow::ensure!(out.status.success(), "faiss: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut flat: Vec<f64> = v["latencies"].as_array().into_iter().flatten().filter_map(|x| x.as_f64()).collect();
    let faiss_found: Vec<Vec<usize>> = v["ids"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_array().into_iter().flatten().filter_map(|x| x.as_u64().map(|x| x as usize)).collect())
        .collect();
    let faiss_qps = QUERIES as f64 / flat.iter().sum::<f64>();
    flat.sort_by(f64::total_cmp);

    eprintln!("V: 1,000 updates/s in 200 ms batches for 10 s");
    let mut batch_secs = Vec::new();
    for b in 0..50u64 {
        let tick = Instant::now();
        let upserts = (0..200)
            .map(|_| {
                let i = (g.next() % n as u64) as usize;
                let c = &centres[(g.next() % CENTRES as u64) as usize];
                let vector = c.iter().map(|x| x + 0.1 * g.gauss() as f32).collect();
                Upsert { key: i.to_string(), vector, filters: Default::default() }
            })
            .collect();
        store.apply(&Batch { upserts, cursor: at(2 + b), ..Default::default() })?;
        let took = tick.elapsed();
        batch_secs.push(took.as_secs_f64());
        if let Some(rest) = std::time::Duration::from_millis(200).checked_sub(took) {
            std::thread::sleep(rest);
        }
    }
    batch_secs.sort_by(f64::total_cmp);
    // What a batch costs by its size: a pass over the graph's links, plus a share per update.
    let mut sweep = Vec::new();
    for (i, size) in [250usize, 1_000, 4_000].into_iter().enumerate() {
        let upserts = (0..size)
            .map(|_| {
                let k = (g.next() % n as u64) as usize;
                let c = &centres[(g.next() % CENTRES as u64) as usize];
                Upsert {
                    key: k.to_string(),
                    vector: c.iter().map(|x| x + 0.1 * g.gauss() as f32).collect(),
                    filters: Default::default(),
                }
            })
            .collect();
        let t = Instant::now();
        store.apply(&Batch { upserts, cursor: at(1_000 + i as u64), ..Default::default() })?;
        sweep.push((size, t.elapsed().as_secs_f64()));
    }
    Ok(VectorRun {
        n,
        dims,
        ours_build_secs,
        faiss_build_secs: v["build_secs"].as_f64().unwrap_or(f64::NAN),
        ours_recall,
        faiss_recall: recall(&faiss_found),
        ours_qps,
        faiss_qps,
        ours_p99_ms,
        faiss_p99_ms: percentile(&flat, 0.99) * 1e3,
        batch_p50_secs: percentile(&batch_secs, 0.5),
        batch_p99_secs: percentile(&batch_secs, 0.99),
        sweep,
    })
}

/// Scenario V's sync lag through the whole pipeline (`synapse run`: capture, log, index).
pub struct SyncRun {
    pub rows: usize,
    pub dims: usize,
    /// Seconds from `synapse run` to the index holding every row (snapshot load).
    pub load_secs: f64,
    /// Vector updates committed per second during the measurement (offered: 1,000).
    pub updates_per_sec: f64,
    /// Commit → searchable, seconds: p50, p99, max over the samples.
    pub ours: [f64; 3],
    /// Commit → visible on a PostgreSQL subscriber of the same table: p50, p99, max.
    pub baseline: [f64; 3],
    pub samples: usize,
}

/// Updates per second offered by the writers.
const RATE: u64 = 1_000;
const WRITERS: u64 = 4;

/// A source table of `n` clustered `dims`-component vectors, indexed by `synapse run` and
/// replicated by a PostgreSQL subscription; then 1,000 vector updates/s for `secs`. Every
/// 200 ms a sampler commits one more update (a row of its own, whose `ver` it bumps) and
/// times commit → the index answering a search that waits for that commit's position
/// (`after_lsn`, read-your-writes: the lag a client sees) and, in parallel, commit → the
/// subscriber showing the new `ver` (polled every 2 ms).
pub async fn run_sync(n: usize, dims: usize, secs: u64, work: &Path) -> anyhow::Result<SyncRun> {
    use synapse_localpg::{ClusterOptions, LocalCluster};
    let src = LocalCluster::start(ClusterOptions::default())?;
    let sub = LocalCluster::start(ClusterOptions::default())?;
    for c in [&src, &sub] {
        c.create_database("bench")?;
        c.psql("bench", "CREATE TABLE docs (id int PRIMARY KEY, ver int NOT NULL DEFAULT 0, embedding real[])")?;
    }
    eprintln!("V5: {n} × {dims} clustered vectors into the source table");
    src.psql(
        "bench",
        &format!(
            "INSERT INTO docs (id, embedding) SELECT g, ARRAY(SELECT (sin((g % {CENTRES}) * k) + 0.2 * (random() - 0.5))::real FROM generate_series(1, {dims}) k) FROM generate_series(1, {n}) g;
             CREATE PUBLICATION bench_docs FOR TABLE docs"
        ),
    )?;
    sub.psql(
        "bench",
        &format!("CREATE SUBSCRIPTION bench_docs CONNECTION '{}' PUBLICATION bench_docs", src.url("bench")),
    )?;
    let port = || synapse_localpg::free_port().map(|p| format!("127.0.0.1:{p}"));
    let (api, ops) = (port()?, port()?);
    let token = "bench-admin-token-0123456789abcdef";
    let config = work.join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {}\nsources:\n  - name: a\n    url: {}\n    tables: [public.docs]\n    heartbeat_interval_secs: 0.5\n\
             vector_indexes:\n  - name: docs\n    source: a\n    table: public.docs\n    column: embedding\n    dimensions: {dims}\n    distance: euclidean\n\
             ops:\n  listen: \"{ops}\"\napi:\n  listen: \"{api}\"\n  tokens:\n    - {{name: admin, token: {token}, admin: true}}\n",
            work.join("log").display(),
            src.url("bench"),
        ),
    )?;
    let log = work.join("synapse.log");
    let started = Instant::now();
    let mut child = crate::spawn_synapse(&config, &log)?;
    let http = reqwest::Client::new();
    let status_url = format!("http://{api}/v1/indexes/docs");
    let mut last_print = Instant::now();
    loop {
        let s: serde_json::Value = match http.get(&status_url).bearer_auth(token).send().await {
            Ok(r) => serde_json::from_slice(&r.bytes().await?).unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        if s["items"].as_u64() == Some(n as u64) && !s["cursor"].is_null() {
            break;
        }
        if last_print.elapsed().as_secs() >= 5 {
            eprintln!("V5: index loading: {} of {n} rows read", s["loaded_rows"]);
            last_print = Instant::now();
        }
        anyhow::ensure!(started.elapsed().as_secs() < 1_800, "the index did not load; see {}", log.display());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let load_secs = started.elapsed().as_secs_f64();
    let subscriber = crate::sql(&sub.url("bench")).await?;
    while subscriber.query_one("SELECT count(*) FROM docs", &[]).await?.get::<_, i64>(0) < n as i64 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    eprintln!("V5: {RATE} vector updates/s for {secs} s, commit → searchable sampled every 200 ms");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, stop) = (src.url("bench"), stop.clone());
        writers.push(tokio::spawn(async move {
            let client = crate::sql(&url).await?;
            let update = client.prepare("UPDATE docs SET embedding = $2 WHERE id = $1").await?;
            let mut g = Gen(0xA076_1D64_78BD_642F ^ (w + 1));
            let mut tick = tokio::time::interval(std::time::Duration::from_micros(1_000_000 * WRITERS / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut done = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                // Ids 2.. (1 is the sampler's).
                let id = 2 + (g.next() % (n as u64 - 1)) as i32;
                let centre = (g.next() % CENTRES as u64) as f64;
                let v: Vec<f32> =
                    (1..=dims).map(|k| ((centre * k as f64).sin() + 0.2 * (g.unit() - 0.5)) as f32).collect();
                client.execute(&update, &[&id, &v]).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let source = crate::sql(&src.url("bench")).await?;
    let search_url = format!("http://{api}/v1/indexes/docs/search");
    let (mut ours, mut baseline) = (Vec::new(), Vec::new());
    let run_started = Instant::now();
    let mut g = Gen(0x5851_F42D_4C95_7F2D);
    while run_started.elapsed().as_secs() < secs {
        let v: Vec<f32> = (0..dims).map(|_| (g.unit() * 2.0 - 1.0) as f32).collect();
        let ver: i32 = source
            .query_one("UPDATE docs SET ver = ver + 1, embedding = $1 WHERE id = 1 RETURNING ver", &[&v])
            .await?
            .get(0);
        let committed = Instant::now();
        // Read after the commit (inside the statement it would name a position before it).
        let lsn: String = source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        let body = serde_json::json!({"vector": v, "k": 1, "after_lsn": lsn, "timeout_secs": 60});
        let searched = async {
            let r = http
                .post(&search_url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body)?)
                .send()
                .await?;
            let answer: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
            anyhow::ensure!(
                answer["hits"][0]["key"] == "1",
                "the sampled row's new vector was not found first: {answer}"
            );
            anyhow::Ok(committed.elapsed().as_secs_f64())
        };
        let replicated = async {
            loop {
                let seen: i32 = subscriber.query_one("SELECT ver FROM docs WHERE id = 1", &[]).await?.get(0);
                if seen >= ver {
                    return anyhow::Ok(committed.elapsed().as_secs_f64());
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        };
        let (a, b) = tokio::join!(searched, replicated);
        ours.push(a?);
        baseline.push(b?);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let elapsed = run_started.elapsed().as_secs_f64();
    let mut updates = ours.len() as u64;
    for w in writers {
        updates += w.await??;
    }
    crate::stop(&mut child)?;
    let spread = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        [percentile(&v, 0.5), percentile(&v, 0.99), v[v.len() - 1]]
    };
    let samples = ours.len();
    Ok(SyncRun {
        rows: n,
        dims,
        load_secs,
        updates_per_sec: updates as f64 / elapsed,
        ours: spread(ours),
        baseline: spread(baseline),
        samples,
    })
}
