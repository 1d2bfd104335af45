//! What the two model checks share: one row written by three nodes, its canonical bytes (for
//! state hashing) and what converged nodes must agree on.
#![allow(clippy::unwrap_used, dead_code)]

use serde_json::json;
use std::collections::BTreeMap;
use synapse_resolver::column::Counter;
use synapse_resolver::{Cell, Hlc, NodeId, RowVersion, Stamp, Strategy, TablePolicy, VersionVector};

pub const NODES: usize = 3;

/// The row's policy: `name` last-writer-wins, `hits` a counter.
pub fn policy() -> TablePolicy {
    TablePolicy { columns: [("hits".to_string(), Strategy::Counter)].into(), ..Default::default() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Write {
    SetName(u8),
    Increment,
    Delete,
}

impl Write {
    /// The writes node `n` may make (the name it sets names the writer).
    pub fn choices(n: usize) -> [Write; 3] {
        [Write::SetName(n as u8), Write::Increment, Write::Delete]
    }
}

/// A local write on node `n`, as the `synapse_local_write` trigger records it: the node's HLC
/// moves past its last reading and the row's, its own version-vector entry goes up by one.
/// Returns the new version; `clock` is the node's HLC wall reading (a logical clock is enough:
/// HLC only orders concurrent writes).
pub fn local_write(current: Option<&RowVersion>, n: usize, clock: &mut u64, w: Write) -> RowVersion {
    let node = NodeId(n as u16);
    let seen = current.map_or(0, |r| r.stamp.hlc.wall_ms);
    *clock = (*clock).max(seen) + 1;
    let hlc = Hlc { wall_ms: *clock, logical: 0 };
    let mut row = current.cloned().unwrap_or(RowVersion {
        stamp: Stamp { vv: VersionVector::new(), hlc, node },
        live: true,
        cells: BTreeMap::new(),
    });
    row.stamp.vv.increment(node);
    row.stamp.hlc = hlc;
    row.stamp.node = node;
    match w {
        Write::SetName(v) => {
            row.live = true;
            row.cells.insert("name".into(), Cell::Value { value: json!(v), at: (hlc, node) });
        }
        Write::Increment => {
            row.live = true;
            let mut c = match row.cells.remove("hits") {
                Some(Cell::Counter(c)) => c,
                _ => Counter::default(),
            };
            let cur = c.value();
            c.local_write(node, cur, cur + 1);
            row.cells.insert("hits".into(), Cell::Counter(c));
        }
        Write::Delete => row.live = false,
    }
    row
}

/// Canonical bytes of a row version: lww values and counters encode deterministically.
pub fn encode(r: &RowVersion) -> Vec<u8> {
    let mut out = postcard::to_allocvec(&(&r.stamp, r.live)).unwrap();
    for (k, c) in &r.cells {
        out.extend(k.as_bytes());
        out.extend(c.encode());
    }
    out
}

/// Existence, causal history and visible values: what converged nodes must agree on.
pub type View = Option<(bool, Vec<(NodeId, u64)>, BTreeMap<String, String>)>;

pub fn view(r: &Option<RowVersion>) -> View {
    r.as_ref().map(|r| {
        (
            r.live,
            r.stamp.vv.iter().collect(),
            r.cells.iter().map(|(k, c)| (k.clone(), c.visible().to_string())).collect(),
        )
    })
}

pub fn counter_value(r: &Option<RowVersion>) -> i64 {
    match r.as_ref().and_then(|r| r.cells.get("hits")) {
        Some(Cell::Counter(c)) => c.value(),
        _ => 0,
    }
}
