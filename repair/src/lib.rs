//! Anti-entropy between replicas: find the rows two nodes hold differently in time
//! proportional to the difference, not to the table.
//!
//! ```text
//!  rows ──▶ bucket = top bits of hash(key) ──▶ bucket digest = wrapping Σ hash(row), count
//!            (hashes computed by each node)       (order-free; O(1) per change: −old +new)
//!  2^bits bucket digests ──▶ Merkle tree (merkle_light) ──▶ compare two trees top-down
//!                                                            ──▶ differing buckets only
//!  rows of differing buckets ──▶ compare by key ──▶ RowDiff (only left / only right / differ)
//! ```
//!
//! The core is pure (no I/O) and hash-agnostic: [`Buckets`] (digests that can be kept current
//! change by change), [`DigestTree`] and [`DigestTree::diff`], and [`diff_keyed`]. [`node`]
//! computes a node's digests inside PostgreSQL; [`check::check`] compares a table on two or more
//! nodes with a cut that tells changes in flight from drift; [`fix::fix`] resolves differing
//! keys of a mesh table through the applier's resolution path; [`one_way::fix_one_way`] makes
//! one-way targets hold their source's rows. Digests are kept current by triggers on each node
//! ([`node::Node::track`]), not from the change stream: pgoutput carries no old row values
//! without `REPLICA IDENTITY FULL`, and the digests must come from PostgreSQL's own hashes.
//!
//! Guarantees:
//! * **Exact**: every key whose row differs (present on one side only, or with any differing
//!   column, NULL distinct from every value) lies in a bucket `diff` reports, and
//!   [`diff_keyed`] over those buckets reports exactly the differing keys (property-tested
//!   against the set difference). False negatives need a hash collision.
//! * **Deterministic and order-free**: a bucket's digest depends only on the set of rows in it,
//!   so two nodes that read their rows in different orders (or maintain digests incrementally
//!   from the change stream) agree exactly when their rows agree.
//! * **Cost**: comparing two trees visits at most `2 × levels` nodes per differing bucket.

pub mod check;
pub mod fix;
pub mod node;
pub mod one_way;

use merkle_light::hash::Algorithm;
use merkle_light::merkle::MerkleTree;
use std::collections::BTreeMap;
use std::hash::Hasher;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

/// Bucket counts are powers of two from 2 (merkle_light needs two leaves) to 2^24.
pub const MIN_BITS: u8 = 1;
pub const MAX_BITS: u8 = 24;

/// Errors of the repair stage.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("node {node}: {context}")]
    Node {
        node: String,
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("table {table}: {message}")]
    Table { table: String, message: String },
    #[error("{bits} bucket bits is out of range: {MIN_BITS} to {MAX_BITS}")]
    Bits { bits: u8 },
    #[error("the two trees have {left} and {right} buckets: compare trees built with the same bucket count")]
    Mismatch { left: usize, right: usize },
    #[error("appliers did not pass the cut within {waited:?}: {}", behind.join("; "))]
    Cut { waited: std::time::Duration, behind: Vec<String> },
    #[error("node {node}: {source}")]
    Apply {
        node: String,
        #[source]
        source: Box<synapse_apply::ApplyError>,
    },
    /// The node's `synapse.*` tables could not be brought to this release's version.
    #[error("node {node}")]
    NodeSchema {
        node: String,
        #[source]
        source: synapse_postgres::node_schema::NodeSchemaError,
    },
}

/// Per bucket, the wrapping sum of its rows' 64-bit hashes and their count. Adding and removing
/// rows commute, so digests can be kept current change by change (an update removes the old
/// row's hash and adds the new one) and always equal a fresh scan of the same rows. The caller
/// supplies each row's bucket and hash (see [`node`]: computed by PostgreSQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buckets {
    bits: u8,
    sums: Vec<u64>,
    counts: Vec<u64>,
}

impl Buckets {
    pub fn new(bits: u8) -> Result<Buckets, RepairError> {
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(RepairError::Bits { bits });
        }
        let n = 1usize << bits;
        Ok(Buckets { bits, sums: vec![0; n], counts: vec![0; n] })
    }

    /// Digests computed elsewhere: per bucket, the wrapping sum of its row hashes and the count.
    pub fn from_sums(bits: u8, sums: Vec<u64>, counts: Vec<u64>) -> Result<Buckets, RepairError> {
        let mut b = Buckets::new(bits)?;
        if sums.len() != b.len() || counts.len() != b.len() {
            return Err(RepairError::Mismatch { left: b.len(), right: sums.len().max(counts.len()) });
        }
        (b.sums, b.counts) = (sums, counts);
        Ok(b)
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }

    pub fn len(&self) -> usize {
        self.sums.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|c| *c == 0)
    }

    /// The bucket of a key hash: its top `bits`, so buckets of a tree with fewer bits are
    /// unions of neighbouring buckets of one with more.
    pub fn bucket_of(&self, key_hash: u64) -> usize {
        (key_hash >> (64 - u32::from(self.bits))) as usize
    }

    pub fn add(&mut self, key_hash: u64, row_hash: u64) {
        let b = self.bucket_of(key_hash);
        self.sums[b] = self.sums[b].wrapping_add(row_hash);
        self.counts[b] = self.counts[b].wrapping_add(1);
    }

    pub fn remove(&mut self, key_hash: u64, row_hash: u64) {
        let b = self.bucket_of(key_hash);
        self.sums[b] = self.sums[b].wrapping_sub(row_hash);
        self.counts[b] = self.counts[b].wrapping_sub(1);
    }

    /// Sets bucket `b`'s (row count, hash sum), as a node read it.
    pub fn set(&mut self, b: usize, count: u64, sum: u64) {
        if let (Some(c), Some(s)) = (self.counts.get_mut(b), self.sums.get_mut(b)) {
            (*c, *s) = (count, sum);
        }
    }

    /// Bucket `b`'s (row count, hash sum).
    pub fn get(&self, b: usize) -> Option<(u64, u64)> {
        Some((*self.counts.get(b)?, *self.sums.get(b)?))
    }

    /// Rows counted over all buckets.
    pub fn rows(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.wrapping_add(*c))
    }

    /// Bucket `i`'s digest: 16 bytes over its sum and count.
    fn digest(&self, i: usize) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.sums[i].to_le_bytes());
        bytes[8..].copy_from_slice(&self.counts[i].to_le_bytes());
        xxh3_128(&bytes).to_le_bytes()
    }
}

/// xxh3-128 as merkle_light's node hash (leaves and interior nodes get its 0x00 / 0x01 prefix).
#[derive(Default)]
pub struct Xxh3Node(Xxh3);

impl Hasher for Xxh3Node {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        self.0.digest()
    }
}

impl Algorithm<[u8; 16]> for Xxh3Node {
    fn hash(&mut self) -> [u8; 16] {
        self.0.digest128().to_le_bytes()
    }
}

/// A Merkle tree over a fixed power-of-two set of bucket digests. merkle_light fits here
/// because the leaves are positional and fixed (bucket i is always leaf i); over rows it would
/// not (one deleted row shifts every later leaf), and it panics under two leaves, which
/// [`Buckets::new`] rules out.
pub struct DigestTree {
    tree: MerkleTree<[u8; 16], Xxh3Node>,
    leaves: usize,
}

impl DigestTree {
    pub fn build(buckets: &Buckets) -> DigestTree {
        let tree = MerkleTree::new((0..buckets.len()).map(|i| buckets.digest(i)));
        DigestTree { tree, leaves: buckets.len() }
    }

    pub fn root(&self) -> [u8; 16] {
        self.tree.root()
    }

    /// Node `i` of `level` (0 = leaves). merkle_light stores level after level, leaves first;
    /// with a power-of-two leaf count no level is padded.
    fn node(&self, level: u32, i: usize) -> &[u8; 16] {
        let mut offset = 0;
        let mut width = self.leaves;
        for _ in 0..level {
            offset += width;
            width /= 2;
        }
        &self.tree[offset + i]
    }

    /// The buckets whose digests differ, found top-down: a subtree with equal hashes is not
    /// entered. Returns them in order with the number of node pairs compared.
    pub fn diff(&self, other: &DigestTree) -> Result<(Vec<usize>, usize), RepairError> {
        if self.leaves != other.leaves {
            return Err(RepairError::Mismatch { left: self.leaves, right: other.leaves });
        }
        let top = self.leaves.trailing_zeros();
        let mut frontier = vec![0usize];
        let mut compared = 0;
        for level in (0..=top).rev() {
            let mut next = Vec::new();
            for i in frontier {
                compared += 1;
                if self.node(level, i) != other.node(level, i) {
                    next.push(i);
                }
            }
            if level == 0 {
                return Ok((next, compared));
            }
            frontier = next.iter().flat_map(|i| [2 * i, 2 * i + 1]).collect();
        }
        Ok((Vec::new(), compared))
    }
}

/// How two nodes' rows of some buckets differ, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RowDiff {
    pub only_left: Vec<Vec<String>>,
    pub only_right: Vec<Vec<String>>,
    /// Present on both with some column different.
    pub differ: Vec<Vec<String>>,
}

impl RowDiff {
    pub fn len(&self) -> usize {
        self.only_left.len() + self.only_right.len() + self.differ.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Compares two nodes' rows of the same buckets, each given as (key, row hash or text), by
/// key. Keys are reported in key order.
pub fn diff_keyed(left: &[(String, String)], right: &[(String, String)]) -> RowDiff {
    let l: BTreeMap<&str, &str> = left.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r: BTreeMap<&str, &str> = right.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut out = RowDiff::default();
    for (k, v) in &l {
        match r.get(k) {
            None => out.only_left.push(vec![(*k).to_owned()]),
            Some(w) if w != v => out.differ.push(vec![(*k).to_owned()]),
            Some(_) => {}
        }
    }
    out.only_right = r.keys().filter(|k| !l.contains_key(*k)).map(|k| vec![(*k).to_owned()]).collect();
    out
}

impl synapse_error::Classify for RepairError {
    fn code(&self) -> &'static str {
        match self {
            RepairError::Node { .. } => "REP003",
            RepairError::Table { .. } => "REP004",
            RepairError::Bits { .. } => "REP001",
            RepairError::Mismatch { .. } => "REP002",
            RepairError::Cut { .. } => "REP005",
            RepairError::Apply { .. } => "REP006",
            RepairError::NodeSchema { .. } => "REP008",
        }
    }

    /// A node that cannot be reached (or went away mid-check) may be back later; nothing was
    /// changed, so the check can simply run again. Everything else comes from the request.
    fn is_transient(&self) -> bool {
        match self {
            RepairError::Node { source, .. } => synapse_postgres::is_transient(source),
            RepairError::Cut { .. } => true,
            RepairError::Apply { source, .. } => source.is_transient(),
            RepairError::NodeSchema { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            RepairError::Node { source, .. } if synapse_postgres::tls::is_tls_refusal(source) => synapse_postgres::tls::HINT,
            RepairError::Node { .. } => "check the node is up and reachable with this URL; nothing was changed",
            RepairError::Table { .. } => "the table must exist with a primary key on every node compared",
            RepairError::Bits { .. } => "choose about one bucket per 16–64 rows, e.g. 16 bits for 1M rows",
            RepairError::Mismatch { .. } => "build both nodes' digests with the same bits",
            RepairError::Cut { .. } => {
                "changes in flight cannot be told from drift until the appliers catch up: is synapse running for these nodes (see `synapse status`)? Retry, raise --cut-timeout, or pass --no-wait to compare as is"
            }
            RepairError::Apply { .. } => {
                "the node's repair transaction was rolled back (other nodes may be repaired already); run the fix again"
            }
            RepairError::NodeSchema { source, .. } => source.hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use synapse_error::Classify;
    use xxhash_rust::xxh3::xxh3_64;

    /// A table: key → (a, b) with b possibly NULL.
    type Table = BTreeMap<i64, (i64, Option<String>)>;

    /// What a node does, in miniature: a key hash and a row hash over unambiguous bytes.
    fn hashes(k: i64, a: i64, b: &Option<String>) -> (u64, u64) {
        let row = format!("{k}|{a}|{}", b.as_deref().map_or("N".to_owned(), |s| format!("S{s}")));
        (xxh3_64(k.to_string().as_bytes()), xxh3_64(row.as_bytes()))
    }

    fn buckets(bits: u8, t: &Table) -> Buckets {
        let mut b = Buckets::new(bits).unwrap();
        for (k, (a, s)) in t {
            let (kh, rh) = hashes(*k, *a, s);
            b.add(kh, rh);
        }
        b
    }

    /// What a check reports: differing buckets from the trees, then rows of those buckets.
    fn check(bits: u8, left: &Table, right: &Table) -> (RowDiff, usize) {
        let (bl, br) = (buckets(bits, left), buckets(bits, right));
        let (diff, compared) = DigestTree::build(&bl).diff(&DigestTree::build(&br)).unwrap();
        let fetched = |t: &Table| -> Vec<(String, String)> {
            t.iter()
                .map(|(k, (a, s))| (k, hashes(*k, *a, s)))
                .filter(|(_, (kh, _))| diff.contains(&bl.bucket_of(*kh)))
                .map(|(k, (_, rh))| (k.to_string(), rh.to_string()))
                .collect()
        };
        (diff_keyed(&fetched(left), &fetched(right)), compared)
    }

    fn table() -> impl Strategy<Value = Table> {
        proptest::collection::btree_map(0i64..400, (0i64..5, proptest::option::of("[ab]{0,2}")), 0..200)
    }

    proptest! {
        /// The reported keys are exactly the set difference, for any tables and bucket count.
        #[test]
        fn reported_difference_is_the_set_difference(left in table(), right in table(), bits in 1u8..9) {
            let (d, _) = check(bits, &left, &right);
            let lk: BTreeSet<i64> = left.keys().copied().collect();
            let rk: BTreeSet<i64> = right.keys().copied().collect();
            let keys = |v: &[Vec<String>]| -> BTreeSet<i64> { v.iter().map(|k| k[0].parse().unwrap()).collect() };
            prop_assert_eq!(keys(&d.only_left), &lk - &rk);
            prop_assert_eq!(keys(&d.only_right), &rk - &lk);
            let differ: BTreeSet<i64> = lk.intersection(&rk).filter(|k| left[k] != right[k]).copied().collect();
            prop_assert_eq!(keys(&d.differ), differ);
        }

        /// Digests kept current change by change equal a fresh scan, whatever the order.
        #[test]
        fn incremental_digests_equal_a_scan(start in table(), changes in proptest::collection::vec((0i64..400, proptest::option::of((0i64..5, proptest::option::of("[ab]{0,2}")))), 0..100)) {
            let mut t = start.clone();
            let mut b = buckets(6, &start);
            for (k, new) in changes {
                if let Some((a, s)) = t.remove(&k) {
                    let (kh, rh) = hashes(k, a, &s);
                    b.remove(kh, rh);
                }
                if let Some((a, s)) = new {
                    let (kh, rh) = hashes(k, a, &s);
                    b.add(kh, rh);
                    t.insert(k, (a, s));
                }
            }
            prop_assert_eq!(b, buckets(6, &t));
        }
    }

    #[test]
    fn cost_follows_the_difference_not_the_table() {
        let left: Table = (0..20_000).map(|k| (k, (k % 7, Some(format!("v{k}"))))).collect();
        let mut right = left.clone();
        right.insert(5, (99, None));
        right.remove(&6000);
        let (d, compared) = check(12, &left, &right);
        assert_eq!((d.differ, d.only_left), (vec![vec!["5".to_string()]], vec![vec!["6000".to_string()]]));
        // Two paths of 13 levels, at most two node pairs per level each.
        assert!(compared <= 2 * 2 * 13, "{compared} node pairs compared");
        let (same, compared) = check(12, &left, &left);
        assert!(same.is_empty() && compared == 1, "equal roots end the walk");
    }

    #[test]
    fn bad_requests_are_errors() {
        assert_eq!(Buckets::new(0).unwrap_err().code(), "REP001");
        assert_eq!(Buckets::new(25).unwrap_err().to_string(), "25 bucket bits is out of range: 1 to 24");
        assert_eq!(Buckets::from_sums(2, vec![0; 4], vec![0; 3]).unwrap_err().code(), "REP002");
        let (a, b) = (Buckets::new(2).unwrap(), Buckets::new(3).unwrap());
        let e = DigestTree::build(&a).diff(&DigestTree::build(&b)).err().unwrap();
        assert_eq!(e.code(), "REP002");
    }
}
