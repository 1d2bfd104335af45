//! Digests and rows read by scanning: hash buckets, key ranges, staged sub-buckets, rows by key.

use super::*;

impl Node {
    /// The table's bucket digests, aggregated by the node and sent packed.
    pub async fn digests(&self, shape: &Shape, bits: u8) -> Result<Buckets, RepairError> {
        let sql = digested(&format!(
            "SELECT {bucket} AS b, {hash} AS h FROM {from}",
            bucket = shape.bucket(bits),
            hash = shape.row_hash(),
            from = shape.from,
        ));
        let row = self.row(&sql, &[]).await.map_err(self.fail(format!("digesting {}", shape.name)))?;
        packed_buckets(bits, row.get(0))
    }

    /// Stages the rows of the given (coarse) buckets in a temporary table, each under its
    /// sub-bucket of `fine` bits, and returns the sub-bucket digests: (sub-bucket → (rows,
    /// sum)). Within the snapshot; the table goes with it.
    pub async fn stage(
        &self,
        shape: &Shape,
        bits: u8,
        fine: u8,
        buckets: &[usize],
    ) -> Result<BTreeMap<usize, (u64, u64)>, RepairError> {
        if buckets.is_empty() {
            // Nothing to read (identical, or every differing bucket known from the last check).
            return Ok(BTreeMap::new());
        }
        let list = buckets.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        // CREATE TABLE AS takes no parameters: the list is numbers we format ourselves.
        let sql = format!(
            "DROP TABLE IF EXISTS synapse_repair_rows;
             CREATE TEMP TABLE synapse_repair_rows ON COMMIT DROP AS
             SELECT {fine_bucket} AS b, {key} AS k, {hash} AS h FROM {from}
             JOIN unnest('{{{list}}}'::int8[]) AS u(b) ON u.b = {bucket}",
            fine_bucket = shape.bucket(fine),
            key = shape.key_text,
            hash = shape.row_hash(),
            from = shape.from,
            bucket = shape.bucket(bits),
        );
        self.client
            .batch_execute(&sql)
            .await
            .map_err(self.fail(format!("reading differing rows of {}", shape.name)))?;
        let row = self
            .row(&digested("SELECT b, h FROM synapse_repair_rows"), &[])
            .await
            .map_err(self.fail(format!("digesting differing buckets of {}", shape.name)))?;
        Ok(unpack(row.get(0)).map(|(b, n, s)| (b, (n, s))).collect())
    }

    /// The smallest and largest key in this snapshot and the planner's row estimate, for a
    /// table whose key is one integer column (`None` for an empty table, or another key).
    pub async fn key_range(&self, shape: &Shape) -> Result<Option<KeyRange>, RepairError> {
        let Some(k) = &shape.int_key else { return Ok(None) };
        let sql = format!(
            "SELECT min({k})::int8, max({k})::int8,
                    (SELECT reltuples::float8 FROM pg_class WHERE oid = {table}::regclass) FROM {from}",
            table = quote::literal(&shape.table),
            from = shape.from
        );
        let row = self.row(&sql, &[]).await.map_err(self.fail(format!("reading the key range of {}", shape.name)))?;
        Ok(row.get::<_, Option<i64>>(0).zip(row.get::<_, Option<i64>>(1)).map(|(lo, hi)| KeyRange {
            lo,
            hi,
            rows: row.get::<_, Option<f64>>(2).unwrap_or(-1.0),
        }))
    }

    /// The table's digests in key-range buckets (see [`range_layout`]), aggregated by the
    /// node and sent packed.
    pub async fn range_digests(&self, shape: &Shape, bits: u8, lo: i64, span: i64) -> Result<Buckets, RepairError> {
        let n = Buckets::new(bits)?.len();
        let sql = digested(&format!(
            "SELECT {bucket} AS b, {hash} AS h FROM {from}",
            bucket = shape.range_bucket(),
            hash = shape.row_hash(),
            from = shape.from,
        ));
        let row =
            self.row(&sql, &[&lo, &(n as i64), &span]).await.map_err(self.fail(format!("digesting {}", shape.name)))?;
        packed_buckets(bits, row.get(0))
    }

    /// Sub-bucket digests (`fine` bits) of the given key-range buckets, read through the
    /// primary key's index: cost by the rows of those buckets, not by the table.
    pub async fn range_sub_digests(
        &self,
        shape: &Shape,
        (bits, fine): (u8, u8),
        (lo, span): (i64, i64),
        buckets: &[usize],
    ) -> Result<BTreeMap<usize, (u64, u64)>, RepairError> {
        if buckets.is_empty() {
            return Ok(BTreeMap::new());
        }
        let (from, to) = key_ranges(buckets, bits, lo, span);
        let sql = digested(&shape.range_rows(&format!("{} AS h", shape.row_hash())));
        let row = self
            .row(&sql, &[&lo, &(1i64 << fine), &span, &from, &to])
            .await
            .map_err(self.fail(format!("digesting differing buckets of {}", shape.name)))?;
        Ok(unpack(row.get(0)).map(|(b, n, s)| (b, (n, s))).collect())
    }

    /// Runs `sql` (rows of sub-buckets `wanted`) as the snapshot's last read, with the
    /// snapshot's end (and, if `applied`, the applied positions) sent right behind it: one
    /// round trip. The statement is prepared first, so the read is sent before the COMMIT.
    pub(super) async fn last_read(
        &self,
        shape: &Shape,
        sql: Option<&str>,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        applied: bool,
    ) -> Result<Ended, RepairError> {
        let stmt = match sql {
            Some(sql) => {
                Some(self.stmt(sql).await.map_err(self.fail(format!("reading differing rows of {}", shape.name)))?)
            }
            None => None,
        };
        let (rows, ended, positions) = futures_util::future::join3(
            async {
                match &stmt {
                    Some(stmt) => self.client.query(stmt, params).await.map(Some),
                    None => Ok(None),
                }
            },
            self.end(&shape.name),
            async {
                match applied {
                    true => self.applied().await,
                    false => Ok(None),
                }
            },
        )
        .await;
        let rows = rows.map_err(self.fail(format!("reading differing rows of {}", shape.name)))?;
        ended?;
        Ok(Ended { rows: rows.map(keyed_rows).unwrap_or_default(), applied: positions? })
    }

    /// The current rows of `keys` (each the key columns' text), found through the key's index:
    /// row hash by key; absent keys are left out.
    pub async fn rows_by_key(&self, shape: &Shape, keys: &[Key]) -> Result<Rows, RepairError> {
        let rows = self.by_key(shape, keys, &shape.row_hash(), "re-reading differing rows").await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The current rows of `keys` as JSON objects (`row_to_json`: every column by name, in a
    /// form `json_populate_record` reads back exactly); absent keys are left out.
    pub async fn rows_json(&self, shape: &Shape, keys: &[Key]) -> Result<BTreeMap<Key, String>, RepairError> {
        let rows = self.by_key(shape, keys, "row_to_json(t.*)::text", "reading rows to copy").await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// `SELECT key, <what>` for the rows of `keys`, found through the key's index.
    pub(super) async fn by_key(
        &self,
        shape: &Shape,
        keys: &[Key],
        what: &str,
        context: &str,
    ) -> Result<Vec<tokio_postgres::Row>, RepairError> {
        if keys.first().is_none_or(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let (join, columns) = shape.key_join(keys);
        let sql = format!("SELECT {key}, {what} FROM {from} {join}", key = shape.key_text, from = shape.from);
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        self.rows(&sql, &params).await.map_err(self.fail(format!("{context} of {}", shape.name)))
    }
}

/// One node's smallest and largest key and its planner's row estimate (−1: never analyzed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeyRange {
    pub lo: i64,
    pub hi: i64,
    pub rows: f64,
}

/// Key-range buckets of a table whose key is one integer column: keys `lo..lo + span` split
/// into 2^bits equal ranges, bucket = (key − lo)·2^bits / span. Rows of a differing bucket
/// are then read through the primary key's index instead of a second scan of the table (a
/// cold check of 1M rows: one scan instead of two). Only for spans where (key − lo)·2^bits
/// cannot overflow a bigint, and only where keys are dense enough for equal ranges to hold
/// similar numbers of rows: the span at most `MAX_SPAN_PER_ROW` × the largest row estimate
/// (one far outlier key would put every row in one bucket). Else key-hash buckets (`None`).
pub fn range_layout(ranges: &[Option<KeyRange>], fine: u8) -> Option<(i64, i64)> {
    let lo = ranges.iter().flatten().map(|r| r.lo).min()?;
    let hi = ranges.iter().flatten().map(|r| r.hi).max()?;
    let rows = ranges.iter().flatten().map(|r| r.rows).fold(-1.0, f64::max);
    let span = i128::from(hi) - i128::from(lo) + 1;
    let dense = rows > 0.0 && (span as f64) <= MAX_SPAN_PER_ROW * rows.max(1.0);
    // The bound after the last key must be a bigint too.
    (dense && span << fine < i128::from(i64::MAX) && hi < i64::MAX).then_some((lo, span as i64))
}

/// Keys per row above which key ranges are not used (see [`range_layout`]).
pub(super) const MAX_SPAN_PER_ROW: f64 = 16.0;

/// The key ranges [from, to) of the given buckets of 2^bits over `lo..lo + span`: bucket b
/// holds the keys with b·span ≤ (key − lo)·2^bits < (b + 1)·span.
pub(super) fn key_ranges(buckets: &[usize], bits: u8, lo: i64, span: i64) -> (Vec<i64>, Vec<i64>) {
    let n = 1i128 << bits;
    let bound = |b: i128| -> i64 {
        let offset = (b * i128::from(span) + n - 1) / n; // ceil(b·span / n)
        (i128::from(lo) + offset).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    };
    buckets.iter().map(|b| (bound(*b as i128), bound(*b as i128 + 1))).unzip()
}
