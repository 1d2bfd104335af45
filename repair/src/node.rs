//! One node's side of a check, computed inside PostgreSQL: only bucket digests and the rows of
//! differing buckets cross the network.
//!
//! Rows are compared by their text output under fixed session settings (ISO dates in UTC,
//! shortest exact floats, hex bytea), so two nodes print equal values alike. A row's hash is
//! `md5(key row text || values row text)` (128 bits, summed per bucket as two 64-bit halves); its
//! bucket is the top bits of `hashtextextended(key row text, 0)`. Both functions are built in,
//! so every node computes them identically without an extension.

use crate::{Buckets, DigestTree, RepairError, RowDiff};
use std::collections::BTreeMap;
use synapse_schemas::quote_ident;
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

    fn fail(&self, context: String) -> impl FnOnce(tokio_postgres::Error) -> RepairError + '_ {
        move |source| RepairError::Node { node: self.name.clone(), context, source }
    }

    /// Starts the snapshot the digests and the rows are read in (read-only, repeatable read:
    /// rows fetched for differing buckets are the rows the digests summed).
    async fn begin(&self) -> Result<(), RepairError> {
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(self.fail("starting a snapshot".into()))
    }

    async fn end(&self) -> Result<(), RepairError> {
        self.client.batch_execute("COMMIT").await.map_err(self.fail("ending the snapshot".into()))
    }

    /// The key and other columns of `schema.table` on this node.
    pub async fn describe(&self, name: &str) -> Result<Shape, RepairError> {
        let bad = |message: String| RepairError::Table { table: name.to_owned(), message };
        let (schema, table) = name.split_once('.').ok_or_else(|| bad("name tables as schema.table".into()))?;
        let rows = self
            .client
            .query(
                "SELECT a.attname::text,
                        -- int2vector subscripts start at 0: position + 1, 0 for non-key columns
                        coalesce(array_position(i.indkey::int2[], a.attnum) - array_lower(i.indkey::int2[], 1) + 1, 0)
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
        let mut key: Vec<(i32, String)> = Vec::new();
        let mut columns = Vec::new();
        for r in rows {
            let (col, pos): (String, i32) = (r.get(0), r.get(1));
            if pos > 0 {
                key.push((pos, col));
            } else {
                columns.push(col);
            }
        }
        if key.is_empty() {
            return Err(bad(format!("it has no primary key on node {} (rows are matched by it)", self.name)));
        }
        key.sort();
        let q = |cols: &[String]| cols.iter().map(|c| format!("t.{}", quote_ident(c))).collect::<Vec<_>>().join(", ");
        let key: Vec<String> = key.into_iter().map(|(_, c)| c).collect();
        Ok(Shape {
            name: name.to_owned(),
            from: format!("{}.{} t", quote_ident(schema), quote_ident(table)),
            key_row: format!("ROW({})::text", q(&key)),
            values_row: format!("ROW({})::text", q(&columns)),
            columns: key.iter().chain(&columns).cloned().collect(),
        })
    }

    /// The table's bucket digests, aggregated by the node.
    pub async fn digests(&self, shape: &Shape, bits: u8) -> Result<Buckets, RepairError> {
        let n = Buckets::new(bits)?.len();
        let sql = format!(
            "SELECT b::int8, count(*)::int8,
                    sum(('x' || substr(h, 1, 16))::bit(64)::int8::numeric)::text,
                    sum(('x' || substr(h, 17, 16))::bit(64)::int8::numeric)::text
             FROM (SELECT {bucket} AS b, md5({key} || {values}) AS h FROM {from}) s GROUP BY b",
            bucket = shape.bucket(bits),
            key = shape.key_row,
            values = shape.values_row,
            from = shape.from,
        );
        let rows = self.client.query(&sql, &[]).await.map_err(self.fail(format!("digesting {}", shape.name)))?;
        let (mut sums, mut counts) = (vec![0u128; n], vec![0u64; n]);
        for r in rows {
            let b = usize::try_from(r.get::<_, i64>(0)).unwrap_or(usize::MAX);
            let (Some(sum), Some(count)) = (sums.get_mut(b), counts.get_mut(b)) else { continue };
            *count = r.get::<_, i64>(1) as u64;
            // Sums of up to 2^63 signed halves fit i128; only their value mod 2^64 matters.
            let half = |t: String| t.parse::<i128>().unwrap_or_default() as u64;
            *sum = (u128::from(half(r.get(2))) << 64) | u128::from(half(r.get(3)));
        }
        Buckets::from_sums(bits, sums, counts)
    }

    /// The rows of the given buckets, as (key text, values text), in key-text order.
    pub async fn rows_in(
        &self,
        shape: &Shape,
        bits: u8,
        buckets: &[usize],
    ) -> Result<Vec<(String, String)>, RepairError> {
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: Vec<i64> = buckets.iter().map(|b| *b as i64).collect();
        let sql = format!(
            "SELECT {key}, {values} FROM {from} WHERE {bucket} = ANY($1::int8[])",
            key = shape.key_row,
            values = shape.values_row,
            from = shape.from,
            bucket = shape.bucket(bits),
        );
        let rows = self
            .client
            .query(&sql, &[&wanted])
            .await
            .map_err(self.fail(format!("reading differing rows of {}", shape.name)))?;
        let mut out: Vec<(String, String)> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
        out.sort();
        Ok(out)
    }
}

/// How a table is read on a node: its key and value columns as row expressions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub name: String,
    /// Every column, key first: two nodes are compared only if these agree.
    pub columns: Vec<String>,
    from: String,
    key_row: String,
    values_row: String,
}

impl Shape {
    fn bucket(&self, bits: u8) -> String {
        format!("((hashtextextended({}, 0) >> {}) & {})", self.key_row, 64 - u32::from(bits), (1u64 << bits) - 1)
    }
}

/// What a check of one table between two nodes found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub table: String,
    /// The two nodes, in the order `rows` and `diff` name them (left, right).
    pub nodes: [String; 2],
    pub rows: [u64; 2],
    pub buckets: usize,
    pub differing_buckets: usize,
    /// Tree node pairs compared to find them.
    pub compared: usize,
    /// Keys as their row text (e.g. `(42)`), in order.
    pub diff: RowDiff,
}

/// Compares `table` on two nodes: digests in one snapshot per node, the trees top-down, then
/// the rows of differing buckets only. Reads only; changes nothing.
pub async fn check(left: &Node, right: &Node, table: &str, bits: u8) -> Result<Report, RepairError> {
    let (ls, rs) = (left.describe(table).await?, right.describe(table).await?);
    if ls.columns != rs.columns {
        return Err(RepairError::Table {
            table: table.to_owned(),
            message: format!("columns differ: {} has {:?}, {} has {:?}", left.name, ls.columns, right.name, rs.columns),
        });
    }
    left.begin().await?;
    right.begin().await?;
    // Each node scans its own table: both at once.
    let (lb, rb) = tokio::join!(left.digests(&ls, bits), right.digests(&rs, bits));
    let (lb, rb) = (lb?, rb?);
    let (differing, compared) = DigestTree::build(&lb).diff(&DigestTree::build(&rb))?;
    let (lr, rr) = tokio::join!(left.rows_in(&ls, bits, &differing), right.rows_in(&rs, bits, &differing));
    let (lr, rr) = (lr?, rr?);
    left.end().await?;
    right.end().await?;
    Ok(Report {
        table: table.to_owned(),
        nodes: [left.name.clone(), right.name.clone()],
        rows: [lb.rows(), rb.rows()],
        buckets: lb.len(),
        differing_buckets: differing.len(),
        compared,
        diff: diff_texts(&lr, &rr),
    })
}

/// Compares rows given as (key text, values text).
pub fn diff_texts(left: &[(String, String)], right: &[(String, String)]) -> RowDiff {
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
