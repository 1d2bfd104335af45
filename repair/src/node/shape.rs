//! What a table is on a node: its key and value columns as hash expressions ([`Shape`]).

use super::*;

impl Node {
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
            // A shard's part of the table, when only its rows are compared.
            from: match self.row_filters.get(name) {
                Some(rows) => {
                    format!("(SELECT * FROM {}.{} WHERE {rows}) t", quote::ident(schema), quote::ident(table))
                }
                None => format!("{}.{} t", quote::ident(schema), quote::ident(table)),
            },
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
}
