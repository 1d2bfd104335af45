//! Row versions as stored in `synapse.row_version` and read back: the codec between the
//! resolver's `RowVersion` and its JSON columns.

use super::*;

/// One row's causality metadata as stored in `synapse.row_version`.
#[derive(Clone, Debug, Default)]
pub(super) struct Side {
    pub(super) vv: VersionVector,
    pub(super) hlc: Hlc,
    pub(super) node: NodeId,
    pub(super) live: bool,
    pub(super) cols: Map<String, Json>,
    /// A tombstone marked by a purge round: no version any more (see `tombstones`).
    pub(super) purging: bool,
}

impl Side {
    pub(super) fn parse(vv: &str, ms: i64, lc: i32, node: i32, live: bool, cols: &str) -> Result<Side, String> {
        let vv_map: BTreeMap<String, u64> = serde_json::from_str(vv).map_err(|e| format!("vv {vv}: {e}"))?;
        let mut entries = Vec::with_capacity(vv_map.len());
        for (n, count) in vv_map {
            let id: u16 = n.parse().map_err(|_| format!("vv names node `{n}`"))?;
            entries.push((NodeId(id), count));
        }
        let v: VersionVector = entries.into_iter().collect();
        let cols: Map<String, Json> = serde_json::from_str(cols).map_err(|e| format!("cols: {e}"))?;
        Ok(Side {
            vv: v,
            hlc: Hlc { wall_ms: ms.max(0) as u64, logical: lc.max(0) as u32 },
            node: NodeId(node.clamp(0, u16::MAX as i32) as u16),
            live,
            cols,
            purging: false,
        })
    }

    pub(super) fn at(&self, column: &str) -> (Hlc, NodeId) {
        let a = self.cols.get(column).and_then(|c| c.get("at")).and_then(Json::as_array);
        let n = |i: usize| a.and_then(|a| a.get(i)).and_then(Json::as_u64).unwrap_or(0);
        (Hlc { wall_ms: n(0), logical: n(1) as u32 }, NodeId(n(2) as u16))
    }

    pub(super) fn counter(&self, column: &str) -> Option<Counter> {
        let pn = self.cols.get(column)?.get("pn")?.as_object()?;
        let totals = pn.iter().filter_map(|(node, v)| {
            let id: u16 = node.parse().ok()?;
            let num =
                |i: usize| v.get(i).and_then(|x| x.as_u64().or_else(|| x.as_f64().map(|f| f as u64))).unwrap_or(0);
            Some((NodeId(id), num(0), num(1)))
        });
        Some(Counter::from_contributions(totals))
    }

    /// A set column's state (`None`: no local write of it since the mesh started).
    pub(super) fn set(&self, column: &str) -> Option<OrSet> {
        let st = self.cols.get(column)?.get("set")?;
        let entries = st.get("e")?.as_object()?;
        Some(OrSet::from_parts(
            dots(st.get("clock")?),
            entries.iter().map(|(member, d)| (Json::String(member.clone()), dots(d))),
        ))
    }

    /// A multi-value column's siblings (`None`: no local write of it since the mesh started).
    pub(super) fn multi_value(&self, column: &str) -> Option<MultiValue> {
        let siblings = self.cols.get(column)?.get("mv")?.as_array()?;
        Some(MultiValue::from_siblings(siblings.iter().filter_map(|sib| {
            let at = sib.get(1)?;
            let n = |i: usize| at.get(i).and_then(Json::as_u64).unwrap_or(0);
            let hlc = Hlc { wall_ms: n(0), logical: n(1) as u32 };
            Some((dots(sib.get(0)?), hlc, NodeId(n(2) as u16), sib.get(2).cloned().unwrap_or(Json::Null)))
        })))
    }

    /// A tombstone's last value of `column`.
    pub(super) fn tombstone_value(&self, column: &str) -> Option<Option<String>> {
        let v = self.cols.get(column)?.get("v")?;
        Some(v.as_str().map(str::to_owned))
    }
}

/// A `{"<node>": count}` object as the resolver's plain version vector.
pub(super) fn dots(v: &Json) -> Dots {
    v.as_object()
        .map(|o| o.iter().filter_map(|(n, c)| Some((NodeId(n.parse().ok()?), c.as_u64()?))).collect())
        .unwrap_or_default()
}

pub(super) fn dots_json(d: &Dots) -> Json {
    Json::Object(d.iter().map(|(n, c)| (n.0.to_string(), json!(c))).collect())
}

/// Values of a row by column name: `Some(text)`, `None` for SQL NULL; absent = not known (an
/// unchanged TOAST value the change did not carry).
pub type Values = BTreeMap<String, Option<String>>;

/// A row's state as the resolver sees it: the stored metadata plus the row's values.
pub(super) fn version(t: &MeshTable, side: &Side, row: Option<&Values>) -> RowVersion {
    let live = side.live && row.is_some();
    let mut cells = BTreeMap::new();
    for (col, strategy) in &t.columns {
        if *strategy == Strategy::Counter {
            let counter = side.counter(col).or_else(|| {
                // No totals yet (a row older than the mesh): its value is the baseline.
                let v: i64 = row.and_then(|r| r.get(col)).cloned().flatten().and_then(|s| s.parse().ok())?;
                Some(Counter::from_contributions([(NodeId(0), v.max(0) as u64, (-v).max(0) as u64)]))
            });
            if let Some(c) = counter {
                cells.insert(col.clone(), Cell::Counter(c));
            }
            continue;
        }
        // Set and multi-value states live in the metadata; without one the column still holds
        // the value every node started from, which any peer's state already includes.
        if *strategy == Strategy::Set {
            if let Some(set) = side.set(col) {
                cells.insert(col.clone(), Cell::Set(set));
            }
            continue;
        }
        if *strategy == Strategy::MultiValue {
            if let Some(mv) = side.multi_value(col) {
                cells.insert(col.clone(), Cell::MultiValue(mv));
            }
            continue;
        }
        let value = match (live, row) {
            (true, Some(r)) => r.get(col).cloned(),
            _ => side.tombstone_value(col),
        };
        if let Some(v) = value {
            let value = v.map(Json::String).unwrap_or(Json::Null);
            cells.insert(col.clone(), Cell::Value { value, at: side.at(col) });
        }
    }
    RowVersion { stamp: Stamp { vv: side.vv.clone(), hlc: side.hlc, node: side.node }, live, cells }
}

/// The metadata to store for a resolved version (tombstones keep their values).
pub(super) fn side_of(v: &RowVersion) -> Side {
    let mut cols = Map::new();
    for (name, cell) in &v.cells {
        let entry = match cell {
            Cell::Value { value, at } => {
                // A column no write has stamped since the mesh started has no stamp, as the
                // trigger leaves it: identical versions must be identical bytes everywhere.
                let mut e = match *at == (Hlc::default(), NodeId(0)) {
                    true => json!({}),
                    false => json!({ "at": [at.0.wall_ms, at.0.logical, at.1 .0] }),
                };
                if !v.live {
                    e["v"] = value.clone();
                }
                if e.as_object().is_some_and(Map::is_empty) {
                    continue;
                }
                e
            }
            Cell::Counter(c) => {
                let pn: Map<String, Json> =
                    c.contributions().into_iter().map(|(n, (p, m))| (n.0.to_string(), json!([p, m]))).collect();
                json!({ "pn": pn })
            }
            Cell::Set(set) => {
                let (clock, entries) = set.parts();
                let e: Map<String, Json> =
                    entries.iter().filter_map(|(m, d)| Some((m.as_str()?.to_owned(), dots_json(d)))).collect();
                json!({ "set": { "clock": dots_json(&clock), "e": e } })
            }
            Cell::MultiValue(mv) => {
                let siblings: Vec<Json> = mv
                    .siblings_with_clocks()
                    .iter()
                    .map(|(clock, hlc, node, value)| {
                        json!([dots_json(clock), [hlc.wall_ms, hlc.logical, node.0], value])
                    })
                    .collect();
                json!({ "mv": siblings })
            }
        };
        cols.insert(name.clone(), entry);
    }
    Side { vv: v.stamp.vv.clone(), hlc: v.stamp.hlc, node: v.stamp.node, live: v.live, cols, purging: false }
}

/// What `column` holds for `cell`, as text its type parses.
pub(super) fn visible_text(info: &MeshTable, column: &str, cell: &Cell) -> Option<String> {
    if let Cell::Set(set) = cell {
        // Members are element texts, ordered by their bytes like the trigger orders them.
        let mut members: Vec<String> =
            set.parts().1.into_iter().filter_map(|(m, _)| m.as_str().map(str::to_owned)).collect();
        members.sort();
        return Some(if info.is_jsonb(column) {
            format!("[{}]", members.join(", "))
        } else {
            let quoted: Vec<String> =
                members.iter().map(|m| format!("\"{}\"", m.replace('\\', "\\\\").replace('"', "\\\""))).collect();
            format!("{{{}}}", quoted.join(","))
        });
    }
    match cell.visible() {
        Json::Null => None,
        Json::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

pub(super) fn describe_version(v: &RowVersion) -> Json {
    let values: Map<String, Json> = v.cells.iter().map(|(k, c)| (k.clone(), c.visible())).collect();
    // Concurrent values a multi-value column keeps besides the one it shows.
    let siblings: Map<String, Json> = v
        .cells
        .iter()
        .filter_map(|(k, c)| match c {
            Cell::MultiValue(mv) => {
                let values: Vec<Json> = mv.siblings().into_iter().map(|(_, _, v)| v).collect();
                (values.len() > 1).then(|| (k.clone(), Json::Array(values)))
            }
            _ => None,
        })
        .collect();
    let vv: Map<String, Json> = v.stamp.vv.iter().map(|(n, c)| (n.0.to_string(), json!(c))).collect();
    json!({
        "live": v.live,
        "vv": vv,
        "hlc": [v.stamp.hlc.wall_ms, v.stamp.hlc.logical],
        "node": v.stamp.node.0,
        "values": values,
        "siblings": siblings,
    })
}

/// One key of a mesh table as stored on a node: its row (`None`: no row) and its causality
/// metadata (`None`: no `synapse.row_version` row). What repair reads on one node and feeds to
/// another through [`MeshBuffer::push_stored`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredRow {
    /// Non-key columns' text (`None` = NULL).
    pub values: Option<Values>,
    pub version: Option<StoredVersion>,
}

/// A `synapse.row_version` row, as text (compared as stored: equal metadata is equal bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredVersion {
    pub vv: String,
    pub hlc_ms: i64,
    pub hlc_lc: i32,
    pub node: i32,
    pub live: bool,
    pub cols: String,
}

/// Reads rows and metadata of `keys` (each the key columns' text) on one node, without locking:
/// what a repair compares. Keys with neither are left out; a tombstone a purge round marked is
/// no metadata (it is purged everywhere, or about to be).
pub async fn read_stored(
    client: &Client,
    info: &MeshTable,
    keys: &[Vec<String>],
) -> Result<BTreeMap<Vec<String>, StoredRow>, ApplyError> {
    let mut out: BTreeMap<Vec<String>, StoredRow> = BTreeMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let probes: Vec<&Vec<String>> = keys.iter().collect();
    for (key, values) in read_rows_by(client, &mut HashMap::new(), info, &info.key, &probes, false).await? {
        out.entry(key).or_default().values = Some(values);
    }
    let pks: Vec<String> = keys.iter().map(|k| serde_json::to_string(k).unwrap_or_default()).collect();
    let rows = client
        .query(
            "SELECT pk::text, vv::text, hlc_ms, hlc_lc, node, live, cols::text FROM synapse.row_version
             WHERE tbl = $1 AND pk IN (SELECT p::jsonb FROM unnest($2::text[]) AS u(p))
                 AND purge_round IS NULL",
            &[&info.name(), &pks],
        )
        .await
        .map_err(ApplyError::target(format!("reading row versions of {}", info.name())))?;
    for r in rows {
        let key: Vec<String> = serde_json::from_str(&r.get::<_, String>(0)).unwrap_or_default();
        let version = StoredVersion {
            vv: r.get(1),
            hlc_ms: r.get(2),
            hlc_lc: r.get(3),
            node: r.get(4),
            live: r.get(5),
            cols: r.get(6),
        };
        // A placeholder (an applier's reservation, never written) is no metadata.
        if version.vv != "{}" {
            out.entry(key).or_default().version = Some(version);
        }
    }
    Ok(out)
}
