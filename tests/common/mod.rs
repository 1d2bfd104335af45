//! Shared helpers of the `synapse` binary's integration tests: real clusters, the real binary.
#![allow(clippy::unwrap_used, dead_code)] // a failed setup step should fail the test loudly

pub mod mesh;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use synapse_localpg::{ClusterOptions, LocalCluster};

pub struct Nodes {
    pub source: LocalCluster,
    pub target: LocalCluster,
    pub dir: tempfile::TempDir,
}

impl Nodes {
    pub fn start(source_sql: &str) -> Nodes {
        Nodes::start_with(source_sql, ClusterOptions::default)
    }

    /// [`Nodes::start`] with clusters made to `options` (TLS, pg_hba.conf…).
    pub fn start_with(source_sql: &str, options: impl Fn() -> ClusterOptions) -> Nodes {
        let source = LocalCluster::start(options()).unwrap();
        let target = LocalCluster::start(options()).unwrap();
        source.create_database("app").unwrap();
        target.create_database("app").unwrap();
        if !source_sql.is_empty() {
            source.psql("app", source_sql).unwrap();
        }
        Nodes { source, target, dir: tempfile::tempdir().unwrap() }
    }

    /// Writes a config replicating source "a" into target "b"; `extra` is appended to source a.
    pub fn config(&self, extra_source_yaml: &str) -> PathBuf {
        self.write_config(extra_source_yaml, "ops:\n  listen: \"\"\napi:\n  listen: \"\"\n")
    }

    pub fn wait_copied(&self, tables: usize, timeout: Duration, log: &Path) {
        let ready = "SELECT count(*) FROM synapse.table_sync WHERE state = 'ready'";
        let deadline = std::time::Instant::now() + timeout;
        while self.target.psql("app", ready).unwrap_or_default() != tables.to_string() {
            assert!(std::time::Instant::now() < deadline, "initial copy never finished:\n{}", log_tail(log));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Nodes::config`] with the log on the Kafka-protocol broker at `brokers`.
    pub fn kafka_config(&self, brokers: &str) -> PathBuf {
        let path = self.config("");
        let yaml = std::fs::read_to_string(&path).unwrap().replacen(
            "log:\n",
            // tansu holds every fetch for fetch.wait.max.ms (see the bench's note).
            &format!("log:\n  kafka:\n    brokers: {brokers}\n    batch_records: false\n    request_timeout_secs: 5\n    properties:\n      fetch.wait.max.ms: 5\n"),
            1,
        );
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

pub fn synapse(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_synapse"));
    c.args(args);
    c
}

/// A `synapse run` process, killed when dropped: a failing test does not leave it running.
pub struct Synapse(Child);

impl Synapse {
    /// Guards a process spawned by the caller: killed when dropped (a failing test leaves no
    /// process behind, which would also hold the test runner's output open).
    pub fn guard(child: Child) -> Synapse {
        Synapse(child)
    }
}

impl std::ops::Deref for Synapse {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Synapse {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `synapse validate` on `path` with `env` set (its `${VAR}`s): the output, on success.
pub fn validate_config(path: &Path, env: &[(&str, &str)]) -> String {
    let mut c = synapse(&["validate", "--config", path.to_str().unwrap()]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {text}", path.display());
    text
}

/// Starts `synapse run`, its output going to `log` (appended).
pub fn spawn_run(config: &Path, log: &Path) -> Synapse {
    spawn_run_logging(config, log, None)
}

/// [`spawn_run`] with the log filter `filter` (`SYNAPSE_LOG`) when given.
pub fn spawn_run_logging(config: &Path, log: &Path, filter: Option<&str>) -> Synapse {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut run = synapse(&["run", "--config", config.to_str().unwrap()]);
    if let Some(f) = filter {
        run.env("SYNAPSE_LOG", f);
    }
    Synapse(run.stdout(Stdio::null()).stderr(out).spawn().unwrap())
}

/// Polls until `query` gives the same answer on both clusters.
pub fn wait_equal(source: &LocalCluster, target: &LocalCluster, query: &str, timeout: Duration) {
    synapse_localpg::wait_until_equal(source, target, "app", query, timeout).unwrap();
}

/// Rows plus a counter bumped once per workload transaction: a transaction applied twice or
/// lost shows in the counter.
pub const ITEMS_SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
     CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO counters VALUES (1, 0);";

/// After a restart test: the target equals the source with the counter at `txns`, synapse kept
/// running through the outages, and its log shows it retried. Returns the log text.
pub fn assert_survived(nodes: &Nodes, child: &mut Child, log: &Path, txns: u64) -> String {
    let q = "SELECT count(*) || ':' || sum(v) || ':' || (SELECT n FROM counters) FROM items";
    wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(120));
    assert_eq!(nodes.target.psql("app", "SELECT n FROM counters").unwrap(), txns.to_string());
    assert!(child.try_wait().unwrap().is_none(), "synapse exited on a transient failure");
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("transient error, retrying"), "the restarts were not noticed:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
    text
}

/// `POST path` with a JSON body to an HTTP server: status and body.
pub fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    request(addr, "POST", path, body, None)
}

/// Waits (up to `secs`) until the synapse whose ops listener is `ops` answers /readyz with 200;
/// fails with the tail of its `log`.
pub fn wait_ready(ops: &str, log: &Path, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !reqwest::blocking::get(format!("http://{ops}/readyz?strict")).is_ok_and(|r| r.status() == 200) {
        assert!(std::time::Instant::now() < deadline, "never ready:\n{}", log_tail(log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The admin token the tests' configurations carry (scope `admin`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// An HTTP/1.0 request with a JSON body, as `token` (a bearer token) if given: (status, body).
pub fn request(addr: &str, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

/// The ledger workload's tables, the ledger filled with `rows` rows (the initial copy's input).
pub fn ledger_schema(rows: u64) -> String {
    format!(
        "CREATE TABLE ledger (id bigint PRIMARY KEY, txn_no bigint NOT NULL, payload text NOT NULL);
         CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL);
         INSERT INTO counters VALUES (1, 0);
         INSERT INTO ledger SELECT g, 0, repeat('x', 100) FROM generate_series(1, {rows}) g;"
    )
}

/// Each transaction inserts rows tagged with its number and bumps the counter once; every 25th
/// is large (`big_rows` rows) so kills also land inside a transaction being written or applied.
pub fn ledger_workload(
    url: String,
    big_rows: i64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    paced_ledger_workload(url, big_rows, Duration::from_millis(3), stop, done)
}

/// [`ledger_workload`] with `pause` between transactions.
pub fn paced_ledger_workload(
    url: String,
    big_rows: i64,
    pause: Duration,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut next_id = 1_000_000i64;
            let mut txn = 1i64;
            while !stop.load(Ordering::Relaxed) {
                let rows = if txn % 25 == 0 { big_rows } else { 3 };
                client
                    .batch_execute(&format!(
                        "BEGIN;
                         INSERT INTO ledger SELECT g, {txn}, md5(g::text) FROM generate_series({next_id}, {}) g;
                         UPDATE counters SET n = n + 1 WHERE id = 1;
                         UPDATE ledger SET payload = 'touched by {txn}' WHERE id = {};
                         DELETE FROM ledger WHERE id = {};
                         COMMIT;",
                        next_id + rows - 1,
                        1 + txn % 20000,
                        next_id,
                    ))
                    .await
                    .unwrap();
                next_id += rows;
                txn += 1;
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
            }
        });
    })
}

/// SIGTERM (a clean shutdown), then waits up to 30 s for the exit.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "synapse did not exit within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A blocking PostgreSQL client for a test's writer thread (a current-thread runtime of its own).
pub struct SyncClient {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl SyncClient {
    pub fn connect(url: &str) -> SyncClient {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            c
        });
        SyncClient { rt, client }
    }

    pub fn batch_execute(&mut self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.rt.block_on(self.client.batch_execute(sql))
    }

    pub fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        self.rt.block_on(self.client.execute(sql, params))
    }
}

/// The last 60 lines of a synapse log file, newest first, for failure messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(60).collect();
    format!("last lines of {} (newest first):\n{}", log.display(), lines.join("\n"))
}

/// A TCP proxy whose connections can be frozen: they stop forwarding without being closed
/// (what a firewall or NAT that dropped its entry does: a half-open connection). Connections
/// made after a freeze forward normally.
pub struct FreezingProxy {
    pub port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FreezingProxy {
    pub fn start(to_port: u16) -> FreezingProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gen = generation.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to_port)) else { continue };
                let born = gen.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    let gen = gen.clone();
                    from.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            if gen.load(Ordering::SeqCst) != born {
                                // Frozen: hold both sockets open, forward nothing, forever.
                                let _keep = (from, to);
                                loop {
                                    std::thread::sleep(Duration::from_secs(3600));
                                }
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        FreezingProxy { port, generation }
    }

    /// Freezes every connection open now.
    pub fn freeze_existing(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where a test's `synapse run` listens: its ops and API addresses on loopback.
pub struct Listeners {
    pub ops: String,
    pub api: String,
}

impl Listeners {
    pub fn new() -> Listeners {
        let at = || format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
        Listeners { ops: at(), api: at() }
    }

    /// The `egress` (loopback allowed, for local webhook receivers), `ops` and `api` sections:
    /// the admin token, then `extra_tokens` (YAML list items).
    pub fn yaml(&self, extra_tokens: &str) -> String {
        format!(
            "egress:\n  allow: [127.0.0.1]\nops:\n  listen: \"{}\"\napi:\n  listen: \"{}\"\n  tokens:\n    - {{name: admin, token: {ADMIN_TOKEN}, admin: true}}\n{extra_tokens}",
            self.ops, self.api
        )
    }
}

/// Two writable regions, `us` and `eu`, over `nodes`' databases `app` replicating `tables`,
/// with `listeners`: the configuration written under `dir`.
pub fn two_regions_config(nodes: &[LocalCluster], tables: &str, dir: &Path, listeners: &str) -> PathBuf {
    let nodes_yaml: String = ["us", "eu"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!("    - {{name: {name}, id: {}, url: \"{}\", region: {name}}}\n", i + 1, nodes[i].url("app"))
        })
        .collect();
    let path = dir.join("synapse.yaml");
    let yaml = format!(
        "log:\n  dir: {}\nmesh:\n  nodes:\n{nodes_yaml}  tables: [{tables}]\n{listeners}",
        dir.join("log").display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

impl Nodes {
    /// Source `a` into target `b` with `tail` (whole top-level sections) after them.
    pub fn config_with(&self, tail: &str) -> PathBuf {
        self.write_config("", tail)
    }

    /// Source `a` (its settings plus `extra_source_yaml`) into target `b`, then `tail`.
    fn write_config(&self, extra_source_yaml: &str, tail: &str) -> PathBuf {
        let path = self.dir.path().join("synapse.yaml");
        let yaml = format!(
            "log:\n  dir: {}\nsources:\n  - name: a\n    url: {}\n    heartbeat_interval_secs: 0.5\n{extra_source_yaml}targets:\n  - name: b\n    url: {}\n{tail}",
            self.dir.path().join("log").display(),
            self.source.url("app"),
            self.target.url("app"),
        );
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

/// A conflict in two regions: each renames account 1 (`alice (us)`, `alice (eu)`) with both
/// transactions open at once, so each applier waits on the other's row lock, then meets a
/// concurrent version.
pub fn concurrent_renames(us: &LocalCluster, eu: &LocalCluster) {
    let mut a = SyncClient::connect(&us.url("app"));
    let mut b = SyncClient::connect(&eu.url("app"));
    a.batch_execute("BEGIN; UPDATE accounts SET owner = 'alice (us)' WHERE id = 1").unwrap();
    b.batch_execute("BEGIN; UPDATE accounts SET owner = 'alice (eu)' WHERE id = 1").unwrap();
    a.batch_execute("COMMIT").unwrap();
    b.batch_execute("COMMIT").unwrap();
}
