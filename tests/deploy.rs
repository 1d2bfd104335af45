//! deploy/ checked without a container engine: the compose file and the Kubernetes manifests
//! against their schemas (scripts/validate-deploy.sh, which must also reject broken copies), the
//! synapse configurations they carry through `synapse validate`, the systemd unit through
//! `systemd-analyze verify` (which must print no warning), the Prometheus alert rules through
//! `promtool check rules` and their unit tests through `promtool test rules`, and the Grafana
//! dashboard's queries through promtool (as recording rules) and the metric catalog.
#![allow(clippy::unwrap_used)]

mod common;

use serde::Deserialize;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn validate_deploy(env: &[(&str, &Path)]) -> (bool, String) {
    let mut c = Command::new("bash");
    c.arg(Path::new(ROOT).join("scripts/validate-deploy.sh"));
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn compose_and_kubernetes_files_match_their_schemas() {
    let (ok, text) = validate_deploy(&[]);
    assert!(ok, "{text}");
    assert!(text.contains("valid against the Compose Specification"), "{text}");
    assert!(text.contains("deployment/synapse"), "{text}");

    // The validators do reject what is wrong.
    let dir = tempfile::tempdir().unwrap();
    let compose = std::fs::read_to_string(Path::new(ROOT).join("deploy/compose/compose.yaml")).unwrap();
    let bad_compose = dir.path().join("compose.yaml");
    std::fs::write(&bad_compose, compose.replacen("    restart: unless-stopped", "    restartt: always", 1)).unwrap();
    let (ok, text) = validate_deploy(&[("SYNAPSE_COMPOSE_FILES", &bad_compose)]);
    assert!(!ok && text.contains("restartt"), "a misspelt compose key passed: {text}");
    let k8s = std::fs::read_to_string(Path::new(ROOT).join("deploy/kubernetes/synapse.yaml")).unwrap();
    let bad_k8s = dir.path().join("k8s.yaml");
    std::fs::write(&bad_k8s, k8s.replacen("  replicas: 1", "  replicas: one", 1)).unwrap();
    let (ok, text) = validate_deploy(&[("SYNAPSE_K8S_FILES", &bad_k8s)]);
    assert!(!ok, "replicas: one passed: {text}");
}

#[test]
fn the_configurations_in_deploy_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    // The ConfigMap's synapse.yaml.
    let k8s = std::fs::read_to_string(Path::new(ROOT).join("deploy/kubernetes/synapse.yaml")).unwrap();
    let config = yaml_serde::Deserializer::from_str(&k8s)
        .map(|d| yaml_serde::Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "ConfigMap")
        .map(|d| d["data"]["synapse.yaml"].as_str().unwrap().to_owned())
        .unwrap();
    let path = dir.path().join("k8s-synapse.yaml");
    std::fs::write(&path, config).unwrap();
    let env = [
        ("SOURCE_PASSWORD", "s"),
        ("TARGET_PASSWORD", "t"),
        ("KAFKA_PASSWORD", "k"),
        ("ADMIN_TOKEN", "admin-token-0123456789abcdef"),
    ];
    common::validate_config(&path, &env);
    common::validate_config(
        &Path::new(ROOT).join("deploy/compose/synapse.yaml"),
        &[("PG_PASSWORD", "p"), ("SYNAPSE_ADMIN_TOKEN", "admin-token-0123456789abcdef")],
    );
}

#[test]
fn the_systemd_unit_verifies_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/synapse.service")).unwrap();
    // The unit's paths and user exist on an installed host; here: this build and root.
    let unit = unit
        .replace("/usr/local/bin/synapse", env!("CARGO_BIN_EXE_synapse"))
        .replace("User=synapse", "User=root")
        .replace("Group=synapse", "Group=root");
    let path = dir.path().join("synapse.service");
    std::fs::write(&path, &unit).unwrap();
    let verify = |p: &Path| {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(p)
            .output()
            .expect("systemd-analyze (Debian package systemd) is needed to check deploy/systemd/synapse.service");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, warnings) = verify(&path);
    assert!(ok && warnings.trim().is_empty(), "{warnings}");
    let bad = dir.path().join("bad.service");
    std::fs::write(&bad, unit.replace("Restart=on-failure", "Restartt=on-failure")).unwrap();
    let (_, warnings) = verify(&bad);
    assert!(warnings.contains("Restartt"), "a misspelt key went unnoticed: {warnings}");
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let found = Command::new("bash").arg(Path::new(ROOT).join("scripts/ensure-promtool.sh")).output().unwrap();
    assert!(found.status.success(), "{}", String::from_utf8_lossy(&found.stderr));
    let bin = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    let out = Command::new(bin).args(args).current_dir(dir).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// The alert rules are valid, fire as their unit tests say (and a wrong expectation fails),
/// and name only metrics synapse exports.
#[test]
fn the_alert_rules_check_and_pass_their_tests() {
    let rules = Path::new(ROOT).join("deploy/prometheus");
    let (ok, text) = promtool(&["check", "rules", "alerts.yml"], &rules);
    assert!(ok && text.contains("SUCCESS"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yml"], &rules);
    assert!(ok && text.contains("SUCCESS"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let alerts = std::fs::read_to_string(rules.join("alerts.yml")).unwrap();
    std::fs::write(dir.path().join("alerts.yml"), alerts.replacen("for: 2m", "for: 20m", 2)).unwrap();
    std::fs::copy(rules.join("alerts.test.yml"), dir.path().join("alerts.test.yml")).unwrap();
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yml"], dir.path());
    assert!(!ok && text.contains("SynapseComponentParked"), "a slower alert passed its tests: {text}");
    std::fs::write(dir.path().join("alerts.yml"), alerts.replacen("expr: max by", "expr: max by by", 1)).unwrap();
    let (ok, text) = promtool(&["check", "rules", "alerts.yml"], dir.path());
    assert!(!ok, "a broken expression passed: {text}");

    let names = regex_lite::Regex::new(r"synapse_[a-z_]+").unwrap();
    for m in names.find_iter(&alerts) {
        assert!(exported(m.as_str()), "alerts.yml names {}, which synapse does not export", m.as_str());
    }
}

/// Synapse's metric a query names: a histogram's `_bucket`/`_sum`/`_count` series are its own.
fn exported(name: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    synapse_runtime::metric_catalog::METRICS.iter().any(|(n, _, _)| *n == name || *n == base)
}

/// Every panel of the Grafana dashboard queries valid PromQL (checked by promtool as recording
/// rules) over metrics synapse exports.
#[test]
fn the_grafana_dashboard_queries_exported_metrics() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/synapse.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let names = regex_lite::Regex::new(r"synapse_[a-z_]+").unwrap();
    for e in &exprs {
        let found: Vec<&str> = names.find_iter(e).map(|m| m.as_str()).collect();
        assert!(!found.is_empty(), "{e} queries no synapse metric");
        for n in found {
            assert!(exported(n), "the dashboard queries {n}, which synapse does not export ({e})");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let rules: String = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            format!("      - record: dashboard:panel_{i}\n        expr: {}\n", serde_json::to_string(e).unwrap())
        })
        .collect();
    std::fs::write(dir.path().join("panels.yml"), format!("groups:\n  - name: panels\n    rules:\n{rules}")).unwrap();
    let (ok, text) = promtool(&["check", "rules", "panels.yml"], dir.path());
    assert!(ok, "{text}");
    std::fs::write(
        dir.path().join("bad.yml"),
        "groups:\n  - name: panels\n    rules:\n      - record: x\n        expr: \"sum by by (a) (x)\"\n",
    )
    .unwrap();
    assert!(!promtool(&["check", "rules", "bad.yml"], dir.path()).0, "promtool passed a broken query");
}

/// No Docker engine here to build the image: what keeps it small and its build context lean is
/// checked instead — `target/` and `.git/` out of the context, the binary stripped, the builder's
/// caches mounted rather than copied.
#[test]
fn the_image_build_leaves_build_output_out_and_strips_the_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let entries: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    for must in ["target/", ".git/", "fuzz/target/"] {
        assert!(entries.contains(&must), ".dockerignore lacks {must}: {entries:?}");
    }
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("profile.release.strip=true"), "the image's binary is not stripped");
    assert!(dockerfile.contains("--mount=type=cache,target=/src/target"), "dependencies are rebuilt on every change");
    assert!(dockerfile.contains("--locked"), "the image must build the locked dependencies");
}

/// The Helm chart renders (default values and each example) into manifests valid against
/// Kubernetes' schemas (scripts/validate-deploy.sh); the synapse configuration each ConfigMap
/// carries passes `synapse validate`; the ServiceMonitor selects the Service and names a port
/// it has; secrets come from an existing Secret when one is named, and no Secret is made then;
/// a broken template fails the check.
#[test]
fn the_helm_chart_renders_into_valid_manifests() {
    let out = tempfile::tempdir().unwrap();
    let (ok, text) = validate_deploy(&[("SYNAPSE_HELM_OUT", out.path())]);
    assert!(ok, "{text}");
    assert!(text.contains("rendered and valid"), "{text}");
    let tls = tempfile::tempdir().unwrap();
    let ca = synapse_localpg::certs::TestCa::new("synapse test CA").unwrap();
    let issued = ca.issue("localhost", &["localhost"]).unwrap();
    std::fs::write(tls.path().join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(tls.path().join("tls.crt"), &issued.cert_pem).unwrap();
    std::fs::write(tls.path().join("tls.key"), &issued.key_pem).unwrap();
    let mut rendered: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().path()).collect();
    rendered.sort();
    assert!(rendered.len() >= 2, "{rendered:?}");
    let env = [
        ("SOURCE_PASSWORD", "x"),
        ("TARGET_PASSWORD", "x"),
        ("ADMIN_TOKEN", "a-long-random-token-0123456789"),
        ("US_PASSWORD", "x"),
        ("EU_PASSWORD", "x"),
        ("AP_PASSWORD", "x"),
        ("ADMIN_TOKEN_SHA256", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
        ("APP_TOKEN", "another-long-random-token-0123"),
    ];
    for file in &rendered {
        let docs: Vec<serde_json::Value> = yaml_serde::Deserializer::from_str(&std::fs::read_to_string(file).unwrap())
            .map(|d| serde_json::Value::deserialize(d).unwrap())
            .filter(|d| !d.is_null())
            .collect();
        let of = |kind: &str| docs.iter().find(|d| d["kind"] == kind).cloned();
        // The TLS Secret's files where the pod mounts them: here, a directory of test ones.
        let config = of("ConfigMap").unwrap()["data"]["synapse.yaml"]
            .as_str()
            .unwrap()
            .replace("/etc/synapse/tls/", &format!("{}/", tls.path().display()));
        let path = out.path().join(format!("{}.synapse.yaml", file.file_name().unwrap().to_string_lossy()));
        std::fs::write(&path, config).unwrap();
        let checked = common::validate_config(&path, &env);
        println!("{}: {checked}", file.display());
        let deployment = of("Deployment").unwrap();
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(deployment["spec"]["replicas"], 1, "one reader per slot");
        assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
        let container = &pod["containers"][0];
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert!(container[probe]["httpGet"]["path"].is_string(), "{probe} in {}", file.display());
        }
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        let service = of("Service").unwrap();
        if let Some(monitor) = of("ServiceMonitor") {
            let wanted = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
            for (k, v) in wanted {
                assert_eq!(&service["metadata"]["labels"][k], v, "the ServiceMonitor selects the Service ({k})");
            }
            let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
            assert!(service["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == port), "port {port}");
        }
        let secret_ref = container["envFrom"][0]["secretRef"]["name"].as_str().unwrap_or_default().to_owned();
        if file.ends_with("mesh-values.yaml") {
            assert_eq!(secret_ref, "synapse-mesh-credentials", "the existing Secret");
            assert!(of("Secret").is_none(), "no Secret made when an existing one is named");
            assert!(pod["volumes"].as_array().unwrap().iter().any(|v| v["secret"]["secretName"] == "synapse-tls"));
        }
        assert!(of("NetworkPolicy").is_some(), "{}", file.display());
    }

    // A broken template is caught.
    let chart = tempfile::tempdir().unwrap();
    let copy = chart.path().join("synapse");
    std::fs::create_dir_all(copy.join("templates")).unwrap();
    for entry in std::fs::read_dir(Path::new(ROOT).join("deploy/helm/synapse/templates")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, copy.join("templates").join(p.file_name().unwrap())).unwrap();
    }
    for f in ["Chart.yaml", "values.yaml"] {
        std::fs::copy(Path::new(ROOT).join("deploy/helm/synapse").join(f), copy.join(f)).unwrap();
    }
    let deployment = std::fs::read_to_string(copy.join("templates/deployment.yaml")).unwrap();
    std::fs::write(copy.join("templates/deployment.yaml"), deployment.replacen("  strategy:", "  strategyy:", 1))
        .unwrap();
    let (ok, text) =
        validate_deploy(&[("SYNAPSE_HELM_CHART", &copy), ("SYNAPSE_HELM_OUT", chart.path().join("out").as_path())]);
    assert!(!ok && text.contains("strategyy"), "a misspelt field in the chart passed: {text}");
}
