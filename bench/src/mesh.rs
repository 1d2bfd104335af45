//! P2M of `synapse-bench`: the P2 workload (single-row update transactions) spread over three
//! writable nodes of a mesh, against the one-way pipeline and PostgreSQL's own one-way
//! publication/subscription on the same number of transactions, all measured in this run.
//! P2W, after it: the same transactions written on one node into its mesh table against its
//! plain (one-way source) table, the cost to the application of versioning each local write.
//!
//! Every consumer starts cold after its workload: SynapseDB processes are not running while the
//! transactions are written, the baseline's subscription is disabled. The clock runs from the
//! start (process start / `ENABLE`) until the last node holds every node's marker row. On the
//! mesh every transaction is applied on two other nodes (twice the apply work of one-way), by
//! six appliers and three captures at once, each applied row resolved against the local
//! version (vector, HLC, sidecar row written in the same transaction).

use anyhow::{bail, Context};
use std::path::Path;
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

/// Rows of the updated table (on every node); a multiple of 3, so each node's residue class
/// stays its own.
const ROWS: u64 = 99_999;

const SCHEMA: &str = "CREATE TABLE oltp (id bigint PRIMARY KEY, v bigint NOT NULL, pad text NOT NULL);
CREATE TABLE marker (id int PRIMARY KEY, phase text NOT NULL);";

pub struct MeshBench {
    pub updates: u64,
    pub mesh_secs: f64,
    pub oneway_secs: f64,
    pub native_secs: f64,
    /// P2W: node 0 writing `updates` transactions into its mesh table (each versioned by the
    /// local-write trigger), and into the one-way source's plain table, with no replicator
    /// running; both tables had one workload's updates before.
    pub mesh_write_secs: f64,
    pub plain_write_secs: f64,
}

/// `updates` single-row updates of `oltp`, one transaction each, over the ids with
/// `id % stride = residue` (each mesh node writes its own residue class: no conflicts, so this
/// measures replication, not resolution).
fn workload(updates: u64, stride: u64, residue: u64) -> String {
    format!(
        "DO $$ BEGIN FOR i IN 1..{updates} LOOP
            UPDATE oltp SET v = v + 1 WHERE id = 1 + (({residue} + {stride} * i * 7919) % {ROWS});
            COMMIT;
         END LOOP; END $$"
    )
}

/// Polls `done` every 20 ms; an error names `what` once `timeout` has passed.
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Until each of `nodes` holds at least `markers` end-of-workload markers.
fn wait_markers(nodes: &[(&LocalCluster, &str)], markers: usize, timeout: Duration) -> anyhow::Result<()> {
    let have = |n: &LocalCluster, db: &str| -> usize {
        n.psql(db, "SELECT count(*) FROM marker WHERE id >= 10").ok().and_then(|c| c.trim().parse().ok()).unwrap_or(0)
    };
    wait_until("the markers did not reach every node", timeout, || nodes.iter().all(|(n, db)| have(n, db) >= markers))
}

fn fingerprint(n: &LocalCluster, db: &str) -> anyhow::Result<String> {
    Ok(n.psql(db, "SELECT sum(v) || ':' || md5(string_agg(id || ',' || v, ';' ORDER BY id)) FROM oltp")?)
}

pub fn run(updates: u64, work: &Path) -> anyhow::Result<MeshBench> {
    let opts = ClusterOptions { settings: vec!["max_worker_processes = 16".into()], ..Default::default() };
    let nodes: Vec<LocalCluster> = (0..3).map(|_| LocalCluster::start(opts.clone())).collect::<Result<_, _>>()?;
    let seed = format!("INSERT INTO oltp SELECT g, 0, repeat('o', 80) FROM generate_series(1, {ROWS}) g");
    for n in &nodes {
        for db in ["mesh", "oneway"] {
            n.create_database(db)?;
            n.psql(db, SCHEMA)?;
            n.psql(db, &seed)?;
        }
    }

    // ---- one way: node 0 → node 1 (SynapseDB) and node 0 → node 2 (publication/subscription)
    nodes[0].psql("oneway", "CREATE PUBLICATION pub_pg FOR TABLE oltp, marker")?;
    nodes[2].psql(
        "oneway",
        &format!(
            "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} dbname=oneway user=postgres' PUBLICATION pub_pg WITH (copy_data = false)",
            nodes[0].port()
        ),
    )?;
    let oneway_cfg = work.join("oneway.yaml");
    std::fs::write(
        &oneway_cfg,
        format!(
            "log:\n  dir: {}\nsources:\n  - name: a\n    url: {}\n    tables: [public.oltp, public.marker]\ntargets:\n  - name: b\n    url: {}\n    initial_copy: false\nops:\n  listen: \"\"\napi:\n  listen: \"\"\n",
            work.join("oneway-log").display(),
            nodes[0].url("oneway"),
            nodes[1].url("oneway")
        ),
    )?;
    let log = work.join("synapse-mesh-bench.log");
    // Setup: slots and subscription in place, both consumers stopped before the workload.
    let mut child = crate::spawn_synapse(&oneway_cfg, &log)?;
    let setup = Duration::from_secs(120);
    // Without an initial copy, only what is written after the slot exists travels.
    wait_until(&format!("the one-way capture did not start (see {})", log.display()), setup, || {
        nodes[0]
            .psql("oneway", "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'synapse_a' AND active")
            .unwrap_or_default()
            == "1"
    })?;
    nodes[0].psql("oneway", "INSERT INTO marker VALUES (1, 'setup')")?;
    let ready =
        |n: &LocalCluster, db: &str| n.psql(db, "SELECT count(*) FROM marker WHERE id = 1").unwrap_or_default() == "1";
    wait_until(&format!("one-way setup did not sync (see {})", log.display()), setup, || {
        ready(&nodes[1], "oneway") && ready(&nodes[2], "oneway")
    })?;
    crate::stop(&mut child)?;
    nodes[2].psql("oneway", "ALTER SUBSCRIPTION sub DISABLE")?;
    eprintln!("P2M: writing {updates} single-row update transactions on one node (one-way)");
    nodes[0].psql("oneway", &workload(updates, 1, 0))?;
    nodes[0].psql("oneway", "INSERT INTO marker VALUES (10, 'done')")?;
    let t = Instant::now();
    nodes[2].psql("oneway", "ALTER SUBSCRIPTION sub ENABLE")?;
    wait_markers(&[(&nodes[2], "oneway")], 1, Duration::from_secs(1800)).context("baseline catch-up")?;
    let native_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut child = crate::spawn_synapse(&oneway_cfg, &log)?;
    wait_markers(&[(&nodes[1], "oneway")], 1, Duration::from_secs(1800))
        .with_context(|| format!("one-way catch-up; see {}", log.display()))?;
    let oneway_secs = t.elapsed().as_secs_f64();
    crate::stop(&mut child)?;
    let src = fingerprint(&nodes[0], "oneway")?;
    if fingerprint(&nodes[1], "oneway")? != src || fingerprint(&nodes[2], "oneway")? != src {
        bail!("P2M one-way targets differ from the source");
    }

    // ---- mesh: the same number of transactions, a third written on each node
    let nodes_yaml: String = (0..3)
        .map(|i| {
            format!("    - name: m{i}\n      id: {}\n      url: {}\n      region: r{i}\n", i + 1, nodes[i].url("mesh"))
        })
        .collect();
    let mesh_cfg = work.join("mesh.yaml");
    let listen = format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    std::fs::write(
        &mesh_cfg,
        format!(
            "log:\n  dir: {}\nmesh:\n  nodes:\n{nodes_yaml}  tables: [public.oltp, public.marker]\nops:\n  listen: \"{listen}\"\napi:\n  listen: \"\"\n",
            work.join("mesh-log").display()
        ),
    )?;
    let mut child = crate::spawn_synapse(&mesh_cfg, &log)?;
    let installed = |n: &LocalCluster| {
        n.psql("mesh", "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname = 'synapse_local_write') || '/' || (SELECT count(*) FROM pg_replication_slots WHERE active AND database = 'mesh')")
            .unwrap_or_default()
            == "2/1"
    };
    wait_until(&format!("the mesh did not start (see {})", log.display()), setup, || nodes.iter().all(installed))?;
    crate::stop(&mut child)?;
    eprintln!("P2M: writing {updates} single-row update transactions, a third on each of three mesh nodes");
    let per_node = updates / 3;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let writers: Vec<_> = (0..3u64)
            .map(|i| {
                let n = &nodes[i as usize];
                let extra = if i == 0 { updates - 3 * per_node } else { 0 };
                s.spawn(move || -> anyhow::Result<()> {
                    n.psql("mesh", &workload(per_node + extra, 3, i))?;
                    n.psql("mesh", &format!("INSERT INTO marker VALUES ({}, 'done')", 10 + i))?;
                    Ok(())
                })
            })
            .collect();
        for w in writers {
            w.join().map_err(|_| anyhow::anyhow!("a mesh writer panicked"))??;
        }
        Ok(())
    })?;
    let t = Instant::now();
    let mut child = crate::spawn_synapse(&mesh_cfg, &log)?;
    let all: Vec<(&LocalCluster, &str)> = nodes.iter().map(|n| (n, "mesh")).collect();
    wait_markers(&all, 3, Duration::from_secs(1800))
        .with_context(|| format!("mesh catch-up; see {}", log.display()))?;
    let mesh_secs = t.elapsed().as_secs_f64();
    let stages = crate::scrape(
        &listen,
        &[
            "synapse_apply_log_read_seconds",
            "synapse_apply_statements_seconds",
            "synapse_apply_commit_seconds",
            "synapse_apply_mesh_resolve_seconds",
            "synapse_log_append_seconds",
        ],
    );
    let parts: Vec<String> =
        stages.iter().map(|(k, v)| format!("{}={v:.2}s", k.trim_start_matches("synapse_"))).collect();
    println!(
        "P2M where the mesh's time went (cumulative over 6 appliers and 3 captures) over {mesh_secs:.2}s wall: {}",
        parts.join(" ")
    );
    crate::stop(&mut child)?;
    let f0 = fingerprint(&nodes[0], "mesh")?;
    if fingerprint(&nodes[1], "mesh")? != f0 || fingerprint(&nodes[2], "mesh")? != f0 {
        bail!("P2M mesh nodes differ after catch-up");
    }

    // ---- P2W: what versioning each local write costs the application, on the same node
    eprintln!("P2W: writing {updates} single-row update transactions on node 0, plain table then mesh table");
    let timed = |db: &str| -> anyhow::Result<f64> {
        let t = Instant::now();
        nodes[0].psql(db, &workload(updates, 1, 0))?;
        Ok(t.elapsed().as_secs_f64())
    };
    let plain_write_secs = timed("oneway")?;
    let mesh_write_secs = timed("mesh")?;
    Ok(MeshBench { updates, mesh_secs, oneway_secs, native_secs, mesh_write_secs, plain_write_secs })
}
