//! The buffer of a peer's changes to mesh tables within one target transaction, resolved
//! against the local rows at flush.

use super::*;

/// What a mesh table's change leaves for its key at the end of the buffered transactions.
pub(super) enum Final {
    Upsert(Values),
    Delete,
}

/// Changes of whole source transactions from one peer, buffered until the target transaction
/// commits (a row's change and its `row_version` change arrive apart: AFTER ROW triggers run at
/// the end of the statement, after all its rows).
#[derive(Default)]
pub struct MeshBuffer {
    pub(super) tables: HashMap<String, MeshTable>,
    pub(super) rows: BTreeMap<(String, Vec<String>), Final>,
    pub(super) versions: HashMap<(String, Vec<String>), Side>,
}

pub(super) fn text(v: Value<'_>) -> Option<Option<String>> {
    match v {
        Value::Null => Some(None),
        Value::UnchangedToast => None,
        Value::Text(s) => Some(Some(s.to_owned())),
    }
}

pub(super) fn key_of(rel: &Relation, tuple: &Tuple) -> Option<Vec<String>> {
    rel.key_columns().map(|(i, _)| tuple.get(i).and_then(|v| v.as_text().map(str::to_owned))).collect()
}

pub(crate) fn is_row_version(rel: &Relation) -> bool {
    rel.schema == ROW_VERSION_SCHEMA && rel.table == ROW_VERSION_TABLE
}

impl MeshBuffer {
    /// A buffer that knows every mesh table of the target from the start: a version can arrive
    /// before (or without) any row of its table.
    pub fn new(tables: &HashMap<String, MeshTable>) -> MeshBuffer {
        MeshBuffer { tables: tables.clone(), ..MeshBuffer::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.versions.is_empty()
    }

    /// The mesh table `name` as this buffer writes it, if it is one.
    pub fn table(&self, name: &str) -> Option<&MeshTable> {
        self.tables.get(name)
    }

    /// Replaces what the buffer knows of a table's shape (after a schema change).
    pub fn set_table(&mut self, t: MeshTable) {
        self.tables.insert(t.name(), t);
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn clear(&mut self) {
        self.rows.clear();
        self.versions.clear();
    }

    /// Buffers one change of a mesh table or of the peer's `row_version`.
    pub fn push(&mut self, rel: &Arc<Relation>, change: RowChange) -> Result<(), ApplyError> {
        let bad = |message: String| ApplyError::Schema { table: rel.name(), message };
        if is_row_version(rel) {
            let Some(after) = &change.after else { return Ok(()) }; // purges are local
            let col = |name: &str| -> Option<Value<'_>> {
                rel.columns.iter().position(|c| c.name == name).and_then(|i| after.get(i))
            };
            let txt = |name: &str| col(name).and_then(|v| v.as_text());
            if txt("purge_round").is_some() {
                return Ok(()); // a purge round's mark: local too
            }
            let (Some(tbl), Some(pk), Some(vv), Some(ms), Some(lc), Some(node), Some(live)) =
                (txt("tbl"), txt("pk"), txt("vv"), txt("hlc_ms"), txt("hlc_lc"), txt("node"), txt("live"))
            else {
                return Err(bad("a row version arrived without its columns".into()));
            };
            let cols = txt("cols").unwrap_or("{}");
            let key: Vec<String> = serde_json::from_str(pk).map_err(|e| bad(format!("pk {pk}: {e}")))?;
            let side = Side::parse(
                vv,
                ms.parse().unwrap_or(0),
                lc.parse().unwrap_or(0),
                node.parse().unwrap_or(0),
                live == "t",
                cols,
            )
            .map_err(|e| bad(format!("row version of {tbl} {pk}: {e}")))?;
            self.versions.insert((tbl.to_owned(), key), side);
            return Ok(());
        }
        let name = rel.name();
        if let Some((_, before)) = &change.before {
            // A key change (or a delete) ends the old key's row.
            let old = key_of(rel, before).ok_or_else(|| bad("a change arrived without its key".into()))?;
            let new = change.after.as_ref().and_then(|a| key_of(rel, a));
            if change.op == Op::Delete || new.as_ref() != Some(&old) {
                self.rows.insert((name.clone(), old), Final::Delete);
            }
        }
        if let Some(after) = &change.after {
            let key = key_of(rel, after).ok_or_else(|| bad("a change arrived without its key".into()))?;
            let mut values: Values = match self.rows.remove(&(name.clone(), key.clone())) {
                Some(Final::Upsert(v)) => v,
                _ => Values::new(),
            };
            for (c, v) in rel.columns.iter().zip(after.values()) {
                if let Some(v) = text(v) {
                    values.insert(c.name.clone(), v);
                }
            }
            self.rows.insert((name, key), Final::Upsert(values));
        }
        Ok(())
    }

    /// Buffers a key as another node stores it (repair): its row and metadata arrive as if
    /// that node had sent them, and [`MeshBuffer::apply`] resolves them against this node's.
    /// A row without metadata is a write of no node (node 0, like rows older than the mesh), so
    /// any versioned write of the key wins over it.
    pub fn push_stored(&mut self, info: &MeshTable, key: Vec<String>, row: &StoredRow) -> Result<(), ApplyError> {
        let name = info.name();
        let side = match &row.version {
            Some(v) => Side::parse(&v.vv, v.hlc_ms, v.hlc_lc, v.node, v.live, &v.cols)
                .map_err(|message| ApplyError::Schema { table: name.clone(), message })?,
            None if row.values.is_some() => {
                Side { vv: [(NodeId(0), 1)].into_iter().collect(), live: true, ..Side::default() }
            }
            None => return Ok(()),
        };
        self.tables.entry(name.clone()).or_insert_with(|| info.clone());
        let fin = match &row.values {
            Some(v) if side.live => Final::Upsert(v.clone()),
            _ => Final::Delete,
        };
        self.rows.insert((name.clone(), key.clone()), fin);
        self.versions.insert((name, key), side);
        Ok(())
    }

    /// Resolves everything buffered against the target's rows and writes the outcome, inside
    /// the caller's open target transaction. Returns (rows written, conflicts, rows buried: to
    /// announce with [`announce_burials`] once committed).
    pub async fn apply(
        &mut self,
        client: &Client,
        statements: &mut HashMap<String, Statement>,
        source_node: &str,
        policies: &HashMap<String, TablePolicy>,
    ) -> Result<(u64, u64, u64), ApplyError> {
        // A version without its row: a tombstone resolved on a hub for a row already gone there
        // (deleting nothing emits no change). It still carries history the peers must merge.
        for (k, side) in &self.versions {
            if !side.live && !self.rows.contains_key(k) && self.tables.contains_key(&k.0) {
                self.rows.insert(k.clone(), Final::Delete);
            }
        }
        if self.rows.is_empty() {
            self.versions.clear();
            return Ok((0, 0, 0));
        }
        let rows = std::mem::take(&mut self.rows);
        let mut versions = std::mem::take(&mut self.versions);
        // Lock the existing local rows first, in key order: the order a local write takes its
        // locks (row, then its version from the trigger), so the two rarely deadlock.
        for (name, info) in &self.tables {
            let keys: Vec<&Vec<String>> = rows.keys().filter(|(t, _)| t == name).map(|(_, k)| k).collect();
            if !keys.is_empty() {
                read_rows(client, statements, info, &keys).await?;
            }
        }
        // Lock (creating placeholders for) every key's metadata, in key order.
        let mut pending: Vec<&(String, Vec<String>)> = rows.keys().filter(|k| versions.contains_key(*k)).collect();
        let mut local_sides: HashMap<(String, Vec<String>), Side> = HashMap::new();
        if !pending.is_empty() {
            let placeholder = prepared(
                client,
                statements,
                "INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
                 SELECT t, p::jsonb, '{}', 0, 0, 0, false, '{}' FROM unnest($1::text[], $2::text[]) AS u(t, p)
                 ON CONFLICT (tbl, pk) DO NOTHING"
                    .to_owned(),
                "synapse.row_version",
            )
            .await?;
            // A tombstone a purge deletes between the reservation (which found it) and the
            // lock is gone when the lock is granted; its key is unlocked, and a local write
            // could then version it under this one. Reserve and lock such keys again
            // (docs/decisions/0028-row-version-locking.md).
            while !pending.is_empty() {
                let (tbls, pks): (Vec<String>, Vec<String>) =
                    pending.iter().map(|(t, k)| (t.clone(), serde_json::to_string(k).unwrap_or_default())).unzip();
                client
                    .execute(&placeholder, &[&tbls, &pks])
                    .await
                    .map_err(ApplyError::target("reserving row versions"))?;
                local_sides.extend(lock_versions(client, statements, &tbls, &pks).await?);
                pending.retain(|k| !local_sides.contains_key(*k));
            }
        }
        // Read the rows again now that their versions are locked: a local write that committed
        // meanwhile (a new row, which the first read could not lock) is visible to both reads
        // alike, and none can commit on these keys until this transaction does.
        let mut local_rows: HashMap<(String, Vec<String>), Values> = HashMap::new();
        for (name, info) in &self.tables {
            let keys: Vec<&Vec<String>> = rows.keys().filter(|(t, _)| t == name).map(|(_, k)| k).collect();
            if keys.is_empty() {
                continue;
            }
            for (key, values) in read_rows(client, statements, info, &keys).await? {
                local_rows.insert((name.clone(), key), values);
            }
        }
        let none = TablePolicy::default();
        let mut writes = Writes::default();
        let mut conflicts = 0u64;
        // Keys this batch deletes or claims: their local rows are not colliders (deletes run
        // first; claims are checked against each other). Skipped keys keep their local rows.
        let mut rewritten: HashSet<(String, Vec<String>)> = HashSet::new();
        let mut claims = Vec::new();
        for ((name, key), fin) in rows {
            let Some(info) = self.tables.get(&name) else { continue };
            let policy = policies.get(&name).unwrap_or(&none);
            let remote_values = match &fin {
                Final::Upsert(v) => Some(v),
                Final::Delete => None,
            };
            let Some(remote_side) = versions.remove(&(name.clone(), key.clone())) else {
                // No version travelled with it: the peer wrote it without the mesh trigger.
                metrics::counter!("synapse_mesh_unversioned_rows_total", "table" => name.clone()).increment(1);
                tracing::warn!(table = %name, ?key, "a peer's change carries no row version (is the mesh trigger installed there?); applied as is");
                writes.row(info, &key, remote_values);
                continue;
            };
            let remote = version(info, &remote_side, remote_values);
            // A placeholder is no version; nor is a tombstone a purge round marked, unless this is
            // that very version again: every node agreed on it and has applied all it
            // dominates, so what arrives now was written where it is already purged, from no
            // version (see `tombstones`). Resolved against it, that write would be lost here.
            let local_side = local_sides
                .get(&(name.clone(), key.clone()))
                .filter(|s| s.vv != VersionVector::new() && !(s.purging && s.vv != remote_side.vv));
            let local_row = local_rows.get(&(name.clone(), key.clone()));
            let local = local_side.map(|s| version(info, s, local_row));
            let (decision, mut result) = resolve(policy, local.as_ref(), &remote);
            // Per key, for replaying a divergence: what was here, what came, what was decided.
            // tests/mesh.rs compares these across targets (`applied_versions_agree`).
            tracing::trace!(table = %name, ?key, local = ?local_side.map(|s| (&s.vv, s.live, s.purging)),
                remote = ?(&remote_side.vv, remote_side.live), ?decision, result = ?(&result.stamp.vv, result.live),
                "mesh row resolved");
            metrics::counter!("synapse_mesh_rows_total", "table" => name.clone(), "decision" => decision_name(decision))
                .increment(1);
            if decision == Decision::Skip {
                continue;
            }
            if decision == Decision::Merge {
                if let Some(local) = &local {
                    let kind = match (local.live, remote.live) {
                        (true, true) if !shares_history(&local.stamp.vv, &remote.stamp.vv) => "insert_insert",
                        (true, true) => "update_update",
                        (false, false) => "delete_delete",
                        _ => "update_delete",
                    };
                    let mut resolution =
                        if result.stamp.lww_key() == local.stamp.lww_key() { "local_wins" } else { "remote_wins" };
                    if let Some(f) = &policy.merge_function {
                        if local.live && remote.live {
                            call_merge_function(client, statements, info, f, &key, [local, &remote], &mut result)
                                .await?;
                            resolution = "merge_function";
                        }
                    }
                    writes.conflict(&name, &key, kind, resolution, [local, &remote], describe_version(&result));
                    conflicts += 1;
                }
            }
            if !info.unique.is_empty() {
                rewritten.insert((name.clone(), key.clone()));
            }
            if result.live && !info.unique.is_empty() {
                claims.push(Claim { table: name, key, version: result });
                continue;
            }
            writes.version(info, &key, &result);
        }
        if !claims.is_empty() {
            conflicts +=
                settle_unique_claims(client, statements, &self.tables, claims, &rewritten, &local_rows, &mut writes)
                    .await?;
        }
        let buried = writes.burials.len() as u64;
        let written = writes.execute(client, statements, &self.tables, source_node).await?;
        Ok((written, conflicts, buried))
    }
}

/// Lets the table's merge function decide the `lww` columns of two concurrent live versions.
/// The versions go in (HLC, node) order, older first, so every node makes the same call; the
/// function's JSON object overrides the resolver's result column by column (keys, CRDT columns
/// and columns it leaves out keep the resolver's values).
pub(super) async fn call_merge_function(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    info: &MeshTable,
    function: &str,
    key: &[String],
    [a, b]: [&RowVersion; 2],
    result: &mut RowVersion,
) -> Result<(), ApplyError> {
    let decided: Vec<&String> = info
        .columns
        .iter()
        .filter(|(c, s)| *s == Strategy::Lww && result.cells.contains_key(c))
        .map(|(c, _)| c)
        .collect();
    if decided.is_empty() {
        return Ok(());
    }
    let (older, newer) = if a.stamp.lww_key() <= b.stamp.lww_key() { (a, b) } else { (b, a) };
    let row_json = |v: &RowVersion| {
        let mut o: Map<String, Json> =
            info.key.iter().cloned().zip(key.iter().map(|k| Json::String(k.clone()))).collect();
        for (c, t) in values_of(info, v) {
            o.insert(c, t.map(Json::String).unwrap_or(Json::Null));
        }
        Json::Object(o).to_string()
    };
    // Rows go in as the table's row type, so the function sees numbers as numbers; what it
    // returns is read back through the row type, so values are checked against the columns.
    let table = format!("{}.{}", quote::ident(&info.schema), quote::ident(&info.table));
    let sql = format!(
        "SELECT f.r::text, {} FROM (SELECT {}(to_jsonb(jsonb_populate_record(NULL::{table}, $1::text::jsonb)),
                                            to_jsonb(jsonb_populate_record(NULL::{table}, $2::text::jsonb))) AS r) AS f,
             LATERAL jsonb_populate_record(NULL::{table},
                 $3::text::jsonb || CASE WHEN jsonb_typeof(f.r) = 'object' THEN f.r ELSE '{{}}' END) AS m",
        decided.iter().map(|c| format!("m.{}::text", quote::ident(c))).collect::<Vec<_>>().join(", "),
        quoted_name(function),
    );
    let fail = |message: String| ApplyError::MergeFunction {
        function: function.to_owned(),
        table: info.name(),
        key: serde_json::to_string(key).unwrap_or_default(),
        message,
    };
    let stmt = prepared(client, statements, sql, &info.name()).await?;
    let (o, n, base) = (row_json(older), row_json(newer), row_json(result));
    let row = client
        .query_one(&stmt, &[&o, &n, &base])
        .await
        .map_err(|e| fail(e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string())))?;
    let returned: Option<String> = row.get(0);
    if !returned.as_deref().is_some_and(|r| r.starts_with('{')) {
        return Err(fail(format!(
            "it returned {}, not a JSON object of column values",
            returned.as_deref().unwrap_or("NULL")
        )));
    }
    for (i, c) in decided.iter().enumerate() {
        let text: Option<String> = row.get(i + 1);
        if let Some(Cell::Value { value, .. }) = result.cells.get_mut(*c) {
            *value = text.map(Json::String).unwrap_or(Json::Null);
        }
    }
    Ok(())
}

pub(super) fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Insert => "insert",
        Decision::Skip => "skip",
        Decision::Apply => "apply",
        Decision::Merge => "merge",
    }
}

/// Locks (tbl, pk) rows of `synapse.row_version`, in key order, and reads them.
pub(super) async fn lock_versions(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    tbls: &[String],
    pks: &[String],
) -> Result<HashMap<(String, Vec<String>), Side>, ApplyError> {
    let lock = prepared(
        client,
        statements,
        "SELECT tbl, pk::text, vv::text, hlc_ms, hlc_lc, node, live, cols::text, purge_round IS NOT NULL
         FROM synapse.row_version
         WHERE (tbl, pk) IN (SELECT t, p::jsonb FROM unnest($1::text[], $2::text[]) AS u(t, p))
         ORDER BY tbl, pk FOR UPDATE"
            .to_owned(),
        "synapse.row_version",
    )
    .await?;
    let mut sides = HashMap::new();
    for r in client.query(&lock, &[&tbls, &pks]).await.map_err(ApplyError::target("locking row versions"))? {
        let (tbl, pk): (String, String) = (r.get(0), r.get(1));
        let key: Vec<String> = serde_json::from_str(&pk).unwrap_or_default();
        let mut side =
            Side::parse(&r.get::<_, String>(2), r.get(3), r.get(4), r.get(5), r.get(6), &r.get::<_, String>(7))
                .map_err(|message| ApplyError::Schema { table: tbl.clone(), message })?;
        side.purging = r.get(8);
        sides.insert((tbl, key), side);
    }
    Ok(sides)
}
