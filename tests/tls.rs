//! The whole pipeline over verified TLS: a source and a target that accept only TLS connections
//! (`hostssl`), certificates from a private CA made here, and every connection synapse makes —
//! replication, initial copy, apply, repair, doctor — with `sslmode=verify-full`.
#![allow(clippy::unwrap_used)]

mod common;

use common::mesh::KilledMesh;
use common::{spawn_run, Nodes, ITEMS_SCHEMA};
use std::time::Duration;
use synapse_localpg::certs::TestCa;
use synapse_localpg::ClusterOptions;

/// synapse's sessions on a server: `<without TLS>/<all>`.
const SESSIONS: &str = "SELECT count(*) FILTER (WHERE NOT s.ssl) || '/' || count(*)
     FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'synapse%'";

#[test]
fn the_pipeline_runs_over_verified_tls_only() {
    let ca = TestCa::new("synapse test CA").unwrap();
    let server = ca.issue("localhost", &["localhost"]).unwrap();
    let options = || ClusterOptions {
        tls: Some(server.clone()),
        hba: Some("local all all trust\nhostssl all all 127.0.0.1/32 trust\n".into()),
        ..Default::default()
    };
    let nodes = Nodes::start_with(
        &format!("{ITEMS_SCHEMA}\nINSERT INTO items SELECT g, g FROM generate_series(1, 1000) g;"),
        options,
    );
    let ca_pem = nodes.dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let verified = |url: String| {
        url.replace("@127.0.0.1:", "@localhost:") + &format!("?sslmode=verify-full&sslrootcert={}", ca_pem.display())
    };
    let config = nodes.config("");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&nodes.source.url("app"), &verified(nodes.source.url("app")))
        .replace(&nodes.target.url("app"), &verified(nodes.target.url("app")));
    assert!(text.contains("sslmode=verify-full"), "{text}");
    std::fs::write(&config, text).unwrap();

    let log = nodes.dir.path().join("synapse.log");
    let child = spawn_run(&config, &log);
    nodes.wait_copied(2, Duration::from_secs(60), &log);
    nodes.source.psql("app", "INSERT INTO items VALUES (5000, 1); UPDATE items SET v = 0 WHERE id <= 10").unwrap();
    let q = "SELECT count(*) || ':' || sum(v) FROM items";
    common::wait_equal(&nodes.source, &nodes.target, q, Duration::from_secs(60));
    // Every session synapse holds on both servers is encrypted.
    for node in [&nodes.source, &nodes.target] {
        let sessions = node.psql("postgres", SESSIONS).unwrap();
        assert!(sessions.starts_with("0/") && sessions != "0/0", "plain/all synapse sessions: {sessions}");
    }
    let ours = nodes
        .source
        .psql("postgres", "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE s.ssl")
        .unwrap();
    assert_eq!(ours, "1", "the replication connection is encrypted");

    // Repair and doctor connect the same way.
    let args = ["repair", "check", "--config", config.to_str().unwrap(), "--nodes", "a,b", "--table", "public.items"];
    let out = common::synapse(&args).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let out = common::synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && report.contains("wal_level = logical"), "{report}");
    assert!(report.contains("ok    TLS: sslmode=verify-full"), "{report}");
    drop(child);
}

/// A wrong CA stops only the capture that uses it, with the certificate named and the fix: the
/// error is definite (parked), not retried as a network failure.
#[test]
fn an_untrusted_certificate_parks_the_capture_with_the_fix() {
    let ca = TestCa::new("synapse test CA").unwrap();
    let server = ca.issue("localhost", &["localhost"]).unwrap();
    let options = || ClusterOptions { tls: Some(server.clone()), ..Default::default() };
    let nodes = Nodes::start_with(ITEMS_SCHEMA, options);
    let other = nodes.dir.path().join("other.pem");
    std::fs::write(&other, TestCa::new("another CA").unwrap().pem()).unwrap();
    let config = nodes.config("");
    let source = nodes.source.url("app");
    let wrong =
        source.replace("@127.0.0.1:", "@localhost:") + &format!("?sslmode=verify-full&sslrootcert={}", other.display());
    let ops = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&source, &wrong)
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\""));
    std::fs::write(&config, text).unwrap();
    let log = nodes.dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = reqwest::blocking::get(format!("http://{ops}/readyz")).and_then(|r| r.text()).unwrap_or_default();
        if body.contains("capture/a: parked") {
            assert!(body.contains("UnknownIssuer") || body.contains("unknown issuer"), "{body}");
            assert!(body.contains("sslrootcert"), "the fix names sslrootcert: {body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A three-region mesh whose nodes accept only TLS, every link `verify-full`: writes on each
/// node reach the other two.
#[test]
fn a_mesh_runs_over_verified_tls_only() {
    let ca = TestCa::new("synapse test CA").unwrap();
    let server = ca.issue("localhost", &["localhost"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let options = || ClusterOptions {
        tls: Some(server.clone()),
        hba: Some("local all all trust\nhostssl all all 127.0.0.1/32 trust\n".into()),
        ..Default::default()
    };
    let url = |n: &synapse_localpg::LocalCluster| {
        format!("postgres://postgres@localhost:{}/app?sslmode=verify-full&sslrootcert={}", n.port(), ca_pem.display())
    };
    let mesh =
        KilledMesh::new_with("CREATE TABLE t (id int PRIMARY KEY, v text)", "  tables: [public.t]\n", options, url);
    let _child = mesh.start(1);
    for i in 0..3 {
        mesh.sql(i, &format!("INSERT INTO t VALUES ({i}, 'from u{i}')"));
    }
    mesh.wait_all("rows from every region", "SELECT string_agg(v, ',' ORDER BY id) FROM t", "from u0,from u1,from u2");
    for i in 0..3 {
        let sessions = mesh.sql(i, SESSIONS);
        assert!(sessions.starts_with("0/") && sessions != "0/0", "node u{i}: plain/all synapse sessions: {sessions}");
    }
}

/// doctor warns when a connection to another machine does not verify the server.
#[test]
fn doctor_warns_about_unverified_tls_to_another_machine() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("synapse.yaml");
    std::fs::write(
        &config,
        "sources:\n  - name: a\n    url: postgres://u@db.example.invalid:5432/app?connect_timeout=2\nops:\n  listen: \"\"\n",
    )
    .unwrap();
    let out = common::synapse(&["doctor", "--config", config.to_str().unwrap()]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("warn  TLS: sslmode=prefer to another machine does not verify the server"), "{report}");
    assert!(report.contains("sslmode=verify-full&sslrootcert="), "{report}");
}

/// Synapse's own listeners over TLS (`api.tls`, `ops.tls`): HTTPS with the configured
/// certificate, nothing in clear; a renewed certificate written over the files is served to
/// new connections without a restart; a broken renewal keeps the previous one; `synapse
/// resume --cacert` speaks HTTPS to the API.
#[test]
fn the_listeners_serve_tls_and_pick_up_a_renewed_certificate() {
    let ca = TestCa::new("synapse test CA").unwrap();
    let nodes = Nodes::start(ITEMS_SCHEMA);
    let dir = nodes.dir.path();
    let (cert, key, ca_file) = (dir.join("api.crt"), dir.join("api.key"), dir.join("ca.pem"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let install = |cn: &str| {
        let issued = ca.issue(cn, &["localhost"]).unwrap();
        std::fs::write(&key, issued.key_pem).unwrap();
        std::fs::write(&cert, issued.cert_pem).unwrap();
    };
    install("listener-one");
    let api = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let ops = format!("127.0.0.1:{}", synapse_localpg::free_port().unwrap());
    let tls = format!("\n  tls:\n    cert: {}\n    key: {}", cert.display(), key.display());
    let config = nodes.config("");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("api:\n  listen: \"\"", &format!("api:\n  listen: \"{api}\"{tls}"))
        .replace("ops:\n  listen: \"\"", &format!("ops:\n  listen: \"{ops}\"{tls}"));
    std::fs::write(&config, text).unwrap();
    let log = dir.join("synapse.log");
    let child = spawn_run(&config, &log);

    // A client that trusts the test CA and reports the certificate it was served.
    let client = |addr: &str| {
        let socket: std::net::SocketAddr = addr.parse().unwrap();
        reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_info(true)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
            .resolve("localhost", socket)
            .build()
            .unwrap()
    };
    let served = |addr: &str, path: &str| -> Option<(u16, String)> {
        let port = addr.rsplit(':').next().unwrap();
        let r = client(addr).get(format!("https://localhost:{port}{path}")).send().ok()?;
        let info = r.extensions().get::<reqwest::tls::TlsInfo>()?;
        let der = info.peer_certificate()?.to_vec();
        let cn =
            ["listener-one", "listener-two"].into_iter().find(|cn| der.windows(cn.len()).any(|w| w == cn.as_bytes()));
        Some((r.status().as_u16(), cn.unwrap_or("?").to_owned()))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while served(&ops, "/readyz?strict").is_none_or(|(s, _)| s != 200) {
        assert!(std::time::Instant::now() < deadline, "ops never ready over TLS:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(served(&api, "/v1/streams"), Some((200, "listener-one".into())));
    assert_eq!(served(&ops, "/livez"), Some((200, "listener-one".into())));
    // Nothing in clear: a plain HTTP request gets no HTTP answer.
    let plain = reqwest::blocking::get(format!("http://{api}/v1/streams"));
    assert!(plain.is_err(), "the API answered in clear: {plain:?}");
    // A client that does not trust the CA is refused by its own check (the server is not
    // someone else's).
    let port = api.rsplit(':').next().unwrap();
    let untrusting = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .resolve("localhost", api.parse().unwrap())
        .build()
        .unwrap();
    assert!(untrusting.get(format!("https://localhost:{port}/v1/streams")).send().is_err());

    // Renewed in place: new connections get the new certificate, no restart.
    std::thread::sleep(Duration::from_millis(1100)); // a new modification time
    install("listener-two");
    // Each listener looks at the files on its own schedule: wait for both.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while served(&api, "/v1/streams") != Some((200, "listener-two".into()))
        || served(&ops, "/livez") != Some((200, "listener-two".into()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate is not served:\n{}",
            common::log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A broken renewal: the previous certificate stays, the log says why.
    std::fs::write(&cert, "not a certificate").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(served(&api, "/v1/streams"), Some((200, "listener-two".into())));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the renewed TLS certificate cannot be used"), "{}", common::log_tail(&log));

    // The CLI speaks HTTPS to the API.
    let out = common::synapse(&["resume", "--config", config.to_str().unwrap(), "--cacert", ca_file.to_str().unwrap()])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.contains("nothing is parked"), "{said}");
    drop(child);
}
