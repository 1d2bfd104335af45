//! Shard sets: one target made of several PostgreSQL shards, each row in the shard its table's
//! rule names (docs/decisions/0017-shard-routing.md).
//!
//! ```text
//!                    ┌─ Applier(shard -80, filter) ──▶ shard -80   synapse.applied: its own position
//!  the source's log ─┤
//!                    └─ Applier(shard 80-, filter) ──▶ shard 80-   synapse.applied: its own position
//! ```
//!
//! [`ShardAssignment`] is the boundary type: given to an [`crate::Applier`], it makes that
//! applier the writer of one shard. Its guarantees:
//! * **Placement**: a row of a hash-sharded table is on the shard whose key range holds its
//!   keyspace id (PostgreSQL's `hashtextextended(key::text, 0)`, see [`keyspace_id`]); a row of
//!   a range-sharded table on the shard its value range names; a table without a rule (a
//!   reference table) on every shard. The same expressions filter the initial copy in SQL, so
//!   an operator can check any shard with them.
//! * **Moves**: an update that changes a row's shard key across shards is a delete on the old
//!   shard and an insert of the whole new row on the new one. The new shard needs every value:
//!   one PostgreSQL did not send (an unchanged TOASTed column) stops that shard's applier with
//!   `APP010` unless the table has `REPLICA IDENTITY FULL`.
//! * **Exactly once per shard**: each shard's applier reads the whole log (as Vitess's
//!   per-shard VReplication streams do), keeps what its shard owns, and commits its own
//!   position with its rows. Shards apply in parallel, and no change costs a round trip to a
//!   shard that does not own it.
//! * **Never silent**: a shard key that PostgreSQL does not log with deletes (not part of the
//!   replica identity) or a type the rule cannot order is refused at the table's first change
//!   (`APP010`, naming the table and the fix), not guessed.

pub mod pg_hash;

use crate::ApplyError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use synapse_postgres::quote;
use synapse_schemas::{Datum, OldValues, Op, Relation, ReplicaIdentity, RowChange, Value};

/// Flips the sign bit: keyspace ids then order as the server's signed `int8` hashes do, so a
/// key range is one interval in SQL too.
const SIGN: u64 = 1 << 63;

/// A row's keyspace id: PostgreSQL's `hashtextextended(key::text, 0)` with its sign bit flipped
/// (`i64::MIN` → 0). A NULL key has id 0.
pub fn keyspace_id(key: Option<&str>) -> u64 {
    key.map_or(0, |k| pg_hash::hash_bytes_extended(k.as_bytes(), 0) ^ SIGN)
}

/// Keyspace ids `[start, end)`, written as Vitess names shards: hex prefixes of the 64-bit id,
/// `-80` (the lower half), `80-`, `40-80`, and `-` (everything).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRange {
    pub start: u64,
    /// `None`: to the top of the space.
    pub end: Option<u64>,
}

impl KeyRange {
    pub const FULL: KeyRange = KeyRange { start: 0, end: None };

    pub fn contains(&self, id: u64) -> bool {
        id >= self.start && self.end.is_none_or(|e| id < e)
    }

    /// A predicate on `hash_expr` (a signed `int8` hash as [`keyspace_id`] computes it) that
    /// holds for the rows of this range; NULL keys (id 0) belong to the range starting at 0.
    pub fn sql(&self, hash_expr: &str) -> String {
        let mut parts = Vec::new();
        if self.start > 0 {
            parts.push(format!("{hash_expr} >= {}", (self.start ^ SIGN) as i64));
        }
        if let Some(end) = self.end {
            parts.push(format!("{hash_expr} < {}", (end ^ SIGN) as i64));
        }
        match (parts.is_empty(), self.start == 0) {
            (true, _) => "true".into(),
            (false, true) => format!("({hash_expr} IS NULL OR {})", parts.join(" AND ")),
            (false, false) => parts.join(" AND "),
        }
    }
}

impl std::str::FromStr for KeyRange {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyRange, String> {
        let bad = || {
            format!(
                "key range {s:?}: write it as Vitess names shards: hex prefixes `-80`, `80-`, `40-80`, or `-` for all"
            )
        };
        let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
        let prefix = |p: &str| -> Result<Option<u64>, String> {
            if p.is_empty() {
                return Ok(None);
            }
            if p.len() > 16 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            // A prefix: `8` and `80` both mean 0x8000…; pad on the right.
            let padded = format!("{p:0<16}");
            u64::from_str_radix(&padded, 16).map(Some).map_err(|_| bad())
        };
        let start = prefix(lo)?.unwrap_or(0);
        let end = prefix(hi)?;
        if end.is_some_and(|e| e <= start) {
            return Err(format!("key range {s:?} is empty: its end must be above its start"));
        }
        Ok(KeyRange { start, end })
    }
}

impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The shortest prefix that names the bound: 0x8000… is `80`.
        let hex = |v: u64| {
            let s = format!("{v:016x}");
            let t = s.trim_end_matches('0');
            let keep = t.len().max(2).div_ceil(2) * 2;
            s[..keep.min(16)].to_owned()
        };
        let lo = if self.start == 0 { String::new() } else { hex(self.start) };
        let hi = self.end.map(hex).unwrap_or_default();
        write!(f, "{lo}-{hi}")
    }
}

/// A bound of a value range: an integer for integer columns, a string for text and uuid
/// columns (compared byte-wise, as `COLLATE "C"` does).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
pub enum Bound {
    Int(i64),
    Text(String),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Int(i) => write!(f, "{i}"),
            Bound::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// One shard's slice of a range-sharded table: values `[from, to)`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRange {
    pub shard: String,
    /// Absent: from the lowest value (and NULL).
    #[serde(default)]
    pub from: Option<Bound>,
    /// Absent: to the highest value.
    #[serde(default)]
    pub to: Option<Bound>,
}

/// How one table is split across a shard set (`targets[].sharding.<schema.table>`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    /// Hash sharding on this column: a row goes to the shard whose `key_range` holds its
    /// keyspace id.
    #[serde(default)]
    pub hash: Option<String>,
    /// Range sharding on this column, over `ranges`.
    #[serde(default)]
    pub range: Option<String>,
    #[serde(default)]
    pub ranges: Vec<ValueRange>,
}

/// Types a shard key may have: their text form is the same from pgoutput and from `::text`,
/// whatever the session's settings (unlike timestamps or floats).
const HASHABLE: &[u32] = &[20, 21, 23, 25, 1043, 2950, 1700];
const INTEGER: &[u32] = &[20, 21, 23];
const TEXTUAL: &[u32] = &[25, 1043, 2950];

impl TableRule {
    fn column(&self) -> Option<&str> {
        self.hash.as_deref().or(self.range.as_deref())
    }

    /// Every problem of this rule in a set with `shards`, as `field: message` lines.
    pub fn problems(&self, table: &str, shards: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        let at = format!("sharding.{table}");
        if table.split('.').count() != 2 {
            out.push(format!("{at}: name the table as schema.table"));
        }
        match (&self.hash, &self.range) {
            (Some(_), Some(_)) | (None, None) => {
                out.push(format!("{at}: give one of `hash: <column>` or `range: <column>` (with `ranges:`)"))
            }
            (Some(_), None) if !self.ranges.is_empty() => {
                out.push(format!("{at}.ranges: only a range rule has ranges; a hash rule uses the shards' key_range"))
            }
            (None, Some(_)) => out.extend(self.range_problems(&at, shards)),
            _ => {}
        }
        out
    }

    fn range_problems(&self, at: &str, shards: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        if self.ranges.is_empty() {
            return vec![format!(
                "{at}.ranges: a range rule needs ranges, e.g. [{{shard: a, to: 1000}}, {{shard: b, from: 1000}}]"
            )];
        }
        for (i, r) in self.ranges.iter().enumerate() {
            if !shards.contains(&r.shard.as_str()) {
                out.push(format!(
                    "{at}.ranges[{i}].shard: {:?} is not a shard of this target ({})",
                    r.shard,
                    shards.join(", ")
                ));
            }
            if let (Some(a), Some(b)) = (&r.from, &r.to) {
                if std::mem::discriminant(a) != std::mem::discriminant(b) {
                    out.push(format!("{at}.ranges[{i}]: from and to must both be numbers or both strings"));
                } else if a >= b {
                    out.push(format!("{at}.ranges[{i}]: from ({a}) must be below to ({b})"));
                }
            }
        }
        // Contiguous, in order, from the lowest value to the highest: every value has a shard.
        if self.ranges.first().is_some_and(|r| r.from.is_some()) {
            out.push(format!("{at}.ranges[0]: the first range starts at the lowest value: leave out `from`"));
        }
        if self.ranges.last().is_some_and(|r| r.to.is_some()) {
            out.push(format!(
                "{at}.ranges[{}]: the last range runs to the highest value: leave out `to`",
                self.ranges.len() - 1
            ));
        }
        for (i, w) in self.ranges.windows(2).enumerate() {
            if w[0].to.is_none() || w[0].to != w[1].from {
                out.push(format!(
                    "{at}.ranges[{}]: must start where ranges[{i}] ends ({}), so that no value is left without a shard",
                    i + 1,
                    w[0].to.as_ref().map(ToString::to_string).unwrap_or_else(|| "the top".into())
                ));
            }
        }
        out
    }
}

/// Problems of a shard set's key ranges: together they must cover every keyspace id once.
pub fn key_range_problems(shards: &[(&str, KeyRange)]) -> Vec<String> {
    let mut sorted: Vec<_> = shards.to_vec();
    sorted.sort_by_key(|(_, r)| *r);
    let mut out = Vec::new();
    let mut next = Some(0u64);
    for (name, r) in &sorted {
        match next {
            Some(n) if r.start == n => {}
            Some(n) if r.start > n => out.push(format!(
                "shards: no shard holds keyspace ids {} (just before shard {name:?})",
                KeyRange { start: n, end: Some(r.start) }
            )),
            _ => out.push(format!("shards: shard {name:?} ({r}) overlaps the shard before it")),
        }
        next = r.end;
    }
    if let Some(n) = next {
        out.push(format!("shards: no shard holds keyspace ids {}", KeyRange { start: n, end: None }));
    }
    out
}

/// Makes an applier the writer of one shard of a set. See the module docs.
#[derive(Clone, Debug)]
pub struct ShardAssignment {
    /// The shard set (the target's name).
    pub set: String,
    /// This shard's name.
    pub shard: String,
    /// The keyspace ids this shard holds for hash-sharded tables.
    pub key_range: KeyRange,
    /// `schema.table` → rule; tables without one are reference tables (on every shard).
    pub rules: Arc<BTreeMap<String, TableRule>>,
}

/// Where one table's rows go, for this shard, resolved against the table's columns.
#[derive(Clone, Debug)]
pub(crate) enum Route {
    /// A reference table: every row.
    Everything,
    Hash {
        column: usize,
        range: KeyRange,
    },
    Range {
        column: usize,
        integer: bool,
        mine: Vec<(Option<Bound>, Option<Bound>)>,
    },
}

impl ShardAssignment {
    fn refuse(&self, rel: &Relation, message: String) -> ApplyError {
        ApplyError::Shard { table: rel.name(), shard: format!("{}/{}", self.set, self.shard), message }
    }

    /// Resolves the table's rule against its columns; refuses a shard key the stream cannot
    /// route (not logged with deletes, or of a type whose text form is not canonical).
    pub(crate) fn route(&self, rel: &Relation) -> Result<Route, ApplyError> {
        let Some(rule) = self.rules.get(&rel.name()) else { return Ok(Route::Everything) };
        let Some(name) = rule.column() else { return Ok(Route::Everything) };
        let Some((column, col)) = rel.columns.iter().enumerate().find(|(_, c)| c.name == name) else {
            return Err(self.refuse(rel, format!("the table has no column {name:?} (its shard key)")));
        };
        if !col.is_key && rel.replica_identity != ReplicaIdentity::Full {
            return Err(self.refuse(
                rel,
                format!(
                    "shard key {name:?} is not part of the replica identity, so PostgreSQL does not log it with \
                     deletes and key changes; make it part of the primary key, or ALTER TABLE {} REPLICA IDENTITY FULL",
                    rel.quoted_name()
                ),
            ));
        }
        let ty = col.base_type_oid;
        if rule.hash.is_some() {
            if !HASHABLE.contains(&ty) {
                return Err(self.refuse(
                    rel,
                    format!(
                        "shard key {name:?} is {}: hash sharding takes integer, numeric, text, varchar or uuid keys",
                        col.type_name
                    ),
                ));
            }
            return Ok(Route::Hash { column, range: self.key_range });
        }
        let integer = INTEGER.contains(&ty);
        if !integer && !TEXTUAL.contains(&ty) {
            return Err(self.refuse(
                rel,
                format!(
                    "shard key {name:?} is {}: range sharding takes integer, text, varchar or uuid keys",
                    col.type_name
                ),
            ));
        }
        let wrong_kind =
            rule.ranges.iter().flat_map(|r| [&r.from, &r.to]).flatten().any(|b| matches!(b, Bound::Int(_)) != integer);
        if wrong_kind {
            return Err(self.refuse(
                rel,
                format!(
                    "the ranges of shard key {name:?} ({}) must be {}",
                    col.type_name,
                    if integer { "numbers" } else { "strings" }
                ),
            ));
        }
        let mine =
            rule.ranges.iter().filter(|r| r.shard == self.shard).map(|r| (r.from.clone(), r.to.clone())).collect();
        Ok(Route::Range { column, integer, mine })
    }

    /// The rows of `rel` this shard holds, as a predicate for `SELECT … WHERE`: what an initial
    /// copy reads from the source. `None`: every row.
    pub fn copy_filter(&self, rel: &Relation) -> Result<Option<String>, ApplyError> {
        self.route(rel)?;
        Ok(self.rows_sql(&rel.name()))
    }

    /// The rows of table `name` (`schema.table`) this shard holds, as a predicate on its
    /// columns (`None`: every row, a reference table): what a copy or a repair reads of the
    /// source for this shard. The column's type is not checked here ([`Self::copy_filter`]
    /// does): a range rule compares as its bounds are, numbers or text.
    pub fn rows_sql(&self, name: &str) -> Option<String> {
        let rule = self.rules.get(name)?;
        let col = quote::ident(rule.column()?);
        if rule.hash.is_some() {
            return Some(self.key_range.sql(&format!("hashtextextended(({col})::text, 0)")));
        }
        let integer = rule.ranges.iter().flat_map(|r| [&r.from, &r.to]).flatten().all(|b| matches!(b, Bound::Int(_)));
        let expr = if integer { col.clone() } else { format!("({col})::text COLLATE \"C\"") };
        let lit = |b: &Bound| match b {
            Bound::Int(i) => i.to_string(),
            Bound::Text(s) => quote::literal(s),
        };
        let parts: Vec<String> = rule
            .ranges
            .iter()
            .filter(|r| r.shard == self.shard)
            .map(|r| {
                let mut p = Vec::new();
                if let Some(f) = &r.from {
                    p.push(format!("{expr} >= {}", lit(f)));
                }
                if let Some(t) = &r.to {
                    p.push(format!("{expr} < {}", lit(t)));
                }
                match (p.is_empty(), r.from.is_none()) {
                    (true, _) => "true".to_owned(),
                    (false, true) => format!("({col} IS NULL OR {})", p.join(" AND ")),
                    (false, false) => format!("({})", p.join(" AND ")),
                }
            })
            .collect();
        Some(if parts.is_empty() { "false".into() } else { parts.join(" OR ") })
    }

    /// What this shard applies of `change` (whose table routes by `route`): the change itself,
    /// a delete (the row left this shard), an insert (it arrived), or nothing.
    pub(crate) fn route_change(
        &self,
        route: &Route,
        rel: &Relation,
        offset: u64,
        change: RowChange,
    ) -> Result<Option<RowChange>, ApplyError> {
        let owns = |v: Option<Value<'_>>| -> Option<bool> {
            match v {
                None | Some(Value::UnchangedToast) => None,
                Some(v) => Some(route.owns(v.as_text())),
            }
        };
        if matches!(route, Route::Everything) {
            return Ok(Some(change));
        }
        let column = route.column();
        let unknown = || {
            self.refuse(
                rel,
                format!(
                    "the change at log offset {offset} does not carry its shard key (an unchanged TOASTed value); \
                     ALTER TABLE {} REPLICA IDENTITY FULL makes PostgreSQL log it",
                    rel.quoted_name()
                ),
            )
        };
        let new = change.after.as_ref().map(|a| owns(a.get(column)));
        let old = change.before.as_ref().map(|(_, b)| owns(b.get(column)));
        Ok(match change.op {
            Op::Insert => new.flatten().ok_or_else(unknown)?.then_some(change),
            Op::Delete => old.flatten().ok_or_else(unknown)?.then_some(change),
            Op::Update => {
                // Without old values the key did not change: the new row says where it is.
                let new = new.flatten().or(old.flatten()).ok_or_else(unknown)?;
                let old = old.flatten().unwrap_or(new);
                match (old, new) {
                    (true, true) => Some(change),
                    (false, false) => None,
                    (true, false) => Some(RowChange { op: Op::Delete, after: None, ..change }),
                    (false, true) => Some(self.arrival(rel, offset, change)?),
                }
            }
        })
    }

    /// An update that brought a row to this shard, as the insert of the whole row: values
    /// PostgreSQL left out as unchanged TOAST come from the old row when it was logged whole.
    fn arrival(&self, rel: &Relation, offset: u64, change: RowChange) -> Result<RowChange, ApplyError> {
        let Some(after) = &change.after else { return Ok(change) };
        let full_old = match &change.before {
            Some((OldValues::Full, b)) => Some(b),
            _ => None,
        };
        let mut values = Vec::with_capacity(after.len());
        for (i, v) in after.values().enumerate() {
            values.push(match v {
                Value::Null => Datum::Null,
                Value::Text(t) => Datum::Text(t.to_owned()),
                Value::UnchangedToast => match full_old.and_then(|b| b.get(i)) {
                    Some(Value::Text(t)) => Datum::Text(t.to_owned()),
                    Some(Value::Null) => Datum::Null,
                    _ => {
                        return Err(self.refuse(
                            rel,
                            format!(
                                "the row moved to this shard at log offset {offset}, but PostgreSQL did not send its \
                                 unchanged TOASTed column {:?}; ALTER TABLE {} REPLICA IDENTITY FULL makes it log the \
                                 whole old row (then re-sync this shard's table)",
                                rel.columns.get(i).map(|c| c.name.as_str()).unwrap_or("?"),
                                rel.quoted_name()
                            ),
                        ))
                    }
                },
            });
        }
        Ok(RowChange { op: Op::Insert, before: None, after: Some(values.into()), ..change })
    }
}

impl Route {
    fn column(&self) -> usize {
        match self {
            Route::Everything => 0,
            Route::Hash { column, .. } | Route::Range { column, .. } => *column,
        }
    }

    /// Whether this shard holds the row whose shard key is `key` (NULL: `None`).
    fn owns(&self, key: Option<&str>) -> bool {
        match self {
            Route::Everything => true,
            Route::Hash { range, .. } => range.contains(keyspace_id(key)),
            Route::Range { integer, mine, .. } => mine.iter().any(|(from, to)| {
                let Some(key) = key else { return from.is_none() };
                let below = |b: &Bound| match (b, integer) {
                    (Bound::Int(i), true) => key.parse::<i64>().map(|k| k < *i).unwrap_or(false),
                    (Bound::Text(s), false) => key.as_bytes() < s.as_bytes(),
                    _ => false,
                };
                from.as_ref().is_none_or(|f| !below(f)) && to.as_ref().is_none_or(below)
            }),
        }
    }
}

#[cfg(test)]
mod tests;
