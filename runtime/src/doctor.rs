//! `synapse doctor`: checks each source and target for what replication needs, and prints the
//! fix for every failed check.

use crate::config::Config;
use synapse_capture::catalog;
use synapse_error::Classify;

struct Report {
    failed: usize,
}

impl Report {
    fn ok(&self, what: &str) {
        println!("  ok    {what}");
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.failed += 1;
        println!("  FAIL  {what}\n        fix: {fix}");
    }
    fn warn(&self, what: &str, fix: &str) {
        println!("  warn  {what}\n        fix: {fix}");
    }
}

/// Warns when a connection to another machine does not verify the server (sslmode below
/// verify-full): encrypted at best, but open to a man in the middle.
fn check_tls(r: &Report, pg: &synapse_postgres::PgConfig, field: &str) {
    use synapse_postgres::tls::SslMode;
    let remote = pg.get_hosts().iter().any(|h| match h {
        tokio_postgres::config::Host::Tcp(h) => {
            !(h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()))
        }
        tokio_postgres::config::Host::Unix(_) => false,
    });
    match pg.ssl_mode() {
        SslMode::VerifyFull => r.ok("TLS: sslmode=verify-full"),
        mode if remote => r.warn(
            &format!("TLS: sslmode={mode} to another machine does not verify the server"),
            &format!("add sslmode=verify-full&sslrootcert=<the server's CA file> to {field}"),
        ),
        _ => {}
    }
}

/// Returns the number of failed checks.
pub async fn run(config: &Config) -> usize {
    let mut r = Report { failed: 0 };
    for s in &config.sources {
        println!("source {} ({})", s.name, s.url);
        let Ok(pg) = s.url.pg_config() else { continue };
        check_tls(&r, &pg, "sources[].url");
        let client = match synapse_postgres::connect(&pg, "doctor").await {
            Ok(client) => client,
            Err(e) => {
                r.fail(
                    &format!("connect: {}", crate::pipeline::chain(&e)),
                    "check sources[].url, that the server is up and pg_hba.conf admits this host",
                );
                continue;
            }
        };
        let setting = |name: &'static str| {
            let c = &client;
            async move {
                c.query_one("SELECT current_setting($1)", &[&name])
                    .await
                    .map(|row| row.get::<_, String>(0))
                    .unwrap_or_default()
            }
        };
        let wal_level = setting("wal_level").await;
        if wal_level == "logical" {
            r.ok("wal_level = logical");
        } else {
            r.fail(
                &format!("wal_level = {wal_level}"),
                "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
            );
        }
        let role = client
            .query_one("SELECT rolname, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[])
            .await;
        match role {
            Ok(row) if row.get::<_, bool>(1) => r.ok(&format!("role {} may replicate", row.get::<_, String>(0))),
            Ok(row) => {
                let name: String = row.get(0);
                r.fail(
                    &format!("role {name} lacks the REPLICATION attribute"),
                    &format!("ALTER ROLE {name} REPLICATION;"),
                )
            }
            Err(e) => r.fail(&format!("reading role: {e}"), "grant the role access to pg_roles"),
        }
        // Schema changes are captured by an event trigger, which only a superuser may create.
        let ddl = client
            .query_one(
                "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                     OR EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'synapse_ddl_end')",
                &[],
            )
            .await;
        match ddl {
            Ok(row) if row.get::<_, bool>(0) => r.ok("schema changes are captured (event trigger)"),
            Ok(_) => r.warn(
                "schema changes will not be captured (CAP012): creating event triggers needs a superuser",
                "have a superuser run synapse once, or install synapse.capture_ddl as in the README \
                 (Schema changes); until then run each migration on every target too",
            ),
            Err(e) => r.fail(&format!("reading role: {e}"), "grant the role access to pg_roles"),
        }
        let slots: i64 = client
            .query_one(
                "SELECT current_setting('max_replication_slots')::int8 - (SELECT count(*) FROM pg_replication_slots)",
                &[],
            )
            .await
            .map(|row| row.get(0))
            .unwrap_or(0);
        let slot =
            s.slot.clone().unwrap_or_else(|| crate::pipeline::capture_config(s).map(|c| c.slot).unwrap_or_default());
        let state = catalog::slot_state(&client, &slot).await.ok().flatten();
        match &state {
            Some(st) => {
                let lag = st.lag_bytes.unwrap_or(0);
                let msg =
                    format!("slot {slot} exists, {} , lag {lag} bytes", if st.active { "active" } else { "inactive" });
                let limit = s.max_slot_lag_bytes.unwrap_or(1 << 30);
                if st.wal_status.as_deref() == Some("lost") {
                    r.fail(
                        &format!("slot {slot} was invalidated (wal_status = lost)"),
                        "synapse reports it as a gap (CAP011); see README \"When things fail\"",
                    );
                } else if lag.max(0) as u64 > limit {
                    r.warn(&msg, &format!("the slot retains more WAL than {limit} bytes (max_slot_lag_bytes, default 1 GiB): start synapse, or drop the slot if this source is abandoned (SELECT pg_drop_replication_slot(...)); max_slot_wal_keep_size on the source bounds what a stalled slot can hold"));
                } else {
                    r.ok(&msg);
                }
            }
            None if slots > 1 => r.ok(&format!("slot {slot} will be created ({slots} free slots)")),
            None => r.fail(
                "no free replication slot (synapse needs one, plus one during the initial copy)",
                "raise max_replication_slots and restart PostgreSQL",
            ),
        }
        let publication =
            client.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&s.publication]).await.ok().flatten();
        match (publication.is_some(), s.create_publication) {
            (true, _) => r.ok(&format!("publication {} exists", s.publication)),
            (false, true) => r.ok(&format!("publication {} will be created", s.publication)),
            (false, false) => r.fail(
                &format!("publication {} is missing", s.publication),
                &format!("CREATE PUBLICATION {} FOR TABLE …; or set create_publication: true", s.publication),
            ),
        }
        let (role, db): (String, String) = client
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await
            .map(|row| (row.get(0), row.get(1)))
            .unwrap_or_default();
        if publication.is_none() && s.create_publication {
            // CREATE PUBLICATION needs CREATE on the database (and owning the tables).
            let may = client
                .query_one(
                    "SELECT has_database_privilege(current_database(), 'CREATE') OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
                    &[],
                )
                .await
                .map(|row| row.get::<_, bool>(0));
            if let Err(e) = &may {
                r.fail(&format!("reading the database privileges: {}", crate::pipeline::chain(e)), "see the error");
            } else if may.is_ok_and(|m| m) {
                r.ok(&format!("role {role} may create publication {}", s.publication));
            } else {
                r.fail(
                    &format!("role {role} may not create publication {} (no CREATE on database {db})", s.publication),
                    &format!(
                        "GRANT CREATE ON DATABASE {} TO {}; (the role must also own the tables), or create the publication as their owner and set create_publication: false",
                        synapse_postgres::quote::ident(&db),
                        synapse_postgres::quote::ident(&role)
                    ),
                );
            }
        }
        match catalog::select_tables(&client, &s.tables).await {
            Ok((ok, bad)) => {
                r.ok(&format!("{} tables have a primary key or replica identity", ok.len()));
                // The initial copy reads every captured table.
                for t in &ok {
                    let readable = client
                        .query_one("SELECT has_table_privilege($1::oid, 'SELECT')", &[&t.oid])
                        .await
                        .map(|row| row.get::<_, bool>(0));
                    if let Err(e) = &readable {
                        r.fail(
                            &format!("reading the privileges on {}: {}", t.display(), crate::pipeline::chain(e)),
                            "see the error",
                        );
                    } else if readable.is_ok_and(|ok| !ok) {
                        r.fail(
                            &format!("role {role} may not read table {} (the initial copy reads it)", t.display()),
                            &format!("GRANT SELECT ON {} TO {};", t.quoted(), synapse_postgres::quote::ident(&role)),
                        );
                    }
                }
                for t in bad {
                    r.fail(
                        &format!("table {t} has no primary key or replica identity"),
                        &format!("ALTER TABLE {t} ADD PRIMARY KEY (…); or ALTER TABLE {t} REPLICA IDENTITY FULL;"),
                    );
                }
            }
            Err(e) => r.fail(&crate::pipeline::chain(&e), e.hint()),
        }
    }
    for t in &config.targets {
        println!("target {} ({})", t.name, t.url);
        let Ok(pg) = t.url.pg_config() else { continue };
        check_tls(&r, &pg, "targets[].url");
        match synapse_postgres::connect(&pg, "doctor").await {
            Ok(client) => {
                r.ok("connect");
                match client.query_one("SELECT has_database_privilege(current_database(), 'CREATE'), (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)", &[]).await {
                    Ok(row) if row.get::<_, bool>(0) => r.ok("may create the synapse schema"),
                    _ => r.fail("cannot create schemas in the target database", "GRANT CREATE ON DATABASE … TO the target user"),
                }
                if let Ok(row) =
                    client.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[]).await
                {
                    if !row.get::<_, bool>(0) {
                        r.warn("target user is not a superuser", "session_replication_role and replication origins need superuser (or pg_replication_origin_* grants on PG 15)");
                    }
                }
            }
            Err(e) => r.fail(
                &format!("connect: {}", crate::pipeline::chain(&e)),
                "check targets[].url and that the server is up",
            ),
        }
    }
    let egress = std::sync::Arc::new(config.egress.policy());
    for w in &config.webhooks {
        println!("webhook {} ({})", w.name, synapse_connectors::webhook::redact_url(&w.url));
        check_webhook(&mut r, &w.url, &egress).await;
    }
    r.failed
}

/// An endpoint is reachable when something answers HTTP there. No event is sent: receivers see
/// a HEAD request, which Standard Webhooks receivers ignore or reject without side effects.
async fn check_webhook(
    r: &mut Report,
    url: &str,
    egress: &std::sync::Arc<synapse_connectors::webhook::egress::EgressPolicy>,
) {
    if let Some(refused) = url.parse().ok().and_then(|u| egress.check_url(&u).err()) {
        return r.fail(refused, "allow the endpoint's network in egress.allow, or use a public address");
    }
    let client = match egress.client_builder().timeout(std::time::Duration::from_secs(10)).build() {
        Ok(c) => c,
        Err(e) => return r.fail(&format!("HTTP client: {e}"), "report this as a bug"),
    };
    match client.head(url).send().await {
        Ok(resp) if resp.status() == reqwest::StatusCode::GONE => r.fail(
            "the endpoint answers 410 Gone: deliveries would disable it",
            "fix the URL, or remove the endpoint from webhooks",
        ),
        Ok(resp) => r.ok(&format!("reachable (HEAD answered {})", resp.status())),
        Err(e) => r.fail(
            &format!("unreachable: {}", crate::pipeline::chain(&e.without_url())),
            "check webhooks[].url, DNS and firewalls; synapse will retry and open the breaker meanwhile",
        ),
    }
}
