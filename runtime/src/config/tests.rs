//! The configuration's parsing, interpolation and validation, one error per bad field.

use super::*;

const GOOD: &str = "
sources:
  - name: a
    url: postgres://app:${PW:-secret}@127.0.0.1:5432/app
targets:
  - name: b
    url: postgres://app@127.0.0.1:5433/app
";

#[test]
fn interpolation() {
    let env = |k: &str| (k == "HOST").then(|| "db1".to_string());
    assert_eq!(interpolate("h=${HOST} p=${PORT:-5432}", "f", env).unwrap(), "h=db1 p=5432");
    let e = interpolate("${PW:?set the password}", "f", env).unwrap_err().to_string();
    assert!(e.contains("PW") && e.contains("set the password"), "{e}");
    assert!(interpolate("${NOPE}", "f", env).unwrap_err().to_string().contains("NOPE"));
}

/// A file using several unset variables names every one at once, each with its line and the
/// file's own message (an example with five variables took five runs to learn them).
#[test]
fn every_missing_variable_is_reported_at_once_with_its_line() {
    let text = "sources:\n  - name: a\n    url: postgres://app:${SRC_PW:?the source password}@${SRC_HOST}/app\n\
                targets:\n  - name: b\n    url: postgres://app:${DST_PW}@${DST_HOST:-localhost}/app\n";
    let e = interpolate(text, "synapse.yaml", |_| None).unwrap_err();
    let ConfigError::MissingVars { missing, .. } = &e else { panic!("{e:?}") };
    let found: Vec<(usize, &str)> = missing.iter().map(|m| (m.line, m.var.as_str())).collect();
    assert_eq!(found, [(3, "SRC_PW"), (3, "SRC_HOST"), (6, "DST_PW")]);
    let text = e.to_string();
    assert!(text.starts_with("synapse.yaml: 3 environment variables not set:"), "{text}");
    assert!(text.contains("line 3: SRC_PW (the source password)") && text.contains("line 6: DST_PW"), "{text}");
    assert!(text.contains("fix: export them"), "{text}");
}

#[test]
fn parses_and_redacts() {
    let text = interpolate(GOOD, "f", |_| None).unwrap();
    let c = Config::parse(&text, false, "f").unwrap();
    c.validate("f").unwrap();
    assert_eq!(c.sources[0].url.to_string(), "postgres://app:***@127.0.0.1:5432/app");
    assert!(!format!("{c:?}").contains("secret"));
    assert_eq!(c.sources_of(&c.targets[0]).count(), 1);
    let toml = "[[sources]]\nname = \"a\"\nurl = \"host=x password=hunter2\"\n";
    let c = Config::parse(toml, true, "f.toml").unwrap();
    assert_eq!(c.sources[0].url.to_string(), "host=x password=***");
}

#[test]
fn kafka_settings_are_checked_by_name() {
    let with = |kafka: &str| {
        let text = interpolate(GOOD, "f", |_| None).unwrap();
        let c = Config::parse(&format!("{text}\nlog:\n  kafka:\n{kafka}"), false, "f").unwrap();
        c.validate("f").map(|_| c)
    };
    let c = with(
            "    brokers: k1:9092,k2:9092\n    properties:\n      sasl.password: hunter2\n      linger.ms: 5\n    public_topics: {}\n",
        )
        .unwrap();
    let k = c.log.kafka.as_ref().unwrap();
    assert_eq!(k.log_options("a").changes_topic(), "synapse.a.changes");
    assert_eq!(k.log_options("a").replication_factor, -1, "unset: the broker's default");
    assert!(!format!("{c:?}").contains("hunter2"), "secret properties are redacted");
    let err = |kafka: &str| with(kafka).unwrap_err().to_string();
    assert!(err("    brokers: kafka\n").contains("log.kafka.brokers"));
    assert!(err("    brokers: k:9092\n    topic_prefix: 'a b'\n").contains("log.kafka.topic_prefix"));
    assert!(err("    brokers: k:9092\n    replication_factor: 0\n").contains("log.kafka.replication_factor"));
    let e = err("    brokers: k:9092\n    properties: {sasl.mechanismz: PLAIN}\n");
    assert!(e.contains("log.kafka.properties") && e.contains("sasl.mechanismz"), "{e}");
    let e = err("    brokers: k:9092\n    group: ''\n");
    assert!(e.contains("log.kafka.group"), "{e}");
    assert!(with("    brokers: k:9092\n    group: synapse.workers\n").is_ok());
    assert!(err("    brokers: k:9092\n    max_message_bytes: 10\n").contains("log.kafka.max_message_bytes"));
    let e = err("    brokers: k:9092\n    public_topics: {tables: [orders]}\n");
    assert!(e.contains("log.kafka.public_topics.tables"), "{e}");
    let e = err("    brokers: k:9092\n    signing_key: tooshortakey\n");
    assert!(e.contains("log.kafka.signing_key") && !e.contains("tooshortakey"), "{e}");
    let key = "k".repeat(40);
    let c = with(&format!("    brokers: k:9092\n    signing_key: {key}\n")).unwrap();
    assert!(c.log.kafka.as_ref().unwrap().log_options("a").signing_key.is_some());
    assert!(!format!("{c:?}").contains(&key), "the signing key is redacted");
}

#[test]
fn a_node_cannot_be_source_and_target_yet() {
    let text = interpolate(GOOD, "f", |_| None).unwrap().replace("name: b", "name: a");
    let c = Config::parse(&text, false, "f").unwrap();
    assert!(c.validate("f").unwrap_err().to_string().contains("targets[0].name"));
}

const MESH: &str = "
mesh:
  nodes:
    - {name: us, id: 1, url: 'postgres://app@127.0.0.1:5432/app', region: us-east}
    - {name: eu, id: 2, url: 'postgres://app@127.0.0.1:5433/app'}
    - {name: ap, id: 3, url: 'postgres://app@127.0.0.1:5434/app'}
  tables: [public.accounts]
  columns:
    public.accounts: {balance: counter, high_score: max}
";

#[test]
fn a_mesh_expands_into_sources_and_targets() {
    let mut c = Config::parse(MESH, false, "f").unwrap();
    c.validate("f").unwrap();
    c.expand_mesh();
    assert_eq!(c.sources.len(), 3);
    assert!(c.sources.iter().all(|s| !s.forward_applied && s.tables.contains(&"synapse.row_version".to_string())));
    let us = &c.targets[0];
    assert_eq!((us.name.as_str(), us.sources.clone(), us.initial_copy), ("us", vec!["eu".into(), "ap".into()], false));
    let p = c.mesh.as_ref().unwrap().policies();
    assert_eq!(p["public.accounts"].strategy("balance"), synapse_resolver::Strategy::Counter);
    let text =
        MESH.replace("high_score: max}", "high_score: max, tags: set}\n  merge_functions: {public.accounts: public.m}");
    let c = Config::parse(&text, false, "f").unwrap();
    c.validate("f").unwrap();
    let p = c.mesh.as_ref().unwrap().policies();
    assert_eq!(p["public.accounts"].strategy("tags"), synapse_resolver::Strategy::Set);
    assert_eq!(p["public.accounts"].merge_function.as_deref(), Some("public.m"));
}

#[test]
fn mesh_errors_name_the_field() {
    let check = |from: &str, to: &str, field: &str| {
        let c = Config::parse(&MESH.replace(from, to), false, "f");
        let e = match c {
            Ok(c) => c.validate("f").unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(field), "{from} → {to}: {e}");
    };
    check("id: 2", "id: 1", "mesh.nodes[1].id");
    check("id: 3", "id: 0", "mesh.nodes[2].id");
    check("name: eu", "name: us", "mesh.nodes[1].name");
    check("tables: [public.accounts]", "tables: [accounts]", "mesh.tables[0]");
    check("    public.accounts: {", "    public.other: {", "mesh.columns.public.other");
    let merge = |f: &str| format!("  merge_functions: {{{f}}}\n  tables: [public.accounts]");
    check("  tables: [public.accounts]", &merge("public.other: public.f"), "mesh.merge_functions.public.other");
    check("  tables: [public.accounts]", &merge("public.accounts: f"), "mesh.merge_functions.public.accounts");
    check("  tables: [public.accounts]", &merge("public.accounts: 'a.b; drop'"), "not a schema.function");
    check("balance: counter", "balance: sum", "unknown variant `sum`");
    check("  tables: [public.accounts]", "  hub: moon\n  tables: [public.accounts]", "mesh.hub");
    check(
        "  tables: [public.accounts]",
        "  tombstone_purge_interval_secs: -1\n  tables: [public.accounts]",
        "mesh.tombstone_purge_interval_secs",
    );
}

#[test]
fn a_hub_applies_every_spoke_and_spokes_apply_the_hub() {
    let mut c = Config::parse(&MESH.replace("  tables:", "  hub: eu\n  tables:"), false, "f").unwrap();
    c.validate("f").unwrap();
    c.expand_mesh();
    let forwards: Vec<(&str, bool)> = c.sources.iter().map(|s| (s.name.as_str(), s.forward_applied)).collect();
    assert_eq!(forwards, [("us", false), ("eu", true), ("ap", false)]);
    let applies: Vec<(&str, Vec<String>)> = c.targets.iter().map(|t| (t.name.as_str(), t.sources.clone())).collect();
    assert_eq!(applies, [("us", vec!["eu".into()]), ("eu", vec!["us".into(), "ap".into()]), ("ap", vec!["eu".into()])]);
    // Only the hub's capture passes on what is applied there: its applies flush each commit.
    let sync: Vec<(&str, bool)> = c.targets.iter().map(|t| (t.name.as_str(), c.synchronous_commit(t))).collect();
    assert_eq!(sync, [("us", false), ("eu", true), ("ap", false)]);
    c.targets[0].synchronous_commit = Some(true);
    assert!(c.synchronous_commit(&c.targets[0]), "a set value wins");
}

#[test]
fn errors_name_the_field() {
    let e = Config::parse("sources:\n  - name: a\n    urll: x\n", false, "f.yaml").unwrap_err().to_string();
    assert!(e.contains("urll"), "{e}");
    let bad = GOOD.replace("name: b", "name: B!");
    let c = Config::parse(&interpolate(&bad, "f", |_| None).unwrap(), false, "f").unwrap();
    let e = c.validate("f").unwrap_err().to_string();
    assert!(e.contains("targets[0].name"), "{e}");
    let bad = GOOD.replace("postgres://app@127.0.0.1:5433/app", "postgres://x:notaport/app");
    let c = Config::parse(&interpolate(&bad, "f", |_| None).unwrap(), false, "f").unwrap();
    assert!(c.validate("f").unwrap_err().to_string().contains("targets[0].url"));
}

/// `vector_indexes:`: a dot index needs its longest vector; bad fields are named.
#[test]
fn vector_index_fields_are_checked() {
    let check = |index: &str| {
        let text = format!("{GOOD}vector_indexes:\n  - {{name: docs, source: a, table: public.docs, column: e, dimensions: 8, {index}}}\n");
        let c = Config::parse(&interpolate(&text, "f", |_| None).unwrap(), false, "f").unwrap();
        c.validate("f").err().map(|e| e.to_string()).unwrap_or_default()
    };
    assert_eq!(check("distance: dot, max_norm: 1"), "");
    assert_eq!(check("distance: cosine"), "");
    let e = check("distance: dot");
    assert!(e.contains("vector_indexes[0].max_norm") && e.contains("longest vector"), "{e}");
    assert!(check("distance: dot, max_norm: -2").contains("not a positive number"));
    assert!(check("distance: euclidean, max_norm: 3").contains("dot only"));
    assert!(check("distance: manhattan").contains("cosine, euclidean or dot"));
}

/// The malformed configurations new users wrote (issue 26), each loaded from a file as `synapse
/// validate` does: every message names the field, its line, and the fix.
#[test]
fn malformed_configs_name_the_field_the_line_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap_err().to_string()
    };
    let good_target = "targets:\n  - name: b\n    url: postgres://app@127.0.0.1:5433/app\n";
    let expect = |e: &str, parts: &[&str]| {
        for part in parts {
            assert!(e.contains(part), "missing {part:?} in:\n{e}");
        }
    };

    // A filter with `==`: the field, its line, the character, the fix.
    let e = load(
        "filter.yaml",
        &format!(
            "sources:\n  - name: a\n    url: postgres://app@127.0.0.1:5432/app\n{good_target}webhooks:\n  - name: w\n    url: https://example.com/h\n    secrets: [0123456789abcdef0123456789abcdef]\n    filter: \"status == 'paid'\"\n"
        ),
    );
    expect(&e, &["filter.yaml:11:", "webhooks[0].filter", "at character 8", "single `=`"]);
    // (The temporary directory's random name is left out: it once held "Eq" itself.)
    let message = e.replace(&dir.path().display().to_string(), "");
    assert!(!message.contains("Eq"), "operators are shown as written: {e}");
    // An unquoted text value.
    let e = load(
        "filter2.yaml",
        &format!("sources:\n  - name: a\n    url: postgres://h/app\n{good_target}webhooks:\n  - name: w\n    url: https://example.com/h\n    secrets: [0123456789abcdef0123456789abcdef]\n    filter: status = paid\n"),
    );
    expect(&e, &[":11:", "webhooks[0].filter", "found `paid` at character 10", "'paid'"]);

    // Port 99999: not "invalid connection string".
    let e = load(
        "port.yaml",
        &format!("sources:\n  - name: a\n    url: postgres://app@127.0.0.1:99999/app\n{good_target}"),
    );
    expect(&e, &["port.yaml:3:", "sources[0].url", "port `99999`", "1 to 65535"]);
    let e = load("port2.yaml", &format!("sources:\n  - name: a\n    url: host=h port=0 dbname=app\n{good_target}"));
    expect(&e, &[":3:", "sources[0].url", "port `0`"]);

    // A missing file: the OS error once (as the source), and where to start.
    let e = Config::load(&dir.path().join("nope.yaml")).unwrap_err();
    assert!(!e.to_string().contains("os error"), "the OS error is the source, printed once by the caller: {e}");
    expect(&e.to_string(), &["nope.yaml", "check the path", "deploy/synapse.example.yaml"]);

    // Bad indentation: not just "missing field url", but where it went and how to fix it.
    let e = load("indent.yaml", &format!("sources:\n  - name: a\n  url: postgres://h/app\n{good_target}"));
    expect(&e, &["indent.yaml:2:", "sources[0]", "missing field `url`", "line 3", "indent line 3 by 4 spaces"]);
    let e = load("indent2.yaml", &format!("sources:\n- name: a\nurl: postgres://h/app\n{good_target}"));
    expect(&e, &[":2:", "missing field `url`", "indent line 3 by 2 spaces"]);

    // A misspelt field: the closest real one.
    let e = load(
        "typo.yaml",
        &format!("sources:\n  - name: a\n    url: postgres://h/app\n    heartbeat_interval: 5\n{good_target}"),
    );
    expect(&e, &["typo.yaml:4:", "sources[0].heartbeat_interval", "did you mean `heartbeat_interval_secs`"]);

    // Every broken rule at once, each at its own line.
    let e = load(
        "many.yaml",
        "sources:\n  - name: A\n    url: postgres://h/app\n    heartbeat_interval_secs: 0\ntargets:\n  - name: b\n    url: postgres://h2/app\n    sources: [nope]\n    copy_parallelism: 0\nops:\n  listen: localhost\n",
    );
    expect(
        &e,
        &[
            "many.yaml: 5 problems:",
            "line 2: sources[0].name: `A` must be",
            "line 4: sources[0].heartbeat_interval_secs: must be between 0.1 and 3600",
            "line 8: targets[0].sources[0]: no source is named `nope`",
            "line 9: targets[0].copy_parallelism: must be between 1 and 64",
            "line 11: ops.listen: `localhost` is not an IP address and port like 127.0.0.1:9187",
        ],
    );

    // The same in TOML.
    let e = load(
        "many.toml",
        "[[sources]]\nname = \"a\"\nurl = \"postgres://h:70000/app\"\n\n[[targets]]\nname = \"b\"\nurl = \"postgres://h2/app\"\ncopy_parallelism = 99\n",
    );
    expect(
        &e,
        &["many.toml: 2 problems:", "line 3: sources[0].url", "port `70000`", "line 8: targets[0].copy_parallelism"],
    );
    let e = load("typo.toml", "[[sources]]\nname = \"a\"\nurll = \"postgres://h/app\"\n");
    expect(&e, &["typo.toml:3:", "did you mean `url`"]);

    // Unset variables, all at once with their lines (the example needed five runs).
    let e =
        load("vars.yaml", "sources:\n  - name: a\n    url: postgres://${SYN_T_USER}:${SYN_T_PW}@${SYN_T_HOST}/app\n");
    expect(&e, &["3 environment variables not set", "line 3: SYN_T_USER", "fix: export them"]);
}

/// Fuzzing by property: the configuration parser takes any text — random, or the shipped
/// examples with bytes replaced, deleted or inserted (which reach deep into the parse and
/// the validation) — and answers a configuration or an error naming what is wrong; it never
/// panics.
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLES: [&str; 3] = [
        include_str!("../../../deploy/synapse.example.yaml"),
        include_str!("../../../deploy/kafka.example.yaml"),
        include_str!("../../../deploy/mesh.example.yaml"),
    ];

    fn env(name: &str) -> Option<String> {
        Some(match name.ends_with("WHSEC") {
            true => "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".into(),
            false => "fuzz-value-0123456789abcdefghijkl".into(),
        })
    }

    /// The unmutated examples load: so mutations start from text that reaches validation.
    #[test]
    fn the_examples_load() {
        for (i, text) in EXAMPLES.iter().enumerate() {
            if let Err(e) = Config::from_text(text, false, "example.yaml", env) {
                panic!("example {i}: {e}");
            }
        }
    }

    fn parses_or_fails_cleanly(text: &str, toml: bool) -> Result<(), TestCaseError> {
        // Every variable set: the text reaches parsing and validation.
        if let Err(e) = Config::from_text(text, toml, "fuzz.yaml", env) {
            prop_assert!(!e.to_string().is_empty());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn any_text(text in "(?s).{0,200}", toml: bool) {
            parses_or_fails_cleanly(&text, toml)?;
        }

        #[test]
        fn mutated_examples(
            which in 0..EXAMPLES.len(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, "[ -~\n]{0,3}"), 1..6),
        ) {
            let mut text = EXAMPLES[which].to_string();
            for (at, kind, insert) in edits {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                match kind {
                    0 => text.insert_str(i, &insert),
                    1 => {
                        let end = (i + insert.len().max(1)).min(text.len());
                        let end = (end..=text.len()).find(|e| text.is_char_boundary(*e)).unwrap_or(text.len());
                        text.replace_range(i..end, "");
                    }
                    _ => {
                        let end = (i + insert.len()).min(text.len());
                        let end = (end..=text.len()).find(|e| text.is_char_boundary(*e)).unwrap_or(text.len());
                        text.replace_range(i..end, &insert);
                    }
                }
            }
            parses_or_fails_cleanly(&text, false)?;
        }
    }
}
