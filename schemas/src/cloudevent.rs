//! The public form of a change: a CloudEvents 1.0 envelope (structured JSON mode) whose `data` is a
//! Debezium-compatible change envelope. Described by `schemas/change-event.schema.json`.
//!
//! * `id` is `<node>/<cursor>`: stable across redeliveries, so consumers can de-duplicate on it.
//! * Unchanged TOASTed columns carry Debezium's placeholder [`UNAVAILABLE_VALUE`], never `null`.

use crate::types::{to_json, JsonText};
use crate::{Begin, Cursor, Op, Relation, RowChange, Tuple, Value as Datum};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Map, Value};

/// Debezium's marker for a value the source did not send (unchanged TOAST).
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";
pub const CHANGE_TYPE: &str = "io.synapsedb.change.v1";
pub const SCHEMA_CHANGE_TYPE: &str = "io.synapsedb.schema.changed.v1";
/// A DDL statement the source ran on a table ([`crate::LogRecord::Schema`]), with the columns
/// it left; the rows of the new shape follow it.
pub const DDL_TYPE: &str = "io.synapsedb.ddl.v1";
/// A gap in the stream ([`crate::LogRecord::Resync`]): re-read the source to be whole again.
pub const RESYNC_TYPE: &str = "io.synapsedb.resync.v1";

/// Where an event comes from: the source node's name and the transaction it belongs to.
pub struct EventContext<'a> {
    pub node: &'a str,
    pub database: &'a str,
    pub begin: &'a Begin,
}

/// A row image as JSON (column → value), for filters that look at it.
pub fn row_json(rel: &Relation, values: &Tuple) -> Value {
    let mut m = Map::new();
    for (c, v) in rel.columns.iter().zip(values.values()) {
        let j = match v {
            Datum::Null => Value::Null,
            Datum::UnchangedToast => Value::String(UNAVAILABLE_VALUE.into()),
            Datum::Text(t) => to_json(t, c.base_type_oid, c.element_type_oid),
        };
        m.insert(c.name.clone(), j);
    }
    Value::Object(m)
}

fn envelope(ctx: &EventContext<'_>, ty: &str, subject: String, cursor: Cursor, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("{}/{}", ctx.node, cursor),
        "source": format!("/synapsedb/{}/{}", ctx.node, ctx.database),
        "type": ty,
        "subject": subject,
        "time": rfc3339_micros(ctx.begin.commit_time_us),
        "datacontenttype": "application/json",
        "synapsecursor": cursor.to_string(),
        "data": data,
    })
}

fn source_block(ctx: &EventContext<'_>, rel: &Relation, cursor: Cursor) -> Value {
    source_of(ctx, &rel.schema, &rel.table, cursor)
}

/// Debezium's `source` block for a change of `schema`.`table` at `cursor`.
fn source_of(ctx: &EventContext<'_>, schema: &str, table: &str, cursor: Cursor) -> Value {
    json!({
        "version": concat!("synapsedb-", env!("CARGO_PKG_VERSION")),
        "connector": "postgresql",
        "name": ctx.node,
        "db": ctx.database,
        "ts_ms": ctx.begin.commit_time_us.div_euclid(1000),
        "snapshot": "false",
        "schema": schema,
        "table": table,
        "txId": ctx.begin.xid,
        "lsn": ctx.begin.commit_lsn.0,
        "cursor": cursor.to_string(),
        "origin": ctx.begin.origin,
    })
}

/// Renders one row change. `rel` must be the relation version the change refers to.
pub fn change_event(ctx: &EventContext<'_>, rel: &Relation, change: &RowChange) -> Value {
    let cursor = Cursor { commit_lsn: ctx.begin.commit_lsn, index: change.index };
    let op = match change.op {
        Op::Insert => "c",
        Op::Update => "u",
        Op::Delete => "d",
    };
    let data = json!({
        "op": op,
        "before": change.before.as_ref().map(|(_, v)| row_json(rel, v)),
        "after": change.after.as_ref().map(|v| row_json(rel, v)),
        "source": source_block(ctx, rel, cursor),
        "transaction": {
            "id": format!("{}:{}", ctx.begin.xid, ctx.begin.commit_lsn.0),
            "total_order": change.index,
            "data_collection_order": change.index,
        },
        "ts_ms": ctx.begin.commit_time_us.div_euclid(1000),
    });
    envelope(ctx, CHANGE_TYPE, rel.name(), cursor, data)
}

/// A row image serialised in column order, values straight from the tuple.
struct RowOut<'a> {
    rel: &'a Relation,
    values: &'a Tuple,
}

impl Serialize for RowOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.rel.columns.len()))?;
        for (c, v) in self.rel.columns.iter().zip(self.values.values()) {
            match v {
                Datum::Null => m.serialize_entry(&c.name, &())?,
                Datum::UnchangedToast => m.serialize_entry(&c.name, UNAVAILABLE_VALUE)?,
                Datum::Text(t) => m.serialize_entry(
                    &c.name,
                    &JsonText { text: t, type_oid: c.base_type_oid, element_oid: c.element_type_oid },
                )?,
            }
        }
        m.end()
    }
}

#[derive(Serialize)]
struct SourceOut<'a> {
    version: &'static str,
    connector: &'static str,
    name: &'a str,
    db: &'a str,
    ts_ms: i64,
    snapshot: &'static str,
    schema: &'a str,
    table: &'a str,
    #[serde(rename = "txId")]
    tx_id: u32,
    lsn: u64,
    cursor: String,
    origin: &'a Option<String>,
}

#[derive(Serialize)]
struct TxnOut {
    id: String,
    total_order: u32,
    data_collection_order: u32,
}

#[derive(Serialize)]
struct ChangeOut<'a> {
    op: &'static str,
    before: Option<RowOut<'a>>,
    after: Option<RowOut<'a>>,
    source: SourceOut<'a>,
    transaction: TxnOut,
    ts_ms: i64,
}

#[derive(Serialize)]
struct EnvelopeOut<D> {
    specversion: &'static str,
    id: String,
    source: String,
    #[serde(rename = "type")]
    ty: &'static str,
    subject: String,
    time: String,
    datacontenttype: &'static str,
    synapsecursor: String,
    data: D,
}

/// [`change_event`] written straight into `out` as JSON, without an intermediate `Value` tree
/// (the connectors' hot path; the same document, keys in declaration and column order).
pub fn write_change_event(ctx: &EventContext<'_>, rel: &Relation, change: &RowChange, out: &mut Vec<u8>) {
    let cursor = Cursor { commit_lsn: ctx.begin.commit_lsn, index: change.index };
    let ts_ms = ctx.begin.commit_time_us.div_euclid(1000);
    let doc = EnvelopeOut {
        specversion: "1.0",
        id: format!("{}/{}", ctx.node, cursor),
        source: format!("/synapsedb/{}/{}", ctx.node, ctx.database),
        ty: CHANGE_TYPE,
        subject: rel.name(),
        time: rfc3339_micros(ctx.begin.commit_time_us),
        datacontenttype: "application/json",
        synapsecursor: cursor.to_string(),
        data: ChangeOut {
            op: match change.op {
                Op::Insert => "c",
                Op::Update => "u",
                Op::Delete => "d",
            },
            before: change.before.as_ref().map(|(_, v)| RowOut { rel, values: v }),
            after: change.after.as_ref().map(|v| RowOut { rel, values: v }),
            source: SourceOut {
                version: concat!("synapsedb-", env!("CARGO_PKG_VERSION")),
                connector: "postgresql",
                name: ctx.node,
                db: ctx.database,
                ts_ms,
                snapshot: "false",
                schema: &rel.schema,
                table: &rel.table,
                tx_id: ctx.begin.xid,
                lsn: ctx.begin.commit_lsn.0,
                cursor: cursor.to_string(),
                origin: &ctx.begin.origin,
            },
            transaction: TxnOut {
                id: format!("{}:{}", ctx.begin.xid, ctx.begin.commit_lsn.0),
                total_order: change.index,
                data_collection_order: change.index,
            },
            ts_ms,
        },
    };
    // Writing into a Vec cannot fail, and every value here serialises.
    let _ = serde_json::to_writer(out, &doc);
}

/// One row of a consistent snapshot as a Debezium read event (`op: "r"`, `snapshot: "true"`):
/// `resume` is the cursor a reader continues the change stream after, `seq` (from 1) numbers
/// the snapshot's rows, `snapshot_time_us` is when the snapshot was taken.
#[allow(clippy::too_many_arguments)]
pub fn write_snapshot_event(
    node: &str,
    database: &str,
    rel: &Relation,
    values: &Tuple,
    resume: Cursor,
    seq: u32,
    snapshot_time_us: i64,
    out: &mut Vec<u8>,
) {
    let ts_ms = snapshot_time_us.div_euclid(1000);
    let no_origin = None;
    let doc = EnvelopeOut {
        specversion: "1.0",
        id: format!("{node}/snapshot/{resume}/{seq}"),
        source: format!("/synapsedb/{node}/{database}"),
        ty: CHANGE_TYPE,
        subject: rel.name(),
        time: rfc3339_micros(snapshot_time_us),
        datacontenttype: "application/json",
        synapsecursor: resume.to_string(),
        data: ChangeOut {
            op: "r",
            before: None,
            after: Some(RowOut { rel, values }),
            source: SourceOut {
                version: concat!("synapsedb-", env!("CARGO_PKG_VERSION")),
                connector: "postgresql",
                name: node,
                db: database,
                ts_ms,
                snapshot: "true",
                schema: &rel.schema,
                table: &rel.table,
                tx_id: 0,
                lsn: resume.commit_lsn.0,
                cursor: resume.to_string(),
                origin: &no_origin,
            },
            transaction: TxnOut {
                id: format!("snapshot:{}", resume.commit_lsn.0),
                total_order: seq,
                data_collection_order: seq,
            },
            ts_ms,
        },
    };
    let _ = serde_json::to_writer(out, &doc);
}

/// Renders a `TRUNCATE` of one table (Debezium's `op: "t"`, no row images). A truncate of
/// several tables is one event per table, all with the truncate's cursor index.
pub fn truncate_event(ctx: &EventContext<'_>, rel: &Relation, index: u32) -> Value {
    let cursor = Cursor { commit_lsn: ctx.begin.commit_lsn, index };
    let data = json!({
        "op": "t",
        "before": null,
        "after": null,
        "source": source_block(ctx, rel, cursor),
        "transaction": {
            "id": format!("{}:{}", ctx.begin.xid, ctx.begin.commit_lsn.0),
            "total_order": index,
            "data_collection_order": index,
        },
        "ts_ms": ctx.begin.commit_time_us.div_euclid(1000),
    });
    envelope(ctx, CHANGE_TYPE, rel.name(), cursor, data)
}

/// Renders a schema change: the relation's new column list.
pub fn schema_change_event(ctx: &EventContext<'_>, rel: &Relation, index: u32) -> Value {
    let cursor = Cursor { commit_lsn: ctx.begin.commit_lsn, index };
    let columns: Vec<Value> = rel
        .columns
        .iter()
        .map(|c| json!({"name": c.name, "type": c.type_name, "type_oid": c.type_oid, "key": c.is_key}))
        .collect();
    let data = json!({
        "source": source_block(ctx, rel, cursor),
        "schema": rel.schema,
        "table": rel.table,
        "columns": columns,
    });
    envelope(ctx, SCHEMA_CHANGE_TYPE, rel.name(), cursor, data)
}

/// Renders a DDL statement's event for one table it touched: `statement` is the one statement
/// of the client's text that ran (`None` when it cannot be told apart; `text` then holds all).
/// `index` orders it after the transaction's change `index`.
pub fn ddl_event(
    ctx: &EventContext<'_>,
    change: &crate::SchemaChange,
    statement: Option<&str>,
    table: &str,
    index: u32,
) -> Value {
    let cursor = Cursor { commit_lsn: ctx.begin.commit_lsn, index };
    let (schema, name) = table.split_once('.').unwrap_or(("", table));
    let columns = change.shapes.iter().find(|s| s.table == table).map(|s| &s.columns);
    let data = json!({
        "source": source_of(ctx, schema, name, cursor),
        "schema": schema,
        "table": name,
        "tag": change.tag,
        "statement": statement,
        "text": if statement.is_none() { Some(change.sql.as_str()) } else { None },
        "search_path": change.search_path,
        "columns": columns,
    });
    envelope(ctx, DDL_TYPE, table.to_owned(), cursor, data)
}

/// Renders a gap's control event ([`crate::LogRecord::Resync`]). `snapshot` is where the
/// consumer re-reads the source (the stream API's snapshot path), when there is one.
pub fn resync_event(node: &str, database: &str, mark: &crate::ResyncMark, snapshot: Option<&str>) -> Value {
    let cursor = mark.cursor();
    json!({
        "specversion": "1.0",
        "id": format!("{node}/{cursor}/resync"),
        "source": format!("/synapsedb/{node}/{database}"),
        "type": RESYNC_TYPE,
        "subject": "*",
        "time": rfc3339_micros(mark.found_at_us),
        "datacontenttype": "application/json",
        "synapsecursor": cursor.to_string(),
        "data": {
            "reason": mark.reason,
            "lost_after_lsn": mark.after.to_string(),
            "source_wal_lsn": mark.source_wal.map(|l| l.to_string()),
            "snapshot": snapshot,
            "action": "changes committed on the source between these positions were not captured; re-read the tables you keep (the snapshot) and continue after this event",
        },
    })
}

/// Formats microseconds since the Unix epoch as RFC 3339 UTC (`2026-11-26T14:03:48.123456Z`).
pub fn rfc3339_micros(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Column, Lsn, OldValues, ReplicaIdentity};

    fn rel() -> Relation {
        let col = |name: &str, oid: u32, ty: &str, key: bool| Column {
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
            type_name: ty.into(),
            base_type_oid: oid,
            element_type_oid: 0,
            is_key: key,
            type_defs: Vec::new(),
        };
        Relation {
            oid: 16384,
            schema: "public".into(),
            table: "users".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", 20, "bigint", true), col("bio", 25, "text", false)],
        }
    }

    fn begin() -> Begin {
        Begin { commit_lsn: Lsn(0x1_0000_0010), xid: 771, commit_time_us: 1_795_000_000_123_456, origin: None }
    }

    #[test]
    fn time_formatting() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_micros(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(rfc3339_micros(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn events_validate_against_published_schema() {
        let schema: Value = serde_json::from_str(crate::CHANGE_EVENT_SCHEMA).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let b = begin();
        let ctx = EventContext { node: "a", database: "app", begin: &b };
        let r = rel();
        let upd = RowChange {
            index: 2,
            relation: r.key(),
            op: Op::Update,
            before: Some((OldValues::Key, vec![crate::Datum::Text("7".into()), crate::Datum::Null].into())),
            after: Some(vec![crate::Datum::Text("7".into()), crate::Datum::UnchangedToast].into()),
        };
        let e = change_event(&ctx, &r, &upd);
        assert_eq!(e["id"], "a/1/10/2");
        // The direct writer produces the same document.
        let mut direct = Vec::new();
        write_change_event(&ctx, &r, &upd, &mut direct);
        assert_eq!(serde_json::from_slice::<Value>(&direct).unwrap(), e);
        assert_eq!(e["data"]["after"]["bio"], UNAVAILABLE_VALUE);
        assert_eq!(e["data"]["after"]["id"], 7);
        let errors: Vec<String> = validator.iter_errors(&e).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}");
        let s = schema_change_event(&ctx, &r, 1);
        assert!(validator.is_valid(&s));
        let mut snap = Vec::new();
        write_snapshot_event("a", "app", &r, upd.after.as_ref().unwrap(), Cursor::default(), 1, 0, &mut snap);
        let snap: Value = serde_json::from_slice(&snap).unwrap();
        assert_eq!(snap["data"]["op"], "r");
        assert!(validator.is_valid(&snap), "{snap}");
        let t = truncate_event(&ctx, &r, 3);
        assert_eq!(t["data"]["op"], "t");
        assert!(validator.is_valid(&t));
        let ddl = crate::SchemaChange {
            tag: "ALTER TABLE".into(),
            sql: "ALTER TABLE users ADD COLUMN age int".into(),
            nth: 0,
            search_path: "public".into(),
            tables: vec!["public.users".into()],
            joined: vec![],
            shapes: vec![crate::TableShape {
                table: "public.users".into(),
                columns: vec![crate::ColumnShape { name: "age".into(), type_name: "integer".into() }],
            }],
            copy: vec![],
        };
        let d = ddl_event(&ctx, &ddl, Some("ALTER TABLE users ADD COLUMN age int"), "public.users", 2);
        let errors: Vec<String> = validator.iter_errors(&d).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(d["data"]["columns"][0]["type"], "integer");
        let dropped = ddl_event(&ctx, &ddl, None, "public.gone", 2);
        assert!(validator.is_valid(&dropped), "{dropped}");
        assert_eq!(dropped["data"]["text"], "ALTER TABLE users ADD COLUMN age int");
        let mark = crate::ResyncMark {
            after: Lsn(0x2_0000_0100),
            source_wal: Some(Lsn(0x2_0100_0000)),
            found_at_us: b.commit_time_us,
            reason: "its replication slot is missing".into(),
        };
        let gap = resync_event("a", "app", &mark, Some("/v1/streams/a/snapshot"));
        let errors: Vec<String> = validator.iter_errors(&gap).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(gap["synapsecursor"], "2/100/0");
        let mut no_reason = gap.clone();
        no_reason["data"].as_object_mut().unwrap().remove("reason");
        assert!(!validator.is_valid(&no_reason));
        // The schema is not vacuous: a change without `op` is rejected.
        let mut bad = e.clone();
        bad["data"].as_object_mut().unwrap().remove("op");
        assert!(!validator.is_valid(&bad));
    }
}
