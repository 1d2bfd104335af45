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
const SESSION: &str = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres';
    SET extra_float_digits = 1; SET bytea_output = 'hex'; SET jit = off; SET plan_cache_mode = force_generic_plan;";

/// A connection to one node of a check.
pub struct Node {
    pub name: String,
    client: Client,
    /// Per table, the tracked digests last read (tracking's start, generation, digests): a
    /// later check on this session reads only the buckets folded since.
    tracked: std::sync::Mutex<std::collections::HashMap<String, (String, i64, Buckets)>>,
    /// Per table, sub-bucket digests of some buckets as of those digests (bucket → sub-bucket
    /// → (rows, hash sum)): valid while their bucket is not folded again.
    subs: std::sync::Mutex<std::collections::HashMap<String, SubsByBucket>>,
    /// Statements prepared on this session, by text: a session kept between checks (the
    /// admin API) then needs one round trip per query instead of two.
    statements: std::sync::Mutex<std::collections::HashMap<String, tokio_postgres::Statement>>,
    /// synapse's own tables this session has seen exist (see [`Node::has_table`]).
    tables_seen: std::sync::Mutex<std::collections::HashSet<&'static str>>,
    /// Tables found tracked in another layout, warned about once per session.
    stale_warned: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Node {
    pub async fn connect(name: &str, config: &tokio_postgres::Config) -> Result<Node, RepairError> {
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
        })
    }

    /// The session (no replication origin: what it writes is captured like an application's).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs a batch that opens a transaction, rolling it back if the batch fails midway (the
    /// session stays usable).
    async fn in_transaction(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let result = self.client.batch_execute(sql).await;
        if result.is_err() {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        result
    }

    /// `sql` prepared once per session.
    async fn stmt(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
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
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let stmt = self.stmt(sql).await?;
        self.client.query(&stmt, params).await
    }

    async fn row(
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
    async fn has_table(&self, table: &'static str) -> Result<bool, tokio_postgres::Error> {
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
    fn gone(&self, e: &tokio_postgres::Error, table: &'static str) -> bool {
        let gone = e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE);
        if let (true, Ok(mut seen)) = (gone, self.tables_seen.lock()) {
            seen.remove(table);
        }
        gone
    }

    fn fail(&self, context: String) -> impl FnOnce(tokio_postgres::Error) -> RepairError + '_ {
        move |source| RepairError::Node { node: self.name.clone(), context, source }
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
    async fn open_as(&self, table: &str, tracked: Option<u8>, want: &[usize]) -> Result<Opened, RepairError> {
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

    /// The key and other columns of `schema.table` on this node.
    pub async fn describe(&self, name: &str) -> Result<Shape, RepairError> {
        let bad = |message: String| RepairError::Table { table: name.to_owned(), message };
        let (schema, table) = name.split_once('.').ok_or_else(|| bad("name tables as schema.table".into()))?;
        let rows = self
            .rows(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                        -- int2vector subscripts start at 0: position + 1, 0 for non-key columns
                        coalesce(array_position(i.indkey::int2[], a.attnum) - array_lower(i.indkey::int2[], 1) + 1, 0),
                        -- the extended hash function of the type's default hash operator class
                        (SELECT p.amproc::regproc::text || '|' || pr.proargtypes[0]::regtype::text FROM pg_opclass oc
                                JOIN pg_proc pr ON true
                                JOIN pg_am am ON am.oid = oc.opcmethod AND am.amname = 'hash'
                                JOIN pg_amproc p ON p.amprocfamily = oc.opcfamily AND p.amprocnum = 2
                                 AND p.amproclefttype = oc.opcintype AND p.amprocrighttype = oc.opcintype
                         WHERE oc.opcdefault AND oc.opcintype = a.atttypid AND pr.oid = p.amproc
                           AND pr.proargtypes[0] = a.atttypid LIMIT 1)
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
        let mut hash_fn = std::collections::HashMap::new();
        for r in rows {
            let (col, ty, pos, h): (String, String, i32, Option<String>) = (r.get(0), r.get(1), r.get(2), r.get(3));
            if let Some(f) = h {
                hash_fn.insert(col.clone(), f);
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
        // Column i hashed with seed `base + i`; NULL hashes to the seed itself.
        // `q` qualifies columns: "t." in queries, "" in the bucket index's expression.
        let hashed = |cols: &[String], base: usize, q: &str| -> Vec<String> {
            cols.iter()
                .enumerate()
                .map(|(i, c)| {
                    let seed = base + i;
                    // Only a function taking exactly this type (timestamptz and date are served
                    // by timestamp's and int4's, binary-coercible but not castable): else text.
                    let (f, arg) =
                        hash_fn.get(c).and_then(|f: &String| f.split_once('|')).unwrap_or(("hashtextextended", "text"));
                    format!("coalesce({f}({q}{}::{arg}, {seed}::int8), {seed}::int8)", quote::ident(c))
                })
                .collect()
        };
        let key_hash = |q: &str| match (key.as_slice(), key.first().and_then(|k| hash_fn.get(k)?.split_once('|'))) {
            ([k], Some((f, arg))) => format!("{f}({q}{}::{arg}, 0::int8)", quote::ident(k)),
            _ => format!("hashint8extended({}, 0::int8)", hashed(&key, 101, q).join(" # ")),
        };
        let row_hash = format!("hashint8extended({}, 0::int8)", hashed(&all, 1, "t.").join(" # "));
        let (key_hash, index_key_hash) = (key_hash("t."), key_hash(""));
        Ok(Shape {
            name: name.to_owned(),
            table: format!("{}.{}", quote::ident(schema), quote::ident(table)),
            key_len: key.len(),
            from: format!("{}.{} t", quote::ident(schema), quote::ident(table)),
            key_text: format!(
                "ARRAY[{}]::text[]",
                key.iter().map(|c| format!("t.{}::text", quote::ident(c))).collect::<Vec<_>>().join(", ")
            ),
            key_match: key
                .iter()
                .zip(&key_types)
                .enumerate()
                .map(|(i, (c, ty))| format!("t.{} = u.k{i}::{ty}", quote::ident(c)))
                .collect::<Vec<_>>()
                .join(" AND "),
            key_hash,
            index_key_hash,
            row_hash,
            int_key: match (key.as_slice(), key_types.as_slice()) {
                ([k], [t]) if ["smallint", "integer", "bigint"].contains(&t.as_str()) => {
                    Some(format!("t.{}", quote::ident(k)))
                }
                _ => None,
            },
            columns: all,
        })
    }

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

    /// The sub-bucket digests of `buckets` kept by tracking (read in the snapshot, after
    /// [`Node::tracked_digests`] folded the recorded changes).
    pub async fn tracked_sub_digests(
        &self,
        shape: &Shape,
        buckets: &[usize],
    ) -> Result<BTreeMap<usize, (u64, u64)>, RepairError> {
        // Those known from this session's reads (their buckets not folded since) are not read.
        let mut out = BTreeMap::new();
        let mut missing = Vec::new();
        if let Ok(known) = self.subs.lock() {
            let known = known.get(&shape.name);
            for b in buckets {
                match known.and_then(|k| k.get(b)) {
                    Some(subs) => out.extend(subs.iter().map(|(sub, d)| (*sub, *d))),
                    None => missing.push(*b),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let wanted: Vec<i64> = missing.iter().map(|b| *b as i64).collect();
        let row = self
            .row(
                &format!(
                    "SELECT {PACKED_STORED} FROM ({} AND d.tbl = $1 AND d.bucket = ANY($2::int8[])) x",
                    sub_digest_rows()
                ),
                &[&shape.name, &wanted],
            )
            .await
            .map_err(self.fail(format!("reading the sub-bucket digests of {}", shape.name)))?;
        let read: Vec<(usize, u64, u64)> = unpack(row.get(0)).collect();
        if let Ok(mut known) = self.subs.lock() {
            remember_subs(known.entry(shape.name.clone()).or_default(), &missing, &read);
        }
        out.extend(read.into_iter().map(|(b, n, s)| (b, (n, s))));
        Ok(out)
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

    /// Runs `sql` (rows of sub-buckets `wanted`) as the snapshot's last read, with the
    /// snapshot's end (and, if `applied`, the applied positions) sent right behind it: one
    /// round trip. The statement is prepared first, so the read is sent before the COMMIT.
    async fn last_read(
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

    /// Starts keeping `shape`'s bucket digests current on this node (see [`TRACKING_DDL`]):
    /// an expression index on the bucket (so rows of a bucket are found without a scan, when
    /// the key's hash is immutable), statement triggers recording per-bucket deltas of every
    /// write — the application's and the appliers' alike (`ENABLE ALWAYS`) — and the digests
    /// seeded from one scan while writes wait (SHARE lock). Idempotent: re-tracking re-seeds.
    /// Returns whether the bucket index exists.
    pub async fn track(&self, shape: &Shape, bits: u8) -> Result<bool, RepairError> {
        Buckets::new(bits)?;
        let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(shape.name.as_bytes()));
        let table = shape.from.trim_end_matches(" t");
        self.client
            .batch_execute(&format!("SET client_min_messages = warning; {TRACKING_DDL}; RESET client_min_messages"))
            .await
            .map_err(self.fail("creating synapse.repair_* tables".into()))?;
        // Concurrently (no write lock, outside a transaction); a key hashed through its text
        // (not immutable) cannot be indexed: buckets are then found by a scan.
        let fine = sub_bits(bits);
        // On the sub-bucket: a bucket is a range of sub-buckets, and a differing sub-bucket's
        // rows are found without reading the rest of its bucket.
        let index = format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS synapse_repair_{id}_{fine} ON {table} (({}))",
            shape.index_bucket(fine)
        );
        let indexed = match self.client.batch_execute(&index).await {
            Ok(()) => true,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_OBJECT_DEFINITION) => false,
            Err(e) => {
                return Err(RepairError::Node {
                    node: self.name.clone(),
                    context: format!("indexing buckets of {}", shape.name),
                    source: e,
                })
            }
        };
        if indexed {
            // Statistics of the new expression: without them the planner expects one row per
            // bucket value… of the whole table, and scans instead of using the index.
            self.client
                .batch_execute(&format!("ANALYZE {table}"))
                .await
                .map_err(self.fail(format!("analyzing {}", shape.name)))?;
        }
        let name = quote::literal(&shape.name);
        let delta = |rows: &str, sign: &str| {
            format!(
                "SELECT {bucket} AS b, {sign}1 AS dn, {sign}({hash})::numeric AS dh FROM {rows} t",
                bucket = shape.bucket(fine),
                hash = shape.row_hash(),
            )
        };
        let sql = format!(
            "BEGIN;
             LOCK TABLE {table} IN SHARE MODE;
             -- Fixed settings: values hashed through their text must print as in a check.
             CREATE OR REPLACE FUNCTION synapse.repair_delta_{id}() RETURNS trigger LANGUAGE plpgsql
             SET DateStyle = 'ISO, YMD' SET TimeZone = 'UTC' SET IntervalStyle = 'postgres'
             SET extra_float_digits = 1 SET bytea_output = 'hex' AS $fn$
             BEGIN
                 IF TG_OP = 'TRUNCATE' THEN
                     -- Digests of a truncated table start over: checks scan until tracked again.
                     DELETE FROM synapse.repair_tracked WHERE tbl = {name};
                     DELETE FROM synapse.repair_delta WHERE tbl = {name};
                     DELETE FROM synapse.repair_digest WHERE tbl = {name};
                 ELSIF TG_OP = 'INSERT' THEN
                     INSERT INTO synapse.repair_delta SELECT {name}, b, sum(dn), sum(dh) FROM ({new}) x GROUP BY b;
                 ELSIF TG_OP = 'DELETE' THEN
                     INSERT INTO synapse.repair_delta SELECT {name}, b, sum(dn), sum(dh) FROM ({old}) x GROUP BY b;
                 ELSE
                     INSERT INTO synapse.repair_delta SELECT {name}, b, sum(dn), sum(dh)
                     FROM ({old} UNION ALL {new}) x GROUP BY b;
                 END IF;
                 RETURN NULL;
             END $fn$;
             DROP TRIGGER IF EXISTS synapse_repair_insert ON {table};
             DROP TRIGGER IF EXISTS synapse_repair_update ON {table};
             DROP TRIGGER IF EXISTS synapse_repair_delete ON {table};
             DROP TRIGGER IF EXISTS synapse_repair_truncate ON {table};
             CREATE TRIGGER synapse_repair_insert AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION synapse.repair_delta_{id}();
             CREATE TRIGGER synapse_repair_update AFTER UPDATE ON {table} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION synapse.repair_delta_{id}();
             CREATE TRIGGER synapse_repair_delete AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION synapse.repair_delta_{id}();
             CREATE TRIGGER synapse_repair_truncate AFTER TRUNCATE ON {table}
                 FOR EACH STATEMENT EXECUTE FUNCTION synapse.repair_delta_{id}();
             -- Appliers write in the replica role: their changes must count too.
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER synapse_repair_insert, ENABLE ALWAYS TRIGGER synapse_repair_update,
                 ENABLE ALWAYS TRIGGER synapse_repair_delete, ENABLE ALWAYS TRIGGER synapse_repair_truncate;
             DELETE FROM synapse.repair_delta WHERE tbl = {name};
             DELETE FROM synapse.repair_digest WHERE tbl = {name};
             DELETE FROM synapse.repair_subdigest WHERE tbl = {name};
             SET LOCAL enable_sort = off;
             -- A row per bucket holding rows, with all its sub-buckets' digests (0 for empty ones).
             INSERT INTO synapse.repair_digest (tbl, bucket, n, s, gen, sub_n, sub_s)
                 WITH subs AS MATERIALIZED (SELECT b, count(*) AS n, sum(h) AS s
                                            FROM (SELECT {bucket} AS b, {hash} AS h FROM {from}) r GROUP BY b)
                 SELECT {name}, x.bucket, sum(x.n), {wrapped_s}, 0, array_agg(x.n ORDER BY x.o), array_agg({wrapped_sub} ORDER BY x.o)
                 FROM (SELECT c.bucket, o, coalesce(f.n, 0) AS n, coalesce(f.s, 0) AS s
                       FROM (SELECT DISTINCT b >> {shift} AS bucket FROM subs) c
                       CROSS JOIN generate_series(0, {last_sub}) o
                       LEFT JOIN subs f ON f.b = (c.bucket << {shift}) + o) x
                 GROUP BY x.bucket;
             INSERT INTO synapse.repair_tracked (tbl, bits, sub_bits, key_hash, row_hash, layout)
                 VALUES ({name}, {bits}, {fine}, {kh}, {rh}, {LAYOUT})
                 ON CONFLICT (tbl) DO UPDATE SET bits = excluded.bits, sub_bits = excluded.sub_bits,
                     key_hash = excluded.key_hash, row_hash = excluded.row_hash, tracked_at = now(), gen = 0,
                     layout = excluded.layout;
             COMMIT;",
            new = delta("new_rows", ""),
            old = delta("old_rows", "-"),
            bucket = shape.bucket(fine),
            shift = SUB_BUCKET_BITS,
            last_sub = (1 << SUB_BUCKET_BITS) - 1,
            wrapped_s = wrap("sum(x.s)"),
            wrapped_sub = wrap("x.s"),
            hash = shape.row_hash(),
            from = shape.from,
            kh = quote::literal(&shape.key_hash),
            rh = quote::literal(&shape.row_hash),
        );
        self.in_transaction(&sql).await.map_err(self.fail(format!("tracking {}", shape.name)))?;
        // Statistics of the new digests, so that reads of a few use their keys.
        self.client
            .batch_execute("ANALYZE synapse.repair_digest")
            .await
            .map_err(self.fail(format!("analyzing the digests of {}", shape.name)))?;
        // Indexes of an earlier tracking with other bits are of no use now.
        let current = format!("synapse_repair_{id}_{fine}");
        let stale: Vec<String> =
            self.bucket_indexes(shape).await?.into_iter().filter(|i| !i.ends_with(&current)).collect();
        self.drop_indexes(shape, &stale).await?;
        Ok(indexed)
    }

    /// Stops tracking `shape` on this node: its triggers, function, bucket index and digests
    /// go. Idempotent.
    pub async fn untrack(&self, shape: &Shape) -> Result<(), RepairError> {
        let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(shape.name.as_bytes()));
        let table = shape.from.trim_end_matches(" t");
        let name = quote::literal(&shape.name);
        let sql = format!(
            "SET client_min_messages = warning;
             {TRACKING_DDL};
             BEGIN;
             DROP TRIGGER IF EXISTS synapse_repair_insert ON {table};
             DROP TRIGGER IF EXISTS synapse_repair_update ON {table};
             DROP TRIGGER IF EXISTS synapse_repair_delete ON {table};
             DROP TRIGGER IF EXISTS synapse_repair_truncate ON {table};
             DROP FUNCTION IF EXISTS synapse.repair_delta_{id}();
             DELETE FROM synapse.repair_tracked WHERE tbl = {name};
             DELETE FROM synapse.repair_delta WHERE tbl = {name};
             DELETE FROM synapse.repair_digest WHERE tbl = {name};
             DELETE FROM synapse.repair_subdigest WHERE tbl = {name};
             COMMIT;
             RESET client_min_messages;"
        );
        self.in_transaction(&sql).await.map_err(self.fail(format!("untracking {}", shape.name)))?;
        // On its own: CONCURRENTLY cannot run in a (multi-statement, implicit) transaction.
        let indexes = self.bucket_indexes(shape).await?;
        self.drop_indexes(shape, &indexes).await
    }

    /// The bucket indexes `track` made on `shape`'s table (schema-qualified, quoted).
    async fn bucket_indexes(&self, shape: &Shape) -> Result<Vec<String>, RepairError> {
        let schema = shape.name.split_once('.').map_or("public", |(s, _)| s);
        let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(shape.name.as_bytes()));
        Ok(self
            .client
            .query(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(indexname) FROM pg_indexes
                 WHERE schemaname = $1 AND indexname LIKE $2",
                &[&schema, &format!("synapse_repair_{id}%")],
            )
            .await
            .map_err(self.fail(format!("finding the bucket index of {}", shape.name)))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// One at a time: CONCURRENTLY cannot run in a (multi-statement, implicit) transaction.
    async fn drop_indexes(&self, shape: &Shape, indexes: &[String]) -> Result<(), RepairError> {
        for index in indexes {
            self.client
                .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}"))
                .await
                .map_err(self.fail(format!("dropping the bucket index of {}", shape.name)))?;
        }
        Ok(())
    }

    /// The bucket bits `shape` is tracked with here, if its digests are kept current and were
    /// set up for the table's current columns (a changed table must be tracked again).
    pub async fn tracked_bits(&self, shape: &Shape) -> Result<Option<u8>, RepairError> {
        Ok(self.tracked_as(&shape.name).await?.and_then(|t| t.bits_for(shape)))
    }

    async fn tracked_as(&self, name: &str) -> Result<Option<Tracked>, RepairError> {
        const TABLE: &str = "synapse.repair_tracked";
        if !self.has_table(TABLE).await.map_err(self.fail(format!("reading {TABLE}")))? {
            return Ok(None);
        }
        // As JSON: a table tracked by an older version may lack columns this one reads.
        let row = self.rows("SELECT to_jsonb(t)::text FROM synapse.repair_tracked t WHERE t.tbl = $1", &[&name]).await;
        match row {
            Ok(r) => {
                let Some(r) = r.first() else { return Ok(None) };
                let v: serde_json::Value = serde_json::from_str(r.get(0)).unwrap_or_default();
                let (bits, sub_bits) = (v["bits"].as_i64().unwrap_or(-1), v["sub_bits"].as_i64());
                if v["layout"].as_i64().unwrap_or(1) != i64::from(LAYOUT)
                    || sub_bits != Some(bits + i64::from(SUB_BUCKET_BITS))
                {
                    if self.stale_warned.lock().is_ok_and(|mut w| w.insert(name.to_owned())) {
                        tracing::warn!(
                            table = name,
                            node = %self.name,
                            "tracked by an older version of synapse: checks scan it until `synapse repair track` runs again"
                        );
                    }
                    return Ok(None);
                }
                Ok(Some(Tracked {
                    bits: bits.clamp(0, 64) as u8,
                    key_hash: v["key_hash"].as_str().unwrap_or_default().to_owned(),
                    row_hash: v["row_hash"].as_str().unwrap_or_default().to_owned(),
                }))
            }
            Err(e) if self.gone(&e, TABLE) => Ok(None),
            Err(e) => Err(self.fail(format!("reading {TABLE}"))(e)),
        }
    }

    /// The tracked digests as of this snapshot: folds the deltas committed before it into the
    /// digests (cost ∝ changes since the last check) and reads them, in one statement.
    /// Returns the digests and how many deltas were folded. Sub-bucket digests of buckets in
    /// `want` come along where this session does not know them as of now (kept for
    /// [`Node::tracked_sub_digests`]).
    pub async fn tracked_digests(&self, table: &str, bits: u8, want: &[usize]) -> Result<TrackedRead, RepairError> {
        // What this session read last (dropped if made with other bits): only buckets folded
        // since are read, if tracking has not restarted since (then all of them).
        let cached = self.tracked.lock().ok().and_then(|c| c.get(table).cloned()).filter(|(_, _, b)| b.bits() == bits);
        let (since_at, since_gen) = cached.as_ref().map_or((String::new(), -1), |(at, gen, _)| (at.clone(), *gen));
        // The statement: see [`FOLD_AND_READ`].
        // Wanted buckets this session does not know the sub-bucket digests of. Only when this
        // session read the digests before: a new process (the CLI) reads only what its check
        // needs, later.
        let unknown: Vec<i64> = match self.subs.lock() {
            Ok(known) if since_gen >= 0 => {
                let known = known.get(table);
                want.iter().filter(|b| known.is_none_or(|k| !k.contains_key(b))).map(|b| *b as i64).collect()
            }
            _ => Vec::new(),
        };
        let want: Vec<i64> = want.iter().map(|b| *b as i64).collect();
        let rows = self
            .rows(&FOLD_AND_READ, &[&table, &since_at, &since_gen, &want, &unknown])
            .await
            .map_err(self.fail(format!("folding the changes of {table} into its digests")))?;
        let Some(row) = rows.first() else {
            return Err(RepairError::Table {
                table: table.to_owned(),
                message: format!("tracking stopped on {} during the check (a TRUNCATE?); check again", self.name),
            });
        };
        let (at, before, after): (String, i64, Option<i64>) = (row.get(0), row.get(1), row.get(2));
        let folded = row.get::<_, i64>(3).max(0) as u64;
        let (ours, ours_fine, others, read): (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) =
            (row.get(4), row.get(5), row.get(6), row.get(7));
        let continued = since_gen >= 0 && since_at == at && before >= since_gen;
        let mut buckets = match cached {
            Some((_, _, b)) if continued => b,
            _ => Buckets::new(bits)?,
        };
        // Others' folds first: this fold's digests are newer.
        let mut others_folded = Vec::new();
        for (b, n, s) in unpack(others) {
            buckets.set(b, n, s);
            others_folded.push(b);
        }
        for (b, n, s) in unpack(ours) {
            buckets.set(b, n, s);
        }
        if let Ok(mut known) = self.subs.lock() {
            let known = known.entry(table.to_owned()).or_default();
            if !continued {
                known.clear();
            }
            for b in &others_folded {
                known.remove(b);
            }
            if continued {
                let wanted: std::collections::BTreeSet<i64> = want.iter().copied().collect();
                let read_buckets: Vec<usize> = others_folded
                    .iter()
                    .copied()
                    .filter(|b| wanted.contains(&(*b as i64)))
                    .chain(unknown.iter().map(|b| *b as usize))
                    .collect();
                remember_subs(known, &read_buckets, &unpack(read).collect::<Vec<_>>());
            }
            // This fold's sub-bucket digests update the buckets known (the rest stay unknown);
            // an emptied sub-bucket is left out, as reads leave it out.
            for (sub, n, s) in unpack(ours_fine) {
                if let Some(subs) = known.get_mut(&(sub >> SUB_BUCKET_BITS)) {
                    match (n, s) {
                        (0, 0) => subs.remove(&sub),
                        _ => subs.insert(sub, (n, s)),
                    };
                }
            }
        }
        if let Ok(mut c) = self.tracked.lock() {
            c.insert(table.to_owned(), (at, after.unwrap_or(before), buckets.clone()));
        }
        Ok(TrackedRead { buckets, folded })
    }

    /// The bits of the tracked digests this session last read for `table`, if any: a check
    /// with these bits can read them again in the round trip that opens the snapshot.
    fn tracked_before(&self, table: &str) -> Option<u8> {
        self.tracked.lock().ok().and_then(|c| c.get(table).map(|(_, _, b)| b.bits()))
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
    async fn by_key(
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

    /// Writes a cut marker into this node's WAL (a transactional logical message, so its
    /// transaction reaches the log and every applier of this node records passing it) and
    /// returns its position: a change committed before it is applied elsewhere once the
    /// applier's position is past it.
    pub async fn mark_cut(&self) -> Result<Lsn, RepairError> {
        let row = self
            .row("SELECT pg_logical_emit_message(true, 'synapse_repair_cut', '')::text", &[])
            .await
            .map_err(self.fail("writing a cut marker (pg_logical_emit_message)".into()))?;
        Ok(row.get::<_, String>(0).parse().unwrap_or(Lsn(0)))
    }

    /// Positions this node's appliers have applied, by source node: the commit position of
    /// each source's last applied transaction. `None`: no applier ever ran on this node.
    pub async fn applied(&self) -> Result<Option<Vec<(String, Lsn)>>, RepairError> {
        const TABLE: &str = "synapse.applied";
        let fail = self.fail("reading applied positions".into());
        // No such table: this node applies nothing.
        if !self.has_table(TABLE).await.map_err(fail)? {
            return Ok(None);
        }
        let rows = match self.rows("SELECT source_node, commit_lsn::text FROM synapse.applied", &[]).await {
            Ok(rows) => rows,
            Err(e) if self.gone(&e, TABLE) => return Ok(None),
            Err(e) => return Err(self.fail("reading applied positions".into())(e)),
        };
        Ok(Some(rows.into_iter().map(|r| (r.get(0), r.get::<_, String>(1).parse().unwrap_or(Lsn(0)))).collect()))
    }
}

/// The statement of [`Node::tracked_digests`] ($1 table, $2/$3 the tracking start and fold
/// number the session read last, $4 wanted buckets, $5 those of them it does not know).
/// Deltas are per sub-bucket: summed by bucket and folded into the bucket's digest and
/// its changed sub-buckets' array elements, one row per bucket (most buckets change in
/// one sub-bucket per fold: that element is replaced; with more, the arrays are added
/// element-wise). The fold's bucket rows are stamped with its number, and it returns
/// every digest it changed, bucket and sub-bucket: the session's copies are brought up
/// to date with them. The reads in the same statement see the digests as they were
/// before the fold, i.e. with every other session's folds: those since this session's
/// read are read (only when there are any: the fold numbers say), and the sub-bucket
/// digests asked for. One statement, not a fold then a read: the read cost ~1 ms a node
/// of a ~8 ms check (server log), mostly looking up the wanted buckets' sub-bucket
/// digests again after each fold. A bucket without a row yet is inserted: an insert
/// that meets a row `track` re-seeded meanwhile fails the check (retried), as an update
/// of a row it replaced would.
static FOLD_AND_READ: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    // A bucket's sub-bucket array `base` plus the deltas `c.{delta}` at positions `c.pos`,
    // element by element (`value` of the element a and the delta).
    let added = |base: &str, delta: &str, value: &str| {
        format!(
            "(SELECT array_agg({value} ORDER BY o) FROM unnest({base}) WITH ORDINALITY u(a, o)
              LEFT JOIN unnest(c.pos, c.{delta}) x(p, {delta}) ON x.p = u.o)"
        )
    };
    let (add_n, add_s) = ("a + coalesce(x.dn, 0)", wrap("a::numeric + coalesce(x.ds, 0)"));
    // A bucket without a row yet starts from empty sub-buckets.
    let zeros = format!("array_fill(0::int8, ARRAY[{}])", 1 << SUB_BUCKET_BITS);
    format!(
        "WITH t AS (SELECT tracked_at::text AS at, gen FROM synapse.repair_tracked WHERE tbl = $1),
          gone AS (DELETE FROM synapse.repair_delta WHERE tbl = $1 RETURNING bucket, n, s),
          g AS (UPDATE synapse.repair_tracked SET gen = gen + 1
                WHERE tbl = $1 AND EXISTS (SELECT 1 FROM gone) RETURNING gen),
          fine AS (SELECT bucket, sum(n) AS n, sum(s) AS s FROM gone GROUP BY bucket),
          -- Per bucket: its delta, and its changed sub-buckets' (1-based array positions).
          coarse AS (SELECT bucket >> {SUB_BUCKET_BITS} AS bucket, sum(n) AS n, sum(s) AS s,
                   array_agg((bucket & {last_sub})::int4 + 1) AS pos, array_agg(n) AS dn, array_agg(s) AS ds
                   FROM fine GROUP BY bucket >> {SUB_BUCKET_BITS}),
          -- One changed sub-bucket (most buckets in a fold): that element's slice is
          -- assigned; more: the whole array, added element-wise (pgbench, 100 changes:
          -- 1.11 ms a fold, 1.37 with the arrays rebuilt by concatenation).
          up AS (UPDATE synapse.repair_digest d
                   SET n = d.n + c.n, s = {add}, gen = coalesce((SELECT gen FROM g), 0),
                   sub_n[c.lo:c.hi] = CASE WHEN c.lo = c.hi THEN ARRAY[d.sub_n[c.lo] + c.dn[1]]
                       ELSE {sum_n} END,
                   sub_s[c.lo:c.hi] = CASE WHEN c.lo = c.hi THEN ARRAY[{add_one}]
                       ELSE {sum_s} END
                   FROM (SELECT *, CASE WHEN cardinality(pos) = 1 THEN pos[1] ELSE 1 END AS lo,
                                   CASE WHEN cardinality(pos) = 1 THEN pos[1] ELSE {subs} END AS hi FROM coarse) c
                   -- The rows by the key's index (the list), not by a scan into a hash
                   -- join: digest rows are wide (the arrays), measured 3.5 → 0.9 ms.
                   WHERE d.tbl = $1 AND d.bucket = c.bucket AND d.bucket = ANY (ARRAY(SELECT bucket FROM coarse))
                   RETURNING d.bucket, d.n, d.s, d.sub_n, d.sub_s, c.pos),
          new AS (INSERT INTO synapse.repair_digest (tbl, bucket, n, s, gen, sub_n, sub_s)
                   SELECT $1, c.bucket, c.n, {sum}, coalesce((SELECT gen FROM g), 0), {new_n}, {new_s}
                   FROM coarse c WHERE c.bucket NOT IN (SELECT bucket FROM up)
                   RETURNING bucket, n, s, sub_n, sub_s)
         SELECT t.at, t.gen, (SELECT gen FROM g), (SELECT count(*) FROM gone),
            (SELECT {PACKED_STORED} FROM (SELECT bucket, n, s FROM up UNION ALL SELECT bucket, n, s FROM new) x),
            (SELECT {PACKED_STORED} FROM (
               SELECT (u.bucket << {SUB_BUCKET_BITS}) + p - 1 AS bucket, u.sub_n[p] AS n, u.sub_s[p] AS s
               FROM up u, unnest(u.pos) p
               UNION ALL
               SELECT (w.bucket << {SUB_BUCKET_BITS}) + o - 1, w.sub_n[o], w.sub_s[o]
               FROM new w, generate_series(1, {subs}) o) x),
            -- Folded by others since this session's read: every bucket if it read none.
            (SELECT {PACKED_STORED} FROM synapse.repair_digest d
             WHERE d.tbl = $1 AND NOT (t.at = $2 AND t.gen = $3::int8)
               AND d.gen > CASE WHEN t.at = $2 AND t.gen >= $3::int8 THEN $3::int8 ELSE -1 END),
            -- Sub-bucket digests: of the buckets of $4 (those a check wants: they differed
            -- last time) that others folded since, and of $5 (wanted, not known yet).
            -- (Each part gated by a condition on t alone: checked once, not per row.)
            (SELECT {PACKED_STORED} FROM (
               {subs_of} AND d.tbl = $1 AND d.bucket = ANY($4::int8[]) AND d.gen > $3::int8
                 AND t.at = $2 AND $3::int8 >= 0 AND t.gen > $3::int8
               UNION ALL
               {subs_of} AND d.tbl = $1 AND d.bucket = ANY($5::int8[])
                 AND t.at = $2 AND $3::int8 >= 0 AND t.gen >= $3::int8) x)
         FROM t",
        subs = 1 << SUB_BUCKET_BITS,
        subs_of = sub_digest_rows(),
        last_sub = (1 << SUB_BUCKET_BITS) - 1,
        sum = wrap("c.s"),
        add = wrap("d.s::numeric + c.s"),
        add_one = wrap("d.sub_s[c.lo]::numeric + c.ds[1]"),
        sum_n = added("d.sub_n", "dn", add_n),
        sum_s = added("d.sub_s", "ds", &add_s),
        new_n = added(&zeros, "dn", add_n),
        new_s = added(&zeros, "ds", &add_s),
    )
});

/// Per bucket `b`, `n` rows and `s` their hashes' sum (numeric) as 20 bytes — b (4), n (8),
/// s mod 2^64 (8), big-endian — all buckets in one bytea: a few bytes a bucket on the wire.
const PACKED: &str = "coalesce(string_agg(int4send(b::int4) || int8send(n) || int8send((s - floor((s + 9223372036854775808) / 18446744073709551616) * 18446744073709551616)::int8), ''::bytea ORDER BY b), ''::bytea)";

/// The same for digests stored wrapped (bigint `bucket`, `n`, `s` columns).
const PACKED_STORED: &str =
    "coalesce(string_agg(int4send(bucket::int4) || int8send(n) || int8send(s), ''::bytea ORDER BY bucket), ''::bytea)";

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
type SubsByBucket = BTreeMap<usize, BTreeMap<usize, (u64, u64)>>;

/// Records that the sub-bucket digests of `buckets` were read: `subs` (sub-bucket, rows, sum)
/// are all they have (a bucket without any is known too).
fn remember_subs(known: &mut SubsByBucket, buckets: &[usize], subs: &[(usize, u64, u64)]) {
    for b in buckets {
        known.insert(*b, BTreeMap::new());
    }
    for (sub, n, s) in subs {
        known.entry(sub >> SUB_BUCKET_BITS).or_default().insert(*sub, (*n, *s));
    }
}

/// (sub-bucket, key, row hash) rows as read by `staged_rows` and `sub_bucket_rows`.
fn keyed_rows(rows: Vec<tokio_postgres::Row>) -> Vec<(usize, Key, i64)> {
    rows.into_iter().map(|r| (r.get::<_, i64>(0).max(0) as usize, r.get(1), r.get(2))).collect()
}

/// The sub-bucket digests kept in digest rows `d`, as rows (bucket: the sub-bucket, n, s),
/// empty sub-buckets left out; a query to go on with `AND` conditions on `d`.
fn sub_digest_rows() -> String {
    format!(
        "SELECT (d.bucket << {SUB_BUCKET_BITS}) + o - 1 AS bucket, d.sub_n[o] AS n, d.sub_s[o] AS s
         FROM synapse.repair_digest d, generate_series(1, {subs}) o WHERE d.sub_n[o] <> 0",
        subs = 1 << SUB_BUCKET_BITS
    )
}

/// The packed digests (see [`PACKED`]) of `rows`, a query of (b, h): bucket, row hash.
fn digested(rows: &str) -> String {
    format!("SELECT {PACKED} FROM (SELECT b, count(*) AS n, sum(h) AS s FROM ({rows}) r GROUP BY b) g")
}

/// Every bucket's digest from a node's packed aggregate (buckets without rows are absent).
fn packed_buckets(bits: u8, packed: Vec<u8>) -> Result<Buckets, RepairError> {
    let mut buckets = Buckets::new(bits)?;
    for (b, count, sum) in unpack(packed) {
        buckets.set(b, count, sum);
    }
    Ok(buckets)
}

fn unpack(bytes: Vec<u8>) -> impl Iterator<Item = (usize, u64, u64)> {
    let word = |b: &[u8]| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
    let records: Vec<(usize, u64, u64)> =
        bytes.chunks_exact(20).map(|r| (word(&r[..4]) as usize, word(&r[4..12]), word(&r[12..20]))).collect();
    records.into_iter()
}

/// Digests kept current by triggers (see [`Node::track`]): per table and bucket a row with the
/// bucket's digest and, in two arrays, its sub-buckets' (sums mod 2^64 as bigint, so reading
/// them is cheap); the deltas statements recorded since the last check, per sub-bucket
/// (append-only: writers never contend on a digest row); and what the digests were made with.
/// Layout 2: a fold touches one row per changed bucket, where layout 1 (a row per sub-bucket in
/// `repair_subdigest` besides the bucket's) touched two (fold of 100 changes, pgbench, generic
/// plans: 1.49–1.67 → 1.10–1.14 ms). A table tracked in another layout is scanned until
/// tracked again; `repair_subdigest` stays for the TRUNCATE triggers of such trackings.
pub const TRACKING_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS synapse;
CREATE TABLE IF NOT EXISTS synapse.repair_digest (
    tbl text NOT NULL, bucket bigint NOT NULL, n bigint NOT NULL, s bigint NOT NULL, PRIMARY KEY (tbl, bucket));
CREATE TABLE IF NOT EXISTS synapse.repair_delta (tbl text NOT NULL, bucket bigint NOT NULL, n bigint NOT NULL, s numeric NOT NULL);
CREATE INDEX IF NOT EXISTS repair_delta_tbl ON synapse.repair_delta (tbl);
-- The fold that last changed a bucket: readers that hold older digests read only newer rows.
-- sub_n, sub_s: the bucket's sub-buckets' row counts and hash sums, in sub-bucket order.
ALTER TABLE synapse.repair_digest ADD COLUMN IF NOT EXISTS gen bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS sub_n bigint[], ADD COLUMN IF NOT EXISTS sub_s bigint[];
CREATE TABLE IF NOT EXISTS synapse.repair_tracked (
    tbl text PRIMARY KEY, bits integer NOT NULL, key_hash text NOT NULL, row_hash text NOT NULL,
    tracked_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS synapse.repair_subdigest (
    tbl text NOT NULL, bucket bigint NOT NULL, n bigint NOT NULL, s bigint NOT NULL, PRIMARY KEY (tbl, bucket));
-- gen: the last fold's number.
ALTER TABLE synapse.repair_tracked ADD COLUMN IF NOT EXISTS sub_bits integer,
    ADD COLUMN IF NOT EXISTS gen bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS layout integer NOT NULL DEFAULT 1;
-- Every fold updates a digest row per changed bucket: room on each page keeps those updates
-- HOT (no index entry), measured 3.5 → 2.1 ms a fold of 100 changes. For the same reason gen
-- has no index: finding the newer buckets scans a few thousand rows (~0.5 ms).
ALTER TABLE synapse.repair_digest SET (fillfactor = 50)";

/// The tracking layout this version reads and writes (see [`TRACKING_DDL`]).
const LAYOUT: i32 = 2;

/// What `synapse.repair_tracked` says of a table.
struct Tracked {
    bits: u8,
    key_hash: String,
    row_hash: String,
}

impl Tracked {
    /// The bits, if the digests were made for `shape`'s current columns.
    fn bits_for(&self, shape: &Shape) -> Option<u8> {
        (self.key_hash == shape.key_hash && self.row_hash == shape.row_hash).then_some(self.bits)
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
const MAX_SPAN_PER_ROW: f64 = 16.0;

/// The key ranges [from, to) of the given buckets of 2^bits over `lo..lo + span`: bucket b
/// holds the keys with b·span ≤ (key − lo)·2^bits < (b + 1)·span.
fn key_ranges(buckets: &[usize], bits: u8, lo: i64, span: i64) -> (Vec<i64>, Vec<i64>) {
    let n = 1i128 << bits;
    let bound = |b: i128| -> i64 {
        let offset = (b * i128::from(span) + n - 1) / n; // ceil(b·span / n)
        (i128::from(lo) + offset).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    };
    buckets.iter().map(|b| (bound(*b as i128), bound(*b as i128 + 1))).unzip()
}

/// The advisory lock key of checks of `table` (an SQL literal).
fn lock_key(table: &str) -> String {
    quote::literal(&format!("synapse_repair:{table}"))
}

fn unlock_sql(table: &str) -> String {
    format!("SELECT pg_advisory_unlock(hashtext({}));", lock_key(table))
}

/// A bucket is split in 2^SUB_BUCKET_BITS sub-buckets: a differing bucket's sub-bucket
/// digests find its differing rows in about 1/32 of its rows.
pub(crate) const SUB_BUCKET_BITS: u8 = 5;

/// The sub-bucket bits of `bits`-bit buckets.
pub(crate) fn sub_bits(bits: u8) -> u8 {
    bits.saturating_add(SUB_BUCKET_BITS).min(40)
}

/// `expr` (a numeric sum of 64-bit hashes) mod 2^64, as a signed bigint.
fn wrap(expr: &str) -> String {
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

    pub(crate) fn from(&self) -> &str {
        &self.from
    }

    /// The top `bits` bits of the key's hash (`>>` on int8 keeps the sign: masked).
    fn bucket(&self, bits: u8) -> String {
        format!("(({} >> {}) & {})", self.key_hash, 64 - u32::from(bits), (1u64 << bits) - 1)
    }

    fn row_hash(&self) -> String {
        self.row_hash.clone()
    }

    /// `SELECT <sub-bucket> AS b, <what> FROM <table> JOIN <key ranges>`: the rows of key
    /// ranges $4[i]..$5[i] through the key's index, each with its range bucket (key − $1)·$2/$3.
    fn range_rows(&self, what: &str) -> String {
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
    fn range_bucket(&self) -> String {
        format!("({}::int8 - $1::int8) * $2::int8 / $3::int8", self.int_key.as_deref().unwrap_or("NULL"))
    }

    fn index_bucket(&self, bits: u8) -> String {
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
