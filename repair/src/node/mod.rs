//! One node's side of a check, computed inside PostgreSQL: only bucket digests and the rows of
//! differing buckets cross the network.
//!
//! A row's hash mixes each column's hash by its type's own extended hash function (the one
//! hash partitioning uses: `hashint8extended`, `hashtextextended`, `jsonb_hash_extended`…), so
//! values compare by their type's equality (`numeric` 1.0 = 1.00, a `jsonb` written in another
//! key order is equal) without printing them; a column whose type has none (`json`, `point`,
//! arrays…) is hashed by its text under fixed session settings (ISO dates in UTC, shortest exact
//! floats, hex bytea). Each column has its own seed and NULL its own constant; the XOR of the
//! columns is mixed once more so values cannot cancel across rows. That is ~3× cheaper per row
//! than `hash_record_extended` over the row (measured: 1M rows, 4,096 buckets, 180–250 ms vs
//! 470–670 ms). Per bucket the node sums the 64-bit hashes (mod 2^64) and counts the rows; the
//! bucket is the top bits of the key's hash.
//!
//! Bytes on the wire: the coarse digests travel packed (20 bytes a bucket, one value); for the
//! buckets that differ the node sends sub-bucket digests, then only the rows of differing
//! sub-buckets. A table keyed by one integer column is split into key ranges
//! ([`range_layout`]): a differing bucket's rows are read through the key's index, one scan of
//! the table in all. Other keys are split by hash: the differing buckets' rows are staged by a
//! second scan in a temporary table (or found through the sub-bucket index of a tracked table).
//!
//! Files: this one (the connection, `Shape`, shared helpers), `shape` (reading a table's shape),
//! `scan` (digests and rows by scanning), `tracking` (trigger-kept digests), `cut` (applied
//! positions).

mod cut;
mod scan;
mod shape;
mod tracking;

use cut::*;
pub use scan::*;
use tracking::*;

use crate::{Buckets, RepairError};
use std::collections::BTreeMap;
use synapse_postgres::quote;
use synapse_schemas::Lsn;
use tokio_postgres::Client;

/// Session settings that make text output the same on every node.
/// JIT off: compiling costs ~40 ms a query here and buys nothing on these short expressions.
/// Generic plans: a kept session plans each prepared statement once (the catalog query of
/// `describe` plans in ~2.7 ms and runs in ~0.6); their parameters are key and bucket lists,
/// whose plans do not depend on the values.
/// The session: fixed settings (values hashed through their text print as in every check), and
/// its triggers and indexes on application tables kept out of the DDL capture (each node's own).
const SESSION: &str = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres';
    SET extra_float_digits = 1; SET bytea_output = 'hex'; SET jit = off; SET plan_cache_mode = force_generic_plan;
    SET synapse.own_ddl = on;";

/// A connection to one node of a check.
pub struct Node {
    pub name: String,
    pub(super) client: Client,
    /// Per table, the tracked digests last read (tracking's start, generation, digests): a
    /// later check on this session reads only the buckets folded since.
    pub(super) tracked: std::sync::Mutex<std::collections::HashMap<String, (String, i64, Buckets)>>,
    /// Per table, sub-bucket digests of some buckets as of those digests (bucket → sub-bucket
    /// → (rows, hash sum)): valid while their bucket is not folded again.
    pub(super) subs: std::sync::Mutex<std::collections::HashMap<String, SubsByBucket>>,
    /// Statements prepared on this session, by text: a session kept between checks (the
    /// admin API) then needs one round trip per query instead of two.
    pub(super) statements: std::sync::Mutex<std::collections::HashMap<String, tokio_postgres::Statement>>,
    /// synapse's own tables this session has seen exist (see [`Node::has_table`]).
    pub(super) tables_seen: std::sync::Mutex<std::collections::HashSet<&'static str>>,
    /// Tables found tracked in another layout, warned about once per session.
    pub(super) stale_warned: std::sync::Mutex<std::collections::HashSet<String>>,
    /// `schema.table` → the predicate of the rows compared (see [`Node::filter_rows`]).
    pub(super) row_filters: std::collections::HashMap<String, String>,
}

impl Node {
    pub async fn connect(name: &str, config: &synapse_postgres::PgConfig) -> Result<Node, RepairError> {
        let fail = |context: &str| {
            let context = context.to_owned();
            move |source| RepairError::Node { node: name.to_owned(), context, source }
        };
        let client = synapse_postgres::connect(config, name).await.map_err(fail("connecting"))?;
        client.batch_execute(SESSION).await.map_err(fail("setting up the session"))?;
        Ok(Node {
            name: name.to_owned(),
            client,
            tracked: Default::default(),
            subs: Default::default(),
            statements: Default::default(),
            tables_seen: Default::default(),
            stale_warned: Default::default(),
            row_filters: Default::default(),
        })
    }

    /// Compares only the rows of `table` (`schema.table`) for which `predicate` (SQL over its
    /// columns) holds: a source compared with one shard of a shard set, whose rows are the
    /// source's for that shard. Reads scan then; tracked digests cover the whole table.
    pub fn filter_rows(&mut self, table: &str, predicate: String) {
        self.row_filters.insert(table.to_owned(), predicate);
    }

    /// The session (no replication origin: what it writes is captured like an application's).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs a batch that opens a transaction, rolling it back if the batch fails midway (the
    /// session stays usable).
    pub(super) async fn in_transaction(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let result = self.client.batch_execute(sql).await;
        if result.is_err() {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        result
    }

    /// `sql` prepared once per session.
    pub(super) async fn stmt(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.lock().ok().and_then(|m| m.get(sql).cloned()) {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        if let Ok(mut m) = self.statements.lock() {
            m.insert(sql.to_owned(), s.clone());
        }
        Ok(s)
    }

    /// Runs `sql` (prepared once per session).
    pub(super) async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let stmt = self.stmt(sql).await?;
        self.client.query(&stmt, params).await
    }

    pub(super) async fn row(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
        let stmt = self.stmt(sql).await?;
        self.client.query_one(&stmt, params).await
    }

    /// Whether `table`, one of synapse's own, exists on this node. A query of a table that
    /// does not exist fails at parse and logs an ERROR in the server's log, once per check on
    /// a node where no applier ever ran; `to_regclass` does not. Once seen, a table is taken to
    /// stay (a query of it that finds it gone says so, see [`Node::gone`]).
    pub(super) async fn has_table(&self, table: &'static str) -> Result<bool, tokio_postgres::Error> {
        if self.tables_seen.lock().is_ok_and(|s| s.contains(table)) {
            return Ok(true);
        }
        let exists: bool = self.row("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
        if let (true, Ok(mut seen)) = (exists, self.tables_seen.lock()) {
            seen.insert(table);
        }
        Ok(exists)
    }

    /// Whether `e` says `table` does not exist (then it is forgotten as seen).
    pub(super) fn gone(&self, e: &tokio_postgres::Error, table: &'static str) -> bool {
        let gone = e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE);
        if let (true, Ok(mut seen)) = (gone, self.tables_seen.lock()) {
            seen.remove(table);
        }
        gone
    }

    pub(super) fn fail(&self, context: String) -> impl FnOnce(tokio_postgres::Error) -> RepairError + '_ {
        move |source| RepairError::Node { node: self.name.clone(), context, source }
    }

    /// Brings this node's `synapse.*` tables to this release's version.
    pub(super) async fn migrate(&self) -> Result<(), RepairError> {
        synapse_postgres::node_schema::migrate(&self.client)
            .await
            .map(|_| ())
            .map_err(|source| RepairError::NodeSchema { node: self.name.clone(), source })
    }

    /// Starts the snapshot the digests and the rows are read in (repeatable read: rows fetched
    /// for differing buckets are the rows the digests summed), after taking the check lock of
    /// `table` on this node: checks of a table run one at a time (a tracked table's digests are
    /// folded in the snapshot, deleting deltas: two at once would fail each other's snapshot;
    /// the session lock comes first so that the snapshot sees the last fold). Returns the table's shape and tracked bits. One round trip: the lock, the two
    /// catalog reads and the snapshot's start are sent together, in that order. Not READ ONLY
    /// only because folds write and scanned buckets' rows are staged in a temporary table.
    /// On error nothing is left open.
    /// `want`: buckets whose sub-bucket digests to read with tracked digests, if changed.
    pub(crate) async fn open(&self, table: &str, bits: u8, want: &[usize]) -> Result<Opened, RepairError> {
        if self.tracked_before(table) == Some(bits) {
            match self.open_as(table, Some(bits), want).await {
                // A session that read tracked digests before sends the fold and the read with
                // the snapshot's start: one round trip less. If the table is no longer tracked
                // they failed (and the transaction with them): open again without.
                Ok(o) if o.tracked.is_some() => return Ok(o),
                // open_as closed what it opened.
                Ok(_) | Err(_) => self.forget_tracked(table),
            }
        }
        self.open_as(table, None, want).await
    }

    /// [`Node::open`], with the tracked digests read in the same round trip if `tracked` gives
    /// their bits. A failure of that read is returned as `tracked: None` after closing.
    pub(super) async fn open_as(
        &self,
        table: &str,
        tracked: Option<u8>,
        want: &[usize],
    ) -> Result<Opened, RepairError> {
        // The planner cannot know a bucket expression has at most 2^bits values: it estimates
        // one group per row and sorts the table (spilling to disk) where a hash aggregate of a
        // few thousand groups is 1.5–2× faster (measured, 1M rows).
        // Commit need not wait for the disk: a fold lost in a crash loses its deltas' deletion
        // with it (one transaction), and the next check folds them again.
        let lock_sql = format!("SELECT pg_advisory_lock(hashtext({}))", lock_key(table));
        let ((locked, described, tracked_as, begun), read) = futures_util::future::join(
            futures_util::future::join4(
                self.client.batch_execute(&lock_sql),
                self.describe(table),
                // Probes for synapse.repair_tracked first (once per session, before the
                // snapshot's start): its query's preparation must not fail in the transaction.
                self.tracked_as(table),
                self.client.batch_execute(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL enable_sort = off; SET LOCAL synchronous_commit = off",
                ),
            ),
            // Sent after them (futures are polled in order, and each sends at its first poll).
            async {
                match tracked {
                    Some(bits) => Some(self.tracked_digests(table, bits, want).await),
                    None => None,
                }
            },
        )
        .await;
        let opened = locked
            .map_err(self.fail(format!("taking the check lock of {table}")))
            .and_then(|()| begun.map_err(self.fail("starting a snapshot".into())))
            .and_then(|()| Ok((described?, tracked_as?)));
        match (opened, read) {
            (Ok((shape, tracked_as)), read) => {
                let bits = tracked_as.and_then(|t| t.bits_for(&shape));
                let read = match read {
                    Some(Ok(r)) if bits == tracked => Some(r),
                    // Read with the table's tracking gone or changed: start over without.
                    Some(_) => {
                        self.close(table).await;
                        return Ok(Opened { shape, bits, tracked: None });
                    }
                    None => None,
                };
                Ok(Opened { shape, bits, tracked: read })
            }
            (Err(e), _) => {
                self.close(table).await;
                Err(e)
            }
        }
    }

    /// Rolls back what [`Node::open`] started and releases its lock (after a failure: errors
    /// are ignored, the session may be gone, and its lock with it).
    pub(crate) async fn close(&self, table: &str) {
        let _ = self.client.batch_execute(&format!("ROLLBACK; {}", unlock_sql(table))).await;
    }

    /// Ends the snapshot, releasing the lock [`Node::open`] took.
    pub(crate) async fn end(&self, table: &str) -> Result<(), RepairError> {
        self.client
            .batch_execute(&format!("COMMIT; {}", unlock_sql(table)))
            .await
            .map_err(self.fail("ending the snapshot".into()))
    }

    /// The rows of `subs`, sub-buckets of `fine` bits, found through the sub-bucket index of
    /// a tracked table (by a scan where the key has no hash function to index): the snapshot's
    /// last read, ended in the same round trip (see [`Node::last_read`]).
    pub(crate) async fn sub_bucket_rows(
        &self,
        shape: &Shape,
        fine: u8,
        subs: &[usize],
        applied: bool,
    ) -> Result<Ended, RepairError> {
        let wanted: Vec<i64> = subs.iter().map(|b| *b as i64).collect();
        let sql = format!(
            "SELECT {sub}, {key}, {hash} FROM {from} WHERE {sub} = ANY($1::int8[])",
            sub = shape.bucket(fine),
            key = shape.key_text,
            hash = shape.row_hash(),
            from = shape.from,
        );
        self.last_read(shape, (!subs.is_empty()).then_some(sql.as_str()), &[&wanted], applied).await
    }

    /// The rows of the given key-range sub-buckets (`fine` bits): (sub-bucket, key, row hash),
    /// through the primary key's index; the snapshot's last read (see [`Node::last_read`]).
    pub(crate) async fn range_rows(
        &self,
        shape: &Shape,
        fine: u8,
        (lo, span): (i64, i64),
        subs: &[usize],
        applied: bool,
    ) -> Result<Ended, RepairError> {
        let (from, to) = key_ranges(subs, fine, lo, span);
        let sql = shape.range_rows(&format!("{}, {}", shape.key_text, shape.row_hash()));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [&lo, &(1i64 << fine), &span, &from, &to];
        self.last_read(shape, (!subs.is_empty()).then_some(sql.as_str()), &params, applied).await
    }

    /// The staged rows of the given sub-buckets: (sub-bucket, key, row hash); the snapshot's
    /// last read, ended in the same round trip (see [`Node::last_read`]).
    pub(crate) async fn staged_rows(
        &self,
        shape: &Shape,
        fine_buckets: &[usize],
        applied: bool,
    ) -> Result<Ended, RepairError> {
        let wanted: Vec<i64> = fine_buckets.iter().map(|b| *b as i64).collect();
        let sql = "SELECT b, k, h FROM synapse_repair_rows WHERE b = ANY($1)";
        self.last_read(shape, (!fine_buckets.is_empty()).then_some(sql), &[&wanted], applied).await
    }

    /// Forgets the tracked digests read for `table` (their transaction did not commit).
    pub(crate) fn forget_tracked(&self, table: &str) {
        if let Ok(mut c) = self.tracked.lock() {
            c.remove(table);
        }
        if let Ok(mut c) = self.subs.lock() {
            c.remove(table);
        }
    }
}

/// A table opened for a check on one node: its shape, the bits its digests are tracked with
/// here (if tracked for this shape), and the tracked digests if they were read with the open.
pub(crate) struct Opened {
    pub shape: Shape,
    pub bits: Option<u8>,
    pub tracked: Option<TrackedRead>,
}

/// What the snapshot's last read returned: (sub-bucket, key, row hash) rows, and the applied
/// positions read right after its end (`None`: not asked for, or no applier ever ran here).
pub(crate) struct Ended {
    pub rows: Vec<(usize, Key, i64)>,
    pub applied: Option<Vec<(String, Lsn)>>,
}

/// Tracked digests as read in a check's snapshot.
pub struct TrackedRead {
    pub buckets: Buckets,
    /// Recorded changes folded into them by this read.
    pub folded: u64,
}

/// Sub-bucket digests by bucket: bucket → sub-bucket → (rows, hash sum).
pub(super) type SubsByBucket = BTreeMap<usize, BTreeMap<usize, (u64, u64)>>;

/// Records that the sub-bucket digests of `buckets` were read: `subs` (sub-bucket, rows, sum)
/// are all they have (a bucket without any is known too).
pub(super) fn remember_subs(known: &mut SubsByBucket, buckets: &[usize], subs: &[(usize, u64, u64)]) {
    for b in buckets {
        known.insert(*b, BTreeMap::new());
    }
    for (sub, n, s) in subs {
        known.entry(sub >> SUB_BUCKET_BITS).or_default().insert(*sub, (*n, *s));
    }
}

/// (sub-bucket, key, row hash) rows as read by `staged_rows` and `sub_bucket_rows`.
pub(super) fn keyed_rows(rows: Vec<tokio_postgres::Row>) -> Vec<(usize, Key, i64)> {
    rows.into_iter().map(|r| (r.get::<_, i64>(0).max(0) as usize, r.get(1), r.get(2))).collect()
}

/// The sub-bucket digests kept in digest rows `d`, as rows (bucket: the sub-bucket, n, s),
/// empty sub-buckets left out; a query to go on with `AND` conditions on `d`.
pub(super) fn sub_digest_rows() -> String {
    format!(
        "SELECT (d.bucket << {SUB_BUCKET_BITS}) + o - 1 AS bucket, d.sub_n[o] AS n, d.sub_s[o] AS s
         FROM synapse.repair_digest d, generate_series(1, {subs}) o WHERE d.sub_n[o] <> 0",
        subs = 1 << SUB_BUCKET_BITS
    )
}

/// The packed digests (see [`PACKED`]) of `rows`, a query of (b, h): bucket, row hash.
pub(super) fn digested(rows: &str) -> String {
    format!("SELECT {PACKED} FROM (SELECT b, count(*) AS n, sum(h) AS s FROM ({rows}) r GROUP BY b) g")
}

/// Every bucket's digest from a node's packed aggregate (buckets without rows are absent).
pub(super) fn packed_buckets(bits: u8, packed: Vec<u8>) -> Result<Buckets, RepairError> {
    let mut buckets = Buckets::new(bits)?;
    for (b, count, sum) in unpack(packed) {
        buckets.set(b, count, sum);
    }
    Ok(buckets)
}

pub(super) fn unpack(bytes: Vec<u8>) -> impl Iterator<Item = (usize, u64, u64)> {
    let word = |b: &[u8]| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
    let records: Vec<(usize, u64, u64)> =
        bytes.chunks_exact(20).map(|r| (word(&r[..4]) as usize, word(&r[4..12]), word(&r[12..20]))).collect();
    records.into_iter()
}

/// A bucket is split in 2^SUB_BUCKET_BITS sub-buckets: a differing bucket's sub-bucket
/// digests find its differing rows in about 1/32 of its rows.
pub(crate) const SUB_BUCKET_BITS: u8 = 5;

/// The sub-bucket bits of `bits`-bit buckets.
pub(crate) fn sub_bits(bits: u8) -> u8 {
    bits.saturating_add(SUB_BUCKET_BITS).min(40)
}

/// `expr` (a numeric sum of 64-bit hashes) mod 2^64, as a signed bigint.
pub(super) fn wrap(expr: &str) -> String {
    format!("(({expr}) - floor((({expr}) + 9223372036854775808) / 18446744073709551616) * 18446744073709551616)::int8")
}

/// A key: its columns' text, in key order.
pub type Key = Vec<String>;

/// Row hashes by key, as one node holds them.
pub type Rows = BTreeMap<Key, i64>;

/// How a table is read on a node: its key and value columns as row expressions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub name: String,
    /// `"schema"."table"`.
    pub table: String,
    /// How many of `columns` (the first ones) form the primary key.
    pub key_len: usize,
    /// Every column, key first: two nodes are compared only if these agree.
    pub columns: Vec<String>,
    /// What reads scan: the table as `t`, or the rows of its filter (see [`Node::filter_rows`]).
    from: String,
    /// The key columns' text, as an array.
    key_text: String,
    /// `t.k1 = u.k0::type AND …`: a key given as text matched through the key's index.
    key_match: String,
    /// The key's hash (buckets) and the row's hash, as SQL over `t`.
    key_hash: String,
    row_hash: String,
    /// The key's hash over unqualified columns, for an index expression.
    index_key_hash: String,
    /// `t."id"` when the key is one integer column: buckets can then be key ranges.
    int_key: Option<String>,
}

impl Shape {
    /// `JOIN unnest($1::text[], …) AS u(k0, …) ON <key match>` and its parameters: one text
    /// array per key column.
    pub(crate) fn key_join<'k>(&self, keys: &'k [Key]) -> (String, Vec<Vec<&'k str>>) {
        let width = self.key_len;
        let join = format!(
            "JOIN unnest({params}) AS u({aliases}) ON {cond}",
            params = (1..=width).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", "),
            aliases = (0..width).map(|i| format!("k{i}")).collect::<Vec<_>>().join(", "),
            cond = self.key_match,
        );
        let columns = (0..width).map(|i| keys.iter().map(|k| k.get(i).map_or("", String::as_str)).collect()).collect();
        (join, columns)
    }

    /// Whether the key is one integer column (see [`range_layout`]).
    pub(crate) fn int_key(&self) -> bool {
        self.int_key.is_some()
    }

    pub(crate) fn key_text(&self) -> &str {
        &self.key_text
    }

    /// The whole table as `t`, for writes (whatever the reads were filtered to).
    pub(crate) fn from(&self) -> String {
        format!("{} t", self.table)
    }

    /// The top `bits` bits of the key's hash (`>>` on int8 keeps the sign: masked).
    pub(super) fn bucket(&self, bits: u8) -> String {
        format!("(({} >> {}) & {})", self.key_hash, 64 - u32::from(bits), (1u64 << bits) - 1)
    }

    pub(super) fn row_hash(&self) -> String {
        self.row_hash.clone()
    }

    /// `SELECT <sub-bucket> AS b, <what> FROM <table> JOIN <key ranges>`: the rows of key
    /// ranges $4[i]..$5[i] through the key's index, each with its range bucket (key − $1)·$2/$3.
    pub(super) fn range_rows(&self, what: &str) -> String {
        let k = self.int_key.as_deref().unwrap_or("NULL");
        format!(
            "SELECT {bucket} AS b, {what} FROM {from}
             JOIN unnest($4::int8[], $5::int8[]) AS u(lo, hi) ON {k} >= u.lo AND {k} < u.hi",
            bucket = self.range_bucket(),
            from = self.from
        )
    }

    /// A row's key-range bucket (key − $1)·$2 / $3: lo, 2^bits, span (see [`range_layout`];
    /// [`key_ranges`] inverts it).
    pub(super) fn range_bucket(&self) -> String {
        format!("({}::int8 - $1::int8) * $2::int8 / $3::int8", self.int_key.as_deref().unwrap_or("NULL"))
    }

    pub(super) fn index_bucket(&self, bits: u8) -> String {
        format!("(({} >> {}) & {})", self.index_key_hash, 64 - u32::from(bits), (1u64 << bits) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The key ranges read for a bucket hold exactly the keys the SQL formula
        /// (key − lo)·2^bits / span puts in it, whatever the span and bits.
        #[test]
        fn key_ranges_match_the_bucket_formula(
            lo in -1_000_000_000i64..1_000_000_000,
            len in 0i64..100_000,
            bits in 1u8..22,
            probes in proptest::collection::vec(0.0f64..1.0, 1..40),
        ) {
            let (lo, span) = range_layout(&[Some(KeyRange { lo, hi: lo + len, rows: len as f64 + 1.0 }), None], bits).unwrap();
            prop_assert_eq!(span, len + 1);
            for p in probes {
                let k = lo + ((span - 1) as f64 * p) as i64;
                let bucket = (i128::from(k - lo) << bits) / i128::from(span);
                let (from, to) = key_ranges(&[bucket as usize], bits, lo, span);
                prop_assert!(from[0] <= k && k < to[0], "key {} bucket {} range {}..{}", k, bucket, from[0], to[0]);
            }
            // The ranges of all buckets tile lo..=hi without gaps.
            if bits <= 12 {
                let all: Vec<usize> = (0..1usize << bits).collect();
                let (from, to) = key_ranges(&all, bits, lo, span);
                prop_assert_eq!(from[0], lo);
                prop_assert_eq!(*to.last().unwrap(), lo + span);
                prop_assert!(from.iter().skip(1).zip(&to).all(|(f, t)| f == t));
            }
        }
    }

    #[test]
    fn sparse_keys_and_spans_that_could_overflow_use_hash_buckets() {
        let r = |lo: i64, hi: i64, rows: f64| Some(KeyRange { lo, hi, rows });
        assert_eq!(range_layout(&[None, None], 17), None);
        assert_eq!(range_layout(&[r(1, 10, 10.0), r(5, 20, 16.0)], 17), Some((1, 20)));
        // Overflow: (key − lo)·2^bits must stay a bigint, and so must the bound after hi.
        assert_eq!(range_layout(&[r(i64::MIN, 0, 1e18)], 17), None);
        assert_eq!(range_layout(&[r(0, i64::MAX, 1e18)], 1), None);
        assert_eq!(range_layout(&[r(i64::MAX - 5, i64::MAX - 1, 5.0)], 17), Some((i64::MAX - 5, 5)));
        // Sparse: one far key would put every row in one bucket; never analyzed: unknown.
        assert_eq!(range_layout(&[r(1, 1_000_000, 1e6), r(1, 2_000_000_000, 1e6)], 17), None);
        assert_eq!(range_layout(&[r(1, 16_000, 1_000.0)], 17), Some((1, 16_000)));
        assert_eq!(range_layout(&[r(1, 16_001, 1_000.0)], 17), None);
        assert_eq!(range_layout(&[r(1, 10, -1.0), r(1, 10, -1.0)], 17), None);
    }
}
