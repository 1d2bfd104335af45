//! The configuration file: YAML or TOML, `${VAR}`, `${VAR:-default}` and `${VAR:?message}`
//! interpolated from the environment before parsing, unknown fields rejected, and `validate()`
//! naming the field and the rule it broke.

use serde::Deserialize;
use std::fmt;
use std::path::Path;

mod interpolate;
pub mod locate;
mod log;
mod parse_error;
mod shards;
mod validate;
mod vector;
pub use interpolate::{interpolate, MissingVar};
pub use log::{KafkaConfig, KafkaProperties, LogConfig, LogSigningKey, PropertyValue, PublicTopicsConfig};
pub use shards::{NextShard, ReshardConfig, ReshardRole, ShardConfig};
pub use validate::Problem;
pub use vector::VectorIndexConfig;

/// Defaults, with the reason for each.
pub mod defaults {
    /// Next to where synapse runs, so the quickstart needs no setup.
    pub const LOG_DIR: &str = "./synapse-data";
    /// Two cores are the common small machine; each copy worker is a source + target connection.
    pub const COPY_PARALLELISM: usize = 2;
    /// Loopback only: metrics may reveal table names.
    pub const OPS_LISTEN: &str = "127.0.0.1:9187";
    /// Loopback only until tokens are configured: the streams carry row data.
    pub const API_LISTEN: &str = "127.0.0.1:7654";
    /// A day of changes stays readable for stream clients that are not consumers (they resume
    /// from a cursor) even after every applier and webhook endpoint has passed it.
    pub const STREAM_RETENTION_HOURS: f64 = 24.0;
    /// A parked component is tried again each minute: soon enough that an operator's fix is
    /// picked up without a restart, rare enough not to flood the logs of a node that is down.
    pub const PARK_RETRY_SECS: f64 = 60.0;
    /// Shortest accepted API token: 128 bits of base64/hex randomness.
    pub const MIN_TOKEN_LEN: usize = 22;
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The OS error is the source (printed once, after this message).
    #[error(
        "cannot read the configuration file {path} (check the path; deploy/synapse.example.yaml is a starting point)"
    )]
    Read { path: String, source: std::io::Error },
    /// Every variable the file uses without a value, at once (not one per run).
    #[error("{path}: {}\n  fix: export {}, or give a default in the file with ${{VAR:-default}}", interpolate::missing_list(.missing), if .missing.len() == 1 { "it" } else { "them" })]
    MissingVars { path: String, missing: Vec<MissingVar> },
    /// The text is not the configuration's shape (bad YAML/TOML, a wrong type, an unknown or
    /// missing field); `hint` guesses the fix (a misspelt field, a mis-indented line).
    #[error("{path}{}: {message}{}", line_suffix(*.line), .hint.as_ref().map(|h| format!("\n  fix: {h}")).unwrap_or_default())]
    Parse { path: String, line: Option<usize>, message: String, hint: Option<String> },
    /// Every rule the configuration breaks, each with its field, line and valid values.
    #[error("{}", problem_list(.path, .problems))]
    Invalid { path: String, problems: Vec<Problem> },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

fn problem_list(path: &str, problems: &[Problem]) -> String {
    match problems {
        [one] => format!("{path}{}: invalid {}: {}", line_suffix(one.line), one.field, one.message),
        many => {
            let lines: Vec<String> = many.iter().map(|p| format!("\n  {p}")).collect();
            format!("{path}: {} problems:{}", many.len(), lines.concat())
        }
    }
}

/// A connection URL whose password never reaches logs or output. Empty by default: a
/// shard set's `url` is absent (its shards have theirs).
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(s: impl Into<String>) -> Self {
        SecretUrl(s.into())
    }
    /// The parsed settings, or what is wrong with the text (never the text: it holds secrets).
    pub fn pg_config(&self) -> Result<synapse_postgres::PgConfig, String> {
        let expected = "postgres://user:password@host:5432/dbname, or host=… port=… dbname=…";
        let port_error = |port: &str| format!("port `{port}` is not a number from 1 to 65535 (expected {expected})");
        let config: synapse_postgres::PgConfig =
            self.0.parse().map_err(|e: synapse_postgres::PgConfigError| match bad_port(&self.0) {
                Some(port) => port_error(&port),
                None => format!("{e} (expected {expected})"),
            })?;
        // tokio-postgres takes port 0, which no server listens on.
        if config.get_ports().contains(&0) {
            return Err(port_error("0"));
        }
        Ok(config)
    }
}

/// The first port of a connection string that is not 1–65535 (tokio-postgres only says
/// "invalid connection string"). Ports hold no secret, so the port itself may be shown.
fn bad_port(s: &str) -> Option<String> {
    let bad = |p: &str| !p.is_empty() && p.parse::<u16>().map_or(true, |p| p == 0);
    if let Some(rest) = s.split_once("://").map(|(_, r)| r) {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        return hosts
            .split(',')
            .filter_map(|h| h.rsplit_once(':').map(|(_, p)| p))
            .find(|p| !p.ends_with(']') && bad(p))
            .map(str::to_owned);
    }
    s.split_whitespace()
        .filter_map(|kv| kv.strip_prefix("port="))
        .flat_map(|ports| ports.split(','))
        .find(|p| bad(p))
        .map(str::to_owned)
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&synapse_postgres::redact(&self.0))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub ops: OpsConfig,
    #[serde(default)]
    pub api: ApiConfig,
    /// Webhook endpoints (more can be added at run time through /v1/endpoints).
    #[serde(default)]
    pub webhooks: Vec<synapse_connectors::webhook::EndpointSpec>,
    /// Where webhooks may connect besides public addresses.
    #[serde(default)]
    pub egress: EgressConfig,
    /// Writable nodes replicating the same tables to each other (multi-region).
    #[serde(default)]
    pub mesh: Option<MeshConfig>,
    /// Nearest-neighbour indexes of tables' vector columns, kept in sync from the stream.
    #[serde(default)]
    pub vector_indexes: Vec<vector::VectorIndexConfig>,
    /// What happens to a component (a source's capture, one applier, a mesh node) that fails
    /// definitely: it parks and is tried again later while the rest keeps running.
    #[serde(default)]
    pub supervision: SupervisionConfig,
}

/// Internal networks webhooks may reach (loopback, private and link-local addresses are refused
/// otherwise: see `synapse_connectors::webhook::egress`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Networks (`10.0.0.0/8`) or addresses (`127.0.0.1`).
    #[serde(default)]
    pub allow: Vec<String>,
}

impl EgressConfig {
    /// The policy (entries that do not parse are refused by validation first).
    pub fn policy(&self) -> synapse_connectors::webhook::egress::EgressPolicy {
        synapse_connectors::webhook::egress::EgressPolicy::new(self.allow.iter().filter_map(|a| parse_net(a)).collect())
    }
}

/// A network (`10.0.0.0/8`) or one address (`127.0.0.1`, `::1`).
pub fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// A mesh: every node captures its own writes and applies every other node's, resolving
/// concurrent writes with the strategies of `columns`. Each node becomes a source and a target
/// (see [`Config::expand_mesh`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    pub nodes: Vec<MeshNode>,
    /// `schema.table` names replicated among the nodes; each must exist, with a primary key,
    /// on every node.
    pub tables: Vec<String>,
    /// Per table, per column, the strategy for concurrent writes: lww (default), counter, set,
    /// multi_value, max, min.
    #[serde(default)]
    pub columns: std::collections::BTreeMap<String, std::collections::BTreeMap<String, synapse_resolver::Strategy>>,
    /// Per table, a SQL function `(older jsonb, newer jsonb) → jsonb` deciding the lww columns
    /// of two concurrent live versions of a row (it must exist on every node).
    #[serde(default)]
    pub merge_functions: std::collections::BTreeMap<String, String>,
    /// Seconds between tombstone purge rounds (0 turns purging off). The interval only batches
    /// the work: a tombstone goes once every node holds it and nothing older is in flight.
    #[serde(default = "default_purge_interval")]
    pub tombstone_purge_interval_secs: f64,
    /// Hub-and-spoke instead of a full mesh: the named node applies every other node and
    /// forwards what it applied; every other node (a spoke) applies the hub only. Spokes need
    /// no links to each other; their changes reach each other through the hub.
    #[serde(default)]
    pub hub: Option<String>,
    /// A configured node that has not joined the running mesh: `join` (default) joins it on
    /// start from a donor's snapshot; `wait` leaves it out until `synapse mesh join <node>`.
    #[serde(default)]
    pub on_new_node: OnNewNode,
}

/// What `synapse run` does with a mesh node that has not joined (see [`MeshConfig::on_new_node`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNewNode {
    #[default]
    Join,
    Wait,
}

fn default_purge_interval() -> f64 {
    60.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshNode {
    /// Names the node like a source: its log, slot and replication origin.
    pub name: String,
    /// Stable numeric identity (1–65535) in version vectors and clocks; never reuse one.
    pub id: u16,
    pub url: SecretUrl,
    /// Free-form, shown in metrics and the conflict log.
    #[serde(default)]
    pub region: Option<String>,
    /// The member this node copies the mesh tables from when it joins (default: the hub, or
    /// the first member in `nodes`).
    #[serde(default)]
    pub join_from: Option<String>,
}

impl MeshConfig {
    pub fn policies(&self) -> std::collections::HashMap<String, synapse_resolver::TablePolicy> {
        self.tables
            .iter()
            .map(|t| {
                let policy = synapse_resolver::TablePolicy {
                    columns: self.columns.get(t).cloned().unwrap_or_default(),
                    merge_function: self.merge_functions.get(t).cloned(),
                };
                (t.clone(), policy)
            })
            .filter(|(_, p)| *p != synapse_resolver::TablePolicy::default())
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of /v1/streams and /v1/endpoints; empty string disables the API.
    #[serde(default = "default_api_listen")]
    pub listen: String,
    /// Bearer tokens with scopes; none = no authentication, allowed on a loopback address only.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Open connections at most; more are answered 503 and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has to send a request's header, and a kept-alive connection its next
    /// request (slowloris).
    #[serde(default = "default_header_timeout_secs")]
    pub header_timeout_secs: f64,
    /// Live streams (SSE, long polls) at once; more are answered 503 `CON012`.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Serve HTTPS with this certificate and key (re-read when they change).
    #[serde(default)]
    pub tls: Option<crate::listener_tls::TlsFiles>,
}

fn default_max_connections() -> usize {
    4096
}

fn default_header_timeout_secs() -> f64 {
    10.0
}

fn default_max_streams() -> usize {
    synapse_connectors::api::DEFAULT_MAX_STREAMS
}

impl ApiConfig {
    /// The tokens as the API checks them (digests, scopes).
    pub fn auth(&self) -> synapse_connectors::auth::Auth {
        synapse_connectors::auth::Auth::new(self.api_tokens())
    }

    /// The tokens as the API checks them (digests, scopes).
    pub fn api_tokens(&self) -> Vec<synapse_connectors::auth::Token> {
        use synapse_connectors::auth::{Scope, Token};
        self.tokens
            .iter()
            .map(|t| {
                let sha256 = match (&t.token, &t.token_sha256) {
                    (Some(secret), _) => synapse_connectors::auth::digest(secret),
                    (None, Some(hex)) => parse_sha256(hex).unwrap_or([0; 32]),
                    (None, None) => [0; 32],
                };
                let scopes = if t.admin {
                    vec![Scope::Admin]
                } else if t.scopes.is_empty() {
                    vec![Scope::Stream]
                } else {
                    t.scopes.clone()
                };
                Token { name: t.name.clone(), sha256, tables: t.tables.clone(), scopes }
            })
            .collect()
    }
}

/// A SHA-256 digest written as 64 hex digits.
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_api_listen(),
            tokens: Vec::new(),
            max_connections: default_max_connections(),
            header_timeout_secs: default_header_timeout_secs(),
            max_streams: default_max_streams(),
            tls: None,
        }
    }
}

fn default_api_listen() -> String {
    defaults::API_LISTEN.into()
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    /// The secret (from the environment: `${API_TOKEN}`); or give `token_sha256` instead.
    #[serde(default)]
    pub token: Option<String>,
    /// The secret's SHA-256 as hex (`printf %s "$TOKEN" | sha256sum`): the file then holds no
    /// secret.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// `schema.table` names a `stream` token may read; empty = all.
    #[serde(default)]
    pub tables: Vec<String>,
    /// `stream`, `endpoints`, `repair`, `admin` (everything); default `[stream]`.
    #[serde(default)]
    pub scopes: Vec<synapse_connectors::auth::Scope>,
    /// Shorthand for `scopes: [admin]`.
    #[serde(default)]
    pub admin: bool,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &"***")
            .field("tables", &self.tables)
            .field("scopes", &self.scopes)
            .field("admin", &self.admin)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Names the node: its log file, slot (`synapse_<name>`) and replication origin.
    pub name: String,
    pub url: SecretUrl,
    pub slot: Option<String>,
    #[serde(default = "default_publication")]
    pub publication: String,
    /// `schema.table` names; empty = every table with a primary key or replica identity.
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Seconds between heartbeats.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_secs: f64,
    /// Seconds of silence after which the replication connection is presumed dead (half-open)
    /// and reconnected; synapse asks the server for a reply at every status update.
    #[serde(default = "default_receive_timeout")]
    pub receive_timeout_secs: f64,
    /// Warn (log, `/readyz` detail, `synapse_slot_lag_over_limit`) when the slot holds more WAL
    /// than this on the source: its disk fills while synapse cannot keep up or is stopped.
    #[serde(default)]
    pub max_slot_lag_bytes: Option<u64>,
    /// Warn likewise when the newest captured commit or heartbeat is older than this.
    #[serde(default)]
    pub max_slot_lag_secs: Option<f64>,
    /// Capture changes that SynapseDB applied on this node too (cascades A → B → C). `false`
    /// leaves them out, which is what a node that is also a target in a mesh needs.
    #[serde(default = "yes")]
    pub forward_applied: bool,
    /// Have the source (PostgreSQL 14+) send a transaction larger than its
    /// `logical_decoding_work_mem` while it runs, instead of keeping it in its own `pg_replslot`
    /// until it commits: it then waits in `<log.dir>/spool/<source>` until its commit (or is
    /// dropped at its abort). `false` keeps pgoutput protocol 1.
    #[serde(default = "yes")]
    pub streaming: bool,
    /// What the capture does when it finds a gap (its slot lost): `stop` parks it until an
    /// operator accepts the gap; `resync` accepts it and makes every target whole again.
    #[serde(default)]
    pub on_gap: OnGap,
    /// What targets do with this source's schema changes: `apply` (run them in place),
    /// `events` (consumers see them; targets are left alone), `stop` (each target parks at
    /// one until the operator records it in `synapse.schema_skips`).
    #[serde(default)]
    pub ddl: synapse_apply::DdlPolicy,
}

impl SourceConfig {
    /// A source with every default, as a file naming only `name` and `url` gets.
    pub fn new(name: &str, url: SecretUrl) -> SourceConfig {
        SourceConfig {
            name: name.to_owned(),
            url,
            slot: None,
            publication: default_publication(),
            tables: Vec::new(),
            create_publication: true,
            heartbeat_interval_secs: default_heartbeat(),
            receive_timeout_secs: default_receive_timeout(),
            max_slot_lag_bytes: None,
            max_slot_lag_secs: None,
            forward_applied: true,
            streaming: true,
            on_gap: OnGap::Stop,
            ddl: synapse_apply::DdlPolicy::Apply,
        }
    }
}

/// See [`SourceConfig::on_gap`] and docs/decisions/0011-resync-by-repair.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnGap {
    #[default]
    Stop,
    Resync,
}

fn default_publication() -> String {
    "synapse".into()
}
fn yes() -> bool {
    true
}
fn default_receive_timeout() -> f64 {
    synapse_capture::defaults::RECEIVE_TIMEOUT.as_secs_f64()
}

fn default_heartbeat() -> f64 {
    synapse_capture::defaults::HEARTBEAT_INTERVAL.as_secs_f64()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// The target's database; absent for a shard set (each shard names its own).
    #[serde(default)]
    pub url: SecretUrl,
    /// Source names to apply; empty = every source except one with this target's name.
    #[serde(default)]
    pub sources: Vec<String>,
    #[serde(default = "yes")]
    pub initial_copy: bool,
    #[serde(default = "default_copy_parallelism")]
    pub copy_parallelism: usize,
    #[serde(default = "default_txns_per_commit")]
    pub max_txns_per_commit: usize,
    /// Whether each group commit waits for the target's WAL flush (`synchronous_commit`).
    /// Unset: on only where this target is also a source that passes on what is applied here
    /// (a source of the same name with `forward_applied`: decoding reads only flushed WAL),
    /// else off, as for PostgreSQL's own subscriptions — a target crash loses at most its last
    /// moments of applied groups together with their stored position, and the applier applies
    /// them again from the log. See [`Config::synchronous_commit`].
    #[serde(default)]
    pub synchronous_commit: Option<bool>,
    /// A shard set: the target is these databases, each row on the one its table's rule in
    /// `sharding` names (see `synapse_apply::shards`). Expanded at load into one target per
    /// shard, named `<target>/<shard>`.
    #[serde(default)]
    pub shards: Vec<ShardConfig>,
    /// `schema.table` → `{hash: <column>}` or `{range: <column>, ranges: [...]}`; a table
    /// without a rule is a reference table, on every shard.
    #[serde(default)]
    pub sharding: std::collections::BTreeMap<String, synapse_apply::shards::TableRule>,
    /// Set on each shard of an expanded set: what that shard's appliers keep.
    #[serde(skip)]
    pub shard: Option<synapse_apply::shards::ShardAssignment>,
    /// The placement a shard set moves to (`synapse shards start|switch|reverse|finish`).
    #[serde(default)]
    pub resharding: Option<ReshardConfig>,
    /// Set on the shards of an expanded set that is resharding: new ones, or retired ones.
    #[serde(skip)]
    pub reshard_role: Option<ReshardRole>,
}

fn default_copy_parallelism() -> usize {
    defaults::COPY_PARALLELISM
}
fn default_txns_per_commit() -> usize {
    synapse_apply::defaults::MAX_TXNS_PER_COMMIT
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    /// Seconds a parked component waits before it is tried again (SIGHUP tries at once).
    #[serde(default = "default_park_retry")]
    pub park_retry_secs: f64,
    /// Exit the process when a component parks (for orchestrators that restart and alert)
    /// instead of keeping the other components running.
    #[serde(default)]
    pub exit_on_park: bool,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig { park_retry_secs: default_park_retry(), exit_on_park: false }
    }
}

impl SupervisionConfig {
    pub fn policy(&self) -> crate::ops::Supervision {
        crate::ops::Supervision {
            park_retry: std::time::Duration::from_secs_f64(self.park_retry_secs.clamp(0.1, 86_400.0)),
            exit_on_park: self.exit_on_park,
        }
    }
}

fn default_park_retry() -> f64 {
    defaults::PARK_RETRY_SECS
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// Address of /metrics, /livez and /readyz (nothing that changes anything); empty string
    /// disables the server.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Serve HTTPS with this certificate and key (re-read when they change).
    #[serde(default)]
    pub tls: Option<crate::listener_tls::TlsFiles>,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig { listen: default_listen(), tls: None }
    }
}

fn default_listen() -> String {
    defaults::OPS_LISTEN.into()
}

impl Config {
    /// One line on what the configuration replicates (`synapse validate`'s answer).
    pub fn summary(&self) -> String {
        let mesh = self
            .mesh
            .as_ref()
            .map(|m| format!("mesh of {} nodes over {} tables; ", m.nodes.len(), m.tables.len()))
            .unwrap_or_default();
        let api = if self.api.listen.is_empty() { "off".to_string() } else { format!("on {}", self.api.listen) };
        format!(
            "{mesh}{} sources, {} targets, {} webhook endpoints, API {api}",
            self.sources.len(),
            self.targets.len(),
            self.webhooks.len()
        )
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        Self::from_text(&raw, is_toml, &p, |k| std::env::var(k).ok())
    }

    /// [`Config::load`] of a file's text `raw`, with `env` for `${VAR}` references: every
    /// step after reading (interpolation, parsing, validation, mesh expansion).
    pub fn from_text(
        raw: &str,
        is_toml: bool,
        path: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let p = path.to_owned();
        let text = interpolate(raw, &p, env)?;
        let mut config = Self::parse(&text, is_toml, &p)?;
        let mut problems = config.problems();
        if !problems.is_empty() {
            for problem in &mut problems {
                problem.line = locate::line_of(&text, is_toml, &problem.field);
            }
            return Err(ConfigError::Invalid { path: p, problems });
        }
        config.expand_mesh();
        config.expand_shards();
        Ok(config)
    }

    pub fn parse(text: &str, is_toml: bool, path: &str) -> Result<Config, ConfigError> {
        // serde_path_to_error names the field that failed (`webhooks[0].filter`), where the
        // parsers name only the entry holding it.
        let parsed = if is_toml {
            serde_path_to_error::deserialize(toml::Deserializer::new(text))
                .map_err(|e| parse_error::from_toml(text, &e.path().to_string(), e.inner()))
        } else {
            serde_path_to_error::deserialize(yaml_serde::Deserializer::from_str(text))
                .map_err(|e| parse_error::from_yaml(text, &e.path().to_string(), e.inner()))
        };
        parsed.map_err(|(line, message, hint)| ConfigError::Parse { path: path.into(), line, message, hint })
    }

    /// Turns each mesh node into a source (its own writes only: changes SynapseDB applied there
    /// are not captured again) and a target applying every other node, without initial copy
    /// (the nodes start from the same data).
    pub fn expand_mesh(&mut self) {
        let Some(m) = self.mesh.clone() else { return };
        let mut tables = m.tables.clone();
        tables.push(format!("{}.{}", synapse_apply::mesh::ROW_VERSION_SCHEMA, synapse_apply::mesh::ROW_VERSION_TABLE));
        for n in &m.nodes {
            let is_hub = m.hub.as_ref() == Some(&n.name);
            // A mesh node's gap stops (on_gap: stop): it is repaired with `synapse repair fix`,
            // resolved through the mesh's versions, not re-synced from one side.
            self.sources.push(SourceConfig {
                tables: tables.clone(),
                // The hub passes on what it applied (with the resolved versions); its echoes
                // back to their origin resolve as duplicates.
                forward_applied: is_hub,
                ..SourceConfig::new(&n.name, n.url.clone())
            });
            let sources = match &m.hub {
                Some(hub) if !is_hub => vec![hub.clone()],
                _ => m.nodes.iter().filter(|o| o.name != n.name).map(|o| o.name.clone()).collect(),
            };
            self.targets.push(TargetConfig {
                name: n.name.clone(),
                url: n.url.clone(),
                sources,
                initial_copy: false,
                copy_parallelism: defaults::COPY_PARALLELISM,
                max_txns_per_commit: default_txns_per_commit(),
                // On for the hub, whose source forwards what it applies.
                synchronous_commit: None,
                shards: Vec::new(),
                sharding: Default::default(),
                shard: None,
                resharding: None,
                reshard_role: None,
            });
        }
    }

    /// Whether `target`'s group commits wait for its WAL flush: as set, else only where the
    /// target is also a source passing on what is applied there (a mesh hub, a chain).
    pub fn synchronous_commit(&self, target: &TargetConfig) -> bool {
        target
            .synchronous_commit
            .unwrap_or_else(|| self.sources.iter().any(|s| s.name == target.name && s.forward_applied))
    }

    /// The sources a target applies.
    pub fn sources_of<'a>(&'a self, target: &'a TargetConfig) -> impl Iterator<Item = &'a SourceConfig> + 'a {
        self.sources.iter().filter(move |s| {
            if target.sources.is_empty() {
                s.name != target.name
            } else {
                target.sources.contains(&s.name)
            }
        })
    }
}

#[cfg(test)]
mod tests;
