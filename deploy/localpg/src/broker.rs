//! A throwaway Kafka-protocol broker for tests of the Kafka log: tansu, installed by
//! `scripts/ensure-tansu.sh` (built once per machine), on a free loopback port, memory storage.
//! No Apache Kafka can be fetched here (docs/decisions/0007-test-brokers.md); tansu speaks the protocol rdkafka uses.

use crate::LocalPgError;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running broker; killed on drop (its data lives only in memory).
pub struct LocalBroker {
    child: Child,
    addr: String,
}

impl LocalBroker {
    /// Installs tansu if missing (`scripts/ensure-tansu.sh`, or `SYNAPSE_TANSU` names the binary)
    /// and starts a broker, returning once it accepts connections.
    pub fn start() -> Result<LocalBroker, LocalPgError> {
        LocalBroker::start_with(None)
    }

    /// [`LocalBroker::start`], telling clients to connect to `advertised` (`host:port`) instead
    /// of the broker's own address: a proxy in front of it (tansu 0.6 cannot serve TLS itself:
    /// its `--cert` and `--key` options exclude each other).
    pub fn start_behind(advertised: &str) -> Result<LocalBroker, LocalPgError> {
        LocalBroker::start_with(Some(advertised))
    }

    fn start_with(advertised: Option<&str>) -> Result<LocalBroker, LocalPgError> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ensure-tansu.sh");
        let command = format!("bash {}", script.display());
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|source| LocalPgError::Io { path: script.display().to_string(), source })?;
        if !out.status.success() {
            return Err(LocalPgError::Command { command, stderr: "see its output above".into() });
        }
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let port = crate::free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = advertised.map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LocalPgError::Io { path: bin.clone(), source })?;
        let broker = LocalBroker { child, addr: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&broker.addr).is_err() {
            if Instant::now() > deadline {
                return Err(LocalPgError::Command {
                    command: format!("{bin} broker --listener-url {url}"),
                    stderr: "did not accept connections within 30 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    /// `host:port`, for `bootstrap.servers`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
