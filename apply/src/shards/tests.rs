use super::*;
use synapse_schemas::{Column, RelationKey, Tuple};

fn kr(s: &str) -> KeyRange {
    s.parse().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn key_ranges_read_and_print_as_vitess_names() {
    assert_eq!(kr("-"), KeyRange::FULL);
    assert_eq!(kr("-80"), KeyRange { start: 0, end: Some(0x8000_0000_0000_0000) });
    assert_eq!(kr("80-"), KeyRange { start: 0x8000_0000_0000_0000, end: None });
    assert_eq!(kr("4-8"), kr("40-80"));
    for name in ["-", "-80", "80-", "40-80", "-40", "c0-", "40-4080"] {
        assert_eq!(kr(name).to_string(), name);
    }
    for bad in ["", "80", "x-", "80-40", "80-80", "12345678901234567-"] {
        assert!(bad.parse::<KeyRange>().is_err(), "{bad:?} accepted");
    }
    assert!(kr("-80").contains(0) && !kr("-80").contains(1 << 63) && kr("80-").contains(u64::MAX));
}

#[test]
fn key_ranges_must_cover_the_space_once() {
    let ok = [("a", kr("-80")), ("b", kr("80-"))];
    assert!(key_range_problems(&ok).is_empty());
    let gap = key_range_problems(&[("a", kr("-40")), ("b", kr("80-"))]);
    assert_eq!(gap, vec!["shards: no shard holds keyspace ids 40-80 (just before shard \"b\")"]);
    let overlap = key_range_problems(&[("a", kr("-80")), ("b", kr("40-"))]);
    assert!(overlap[0].contains("overlaps"), "{overlap:?}");
    let short = key_range_problems(&[("a", kr("-80"))]);
    assert_eq!(short, vec!["shards: no shard holds keyspace ids 80-"]);
}

/// The SQL a copy filters with holds for exactly the ids the range contains (checked on the
/// signed values the server's `hashtextextended` returns).
#[test]
fn key_range_sql_bounds_match_contains() {
    let r = kr("40-c0");
    let sql = r.sql("h");
    assert_eq!(
        sql,
        format!(
            "h >= {} AND h < {}",
            (0x4000_0000_0000_0000u64 ^ SIGN) as i64,
            (0xc000_0000_0000_0000u64 ^ SIGN) as i64
        )
    );
    assert_eq!(kr("-80").sql("h"), "(h IS NULL OR h < 0)");
    for key in ["1", "2", "abc", "550e8400-e29b-41d4-a716-446655440000"] {
        let signed = pg_hash::hash_bytes_extended(key.as_bytes(), 0) as i64;
        let by_sql =
            signed >= (0x4000_0000_0000_0000u64 ^ SIGN) as i64 && signed < (0xc000_0000_0000_0000u64 ^ SIGN) as i64;
        assert_eq!(by_sql, r.contains(keyspace_id(Some(key))), "{key}");
    }
}

fn range_rule(ranges: &[(&str, Option<Bound>, Option<Bound>)]) -> TableRule {
    TableRule {
        hash: None,
        range: Some("region".into()),
        ranges: ranges
            .iter()
            .map(|(s, f, t)| ValueRange { shard: (*s).into(), from: f.clone(), to: t.clone() })
            .collect(),
    }
}

#[test]
fn range_rules_must_give_every_value_one_shard() {
    let i = |v| Some(Bound::Int(v));
    let good = range_rule(&[("a", None, i(10)), ("b", i(10), i(20)), ("a", i(20), None)]);
    assert_eq!(good.problems("public.t", &["a", "b"]), Vec::<String>::new());
    let gap = range_rule(&[("a", None, i(10)), ("b", i(11), None)]);
    assert!(gap.problems("public.t", &["a", "b"])[0].contains("ranges[1]: must start where ranges[0] ends (10)"));
    let unknown = range_rule(&[("a", None, i(10)), ("c", i(10), None)]);
    assert!(unknown.problems("public.t", &["a", "b"])[0].contains("ranges[1].shard: \"c\" is not a shard"));
    let open = range_rule(&[("a", i(0), None)]);
    assert!(open.problems("public.t", &["a"])[0].contains("leave out `from`"));
    let both = TableRule { hash: Some("id".into()), ..range_rule(&[]) };
    assert!(both.problems("public.t", &["a"])[0].contains("give one of"));
    assert!(range_rule(&[("a", None, None)]).problems("t", &["a"])[0].contains("schema.table"));
}

fn rel(identity: ReplicaIdentity) -> Relation {
    let col = |name: &str, oid: u32, key: bool| Column {
        name: name.into(),
        type_oid: oid,
        type_modifier: -1,
        type_name: if oid == 25 { "text".into() } else { "bigint".into() },
        base_type_oid: oid,
        element_type_oid: 0,
        is_key: key,
        type_defs: Vec::new(),
    };
    Relation {
        oid: 1,
        schema: "public".into(),
        table: "orders".into(),
        replica_identity: identity,
        columns: vec![col("id", 20, true), col("customer", 20, true), col("note", 25, false)],
    }
}

fn shard(name: &str, range: &str, rule: TableRule) -> ShardAssignment {
    ShardAssignment {
        set: "orders".into(),
        shard: name.into(),
        key_range: kr(range),
        rules: Arc::new(BTreeMap::from([("public.orders".to_owned(), rule)])),
    }
}

fn hash_rule(column: &str) -> TableRule {
    TableRule { hash: Some(column.into()), range: None, ranges: Vec::new() }
}

fn tuple(values: &[Datum]) -> Tuple {
    values.to_vec().into()
}

fn t(s: &str) -> Datum {
    Datum::Text(s.into())
}

fn change(op: Op, before: Option<(OldValues, Tuple)>, after: Option<Tuple>) -> RowChange {
    RowChange { index: 1, relation: RelationKey { oid: 1, version: 1 }, op, before, after }
}

/// Two customers on different halves of the keyspace.
fn two_customers() -> (String, String) {
    let lower = (1..).find(|c: &i32| keyspace_id(Some(&c.to_string())) < SIGN).map(|c| c.to_string());
    let upper = (1..).find(|c: &i32| keyspace_id(Some(&c.to_string())) >= SIGN).map(|c| c.to_string());
    (lower.unwrap_or_default(), upper.unwrap_or_default())
}

#[test]
fn an_update_across_shards_is_a_delete_here_and_an_insert_there() {
    let r = rel(ReplicaIdentity::Default);
    let (lo, hi) = two_customers();
    let (a, b) = (shard("-80", "-80", hash_rule("customer")), shard("80-", "80-", hash_rule("customer")));
    let (ra, rb) = (a.route(&r).unwrap(), b.route(&r).unwrap());
    // The customer changed: pgoutput sends the old key (both key columns).
    let moved = || {
        change(
            Op::Update,
            Some((OldValues::Key, tuple(&[t("1"), t(&lo), Datum::Null]))),
            Some(tuple(&[t("1"), t(&hi), t("n")])),
        )
    };
    let at_a = a.route_change(&ra, &r, 7, moved()).unwrap().unwrap();
    assert_eq!(at_a.op, Op::Delete);
    let at_b = b.route_change(&rb, &r, 7, moved()).unwrap().unwrap();
    assert_eq!((at_b.op, at_b.before.is_none()), (Op::Insert, true));
    assert_eq!(at_b.after.unwrap().get(2), Some(Value::Text("n")));
    // An update that stays: only the owner applies it.
    let stay = || change(Op::Update, None, Some(tuple(&[t("1"), t(&lo), t("m")])));
    assert_eq!(a.route_change(&ra, &r, 8, stay()).unwrap().map(|c| c.op), Some(Op::Update));
    assert!(b.route_change(&rb, &r, 8, stay()).unwrap().is_none());
    // A delete goes by the old key.
    let del = || change(Op::Delete, Some((OldValues::Key, tuple(&[t("1"), t(&hi), Datum::Null]))), None);
    assert!(a.route_change(&ra, &r, 9, del()).unwrap().is_none());
    assert!(b.route_change(&rb, &r, 9, del()).unwrap().is_some());
}

#[test]
fn a_move_without_a_toasted_value_stops_unless_the_old_row_was_logged_whole() {
    let (lo, hi) = two_customers();
    let b = shard("80-", "80-", hash_rule("customer"));
    let keyed = rel(ReplicaIdentity::Default);
    let c = change(
        Op::Update,
        Some((OldValues::Key, tuple(&[t("1"), t(&lo), Datum::Null]))),
        Some(tuple(&[t("1"), t(&hi), Datum::UnchangedToast])),
    );
    let err = b.route_change(&b.route(&keyed).unwrap(), &keyed, 5, c).unwrap_err();
    assert!(err.to_string().contains("\"note\""), "{err}");
    let full = rel(ReplicaIdentity::Full);
    let c = change(
        Op::Update,
        Some((OldValues::Full, tuple(&[t("1"), t(&lo), t("big")]))),
        Some(tuple(&[t("1"), t(&hi), Datum::UnchangedToast])),
    );
    let ins = b.route_change(&b.route(&full).unwrap(), &full, 5, c).unwrap().unwrap();
    assert_eq!(ins.after.unwrap().get(2), Some(Value::Text("big")));
}

#[test]
fn a_shard_key_outside_the_identity_or_of_another_type_is_refused() {
    let r = rel(ReplicaIdentity::Default);
    let err = shard("-80", "-80", hash_rule("note")).route(&r).unwrap_err();
    assert!(err.to_string().contains("REPLICA IDENTITY FULL"), "{err}");
    let mut full = rel(ReplicaIdentity::Full);
    full.columns[2].base_type_oid = 1184; // timestamptz: its text depends on the session
    assert!(shard("-80", "-80", hash_rule("note"))
        .route(&full)
        .unwrap_err()
        .to_string()
        .contains("hash sharding takes"));
    assert!(shard("-80", "-80", hash_rule("nope")).route(&r).unwrap_err().to_string().contains("no column \"nope\""));
}

#[test]
fn range_routes_follow_the_value_order() {
    let r = rel(ReplicaIdentity::Default);
    let i = |v| Some(Bound::Int(v));
    let mut rule = range_rule(&[("a", None, i(100)), ("b", i(100), None)]);
    rule.range = Some("customer".into());
    let (a, b) = (shard("a", "-80", rule.clone()), shard("b", "80-", rule));
    let (ra, rb) = (a.route(&r).unwrap(), b.route(&r).unwrap());
    for (v, at_a) in [("-5", true), ("99", true), ("100", false), ("7000", false)] {
        assert_eq!(ra.owns(Some(v)), at_a, "{v}");
        assert_eq!(rb.owns(Some(v)), !at_a, "{v}");
    }
    assert!(ra.owns(None) && !rb.owns(None));
    assert_eq!(a.copy_filter(&r).unwrap().unwrap(), "(\"customer\" IS NULL OR \"customer\" < 100)");
    assert_eq!(b.copy_filter(&r).unwrap().unwrap(), "(\"customer\" >= 100)");
    let mut text_rule =
        range_rule(&[("a", None, Some(Bound::Text("m".into()))), ("b", Some(Bound::Text("m".into())), None)]);
    text_rule.range = Some("customer".into());
    assert!(shard("a", "-", text_rule).route(&r).unwrap_err().to_string().contains("must be numbers"));
}
