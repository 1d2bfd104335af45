//! Installing the mesh on a node: SynapseDB's functions (`MESH_DDL`; the tables come from the
//! node schema's migrations), and each mesh table's trigger that versions local writes.

use super::*;

/// Functions every mesh node needs, replaced on every install (their tables are the node
/// schema's: `synapse_postgres::node_schema`).
pub(super) const MESH_DDL: &str = r#"
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
        hlc_lc = excluded.hlc_lc, node = excluded.node, live = excluded.live, cols = excluded.cols,
        purge_round = NULL;
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

/// A configured function name (`schema.name`, or `name` found on the search path), each part
/// quoted as written.
pub(super) fn quoted_name(name: &str) -> String {
    name.split('.').map(quote::ident).collect::<Vec<_>>().join(".")
}

/// SQL of the members of set column `c` in record `rec`: a JSON array of the elements' texts.
pub(super) fn set_members(t: &MeshTable, rec: &str, c: &str) -> String {
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
pub(super) fn trigger_sql(node: NodeId, t: &MeshTable) -> String {
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
    synapse_postgres::node_schema::migrate(client).await?;
    let mut sql =
        // Each node's own triggers: kept out of the source's DDL capture.
        format!("SET client_min_messages = warning; BEGIN; SET LOCAL synapse.own_ddl = on; SELECT pg_advisory_xact_lock(7305918); {MESH_DDL}");
    for t in &described {
        sql.push_str(&trigger_sql(node, t));
        sql.push('\n');
    }
    sql.push_str("COMMIT; RESET client_min_messages;");
    client.batch_execute(&sql).await.map_err(ApplyError::target("installing the mesh triggers"))?;
    Ok(described)
}
