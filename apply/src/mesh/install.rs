//! Installing the mesh on a node: SynapseDB's functions (`MESH_DDL`; the tables come from the
//! node schema's migrations), and each mesh table's trigger that versions local writes.

use super::*;

/// Functions every mesh node needs, replaced on every install (their tables are the node
/// schema's: `synapse_postgres::node_schema`).
pub(super) const MESH_DDL: &str = concat!(
    r#"
-- One local write of a row: the node's entry of the version vector raised (to the node's next
-- counter), a per-row hybrid logical clock (past the wall clock and every version this row has
-- held, so a write made after seeing a peer's version orders after it), per-column stamps of the
-- changed columns,
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
    -- The version is read locked, and when there is none, reserved and read again: a version
    -- an applier inserted and has not committed is invisible to the locked read, and the
    -- write below would then overwrite it with one built from nothing (the mesh test lost a
    -- peer's delete that way). The reservation waits for such an insert to commit, and the
    -- next read sees it. A tombstone a purge deletes while the read waits for its lock is
    -- gone too: reserve (the purge agreed it everywhere, so the write builds on no version).
    -- A key written before takes the locked read alone. Under REPEATABLE READ, a version
    -- committed after the snapshot fails the lock or the reservation with a serialization
    -- error, as a write of the same row would. docs/decisions/0028-row-version-locking.md
    LOOP
        SELECT * INTO r FROM synapse.row_version WHERE tbl = p_tbl AND pk = p_pk FOR UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO synapse.row_version (tbl, pk, vv, hlc_ms, hlc_lc, node, live, cols)
        VALUES (p_tbl, p_pk, '{}', 0, 0, 0, false, '{}') ON CONFLICT (tbl, pk) DO NOTHING;
    END LOOP;
    -- No version yet (only the reservation): an update or delete of a row older than the mesh
    -- has the data every node started from as a common ancestor (a write of node 0), so two
    -- first updates are concurrent updates of it, not two inserts.
    IF r.vv = '{}'::jsonb AND p_base IS NOT NULL THEN r.vv := '{"0": 1}'; END IF;
    IF wall > r.hlc_ms THEN ms := wall; lc := 0; ELSE ms := r.hlc_ms; lc := r.hlc_lc + 1; END IF;
    -- Never a counter this node issued before, for any row (V6 of the node schema says why).
    r.vv := r.vv || jsonb_build_object(me,
        greatest(coalesce((r.vv ->> me)::bigint, 0) + 1, nextval('synapse.version_counter')));
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
    -- The entry exists and this transaction holds its lock (the loop above).
    UPDATE synapse.row_version SET vv = r.vv, hlc_ms = ms, hlc_lc = lc, node = p_node, live = p_live,
        cols = r.cols, purge_round = NULL
    WHERE tbl = p_tbl AND pk = p_pk;
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
-- SQL text helpers of the trigger generator below: a JSON object of record `rec`'s `cols`
-- as text, and the members of set column `c` (a JSON array of its elements' texts).
CREATE OR REPLACE FUNCTION synapse.mesh_sql_values(rec text, cols text[]) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT 'jsonb_build_object(' || coalesce(string_agg(format('%L, %s.%I::text', c, rec, c), ', ' ORDER BY o), '') || ')'
    FROM unnest(cols) WITH ORDINALITY AS u(c, o)
$fn$;
CREATE OR REPLACE FUNCTION synapse.mesh_sql_set_members(rec text, c text, is_jsonb boolean) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN is_jsonb THEN
        format('coalesce((SELECT jsonb_agg(DISTINCT x::text) FROM jsonb_array_elements(CASE WHEN jsonb_typeof(%1$s.%2$I) = ''array'' THEN %1$s.%2$I END) AS x), ''[]'')', rec, c)
    ELSE
        format('coalesce((SELECT jsonb_agg(DISTINCT x::text) FROM unnest(%s.%I) AS x WHERE x IS NOT NULL), ''[]'')', rec, c)
    END
$fn$;

-- The triggers of mesh table `p_tbl` on this node, made from its shape in the catalog now and
-- its column strategies in synapse.mesh_tables: every local insert, update and delete records
-- its version in synapse.row_version; before that, set columns are brought to their canonical
-- form and max/min columns kept monotonic. One generator for every caller — the install, this
-- node's schema changes (the event trigger below, in the change's own transaction, so no write
-- after it meets a trigger of the old shape) and the applier's replicated ones. A shape the
-- table's strategies cannot work with is refused, which refuses the schema change with it.
-- Runs as synapse's role: the application's role runs the event trigger.
CREATE OR REPLACE FUNCTION synapse.mesh_install_triggers(p_tbl text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $gen$
DECLARE
    m synapse.mesh_tables%ROWTYPE;
    own text := current_setting('synapse.own_ddl', true);
    sch text := split_part(p_tbl, '.', 1);
    tab text := substr(p_tbl, length(split_part(p_tbl, '.', 1)) + 2);
    rel oid;
    qtable text; fname text; bname text; tbl_lit text := quote_literal(p_tbl);
    key text[];
    plain text[] := '{}'; counters text[] := '{}'; sets text[] := '{}'; mvs text[] := '{}';
    jsonb_cols text[] := '{}';
    c text; s text; ty text;
    changed text := ''; monotonic text := ''; canonical text := ''; before text;
    all_plain text; all_sets text; all_mvs text;
    old_key text; new_key text; old_text text; new_text text;
BEGIN
    SELECT * INTO m FROM synapse.mesh_tables WHERE mesh_tables.tbl = p_tbl;
    IF NOT FOUND THEN RETURN; END IF;
    SELECT t.oid INTO rel FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
     WHERE n.nspname = sch AND t.relname = tab;
    IF rel IS NULL THEN
        RAISE EXCEPTION 'mesh table % does not exist on this node', p_tbl USING ERRCODE = '42P01',
            HINT = 'create it on every mesh node, or remove it from mesh.tables';
    END IF;
    qtable := format('%I.%I', sch, tab);
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO key
      FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    IF key IS NULL THEN
        RAISE EXCEPTION 'mesh table % needs a primary key (rows are matched across nodes by it)', p_tbl
            USING ERRCODE = '42P16';
    END IF;
    FOR c, ty IN SELECT a.attname::text, format_type(a.atttypid, NULL) FROM pg_attribute a
                  WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.attname = ANY (key)
                    AND a.attgenerated = ''
                  ORDER BY a.attnum LOOP
        s := coalesce(m.strategies ->> c, 'lww');
        IF ty = 'jsonb' THEN jsonb_cols := jsonb_cols || c; END IF;
        IF s = 'counter' AND ty NOT IN ('smallint', 'integer', 'bigint') THEN
            RAISE EXCEPTION 'column % of mesh table % is %: a counter column must be smallint, integer or bigint', c, p_tbl, ty
                USING ERRCODE = '42804';
        ELSIF s IN ('max', 'min') AND ty NOT IN ('smallint', 'integer', 'bigint', 'numeric', 'real', 'double precision') THEN
            RAISE EXCEPTION 'column % of mesh table % is %: max and min columns must be numeric', c, p_tbl, ty
                USING ERRCODE = '42804';
        ELSIF s = 'set' AND NOT (ty LIKE '%[]' OR ty = 'jsonb') THEN
            RAISE EXCEPTION 'column % of mesh table % is %: a set column must be an array or jsonb', c, p_tbl, ty
                USING ERRCODE = '42804';
        END IF;
        CASE s
            WHEN 'counter' THEN counters := counters || c;
            WHEN 'set' THEN sets := sets || c;
            WHEN 'multi_value' THEN mvs := mvs || c;
            ELSE plain := plain || c;
        END CASE;
        IF s = 'max' OR s = 'min' THEN
            monotonic := monotonic || format(E'        NEW.%1$I := %2$s(NEW.%1$I, OLD.%1$I);\n', c,
                CASE s WHEN 'max' THEN 'greatest' ELSE 'least' END);
        END IF;
    END LOOP;
    -- Updates stamp only the changed columns; inserts (and key changes) every one.
    FOREACH c IN ARRAY plain LOOP
        changed := changed || format(E'        IF NEW.%1$I IS DISTINCT FROM OLD.%1$I THEN changed := changed || %2$L::text; END IF;\n', c, c);
    END LOOP;
    FOREACH c IN ARRAY sets LOOP
        changed := changed || format(E'        IF NEW.%1$I IS DISTINCT FROM OLD.%1$I THEN sets := sets || jsonb_build_object(%2$L, jsonb_build_object(''new'', %3$s, ''old'', %4$s)); END IF;\n',
            c, c, synapse.mesh_sql_set_members('NEW', c, c = ANY (jsonb_cols)), synapse.mesh_sql_set_members('OLD', c, c = ANY (jsonb_cols)));
        -- A set column holds its members once each, ordered by their text (byte order), NULL
        -- as empty: the form the applier writes, so every node holds the same value.
        IF c = ANY (jsonb_cols) THEN
            canonical := canonical || format(E'    IF jsonb_typeof(NEW.%1$I) <> ''array'' THEN\n        RAISE EXCEPTION ''column %% of %% is a set: it holds a JSON array, not %%'', %2$L, %3$s, jsonb_typeof(NEW.%1$I)\n            USING ERRCODE = ''22023'';\n    END IF;\n    NEW.%1$I := (SELECT coalesce(jsonb_agg(x ORDER BY x::text COLLATE "C"), ''[]'') FROM\n        (SELECT DISTINCT ON (x::text COLLATE "C") x FROM jsonb_array_elements(coalesce(NEW.%1$I, ''[]'')) AS x\n         ORDER BY x::text COLLATE "C") AS d);\n',
                c, c, tbl_lit);
        ELSE
            canonical := canonical || format(E'    NEW.%1$I := ARRAY(SELECT DISTINCT ON (x::text COLLATE "C") x FROM unnest(NEW.%1$I) AS x\n        WHERE x IS NOT NULL ORDER BY x::text COLLATE "C");\n', c);
        END IF;
    END LOOP;
    FOREACH c IN ARRAY mvs LOOP
        changed := changed || format(E'        IF NEW.%1$I IS DISTINCT FROM OLD.%1$I THEN mv := mv || jsonb_build_object(%2$L, NEW.%1$I::text); END IF;\n', c, c);
    END LOOP;
    -- max/min columns are registers that only move one way: a local write past the current
    -- value in the wrong direction keeps the current one. Without this, a causally later lower
    -- value and a concurrent higher one would merge differently depending on arrival order.
    IF monotonic <> '' THEN
        monotonic := E'    IF TG_OP = ''UPDATE'' THEN\n' || monotonic || E'    END IF;\n';
    END IF;
    all_plain := 'ARRAY[' || coalesce((SELECT string_agg(quote_literal(x), ', ' ORDER BY o) FROM unnest(plain) WITH ORDINALITY AS u(x, o)), '') || ']::text[]';
    all_sets := 'jsonb_build_object(' || coalesce((SELECT string_agg(format('%L, jsonb_build_object(''new'', %s)', x,
        synapse.mesh_sql_set_members('NEW', x, x = ANY (jsonb_cols))), ', ' ORDER BY o) FROM unnest(sets) WITH ORDINALITY AS u(x, o)), '') || ')';
    all_mvs := synapse.mesh_sql_values('NEW', mvs);
    SELECT string_agg(format('OLD.%I', k), ', ' ORDER BY o), string_agg(format('NEW.%I', k), ', ' ORDER BY o),
           string_agg(format('OLD.%I::text', k), ', ' ORDER BY o), string_agg(format('NEW.%I::text', k), ', ' ORDER BY o)
      INTO old_key, new_key, old_text, new_text FROM unnest(key) WITH ORDINALITY AS u(k, o);
    fname := 'synapse.' || quote_ident('local_write_' || sch || '_' || tab);
    bname := 'synapse.' || quote_ident('before_write_' || sch || '_' || tab);
    before := format('DROP TRIGGER IF EXISTS synapse_monotonic ON %s; DROP FUNCTION IF EXISTS synapse.%I();',
        qtable, 'monotonic_' || sch || '_' || tab);
    IF monotonic = '' AND canonical = '' THEN
        before := before || format(' DROP TRIGGER IF EXISTS synapse_before_write ON %s;', qtable);
    ELSE
        before := before || format(E'\nCREATE OR REPLACE FUNCTION %1$s() RETURNS trigger LANGUAGE plpgsql AS $fn$\nBEGIN\n%2$s%3$s    RETURN NEW;\nEND\n$fn$;\nCREATE OR REPLACE TRIGGER synapse_before_write BEFORE INSERT OR UPDATE ON %4$s FOR EACH ROW EXECUTE FUNCTION %1$s();',
            bname, monotonic, canonical, qtable);
    END IF;
    -- SynapseDB's own objects: not a schema change of the application's to capture.
    PERFORM set_config('synapse.own_ddl', 'on', true);
    EXECUTE format(E'CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    changed text[] := ''{}'';
    sets jsonb := ''{}'';
    mv jsonb := ''{}'';
    base jsonb;  -- NULL for a new row
BEGIN
    IF TG_OP = ''DELETE'' OR (TG_OP = ''UPDATE'' AND (%2$s) IS DISTINCT FROM (%3$s)) THEN
        PERFORM synapse.record_local_write(%4$s, jsonb_build_array(%5$s), %6$s, false,
            ''{}'', ''{}'', ''{}'', %7$s, ''{}'', ''{}'');
        IF TG_OP = ''DELETE'' THEN RETURN NULL; END IF;
        changed := %8$s; sets := %9$s; mv := %10$s;
    ELSIF TG_OP = ''INSERT'' THEN
        changed := %8$s; sets := %9$s; mv := %10$s;
    ELSE
        base := %11$s;
%12$s    END IF;
    PERFORM synapse.record_local_write(%4$s, jsonb_build_array(%13$s), %6$s, true,
        changed, %14$s, base, ''{}'', sets, mv);
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE TRIGGER synapse_local_write AFTER INSERT OR UPDATE OR DELETE ON %15$s
    FOR EACH ROW EXECUTE FUNCTION %1$s();
%16$s',
        fname, old_key, new_key, tbl_lit, old_text, m.node, synapse.mesh_sql_values('OLD', plain),
        all_plain, all_sets, all_mvs, synapse.mesh_sql_values('OLD', counters), changed, new_text,
        synapse.mesh_sql_values('NEW', counters), qtable, before);
    PERFORM set_config('synapse.own_ddl', coalesce(own, ''), true);
END
$gen$;

-- A schema change on this node of a mesh table: its triggers follow the new shape in the
-- change's own transaction. Renaming a mesh table is refused: every node keys its versions,
-- and the configuration names it, by its name.
CREATE OR REPLACE FUNCTION synapse.mesh_follow_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    t record;
BEGIN
    IF pg_catalog.current_setting('synapse.own_ddl', true) = 'on' THEN RETURN; END IF;
    FOR t IN SELECT DISTINCT m.tbl, tn.nspname || '.' || c.relname AS now_named
               FROM "#,
    synapse_postgres::ddl_command_tables!(),
    r#"
               JOIN synapse.mesh_tables m ON m.rel = c.oid LOOP
        IF t.tbl <> t.now_named THEN
            RAISE EXCEPTION 'mesh table % cannot be renamed or moved to another schema while in the mesh', t.tbl
                USING ERRCODE = '0A000',
                HINT = 'remove it from mesh.tables first, or create the new table and copy the rows into it';
        END IF;
        PERFORM synapse.mesh_install_triggers(t.tbl);
    END LOOP;
END
$fn$;
"#,
    synapse_postgres::create_event_trigger!("synapse_mesh_ddl", "ddl_command_end", "synapse.mesh_follow_ddl"),
);

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

/// Makes mesh table `name`'s triggers on the node `client` is connected to from its current
/// shape (`synapse.mesh_install_triggers`): after a schema change replicated into it, in the
/// applier's transaction (appliers run as replicas, where the node's own event trigger does
/// not fire).
pub async fn refresh_triggers(client: &Client, name: &str) -> Result<(), ApplyError> {
    client.execute("SELECT synapse.mesh_install_triggers($1)", &[&name]).await.map_err(|e| match e.as_db_error() {
        // The new shape does not suit the table's strategies (or the table is gone).
        Some(d) if !synapse_postgres::is_transient(&e) => {
            ApplyError::Schema { table: name.to_owned(), message: d.message().to_owned() }
        }
        _ => ApplyError::target(format!("making the mesh triggers of {name}"))(e),
    })?;
    Ok(())
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
    // Each node's own objects: kept out of the source's DDL capture.
    let sql = format!(
        "SET client_min_messages = warning; BEGIN; SET LOCAL synapse.own_ddl = on; SELECT pg_advisory_xact_lock(7305918); {MESH_DDL} COMMIT; RESET client_min_messages;"
    );
    client.batch_execute(&sql).await.map_err(ApplyError::target("installing the mesh functions"))?;
    // Each table's strategies where the generator (and this node's schema changes) find them.
    let mut rows = Vec::new();
    for t in &described {
        let strategies = policies.get(&t.name()).map(|p| json!(p.columns)).unwrap_or_else(|| json!({}));
        rows.push(json!({"tbl": t.name(), "rel": quote::ident(&t.schema) + "." + &quote::ident(&t.table), "strategies": strategies}));
    }
    client
        .execute(
            "WITH wanted AS (SELECT * FROM jsonb_to_recordset($1::text::jsonb) AS w(tbl text, rel text, strategies jsonb)),
                  gone AS (DELETE FROM synapse.mesh_tables m WHERE NOT EXISTS (SELECT 1 FROM wanted w WHERE w.tbl = m.tbl))
             INSERT INTO synapse.mesh_tables (tbl, rel, node, strategies)
             SELECT tbl, rel::regclass::oid, $2, strategies FROM wanted
             ON CONFLICT (tbl) DO UPDATE SET rel = excluded.rel, node = excluded.node, strategies = excluded.strategies",
            &[&Json::Array(rows).to_string(), &i32::from(node.0)],
        )
        .await
        .map_err(ApplyError::target("recording the mesh tables"))?;
    for t in &described {
        refresh_triggers(client, &t.name()).await?;
    }
    Ok(described)
}
