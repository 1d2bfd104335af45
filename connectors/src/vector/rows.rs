//! The current values of the rows a search found (`include`), read from the source by key.
//!
//! Guarantees:
//! * **Current, not as indexed.** The values are read when the search answers, so they may be
//!   newer than the position the index reflects; a row deleted since is `null`.
//! * **Only the table's columns.** Asked-for names are checked against the catalog (quoted
//!   identifiers, never spliced text); an unknown one is a bad request naming it.
//! * **By key, through the primary key's index.** Keys are cast back to the key columns' types
//!   (`row::key` wrote them as text); a composite key whose text is ambiguous (a `/` inside a
//!   value) is reported as such, never matched to a wrong row.

use crate::ConnectorError;
use serde_json::{Map, Value as Json};
use std::collections::HashMap;
use std::time::Duration;
use synapse_postgres::quote::{ident, literal};
use synapse_postgres::PgConfig;
use tokio::sync::Mutex;

/// Columns a search may ask for at once.
pub const MAX_INCLUDE: usize = 64;

/// How long reading the rows may take before the search fails (transient).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the source and what it learned of the table.
struct Reader {
    client: tokio_postgres::Client,
    /// The primary key columns and their types (`format_type`), in key order.
    keys: Vec<(String, String)>,
    /// Every column of the table.
    columns: Vec<String>,
}

/// Reads rows of one table by the index's keys; one connection, made on first use and again
/// after an error.
pub struct CurrentRows {
    pg: PgConfig,
    table: String,
    reader: Mutex<Option<Reader>>,
}

/// A row read for a search: its values, or why it has none.
#[derive(Debug, Clone, PartialEq)]
pub enum Current {
    Row(Map<String, Json>),
    /// Deleted since the index saw it (or not yet visible).
    Gone,
    /// The key's text cannot be split back into its columns.
    Ambiguous,
}

impl CurrentRows {
    pub fn new(pg: PgConfig, table: &str) -> CurrentRows {
        CurrentRows { pg, table: table.to_owned(), reader: Mutex::new(None) }
    }

    /// The current values of `columns` of the rows with `keys`, in the order of `keys`.
    pub async fn read(&self, keys: &[String], columns: &[String]) -> Result<Vec<Current>, ConnectorError> {
        if columns.len() > MAX_INCLUDE {
            return Err(ConnectorError::BadRequest {
                field: "include".into(),
                message: format!("{} columns; at most {MAX_INCLUDE}", columns.len()),
            });
        }
        let mut guard = self.reader.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect().await?);
        }
        let Some(reader) = guard.as_ref() else { return Err(ConnectorError::Index("no connection".into())) };
        if let Some(unknown) = columns.iter().find(|c| !reader.columns.contains(c)) {
            return Err(ConnectorError::BadRequest {
                field: "include".into(),
                message: format!("`{unknown}` is not a column of {}", self.table),
            });
        }
        let read = tokio::time::timeout(READ_TIMEOUT, self.query(reader, keys, columns)).await;
        match read {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                // The connection may be the cause: the next search makes a new one.
                *guard = None;
                Err(ConnectorError::Rows { table: self.table.clone(), source: e })
            }
            Err(_) => {
                *guard = None;
                Err(ConnectorError::NotReached {
                    what: format!("reading {} rows of {} took over {READ_TIMEOUT:?}", keys.len(), self.table),
                })
            }
        }
    }

    async fn connect(&self) -> Result<Reader, ConnectorError> {
        let rows_error = |source| ConnectorError::Rows { table: self.table.clone(), source };
        let client = synapse_postgres::connect(&self.pg, "vector index rows").await.map_err(rows_error)?;
        let quoted = quoted_table(&self.table)?;
        let catalog = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                        (SELECT k.ord FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                          WHERE i.indrelid = a.attrelid AND i.indisprimary AND k.attnum = a.attnum)
                   FROM pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&quoted],
            )
            .await
            .map_err(rows_error)?;
        let mut keys: Vec<(i64, String, String)> = Vec::new();
        let mut columns = Vec::new();
        for r in &catalog {
            let (name, ty, ord): (String, String, Option<i64>) = (r.get(0), r.get(1), r.get(2));
            if let Some(ord) = ord {
                keys.push((ord, name.clone(), ty));
            }
            columns.push(name);
        }
        keys.sort();
        if keys.is_empty() {
            return Err(ConnectorError::Index(format!("{} has no primary key: rows are read by it", self.table)));
        }
        Ok(Reader { client, keys: keys.into_iter().map(|(_, n, t)| (n, t)).collect(), columns })
    }

    async fn query(
        &self,
        reader: &Reader,
        keys: &[String],
        columns: &[String],
    ) -> Result<Vec<Current>, tokio_postgres::Error> {
        let n = reader.keys.len();
        // Each key's parts, one array per key column; ambiguous keys are left out.
        let mut parts: Vec<Vec<String>> = vec![Vec::new(); n];
        let mut asked = Vec::new();
        for key in keys {
            if let Some(p) = split_key(key, n) {
                for (column, part) in parts.iter_mut().zip(p) {
                    column.push(part.to_owned());
                }
                asked.push(key.clone());
            }
        }
        let mut found: HashMap<String, Map<String, Json>> = HashMap::new();
        if !asked.is_empty() {
            let unnest: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
            let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
            let join: Vec<String> = reader
                .keys
                .iter()
                .enumerate()
                .map(|(i, (column, ty))| format!("t.{} = k.p{i}::{ty}", ident(column)))
                .collect();
            let object: Vec<String> = columns.iter().map(|c| format!("{}, t.{}", literal(c), ident(c))).collect();
            // The key's text again, as `row::key` makes it, from the parts it was split into.
            let key_text = if n == 1 { "k.p0".to_owned() } else { format!("concat_ws('/', {})", names.join(", ")) };
            let sql = format!(
                "SELECT {key_text}, jsonb_build_object({})::text FROM unnest({}) AS k({}) JOIN {} t ON {}",
                object.join(", "),
                unnest.join(", "),
                names.join(", "),
                quoted_table(&self.table).unwrap_or_default(),
                join.join(" AND ")
            );
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                parts.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
            for r in reader.client.query(&sql, &params).await? {
                let (key, values): (String, String) = (r.get(0), r.get(1));
                if let Ok(Json::Object(values)) = serde_json::from_str(&values) {
                    found.insert(key, values);
                }
            }
        }
        Ok(keys
            .iter()
            .map(|k| match found.remove(k) {
                Some(values) => Current::Row(values),
                None if split_key(k, n).is_none() => Current::Ambiguous,
                None => Current::Gone,
            })
            .collect())
    }
}

/// `schema.table` quoted.
fn quoted_table(table: &str) -> Result<String, ConnectorError> {
    table
        .split_once('.')
        .map(|(s, t)| format!("{}.{}", ident(s), ident(t)))
        .ok_or_else(|| ConnectorError::Index(format!("{table} is not schema.table")))
}

/// A key's text split into its `n` columns' parts (`super::row::key` joins them with `/`);
/// `None` when the split is not unique.
fn split_key(key: &str, n: usize) -> Option<Vec<&str>> {
    if n == 1 {
        return Some(vec![key]);
    }
    let parts: Vec<&str> = key.split('/').collect();
    (parts.len() == n).then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back_only_when_unique() {
        assert_eq!(split_key("a/b", 1), Some(vec!["a/b"]));
        assert_eq!(split_key("acme/7", 2), Some(vec!["acme", "7"]));
        assert_eq!(split_key("ac/me/7", 2), None);
        assert_eq!(split_key("7", 2), None);
    }
}
