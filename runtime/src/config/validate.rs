//! Validation: every rule a configuration breaks, found in one pass and reported at once, each
//! naming its field (and, through [`super::locate`], its line) and what a valid value is.

use super::*;

/// One broken rule: the field (`sources[1].url`), where it is in the file, and the fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub field: String,
    /// 1-based line of the field (or of the nearest enclosing entry when the field is absent);
    /// `None` for a configuration built in code.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// Collects problems instead of stopping at the first.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem { field: field.into(), line: None, message: message.into() });
    }
}

/// Names of sources, targets and mesh nodes: they become metric labels and topic names.
pub(super) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 40
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

pub(super) fn url_problem(p: &mut Problems, field: String, url: &SecretUrl) {
    if let Err(e) = url.pg_config() {
        p.add(field, format!("not a PostgreSQL URL: {e}"));
    }
}

impl Config {
    /// Every rule the configuration breaks, at once (lines are filled in by [`Config::load`]).
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        Err(ConfigError::Invalid { path: path.into(), problems })
    }

    pub(super) fn problems(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        self.vector_problems(&mut p);
        if let Some(m) = &self.mesh {
            self.mesh_problems(m, &mut p);
        } else if self.sources.is_empty() {
            p.add("sources", "at least one source (or a mesh) is required");
        }
        let mut names = Vec::new();
        for (i, s) in self.sources.iter().enumerate() {
            if !valid_name(&s.name) {
                p.add(
                    format!("sources[{i}].name"),
                    format!("`{}` must be 1–40 characters of a-z, 0-9, _ or -", s.name),
                );
            } else if names.contains(&s.name) {
                p.add(
                    format!("sources[{i}].name"),
                    format!("`{}` is used twice; give each source its own name", s.name),
                );
            }
            names.push(s.name.clone());
            url_problem(&mut p, format!("sources[{i}].url"), &s.url);
            if !(0.1..=3600.0).contains(&s.heartbeat_interval_secs) {
                p.add(format!("sources[{i}].heartbeat_interval_secs"), "must be between 0.1 and 3600");
            }
            if s.max_slot_lag_bytes == Some(0) {
                p.add(format!("sources[{i}].max_slot_lag_bytes"), "must be above 0 (leave it out for no limit)");
            }
            if s.max_slot_lag_secs.is_some_and(|l| !(1.0..=31_536_000.0).contains(&l)) {
                p.add(format!("sources[{i}].max_slot_lag_secs"), "must be between 1 and 31536000 (a year)");
            }
            if !(1.0..=3600.0).contains(&s.receive_timeout_secs) {
                p.add(format!("sources[{i}].receive_timeout_secs"), "must be between 1 and 3600");
            }
            if let Some(slot) = &s.slot {
                if slot.is_empty()
                    || slot.len() > 63
                    || !slot.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    p.add(format!("sources[{i}].slot"), "slot names are 1–63 characters of a-z, 0-9 and _");
                }
            }
        }
        // Mesh nodes are sources too (webhooks and streams may name them).
        names.extend(self.mesh.iter().flat_map(|m| m.nodes.iter().map(|n| n.name.clone())));
        let mut tnames: Vec<&str> = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            // An expanded shard is named `<set>/<shard>`, both parts checked before.
            let name_ok = t.shard.is_some() || valid_name(&t.name);
            if !name_ok || tnames.contains(&t.name.as_str()) {
                p.add(
                    format!("targets[{i}].name"),
                    format!("`{}` must be unique, 1–40 characters of a-z, 0-9, _ or -", t.name),
                );
            }
            tnames.push(&t.name);
            // Writing the same tables on both sides needs conflict resolution and loop
            // prevention, which is what the mesh section sets up.
            if names.contains(&t.name) {
                p.add(
                    format!("targets[{i}].name"),
                    format!(
                        "`{}` is also a source: a node that is both is a writable mesh node, declare it under mesh.nodes",
                        t.name
                    ),
                );
            }
            if t.shard.is_none() {
                t.shard_problems(i, &mut p);
            }
            for (j, s) in t.sources.iter().enumerate() {
                if !names.contains(s) {
                    p.add(
                        format!("targets[{i}].sources[{j}]"),
                        format!("no source is named `{s}` (sources: {})", names.join(", ")),
                    );
                }
            }
            if !(1..=64).contains(&t.copy_parallelism) {
                p.add(format!("targets[{i}].copy_parallelism"), "must be between 1 and 64");
            }
            if t.max_txns_per_commit == 0 {
                p.add(format!("targets[{i}].max_txns_per_commit"), "must be at least 1");
            }
        }
        if let Some(k) = &self.log.kafka {
            k.problems(&names, &mut p);
        }
        if !(0.0..=24.0 * 366.0).contains(&self.log.stream_retention_hours) {
            p.add("log.stream_retention_hours", "must be between 0 and 8784 (a year)");
        }
        if !(0.0..=24.0 * 3660.0).contains(&self.log.dead_letter_retention_hours) {
            p.add("log.dead_letter_retention_hours", "must be between 0 (forever) and 87840 (ten years)");
        }
        for (field, listen) in [("ops.listen", &self.ops.listen), ("api.listen", &self.api.listen)] {
            if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
                p.add(
                    field,
                    format!("`{listen}` is not an IP address and port like 127.0.0.1:9187 (\"\" turns it off)"),
                );
            }
        }
        if !(0.1..=86_400.0).contains(&self.supervision.park_retry_secs) {
            p.add("supervision.park_retry_secs", "must be between 0.1 and 86400 seconds");
        }
        if !(1..=65_536).contains(&self.api.max_connections) {
            p.add("api.max_connections", "must be between 1 and 65536");
        }
        if !(1.0..=300.0).contains(&self.api.header_timeout_secs) {
            p.add("api.header_timeout_secs", "must be between 1 and 300");
        }
        if !(1..=self.api.max_connections.max(1)).contains(&self.api.max_streams) {
            p.add("api.max_streams", "must be between 1 and api.max_connections");
        }
        if !self.ops.listen.is_empty() && self.ops.listen == self.api.listen {
            p.add("api.listen", "must differ from ops.listen");
        }
        if self.api.tokens.is_empty() && !self.api.listen.is_empty() && !is_loopback_address(&self.api.listen) {
            p.add(
                "api.tokens",
                format!(
                    "the API listens on {}, which is not a loopback address, and no token is configured: anyone who reaches it could read every change and create webhooks. Add a token (`openssl rand -base64 24`), or listen on 127.0.0.1",
                    self.api.listen
                ),
            );
        }
        let mut token_names: Vec<&str> = Vec::new();
        for (i, t) in self.api.tokens.iter().enumerate() {
            if t.name.is_empty() || token_names.contains(&t.name.as_str()) {
                p.add(format!("api.tokens[{i}].name"), "must be non-empty and unique");
            }
            token_names.push(&t.name);
            match (&t.token, &t.token_sha256) {
                (Some(_), Some(_)) | (None, None) => {
                    p.add(format!("api.tokens[{i}]"), "give exactly one of `token` and `token_sha256`")
                }
                (Some(token), None) if token.trim().len() < defaults::MIN_TOKEN_LEN => p.add(
                    format!("api.tokens[{i}].token"),
                    format!("must be at least {} characters (e.g. `openssl rand -base64 24`)", defaults::MIN_TOKEN_LEN),
                ),
                (None, Some(hex)) if super::parse_sha256(hex).is_none() => p.add(
                    format!("api.tokens[{i}].token_sha256"),
                    "must be 64 hex digits (`printf %s \"$TOKEN\" | sha256sum`)",
                ),
                _ => {}
            }
            if t.admin && !t.scopes.is_empty() {
                p.add(
                    format!("api.tokens[{i}].admin"),
                    "`admin: true` already grants every scope: drop `scopes`, or `admin`",
                );
            }
            if let Some(bad) = t.tables.iter().find(|n| n.split('.').count() != 2) {
                p.add(format!("api.tokens[{i}].tables"), format!("`{bad}` is not schema.table"));
            }
        }
        for (i, a) in self.egress.allow.iter().enumerate() {
            if super::parse_net(a).is_none() {
                p.add(
                    format!("egress.allow[{i}]"),
                    format!("`{a}` is not a network (10.0.0.0/8) or an address (127.0.0.1)"),
                );
            }
        }
        let mut hook_names: Vec<&str> = Vec::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            if hook_names.contains(&w.name.as_str()) {
                p.add(format!("webhooks[{i}].name"), format!("`{}` is used twice", w.name));
            }
            hook_names.push(&w.name);
            if let Err(e) = w.validate(&format!("webhooks[{i}]"), &names) {
                match e {
                    synapse_connectors::ConnectorError::BadRequest { field, message } => p.add(field, message),
                    other => p.add(format!("webhooks[{i}]"), other.to_string()),
                }
            }
        }
        p.0
    }

    fn mesh_problems(&self, m: &MeshConfig, p: &mut Problems) {
        if m.nodes.len() < 2 {
            p.add("mesh.nodes", "a mesh needs at least two nodes");
        }
        if let Some(hub) = &m.hub {
            if !m.nodes.iter().any(|n| &n.name == hub) {
                p.add(
                    "mesh.hub",
                    format!("`{hub}` is not one of mesh.nodes; name the node every other node replicates through"),
                );
            }
        }
        if !(m.tombstone_purge_interval_secs == 0.0 || (0.1..=86400.0).contains(&m.tombstone_purge_interval_secs)) {
            p.add(
                "mesh.tombstone_purge_interval_secs",
                format!("{} is out of range: 0 (off) or 0.1 to 86400 seconds", m.tombstone_purge_interval_secs),
            );
        }
        let mut ids = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for (i, n) in m.nodes.iter().enumerate() {
            if n.id == 0 || ids.contains(&n.id) {
                p.add(
                    format!("mesh.nodes[{i}].id"),
                    format!("{} must be unique and between 1 and 65535 (0 stands for data older than the mesh)", n.id),
                );
            }
            ids.push(n.id);
            if !valid_name(&n.name) || names.contains(&n.name.as_str()) {
                p.add(
                    format!("mesh.nodes[{i}].name"),
                    format!("`{}` must be unique, 1–40 characters of a-z, 0-9, _ or -", n.name),
                );
            }
            if self.sources.iter().any(|s| s.name == n.name) || self.targets.iter().any(|t| t.name == n.name) {
                p.add(
                    format!("mesh.nodes[{i}].name"),
                    format!("`{}` is also listed under sources or targets: a mesh node is both already", n.name),
                );
            }
            names.push(&n.name);
            url_problem(p, format!("mesh.nodes[{i}].url"), &n.url);
        }
        for (i, n) in m.nodes.iter().enumerate() {
            let Some(from) = &n.join_from else { continue };
            if from == &n.name || !m.nodes.iter().any(|o| &o.name == from) {
                p.add(format!("mesh.nodes[{i}].join_from"), format!("`{from}` is not another node of mesh.nodes"));
            } else if m.hub.as_ref().is_some_and(|h| h != from && h != &n.name) {
                p.add(
                    format!("mesh.nodes[{i}].join_from"),
                    format!(
                        "`{from}` is a spoke: a spoke joins from the hub, the only node that has applied every other"
                    ),
                );
            }
        }
        if m.tables.is_empty() {
            p.add("mesh.tables", "name the schema.table of every table the nodes share");
        }
        for (i, t) in m.tables.iter().enumerate() {
            if t.split('.').count() != 2 || t.starts_with("synapse.") {
                p.add(format!("mesh.tables[{i}]"), format!("`{t}` is not a schema.table of the application"));
            }
        }
        for t in m.columns.keys() {
            if !m.tables.contains(t) {
                p.add(format!("mesh.columns.{t}"), format!("`{t}` is not one of mesh.tables"));
            }
        }
        for (t, f) in &m.merge_functions {
            if !m.tables.contains(t) {
                p.add(format!("mesh.merge_functions.{t}"), format!("`{t}` is not one of mesh.tables"));
            }
            let valid = |part: &str| {
                !part.is_empty()
                    && part.len() <= 63
                    && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            };
            if f.split('.').count() != 2 || !f.split('.').all(valid) {
                p.add(
                    format!("mesh.merge_functions.{t}"),
                    format!("`{f}` is not a schema.function name (lower-case letters, digits, _)"),
                );
            }
        }
    }
}

impl KafkaConfig {
    fn problems(&self, sources: &[String], p: &mut Problems) {
        let mut add = |field: &str, message: String| p.add(format!("log.kafka.{field}"), message);
        let brokers: Vec<&str> = self.brokers.split(',').map(str::trim).collect();
        for b in &brokers {
            let port = b.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
            if port.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) {
                add("brokers", format!("`{b}` is not host:port (e.g. kafka-1:9092)"));
            }
        }
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.topic_prefix.is_empty() || !self.topic_prefix.chars().all(legal) {
            add("topic_prefix", "must be 1 or more characters of a-z, A-Z, 0-9, ., _ or -".into());
        }
        // Kafka rejects topic names over 249 characters.
        if let Some(long) = sources.iter().find(|s| self.topic_prefix.len() + s.len() + ".consumers".len() + 1 > 249) {
            add("topic_prefix", format!("too long: topics of source `{long}` would exceed 249 characters"));
        }
        if self.replication_factor.is_some_and(|r| !(1..=32).contains(&r)) {
            add("replication_factor", "must be between 1 and 32 (or unset: the broker's default)".into());
        }
        if !(0.1..=300.0).contains(&self.request_timeout_secs) {
            add("request_timeout_secs", "must be between 0.1 and 300".into());
        }
        if let Some(pt) = &self.public_topics {
            if let Some(bad) = pt.tables.iter().find(|n| n.split('.').count() != 2) {
                add("public_topics.tables", format!("`{bad}` is not schema.table"));
            }
            if pt.partitions.is_some_and(|n| !(1..=10_000).contains(&n)) {
                add("public_topics.partitions", "must be between 1 and 10000 (or unset)".into());
            }
        }
        if !(10_000..=1_000_000_000).contains(&self.max_message_bytes) {
            add("max_message_bytes", "must be between 10000 and 1000000000".into());
        }
        if let Some(g) = &self.group {
            if g.trim().is_empty() || g.len() > 249 || g.chars().any(char::is_control) {
                add("group", "must be 1 to 249 printable characters (a Kafka group id)".into());
            }
        }
        if let Some(Err(e)) = self.signing_key.as_ref().map(|k| synapse_log::SigningKey::new(k.0.as_bytes())) {
            add("signing_key", format!("{e} (e.g. `openssl rand -base64 48`)"));
        }
        if self.properties.0.contains_key("bootstrap.servers") {
            add("properties", "set the brokers with log.kafka.brokers, not bootstrap.servers".into());
        }
        // librdkafka knows its properties: building a client (no connection yet) names a bad one.
        if let Err(e) = self.log_options(sources.first().map_or("check", String::as_str)).check() {
            add("properties", e);
        }
    }
}

/// Whether a listen address binds loopback only (`127.0.0.1:…`, `[::1]:…`, `localhost:…`).
fn is_loopback_address(listen: &str) -> bool {
    if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
        return addr.ip().is_loopback();
    }
    listen.rsplit_once(':').is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}
