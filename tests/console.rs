//! The web console in a real browser: Debian's headless Chromium, driven through
//! chromedriver (WebDriver) by fantoccini, against `synapse run` on a two-region mesh of real
//! PostgreSQL clusters with a webhook endpoint. The test signs in (a wrong token is refused),
//! then checks what an operator sees: the real topology with lag that moves, a conflict it
//! produced (both versions and the result), a repair check finding a row it diverged and a
//! fix after the confirmation (the nodes then agree), the endpoint with its attempts and a
//! replay, and a live tail showing a row it inserts. Each page is kept as a screenshot under
//! `<target>/tmp/console-screenshots/`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{request, spawn_run, wait_ready, ADMIN_TOKEN};
use fantoccini::{Client, ClientBuilder, Locator};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use synapse_localpg::{ClusterOptions, LocalCluster};

/// chromedriver and the browser it starts (found by its profile directory), killed with the
/// test even when it fails before closing the browser.
struct Driver {
    child: Child,
    profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill").args(["-9", "-f", &self.profile.path().display().to_string()]).status();
    }
}

fn browser_binaries() -> (PathBuf, PathBuf) {
    let find = |names: &[&str]| {
        names.iter().map(|n| PathBuf::from("/usr/bin").join(n)).find(|p| p.exists()).unwrap_or_else(|| {
            panic!("{names:?} not found in /usr/bin: run scripts/ensure-chromium.sh (scripts/test.sh does)")
        })
    };
    (find(&["chromium", "chromium-browser"]), find(&["chromedriver"]))
}

/// A webhook receiver that answers 204 to everything.
fn receiver() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut got = Vec::new();
                // Read the head, then the body's Content-Length.
                loop {
                    let Ok(n) = conn.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if got.len() >= head_end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            });
        }
    });
    port
}

async fn shot(c: &Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    println!("screenshot: {}", dir.join(format!("{name}.png")).display());
}

/// The text of `css` once `pred` holds for it (up to `secs`).
async fn wait_text(c: &Client, css: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            last = e.text().await.unwrap_or_default();
            if pred(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shot(c, "failed").await;
    let page = c.find(Locator::Css("main")).await.unwrap().text().await.unwrap_or_default();
    panic!("`{css}` never matched; last text: {last:?}\nthe page (screenshot failed.png):\n{page}");
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.unwrap();
}

async fn type_into(c: &Client, css: &str, text: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

#[test]
fn the_console_shows_a_running_mesh_in_chromium() {
    let (chromium, chromedriver) = browser_binaries();
    let nodes: Vec<LocalCluster> = (0..2).map(|_| LocalCluster::start(ClusterOptions::default()).unwrap()).collect();
    for n in &nodes {
        n.create_database("app").unwrap();
        n.psql(
            "app",
            "CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL);
             INSERT INTO accounts SELECT g, 'owner ' || g FROM generate_series(1, 20) g",
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let listen = common::Listeners::new();
    let config = common::two_regions_config(&nodes, "public.accounts", dir.path(), &listen.yaml(""));
    let (ops, api) = (listen.ops.clone(), listen.api.clone());
    let log = dir.path().join("synapse.log");
    let _child = spawn_run(&config, &log);
    wait_ready(&ops, &log, 120);
    let hook =
        format!(r#"{{"name": "audit", "url": "http://127.0.0.1:{}/hook", "tables": ["public.accounts"]}}"#, receiver());
    let (status, body) = request(&api, "POST", "/v1/endpoints", &hook, Some(ADMIN_TOKEN));
    assert_eq!(status, 201, "{body}");

    // A conflict: both regions rename account 1 with both transactions open.
    common::concurrent_renames(&nodes[0], &nodes[1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !request(&api, "GET", "/v1/conflicts", "", Some(ADMIN_TOKEN)).1.contains("alice (eu)") {
        assert!(Instant::now() < deadline, "no conflict logged:\n{}", common::log_tail(&log));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Drift: a write on eu its capture skips (a replication origin of synapse's), so us never
    // receives it — what a repair check must find.
    nodes[1]
        .psql(
            "app",
            "SELECT pg_replication_origin_create('synapse_lost');
             SELECT pg_replication_origin_session_setup('synapse_lost');
             UPDATE accounts SET owner = 'drifted' WHERE id = 7;
             COMMIT;
             SELECT pg_replication_origin_session_reset();",
        )
        .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(browse(&nodes, &api, &chromium, &chromedriver));
}

/// Everything the operator does in the browser (`nodes` are written through psql meanwhile).
async fn browse(nodes: &[LocalCluster], api: &str, chromium: &std::path::Path, chromedriver: &std::path::Path) {
    let write = |i: usize, sql: &str| nodes[i].psql("app", sql).unwrap();
    let port = synapse_localpg::free_port().unwrap();
    let driver = Driver {
        child: Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        profile: tempfile::tempdir().unwrap(),
    };
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100",
                     format!("--user-data-dir={}", driver.profile.path().display())]
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let c = loop {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "chromedriver did not answer: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    // Sign in: a wrong token is refused, the admin token opens the overview.
    c.goto(&format!("http://{api}/console")).await.unwrap();
    type_into(&c, "#token", "not-a-token-0123456789abcdef").await;
    click(&c, "#login-form button").await;
    wait_text(&c, "#login-error", 10, |t| t.contains("Not a valid token")).await;
    type_into(&c, "#token", ADMIN_TOKEN).await;
    click(&c, "#login-form button").await;

    // The topology, with lag that moves while the regions write.
    let nodes_text =
        wait_text(&c, "#nodes tbody", 20, |t| t.contains("us") && t.contains("eu") && t.matches("member").count() == 2)
            .await;
    println!("regions: {nodes_text}");
    wait_text(&c, "#sources tbody", 20, |t| t.matches("streaming").count() == 2).await;
    wait_text(&c, "#appliers tbody", 20, |t| {
        t.contains("us → eu") && t.contains("eu → us") && t.matches("streaming").count() == 2
    })
    .await;
    let first = wait_text(&c, "#sources tbody", 5, |_| true).await;
    for i in 0..20 {
        write(0, &format!("UPDATE accounts SET owner = 'write {i}' WHERE id = 2"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved = wait_text(&c, "#sources tbody", 10, |t| t != first).await;
    println!("sources then: {first}\nsources now: {moved}");
    shot(&c, "overview").await;

    // The conflict, both versions and the result side by side.
    click(&c, "a[href='#conflicts']").await;
    let conflict =
        wait_text(&c, "#conflict-list tbody", 20, |t| t.contains("alice (us)") && t.contains("alice (eu)")).await;
    assert!(conflict.contains("public.accounts") && conflict.contains("update_update"), "{conflict}");
    c.find(Locator::Css("#conflict-list td.winner")).await.expect("the winning version is marked");
    shot(&c, "conflicts").await;

    // Repair: a check finds the drifted row; a fix after the confirmation makes the nodes agree.
    click(&c, "a[href='#repair']").await;
    type_into(&c, "#repair-tables", "public.accounts").await;
    click(&c, "#run-check").await;
    let found = wait_text(&c, "#repair-result", 60, |t| t.contains("differing row")).await;
    assert!(found.contains("public.accounts: 1 differing row"), "{found}");
    wait_text(&c, "table.differing", 5, |t| t.contains("7") && t.contains("eu") && t.contains("us")).await;
    shot(&c, "repair-check").await;
    click(&c, "#fix").await;
    wait_text(&c, "#fix-confirm", 5, |t| t.contains("Yes, fix")).await;
    click(&c, "#fix-yes").await;
    let fixed = wait_text(&c, "#fix-result", 60, |t| t.contains("fixed")).await;
    println!("fix: {fixed}");
    shot(&c, "repair-fix").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let owners: Vec<String> =
            nodes.iter().map(|n| n.psql("app", "SELECT owner FROM accounts WHERE id = 7").unwrap()).collect();
        if owners[0] == owners[1] {
            break;
        }
        assert!(Instant::now() < deadline, "the fix did not make the nodes agree: {owners:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The webhook endpoint, its attempts, a replay.
    click(&c, "a[href='#endpoints']").await;
    wait_text(&c, "#endpoint-list tbody", 20, |t| t.contains("audit") && t.contains("delivering")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        click(&c, "#endpoint-list a").await;
        let attempts = c.find(Locator::Css("#attempts tbody")).await.unwrap().text().await.unwrap_or_default();
        if attempts.contains("204") {
            break;
        }
        assert!(Instant::now() < deadline, "no delivery attempt shown: {attempts:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    type_into(&c, "#replay-since", "2020-01-01T00:00:00Z").await;
    click(&c, "#replay-form button").await;
    wait_text(&c, "#replay-result", 10, |t| t.contains("replaying from")).await;
    shot(&c, "endpoints").await;

    // The live tail shows a row inserted now.
    click(&c, "a[href='#tail']").await;
    wait_text(&c, "#tail-stream", 10, |t| t.contains("us")).await;
    c.find(Locator::Css("#tail-stream option[value='us']")).await.unwrap().click().await.unwrap();
    click(&c, "#tail-start").await;
    wait_text(&c, "#tail-out", 10, |t| t.contains("following us")).await;
    write(0, "INSERT INTO accounts VALUES (4242, 'seen in the tail')");
    let tail = wait_text(&c, "#tail-out", 30, |t| t.contains("seen in the tail")).await;
    println!("tail: {}", tail.lines().next().unwrap_or_default());
    shot(&c, "tail").await;
    click(&c, "#tail-stop").await;

    // Signing out forgets the token: the overview asks for it again.
    click(&c, "#sign-out").await;
    wait_text(&c, "#login-error", 5, |t| t.contains("Signed out")).await;
    c.close().await.unwrap();
}
