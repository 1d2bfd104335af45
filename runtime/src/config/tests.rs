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
