//! `fix`: makes every node of a mesh hold the same rows for the keys a check found, deciding
//! by causality metadata through the resolver, not by a "master" node.
//!
//! ```text
//!  each node: BEGIN (session: replica role, replication origin "repair")
//!  1. causal: every other node's row + row_version for the key ──▶ MeshBuffer::apply
//!             (the applier's own path: skip if dominated, apply if newer, merge if concurrent
//!              ─▶ synapse.conflicts with source "repair")
//!  2. re-read; still different = same version, different data (written outside the mesh):
//!     --prefer P re-stamps P's row as a new write of P (dominates every node's version) and
//!     it is applied everywhere like step 1; without --prefer the key is reported unresolved
//!  3. COMMIT everywhere (--dry-run: ROLLBACK after reading what would change)
//! ```
//!
//! Guarantees:
//! * **Nothing is lost silently**: a concurrent version that loses a column is logged in
//!   `synapse.conflicts` exactly like a conflict the applier resolves.
//! * **Replicated like any write**: the repair commits with origin `repair` (not an applier's
//!   `synapse_*`), so the node's capture streams it to the peers, which resolve it to a skip:
//!   they hold it already, or get it from the stream if this fix stopped midway.
//! * **Safe with concurrent writes**: each node resolves against its row as it is when locked
//!   (the applier's locking), so a write that lands during the fix is merged, not overwritten.
//! * **Per-node atomic, idempotent**: each node's repair is one transaction; a fix that fails
//!   on one node leaves the others repaired, and running it again finishes the job.

use crate::node::{Key, Node};
use crate::RepairError;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use synapse_apply::mesh::{read_stored, MeshBuffer, MeshTable, StoredRow};
use synapse_resolver::{NodeId, TablePolicy};
use tokio_postgres::Client;

/// The replication origin repairs commit with.
pub const REPAIR_ORIGIN: &str = "repair";

/// One mesh node taking part in a fix.
pub struct FixNode {
    pub node: Node,
    pub id: NodeId,
    /// A session in the replica role bound to origin `repair`, as appliers write.
    writer: Client,
}

impl FixNode {
    pub async fn connect(name: &str, id: NodeId, config: &synapse_postgres::PgConfig) -> Result<FixNode, RepairError> {
        let node = Node::connect(name, config).await?;
        let apply = |source| RepairError::Apply { node: name.to_owned(), source: Box::new(source) };
        let writer = synapse_apply::connect_target(config).await.map_err(apply)?;
        synapse_apply::replica_session(&writer, REPAIR_ORIGIN).await.map_err(apply)?;
        Ok(FixNode { node, id, writer })
    }

    fn apply_error(&self) -> impl FnOnce(synapse_apply::ApplyError) -> RepairError + '_ {
        move |source| RepairError::Apply { node: self.node.name.clone(), source: Box::new(source) }
    }
}

#[derive(Clone, Debug, Default)]
pub struct FixOptions {
    /// Read what would change, then roll back.
    pub dry_run: bool,
    /// The node whose rows win where nodes hold the same version with different data.
    pub prefer: Option<String>,
}

/// What a fix changed (or would change) on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeChanges {
    pub node: String,
    pub inserted: Vec<Key>,
    pub updated: Vec<Key>,
    pub deleted: Vec<Key>,
    /// Keys whose causality metadata alone changed (the rows already agreed).
    pub versions_only: Vec<Key>,
    /// Conflicts logged in `synapse.conflicts` by the resolution.
    pub conflicts: u64,
}

/// A key the fix could not make identical, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unresolved {
    pub key: Key,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FixReport {
    pub table: String,
    pub dry_run: bool,
    /// Keys the fix looked at.
    pub keys: usize,
    pub nodes: Vec<NodeChanges>,
    pub unresolved: Vec<Unresolved>,
}

/// Resolves `keys` of `info` across `nodes` (see the module docs). `policies` are the mesh's
/// column strategies, as the appliers use them.
pub async fn fix(
    nodes: &[FixNode],
    info: &MeshTable,
    policies: &HashMap<String, TablePolicy>,
    keys: &[Key],
    options: &FixOptions,
) -> Result<FixReport, RepairError> {
    let table = info.name();
    let prefer = match &options.prefer {
        None => None,
        Some(p) => Some(nodes.iter().position(|n| &n.node.name == p).ok_or_else(|| RepairError::Table {
            table: table.clone(),
            message: format!("--prefer {p} is not one of the nodes being fixed"),
        })?),
    };
    for n in nodes {
        n.writer.batch_execute("BEGIN").await.map_err(|source| RepairError::Node {
            node: n.node.name.clone(),
            context: "starting the repair transaction".into(),
            source,
        })?;
    }
    let outcome = fix_in_transactions(nodes, info, policies, keys, prefer).await;
    let end = match (&outcome, options.dry_run) {
        (Ok(_), false) => "COMMIT",
        _ => "ROLLBACK",
    };
    for n in nodes {
        let ended = n.writer.batch_execute(end).await;
        if let (Err(source), Ok(_)) = (ended, &outcome) {
            return Err(RepairError::Node {
                node: n.node.name.clone(),
                context: format!("{end} of the repair"),
                source,
            });
        }
    }
    let (changes, unresolved, buried) = outcome?;
    if !options.dry_run {
        // Rows buried by a unique-key collision are announced like the applier does: as a
        // delete of this node's, from a session without an applier's origin.
        for (n, b) in nodes.iter().zip(buried) {
            if b > 0 {
                synapse_apply::mesh::announce_burials(n.node.client(), n.id).await.map_err(n.apply_error())?;
            }
        }
    }
    if !options.dry_run {
        for c in &changes {
            let rows = (c.inserted.len() + c.updated.len() + c.deleted.len() + c.versions_only.len()) as u64;
            metrics::counter!("synapse_repair_rows_fixed_total", "table" => table.clone(), "node" => c.node.clone())
                .increment(rows);
            metrics::counter!("synapse_repair_conflicts_total", "table" => table.clone(), "node" => c.node.clone())
                .increment(c.conflicts);
        }
        metrics::gauge!("synapse_repair_unresolved_keys", "table" => table.clone()).set(unresolved.len() as f64);
    }
    Ok(FixReport { table, dry_run: options.dry_run, keys: keys.len(), nodes: changes, unresolved })
}

type Outcome = (Vec<NodeChanges>, Vec<Unresolved>, Vec<u64>);

async fn fix_in_transactions(
    nodes: &[FixNode],
    info: &MeshTable,
    policies: &HashMap<String, TablePolicy>,
    keys: &[Key],
    prefer: Option<usize>,
) -> Result<Outcome, RepairError> {
    let mut statements: Vec<HashMap<String, tokio_postgres::Statement>> =
        nodes.iter().map(|_| HashMap::new()).collect();
    let mut conflicts = vec![0u64; nodes.len()];
    let mut buried = vec![0u64; nodes.len()];
    let before = read_all(nodes, info, keys).await?;
    // 1. Every node resolves every other node's state of each key it holds differently.
    exchange(nodes, info, policies, &before, &mut statements, &mut conflicts, &mut buried, None).await?;
    let mut after = read_all(nodes, info, keys).await?;
    // 2. What causality could not decide: equal versions, different data.
    let stuck: Vec<&Key> = keys.iter().filter(|k| !rows_agree(&after, k)).collect();
    let mut unresolved = Vec::new();
    match prefer {
        Some(p) if !stuck.is_empty() => {
            let stuck: Vec<Key> = stuck.into_iter().cloned().collect();
            restamp(&nodes[p], info, &after[p], &stuck).await?;
            let restamped = read_all(&nodes[p..=p], info, &stuck).await?.remove(0);
            let mut only_p: Vec<BTreeMap<Key, StoredRow>> = nodes.iter().map(|_| BTreeMap::new()).collect();
            only_p[p] = restamped;
            exchange(nodes, info, policies, &only_p, &mut statements, &mut conflicts, &mut buried, Some(p)).await?;
            after = read_all(nodes, info, keys).await?;
            for k in keys.iter().filter(|k| !rows_agree(&after, k)) {
                unresolved.push(Unresolved {
                    key: k.clone(),
                    reason: format!("still differs after preferring {}", nodes[p].node.name),
                });
            }
        }
        _ => {
            for k in stuck {
                let holders: Vec<&str> = nodes
                    .iter()
                    .zip(&after)
                    .filter(|(_, s)| s.contains_key(k))
                    .map(|(n, _)| n.node.name.as_str())
                    .collect();
                unresolved.push(Unresolved {
                    key: k.clone(),
                    reason: format!(
                        "the same version with different data on {} (written outside the mesh, e.g. with triggers disabled): causality cannot decide; choose a node with --prefer",
                        holders.join(", ")
                    ),
                });
            }
        }
    }
    let changes = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| changes_of(&n.node.name, keys, &before[i], &after[i], conflicts[i]))
        .collect();
    Ok((changes, unresolved, buried))
}

/// Each node's rows and metadata of `keys`, read in its repair transaction.
async fn read_all(
    nodes: &[FixNode],
    info: &MeshTable,
    keys: &[Key],
) -> Result<Vec<BTreeMap<Key, StoredRow>>, RepairError> {
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes {
        out.push(read_stored(&n.writer, info, keys).await.map_err(n.apply_error())?);
    }
    Ok(out)
}

fn rows_agree(states: &[BTreeMap<Key, StoredRow>], key: &Key) -> bool {
    let rows: Vec<Option<&StoredRow>> = states.iter().map(|s| s.get(key).filter(|r| r.values.is_some())).collect();
    rows.windows(2).all(|w| w[0].map(|r| &r.values) == w[1].map(|r| &r.values))
}

/// Applies, on every node, the states `from` holds for keys where they differ from its own
/// (`only`: just that source node's).
#[allow(clippy::too_many_arguments)]
async fn exchange(
    nodes: &[FixNode],
    info: &MeshTable,
    policies: &HashMap<String, TablePolicy>,
    from: &[BTreeMap<Key, StoredRow>],
    statements: &mut [HashMap<String, tokio_postgres::Statement>],
    conflicts: &mut [u64],
    buried: &mut [u64],
    only: Option<usize>,
) -> Result<(), RepairError> {
    let tables = HashMap::from([(info.name(), info.clone())]);
    // Every key some node sends, once.
    let keys: Vec<Key> =
        from.iter().flat_map(|s| s.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for (y, target) in nodes.iter().enumerate() {
        let own = read_stored(&target.writer, info, &keys).await.map_err(target.apply_error())?;
        for (x, state) in from.iter().enumerate() {
            if x == y || only.is_some_and(|o| o != x) {
                continue;
            }
            let mut buffer = MeshBuffer::new(&tables);
            for (key, row) in state {
                if own.get(key) != Some(row) {
                    buffer.push_stored(info, key.clone(), row).map_err(target.apply_error())?;
                }
            }
            if buffer.is_empty() {
                continue;
            }
            let (_, c, b) = buffer
                .apply(&target.writer, &mut statements[y], REPAIR_ORIGIN, policies)
                .await
                .map_err(target.apply_error())?;
            conflicts[y] += c;
            buried[y] += b;
        }
    }
    Ok(())
}

/// Records a new local write of node `p` for each key: its version then covers every node's
/// (they all hold the same one here), so p's row — or p's absence of it — wins everywhere.
async fn restamp(
    p: &FixNode,
    info: &MeshTable,
    rows: &BTreeMap<Key, StoredRow>,
    keys: &[Key],
) -> Result<(), RepairError> {
    let columns: Vec<String> = info.columns.iter().map(|(c, _)| c.clone()).collect();
    for key in keys {
        let live = rows.get(key).is_some_and(|r| r.values.is_some());
        let pk = serde_json::to_string(key).unwrap_or_default();
        p.writer
            .execute(
                "SELECT synapse.record_local_write($1, $2::text::jsonb, $3, $4, $5, '{}', '{}', '{}', '{}', '{}')",
                &[&info.name(), &pk, &i32::from(p.id.0), &live, &columns],
            )
            .await
            .map_err(|source| RepairError::Node {
                node: p.node.name.clone(),
                context: format!("re-stamping {} {pk}", info.name()),
                source,
            })?;
    }
    Ok(())
}

fn changes_of(
    node: &str,
    keys: &[Key],
    before: &BTreeMap<Key, StoredRow>,
    after: &BTreeMap<Key, StoredRow>,
    conflicts: u64,
) -> NodeChanges {
    let mut c = NodeChanges { node: node.to_owned(), conflicts, ..NodeChanges::default() };
    for k in keys {
        let (b, a) = (before.get(k), after.get(k));
        let (bv, av) = (b.and_then(|r| r.values.as_ref()), a.and_then(|r| r.values.as_ref()));
        match (bv, av) {
            (None, Some(_)) => c.inserted.push(k.clone()),
            (Some(_), None) => c.deleted.push(k.clone()),
            (Some(x), Some(y)) if x != y => c.updated.push(k.clone()),
            _ if b.map(|r| &r.version) != a.map(|r| &r.version) => c.versions_only.push(k.clone()),
            _ => {}
        }
    }
    c
}
