//! Turns a target transaction's worth of row changes into few statements.
//!
//! Changes are queued per table in arrival order as *runs* of the same operation (and, for
//! updates, the same set of sent columns). A run becomes one statement over `unnest()`ed text
//! arrays, so a thousand single-row source transactions cost a handful of round trips.
//!
//! Why reordering is safe: the applier runs with `session_replication_role = replica`, so no
//! triggers and no foreign-key checks fire; only changes of *different* tables are reordered,
//! and within a table the order of runs is kept. Consecutive updates of the same key inside a
//! run collapse into the last one (same column set, so the last image wins); key-changing
//! updates and `REPLICA IDENTITY FULL` tables (no key to join on) go row by row.

use crate::copy_binary::{self, Field};
use crate::pipeline::Pipeline;
use crate::target::TargetTable;
use crate::ApplyError;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use std::collections::HashMap;
use std::sync::Arc;
use synapse_postgres::quote;
use synapse_schemas::{OldValues, Op, Relation, RelationKey, ReplicaIdentity, RowChange, Tuple, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

type Values = Vec<Option<String>>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum RunKind {
    Insert,
    /// Which non-key columns the updates carry (unchanged TOAST columns are left out).
    Update(Vec<bool>),
    Delete,
    /// Executed row by row.
    Single,
}

struct Run {
    kind: RunKind,
    rows: Vec<Row>,
    by_key: HashMap<Values, usize>,
}

enum Row {
    /// Values of the run's columns (updates: key then set columns; deletes: key).
    Values(Values),
    /// A whole new row (inserts), as captured.
    Tuple(Tuple),
    Single(RowChange),
}

struct TableQueue {
    rel: Arc<Relation>,
    target: Arc<TargetTable>,
    runs: Vec<Run>,
}

#[derive(Default)]
pub(crate) struct PendingChanges {
    tables: Vec<TableQueue>,
    index: HashMap<RelationKey, usize>,
    rows: usize,
}

fn text(v: Value<'_>) -> Option<String> {
    v.as_text().map(str::to_owned)
}

impl PendingChanges {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn push(&mut self, rel: &Arc<Relation>, target: &Arc<TargetTable>, change: RowChange) {
        let key = change.relation;
        let qi = *self.index.entry(key).or_insert_with(|| {
            self.tables.push(TableQueue { rel: rel.clone(), target: target.clone(), runs: Vec::new() });
            self.tables.len() - 1
        });
        let q = &mut self.tables[qi];
        self.rows += 1;
        let full = rel.replica_identity == ReplicaIdentity::Full || rel.key_columns().next().is_none();
        let key_changed = matches!(change.before, Some((OldValues::Key, _))) && change.op == Op::Update;
        let mut change = change;
        let (kind, values, key) = match (&change.op, &mut change.after, &change.before) {
            _ if full || key_changed => (RunKind::Single, None, None),
            // Inserts are the bulk of a catch-up: the row's buffer moves as it is.
            (Op::Insert, after @ Some(_), _) => (RunKind::Insert, after.take().map(Row::Tuple), None),
            (Op::Update, Some(after), _) => {
                let after = &*after;
                let mask: Vec<bool> = rel
                    .columns
                    .iter()
                    .zip(after.values())
                    .map(|(c, d)| !c.is_key && d != Value::UnchangedToast)
                    .collect();
                let keyv: Values = rel.key_columns().map(|(i, _)| after.get(i).and_then(text)).collect();
                let mut v = keyv.clone();
                v.extend(after.values().zip(&mask).filter(|(_, m)| **m).map(|(d, _)| text(d)));
                (RunKind::Update(mask), Some(Row::Values(v)), Some(keyv))
            }
            (Op::Delete, _, Some((_, before))) => {
                let keyv: Values = rel.key_columns().map(|(i, _)| before.get(i).and_then(text)).collect();
                (RunKind::Delete, Some(Row::Values(keyv.clone())), Some(keyv))
            }
            _ => (RunKind::Single, None, None),
        };
        if q.runs.last().is_none_or(|r| r.kind != kind) {
            q.runs.push(Run { kind: kind.clone(), rows: Vec::new(), by_key: HashMap::new() });
        }
        let Some(run) = q.runs.last_mut() else { return };
        match (values, key) {
            (None, _) => run.rows.push(Row::Single(change)),
            (Some(v), Some(k)) => match run.by_key.get(&k) {
                // Same key again in this run: the newer image replaces the older one.
                Some(&at) => run.rows[at] = v,
                None => {
                    run.by_key.insert(k, run.rows.len());
                    run.rows.push(v);
                }
            },
            (Some(v), None) => run.rows.push(v),
        }
    }

    /// Sends everything queued, in order per table, and empties the queue. Statements go into
    /// `pipeline` (their results are read by its `settle`); a COPY is run to its end.
    pub async fn flush(
        &mut self,
        client: &Arc<Client>,
        cache: &mut HashMap<String, Statement>,
        pipeline: &mut Pipeline,
    ) -> Result<(usize, Copied), ApplyError> {
        let applied = self.rows;
        let mut copied = Copied::default();
        for q in std::mem::take(&mut self.tables) {
            for run in q.runs {
                let c = match execute_run(client, cache, pipeline, &q.rel, &q.target, run).await {
                    Ok(c) => c,
                    Err(e) => return Err(pipeline.first_error(e).await),
                };
                copied.binary += c.binary;
                copied.text += c.text;
            }
        }
        self.index.clear();
        self.rows = 0;
        Ok((applied, copied))
    }
}

pub(crate) async fn prepared(
    client: &Client,
    cache: &mut HashMap<String, Statement>,
    sql: String,
    table: &str,
) -> Result<Statement, ApplyError> {
    if let Some(s) = cache.get(&sql) {
        return Ok(s.clone());
    }
    let s = client.prepare(&sql).await.map_err(ApplyError::target(format!("preparing a statement for {table}")))?;
    cache.insert(sql, s.clone());
    Ok(s)
}

fn transpose(rows: Vec<Row>, width: usize) -> Vec<Values> {
    let mut cols: Vec<Values> = (0..width).map(|_| Vec::with_capacity(rows.len())).collect();
    for r in rows {
        match r {
            Row::Values(v) => {
                for (c, x) in cols.iter_mut().zip(v) {
                    c.push(x);
                }
            }
            Row::Tuple(t) => {
                for (c, x) in cols.iter_mut().zip(t.values()) {
                    c.push(text(x));
                }
            }
            Row::Single(_) => {}
        }
    }
    cols
}

/// Insert runs at least this long go through COPY: PostgreSQL loads them with batched heap
/// inserts (`heap_multi_insert`), where INSERT … SELECT and the built-in apply worker insert
/// row by row. Below it, one prepared INSERT round trip is cheaper than COPY's two.
const COPY_MIN_ROWS: usize = 64;

/// Appends `value` in COPY text format (`\N` for NULL; backslash, tab, newline, CR escaped).
fn copy_text(buf: &mut BytesMut, value: Option<&str>) {
    let Some(v) = value else {
        buf.extend_from_slice(b"\\N");
        return;
    };
    let mut start = 0;
    for (i, b) in v.bytes().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        buf.extend_from_slice(&v.as_bytes()[start..i]);
        buf.extend_from_slice(esc);
        start = i + 1;
    }
    buf.extend_from_slice(&v.as_bytes()[start..]);
}

async fn copy_rows(
    client: &Client,
    cache: &mut HashMap<String, Statement>,
    rel: &Relation,
    t: &TargetTable,
    rows: Vec<Row>,
) -> Result<Copied, ApplyError> {
    let mut rows = rows
        .into_iter()
        .filter_map(|r| match r {
            Row::Tuple(values) => Some(values),
            _ => None,
        })
        .peekable();
    let mut copied = Copied::default();
    if let Some(fields) = &t.binary {
        copied.binary = copy_in(client, cache, rel, t, CopyFormat::Binary(fields), &mut rows).await?;
    }
    if rows.peek().is_some() {
        copied.text = copy_in(client, cache, rel, t, CopyFormat::Text, &mut rows).await?;
    }
    Ok(copied)
}

/// Rows an insert run wrote through COPY, per format.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Copied {
    pub binary: u64,
    pub text: u64,
}

enum CopyFormat<'a> {
    Text,
    Binary(&'a [Field]),
}

impl CopyFormat<'_> {
    /// Appends one row; false (and `buf` as it was) when a value has no binary form.
    fn put_row(&self, buf: &mut BytesMut, row: &Tuple) -> bool {
        match self {
            CopyFormat::Text => {
                for (i, v) in row.values().enumerate() {
                    if i > 0 {
                        buf.extend_from_slice(b"\t");
                    }
                    copy_text(buf, v.as_text());
                }
                buf.extend_from_slice(b"\n");
                true
            }
            CopyFormat::Binary(fields) => {
                if row.len() != fields.len() {
                    return false;
                }
                let start = buf.len();
                buf.put_i16(fields.len() as i16);
                let mut put = 0;
                for (f, v) in fields.iter().zip(row.values()) {
                    let ok = match v {
                        Value::Null => {
                            buf.put_i32(-1);
                            true
                        }
                        Value::Text(s) => f.put(s, buf).is_some(),
                        Value::UnchangedToast => false,
                    };
                    if !ok {
                        break;
                    }
                    put += 1;
                }
                // Every field, or none of the row (the field count is already written).
                if put != fields.len() {
                    buf.truncate(start);
                    return false;
                }
                true
            }
        }
    }
}

/// One COPY of `rows` in `format`, until the rows end or (binary) a row has a value with no
/// binary form: that row and the rest stay in `rows` for a text COPY. Returns the rows written.
async fn copy_in(
    client: &Client,
    cache: &mut HashMap<String, Statement>,
    rel: &Relation,
    t: &TargetTable,
    format: CopyFormat<'_>,
    rows: &mut std::iter::Peekable<impl Iterator<Item = Tuple>>,
) -> Result<u64, ApplyError> {
    let binary = matches!(format, CopyFormat::Binary(_));
    let mut buf = BytesMut::with_capacity(1 << 16);
    if binary {
        buf.extend_from_slice(copy_binary::HEADER);
    }
    // No COPY is opened (nor prepared) for a run whose first row has no binary form.
    if !rows.peek().is_some_and(|row| format.put_row(&mut buf, row)) {
        return Ok(0);
    }
    rows.next();
    let mut written = 1u64;
    let names: Vec<String> = rel.columns.iter().map(|c| quote::ident(&c.name)).collect();
    let options = if binary { " (FORMAT binary)" } else { "" };
    let sql = format!("COPY {} ({}) FROM STDIN{options}", t.name, names.join(", "));
    let stmt = prepared(client, cache, sql, &rel.name()).await?;
    let err = || ApplyError::target(format!("copying changes into {}", rel.name()));
    let sink = client.copy_in::<_, Bytes>(&stmt).await.map_err(err())?;
    futures_util::pin_mut!(sink);
    while let Some(row) = rows.peek() {
        if buf.len() >= 1 << 16 {
            sink.send(buf.split().freeze()).await.map_err(err())?;
        }
        if !format.put_row(&mut buf, row) {
            break;
        }
        rows.next();
        written += 1;
    }
    if binary {
        buf.extend_from_slice(copy_binary::TRAILER);
    }
    sink.send(buf.freeze()).await.map_err(err())?;
    sink.finish().await.map_err(err())?;
    Ok(written)
}

/// `unnest($1::text[], …, $n::text[]) AS u(c0, …, c{n-1})`: one text array per column.
fn unnest(n: usize) -> String {
    let arrays: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    format!("unnest({}) AS u({})", arrays.join(", "), aliases.join(", "))
}

async fn execute_run(
    client: &Arc<Client>,
    cache: &mut HashMap<String, Statement>,
    pipeline: &mut Pipeline,
    rel: &Relation,
    t: &TargetTable,
    run: Run,
) -> Result<Copied, ApplyError> {
    if run.kind == RunKind::Insert && run.rows.len() >= COPY_MIN_ROWS {
        return copy_rows(client, cache, rel, t, run.rows).await;
    }
    let keys: Vec<usize> = rel.key_columns().map(|(i, _)| i).collect();
    let col = |i: usize| quote::ident(&rel.columns[i].name);
    let cast = |i: usize| &t.casts[i];
    // Updates and deletes find their rows by the key, which leads the unnested columns.
    let key_match: String = keys
        .iter()
        .enumerate()
        .map(|(j, &i)| format!("t.{} = u.c{j}::{}", col(i), cast(i)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let (sql, width) = match &run.kind {
        RunKind::Insert => {
            let n = rel.columns.len();
            let names: Vec<String> = (0..n).map(col).collect();
            let sel: Vec<String> = (0..n).map(|i| format!("u.c{i}::{}", cast(i))).collect();
            (format!("INSERT INTO {} ({}) SELECT {} FROM {}", t.name, names.join(", "), sel.join(", "), unnest(n)), n)
        }
        RunKind::Update(mask) => {
            let set_cols: Vec<usize> = (0..rel.columns.len()).filter(|i| mask[*i]).collect();
            if set_cols.is_empty() {
                return Ok(Copied::default()); // only unchanged TOAST values: nothing to write
            }
            let width = keys.len() + set_cols.len();
            let set: Vec<String> = set_cols
                .iter()
                .enumerate()
                .map(|(j, &i)| format!("{} = u.c{}::{}", col(i), keys.len() + j, cast(i)))
                .collect();
            (format!("UPDATE {} AS t SET {} FROM {} WHERE {}", t.name, set.join(", "), unnest(width), key_match), width)
        }
        RunKind::Delete => {
            (format!("DELETE FROM {} AS t USING {} WHERE {}", t.name, unnest(keys.len()), key_match), keys.len())
        }
        RunKind::Single => {
            for row in run.rows {
                if let Row::Single(change) = row {
                    execute_single(client, cache, pipeline, rel, t, &change).await?;
                }
            }
            return Ok(Copied::default());
        }
    };
    let stmt = prepared(client, cache, sql, &rel.name()).await?;
    let cols = transpose(run.rows, width);
    let (client, table) = (client.clone(), rel.name());
    pipeline
        .send(async move {
            let params: Vec<&(dyn ToSql + Sync)> = cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            client.execute(&stmt, &params).await.map_err(ApplyError::target(format!("applying changes to {table}")))?;
            Ok(())
        })
        .await;
    Ok(Copied::default())
}

/// Row-by-row path: key-changing updates (old key from the change) and tables without a key
/// (`REPLICA IDENTITY FULL`: match one row on every old value).
async fn execute_single(
    client: &Arc<Client>,
    cache: &mut HashMap<String, Statement>,
    pipeline: &mut Pipeline,
    rel: &Relation,
    t: &TargetTable,
    change: &RowChange,
) -> Result<(), ApplyError> {
    let col = |i: usize| quote::ident(&rel.columns[i].name);
    let mut params: Vec<Option<String>> = Vec::new();
    let p = |v: Option<String>, params: &mut Vec<Option<String>>| {
        params.push(v);
        format!("${}::text", params.len())
    };
    let sql = match (change.op, &change.after, &change.before) {
        (Op::Insert, Some(after), _) => {
            let names: Vec<String> = (0..rel.columns.len()).map(col).collect();
            let vals: Vec<String> = after
                .values()
                .enumerate()
                .map(|(i, d)| format!("{}::{}", p(text(d), &mut params), t.casts[i]))
                .collect();
            format!("INSERT INTO {} ({}) VALUES ({})", t.name, names.join(", "), vals.join(", "))
        }
        (op, after, before) => {
            let mut set = Vec::new();
            if let (Op::Update, Some(after)) = (op, after) {
                for (i, d) in after.values().enumerate() {
                    if d != Value::UnchangedToast {
                        set.push(format!("{} = {}::{}", col(i), p(text(d), &mut params), t.casts[i]));
                    }
                }
            }
            // The old row: the sent key or full image, else (update without key change) the key
            // columns of the new row.
            let (old, key_only) = match (before, after) {
                (Some((kind, b)), _) => (b, *kind == OldValues::Key),
                (None, Some(a)) => (a, true),
                (None, None) => return Ok(()),
            };
            let mut cond = Vec::new();
            for (i, d) in old.values().enumerate() {
                if (key_only && !rel.columns[i].is_key) || d == Value::UnchangedToast {
                    continue;
                }
                cond.push(format!("{} IS NOT DISTINCT FROM {}::{}", col(i), p(text(d), &mut params), t.casts[i]));
            }
            if cond.is_empty() {
                cond.push("true".into());
            }
            let target_row = format!("ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)", t.name, cond.join(" AND "));
            if op == Op::Delete {
                format!("DELETE FROM {} WHERE {target_row}", t.name)
            } else if set.is_empty() {
                return Ok(());
            } else {
                format!("UPDATE {} SET {} WHERE {target_row}", t.name, set.join(", "))
            }
        }
    };
    let stmt = prepared(client, cache, sql, &rel.name()).await?;
    let (client, table) = (client.clone(), rel.name());
    pipeline
        .send(async move {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            client
                .execute(&stmt, &refs)
                .await
                .map_err(ApplyError::target(format!("applying a row change to {table}")))?;
            Ok(())
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes() {
        let mut b = BytesMut::new();
        copy_text(&mut b, Some("a\tb\\c\nd\re"));
        b.extend_from_slice(b"|");
        copy_text(&mut b, None);
        b.extend_from_slice(b"|");
        copy_text(&mut b, Some(""));
        assert_eq!(&b[..], b"a\\tb\\\\c\\nd\\re|\\N|");
    }
}
