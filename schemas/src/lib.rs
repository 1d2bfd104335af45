//! The SynapseDB change-event model.
//!
//! ```text
//!   capture ──LogRecord──▶ log ──LogRecord──▶ apply
//!                                  └────────▶ connectors ──CloudEvent JSON──▶ users
//! ```
//!
//! [`LogRecord`] is the internal unit that capture writes and every consumer reads. It keeps
//! column values exactly as PostgreSQL printed them (text format), so applying into another
//! PostgreSQL is lossless. [`cloudevent`] renders the public form: a CloudEvents 1.0 envelope whose
//! `data` is a Debezium-compatible change (`op`, `before`, `after`, `source`, `transaction`),
//! validated against `schemas/change-event.schema.json`.
//!
//! Ordering: every record of a source node has a [`Cursor`] `<commit_lsn>/<index>`; cursors order
//! transactions by commit and changes within a transaction by their position in it.

pub mod cloudevent;
mod lsn;
mod model;
pub mod trace;
pub mod types;

pub use lsn::{Cursor, Lsn, ParseCursorError};
pub use model::*;

/// The published JSON Schema of one change event (CloudEvents envelope + Debezium data).
pub const CHANGE_EVENT_SCHEMA: &str = include_str!("../change-event.schema.json");

/// Replication origins of changes SynapseDB applied start with this
/// (`synapse_<source node>@<target database>`): a capture can tell them from the node's own
/// writes.
pub const APPLIED_ORIGIN_PREFIX: &str = "synapse_";

/// The replication origin an applier of `source_node`'s changes into database `target_db`
/// runs under. Origins are shared by a cluster's databases and bind to one session at a time,
/// so two targets that are databases of one cluster need origins of their own.
pub fn applied_origin(source_node: &str, target_db: &str) -> String {
    format!("{APPLIED_ORIGIN_PREFIX}{source_node}@{target_db}")
}

/// Now, in the model's time unit: microseconds since the Unix epoch.
pub fn unix_micros_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
