//! A three-node mesh run by the real `synapse` binary, killed -9 and restarted by the test.
#![allow(clippy::unwrap_used)]

use super::spawn_run;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
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

// The workload of the mesh tests: concurrent writers of every column strategy, and what they
// committed, for the checks.

pub const SCHEMA: &str = "CREATE TABLE accounts (
    id int PRIMARY KEY, owner text, note text, hits bigint NOT NULL DEFAULT 0, best int, tags text[], title text);
    CREATE TABLE members (id int PRIMARY KEY, email text NOT NULL UNIQUE, name text)";
/// Ids and e-mails of `members`, whose e-mail is unique: few values over many rows.
pub const MEMBERS: i32 = 40;
pub const EMAILS: i32 = 12;
/// Members the writers add to and remove from `tags`.
pub const TAGS: [&str; 5] = ["red", "green", "blue", "cyan", "gold"];
/// Keys 1..=COUNTED hold counters and are never deleted; keys above are inserted and deleted.
pub const COUNTED: i32 = 20;
/// Keys 1..=DISPUTED are written only by nodes 0 and 2 during the partition and by nobody after.
pub const DISPUTED: i32 = 8;
pub const SHARED_MAX: i32 = 60;

/// What the writers did that the checks need.
#[derive(Default)]
pub struct Record {
    /// Per key, the sum of committed increments.
    pub increments: BTreeMap<i32, i64>,
    /// Per (node, key), the last owner written during the partition.
    pub disputed: BTreeMap<(usize, i32), String>,
    /// Per key, every tag some node added and every title some node wrote.
    pub tags_added: BTreeMap<i32, BTreeSet<String>>,
    pub titles: BTreeMap<i32, BTreeSet<String>>,
    pub committed: u64,
    pub failed: u64,
}

pub async fn writer(url: String, node: usize, seed: u64, phase: u8, until: Instant, record: Arc<Mutex<Record>>) {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let mut rng = StdRng::seed_from_u64(seed * 1000 + node as u64 * 10 + phase as u64);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let op = rng.gen_range(0..115);
        let result: Result<(), String> = if op < 35 {
            let k = rng.gen_range(1..=COUNTED);
            let d: i64 = rng.gen_range(-5..=10);
            match client.execute("UPDATE accounts SET hits = hits + $1 WHERE id = $2", &[&d, &k]).await {
                Ok(1) => {
                    *record.lock().unwrap().increments.entry(k).or_default() += d;
                    Ok(())
                }
                Ok(r) => Err(format!("increment of {k} touched {r} rows")),
                Err(e) => Err(describe(e)),
            }
        } else if op < 55 {
            // Owners of counted keys: during the partition the disputed keys belong to nodes 0
            // and 2 only; afterwards nobody touches them, so their last writes stay concurrent.
            let k = match phase {
                2 if node != 1 => rng.gen_range(1..=DISPUTED),
                _ => rng.gen_range(DISPUTED + 1..=COUNTED),
            };
            let owner = format!("n{node}-p{phase}-{n}");
            match client.execute("UPDATE accounts SET owner = $1 WHERE id = $2", &[&owner, &k]).await {
                Ok(_) => {
                    if phase == 2 && k <= DISPUTED {
                        record.lock().unwrap().disputed.insert((node, k), owner);
                    }
                    Ok(())
                }
                Err(e) => Err(describe(e)),
            }
        } else if op < 62 {
            let k = rng.gen_range(1..=COUNTED);
            let v: i32 = rng.gen_range(0..1000);
            client.execute("UPDATE accounts SET best = $1 WHERE id = $2", &[&v, &k]).await.map(|_| ()).map_err(describe)
        } else if op < 70 {
            // Set column: add or remove one member (a removal only removes what this node saw).
            let k = rng.gen_range(1..=SHARED_MAX);
            let tag = TAGS[rng.gen_range(0..TAGS.len())];
            let sql = if rng.gen_bool(0.6) {
                "UPDATE accounts SET tags = tags || $1::text WHERE id = $2"
            } else {
                "UPDATE accounts SET tags = array_remove(tags, $1::text) WHERE id = $2"
            };
            let added = sql.contains("||");
            match client.execute(sql, &[&tag, &k]).await {
                Ok(n) => {
                    if added && n == 1 {
                        record.lock().unwrap().tags_added.entry(k).or_default().insert(tag.to_owned());
                    }
                    Ok(())
                }
                Err(e) => Err(describe(e)),
            }
        } else if op < 75 {
            // Multi-value column: concurrent titles stay as siblings until a later write.
            let k = rng.gen_range(1..=COUNTED);
            let title = format!("t{node}-{n}");
            match client.execute("UPDATE accounts SET title = $1 WHERE id = $2", &[&title, &k]).await {
                Ok(_) => {
                    record.lock().unwrap().titles.entry(k).or_default().insert(title);
                    Ok(())
                }
                Err(e) => Err(describe(e)),
            }
        } else if op < 88 {
            let k = rng.gen_range(COUNTED + 1..=SHARED_MAX);
            let note = format!("n{node}-{n}");
            client
                .execute(
                    "INSERT INTO accounts (id, owner, note) VALUES ($1, $2, $2) ON CONFLICT (id) DO UPDATE SET note = excluded.note",
                    &[&k, &note],
                )
                .await
                .map(|_| ())
                .map_err(describe)
        } else if op < 100 {
            let k = rng.gen_range(COUNTED + 1..=SHARED_MAX);
            client.execute("DELETE FROM accounts WHERE id = $1", &[&k]).await.map(|_| ()).map_err(describe)
        } else {
            // A secondary unique key under churn: few e-mails over many ids, inserted, moved and
            // deleted on every node, so regions keep claiming values others hold or just freed.
            let k = rng.gen_range(1..=MEMBERS);
            let email = format!("m{}@example.com", rng.gen_range(0..EMAILS));
            let (sql, params): (&str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) = match rng.gen_range(0..3) {
                0 => (
                    "INSERT INTO members VALUES ($1, $2, $2) ON CONFLICT (id) DO UPDATE SET email = excluded.email",
                    vec![&k, &email],
                ),
                1 => ("UPDATE members SET email = $2 WHERE id = $1", vec![&k, &email]),
                _ => ("DELETE FROM members WHERE id = $1", vec![&k]),
            };
            match client.execute(sql, &params).await {
                // The e-mail is taken on this node: the application sees its write refused.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => Ok(()),
                r => r.map(|_| ()).map_err(describe),
            }
        };
        {
            let mut r = record.lock().unwrap();
            match result {
                Ok(()) => r.committed += 1,
                // Deadlocks with the applier (both lock the row and its version) roll back the
                // application's statement: it did not happen, exactly as the application sees it.
                Err(e) if e.contains("deadlock") || e.contains("could not serialize") => r.failed += 1,
                Err(e) => panic!("node {node} write failed: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1..6))).await;
    }
}

pub fn describe(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {} ({:?})", d.code().code(), d.message(), d.where_()),
        None => e.to_string(),
    }
}

pub fn fingerprint(node: &LocalCluster, db: &str) -> String {
    node.psql(
        db,
        "SELECT (SELECT count(*) || ':' || md5(coalesce(string_agg(a::text, ';' ORDER BY id), '')) FROM accounts a)
             || ' ' || (SELECT count(*) || ':' || md5(coalesce(string_agg(m::text, ';' ORDER BY id), '')) FROM members m)",
    )
    .unwrap_or_else(|e| format!("error: {e}"))
}

/// A `synapse.row_version` row as text, for dumps and comparisons.
pub const VERSION_ROW: &str =
    "tbl || pk::text || ' ' || vv::text || ' ' || hlc_ms || '.' || hlc_lc || ' n' || node || ' ' || cols::text";

/// The filter that makes `synapse` log what [`applied_versions_agree`] reads.
pub const APPLY_TRACE: &str = "info,synapse_apply=trace";

/// Every target applying one source's log committed the same history of each of its rows: for
/// every (source, table, key), the join of the versions each target resolved — in groups known
/// committed — is the same on all of them. Outcome checks cannot see a lost change that a later
/// write or a merge masks; this can. A group counts as committed once a later "group committed"
/// of the same session reaches its next offset, or the pair's next session resumes at or past
/// it; a group rolled back is left out (its changes are resolved again by the next session).
/// `log` is a synapse log written with [`APPLY_TRACE`].
pub fn applied_versions_agree(log: &str) -> Result<usize, String> {
    use regex_lite::Regex;
    let span = Regex::new(r"apply\{node=(\S+) consumer=apply-(\S+)\}: ").unwrap();
    let resolved =
        Regex::new(r"mesh row resolved table=(\S+) key=(\[[^\]]*\]) .* remote=\(VersionVector\(\{([^}]*)\}\)").unwrap();
    let offset = Regex::new(r"next_offset=(\d+)").unwrap();
    let entry = Regex::new(r"NodeId\((\d+)\): (\d+)").unwrap();
    type Join = BTreeMap<u64, u64>;
    // (source, table, key) → target → join of its committed versions.
    type Joins = BTreeMap<(String, String, String), BTreeMap<String, Join>>;
    // Next offset of a group → the (table, key, version) it resolved.
    type Groups = BTreeMap<u64, Vec<(String, String, Join)>>;
    let mut joins = Joins::new();
    let mut targets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // (source, target) → the group being resolved and the groups not known committed yet.
    let mut pending: BTreeMap<(String, String), (Option<u64>, Groups)> = BTreeMap::new();
    let settle = |joins: &mut Joins, pair: &(String, String), groups: &mut Groups, through: u64| {
        let later = groups.split_off(&(through.saturating_add(1)));
        for (table, key, vv) in std::mem::replace(groups, later).into_values().flatten() {
            let join = joins.entry((pair.0.clone(), table, key)).or_default().entry(pair.1.clone()).or_default();
            for (n, c) in vv {
                let e = join.entry(n).or_default();
                *e = (*e).max(c);
            }
        }
    };
    let next = |line: &str| offset.captures(line).and_then(|c| c[1].parse::<u64>().ok());
    for line in log.lines() {
        let Some(s) = span.captures(line) else { continue };
        let pair = (s[1].to_owned(), s[2].to_owned());
        targets.entry(pair.0.clone()).or_default().insert(pair.1.clone());
        let (group, groups) = pending.entry(pair.clone()).or_default();
        if line.contains("applier resuming") {
            if let Some(at) = next(line) {
                settle(&mut joins, &pair, groups, at);
            }
            groups.clear();
            *group = None;
        } else if line.contains("group resolving") {
            *group = next(line);
            if let Some(g) = *group {
                groups.entry(g).or_default();
            }
        } else if line.contains("group committed") {
            if let Some(at) = next(line) {
                settle(&mut joins, &pair, groups, at);
            }
        } else if let (Some(r), Some(g)) = (resolved.captures(line), *group) {
            let vv: Join = entry.captures_iter(&r[3]).map(|c| (c[1].parse().unwrap(), c[2].parse().unwrap())).collect();
            groups.entry(g).or_default().push((r[1].to_owned(), r[2].to_owned(), vv));
        }
    }
    // The process was stopped once every node had converged: what was still open committed.
    for (pair, (_, groups)) in &mut pending {
        settle(&mut joins, pair, groups, u64::MAX);
    }
    let mut differ = Vec::new();
    for ((source, table, key), per) in &joins {
        let all = &targets[source];
        let first = per.get(all.iter().next().unwrap());
        if all.iter().any(|t| per.get(t) != first) {
            let each: Vec<String> = all.iter().map(|t| format!("{t}: {:?}", per.get(t))).collect();
            differ.push(format!("{table}{key} from {source}: {}", each.join("; ")));
        }
    }
    if joins.is_empty() {
        // A renamed trace line would leave nothing to compare and the check passing unseen.
        Err("the log holds no committed \"mesh row resolved\" line: did the apply trace change?".to_owned())
    } else if differ.is_empty() {
        Ok(joins.len())
    } else {
        Err(format!("targets of one source committed different histories of a row:\n{}", differ.join("\n")))
    }
}
