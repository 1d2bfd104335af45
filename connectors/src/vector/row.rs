//! A row's vector, key and filter values, read from the forms the change stream and a snapshot
//! give them: a `real[]`/`double precision[]` as a JSON array of numbers or as PostgreSQL's
//! array text (`{1,2.5,-3e-2}`), pgvector's text (`[1,2.5,-0.03]`).

use serde_json::{Map, Value as Json};

/// The vector in `value`, or why there is none (the row goes to the dead letters).
pub fn vector(value: &Json) -> Result<Vec<f32>, String> {
    match value {
        Json::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Json::Number(n) => n.as_f64().map(|f| f as f32).ok_or_else(|| format!("component {i} is not a number")),
                Json::String(s) => number(s).map_err(|_| format!("component {i} ({s}) is not a number")),
                _ => Err(format!("component {i} is not a number")),
            })
            .collect(),
        Json::String(s) => text(s),
        Json::Null => Err("the vector column is NULL".into()),
        other => Err(format!("the vector column holds {other}, not an array of numbers")),
    }
}

fn number(s: &str) -> Result<f32, ()> {
    let f: f32 = s.trim().parse().map_err(|_| ())?;
    Ok(f)
}

/// `{…}` (an array's text) or `[…]` (pgvector's).
pub fn text(s: &str) -> Result<Vec<f32>, String> {
    let t = s.trim();
    let inner = t
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .or_else(|| t.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
        .ok_or_else(|| format!("`{}` is not an array of numbers", abbreviated(t)))?;
    if inner.contains('{') || inner.contains('[') {
        return Err("a nested array is not a vector".into());
    }
    if inner.trim().is_empty() {
        return Ok(Vec::new());
    }
    inner
        .split(',')
        .enumerate()
        .map(|(i, p)| match p.trim() {
            "NULL" => Err(format!("component {i} is NULL")),
            p => number(p).map_err(|_| format!("component {i} (`{}`) is not a number", abbreviated(p))),
        })
        .collect()
}

fn abbreviated(s: &str) -> String {
    if s.chars().count() <= 40 {
        return s.to_owned();
    }
    s.chars().take(40).collect::<String>() + "…"
}

/// A row's key as text: its key columns' values joined by `/` (strings as they are, other
/// values as JSON), the same for a row from the stream and from a snapshot.
pub fn key(row: &Map<String, Json>, columns: &[String]) -> Option<String> {
    let parts: Option<Vec<String>> = columns
        .iter()
        .map(|c| match row.get(c)? {
            Json::Null => None,
            Json::String(s) => Some(s.clone()),
            v => Some(v.to_string()),
        })
        .collect();
    Some(parts?.join("/"))
}

/// The filter columns' values of a row (a missing column is NULL).
pub fn filters(row: &Map<String, Json>, columns: &[String]) -> Map<String, Json> {
    columns.iter().map(|c| (c.clone(), row.get(c).cloned().unwrap_or(Json::Null))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vectors_from_every_form() {
        assert_eq!(vector(&json!([1, 2.5, -0.5])).unwrap(), vec![1.0, 2.5, -0.5]);
        assert_eq!(vector(&json!("{1,2.5,-3e-2}")).unwrap(), vec![1.0, 2.5, -0.03]);
        assert_eq!(vector(&json!("[1, 2.5, -0.03]")).unwrap(), vec![1.0, 2.5, -0.03]);
        assert_eq!(vector(&json!(["1", "NaN"])).unwrap()[0], 1.0);
        assert!(vector(&json!(null)).unwrap_err().contains("NULL"));
        assert!(vector(&json!("{1,NULL}")).unwrap_err().contains("component 1 is NULL"));
        assert!(vector(&json!("{{1},{2}}")).unwrap_err().contains("nested"));
        assert!(vector(&json!("hello")).unwrap_err().contains("not an array"));
        assert!(vector(&json!([1, "x"])).unwrap_err().contains("component 1"));
        assert!(vector(&json!({"a": 1})).unwrap_err().contains("not an array"));
    }

    #[test]
    fn keys_and_filters() {
        let row = json!({"id": 7, "tenant": "acme", "lang": null});
        let row = row.as_object().unwrap();
        assert_eq!(key(row, &["tenant".into(), "id".into()]).as_deref(), Some("acme/7"));
        assert_eq!(key(row, &["lang".into()]), None);
        let f = filters(row, &["tenant".into(), "missing".into()]);
        assert_eq!(Json::Object(f), json!({"tenant": "acme", "missing": null}));
    }
}
