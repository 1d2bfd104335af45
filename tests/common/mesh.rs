//! A three-node mesh run by the real `synapse` binary, killed -9 and restarted by the test.
#![allow(clippy::unwrap_used)]

use super::spawn_run;
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

/// The synapse process, stopped however the seed ends.
/// A running synapse, killed when dropped.
pub type Running = super::Synapse;

pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Three nodes, one database `app` with `schema` on each, and a synapse meshing them that the
/// test starts and kills -9 to make writes concurrent.
pub struct KilledMesh {
    pub nodes: Vec<LocalCluster>,
    pub config: std::path::PathBuf,
    pub log: std::path::PathBuf,
    /// The ops address (metrics, health) of the synapse the test starts.
    pub ops: String,
    /// Its API address (the admin routes, with [`super::ADMIN_TOKEN`]).
    pub api: String,
    _dir: tempfile::TempDir,
}

impl KilledMesh {
    /// `mesh_yaml`: the lines under `mesh:` after the nodes (tables, strategies…).
    pub fn new(schema: &str, mesh_yaml: &str) -> KilledMesh {
        KilledMesh::new_with(schema, mesh_yaml, ClusterOptions::default, |n| n.url("app"))
    }

    /// [`KilledMesh::new`] with clusters made to `options`, reached at `url`.
    pub fn new_with(
        schema: &str,
        mesh_yaml: &str,
        options: impl Fn() -> ClusterOptions,
        url: impl Fn(&LocalCluster) -> String,
    ) -> KilledMesh {
        let nodes: Vec<LocalCluster> = (0..3).map(|_| LocalCluster::start(options()).unwrap()).collect();
        let dir = tempfile::tempdir().unwrap();
        for n in &nodes {
            n.create_database("app").unwrap();
            n.psql("app", schema).unwrap();
        }
        let nodes_yaml: String = (0..3)
            .map(|i| {
                format!("    - name: u{i}\n      id: {}\n      url: {}\n      region: r{i}\n", i + 1, url(&nodes[i]))
            })
            .collect();
        let config = dir.path().join("mesh.yaml");
        // A port free now (the listener is dropped); the same one on every restart.
        let ops = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
        let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
        std::fs::write(
            &config,
            format!(
                "log:\n  dir: {}\nmesh:\n  nodes:\n{nodes_yaml}{mesh_yaml}  tombstone_purge_interval_secs: 0\nops:\n  listen: \"{ops}\"\napi:\n  listen: \"{api}\"\n  tokens:\n    - {{name: admin, token: {}, admin: true}}\n",
                dir.path().join("log").display(),
                super::ADMIN_TOKEN,
            ),
        )
        .unwrap();
        let log = dir.path().join("synapse.log");
        KilledMesh { nodes, config, log, ops, api, _dir: dir }
    }

    pub fn logtext(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sql(&self, i: usize, sql: &str) -> String {
        self.nodes[i].psql("app", sql).unwrap()
    }

    /// Starts synapse and waits until it has installed the mesh (triggers, active slots).
    pub fn start(&self, tables: usize) -> Running {
        let child = spawn_run(&self.config, &self.log);
        let deadline = Instant::now() + Duration::from_secs(60);
        let want = format!("{tables}/1");
        let ready = |n: &LocalCluster| {
            n.psql("app", "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname = 'synapse_local_write') || '/' || (SELECT count(*) FROM pg_replication_slots WHERE active)")
                .unwrap_or_default()
                == want
        };
        while !self.nodes.iter().all(ready) {
            assert!(Instant::now() < deadline, "the mesh did not start:\n{}", self.logtext());
            std::thread::sleep(Duration::from_millis(100));
        }
        child
    }

    /// Kills synapse with -9 (nothing flushed, nothing acknowledged beyond what it committed).
    pub fn kill(&self, mut child: Running) {
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts synapse again over the same log and nodes.
    pub fn restart(&self) -> Running {
        spawn_run(&self.config, &self.log)
    }

    /// Waits until `query` gives `want` on every node.
    pub fn wait_all(&self, what: &str, query: &str, want: &str) {
        self.wait_all_of(&[0, 1, 2], what, query, want);
    }

    /// Waits until `query` gives `want` on each of `nodes`.
    pub fn wait_all_of(&self, nodes: &[usize], what: &str, query: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while nodes.iter().any(|&i| self.sql(i, query) != want) {
            assert!(
                Instant::now() < deadline,
                "{what}: nodes hold {:?}, want {want:?}\n{}",
                nodes.iter().map(|&i| self.sql(i, query)).collect::<Vec<_>>(),
                tail(&self.logtext())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `query` gives one answer on every node; returns it.
    pub fn wait_same(&self, what: &str, query: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got: Vec<String> = (0..3).map(|i| self.sql(i, query)).collect();
            if got[0] == got[1] && got[1] == got[2] {
                return got[0].clone();
            }
            assert!(Instant::now() < deadline, "{what} differ: {got:?}\n{}", tail(&self.logtext()));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every node's `synapse.conflicts` rows matching `filter`, as `query` renders them.
    pub fn conflicts(&self, render: &str, filter: &str) -> String {
        (0..3)
            .map(|i| {
                self.sql(
                    i,
                    &format!("SELECT coalesce(string_agg({render}, ' ' ORDER BY id), '') FROM synapse.conflicts WHERE {filter}"),
                )
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }
}
