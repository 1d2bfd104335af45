//! What users hit first: bad configuration files, tables that cannot be replicated, doctor.
#![allow(clippy::unwrap_used)]

mod common;

use common::{synapse, Nodes};

fn run_with(config_text: &str, ext: &str, cmd: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("synapse.{ext}"));
    std::fs::write(&path, config_text).unwrap();
    let out = synapse(&[cmd, "--config", path.to_str().unwrap()]).env_remove("SYNAPSE_PW").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn malformed_configs_are_rejected_naming_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("sources:\n  - name: a\n    ulr: postgres://x/app\n", "yaml", "ulr"),
        ("sources:\n  - name: a\n    url: postgres://x/app\ntargets:\n  - name: b\n    url: postgres://y/app\n    copy_parallelism: 0\n", "yaml", "targets[0].copy_parallelism"),
        ("sources:\n  - name: A B\n    url: postgres://x/app\n", "yaml", "sources[0].name"),
        ("sources:\n  - name: a\n    url: postgres://x:999999/app\n", "yaml", "sources[0].url"),
        ("sources:\n  - name: a\n    url: postgres://u:${SYNAPSE_PW:?export the password}@x/app\n", "yaml", "SYNAPSE_PW"),
        ("[[sources]]\nname = \"a\"\nurl = \"postgres://x/app\"\n[[targets]]\nname = \"b\"\nurl = \"postgres://y/app\"\nsources = [\"zz\"]\n", "toml", "targets[0].sources[0]"),
        ("sources: [\n", "yaml", "synapse.yaml"),
        ("sources: []\n", "yaml", "sources"),
        ("sources:\n  - name: a\n    url: postgres://x/app\nwebhooks:\n  - name: h\n    url: ftp://x\n    secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]\n", "yaml", "webhooks[0].url"),
        ("sources:\n  - name: a\n    url: postgres://x/app\nwebhooks:\n  - name: h\n    url: http://x\n    secrets: [nope]\n", "yaml", "webhooks[0].secrets[0]"),
        ("sources:\n  - name: a\n    url: postgres://x/app\nwebhooks:\n  - name: h\n    url: http://x\n    secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]\n    filter: \"a = \"\n", "yaml", "filter"),
        ("sources:\n  - name: a\n    url: postgres://x/app\nwebhooks:\n  - name: h\n    url: http://x\n    secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]\n    retry_schedule: [5 parsecs]\n", "yaml", "webhooks[0].retry_schedule[0]"),
        ("sources:\n  - name: a\n    url: postgres://x/app\napi:\n  tokens:\n    - name: t\n      token: short\n", "yaml", "api.tokens[0].token"),
    ];
    for (text, ext, field) in cases {
        for cmd in ["validate", "run"] {
            let (ok, out) = run_with(text, ext, cmd);
            assert!(!ok, "{cmd} accepted:\n{text}");
            assert!(out.contains(field), "{cmd}: error does not name `{field}`:\n{out}");
            assert!(!out.contains("panicked"), "{out}");
        }
    }
    let (ok, out) =
        run_with("sources:\n  - name: a\n    url: postgres://u:${SYNAPSE_PW:-hunter2}@h/app\n", "yaml", "validate");
    assert!(ok, "{out}");
    assert!(!out.contains("hunter2"), "password leaked: {out}");
}

fn validate_example(file: &str, env: &[(&str, &str)]) -> String {
    common::validate_config(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(file), env)
}

#[test]
fn the_example_configs_are_valid() {
    validate_example(
        "synapse.example.yaml",
        &[
            ("SOURCE_PASSWORD", "s"),
            ("TARGET_PASSWORD", "t"),
            ("ADMIN_TOKEN", "admin-token-0123456789abcdef"),
            ("ORDERS_TOKEN", "orders-token-0123456789abcdef"),
            ("ORDERS_WHSEC", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ],
    );
    validate_example(
        "kafka.example.yaml",
        &[("SOURCE_PASSWORD", "s"), ("TARGET_PASSWORD", "t"), ("KAFKA_PASSWORD", "k")],
    );
    let text = validate_example(
        "mesh.example.yaml",
        &[
            ("US_PASSWORD", "u"),
            ("EU_PASSWORD", "e"),
            ("AP_PASSWORD", "a"),
            ("ADMIN_TOKEN", "admin-token-0123456789abcdef"),
        ],
    );
    assert!(text.contains("mesh of 3 nodes"), "{text}");
}

#[test]
fn a_table_without_key_is_reported_clearly() {
    let nodes =
        Nodes::start("CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE events_nokey (at timestamptz, what text);");
    // Named explicitly: a definite error naming the table and the fix (with exit_on_park the
    // process exits on it; by default only the capture parks, see tests/isolation.rs).
    let config = nodes.config("    tables: [public.events_nokey]\n");
    let text = std::fs::read_to_string(&config).unwrap() + "supervision:\n  exit_on_park: true\n";
    std::fs::write(&config, text).unwrap();
    let out = synapse(&["run", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("public.events_nokey") && text.contains("CAP009") && text.contains("REPLICA IDENTITY FULL"),
        "{text}"
    );
    // doctor names it too, with the fix, and fails.
    let config = nodes.config("");
    let out = synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("public.events_nokey") && text.contains("REPLICA IDENTITY FULL"), "{text}");
    assert!(text.contains("wal_level = logical"), "{text}");
}

#[test]
fn doctor_passes_on_a_ready_source_and_explains_wal_level() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY)");
    let config = nodes.config("");
    let out = synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    nodes.source.psql("postgres", "ALTER SYSTEM SET wal_level = replica").unwrap();
    nodes.source.stop("fast").unwrap();
    nodes.source.restart().unwrap();
    let out = synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("ALTER SYSTEM SET wal_level = logical"), "{text}");
}

/// A role that may replicate but lacks what the pipeline does next: creating the publication
/// (CREATE on the database) and reading the tables for the initial copy. doctor names both with
/// the exact GRANT (it passed such a role before; the quickstart then stopped with CAP006).
#[test]
fn doctor_names_the_grants_a_replication_role_lacks() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY); CREATE ROLE rep LOGIN REPLICATION;");
    let config = nodes.config("");
    let yaml = std::fs::read_to_string(&config).unwrap().replacen("postgres://postgres@", "postgres://rep@", 1);
    std::fs::write(&config, yaml).unwrap();
    let out = synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("role rep may replicate"), "{text}");
    assert!(text.contains("GRANT CREATE ON DATABASE \"app\" TO \"rep\""), "{text}");
    assert!(text.contains("GRANT SELECT ON \"public\".\"t\" TO \"rep\""), "{text}");
    nodes.source.psql("app", "GRANT CREATE ON DATABASE app TO rep; GRANT SELECT ON t TO rep").unwrap();
    let out = synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("role rep may create publication"), "{text}");
}

#[test]
fn doctor_reports_an_unreachable_webhook() {
    let nodes = Nodes::start("CREATE TABLE t (id int PRIMARY KEY)");
    let config = nodes.config("");
    let port = synapse_localpg::free_port().unwrap();
    let text = std::fs::read_to_string(&config).unwrap()
        + &format!("webhooks:\n  - name: hook\n    url: http://127.0.0.1:{port}/in\n    secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]\negress:\n  allow: [127.0.0.1]\n");
    std::fs::write(&config, text).unwrap();
    let out = synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("webhook hook") && text.contains("unreachable") && text.contains("webhooks[].url"), "{text}");
}

#[test]
fn quickstart_with_urls_resumes_instead_of_copying_again() {
    let nodes = Nodes::start(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5000) g;
         CREATE TABLE nokey (v text);",
    );
    let data = nodes.dir.path().join("qs");
    let run = || {
        let out = synapse(&[
            "quickstart",
            "--source",
            &nodes.source.url("app"),
            "--target",
            &nodes.target.url("app"),
            "--data-dir",
            data.to_str().unwrap(),
            "--duration",
            "3",
            "--ops-listen",
            "",
            "--api-listen",
            "",
        ])
        .output()
        .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{text}");
        text
    };
    let first = run();
    assert!(first.contains("public.nokey") && first.contains("REPLICA IDENTITY FULL"), "{first}");
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM t").unwrap(), "5000");
    let synced =
        "SELECT string_agg(table_name || ':' || rows_copied || ':' || updated_at, ',') FROM synapse.table_sync";
    let before = nodes.target.psql("app", synced).unwrap();
    nodes.source.psql("app", "INSERT INTO t VALUES (9999, 'while stopped')").unwrap();
    run();
    assert_eq!(nodes.target.psql("app", synced).unwrap(), before, "the rerun copied again");
    assert_eq!(nodes.target.psql("app", "SELECT v FROM t WHERE id = 9999").unwrap(), "while stopped");
}

#[test]
fn quickstart_regions_shows_a_resolved_conflict_and_a_converged_counter() {
    let out = synapse(&["quickstart", "--regions", "3", "--duration", "2", "--ops-listen", ""]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("synapse.conflicts: update_update"), "{text}");
    assert!(text.contains("no increment lost"), "{text}");
    assert!(text.contains("all 3 regions identical"), "{text}");
}

/// `synapse repair check` between a source and a target of a configuration: identical tables
/// exit 0, drift exits 1 naming the keys (text and JSON), an unreachable node exits 2 naming it.
#[test]
fn repair_check_reports_drift_between_nodes() {
    // ANALYZE: with a row estimate the check splits the integer key into ranges.
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g; ANALYZE t;";
    let nodes = Nodes::start(schema);
    nodes.target.psql("app", schema).unwrap();
    let config = nodes.config("    tables: [public.t]\n");
    let check = |extra: &[&str]| {
        let mut args = vec!["repair", "check", "--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = synapse(&args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = check(&[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(
            "public.t on a, b: 3000 / 3000 rows; 0 of 4096 buckets (key range 1..3000, scanned) differ (1 tree nodes compared): identical"
        ),
        "{text}"
    );

    nodes
        .target
        .psql(
            "app",
            "DELETE FROM t WHERE id = 7; UPDATE t SET v = NULL WHERE id = 2500; INSERT INTO t VALUES (9000, 'x')",
        )
        .unwrap();
    let (code, text) = check(&["--bits", "8"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(": 3 key(s) differ")
            && text.contains("  7: missing on b\n")
            && text.contains("  9000: missing on a\n")
            && text.contains("  2500: different rows: a | b\n"),
        "{text}"
    );
    let (code, json) = check(&["--json", "--table", "public.t"]);
    assert_eq!(code, Some(1));
    let reports: serde_json::Value = serde_json::from_str(&json).unwrap();
    let differing = reports[0]["differing"].as_array().unwrap();
    assert_eq!(differing.len(), 3, "{json}");
    assert!(
        differing.contains(&serde_json::json!({"key": ["2500"], "missing_on": [], "holders": [["a"], ["b"]]})),
        "{json}"
    );
    assert_eq!(reports[0]["nodes"], serde_json::json!(["a", "b"]));

    let (code, text) = check(&["--nodes", "a,moon"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("`moon` is not a node") && text.contains("known: a, b"), "{text}");
    drop(nodes.target);
    let (code, text) = check(&[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("[REP003] node b: connecting") && text.contains("hint: check the node is up"), "{text}");
}
