//! One node's side of a check, computed inside PostgreSQL: only bucket digests and the rows of
//! differing buckets cross the network.
//!
//! A row's hash is `hash_record_extended` over its columns — each type's own hash, so values
//! compare by their type's equality (`numeric` 1.0 = 1.00, a `jsonb` written in another key
//! order is equal), without printing them; a column whose type has no hash function (`json`,
//! `point`…) is hashed by its text under fixed session settings (ISO dates in UTC, shortest
//! exact floats, hex bytea). Per bucket the node sums the 64-bit hashes and counts the rows; the
//! bucket is the top bits of the key's hash. All built in (PostgreSQL 14 or later): every node
//! computes them alike, with no extension, in one scan that prints nothing.

use crate::{Buckets, RepairError};
use std::collections::BTreeMap;
use synapse_schemas::quote_ident;
use synapse_schemas::Lsn;
use tokio_postgres::{Client, NoTls};

/// Session settings that make text output the same on every node.
const SESSION: &str = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres';
    SET extra_float_digits = 1; SET bytea_output = 'hex';";

/// A connection to one node of a check.
pub struct Node {
    pub name: String,
    client: Client,
}

impl Node {
    pub async fn connect(name: &str, config: &tokio_postgres::Config) -> Result<Node, RepairError> {
        let fail = |context: &str| {
            let context = context.to_owned();
            move |source| RepairError::Node { node: name.to_owned(), context, source }
        };
        let (client, conn) = config.connect(NoTls).await.map_err(fail("connecting"))?;
        tokio::spawn(conn);
        client.batch_execute(SESSION).await.map_err(fail("setting up the session"))?;
        Ok(Node { name: name.to_owned(), client })
    }

    /// The session (no replication origin: what it writes is captured like an application's).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn fail(&self, context: String) -> impl FnOnce(tokio_postgres::Error) -> RepairError + '_ {
        move |source| RepairError::Node { node: self.name.clone(), context, source }
    }

    /// Starts the snapshot the digests and the rows are read in (read-only, repeatable read:
    /// rows fetched for differing buckets are the rows the digests summed).
    pub(crate) async fn begin(&self) -> Result<(), RepairError> {
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(self.fail("starting a snapshot".into()))
    }

    pub(crate) async fn end(&self) -> Result<(), RepairError> {
        self.client.batch_execute("COMMIT").await.map_err(self.fail("ending the snapshot".into()))
    }

    /// The key and other columns of `schema.table` on this node.
    pub async fn describe(&self, name: &str) -> Result<Shape, RepairError> {
        let bad = |message: String| RepairError::Table { table: name.to_owned(), message };
        let (schema, table) = name.split_once('.').ok_or_else(|| bad("name tables as schema.table".into()))?;
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                        -- int2vector subscripts start at 0: position + 1, 0 for non-key columns
                        coalesce(array_position(i.indkey::int2[], a.attnum) - array_lower(i.indkey::int2[], 1) + 1, 0),
                        -- a default hash operator class for the type (or an array's element type)
                        EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod
                                JOIN pg_type ty ON ty.oid = a.atttypid
                                WHERE am.amname = 'hash' AND oc.opcdefault
                                  AND oc.opcintype = CASE WHEN ty.typcategory = 'A' THEN ty.typelem ELSE ty.oid END)
                 FROM pg_attribute a
                 JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&schema, &table],
            )
            .await
            .map_err(self.fail(format!("reading the definition of {name}")))?;
        if rows.is_empty() {
            return Err(bad(format!("it does not exist on node {}", self.name)));
        }
        let mut key: Vec<(i32, String, String)> = Vec::new();
        let mut columns = Vec::new();
        let mut hashable = std::collections::HashSet::new();
        for r in rows {
            let (col, ty, pos, h): (String, String, i32, bool) = (r.get(0), r.get(1), r.get(2), r.get(3));
            if h {
                hashable.insert(col.clone());
            }
            if pos > 0 {
                key.push((pos, col, ty));
            } else {
                columns.push(col);
            }
        }
        if key.is_empty() {
            return Err(bad(format!("it has no primary key on node {} (rows are matched by it)", self.name)));
        }
        key.sort();
        let key_types: Vec<String> = key.iter().map(|(_, _, t)| t.clone()).collect();
        let key: Vec<String> = key.into_iter().map(|(_, c, _)| c).collect();
        let all: Vec<String> = key.iter().chain(&columns).cloned().collect();
        let hashed = |cols: &[String]| {
            let items: Vec<String> = cols
                .iter()
                .map(|c| match hashable.contains(c) {
                    true => format!("t.{}", quote_ident(c)),
                    false => format!("t.{}::text", quote_ident(c)),
                })
                .collect();
            format!("ROW({})", items.join(", "))
        };
        Ok(Shape {
            name: name.to_owned(),
            from: format!("{}.{} t", quote_ident(schema), quote_ident(table)),
            key_text: format!(
                "ARRAY[{}]::text[]",
                key.iter().map(|c| format!("t.{}::text", quote_ident(c))).collect::<Vec<_>>().join(", ")
            ),
            key_match: key
                .iter()
                .zip(&key_types)
                .enumerate()
                .map(|(i, (c, ty))| format!("t.{} = u.k{i}::{ty}", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(" AND "),
            key_row: hashed(&key),
            all_row: hashed(&all),
            columns: all,
        })
    }

    /// The table's bucket digests, aggregated by the node.
    pub async fn digests(&self, shape: &Shape, bits: u8) -> Result<Buckets, RepairError> {
        let n = Buckets::new(bits)?.len();
        let sql = format!(
            "SELECT b::int8, count(*)::int8, sum(h)::text
             FROM (SELECT {bucket} AS b, {hash} AS h FROM {from}) s GROUP BY b",
            bucket = shape.bucket(bits),
            hash = shape.row_hash(),
            from = shape.from,
        );
        let rows = self.client.query(&sql, &[]).await.map_err(self.fail(format!("digesting {}", shape.name)))?;
        let (mut sums, mut counts) = (vec![0u64; n], vec![0u64; n]);
        for r in rows {
            let b = usize::try_from(r.get::<_, i64>(0)).unwrap_or(usize::MAX);
            let (Some(sum), Some(count)) = (sums.get_mut(b), counts.get_mut(b)) else { continue };
            *count = r.get::<_, i64>(1) as u64;
            // A sum of up to 2^63 signed hashes fits i128; only its value mod 2^64 matters.
            *sum = r.get::<_, String>(2).parse::<i128>().unwrap_or_default() as u64;
        }
        Buckets::from_sums(bits, sums, counts)
    }

    /// The rows of the given buckets: row hash by key.
    pub async fn rows_in(&self, shape: &Shape, bits: u8, buckets: &[usize]) -> Result<Rows, RepairError> {
        if buckets.is_empty() {
            return Ok(Rows::new());
        }
        let wanted: Vec<i64> = buckets.iter().map(|b| *b as i64).collect();
        // A join, not `= ANY`: the bucket list is hashed once instead of searched per row.
        let sql = format!(
            "SELECT {key}, {hash} FROM {from} JOIN unnest($1::int8[]) AS u(b) ON u.b = {bucket}",
            key = shape.key_text,
            hash = shape.row_hash(),
            from = shape.from,
            bucket = shape.bucket(bits),
        );
        let rows = self
            .client
            .query(&sql, &[&wanted])
            .await
            .map_err(self.fail(format!("reading differing rows of {}", shape.name)))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The current rows of `keys` (each the key columns' text), found through the key's index:
    /// row hash by key; absent keys are left out.
    pub async fn rows_by_key(&self, shape: &Shape, keys: &[Key]) -> Result<Rows, RepairError> {
        let width = keys.first().map_or(0, Vec::len);
        if width == 0 {
            return Ok(Rows::new());
        }
        let sql = format!(
            "SELECT {key}, {hash} FROM {from} JOIN unnest({params}) AS u({aliases}) ON {cond}",
            key = shape.key_text,
            hash = shape.row_hash(),
            from = shape.from,
            params = (1..=width).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", "),
            aliases = (0..width).map(|i| format!("k{i}")).collect::<Vec<_>>().join(", "),
            cond = shape.key_match,
        );
        let columns: Vec<Vec<&str>> =
            (0..width).map(|i| keys.iter().map(|k| k.get(i).map_or("", String::as_str)).collect()).collect();
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let rows = self
            .client
            .query(&sql, &params)
            .await
            .map_err(self.fail(format!("re-reading differing rows of {}", shape.name)))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Writes a cut marker into this node's WAL (a transactional logical message, so its
    /// transaction reaches the log and every applier of this node records passing it) and
    /// returns its position: a change committed before it is applied elsewhere once the
    /// applier's position is past it.
    pub async fn mark_cut(&self) -> Result<Lsn, RepairError> {
        let row = self
            .client
            .query_one("SELECT pg_logical_emit_message(true, 'synapse_repair_cut', '')::text", &[])
            .await
            .map_err(self.fail("writing a cut marker (pg_logical_emit_message)".into()))?;
        Ok(row.get::<_, String>(0).parse().unwrap_or(Lsn(0)))
    }

    /// Positions this node's appliers have applied, by source node: the commit position of
    /// each source's last applied transaction. `None`: no applier ever ran on this node.
    pub async fn applied(&self) -> Result<Option<Vec<(String, Lsn)>>, RepairError> {
        let rows = self.client.query("SELECT source_node, commit_lsn::text FROM synapse.applied", &[]).await;
        let rows = match rows {
            Ok(rows) => rows,
            // No such table: this node applies nothing.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => return Ok(None),
            Err(e) => {
                return Err(RepairError::Node {
                    node: self.name.clone(),
                    context: "reading applied positions".into(),
                    source: e,
                })
            }
        };
        Ok(Some(rows.into_iter().map(|r| (r.get(0), r.get::<_, String>(1).parse().unwrap_or(Lsn(0)))).collect()))
    }
}

/// A key: its columns' text, in key order.
pub type Key = Vec<String>;

/// Row hashes by key, as one node holds them.
pub type Rows = BTreeMap<Key, i64>;

/// How a table is read on a node: its key and value columns as row expressions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub name: String,
    /// Every column, key first: two nodes are compared only if these agree.
    pub columns: Vec<String>,
    from: String,
    /// The key columns' text, as an array.
    key_text: String,
    /// `t.k1 = u.k0::type AND …`: a key given as text matched through the key's index.
    key_match: String,
    /// The key and the whole row as records to hash.
    key_row: String,
    all_row: String,
}

impl Shape {
    fn bucket(&self, bits: u8) -> String {
        format!("((hash_record_extended({}, 0) >> {}) & {})", self.key_row, 64 - u32::from(bits), (1u64 << bits) - 1)
    }

    fn row_hash(&self) -> String {
        format!("hash_record_extended({}, 1)", self.all_row)
    }
}
