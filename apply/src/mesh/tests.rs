//! The codec and trigger SQL, without a server.

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
    let row: Values = [("owner".to_string(), Some("ann".to_string())), ("hits".to_string(), Some("13".into()))].into();
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
    t.columns =
        vec![("tags".into(), Strategy::Set), ("labels".into(), Strategy::Set), ("title".into(), Strategy::MultiValue)];
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
