//! Reading the local rows and writing the resolved ones in batches.

use super::*;

/// `t.k1 = u.k1::type AND …` over the key columns.
pub(super) fn key_join(info: &MeshTable) -> (String, String) {
    column_join(info, &info.key)
}

/// `t.c1 = u.k1::type AND …` over `columns`, with the unnest aliases.
pub(super) fn column_join(info: &MeshTable, columns: &[String]) -> (String, String) {
    let mut cols = Vec::new();
    let mut cond = Vec::new();
    for (i, k) in columns.iter().enumerate() {
        let cast = info.cast(k);
        cols.push(format!("k{i}"));
        cond.push(format!("t.{} = u.k{i}::{cast}", quote::ident(k)));
    }
    (cols.join(", "), cond.join(" AND "))
}

pub(super) fn unnest_params(n: usize) -> String {
    (1..=n).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", ")
}

pub(super) async fn read_rows(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    info: &MeshTable,
    keys: &[&Vec<String>],
) -> Result<Vec<(Vec<String>, Values)>, ApplyError> {
    read_rows_by(client, statements, info, &info.key, keys, true).await
}

/// Reads the rows whose `by` columns equal one of `probes` (`lock`: locked, in key order).
pub(super) async fn read_rows_by(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    info: &MeshTable,
    by: &[String],
    probes: &[&Vec<String>],
    lock: bool,
) -> Result<Vec<(Vec<String>, Values)>, ApplyError> {
    let (cols, cond) = column_join(info, by);
    let names: Vec<&String> = info.columns.iter().map(|(c, _)| c).collect();
    let sql = format!(
        "SELECT ARRAY[{}]::text[], ARRAY[{}]::text[] FROM {}.{} t JOIN unnest({}) AS u({cols}) ON {cond} {}",
        info.key.iter().map(|k| format!("t.{}::text", quote::ident(k))).collect::<Vec<_>>().join(", "),
        if names.is_empty() {
            "NULL".to_owned()
        } else {
            names.iter().map(|c| format!("t.{}::text", quote::ident(c))).collect::<Vec<_>>().join(", ")
        },
        quote::ident(&info.schema),
        quote::ident(&info.table),
        unnest_params(by.len()),
        match lock {
            true => format!(
                "ORDER BY {} FOR UPDATE OF t",
                info.key.iter().map(|k| format!("t.{}", quote::ident(k))).collect::<Vec<_>>().join(", ")
            ),
            false => String::new(),
        },
    );
    let stmt = prepared(client, statements, sql, &info.name()).await?;
    let columns: Vec<Vec<String>> =
        (0..by.len()).map(|i| probes.iter().map(|k| k.get(i).cloned().unwrap_or_default()).collect()).collect();
    let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    let found = client
        .query(&stmt, &params)
        .await
        .map_err(ApplyError::target(format!("reading local rows of {}", info.name())))?;
    Ok(found
        .into_iter()
        .map(|r| {
            let key: Vec<Option<String>> = r.get(0);
            let vals: Vec<Option<String>> = r.get::<_, Option<Vec<Option<String>>>>(1).unwrap_or_default();
            let values = names.iter().map(|c| (*c).clone()).zip(vals).collect();
            (key.into_iter().map(Option::unwrap_or_default).collect(), values)
        })
        .collect())
}

/// Key values followed by the written columns' values.
pub(super) type Row = Vec<Option<String>>;

/// `synapse.row_version` rows as column arrays, one statement's parameters.
#[derive(Default)]
pub(super) struct SideColumns<'a> {
    pub(super) tbl: Vec<&'a str>,
    pub(super) pk: Vec<&'a str>,
    pub(super) vv: Vec<String>,
    pub(super) ms: Vec<i64>,
    pub(super) lc: Vec<i32>,
    pub(super) node: Vec<i32>,
    pub(super) live: Vec<bool>,
    pub(super) cols: Vec<String>,
}

/// The outcome of one buffer, written in a few statements per table.
#[derive(Default)]
pub(super) struct Writes {
    /// Per table and set of columns: keys followed by the values.
    pub(super) upserts: BTreeMap<(String, Vec<String>), Vec<Row>>,
    pub(super) deletes: BTreeMap<String, Vec<Vec<String>>>,
    pub(super) sides: Vec<(String, String, Side)>,
    pub(super) conflicts: Vec<[String; 7]>,
    /// (table, key as JSON) of rows buried here, to announce after the commit.
    pub(super) burials: Vec<(String, String)>,
}

impl Writes {
    pub(super) fn row(&mut self, info: &MeshTable, key: &[String], values: Option<&Values>) {
        let name = info.name();
        match values {
            None => self.deletes.entry(name).or_default().push(key.to_vec()),
            Some(values) => {
                let cols: Vec<String> =
                    info.columns.iter().map(|(c, _)| c).filter(|c| values.contains_key(*c)).cloned().collect();
                let mut row: Vec<Option<String>> = key.iter().cloned().map(Some).collect();
                row.extend(cols.iter().map(|c| values.get(c).cloned().flatten()));
                self.upserts.entry((name, cols)).or_default().push(row);
            }
        }
    }

    pub(super) fn side(&mut self, table: &str, key: &[String], side: Side) {
        self.sides.push((table.to_owned(), serde_json::to_string(key).unwrap_or_default(), side));
    }

    /// The row as `v` leaves it (deleted for a tombstone) and its metadata.
    pub(super) fn version(&mut self, info: &MeshTable, key: &[String], v: &RowVersion) {
        self.row(info, key, v.live.then(|| values_of(info, v)).as_ref());
        self.side(&info.name(), key, side_of(v));
    }

    /// The loser of a unique-key collision becomes a tombstone (its values kept in its version),
    /// logged with the key that stayed and the index they collided on.
    pub(super) fn bury(&mut self, info: &MeshTable, lost: Lost<'_>, resolution: &'static str, sides: [&RowVersion; 2]) {
        tracing::trace!(table = %info.name(), key = ?lost.key, vv = ?lost.version.stamp.vv, kept = ?lost.kept_key, resolution,
            "mesh row buried");
        let mut tomb = lost.version.clone();
        tomb.live = false;
        let mut result = describe_version(&tomb);
        result["kept_key"] = json!(lost.kept_key);
        result["index"] = json!(lost.index);
        self.conflict(&info.name(), lost.key, "unique_key", resolution, sides, result);
        self.version(info, lost.key, &tomb);
        self.burials.push((info.name(), serde_json::to_string(lost.key).unwrap_or_default()));
    }

    /// A `synapse.conflicts` entry and its metric.
    pub(super) fn conflict(
        &mut self,
        table: &str,
        key: &[String],
        kind: &'static str,
        resolution: &'static str,
        [local, remote]: [&RowVersion; 2],
        result: Json,
    ) {
        metrics::counter!("synapse_conflicts_total", "table" => table.to_owned(), "kind" => kind, "resolution" => resolution)
            .increment(1);
        self.conflicts.push([
            table.to_owned(),
            serde_json::to_string(key).unwrap_or_default(),
            kind.to_owned(),
            resolution.to_owned(),
            describe_version(local).to_string(),
            describe_version(remote).to_string(),
            result.to_string(),
        ]);
    }

    pub(super) async fn execute(
        self,
        client: &Client,
        statements: &mut HashMap<String, Statement>,
        tables: &HashMap<String, MeshTable>,
        source_node: &str,
    ) -> Result<u64, ApplyError> {
        let mut written = 0u64;
        for (name, keys) in &self.deletes {
            let Some(info) = tables.get(name) else { continue };
            let (cols, cond) = key_join(info);
            let sql = format!(
                "DELETE FROM {}.{} t USING unnest({}) AS u({cols}) WHERE {cond}",
                quote::ident(&info.schema),
                quote::ident(&info.table),
                unnest_params(info.key.len())
            );
            let stmt = prepared(client, statements, sql, &info.name()).await?;
            let columns: Vec<Vec<String>> =
                (0..info.key.len()).map(|i| keys.iter().map(|k| k[i].clone()).collect()).collect();
            let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            written +=
                client.execute(&stmt, &params).await.map_err(ApplyError::target(format!("deleting from {name}")))?;
        }
        for ((name, cols), rows) in &self.upserts {
            let Some(info) = tables.get(name) else { continue };
            let all: Vec<&String> = info.key.iter().chain(cols.iter()).collect();
            let names: Vec<String> = all.iter().map(|c| quote::ident(c)).collect();
            let aliases: Vec<String> = (0..all.len()).map(|i| format!("c{i}")).collect();
            let select: Vec<String> =
                all.iter().enumerate().map(|(i, c)| format!("u.c{i}::{}", info.cast(c))).collect();
            let keys: Vec<String> = info.key.iter().map(|k| quote::ident(k)).collect();
            let action = if cols.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!(
                    "DO UPDATE SET {}",
                    cols.iter()
                        .map(|c| format!("{q} = excluded.{q}", q = quote::ident(c)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let sql = format!(
                "INSERT INTO {}.{} ({}) SELECT {} FROM unnest({}) AS u({}) ON CONFLICT ({}) {action}",
                quote::ident(&info.schema),
                quote::ident(&info.table),
                names.join(", "),
                select.join(", "),
                unnest_params(all.len()),
                aliases.join(", "),
                keys.join(", "),
            );
            let stmt = prepared(client, statements, sql, &info.name()).await?;
            let columns: Vec<Vec<Option<String>>> =
                (0..all.len()).map(|i| rows.iter().map(|r| r[i].clone()).collect()).collect();
            let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            written += client.execute(&stmt, &params).await.map_err(|source| {
                if source.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) && !info.unique.is_empty()
                {
                    ApplyError::UniqueRace { table: name.clone(), source }
                } else {
                    ApplyError::Target { context: format!("writing {name}"), source }
                }
            })?;
        }
        if !self.sides.is_empty() {
            let stmt = prepared(client, statements, "INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
                 SELECT t, p::jsonb, vv::jsonb, ms, lc, n, l, c::jsonb
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int4[], $6::int4[], $7::bool[], $8::text[])
                     AS u(t, p, vv, ms, lc, n, l, c)
                 ON CONFLICT (tbl, pk) DO UPDATE SET vv = excluded.vv, hlc_ms = excluded.hlc_ms, hlc_lc = excluded.hlc_lc,
                     node = excluded.node, live = excluded.live, cols = excluded.cols, purge_round = NULL".to_owned(),
                "synapse.row_version")
            .await?;
            let mut c = SideColumns::default();
            for (t, p, s) in &self.sides {
                c.tbl.push(t);
                c.pk.push(p);
                let vv: Map<String, Json> = s.vv.iter().map(|(n, c)| (n.0.to_string(), json!(c))).collect();
                c.vv.push(Json::Object(vv).to_string());
                c.ms.push(s.hlc.wall_ms as i64);
                c.lc.push(s.hlc.logical as i32);
                c.node.push(i32::from(s.node.0));
                c.live.push(s.live);
                c.cols.push(Json::Object(s.cols.clone()).to_string());
            }
            client
                .execute(&stmt, &[&c.tbl, &c.pk, &c.vv, &c.ms, &c.lc, &c.node, &c.live, &c.cols])
                .await
                .map_err(ApplyError::target("storing row versions"))?;
        }
        if !self.burials.is_empty() {
            let stmt = prepared(
                client,
                statements,
                "INSERT INTO synapse.burials (tbl, pk) SELECT t, p::jsonb FROM unnest($1::text[], $2::text[]) AS u(t, p)
                 ON CONFLICT DO NOTHING"
                    .to_owned(),
                "synapse.burials",
            )
            .await?;
            let (t, p): (Vec<&str>, Vec<&str>) = self.burials.iter().map(|(t, p)| (t.as_str(), p.as_str())).unzip();
            client.execute(&stmt, &[&t, &p]).await.map_err(ApplyError::target("queueing burials"))?;
        }
        if !self.conflicts.is_empty() {
            let stmt = prepared(
                client,
                statements,
                "INSERT INTO synapse.conflicts (source_node, table_name, pk, kind, resolution, local, remote, result)
                 SELECT $1, t, p::jsonb, k, r, l::jsonb, rm::jsonb, res::jsonb
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
                     AS u(t, p, k, r, l, rm, res)"
                    .to_owned(),
                "synapse.conflicts",
            )
            .await?;
            let col = |i: usize| self.conflicts.iter().map(|c| c[i].as_str()).collect::<Vec<&str>>();
            let (c0, c1, c2, c3, c4, c5, c6) = (col(0), col(1), col(2), col(3), col(4), col(5), col(6));
            client
                .execute(&stmt, &[&source_node, &c0, &c1, &c2, &c3, &c4, &c5, &c6])
                .await
                .map_err(ApplyError::target("recording conflicts in synapse.conflicts"))?;
        }
        Ok(written)
    }
}
