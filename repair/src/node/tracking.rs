//! Digests kept current by triggers (`synapse repair track`) and read by folding what changed.

use super::*;

impl Node {
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

    /// Starts keeping `shape`'s bucket digests current on this node (tables: the node schema):
    /// an expression index on the bucket (so rows of a bucket are found without a scan, when
    /// the key's hash is immutable), statement triggers recording per-bucket deltas of every
    /// write — the application's and the appliers' alike (`ENABLE ALWAYS`) — and the digests
    /// seeded from one scan while writes wait (SHARE lock). Idempotent: re-tracking re-seeds.
    /// Returns whether the bucket index exists.
    pub async fn track(&self, shape: &Shape, bits: u8) -> Result<bool, RepairError> {
        Buckets::new(bits)?;
        let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(shape.name.as_bytes()));
        let table = &shape.table;
        self.migrate().await?;
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
        let table = &shape.table;
        let name = quote::literal(&shape.name);
        self.migrate().await?;
        let sql = format!(
            "SET client_min_messages = warning;
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
    pub(super) async fn bucket_indexes(&self, shape: &Shape) -> Result<Vec<String>, RepairError> {
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
    pub(super) async fn drop_indexes(&self, shape: &Shape, indexes: &[String]) -> Result<(), RepairError> {
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

    pub(super) async fn tracked_as(&self, name: &str) -> Result<Option<Tracked>, RepairError> {
        const TABLE: &str = "synapse.repair_tracked";
        if self.row_filters.contains_key(name) {
            return Ok(None); // tracked digests are of every row
        }
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
    pub(super) fn tracked_before(&self, table: &str) -> Option<u8> {
        self.tracked.lock().ok().and_then(|c| c.get(table).map(|(_, _, b)| b.bits()))
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
pub(super) static FOLD_AND_READ: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
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
pub(super) const PACKED: &str = "coalesce(string_agg(int4send(b::int4) || int8send(n) || int8send((s - floor((s + 9223372036854775808) / 18446744073709551616) * 18446744073709551616)::int8), ''::bytea ORDER BY b), ''::bytea)";

/// The same for digests stored wrapped (bigint `bucket`, `n`, `s` columns).
pub(super) const PACKED_STORED: &str =
    "coalesce(string_agg(int4send(bucket::int4) || int8send(n) || int8send(s), ''::bytea ORDER BY bucket), ''::bytea)";

/// The tracking layout this version reads and writes (see the node schema's migration 1:
/// `synapse_postgres::node_schema`).
pub(super) const LAYOUT: i32 = 2;

/// What `synapse.repair_tracked` says of a table.
pub(super) struct Tracked {
    bits: u8,
    key_hash: String,
    row_hash: String,
}

impl Tracked {
    /// The bits, if the digests were made for `shape`'s current columns.
    pub(super) fn bits_for(&self, shape: &Shape) -> Option<u8> {
        (self.key_hash == shape.key_hash && self.row_hash == shape.row_hash).then_some(self.bits)
    }
}
