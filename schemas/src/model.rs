use crate::{Cursor, Lsn};
use serde::{Deserialize, Serialize};
use synapse_postgres::quote;

/// One column value as PostgreSQL's text output function printed it (owned; rows travel as
/// [`Tuple`]s).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value that PostgreSQL did not send: the target must keep what it has.
    /// Never to be read as NULL.
    UnchangedToast,
    Text(String),
}

/// One column value of a [`Tuple`], borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    UnchangedToast,
    Text(&'a str),
}

impl<'a> Value<'a> {
    pub fn as_text(&self) -> Option<&'a str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A row's values in one buffer, laid out as pgoutput sends them: per column a kind byte
/// (`n` null, `u` unchanged TOAST, `t` text) and, for `t`, a big-endian u32 length and UTF-8
/// bytes. Capture copies the bytes once from the wire; apply streams them into COPY without a
/// per-value allocation (a `Vec<String>` per row cost synapse more CPU than PostgreSQL's own
/// apply worker spent in total, see `synapse-bench --profile`).
///
/// Always valid: construction and deserialisation check the layout and the UTF-8.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTuple", into = "RawTuple")]
pub struct Tuple {
    count: u16,
    bytes: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct RawTuple {
    count: u16,
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

impl From<Tuple> for RawTuple {
    fn from(t: Tuple) -> Self {
        RawTuple { count: t.count, bytes: t.bytes }
    }
}

impl TryFrom<RawTuple> for Tuple {
    type Error = &'static str;
    fn try_from(r: RawTuple) -> Result<Self, Self::Error> {
        Tuple::from_pgoutput(r.count, r.bytes)
    }
}

impl std::fmt::Debug for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.values()).finish()
    }
}

impl Tuple {
    /// Takes pgoutput TupleData column bytes (after the column count). Rejects anything but
    /// `n`, `u` and `t` columns with UTF-8 text.
    pub fn from_pgoutput(count: u16, bytes: Vec<u8>) -> Result<Self, &'static str> {
        let mut pos = 0usize;
        for _ in 0..count {
            match bytes.get(pos) {
                Some(b'n') | Some(b'u') => pos += 1,
                Some(b't') => {
                    let len = bytes.get(pos + 1..pos + 5).ok_or("truncated tuple length")?;
                    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                    let end = (pos + 5).checked_add(len).ok_or("tuple length overflow")?;
                    let text = bytes.get(pos + 5..end).ok_or("truncated tuple value")?;
                    std::str::from_utf8(text).map_err(|_| "tuple value is not UTF-8")?;
                    pos = end;
                }
                _ => return Err("invalid tuple column kind"),
            }
        }
        if pos != bytes.len() {
            return Err("trailing bytes after tuple");
        }
        Ok(Tuple { count, bytes })
    }

    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The values in column order.
    pub fn values(&self) -> impl Iterator<Item = Value<'_>> + '_ {
        let mut pos = 0usize;
        let b = &self.bytes;
        (0..self.count).map_while(move |_| {
            // The layout was validated at construction; a mismatch ends the iteration.
            let v = match b.get(pos)? {
                b'n' => {
                    pos += 1;
                    Value::Null
                }
                b'u' => {
                    pos += 1;
                    Value::UnchangedToast
                }
                _ => {
                    let l = b.get(pos + 1..pos + 5)?;
                    let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
                    let text = std::str::from_utf8(b.get(pos + 5..pos + 5 + len)?).ok()?;
                    pos += 5 + len;
                    Value::Text(text)
                }
            };
            Some(v)
        })
    }

    pub fn get(&self, i: usize) -> Option<Value<'_>> {
        self.values().nth(i)
    }
}

impl From<Vec<Datum>> for Tuple {
    fn from(values: Vec<Datum>) -> Self {
        let mut bytes = Vec::new();
        for v in &values {
            match v {
                Datum::Null => bytes.push(b'n'),
                Datum::UnchangedToast => bytes.push(b'u'),
                Datum::Text(s) => {
                    bytes.push(b't');
                    bytes.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    bytes.extend_from_slice(s.as_bytes());
                }
            }
        }
        Tuple { count: values.len() as u16, bytes }
    }
}

/// How PostgreSQL identifies the old row of an update or delete (`ALTER TABLE … REPLICA IDENTITY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

impl ReplicaIdentity {
    pub fn from_pgoutput(b: u8) -> Option<Self> {
        Some(match b {
            b'd' => Self::Default,
            b'n' => Self::Nothing,
            b'f' => Self::Full,
            b'i' => Self::Index,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// `format_type(oid, typmod)` on the source, e.g. `numeric(12,2)` or `public.mood`.
    pub type_name: String,
    /// The type that decides the JSON form: a domain's base type, else `type_oid`.
    pub base_type_oid: u32,
    /// For arrays, the element's base type; 0 otherwise.
    pub element_type_oid: u32,
    /// Part of the replica identity (the primary key by default).
    pub is_key: bool,
    /// User-defined types the column's type needs (enums, domains — an array's element type
    /// or a domain's base included), in creation order: a target creates the missing ones.
    #[serde(default)]
    pub type_defs: Vec<TypeDef>,
}

/// How to create a user-defined type on a target.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TypeDef {
    /// Schema-qualified, quoted: `"public"."mood"`.
    pub name: String,
    pub schema: String,
    /// `CREATE TYPE … AS ENUM (…)` or `CREATE DOMAIN … AS … CHECK (…)`.
    pub ddl: String,
}

/// A table's shape as the source described it at one point of the stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

/// Names one version of a relation: changes refer to it instead of repeating the columns.
/// `version` is a content hash, so the same definition always gets the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RelationKey {
    pub oid: u32,
    pub version: u64,
}

impl Relation {
    pub fn key(&self) -> RelationKey {
        // FNV-1a over a canonical rendering: stable across processes and releases, unlike
        // std's SipHash with random keys.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes.iter().chain(std::iter::once(&0xff)) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        };
        eat(self.schema.as_bytes());
        eat(self.table.as_bytes());
        eat(&[self.replica_identity as u8]);
        for c in &self.columns {
            eat(c.name.as_bytes());
            eat(c.type_name.as_bytes());
            eat(&c.type_oid.to_le_bytes());
            eat(&c.type_modifier.to_le_bytes());
            eat(&[u8::from(c.is_key)]);
        }
        RelationKey { oid: self.oid, version: h }
    }

    /// `"schema"."table"`, quoted for SQL.
    pub fn quoted_name(&self) -> String {
        format!("{}.{}", quote::ident(&self.schema), quote::ident(&self.table))
    }

    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    pub fn key_columns(&self) -> impl Iterator<Item = (usize, &Column)> {
        self.columns.iter().enumerate().filter(|(_, c)| c.is_key)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

/// Which old values an update or delete carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OldValues {
    /// Only the replica-identity columns are meaningful; the others are `Null`.
    Key,
    /// The whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowChange {
    /// Position inside the transaction (begin is 0).
    pub index: u32,
    pub relation: RelationKey,
    pub op: Op,
    /// Old values: set for deletes, and for updates that changed the key or use REPLICA IDENTITY FULL.
    pub before: Option<(OldValues, Tuple)>,
    /// New values: set for inserts and updates.
    pub after: Option<Tuple>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncate {
    pub index: u32,
    pub relations: Vec<RelationKey>,
    pub cascade: bool,
    pub restart_identity: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begin {
    pub commit_lsn: Lsn,
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// The replication origin that produced this transaction on the source, if any: a change
    /// that SynapseDB itself applied there carries its origin name.
    pub origin: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: once this is durable downstream, the slot may move here.
    pub end_lsn: Lsn,
    pub commit_time_us: i64,
    /// Data records (changes + truncates) in the transaction.
    pub event_count: u32,
}

/// The unit of the change log. A source transaction is `Begin`, then `Relation`/`Change`/`Truncate`
/// records, then `Commit`; transactions never interleave within one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogRecord {
    Begin(Begin),
    /// The source (re)described a table; a new `RelationKey` version is a schema change.
    Relation(Relation),
    Change(RowChange),
    Truncate(Truncate),
    Commit(Commit),
    /// The capture restarted in the middle of writing the transaction with this commit LSN: its
    /// records written so far are void (the transaction follows again, complete). Consumers that
    /// already acted on them must roll back to their last committed position.
    Discarded {
        commit_lsn: Lsn,
    },
    /// The source's stream has a gap here that capture crossed (`on_gap: resync`): changes
    /// committed between the records before and after it were never captured. Appliers ignore
    /// it (the re-sync repairs their targets); stream and webhook consumers receive it as a
    /// `resync` control event and must re-read the source (a snapshot) to be whole again.
    /// Between transactions, never inside one.
    Resync(ResyncMark),
    /// A schema change the source ran, at its place in the transaction (after every change of
    /// the old shape, before every change of the new): captured by SynapseDB's event trigger on
    /// the source. Appliers run it on their targets before the changes that follow.
    Schema(SchemaChange),
}

/// A DDL statement as the source's event trigger recorded it (see [`LogRecord::Schema`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaChange {
    /// The command tag (`ALTER TABLE`, `CREATE INDEX`, `DROP TABLE`, …).
    pub tag: String,
    /// The text the client sent: the statement, or a string of several that holds it.
    pub sql: String,
    /// Which of the DDL statements of `sql` this is (0: the first): a string of several fires
    /// the trigger once per statement.
    pub nth: u32,
    /// The session's search_path when it ran: unqualified names resolve as on the source.
    pub search_path: String,
    /// The tables it changed, created or dropped (`schema.table`).
    pub tables: Vec<String>,
    /// Tables that joined the capture's publication with this statement (made, or given a key,
    /// under a capture of every table): targets stream them from here on.
    pub joined: Vec<String>,
    /// Each changed table's columns after the statement (none for a drop): what consumers see.
    pub shapes: Vec<TableShape>,
    /// Of `joined`, the tables that joined holding rows
    /// the log does not have (`CREATE TABLE … AS`, a key added to a filled table): each target
    /// owes them a copy, which SynapseDB makes while the stream goes on.
    pub copy: Vec<String>,
}

/// A table's columns as a schema change left them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableShape {
    /// `schema.table`.
    pub table: String,
    pub columns: Vec<ColumnShape>,
}

/// One column of a [`TableShape`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnShape {
    pub name: String,
    /// As `format_type` gives it (`integer`, `character varying(20)`, `public.mood`).
    #[serde(rename = "type")]
    pub type_name: String,
}

/// What a [`LogRecord::Resync`] says about its gap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncMark {
    /// End LSN of the last transaction captured before the gap (`0/0`: none). Every
    /// transaction after the mark commits past it.
    pub after: Lsn,
    /// The source's WAL position when the gap was found (`None`: not readable then): the
    /// changes lost lie between `after` and about here.
    pub source_wal: Option<Lsn>,
    /// When capture found the gap, µs since the Unix epoch.
    pub found_at_us: i64,
    /// What was lost, as the capture's gap error said it (the slot dropped, invalidated, …).
    pub reason: String,
}

impl ResyncMark {
    /// The mark's place among cursors: after every transaction before the gap, before every
    /// one after it. A reader whose cursor is below it has not seen the mark.
    pub fn cursor(&self) -> Cursor {
        Cursor { commit_lsn: self.after, index: 0 }
    }
}

impl LogRecord {
    /// The cursor of this record, given the commit LSN of the transaction it belongs to.
    pub fn cursor(&self, txn_commit_lsn: Lsn) -> Cursor {
        let index = match self {
            LogRecord::Change(c) => c.index,
            LogRecord::Truncate(t) => t.index,
            LogRecord::Commit(c) => c.event_count + 1,
            _ => 0,
        };
        Cursor { commit_lsn: txn_commit_lsn, index }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn tuples_roundtrip(values: Vec<Option<Option<String>>>) {
            let datums: Vec<Datum> = values
                .iter()
                .map(|v| match v {
                    None => Datum::UnchangedToast,
                    Some(None) => Datum::Null,
                    Some(Some(s)) => Datum::Text(s.clone()),
                })
                .collect();
            let t = Tuple::from(datums.clone());
            let back: Vec<Datum> = t
                .values()
                .map(|v| match v {
                    Value::Null => Datum::Null,
                    Value::UnchangedToast => Datum::UnchangedToast,
                    Value::Text(s) => Datum::Text(s.to_owned()),
                })
                .collect();
            prop_assert_eq!(back, datums);
            let json = serde_json::to_string(&t).unwrap();
            prop_assert_eq!(serde_json::from_str::<Tuple>(&json).unwrap(), t);
        }

        #[test]
        fn bad_bytes_are_rejected_not_panicked(count: u16, bytes: Vec<u8>) {
            if let Ok(t) = Tuple::from_pgoutput(count, bytes) {
                prop_assert_eq!(t.values().count(), usize::from(count));
            }
        }
    }

    #[test]
    fn rejects_invalid_utf8_and_trailing_bytes() {
        assert!(Tuple::from_pgoutput(1, vec![b't', 0, 0, 0, 1, 0xff]).is_err());
        assert!(Tuple::from_pgoutput(1, vec![b'n', b'n']).is_err());
        assert!(Tuple::from_pgoutput(1, vec![b'b', 0, 0, 0, 0]).is_err());
    }
}
