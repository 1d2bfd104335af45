//! Throwaway (or persistent) local PostgreSQL clusters started from the installed server
//! binaries: `synapse quickstart` runs its two demo nodes on them, and every integration test and
//! benchmark gets real clusters from here.
//!
//! ```text
//!  LocalCluster::start ─▶ initdb (as `postgres` when we are root) ─▶ pg_ctl start ─▶ url()
//!  drop ─▶ pg_ctl stop -m immediate ─▶ data dir removed (unless persistent)
//! ```
//!
//! PostgreSQL refuses to run as root, so when the current user is root every server command runs
//! through `runuser -u postgres` and the data directory is handed to that user.
//!
//! [`LocalBroker`] does the same for a Kafka-protocol broker, for the Kafka log's tests.

mod broker;
pub mod certs;

pub use broker::LocalBroker;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error("PostgreSQL server binaries not found ({0}); install postgresql (Debian: apt-get install postgresql) or set SYNAPSE_PG_BINDIR")]
    NoBinaries(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("i/o error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, LocalPgError>;

#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Keep the cluster here across runs; `None` = a temporary directory removed on drop.
    pub data_dir: Option<PathBuf>,
    /// `fsync=off` is safe for tests that never crash the machine, and much faster.
    pub fsync: bool,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<String>,
    /// The server's certificate and key: TLS on.
    pub tls: Option<certs::Issued>,
    /// `pg_hba.conf` in place of initdb's (which trusts every local connection).
    pub hba: Option<String>,
}

/// A running local PostgreSQL cluster listening on 127.0.0.1.
pub struct LocalCluster {
    root: PathBuf,
    _temp: Option<tempfile::TempDir>,
    port: u16,
    bindir: PathBuf,
    as_postgres: bool,
}

/// The folder of the installed server binaries: `$SYNAPSE_PG_BINDIR`, `pg_config --bindir`, or
/// the newest `/usr/lib/postgresql/*/bin`.
pub fn server_bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("SYNAPSE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .ok_or_else(|| LocalPgError::NoBinaries("no initdb under pg_config --bindir or /usr/lib/postgresql".into()))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false)
}

/// Ports [`free_port`] hands out: below the kernel's ephemeral range (32768–60999 by default),
/// so neither a listener bound to port 0 nor an outgoing connection takes one between our check
/// and its owner's bind.
const PORTS: std::ops::Range<u16> = 20000..32000;

/// A loopback port free now and reserved for this process until it exits. Checking that a port
/// binds is not enough: the next caller — a test binary running beside this one, a cluster, a
/// synapse listener — may be handed the same just-released port before its first owner binds
/// it again (two listeners then answer for one test). So each port handed out is held by an
/// exclusive lock on `$TMPDIR/synapse-ports/<port>` for the process's lifetime (the kernel
/// drops the lock when the process dies), and the ports lie outside the ephemeral range.
pub fn free_port() -> Result<u16> {
    static HELD: std::sync::Mutex<Vec<(u16, std::fs::File)>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("synapse-ports");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let span = u64::from(PORTS.end - PORTS.start);
    // Start somewhere different in each process, so concurrent callers rarely contend.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let first = (u64::from(std::process::id()) * 7919 + u64::from(nanos)) % span;
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    for i in 0..span {
        let port = PORTS.start + ((first + i) % span) as u16;
        if held.iter().any(|(p, _)| *p == port) {
            continue;
        }
        let path = dir.join(port.to_string());
        let file = std::fs::File::options().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue; // another process holds it
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue; // in use by something that does not take part in the locking
        }
        held.push((port, file));
        return Ok(port);
    }
    Err(LocalPgError::Io {
        path: dir.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "every port of 20000–31999 is taken"),
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocalPgError + '_ {
    move |source| LocalPgError::Io { path: path.display().to_string(), source }
}

impl LocalCluster {
    /// initdb (unless the persistent data dir already holds a cluster), configure for logical
    /// replication on a free loopback port, and start.
    pub fn start(options: ClusterOptions) -> Result<Self> {
        let bindir = server_bindir()?;
        let as_postgres = is_root();
        let (root, temp) = match &options.data_dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(io(d))?;
                (d.canonicalize().map_err(io(d))?, None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("synapse-pg-").tempdir().map_err(io(Path::new("/tmp")))?;
                (t.path().to_owned(), Some(t))
            }
        };
        let mut c = LocalCluster { root, _temp: temp, port: 0, bindir, as_postgres };
        if c.as_postgres {
            c.run("chown", &["-R", "postgres:postgres", &c.root.display().to_string()], false)?;
        }
        let data = c.data_dir();
        if !data.join("PG_VERSION").exists() {
            let initdb = c.bindir.join("initdb").display().to_string();
            c.run(
                &initdb,
                &[
                    "-D",
                    &data.display().to_string(),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--locale=C",
                ],
                true,
            )?;
        }
        let main_conf = data.join("postgresql.conf");
        let existing = std::fs::read_to_string(&main_conf).map_err(io(&main_conf))?;
        if !existing.contains("include_if_exists = '../synapse.conf'") {
            std::fs::write(&main_conf, existing + "\ninclude_if_exists = '../synapse.conf'\n")
                .map_err(io(&main_conf))?;
        }
        let persisted = std::fs::read_to_string(c.root.join("port")).ok().and_then(|p| p.trim().parse().ok());
        // The free port is only reserved until we let go of it: another cluster started at the same
        // moment may take it first, so a bind failure retries on a new port.
        for attempt in 0..3 {
            c.port = match persisted {
                Some(p) if options.data_dir.is_some() && attempt == 0 => p,
                _ => free_port()?,
            };
            c.write_settings(&options)?;
            match c.pg_ctl(&["start", "-w", "-t", "120", "-l", &c.root.join("server.log").display().to_string()]) {
                Ok(_) => return Ok(c),
                Err(e) if attempt < 2 && e.to_string().contains("could not bind") => {
                    tracing::debug!(port = c.port, "port taken meanwhile, retrying on another");
                }
                Err(e) => return Err(e),
            }
        }
        Err(LocalPgError::Command { command: "pg_ctl start".into(), stderr: "no free port after 3 attempts".into() })
    }

    /// A streaming standby of `primary` (pg_basebackup, `-R`), started on a port of its own.
    /// Logical slots are not copied to it (PostgreSQL 15): after [`LocalCluster::promote`] it
    /// is what a failover leaves a replication tool with.
    pub fn start_standby(primary: &LocalCluster) -> Result<Self> {
        let t = tempfile::Builder::new().prefix("synapse-pg-standby-").tempdir().map_err(io(Path::new("/tmp")))?;
        let mut c = LocalCluster {
            root: t.path().to_owned(),
            _temp: Some(t),
            port: 0,
            bindir: primary.bindir.clone(),
            as_postgres: primary.as_postgres,
        };
        if c.as_postgres {
            c.run("chown", &["-R", "postgres:postgres", &c.root.display().to_string()], false)?;
        }
        let basebackup = c.bindir.join("pg_basebackup").display().to_string();
        let port = primary.port.to_string();
        let data = c.data_dir().display().to_string();
        let args = [
            "-h",
            "127.0.0.1",
            "-p",
            port.as_str(),
            "-U",
            "postgres",
            "-D",
            data.as_str(),
            "-R",
            "-X",
            "stream",
            "--no-sync",
            // An immediate checkpoint: the default spread one takes minutes on an idle server.
            "--checkpoint=fast",
        ];
        c.run(&basebackup, &args, true)?;
        // The copied postgresql.conf includes ../synapse.conf: this cluster's own settings.
        c.port = free_port()?;
        c.write_settings(&ClusterOptions::default())?;
        c.pg_ctl(&["start", "-w", "-t", "120", "-l", &c.root.join("server.log").display().to_string()])?;
        Ok(c)
    }

    /// Promotes a standby to a primary (waits until it accepts writes).
    pub fn promote(&self) -> Result<()> {
        self.pg_ctl(&["promote", "-w", "-t", "120"]).map(|_| ())
    }

    fn write_settings(&self, options: &ClusterOptions) -> Result<()> {
        std::fs::write(self.root.join("port"), self.port.to_string()).map_err(io(&self.root))?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {}", self.port),
            format!("unix_socket_directories = '{}'", self.root.display()),
            "wal_level = logical".into(),
            "max_wal_senders = 32".into(),
            "max_replication_slots = 32".into(),
            "max_connections = 200".into(),
            "shared_buffers = 256MB".into(),
            "max_wal_size = 4GB".into(),
            "log_min_messages = warning".into(),
            format!("fsync = {}", if options.fsync { "on" } else { "off" }),
        ];
        conf.extend(options.settings.iter().cloned());
        let mut owned = vec![self.root.join("synapse.conf"), self.root.join("port")];
        if let Some(tls) = &options.tls {
            let (cert, key) = (self.root.join("server.crt"), self.root.join("server.key"));
            std::fs::write(&cert, &tls.cert_pem).map_err(io(&cert))?;
            std::fs::write(&key, &tls.key_pem).map_err(io(&key))?;
            // The server refuses a key others may read.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).map_err(io(&key))?;
            conf.push("ssl = on".into());
            conf.push(format!("ssl_cert_file = '{}'", cert.display()));
            conf.push(format!("ssl_key_file = '{}'", key.display()));
            owned.extend([cert, key]);
        }
        if let Some(hba) = &options.hba {
            let path = self.data_dir().join("pg_hba.conf");
            std::fs::write(&path, hba).map_err(io(&path))?;
            owned.push(path);
        }
        // A separate include, so a persistent cluster gets the current settings.
        std::fs::write(self.root.join("synapse.conf"), conf.join("\n") + "\n").map_err(io(&self.root))?;
        if self.as_postgres {
            let mut args = vec!["postgres:postgres".to_string()];
            args.extend(owned.iter().map(|p| p.display().to_string()));
            self.run("chown", &args.iter().map(String::as_str).collect::<Vec<_>>(), false)?;
        }
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log (messages of WARNING and above).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    /// A connection URL for database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db)
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Runs SQL through psql (for setup steps that must not depend on the code under test).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let psql = self.bindir.join("psql").display().to_string();
        let out =
            self.run(&psql, &["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &self.url(db), "-c", sql], false)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn create_database(&self, db: &str) -> Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE \"{db}\"")).map(|_| ())
    }

    /// Stops the server: `fast` is a clean shutdown, `immediate` a crash (recovery at next start).
    pub fn stop(&self, mode: &str) -> Result<()> {
        self.pg_ctl(&["stop", "-w", "-m", mode]).map(|_| ())
    }

    pub fn restart(&self) -> Result<()> {
        self.pg_ctl(&["start", "-w", "-t", "120", "-l", &self.root.join("server.log").display().to_string()])
            .map(|_| ())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output> {
        let pg_ctl = self.bindir.join("pg_ctl").display().to_string();
        let data = self.data_dir().display().to_string();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        self.run(&pg_ctl, &all, true)
    }

    /// Runs a command, as `postgres` when `as_server_user` and we are root.
    fn run(&self, program: &str, args: &[&str], as_server_user: bool) -> Result<Output> {
        let mut cmd = if self.as_postgres && as_server_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args).current_dir(&self.root);
        let command = format!("{program} {}", args.join(" "));
        let out =
            cmd.output().map_err(|e| LocalPgError::Command { command: command.clone(), stderr: e.to_string() })?;
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if let Ok(log) = std::fs::read_to_string(self.root.join("server.log")) {
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                stderr.push_str(&format!(" | server.log: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" / ")));
            }
            return Err(LocalPgError::Command { command, stderr });
        }
        Ok(out)
    }
}

/// Polls until `query` on database `db` answers the same on `source` and `target` (a target
/// that is down or lacks the table counts as different). On timeout returns both answers.
pub fn wait_until_equal(
    source: &LocalCluster,
    target: &LocalCluster,
    db: &str,
    query: &str,
    timeout: std::time::Duration,
) -> std::result::Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let want = source.psql(db, query).map_err(|e| e.to_string())?;
        let got = target.psql(db, query).unwrap_or_default();
        if want == got {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("target never matched source\nsource: {want}\ntarget: {got}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop("immediate") {
            tracing::debug!(error = %e, "stopping local cluster");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_queries_restarts_and_cleans_up() {
        let c = LocalCluster::start(ClusterOptions::default()).unwrap();
        assert_eq!(c.psql("postgres", "SHOW wal_level").unwrap(), "logical");
        c.stop("fast").unwrap();
        assert!(c.psql("postgres", "SELECT 1").is_err());
        c.restart().unwrap();
        assert_eq!(c.psql("postgres", "SELECT 1").unwrap(), "1");
        let dir = c.root.clone();
        drop(c);
        assert!(!dir.exists());
    }

    /// A port handed out stays reserved: another process (here another open file description,
    /// which flock treats alike) cannot take its lock, and this process never hands it out twice.
    #[test]
    fn a_port_handed_out_is_reserved_across_processes() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
        for port in ports {
            assert!(PORTS.contains(&port), "{port} is in the ephemeral range");
            let path = std::env::temp_dir().join("synapse-ports").join(port.to_string());
            let other = std::fs::File::options().write(true).open(&path).unwrap();
            assert!(rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err());
        }
    }
}
