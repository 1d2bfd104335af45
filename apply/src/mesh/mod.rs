//! Multi-writer apply: every node of a mesh writes the same tables; changes arriving from a
//! peer are resolved against the local row with [`synapse_resolver::resolve`] instead of being
//! written blindly.
//!
//! ```text
//!  local write ──▶ AFTER ROW trigger ──▶ synapse.row_version (same transaction)
//!                                          vv[me] += 1, per-row HLC, per-column (HLC, node),
//!                                          counter totals per node, tombstone values
//!  peer's log ──▶ row change + its row_version change ──▶ resolve(local, remote)
//!                   skip (dominated) · apply (dominates) · merge (concurrent → synapse.conflicts)
//! ```
//!
//! Causality lives in `synapse.row_version`, keyed by (table, primary key as a JSON array of
//! the key columns' text): vacuum and freeze cannot erase it, unlike commit timestamps or
//! `xmin` that other Postgres multi-master systems rely on. Local writes maintain it from a
//! trigger (SQL cannot produce the `crdts` crate's bytes, so counter state is kept as per-node
//! totals `{"<node>": [p, n]}` and converted by [`Counter::from_contributions`]); the applier,
//! which runs as `session_replication_role = replica` so no trigger fires for it, writes the
//! resolved version itself, in the same target transaction as the row and the position.
//!
//! Guarantees, given every node runs the trigger on every mesh table:
//! * **Convergence**: a key's final state depends only on the set of versions delivered, not on
//!   their order or duplication (the resolver's merge is a join; property-tested and model
//!   checked in `synapse-resolver`).
//! * **No silent loss**: a concurrent version that loses a column is recorded in
//!   `synapse.conflicts` with both versions, their clocks and the result.
//! * **Concurrency with local writes**: the applier locks the key's `row_version` row (creating a
//!   placeholder if needed) before reading the local row, so a local transaction on the same key
//!   either committed before (and is resolved against) or waits and then builds on the result.
//!
//! Files: `install` (node objects, triggers), `join` (a node joining from a donor's snapshot), `describe` (a table's shape), `stored` (the
//! version codec), `buffer` (a transaction's peer changes, resolved at flush), `unique`
//! (unique-key collisions), `writes` (local rows read, resolved rows written).

mod buffer;
mod describe;
mod install;
pub mod join;
mod stored;
#[cfg(test)]
mod tests;
mod unique;
mod writes;

pub use buffer::*;
pub use describe::*;
pub use install::*;
pub use stored::*;
use unique::*;
use writes::*;

use crate::batch::prepared;
use crate::ApplyError;
use serde_json::{json, Map, Value as Json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use synapse_postgres::quote;
use synapse_resolver::column::{Counter, Dots, MultiValue, OrSet};
use synapse_resolver::{
    resolve, unique_key_winner, Cell, Decision, Hlc, NodeId, RowVersion, Stamp, Strategy, TablePolicy, VersionVector,
};
use synapse_schemas::{Op, Relation, RowChange, Tuple, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

/// The causality sidecar: `schema.table` of the table the mesh capture publishes with the data.
pub const ROW_VERSION_SCHEMA: &str = "synapse";
pub const ROW_VERSION_TABLE: &str = "row_version";
