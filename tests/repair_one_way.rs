//! `synapse repair fix` on one-way replication (a source and the target applying it, no mesh):
//! the target diverged by direct writes (inserts, updates, deletes, NULLs, TOASTed values, many
//! types) while the source keeps writing other keys through the pipeline. The check reports
//! exactly the diverged keys; a dry run changes nothing; the fix makes the target hold the
//! source's rows, the stream keeps running, and afterwards both are identical.
#![allow(clippy::unwrap_used)]

mod common;

use common::{spawn_run, synapse, Nodes, SyncClient};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE docs (id bigint PRIMARY KEY, i int, t text, big text, n numeric(12,3), f float8, b boolean,
                   by bytea, ts timestamptz, j jsonb, arr text[], u uuid, d date, iv interval, ip inet);
INSERT INTO docs SELECT g, g, 'row ' || g, NULL, g / 8.0, g * 1.5, g % 2 = 0, decode(md5(g::text), 'hex'),
    '2026-01-01'::timestamptz + g * interval '1 minute', jsonb_build_object('g', g, 'tags', jsonb_build_array(g)),
    ARRAY['x', g::text], md5(g::text)::uuid, '2026-01-01'::date + g, g * interval '1 second', '10.0.0.1'
FROM generate_series(1, 3000) g;";

const DRIFT: [i64; 9] = [3, 4, 5, 6, 7, 8, 9, 10, 90_001];

fn repair(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all =
        vec!["repair", args[0], "--config", config.to_str().unwrap(), "--nodes", "a,b", "--table", "public.docs"];
    all.extend_from_slice(&args[1..]);
    let out = synapse(&all).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn differing(json: &str) -> BTreeSet<i64> {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v[0]["differing"].as_array().unwrap().iter().map(|k| k["key"][0].as_str().unwrap().parse().unwrap()).collect()
}

#[test]
fn fix_makes_a_diverged_one_way_target_equal_to_its_source_while_the_stream_runs() {
    let nodes = Nodes::start(SCHEMA);
    let config = nodes.config("");
    let log = nodes.dir.path().join("synapse.log");
    let _run = spawn_run(&config, &log);
    let rows = "SELECT count(*) || ':' || md5(string_agg(d::text, ',' ORDER BY id)) FROM docs d";
    synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", rows, Duration::from_secs(60)).unwrap();

    // Writes through the pipeline to keys 1000–1999 all along.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, url) = (stop.clone(), nodes.source.url("app"));
        std::thread::spawn(move || {
            let mut c = SyncClient::connect(&url);
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let id = 1000 + n % 1000;
                c.execute("UPDATE docs SET i = i + 1, t = 'moving ' || $1::bigint WHERE id = $2", &[&n, &id]).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // Drift on the target only (as a bug or a hand-made write would leave it).
    nodes
        .target
        .psql(
            "app",
            "UPDATE docs SET t = 'hand edit' WHERE id = 3;
             UPDATE docs SET n = NULL, j = NULL WHERE id = 4;
             UPDATE docs SET big = repeat(md5('toast'), 4000) WHERE id = 5;
             DELETE FROM docs WHERE id IN (6, 7);
             UPDATE docs SET by = '\\x00', arr = '{}', iv = '1 year', ip = '::1' WHERE id = 8;
             UPDATE docs SET ts = ts + interval '1 microsecond', f = 'NaN' WHERE id = 9;
             UPDATE docs SET u = NULL, d = 'infinity' WHERE id = 10;
             INSERT INTO docs (id, t) VALUES (90001, 'only on the target');",
        )
        .unwrap();
    // And a row the source changes with TOAST, replicated normally (not drift).
    nodes.source.psql("app", "UPDATE docs SET big = repeat(md5('source'), 5000) WHERE id = 11").unwrap();

    let (code, out, err) = repair(&config, &["check", "--json"]);
    assert_eq!(code, Some(1), "check must find the drift:\n{out}\n{err}");
    assert_eq!(differing(&out), DRIFT.into_iter().collect(), "{out}");

    // A dry run reports what it would do and changes nothing.
    let (code, out, err) = repair(&config, &["fix", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("would change") && out.contains("deleted 90001"), "{out}");
    assert_eq!(nodes.target.psql("app", "SELECT t FROM docs WHERE id = 3").unwrap(), "hand edit");
    assert_eq!(nodes.target.psql("app", "SELECT count(*) FROM docs WHERE id = 90001").unwrap(), "1");

    let (code, out, err) = repair(&config, &["fix", "--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let fix = &v[0]["fix"]["nodes"][0];
    assert_eq!(fix["node"], "b", "{out}");
    let keys = |field: &str| -> BTreeSet<i64> {
        fix[field].as_array().unwrap().iter().map(|k| k[0].as_str().unwrap().parse().unwrap()).collect()
    };
    assert_eq!(keys("inserted"), [6, 7].into_iter().collect(), "{out}");
    assert_eq!(keys("updated"), [3, 4, 5, 8, 9, 10].into_iter().collect(), "{out}");
    assert_eq!(keys("deleted"), [90_001].into_iter().collect(), "{out}");

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    synapse_localpg::wait_until_equal(&nodes.source, &nodes.target, "app", rows, Duration::from_secs(60)).unwrap();
    let (code, out, err) = repair(&config, &["check"]);
    assert_eq!(code, Some(0), "the nodes must be identical after the fix:\n{out}\n{err}");

    // Nodes that are not one source and its targets: a clear refusal.
    let out = synapse(&[
        "repair",
        "fix",
        "--config",
        config.to_str().unwrap(),
        "--nodes",
        "b,a",
        "--table",
        "public.docs",
        "--prefer",
        "a",
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("--prefer"), "{text}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "synapse panicked:\n{text}");
}
