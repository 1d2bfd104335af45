//! Reading a mesh table's shape from the catalog: key, columns, strategies, unique keys.

use super::*;

/// A table replicated by the mesh, as read from one node's catalog.
#[derive(Clone, Debug)]
pub struct MeshTable {
    pub schema: String,
    pub table: String,
    /// Primary-key columns, in key order.
    pub key: Vec<String>,
    /// Every other column, with its strategy.
    pub columns: Vec<(String, Strategy)>,
    /// Unique indexes besides the primary key (plain columns, not partial): index name and
    /// columns. Concurrent inserts on two nodes can collide on them (see `unique_collisions`).
    pub unique: Vec<(String, Vec<String>)>,
    /// Every column's type on this node, what text values are cast to when written.
    pub types: BTreeMap<String, String>,
}

impl MeshTable {
    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The type to cast `column`'s text to on this node.
    pub(super) fn cast(&self, column: &str) -> String {
        self.types.get(column).cloned().unwrap_or_else(|| "text".into())
    }

    pub(super) fn is_jsonb(&self, column: &str) -> bool {
        self.types.get(column).is_some_and(|t| t == "jsonb")
    }
}

/// Reads `schema.table`'s key and columns on a node; checks what the mesh needs of it.
pub async fn describe(client: &Client, name: &str, policy: &TablePolicy) -> Result<MeshTable, ApplyError> {
    let schema_error = |message: String| ApplyError::Schema { table: name.to_owned(), message };
    let Some((schema, table)) = name.split_once('.') else {
        return Err(schema_error("a mesh table is named schema.table".into()));
    };
    let rows = client
        .query(
            "SELECT a.attname, format_type(a.atttypid, NULL), a.attnum = ANY(i.indkey) AS is_key,
                    array_position(i.indkey::int2[], a.attnum) AS key_pos
             FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''  -- computed on each node: never written nor versioned
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(ApplyError::target(format!("reading the definition of {name}")))?;
    if rows.is_empty() {
        return Err(schema_error("the table does not exist on this node: create it on every mesh node".into()));
    }
    let mut key: Vec<(i32, String)> = Vec::new();
    let mut columns = Vec::new();
    let mut types = BTreeMap::new();
    for r in &rows {
        let (col, ty, is_key): (String, String, Option<bool>) = (r.get(0), r.get(1), r.get(2));
        types.insert(col.clone(), ty.clone());
        if is_key == Some(true) {
            key.push((r.get::<_, Option<i32>>(3).unwrap_or(0), col));
            continue;
        }
        let strategy = policy.strategy(&col);
        match strategy {
            Strategy::Counter if !matches!(ty.as_str(), "smallint" | "integer" | "bigint") => {
                return Err(schema_error(format!(
                    "column {col} is {ty}: a counter column must be smallint, integer or bigint"
                )))
            }
            // Compared as numbers by the resolver and by greatest()/least() alike; text and
            // time values print differently per session settings, so they are not accepted yet.
            Strategy::Max | Strategy::Min
                if !matches!(ty.as_str(), "smallint" | "integer" | "bigint" | "numeric" | "real" | "double precision") =>
            {
                return Err(schema_error(format!(
                    "column {col} is {ty}: max and min columns must be numeric (smallint, integer, bigint, numeric, real, double precision)"
                )))
            }
            // Members are the elements' texts; a set of anything else has no elements to merge.
            Strategy::Set if !(ty.ends_with("[]") || ty == "jsonb") => {
                return Err(schema_error(format!(
                    "column {col} is {ty}: a set column must be an array (e.g. text[], bigint[]) or jsonb holding a JSON array"
                )))
            }
            _ => {}
        }
        columns.push((col, strategy));
    }
    if key.is_empty() {
        return Err(schema_error("a mesh table needs a primary key (rows are matched across nodes by it)".into()));
    }
    for col in policy.columns.keys() {
        if !columns.iter().any(|(c, _)| c == col) {
            return Err(schema_error(format!(
                "the policy names column {col}, which is not a non-key column of the table"
            )));
        }
    }
    key.sort();
    if let Some(f) = &policy.merge_function {
        let returns_jsonb: Option<bool> = client
            .query_opt(
                "SELECT prorettype = 'jsonb'::regtype FROM pg_proc WHERE oid = to_regprocedure($1)",
                &[&format!("{}(jsonb, jsonb)", quoted_name(f))],
            )
            .await
            .map_err(ApplyError::target(format!("looking up merge function {f}")))?
            .map(|r| r.get(0));
        match returns_jsonb {
            Some(true) => {}
            Some(false) => return Err(schema_error(format!("merge function {f}(jsonb, jsonb) must return jsonb"))),
            None => {
                return Err(schema_error(format!(
                    "merge function {f}(jsonb, jsonb) does not exist on this node: create it on every mesh node"
                )))
            }
        }
    }
    let unique = client
        .query(
            "SELECT ci.relname::text, array_agg(a.attname::text ORDER BY k.ord)
             FROM pg_index i
             JOIN pg_class c ON c.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_class ci ON ci.oid = i.indexrelid
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND NOT i.indisprimary
               AND i.indpred IS NULL AND i.indexprs IS NULL
             GROUP BY ci.relname ORDER BY ci.relname",
            &[&schema, &table],
        )
        .await
        .map_err(ApplyError::target(format!("reading the unique indexes of {name}")))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(MeshTable {
        schema: schema.into(),
        table: table.into(),
        key: key.into_iter().map(|(_, c)| c).collect(),
        columns,
        unique,
        types,
    })
}
