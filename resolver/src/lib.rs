//! Conflict detection and resolution for multi-writer replication. Pure and deterministic: no
//! I/O, no clock reads (callers pass physical time in), the same inputs give the same outputs
//! on every node.
//!
//! ```text
//!  local row version ─┐
//!                     ├─▶ compare version vectors ─▶ dominated: skip · dominates: apply
//!  remote row version ┘                           └─▶ concurrent: merge column by column
//!                                                       (lww by HLC+node, counter, set,
//!                                                        multi-value, max, min)
//! ```
//!
//! * [`clock`]: node ids and hybrid logical clocks (only arbitrate concurrent writes).
//! * [`vv`]: version vectors and row [`Stamp`]s (decide causality).
//! * [`column`](mod@column): per-column strategies and their CRDT states; every merge is commutative,
//!   associative and idempotent (property-tested over states replication can produce).
//! * [`row`]: [`resolve`] — the boundary the applier calls for each incoming row version.
//!
//! Contract of [`resolve`]: deterministic (no I/O, no clock, no randomness); duplicates and
//! dominated versions are skipped (idempotent delivery); concurrent versions merge to the same
//! row whatever the order they arrive in (commutative, associative, idempotent merges).

pub mod clock;
pub mod column;
pub mod row;
pub mod vv;

pub use clock::{ClockSkew, Hlc, HlcClock, NodeId};
pub use column::{merge_cells, Cell, Strategy};
pub use row::{merge_rows, resolve, unique_key_winner, Decision, RowVersion, TablePolicy};
pub use vv::{Causality, Stamp, VersionVector};

/// Errors of the resolver: only stored states that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("stored cell cannot be decoded")]
    Decode(#[source] postcard::Error),
    #[error("stored cell format {found} is not supported (this build reads {supported})")]
    Format { found: u8, supported: u8 },
}

impl synapse_error::Classify for ResolverError {
    fn code(&self) -> &'static str {
        match self {
            ResolverError::Decode(_) => "RES001",
            ResolverError::Format { .. } => "RES002",
        }
    }

    /// Never transient: the stored bytes will not change by retrying.
    fn is_transient(&self) -> bool {
        false
    }

    fn hint(&self) -> &'static str {
        match self {
            ResolverError::Decode(_) => "the row's conflict metadata is damaged: run `synapse repair` on the table",
            ResolverError::Format { .. } => "the state was written by a newer synapse: upgrade this node",
        }
    }
}
