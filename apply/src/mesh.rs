//! Multi-writer apply: every node of a mesh writes the same tables; changes arriving from a
//! peer are resolved against the local row with [`synapse_resolver::resolve`] instead of being
//! written blindly.
//!
//! ```text
//!  local write ──▶ AFTER ROW trigger ──▶ synapse.row_version (same transaction)
//!                                          vv[me] += 1, per-row HLC, per-column (HLC, node),
//!                                          counter totals per node, tombstone values
//!  peer's log ──▶ row change + its row_version change ──▶ resolve(local, remote)
//!                   skip (dominated) · apply (dominates) · merge (concurrent → synapse.conflicts)
//! ```
//!
//! Causality lives in `synapse.row_version`, keyed by (table, primary key as a JSON array of
//! the key columns' text): vacuum and freeze cannot erase it, unlike commit timestamps or
//! `xmin` that other Postgres multi-master systems rely on. Local writes maintain it from a
//! trigger (SQL cannot produce the `crdts` crate's bytes, so counter state is kept as per-node
//! totals `{"<node>": [p, n]}` and converted by [`Counter::from_contributions`]); the applier,
//! which runs as `session_replication_role = replica` so no trigger fires for it, writes the
//! resolved version itself, in the same target transaction as the row and the position.
//!
//! Guarantees, given every node runs the trigger on every mesh table:
//! * **Convergence**: a key's final state depends only on the set of versions delivered, not on
//!   their order or duplication (the resolver's merge is a join; property-tested and model
//!   checked in `synapse-resolver`).
//! * **No silent loss**: a concurrent version that loses a column is recorded in
//!   `synapse.conflicts` with both versions, their clocks and the result.
//! * **Concurrency with local writes**: the applier locks the key's `row_version` row (creating a
//!   placeholder if needed) before reading the local row, so a local transaction on the same key
//!   either committed before (and is resolved against) or waits and then builds on the result.

use crate::batch::prepared;
use crate::ApplyError;
use serde_json::{json, Map, Value as Json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use synapse_postgres::quote;
use synapse_resolver::column::{Counter, Dots, MultiValue, OrSet};
use synapse_resolver::{
    resolve, unique_key_winner, Cell, Decision, Hlc, NodeId, RowVersion, Stamp, Strategy, TablePolicy, VersionVector,
};
use synapse_schemas::{Op, Relation, RowChange, Tuple, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

/// The causality sidecar: `schema.table` of the table the mesh capture publishes with the data.
pub const ROW_VERSION_SCHEMA: &str = "synapse";
pub const ROW_VERSION_TABLE: &str = "row_version";

/// Objects every mesh node needs, created idempotently.
const MESH_DDL: &str = r#"
CREATE SCHEMA IF NOT EXISTS synapse;
CREATE TABLE IF NOT EXISTS synapse.row_version (
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    vv jsonb NOT NULL,
    hlc_ms bigint NOT NULL,
    hlc_lc integer NOT NULL,
    node integer NOT NULL,
    live boolean NOT NULL,
    cols jsonb NOT NULL,
    PRIMARY KEY (tbl, pk)
);
-- Kept inline so a change of this row never arrives as "unchanged TOAST" without its value.
-- Every write of a row rewrites its version: free space per page keeps those updates HOT.
ALTER TABLE synapse.row_version ALTER COLUMN vv SET STORAGE MAIN, ALTER COLUMN cols SET STORAGE MAIN, SET (fillfactor = 50);
CREATE TABLE IF NOT EXISTS synapse.conflicts (
    id bigserial PRIMARY KEY,
    detected_at timestamptz NOT NULL DEFAULT now(),
    source_node text NOT NULL,
    table_name text NOT NULL,
    pk jsonb NOT NULL,
    kind text NOT NULL,
    resolution text NOT NULL,
    local jsonb NOT NULL,
    remote jsonb NOT NULL,
    result jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS conflicts_by_row ON synapse.conflicts (table_name, pk);
-- Rows the applier buried (lost a unique-key collision) whose burial is not yet announced.
CREATE TABLE IF NOT EXISTS synapse.burials (
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    PRIMARY KEY (tbl, pk)
);

-- One local write of a row: the node's entry of the version vector +1, a per-row hybrid
-- logical clock (past the wall clock and every version this row has held, so a write made
-- after seeing a peer's version orders after it), per-column stamps of the changed columns,
-- counter totals per node, and for a delete the last values (a tombstone keeps them so a
-- concurrent update that outlives the delete merges with everything written before).
-- Set columns keep an observed-remove set: the set's clock (adds seen per node) and per member
-- the dots of the adds that keep it; a write adds a dot per new member and drops the entries of
-- removed ones. Multi-value columns keep their siblings, each [clock, [ms, lc, node], value]; a
-- write replaces them all by one sibling whose clock covers theirs.
DROP FUNCTION IF EXISTS synapse.record_local_write(text, jsonb, integer, boolean, text[], jsonb, jsonb, jsonb);
CREATE OR REPLACE FUNCTION synapse.record_local_write(
    p_tbl text, p_pk jsonb, p_node integer, p_live boolean,
    p_changed text[], p_counters jsonb, p_base jsonb, p_values jsonb, p_sets jsonb, p_mv jsonb)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    r synapse.row_version%ROWTYPE;
    wall bigint := floor(extract(epoch FROM clock_timestamp()) * 1000);
    me text := p_node::text;
    ms bigint; lc integer; c text; pn jsonb; cur jsonb; total numeric; delta numeric; base numeric;
    st jsonb; members jsonb; entries jsonb; clk jsonb; m text; n bigint;
BEGIN
    SELECT * INTO r FROM synapse.row_version WHERE tbl = p_tbl AND pk = p_pk FOR UPDATE;
    IF NOT FOUND THEN
        r.vv := '{}'; r.hlc_ms := 0; r.hlc_lc := 0; r.cols := '{}';
        -- An update or delete of a row older than the mesh: the data every node started from
        -- is a common ancestor (a write of node 0), so two first updates are concurrent
        -- updates of it, not two inserts.
        IF p_base IS NOT NULL THEN r.vv := '{"0": 1}'; END IF;
    END IF;
    IF wall > r.hlc_ms THEN ms := wall; lc := 0; ELSE ms := r.hlc_ms; lc := r.hlc_lc + 1; END IF;
    r.vv := r.vv || jsonb_build_object(me, coalesce((r.vv ->> me)::bigint, 0) + 1);
    FOREACH c IN ARRAY p_changed LOOP
        r.cols := r.cols || jsonb_build_object(c,
            coalesce(r.cols -> c, '{}') || jsonb_build_object('at', jsonb_build_array(ms, lc, p_node)));
    END LOOP;
    FOR c IN SELECT jsonb_object_keys(p_counters) LOOP
        pn := r.cols -> c -> 'pn';
        IF pn IS NULL THEN
            -- The first write this row's counter sees: what it held before belongs to no node
            -- (node 0, the baseline), the same on every node that started from the same data.
            pn := '{}';
            base := coalesce((p_base ->> c)::numeric, 0);
            IF base > 0 THEN pn := jsonb_build_object('0', jsonb_build_array(base, 0));
            ELSIF base < 0 THEN pn := jsonb_build_object('0', jsonb_build_array(0, -base));
            END IF;
        END IF;
        SELECT coalesce(sum((v ->> 0)::numeric - (v ->> 1)::numeric), 0) INTO total FROM jsonb_each(pn) AS e(k, v);
        delta := coalesce((p_counters ->> c)::numeric, 0) - total;
        cur := coalesce(pn -> me, '[0, 0]');
        IF delta > 0 THEN cur := jsonb_build_array((cur ->> 0)::numeric + delta, cur -> 1);
        ELSIF delta < 0 THEN cur := jsonb_build_array(cur -> 0, (cur ->> 1)::numeric - delta);
        END IF;
        -- No zero entry for this node (the resolver's form has none): identical versions
        -- must be identical bytes, or tombstone purging never finds them agreed.
        IF cur <> '[0, 0]'::jsonb OR pn ? me THEN pn := pn || jsonb_build_object(me, cur); END IF;
        r.cols := r.cols || jsonb_build_object(c, coalesce(r.cols -> c, '{}') || jsonb_build_object('pn', pn));
    END LOOP;
    FOR c IN SELECT jsonb_object_keys(p_sets) LOOP
        st := r.cols -> c -> 'set';
        IF st IS NULL THEN
            -- The first write this set sees: the members it held before belong to no node
            -- (one add of node 0), the same on every node that started from the same data.
            st := '{"clock": {}, "e": {}}';
            IF jsonb_array_length(coalesce(p_sets -> c -> 'old', '[]')) > 0 THEN
                SELECT jsonb_build_object('clock', '{"0": 1}'::jsonb, 'e', jsonb_object_agg(x, '{"0": 1}'::jsonb))
                INTO st FROM jsonb_array_elements_text(p_sets -> c -> 'old') AS x;
            END IF;
        END IF;
        members := p_sets -> c -> 'new';
        SELECT coalesce(jsonb_object_agg(k, v), '{}') INTO entries FROM jsonb_each(st -> 'e') AS e(k, v) WHERE members ? k;
        n := coalesce((st -> 'clock' ->> me)::bigint, 0);
        clk := st -> 'clock';
        FOR m IN SELECT jsonb_array_elements_text(members) LOOP
            IF NOT entries ? m THEN
                n := n + 1;
                entries := entries || jsonb_build_object(m, jsonb_build_object(me, n));
                clk := clk || jsonb_build_object(me, n);
            END IF;
        END LOOP;
        r.cols := r.cols || jsonb_build_object(c,
            coalesce(r.cols -> c, '{}') || jsonb_build_object('set', jsonb_build_object('clock', clk, 'e', entries)));
    END LOOP;
    FOR c IN SELECT jsonb_object_keys(p_mv) LOOP
        SELECT coalesce(jsonb_object_agg(k, top), '{}') INTO clk FROM (
            SELECT k, max(v::bigint) AS top
            FROM jsonb_array_elements(coalesce(r.cols -> c -> 'mv', '[]')) AS s(sib), jsonb_each_text(sib -> 0) AS e(k, v)
            GROUP BY k) AS q;
        -- A row older than the mesh: its value is a common ancestor (node 0) this write replaces.
        IF r.cols -> c -> 'mv' IS NULL AND p_base IS NOT NULL THEN clk := '{"0": 1}'; END IF;
        clk := clk || jsonb_build_object(me, coalesce((clk ->> me)::bigint, 0) + 1);
        r.cols := r.cols || jsonb_build_object(c, coalesce(r.cols -> c, '{}') || jsonb_build_object('mv',
            jsonb_build_array(jsonb_build_array(clk, jsonb_build_array(ms, lc, p_node), p_mv -> c))));
    END LOOP;
    IF p_live THEN
        SELECT coalesce(jsonb_object_agg(k, v - 'v'), '{}') INTO r.cols FROM jsonb_each(r.cols) AS e(k, v);
    ELSE
        FOR c IN SELECT jsonb_object_keys(p_values) LOOP
            r.cols := r.cols || jsonb_build_object(c,
                coalesce(r.cols -> c, '{}') || jsonb_build_object('v', p_values -> c));
        END LOOP;
    END IF;
    INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
    VALUES (p_tbl, p_pk, r.vv, ms, lc, p_node, p_live, r.cols)
    ON CONFLICT (tbl, pk) DO UPDATE SET vv = excluded.vv, hlc_ms = excluded.hlc_ms,
        hlc_lc = excluded.hlc_lc, node = excluded.node, live = excluded.live, cols = excluded.cols;
END
$fn$;

-- A row the applier buried keeps the version of its last write, as a tombstone: a decision of
-- this node alone (elsewhere the same version may be live, if the row it lost to changed
-- before the claim arrived there). A delete of this node's own, recorded like a local delete
-- in a session without a replication origin, makes it an event every node applies. A row
-- found live again was revived by a later write since: nothing to announce. The version is
-- locked before it is looked at (a locked read re-checks `NOT live` on the newest version):
-- a plain read let an applier's revival that committed meanwhile be stamped dead while its
-- row stayed, and every other node then deleted a row this one kept.
CREATE OR REPLACE FUNCTION synapse.announce_burials(p_node integer) RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    b record;
    n integer := 0;
BEGIN
    FOR b IN SELECT tbl, pk FROM synapse.burials ORDER BY tbl, pk FOR UPDATE SKIP LOCKED LOOP
        PERFORM 1 FROM synapse.row_version WHERE tbl = b.tbl AND pk = b.pk AND NOT live FOR UPDATE;
        IF FOUND THEN
            PERFORM synapse.record_local_write(b.tbl, b.pk, p_node, false, '{}', '{}', '{}', '{}', '{}', '{}');
            n := n + 1;
        END IF;
        DELETE FROM synapse.burials WHERE tbl = b.tbl AND pk = b.pk;
    END LOOP;
    RETURN n;
END
$fn$;
"#;

/// Announces the burials this node's appliers made (see `synapse.announce_burials`) through
/// `client`, which must not be bound to a replication origin: the announcement has to be
/// captured like a local write. Returns how many it announced.
pub async fn announce_burials(client: &Client, node: NodeId) -> Result<u64, ApplyError> {
    let n: i32 = client
        .query_one("SELECT synapse.announce_burials($1)", &[&i32::from(node.0)])
        .await
        .map_err(ApplyError::target("announcing unique-key burials"))?
        .get(0);
    Ok(n.max(0) as u64)
}

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
    fn cast(&self, column: &str) -> String {
        self.types.get(column).cloned().unwrap_or_else(|| "text".into())
    }

    fn is_jsonb(&self, column: &str) -> bool {
        self.types.get(column).is_some_and(|t| t == "jsonb")
    }
}

/// A configured function name (`schema.name`, or `name` found on the search path), each part
/// quoted as written.
fn quoted_name(name: &str) -> String {
    name.split('.').map(quote::ident).collect::<Vec<_>>().join(".")
}

/// SQL of the members of set column `c` in record `rec`: a JSON array of the elements' texts.
fn set_members(t: &MeshTable, rec: &str, c: &str) -> String {
    let col = format!("{rec}.{}", quote::ident(c));
    if t.is_jsonb(c) {
        format!(
            "coalesce((SELECT jsonb_agg(DISTINCT x::text) FROM jsonb_array_elements(CASE WHEN jsonb_typeof({col}) = 'array' THEN {col} END) AS x), '[]')"
        )
    } else {
        format!("coalesce((SELECT jsonb_agg(DISTINCT x::text) FROM unnest({col}) AS x WHERE x IS NOT NULL), '[]')")
    }
}

/// The trigger functions of one table on node `node`: every local insert, update and delete
/// records its version in `synapse.row_version`; before that, set columns are brought to their
/// canonical form and max/min columns kept monotonic.
fn trigger_sql(node: NodeId, t: &MeshTable) -> String {
    let tbl = quote::literal(&t.name());
    let fname = format!("synapse.{}", quote::ident(&format!("local_write_{}_{}", t.schema, t.table)));
    let row = |rec: &str| t.key.iter().map(|k| format!("{rec}.{}", quote::ident(k))).collect::<Vec<_>>().join(", ");
    let key_text =
        |rec: &str| t.key.iter().map(|k| format!("{rec}.{}::text", quote::ident(k))).collect::<Vec<_>>().join(", ");
    let of = |pick: &dyn Fn(Strategy) -> bool| -> Vec<&String> {
        t.columns.iter().filter(|(_, s)| pick(*s)).map(|(c, _)| c).collect()
    };
    let plain = of(&|s| matches!(s, Strategy::Lww | Strategy::Max | Strategy::Min));
    let counters = of(&|s| s == Strategy::Counter);
    let sets = of(&|s| s == Strategy::Set);
    let mvs = of(&|s| s == Strategy::MultiValue);
    let all_plain =
        format!("ARRAY[{}]::text[]", plain.iter().map(|c| quote::literal(c)).collect::<Vec<_>>().join(", "));
    let object = |pairs: Vec<(String, String)>| {
        format!(
            "jsonb_build_object({})",
            pairs.into_iter().map(|(k, v)| format!("{}, {v}", quote::literal(&k))).collect::<Vec<_>>().join(", ")
        )
    };
    let values = |rec: &str, cols: &[&String]| {
        object(cols.iter().map(|c| ((*c).clone(), format!("{rec}.{}::text", quote::ident(c)))).collect())
    };
    let set_new = |c: &str| format!("jsonb_build_object('new', {})", set_members(t, "NEW", c));
    // Inserts (and key changes) write every column; updates only the changed ones.
    let all_sets = object(sets.iter().map(|c| ((*c).clone(), set_new(c))).collect());
    let all_mvs = values("NEW", &mvs);
    let mut changed = String::new();
    for c in &plain {
        changed.push_str(&format!(
            "        IF NEW.{q} IS DISTINCT FROM OLD.{q} THEN changed := changed || {l}::text; END IF;\n",
            q = quote::ident(c),
            l = quote::literal(c)
        ));
    }
    for c in &sets {
        changed.push_str(&format!(
            "        IF NEW.{q} IS DISTINCT FROM OLD.{q} THEN sets := sets || jsonb_build_object({l}, jsonb_build_object('new', {new}, 'old', {old})); END IF;\n",
            q = quote::ident(c),
            l = quote::literal(c),
            new = set_members(t, "NEW", c),
            old = set_members(t, "OLD", c),
        ));
    }
    for c in &mvs {
        changed.push_str(&format!(
            "        IF NEW.{q} IS DISTINCT FROM OLD.{q} THEN mv := mv || jsonb_build_object({l}, NEW.{q}::text); END IF;\n",
            q = quote::ident(c),
            l = quote::literal(c)
        ));
    }
    // max/min columns are registers that only move one way: a local write past the current
    // value in the wrong direction keeps the current one. Without this, a causally later lower
    // value and a concurrent higher one would merge differently depending on arrival order.
    let mut monotonic = String::new();
    for (c, s) in &t.columns {
        let f = match s {
            Strategy::Max => "greatest",
            Strategy::Min => "least",
            _ => continue,
        };
        monotonic.push_str(&format!("        NEW.{q} := {f}(NEW.{q}, OLD.{q});\n", q = quote::ident(c)));
    }
    if !monotonic.is_empty() {
        monotonic = format!("    IF TG_OP = 'UPDATE' THEN\n{monotonic}    END IF;\n");
    }
    // A set column holds its members once each, ordered by their text (byte order), NULL as
    // empty: the form the applier writes, so every node holds the same value.
    let mut canonical = String::new();
    for c in &sets {
        let q = quote::ident(c);
        if t.is_jsonb(c) {
            canonical.push_str(&format!(
                "    IF jsonb_typeof(NEW.{q}) <> 'array' THEN
        RAISE EXCEPTION 'column % of % is a set: it holds a JSON array, not %', {l}, {tbl}, jsonb_typeof(NEW.{q})
            USING ERRCODE = '22023';
    END IF;
    NEW.{q} := (SELECT coalesce(jsonb_agg(x ORDER BY x::text COLLATE \"C\"), '[]') FROM
        (SELECT DISTINCT ON (x::text COLLATE \"C\") x FROM jsonb_array_elements(coalesce(NEW.{q}, '[]')) AS x
         ORDER BY x::text COLLATE \"C\") AS d);\n",
                l = quote::literal(c)
            ));
        } else {
            canonical.push_str(&format!(
                "    NEW.{q} := ARRAY(SELECT DISTINCT ON (x::text COLLATE \"C\") x FROM unnest(NEW.{q}) AS x
        WHERE x IS NOT NULL ORDER BY x::text COLLATE \"C\");\n"
            ));
        }
    }
    let table = format!("{}.{}", quote::ident(&t.schema), quote::ident(&t.table));
    let old_before = format!("synapse.{}", quote::ident(&format!("monotonic_{}_{}", t.schema, t.table)));
    let mut before =
        format!("DROP TRIGGER IF EXISTS synapse_monotonic ON {table}; DROP FUNCTION IF EXISTS {old_before}();\n");
    if monotonic.is_empty() && canonical.is_empty() {
        before.push_str(&format!("DROP TRIGGER IF EXISTS synapse_before_write ON {table};"));
    } else {
        let bname = format!("synapse.{}", quote::ident(&format!("before_write_{}_{}", t.schema, t.table)));
        before.push_str(&format!(
            "CREATE OR REPLACE FUNCTION {bname}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
{monotonic}{canonical}    RETURN NEW;
END
$fn$;
CREATE OR REPLACE TRIGGER synapse_before_write BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {bname}();"
        ));
    }
    let (old_key, new_key) = (row("OLD"), row("NEW"));
    let (old_text, new_text) = (key_text("OLD"), key_text("NEW"));
    let (old_values, new_counters, old_counters) =
        (values("OLD", &plain), values("NEW", &counters), values("OLD", &counters));
    format!(
        "CREATE OR REPLACE FUNCTION {fname}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    changed text[] := '{{}}';
    sets jsonb := '{{}}';
    mv jsonb := '{{}}';
    base jsonb;  -- NULL for a new row
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND ({old_key}) IS DISTINCT FROM ({new_key})) THEN
        PERFORM synapse.record_local_write({tbl}, jsonb_build_array({old_text}), {node}, false,
            '{{}}', '{{}}', '{{}}', {old_values}, '{{}}', '{{}}');
        IF TG_OP = 'DELETE' THEN RETURN NULL; END IF;
        changed := {all_plain}; sets := {all_sets}; mv := {all_mvs};
    ELSIF TG_OP = 'INSERT' THEN
        changed := {all_plain}; sets := {all_sets}; mv := {all_mvs};
    ELSE
        base := {old_counters};
{changed}    END IF;
    PERFORM synapse.record_local_write({tbl}, jsonb_build_array({new_text}), {node}, true,
        changed, {new_counters}, base, '{{}}', sets, mv);
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE TRIGGER synapse_local_write AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {fname}();
{before}",
        node = node.0,
    )
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

/// Prepares node `node` for the mesh: the sidecar and conflict tables, and a trigger on every
/// table that records local writes. Idempotent; re-run on every start (picks up new columns).
pub async fn install(
    client: &Client,
    node: NodeId,
    tables: &[String],
    policies: &HashMap<String, TablePolicy>,
) -> Result<Vec<MeshTable>, ApplyError> {
    let none = TablePolicy::default();
    let mut described = Vec::new();
    for name in tables {
        described.push(describe(client, name, policies.get(name).unwrap_or(&none)).await?);
    }
    let mut sql =
        format!("SET client_min_messages = warning; BEGIN; SELECT pg_advisory_xact_lock(7305918); {MESH_DDL}");
    for t in &described {
        sql.push_str(&trigger_sql(node, t));
        sql.push('\n');
    }
    sql.push_str("COMMIT; RESET client_min_messages;");
    client.batch_execute(&sql).await.map_err(ApplyError::target("installing the mesh triggers"))?;
    Ok(described)
}

/// One row's causality metadata as stored in `synapse.row_version`.
#[derive(Clone, Debug, Default)]
struct Side {
    vv: VersionVector,
    hlc: Hlc,
    node: NodeId,
    live: bool,
    cols: Map<String, Json>,
}

impl Side {
    fn parse(vv: &str, ms: i64, lc: i32, node: i32, live: bool, cols: &str) -> Result<Side, String> {
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
        })
    }

    fn at(&self, column: &str) -> (Hlc, NodeId) {
        let a = self.cols.get(column).and_then(|c| c.get("at")).and_then(Json::as_array);
        let n = |i: usize| a.and_then(|a| a.get(i)).and_then(Json::as_u64).unwrap_or(0);
        (Hlc { wall_ms: n(0), logical: n(1) as u32 }, NodeId(n(2) as u16))
    }

    fn counter(&self, column: &str) -> Option<Counter> {
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
    fn set(&self, column: &str) -> Option<OrSet> {
        let st = self.cols.get(column)?.get("set")?;
        let entries = st.get("e")?.as_object()?;
        Some(OrSet::from_parts(
            dots(st.get("clock")?),
            entries.iter().map(|(member, d)| (Json::String(member.clone()), dots(d))),
        ))
    }

    /// A multi-value column's siblings (`None`: no local write of it since the mesh started).
    fn multi_value(&self, column: &str) -> Option<MultiValue> {
        let siblings = self.cols.get(column)?.get("mv")?.as_array()?;
        Some(MultiValue::from_siblings(siblings.iter().filter_map(|sib| {
            let at = sib.get(1)?;
            let n = |i: usize| at.get(i).and_then(Json::as_u64).unwrap_or(0);
            let hlc = Hlc { wall_ms: n(0), logical: n(1) as u32 };
            Some((dots(sib.get(0)?), hlc, NodeId(n(2) as u16), sib.get(2).cloned().unwrap_or(Json::Null)))
        })))
    }

    /// A tombstone's last value of `column`.
    fn tombstone_value(&self, column: &str) -> Option<Option<String>> {
        let v = self.cols.get(column)?.get("v")?;
        Some(v.as_str().map(str::to_owned))
    }
}

/// A `{"<node>": count}` object as the resolver's plain version vector.
fn dots(v: &Json) -> Dots {
    v.as_object()
        .map(|o| o.iter().filter_map(|(n, c)| Some((NodeId(n.parse().ok()?), c.as_u64()?))).collect())
        .unwrap_or_default()
}

fn dots_json(d: &Dots) -> Json {
    Json::Object(d.iter().map(|(n, c)| (n.0.to_string(), json!(c))).collect())
}

/// Values of a row by column name: `Some(text)`, `None` for SQL NULL; absent = not known (an
/// unchanged TOAST value the change did not carry).
pub type Values = BTreeMap<String, Option<String>>;

/// A row's state as the resolver sees it: the stored metadata plus the row's values.
fn version(t: &MeshTable, side: &Side, row: Option<&Values>) -> RowVersion {
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
fn side_of(v: &RowVersion) -> Side {
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
    Side { vv: v.stamp.vv.clone(), hlc: v.stamp.hlc, node: v.stamp.node, live: v.live, cols }
}

/// What `column` holds for `cell`, as text its type parses.
fn visible_text(info: &MeshTable, column: &str, cell: &Cell) -> Option<String> {
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

fn describe_version(v: &RowVersion) -> Json {
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

/// What a mesh table's change leaves for its key at the end of the buffered transactions.
enum Final {
    Upsert(Values),
    Delete,
}

/// Changes of whole source transactions from one peer, buffered until the target transaction
/// commits (a row's change and its `row_version` change arrive apart: AFTER ROW triggers run at
/// the end of the statement, after all its rows).
#[derive(Default)]
pub struct MeshBuffer {
    tables: HashMap<String, MeshTable>,
    rows: BTreeMap<(String, Vec<String>), Final>,
    versions: HashMap<(String, Vec<String>), Side>,
}

fn text(v: Value<'_>) -> Option<Option<String>> {
    match v {
        Value::Null => Some(None),
        Value::UnchangedToast => None,
        Value::Text(s) => Some(Some(s.to_owned())),
    }
}

fn key_of(rel: &Relation, tuple: &Tuple) -> Option<Vec<String>> {
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

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn clear(&mut self) {
        self.rows.clear();
        self.versions.clear();
    }

    /// Buffers one change of a mesh table or of the peer's `row_version`.
    pub fn push(&mut self, rel: &Arc<Relation>, mesh: Option<&MeshTable>, change: RowChange) -> Result<(), ApplyError> {
        let bad = |message: String| ApplyError::Schema { table: rel.name(), message };
        if is_row_version(rel) {
            let Some(after) = &change.after else { return Ok(()) }; // purges are local
            let col = |name: &str| -> Option<Value<'_>> {
                rel.columns.iter().position(|c| c.name == name).and_then(|i| after.get(i))
            };
            let txt = |name: &str| col(name).and_then(|v| v.as_text());
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
        if let Some(m) = mesh {
            self.tables.entry(name.clone()).or_insert_with(|| m.clone());
        }
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
        let (tbls, pks): (Vec<String>, Vec<String>) = rows
            .keys()
            .filter(|k| versions.contains_key(*k))
            .map(|(t, k)| (t.clone(), serde_json::to_string(k).unwrap_or_default()))
            .unzip();
        let mut local_sides: HashMap<(String, Vec<String>), Side> = HashMap::new();
        if !tbls.is_empty() {
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
            client.execute(&placeholder, &[&tbls, &pks]).await.map_err(ApplyError::target("reserving row versions"))?;
            local_sides = lock_versions(client, statements, &tbls, &pks).await?;
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
            let local_side = local_sides.get(&(name.clone(), key.clone())).filter(|s| s.vv != VersionVector::new());
            let local_row = local_rows.get(&(name.clone(), key.clone()));
            let local = local_side.map(|s| version(info, s, local_row));
            let (decision, mut result) = resolve(policy, local.as_ref(), &remote);
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
/// what a repair compares. Keys with neither are left out.
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
             WHERE tbl = $1 AND pk IN (SELECT p::jsonb FROM unnest($2::text[]) AS u(p))",
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

/// Lets the table's merge function decide the `lww` columns of two concurrent live versions.
/// The versions go in (HLC, node) order, older first, so every node makes the same call; the
/// function's JSON object overrides the resolver's result column by column (keys, CRDT columns
/// and columns it leaves out keep the resolver's values).
async fn call_merge_function(
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

fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Insert => "insert",
        Decision::Skip => "skip",
        Decision::Apply => "apply",
        Decision::Merge => "merge",
    }
}

/// Locks (tbl, pk) rows of `synapse.row_version`, in key order, and reads them.
async fn lock_versions(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    tbls: &[String],
    pks: &[String],
) -> Result<HashMap<(String, Vec<String>), Side>, ApplyError> {
    let lock = prepared(
        client,
        statements,
        "SELECT tbl, pk::text, vv::text, hlc_ms, hlc_lc, node, live, cols::text FROM synapse.row_version
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
        let side = Side::parse(&r.get::<_, String>(2), r.get(3), r.get(4), r.get(5), r.get(6), &r.get::<_, String>(7))
            .map_err(|message| ApplyError::Schema { table: tbl.clone(), message })?;
        sides.insert((tbl, key), side);
    }
    Ok(sides)
}

/// The row that loses a unique-key collision, and what it lost to.
struct Lost<'a> {
    key: &'a [String],
    version: &'a RowVersion,
    kept_key: &'a [String],
    index: &'a str,
}

/// A live row the buffer is about to write into a table with unique indexes besides its key.
struct Claim {
    table: String,
    key: Vec<String>,
    version: RowVersion,
}

/// The text of `column` in a row given by its key and values (`None`: NULL or not known).
fn column_text(info: &MeshTable, key: &[String], values: &Values, column: &str) -> Option<String> {
    match info.key.iter().position(|k| k == column) {
        Some(i) => key.get(i).cloned(),
        None => values.get(column).cloned().flatten(),
    }
}

fn values_of(info: &MeshTable, v: &RowVersion) -> Values {
    v.cells.iter().map(|(c, cell)| (c.clone(), visible_text(info, c, cell))).collect()
}

/// Concurrent inserts on two nodes can claim one unique value under different primary keys
/// (the same e-mail registered in two regions). Writing both would fail on a unique violation
/// and stop the applier for good, so each claim is checked against the local rows holding its
/// values: `unique_key_winner` keeps the row whose latest write is later, on every node alike;
/// the other becomes a tombstone (deleted, its values kept in its version) and the outcome goes
/// to `synapse.conflicts` as kind `unique_key`. Claims of one batch are checked against each
/// other the same way; local rows the batch deletes or claims are not colliders (their final
/// state is the batch's). Returns the number of conflicts.
async fn settle_unique_claims(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    tables: &HashMap<String, MeshTable>,
    claims: Vec<Claim>,
    rewritten: &HashSet<(String, Vec<String>)>,
    local_rows: &HashMap<(String, Vec<String>), Values>,
    writes: &mut Writes,
) -> Result<u64, ApplyError> {
    let mut conflicts = 0;
    let mut by_table: BTreeMap<String, Vec<Claim>> = BTreeMap::new();
    for c in claims {
        by_table.entry(c.table.clone()).or_default().push(c);
    }
    for (name, claims) in by_table {
        let Some(info) = tables.get(&name) else { continue };
        let claimed: Vec<Values> = claims.iter().map(|c| values_of(info, &c.version)).collect();
        // (claim, index, local key) → the local row's values.
        let mut colliders: Vec<(usize, String, Vec<String>, Values)> = Vec::new();
        // Claims beaten by another claim of this batch: (index, winning claim).
        let mut beaten_by_claim: HashMap<usize, (String, usize)> = HashMap::new();
        for (index, cols) in &info.unique {
            let mut owners: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
            for (i, c) in claims.iter().enumerate() {
                // A NULL never collides; an unknown (unchanged TOAST) value did not change.
                let probe: Option<Vec<String>> =
                    cols.iter().map(|col| column_text(info, &c.key, &claimed[i], col)).collect();
                if let Some(p) = probe {
                    owners.entry(p).or_default().push(i);
                }
            }
            if owners.is_empty() {
                continue;
            }
            // Claims against each other: per unique value, the winning claim beats the rest.
            for group in owners.values().filter(|g| g.len() > 1) {
                let Some(&best) = group.iter().reduce(|a, b| {
                    let (ca, cb) = (&claims[*a], &claims[*b]);
                    if unique_key_winner((&ca.version.stamp, &ca.key), (&cb.version.stamp, &cb.key)) {
                        a
                    } else {
                        b
                    }
                }) else {
                    continue;
                };
                for &i in group.iter().filter(|i| **i != best) {
                    beaten_by_claim.entry(i).or_insert((index.clone(), best));
                }
            }
            let probes: Vec<&Vec<String>> = owners.keys().collect();
            for (lkey, lvalues) in read_rows_by(client, statements, info, cols, &probes, true).await? {
                let Some(held) =
                    cols.iter().map(|col| column_text(info, &lkey, &lvalues, col)).collect::<Option<Vec<_>>>()
                else {
                    continue;
                };
                for &i in owners.get(&held).into_iter().flatten() {
                    if lkey != claims[i].key && !rewritten.contains(&(name.clone(), lkey.clone())) {
                        colliders.push((i, index.clone(), lkey.clone(), lvalues.clone()));
                    }
                }
            }
        }
        let (tbls, pks): (Vec<String>, Vec<String>) =
            colliders.iter().map(|(_, _, k, _)| (name.clone(), serde_json::to_string(k).unwrap_or_default())).unzip();
        let sides =
            if tbls.is_empty() { HashMap::new() } else { lock_versions(client, statements, &tbls, &pks).await? };
        // A row older than the mesh has no version: the shared baseline, older than any write.
        let baseline = Side { vv: [(NodeId(0), 1)].into_iter().collect(), live: true, ..Side::default() };
        let local_version = |lkey: &Vec<String>, lvalues: &Values| {
            let side = sides.get(&(name.clone(), lkey.clone())).filter(|s| s.live).unwrap_or(&baseline);
            version(info, side, Some(lvalues))
        };
        let mut buried: HashSet<Vec<String>> = HashSet::new();
        for (i, claim) in claims.iter().enumerate() {
            if let Some((index, w)) = beaten_by_claim.get(&i) {
                let winner = &claims[*w];
                let lost = Lost { key: &claim.key, version: &claim.version, kept_key: &winner.key, index };
                writes.bury(info, lost, "remote_wins", [&claim.version, &winner.version]);
                conflicts += 1;
                continue;
            }
            let mine: Vec<_> = colliders
                .iter()
                .filter(|(c, ..)| *c == i)
                .map(|(_, index, k, v)| (index, k, local_version(k, v)))
                .collect();
            let beaten_by = mine
                .iter()
                .find(|(_, lkey, local)| !unique_key_winner((&claim.version.stamp, &claim.key), (&local.stamp, lkey)));
            if let Some((index, lkey, local)) = beaten_by {
                let lost = Lost { key: &claim.key, version: &claim.version, kept_key: lkey, index };
                writes.bury(info, lost, "local_wins", [local, &claim.version]);
                conflicts += 1;
                continue;
            }
            for (index, lkey, local) in &mine {
                if buried.insert((*lkey).clone()) {
                    let lost = Lost { key: lkey, version: local, kept_key: &claim.key, index };
                    writes.bury(info, lost, "remote_wins", [local, &claim.version]);
                    conflicts += 1;
                }
            }
            match local_rows.get(&(name.clone(), claim.key.clone())) {
                // The row moves to other unique values: one multi-row upsert checks each row as
                // it goes, so a value it frees for another claim of the batch (two rows swapping
                // e-mails, or one taking what another left) would still be held. Deleted first
                // (deletes run before upserts) and written whole, it holds nothing meanwhile.
                Some(local) if moves_unique_values(info, &claim.key, local, &claimed[i]) => {
                    let mut whole = local.clone();
                    whole.extend(claimed[i].clone());
                    writes.deletes.entry(name.clone()).or_default().push(claim.key.clone());
                    writes.row(info, &claim.key, Some(&whole));
                    writes.side(&name, &claim.key, side_of(&claim.version));
                }
                _ => writes.version(info, &claim.key, &claim.version),
            }
        }
    }
    Ok(conflicts)
}

/// Whether `claimed` changes a unique column of the local row (unknown values do not change).
fn moves_unique_values(info: &MeshTable, key: &[String], local: &Values, claimed: &Values) -> bool {
    info.unique
        .iter()
        .flat_map(|(_, cols)| cols)
        .any(|c| claimed.contains_key(c) && column_text(info, key, local, c) != column_text(info, key, claimed, c))
}

/// Whether two versions descend from a common write (else two independent inserts).
fn shares_history(a: &VersionVector, b: &VersionVector) -> bool {
    a.iter().any(|(n, c)| c > 0 && b.get(n) > 0)
}

/// `t.k1 = u.k1::type AND …` over the key columns.
fn key_join(info: &MeshTable) -> (String, String) {
    column_join(info, &info.key)
}

/// `t.c1 = u.k1::type AND …` over `columns`, with the unnest aliases.
fn column_join(info: &MeshTable, columns: &[String]) -> (String, String) {
    let mut cols = Vec::new();
    let mut cond = Vec::new();
    for (i, k) in columns.iter().enumerate() {
        let cast = info.cast(k);
        cols.push(format!("k{i}"));
        cond.push(format!("t.{} = u.k{i}::{cast}", quote::ident(k)));
    }
    (cols.join(", "), cond.join(" AND "))
}

fn unnest_params(n: usize) -> String {
    (1..=n).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", ")
}

async fn read_rows(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    info: &MeshTable,
    keys: &[&Vec<String>],
) -> Result<Vec<(Vec<String>, Values)>, ApplyError> {
    read_rows_by(client, statements, info, &info.key, keys, true).await
}

/// Reads the rows whose `by` columns equal one of `probes` (`lock`: locked, in key order).
async fn read_rows_by(
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
type Row = Vec<Option<String>>;

/// `synapse.row_version` rows as column arrays, one statement's parameters.
#[derive(Default)]
struct SideColumns<'a> {
    tbl: Vec<&'a str>,
    pk: Vec<&'a str>,
    vv: Vec<String>,
    ms: Vec<i64>,
    lc: Vec<i32>,
    node: Vec<i32>,
    live: Vec<bool>,
    cols: Vec<String>,
}

/// The outcome of one buffer, written in a few statements per table.
#[derive(Default)]
struct Writes {
    /// Per table and set of columns: keys followed by the values.
    upserts: BTreeMap<(String, Vec<String>), Vec<Row>>,
    deletes: BTreeMap<String, Vec<Vec<String>>>,
    sides: Vec<(String, String, Side)>,
    conflicts: Vec<[String; 7]>,
    /// (table, key as JSON) of rows buried here, to announce after the commit.
    burials: Vec<(String, String)>,
}

impl Writes {
    fn row(&mut self, info: &MeshTable, key: &[String], values: Option<&Values>) {
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

    fn side(&mut self, table: &str, key: &[String], side: Side) {
        self.sides.push((table.to_owned(), serde_json::to_string(key).unwrap_or_default(), side));
    }

    /// The row as `v` leaves it (deleted for a tombstone) and its metadata.
    fn version(&mut self, info: &MeshTable, key: &[String], v: &RowVersion) {
        self.row(info, key, v.live.then(|| values_of(info, v)).as_ref());
        self.side(&info.name(), key, side_of(v));
    }

    /// The loser of a unique-key collision becomes a tombstone (its values kept in its version),
    /// logged with the key that stayed and the index they collided on.
    fn bury(&mut self, info: &MeshTable, lost: Lost<'_>, resolution: &'static str, sides: [&RowVersion; 2]) {
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
    fn conflict(
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

    async fn execute(
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
                     node = excluded.node, live = excluded.live, cols = excluded.cols".to_owned(), "synapse.row_version")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> MeshTable {
        MeshTable {
            schema: "public".into(),
            table: "accounts".into(),
            key: vec!["id".into()],
            columns: vec![("owner".into(), Strategy::Lww), ("hits".into(), Strategy::Counter)],
            unique: Vec::new(),
            types: BTreeMap::new(),
        }
    }

    #[test]
    fn stored_metadata_round_trips_through_the_resolver_form() {
        let t = table();
        let side = Side::parse(
            r#"{"1": 3, "2": 1}"#,
            1_700_000_000_000,
            2,
            1,
            true,
            r#"{"owner": {"at": [1700000000000, 2, 1]}, "hits": {"pn": {"0": [10, 0], "1": [5, 2]}}}"#,
        )
        .unwrap();
        let row: Values =
            [("owner".to_string(), Some("ann".to_string())), ("hits".to_string(), Some("13".into()))].into();
        let v = version(&t, &side, Some(&row));
        assert!(v.live);
        assert_eq!(v.cells["hits"].visible(), json!(13));
        assert_eq!(v.cells["owner"].visible(), json!("ann"));
        let back = side_of(&v);
        assert_eq!(back.vv, side.vv);
        assert_eq!(back.cols["hits"], side.cols["hits"]);
        assert_eq!(back.cols["owner"]["at"], side.cols["owner"]["at"]);
    }

    #[test]
    fn set_and_multi_value_states_round_trip_through_the_resolver_form() {
        let mut t = table();
        t.columns = vec![
            ("tags".into(), Strategy::Set),
            ("labels".into(), Strategy::Set),
            ("title".into(), Strategy::MultiValue),
        ];
        t.types = [("tags".to_string(), "text[]".to_string()), ("labels".to_string(), "jsonb".to_string())].into();
        // As the trigger writes them: "b\"q" was added by node 2, "a" is a baseline member.
        let cols = r#"{"tags": {"set": {"clock": {"0": 1, "2": 3}, "e": {"a": {"0": 1}, "b\"q": {"2": 3}}}},
                       "labels": {"set": {"clock": {"1": 1}, "e": {"{\"k\": 1}": {"1": 1}, "2": {"1": 1}}}},
                       "title": {"mv": [[{"1": 2, "2": 1}, [50, 0, 2], "t2"], [{"1": 3}, [40, 1, 1], null]]}}"#;
        let side = Side::parse(r#"{"1": 3, "2": 3}"#, 50, 0, 2, true, cols).unwrap();
        let v = version(&t, &side, Some(&Values::new()));
        assert_eq!(visible_text(&t, "tags", &v.cells["tags"]).unwrap(), r#"{"a","b\"q"}"#);
        assert_eq!(visible_text(&t, "labels", &v.cells["labels"]).unwrap(), r#"[2, {"k": 1}]"#);
        assert_eq!(visible_text(&t, "title", &v.cells["title"]).unwrap(), "t2", "the later sibling shows");
        let back = side_of(&v);
        for c in ["tags", "labels", "title"] {
            assert_eq!(back.cols[c], side.cols[c], "{c}");
        }
        assert_eq!(describe_version(&v)["siblings"]["title"], json!(["t2", null]));
        // No state: the column is not the resolver's to write (it holds the common baseline).
        let bare = Side::parse(r#"{"1": 1}"#, 5, 0, 1, true, "{}").unwrap();
        assert!(version(&t, &bare, Some(&Values::new())).cells.is_empty());
    }

    #[test]
    fn a_tombstone_keeps_its_values() {
        let t = table();
        let side = Side::parse(
            r#"{"1": 2}"#,
            5,
            0,
            1,
            false,
            r#"{"owner": {"at": [4, 0, 1], "v": "bob"}, "hits": {"pn": {"1": [3, 0]}}}"#,
        )
        .unwrap();
        let v = version(&t, &side, None);
        assert!(!v.live);
        assert_eq!(v.cells["owner"].visible(), json!("bob"));
        assert_eq!(side_of(&v).cols["owner"]["v"], json!("bob"));
    }

    #[test]
    fn the_trigger_names_every_column() {
        let sql = trigger_sql(NodeId(7), &table());
        assert!(sql.contains("'public.accounts'") && sql.contains(", 7, true"), "{sql}");
        assert!(sql.contains("NEW.\"owner\" IS DISTINCT FROM OLD.\"owner\""), "{sql}");
        assert!(!sql.contains("NEW.\"hits\" IS DISTINCT"), "counters are not stamped: {sql}");
        assert!(sql.contains("DROP TRIGGER IF EXISTS synapse_before_write"), "nothing to normalise: {sql}");
        let mut t = table();
        t.columns.push(("tags".into(), Strategy::Set));
        t.types.insert("tags".into(), "jsonb".into());
        let sql = trigger_sql(NodeId(7), &t);
        assert!(sql.contains("sets := sets || jsonb_build_object('tags'"), "{sql}");
        assert!(sql.contains("is a set: it holds a JSON array"), "{sql}");
    }
}
