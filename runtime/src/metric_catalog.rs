//! Every metric SynapseDB exports, with its HELP text, in one place: the crates record them by
//! name, and this catalog describes them once the recorder is installed. A test checks that
//! every name recorded anywhere in the workspace is here (docs/decisions/0016-metrics-catalog.md).
//!
//! Labels: `source` (the source node), `target`, `endpoint` (webhooks), `stream`, `listener`,
//! `component`, `table`, `log` (a log file's or topic's name).

/// What kind of series a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

use Kind::*;

/// `(name, kind, help)` of every metric.
pub const METRICS: &[(&str, Kind, &str)] = &[
    ("synapse_build_info", Gauge, "1, labelled with the running release's version"),
    // Capture
    ("synapse_capture_events_total", Counter, "Change events written to the log, per source"),
    ("synapse_capture_transactions_total", Counter, "Source transactions written to the log, per source"),
    (
        "synapse_capture_confirmed_lsn",
        Gauge,
        "WAL position confirmed to the source's slot (durable in the log), per source",
    ),
    ("synapse_capture_durable_lsn", Gauge, "End of the last source transaction durable in the log, per source"),
    (
        "synapse_capture_lag_seconds",
        Gauge,
        "Seconds between now and the commit time of the last captured transaction, per source",
    ),
    (
        "synapse_slot_lag_bytes",
        Gauge,
        "Bytes of WAL the source keeps for synapse's slot (current position minus confirmed), per source",
    ),
    ("synapse_slot_lag_over_limit", Gauge, "1 while a source's slot lag exceeds its configured limit"),
    (
        "synapse_capture_receive_timeouts_total",
        Counter,
        "Replication connections replaced after no message within the receive timeout, per source",
    ),
    (
        "synapse_capture_skipped_transactions_total",
        Counter,
        "Source transactions not written to the log (e.g. a target's own applied changes), per source and reason",
    ),
    (
        "synapse_capture_streamed_transactions_total",
        Counter,
        "Transactions the source streamed while they ran (protocol 2), per source and outcome: committed, aborted, skipped",
    ),
    (
        "synapse_capture_spool_bytes",
        Gauge,
        "Bytes of streamed transactions kept on disk until their commit or abort, per source",
    ),
    (
        "synapse_capture_schema_changes_total",
        Counter,
        "Schema changes captured from a source's event trigger, per source",
    ),
    (
        "synapse_capture_ddl_captured",
        Gauge,
        "1 when the source's DDL event trigger is installed, 0 when schema changes are not captured",
    ),
    (
        "synapse_capture_gaps_total",
        Counter,
        "Gaps found in a source's WAL (a lost or invalidated slot, a timeline change)",
    ),
    (
        "synapse_gaps_crossed_total",
        Counter,
        "Gaps a source's capture crossed (on_gap: resync, or accepted by an operator)",
    ),
    ("synapse_resyncs_total", Counter, "Target re-syncs started after a crossed gap, per source"),
    (
        "synapse_owed_copies_total",
        Counter,
        "Initial copies owed to targets for tables that joined holding rows, per source",
    ),
    // Log
    ("synapse_log_appended_records_total", Counter, "Records appended to a log, per log (file or topic)"),
    ("synapse_log_appended_bytes_total", Counter, "Bytes appended to a log, per log"),
    (
        "synapse_log_append_seconds",
        Histogram,
        "Time to make appended records durable: one store write of every batch staged (embedded, one fsync) or one produced batch (Kafka)",
    ),
    (
        "synapse_log_unsigned_records_total",
        Counter,
        "Records read without a valid signature where signing is configured",
    ),
    // Apply
    ("synapse_apply_copy_rows_total", Counter, "Inserted rows the applier wrote through COPY, per source, target and format (binary, or text for values with no binary form)"),
    ("synapse_apply_duplicates_skipped_total", Counter, "Transactions the log held again after this target applied them (a duplicate write or a replay), passed over by commit LSN, per source and target"),
    ("synapse_apply_rows_total", Counter, "Rows written to a target, per source and target"),
    ("synapse_apply_transactions_total", Counter, "Source transactions applied to a target, per source and target"),
    ("synapse_apply_lag_records", Gauge, "Log records not yet applied to a target, per source and target"),
    (
        "synapse_apply_lag_seconds",
        Gauge,
        "Seconds since the commit of the last applied transaction while records are pending, per source and target",
    ),
    (
        "synapse_apply_position_realigned_total",
        Counter,
        "Restarts of an applier whose stored offset no longer matched the log (records it read before they were durable were lost and written again): it resumed by commit LSN, per source and target",
    ),
    ("synapse_apply_log_read_seconds", Histogram, "Time to read one batch of the log, per source and target"),
    (
        "synapse_apply_statements_seconds",
        Histogram,
        "Time to send one flush of rows to a target (a COPY to its end; other statements are read at the commit), per source and target",
    ),
    (
        "synapse_apply_commit_seconds",
        Histogram,
        "Time from one target transaction's commit request to its result, with the statements sent ahead of it, per source and target",
    ),
    (
        "synapse_apply_mesh_resolve_seconds",
        Histogram,
        "Time to resolve one flush of mesh rows against the target's versions, per source and target",
    ),
    (
        "synapse_apply_schema_changes_total",
        Counter,
        "Source schema changes reaching a target, per source and outcome (applied, not_run, skipped)",
    ),
    ("synapse_copy_rows_total", Counter, "Rows copied into targets by initial copies and re-syncs, per source"),
    // Mesh
    (
        "synapse_conflicts_total",
        Counter,
        "Concurrent writes of one row resolved in the mesh, per table, kind and resolution",
    ),
    (
        "synapse_mesh_rows_total",
        Counter,
        "Peer rows applied in the mesh, per table and decision (insert, apply, skip, merge)",
    ),
    (
        "synapse_mesh_unversioned_rows_total",
        Counter,
        "Peer rows that carried no version (mesh trigger missing on the peer), per table",
    ),
    (
        "synapse_mesh_tombstones_purged_total",
        Counter,
        "Delete tombstones purged once every node has seen them, per table",
    ),
    ("synapse_mesh_burials_announced_total", Counter, "Tombstone burials announced to the peers"),
    (
        "synapse_mesh_node_member",
        Gauge,
        "1 while the mesh node is a member (joined, or founding), 0 while it waits, joins or has left, per node",
    ),
    ("synapse_mesh_join_rows_total", Counter, "Rows a joining mesh node copied from its donor's snapshot, per node"),
    // Vector indexes
    ("synapse_vector_searches_total", Counter, "Searches answered by a vector index, per index"),
    (
        "synapse_vector_search_seconds",
        Histogram,
        "Seconds a vector index took to answer a search (the graph walk; not a read-your-writes wait, nor reading included rows), per index",
    ),
    ("synapse_vector_rows_total", Counter, "Rows (upserts and deletes) applied to a vector index, per index"),
    (
        "synapse_vector_batch_seconds",
        Histogram,
        "Seconds to apply a batch to a vector index (graph update and commit), per index",
    ),
    (
        "synapse_vector_lag_seconds",
        Gauge,
        "Seconds between now and the commit of the last change a vector index applied, per index",
    ),
    (
        "synapse_vector_graph_nodes",
        Gauge,
        "Nodes in a vector index's graph: its rows' current vectors and the waypoints moves and deletes left until the next rebuild, per index",
    ),
    (
        "synapse_vector_orphans",
        Gauge,
        "Rows of a vector index its graph has no way to (far from the rest), searched exactly beside it, per index",
    ),
    ("synapse_vector_graph_rebuilds_total", Counter, "Whole-graph rebuilds a vector index took in since start, per index"),
    // Supervision
    (
        "synapse_component_state",
        Gauge,
        "1 for each component's current state (starting, copying, resyncing, streaming, retrying, parked, stopped)",
    ),
    ("synapse_retries_total", Counter, "Transient failures retried, per component"),
    ("synapse_parks_total", Counter, "Definite failures that parked a component, per component and code"),
    ("synapse_group_source_owned", Gauge, "1 in the consumer-group member running a source"),
    ("synapse_kafka_topics_events_total", Counter, "Events published to the public Kafka topics, per source"),
    // Webhooks and streams
    ("synapse_webhook_attempts_total", Counter, "Webhook delivery attempts, per endpoint and outcome"),
    ("synapse_webhook_delivery_latency_seconds", Histogram, "Source commit to webhook delivered, per endpoint"),
    ("synapse_webhook_pending", Gauge, "Events waiting for delivery, per endpoint"),
    ("synapse_webhook_dead_lettered_total", Counter, "Events dead-lettered after the retry schedule, per endpoint"),
    ("synapse_webhook_dead_letters_expired_total", Counter, "Dead letters removed at the end of their retention"),
    ("synapse_stream_requests_total", Counter, "Streaming API requests, per stream and mode"),
    ("synapse_stream_events_total", Counter, "Events served by the streaming API, per stream"),
    ("synapse_stream_snapshot_rows_total", Counter, "Rows served by stream snapshots, per stream"),
    ("synapse_stream_sse_clients", Gauge, "Open server-sent-event clients, per stream"),
    // Listeners, tokens, admin
    ("synapse_http_connections", Gauge, "Open HTTP connections, per listener"),
    ("synapse_http_refused_total", Counter, "HTTP connections refused at the connection cap, per listener"),
    ("synapse_tls_handshake_failures_total", Counter, "TLS handshakes that failed, per listener"),
    ("synapse_tls_reloads_total", Counter, "Certificate reloads, per listener and outcome"),
    ("synapse_token_reloads_total", Counter, "API token file reloads, per outcome"),
    ("synapse_admin_actions_total", Counter, "Admin API actions, per action and outcome"),
    ("synapse_audit_write_errors_total", Counter, "Audit log entries that could not be written"),
    // Repair
    ("synapse_repair_check_seconds", Histogram, "Time of one repair check, per table and digest source"),
    ("synapse_repair_differing_keys", Gauge, "Keys found differing by the last check, per table"),
    (
        "synapse_repair_changing_keys_total",
        Counter,
        "Differing keys that were still changing during a check, per table",
    ),
    ("synapse_repair_rows_fixed_total", Counter, "Rows written by repair fix, per table"),
    ("synapse_repair_conflicts_total", Counter, "Rows repair fix resolved through the resolver, per table"),
    ("synapse_repair_unresolved_keys", Gauge, "Keys repair fix could not resolve, per table"),
    (
        "synapse_reshard_phase",
        Gauge,
        "A shard set's move: 0 none, 1 started, 2 switched, 3 reversed, 4 finished, per set",
    ),
    (
        "synapse_reshard_rows_deleted_total",
        Counter,
        "Rows a finished move deleted from a retired shard, per set and shard",
    ),
];

/// Histogram buckets in seconds: 1 ms to 2 minutes, so quantiles aggregate across processes.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Describes every metric to the installed recorder and sets `synapse_build_info`.
pub fn describe_all() {
    for &(name, kind, help) in METRICS {
        match kind {
            Counter => metrics::describe_counter!(name, help),
            Gauge => metrics::describe_gauge!(name, help),
            Histogram => metrics::describe_histogram!(name, help),
        }
    }
    metrics::gauge!("synapse_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `metrics::counter!/gauge!/histogram!("synapse_…"` in the workspace's sources has an
    /// entry here, of the same kind.
    #[test]
    fn every_recorded_metric_is_described() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = entry.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                if p.is_dir() && !name.starts_with('.') && name != "target" && name != "fuzz" {
                    dirs.push(p);
                } else if name.ends_with(".rs") && !p.components().any(|c| c.as_os_str() == "tests") {
                    files.push(p);
                }
            }
        }
        let re = regex_lite::Regex::new(r#"metrics::(counter|gauge|histogram)!\(\s*"(synapse_[a-z_]+)""#).unwrap();
        let mut seen = 0;
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for c in re.captures_iter(&text) {
                seen += 1;
                let kind = match &c[1] {
                    "counter" => Counter,
                    "gauge" => Gauge,
                    _ => Histogram,
                };
                let entry = METRICS.iter().find(|(n, _, _)| *n == &c[2]);
                assert!(entry.is_some(), "{} ({}) has no entry in METRICS", &c[2], f.display());
                assert_eq!(entry.unwrap().1, kind, "{} is recorded as a {kind:?} in {}", &c[2], f.display());
            }
        }
        assert!(seen > 50, "found only {seen} metric call sites: is the source walk right?");
        let mut names: Vec<_> = METRICS.iter().map(|m| m.0).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), METRICS.len(), "a metric is listed twice");
    }
}
