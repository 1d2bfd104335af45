//! The replication scenarios (P1, P2, P3, P7, P8 and their Kafka variants): one round on three
//! local clusters, SynapseDB and PostgreSQL's own tool on the same work.

use crate::*;

/// The parts of a round that every catch-up scenario uses.
struct Round<'a> {
    source: &'a Client,
    source_url: &'a str,
    pg_target: &'a Client,
    syn_target: &'a Client,
    /// A session on the baseline target that holds its apply worker back with a table lock
    /// (`Method::Decoupled` only).
    lock: &'a Client,
    /// The same on synapse's target.
    syn_lock: &'a Client,
    method: Method,
    config: &'a Path,
    log: &'a Path,
    listen: &'a str,
    work: &'a Path,
    profile: bool,
}

struct CatchUp {
    baseline_secs: f64,
    synapse_secs: f64,
    /// `Method::Live`: seconds from the workload's end to its marker applied (baseline, synapse).
    lag_at_end: Option<(f64, f64)>,
    /// The source WAL position right after the workload.
    end_lsn: String,
}

impl CatchUp {
    /// `Method::Live`: what each side still had to apply when the workload ended.
    fn print_lag(&self, label: &str) {
        if let Some((baseline, synapse)) = self.lag_at_end {
            println!(
                "{label} lag when the workload ended: synapse {synapse:.2}s, publication/subscription {baseline:.2}s"
            );
        }
    }
}

/// P4's commit → applied latencies on each side, in milliseconds: (p25, p50, p75, p99).
pub(crate) struct Latency {
    pub baseline: [f64; 4],
    pub synapse: [f64; 4],
    /// Transactions per second the writers achieved (the offered rate, if the machine kept up).
    pub achieved_rate: f64,
    pub txns: u64,
    /// Synapse's tail: the runs of transactions applied more than [`STALL_MS`] late, and the
    /// stage calls that took over 25 ms.
    pub tail: String,
}

/// P4: a transaction applied this late is part of a stall (the tail the p99 reports).
const STALL_MS: f64 = 20.0;

impl Round<'_> {
    /// Runs `workload` on the source and times both replicators until `marker` arrives on each
    /// target, by `self.method` (see [`Method`]).
    async fn catch_up(&self, label: &str, table: &str, workload: &str, marker: i32) -> anyhow::Result<CatchUp> {
        match self.method {
            Method::Backlog => self.backlog(label, workload, marker).await,
            Method::Live => self.live(label, workload, marker).await,
            Method::Decoupled => self.decoupled(label, table, workload, marker).await,
        }
    }

    /// Both replicators are stopped while the workload runs (the baseline's subscription
    /// disabled, synapse not running); then each is started and timed alone until the marker
    /// is applied, start-up included: the same WAL backlog for both.
    async fn backlog(&self, label: &str, workload: &str, marker: i32) -> anyhow::Result<CatchUp> {
        self.settle_slots().await?;
        self.set_subscription(false).await?;
        self.source.batch_execute(workload).await?;
        let end_lsn = self.write_marker(marker, label).await?;
        let cpu = cpu_jiffies();
        let t = Instant::now();
        self.set_subscription(true).await?;
        wait_marker(self.pg_target, marker, Duration::from_secs(1800)).await?;
        let baseline_secs = t.elapsed().as_secs_f64();
        let baseline_busy = busy_since(cpu);
        let baseline_cpu = side_cpu(self.source, self.pg_target, None).await?;
        let perf = start_profile(self.profile, &self.work.join(format!("{label}.perf")));
        let cpu = cpu_jiffies();
        let t = Instant::now();
        let mut child = spawn_synapse(self.config, self.log)?;
        wait_marker(self.syn_target, marker, Duration::from_secs(1800)).await?;
        let synapse_secs = t.elapsed().as_secs_f64();
        let synapse_busy = busy_since(cpu);
        let synapse_cpu = side_cpu(self.source, self.syn_target, Some(child.id())).await?;
        stop_profile(perf)?;
        // Whether the machine had cores to spare: on two cores, a side that keeps both busy
        // is bound by the work it does, not by waiting.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "{label} machine CPU (every process): baseline {:.1} core-s over {baseline_secs:.2} s ({:.0} % busy); \
             synapse {:.1} core-s over {synapse_secs:.2} s ({:.0} % busy)",
            baseline_busy * cores * baseline_secs,
            baseline_busy * 100.0,
            synapse_busy * cores * synapse_secs,
            synapse_busy * 100.0
        );
        println!("{label} CPU by process, core-seconds: baseline {baseline_cpu}; synapse {synapse_cpu}");
        self.report_stages(label, synapse_secs, &mut child)?;
        Ok(CatchUp { baseline_secs, synapse_secs, lag_at_end: None, end_lsn })
    }

    /// Both replicate while the workload runs: each side's time from the workload's start to
    /// its marker applied, and the lag left when the workload ends.
    async fn live(&self, label: &str, workload: &str, marker: i32) -> anyhow::Result<CatchUp> {
        let mut child = spawn_synapse(self.config, self.log)?;
        // Both caught up and idle before the clock starts.
        self.write_marker(marker + 100, label).await?;
        wait_marker(self.pg_target, marker + 100, Duration::from_secs(300)).await?;
        wait_marker(self.syn_target, marker + 100, Duration::from_secs(300)).await?;
        let perf = start_profile(self.profile, &self.work.join(format!("{label}.perf")));
        let t = Instant::now();
        let pg = async {
            wait_marker(self.pg_target, marker, Duration::from_secs(1800)).await.map(|_| t.elapsed().as_secs_f64())
        };
        let syn = async {
            wait_marker(self.syn_target, marker, Duration::from_secs(1800)).await.map(|_| t.elapsed().as_secs_f64())
        };
        let work = async {
            self.source.batch_execute(workload).await?;
            let end = t.elapsed().as_secs_f64();
            let lsn = self.write_marker(marker, label).await?;
            anyhow::Ok((end, lsn))
        };
        let (baseline_secs, synapse_secs, (end, end_lsn)) = tokio::try_join!(pg, syn, work)?;
        stop_profile(perf)?;
        self.report_stages(label, synapse_secs, &mut child)?;
        Ok(CatchUp {
            baseline_secs,
            synapse_secs,
            lag_at_end: Some((baseline_secs - end, synapse_secs - end)),
            end_lsn,
        })
    }

    /// Each applier held back by a lock on its target table while capture runs: the
    /// walsender feeding the baseline stops once its socket is full, synapse's capture keeps
    /// writing its durable log, so synapse starts with the WAL decoded ("capture decoupled").
    async fn decoupled(&self, label: &str, table: &str, workload: &str, marker: i32) -> anyhow::Result<CatchUp> {
        let lock_stmt = format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
        self.lock.batch_execute(&lock_stmt).await?;
        self.syn_lock.batch_execute(&lock_stmt).await?;
        let mut child = spawn_synapse(self.config, self.log)?;
        self.source.batch_execute(workload).await?;
        let before_marker: String = self.source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        let end_lsn = self.write_marker(marker, label).await?;
        // Capture has made everything durable in the log before either clock starts.
        let deadline = Instant::now() + Duration::from_secs(1800);
        while !self
            .source
            .query_one(
                "SELECT coalesce(bool_or(confirmed_flush_lsn > $1::text::pg_lsn), false) FROM pg_replication_slots WHERE slot_name = 'synapse_a'",
                &[&before_marker],
            )
            .await?
            .get::<_, bool>(0)
        {
            if Instant::now() > deadline {
                bail!("synapse never captured the {label} workload");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = Instant::now();
        self.lock.batch_execute("COMMIT").await?;
        wait_marker(self.pg_target, marker, Duration::from_secs(1800)).await?;
        let baseline_secs = t.elapsed().as_secs_f64();
        let perf = start_profile(self.profile, &self.work.join(format!("{label}.perf")));
        let t = Instant::now();
        self.syn_lock.batch_execute("COMMIT").await?;
        wait_marker(self.syn_target, marker, Duration::from_secs(1800)).await?;
        let synapse_secs = t.elapsed().as_secs_f64();
        stop_profile(perf)?;
        self.report_stages(label, synapse_secs, &mut child)?;
        Ok(CatchUp { baseline_secs, synapse_secs, lag_at_end: None, end_lsn })
    }

    /// P4: both replicating, the source takes single-row transactions at `rate` per second
    /// for `seconds`; each row carries its commit time, each target stamps when it applied
    /// the row, and the difference is the commit → applied latency.
    async fn latency(&self, rate: u64, seconds: u64) -> anyhow::Result<Latency> {
        let mut child = spawn_synapse(self.config, self.log)?;
        self.write_marker(40, "P4 start").await?;
        wait_marker(self.pg_target, 40, Duration::from_secs(300)).await?;
        wait_marker(self.syn_target, 40, Duration::from_secs(300)).await?;
        // Several writers: one session's round trips alone would bound the offered rate.
        const WRITERS: u64 = 4;
        let txns = rate * seconds;
        let start = Instant::now();
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let client = sql(self.source_url).await?;
            writers.push(tokio::spawn(async move {
                let stmt = client.prepare("INSERT INTO lat (id, committed_at) VALUES ($1, clock_timestamp())").await?;
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                let mut id = w;
                while id < txns {
                    tick.tick().await;
                    // Rows due by now at this writer's share of the rate.
                    let due = (rate as f64 * start.elapsed().as_secs_f64()) as u64;
                    while id < txns.min(due) {
                        client.execute(&stmt, &[&(id as i64)]).await?;
                        id += WRITERS;
                    }
                }
                anyhow::Ok(())
            }));
        }
        for w in writers {
            w.await??;
        }
        let achieved_rate = txns as f64 / start.elapsed().as_secs_f64();
        self.write_marker(4, "P4").await?;
        wait_marker(self.pg_target, 4, Duration::from_secs(600)).await?;
        wait_marker(self.syn_target, 4, Duration::from_secs(600)).await?;
        let slow = scrape_slow(
            self.listen,
            &[
                "synapse_log_append_seconds",
                "synapse_apply_log_read_seconds",
                "synapse_apply_statements_seconds",
                "synapse_apply_commit_seconds",
            ],
            "0.025",
        );
        stop(&mut child)?;
        let slow: Vec<String> = slow
            .iter()
            .map(|(n, count, over)| {
                format!("{} {over} of {count}", n.trim_start_matches("synapse_").trim_end_matches("_seconds"))
            })
            .collect();
        let q = "SELECT percentile_cont(ARRAY[0.25, 0.5, 0.75, 0.99]) WITHIN GROUP
                   (ORDER BY extract(epoch FROM applied_at - committed_at) * 1000), count(*)
                 FROM lat";
        let quartiles = |row: tokio_postgres::Row| -> anyhow::Result<[f64; 4]> {
            let n: i64 = row.get(1);
            if n as u64 != txns {
                bail!("P4: a target holds {n} of the {txns} rows");
            }
            let v: Vec<f64> = row.get(0);
            Ok([v[0], v[1], v[2], v[3]])
        };
        Ok(Latency {
            baseline: quartiles(self.pg_target.query_one(q, &[]).await?)?,
            synapse: quartiles(self.syn_target.query_one(q, &[]).await?)?,
            achieved_rate,
            txns,
            tail: format!("{}; calls over 25 ms: {}", stalls(self.syn_target).await?, slow.join(", ")),
        })
    }

    async fn write_marker(&self, marker: i32, label: &str) -> anyhow::Result<String> {
        self.source.execute("INSERT INTO marker VALUES ($1, $2)", &[&marker, &label]).await?;
        Ok(self.source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0))
    }

    /// Brings both slots' restart points to the end of the WAL before a backlog is written, so
    /// both walsenders start decoding it from the same place. A slot's restart point (where
    /// its walsender starts decoding) moves only when the client confirms a running-transactions
    /// record the walsender decoded. The subscription stays connected between scenarios and
    /// confirms the next one; synapse was stopped right after its marker, so its walsender
    /// re-decoded every earlier scenario's WAL first (P2 after P1: ~170 MB; the walsender
    /// serving synapse spent 1.0 core-seconds in P2 against the subscription's 0.4). A
    /// checkpoint logs such a record; both run until both restart points have passed it.
    async fn settle_slots(&self) -> anyhow::Result<()> {
        let lsn: String = self.source.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        self.source.batch_execute("CHECKPOINT").await?;
        let mut child = spawn_synapse(self.config, self.log)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let behind = "SELECT string_agg(slot_name || ' at ' || coalesce(restart_lsn::text, 'none'), ', ')
                        FROM pg_replication_slots
                       WHERE slot_name IN ('sub', 'synapse_a') AND coalesce(restart_lsn < $1::text::pg_lsn, true)";
        loop {
            let row = self.source.query_one(behind, &[&lsn]).await?;
            let Some(behind) = row.get::<_, Option<String>>(0) else { break };
            if Instant::now() > deadline {
                stop(&mut child)?;
                bail!("slots still start before {lsn}: {behind}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop(&mut child)
    }

    /// Enables or disables the baseline's subscription; disabling waits until its apply
    /// worker has exited (the walsender stops with it).
    async fn set_subscription(&self, enabled: bool) -> anyhow::Result<()> {
        let verb = if enabled { "ENABLE" } else { "DISABLE" };
        self.pg_target.batch_execute(&format!("ALTER SUBSCRIPTION sub {verb}")).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !enabled
            && self
                .pg_target
                .query_one("SELECT count(*) FROM pg_stat_subscription WHERE subname = 'sub' AND pid IS NOT NULL", &[])
                .await?
                .get::<_, i64>(0)
                > 0
        {
            if Instant::now() > deadline {
                bail!("the baseline's apply worker did not stop");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Prints where synapse's time went (its own stage metrics), then stops it.
    fn report_stages(&self, label: &str, synapse_secs: f64, child: &mut Child) -> anyhow::Result<()> {
        let stages = scrape(
            self.listen,
            &[
                "synapse_apply_log_read_seconds",
                "synapse_apply_statements_seconds",
                "synapse_apply_commit_seconds",
                "synapse_log_append_seconds",
            ],
        );
        stop(child)?;
        let parts: Vec<String> =
            stages.iter().map(|(k, v)| format!("{}={v:.2}s", k.trim_start_matches("synapse_"))).collect();
        println!(
            "{label} where synapse's time went (cumulative, overlapping stages) over {synapse_secs:.2}s wall: {}",
            parts.join(" ")
        );
        Ok(())
    }
}

/// The target's late transactions grouped into stalls (late ones committed within 100 ms of
/// each other): when each began (seconds into the run), how long it lasted and its worst lag.
async fn stalls(target: &Client) -> anyhow::Result<String> {
    let rows = target
        .query(
            "SELECT extract(epoch FROM committed_at - (SELECT min(committed_at) FROM lat))::float8,
                    (extract(epoch FROM applied_at - committed_at) * 1000)::float8
             FROM lat WHERE applied_at - committed_at > $1 * interval '1 ms' ORDER BY committed_at",
            &[&STALL_MS],
        )
        .await?;
    let mut runs: Vec<(f64, f64, f64, usize)> = Vec::new(); // start, end, worst, count
    for r in rows {
        let (at, ms): (f64, f64) = (r.get(0), r.get(1));
        match runs.last_mut() {
            Some(run) if at - run.1 < 0.1 => {
                run.1 = at;
                run.2 = run.2.max(ms);
                run.3 += 1;
            }
            _ => runs.push((at, at, ms, 1)),
        }
    }
    let late: usize = runs.iter().map(|r| r.3).sum();
    let shown: Vec<String> = runs
        .iter()
        .take(12)
        .map(|(a, b, w, n)| format!("+{a:.2}s {n} txns over {:.0} ms, worst {w:.0} ms", (b - a) * 1e3))
        .collect();
    Ok(format!("{late} txns later than {STALL_MS} ms in {} stalls: {}", runs.len(), shown.join("; ")))
}

const SCHEMA: &str = "
CREATE TABLE bulk (id bigint PRIMARY KEY, a int NOT NULL, b text NOT NULL, c timestamptz NOT NULL);
CREATE TABLE oltp (id bigint PRIMARY KEY, v bigint NOT NULL, pad text NOT NULL);
CREATE TABLE huge (id bigint PRIMARY KEY, pad text NOT NULL);
CREATE TABLE marker (id int PRIMARY KEY, phase text NOT NULL);";

/// P4's table: the source stamps each row when written (a single-row transaction, committed
/// at once), each target when it applied it (a column only the targets have, filled by its
/// default — PostgreSQL's subscription and synapse's applier both leave it to the target).
const LATENCY_SOURCE: &str = "CREATE TABLE lat (id bigint PRIMARY KEY, committed_at timestamptz NOT NULL);";
const LATENCY_TARGET: &str = "CREATE TABLE lat (id bigint PRIMARY KEY, committed_at timestamptz NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// One round of P1, P3, P2 (and P8, P7 on the embedded log). With `kafka` (a broker's
/// address) synapse keeps its log on Kafka and the rows are P1k, P3k, P2k; the baselines are
/// measured again in the same round.
pub(crate) async fn run_once(o: &Options, round: usize, kafka: Option<&str>) -> anyhow::Result<Vec<Row>> {
    let id = |embedded: &'static str, on_kafka: &'static str| if kafka.is_some() { on_kafka } else { embedded };
    // The goals are the embedded log's; the Kafka rows are reported beside them.
    let goal = |g: &str| if kafka.is_some() { "—".to_string() } else { g.to_string() };
    let opts = ClusterOptions { settings: vec!["max_worker_processes = 16".into()], ..Default::default() };
    let src = LocalCluster::start(opts.clone())?;
    // The subscription's launcher waits wal_retrieve_retry_interval (5 s) between worker
    // starts: a re-enabled subscription would sit idle for up to that long before its clock's
    // work begins. Synapse starts at once; so does the baseline here.
    let mut pg_opts = opts.clone();
    pg_opts.settings.push("wal_retrieve_retry_interval = '50ms'".into());
    let tpg = LocalCluster::start(pg_opts)?;
    let tsyn = LocalCluster::start(opts)?;
    for (c, lat) in [(&src, LATENCY_SOURCE), (&tpg, LATENCY_TARGET), (&tsyn, LATENCY_TARGET)] {
        c.create_database("bench")?;
        c.psql("bench", SCHEMA)?;
        c.psql("bench", lat)?;
    }
    src.psql("bench", "INSERT INTO oltp SELECT g, 0, repeat('o', 80) FROM generate_series(1, 100000) g; CREATE PUBLICATION pub_pg FOR TABLE bulk, oltp, huge, marker, lat;")?;
    tpg.psql(
        "bench",
        &format!(
            "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} dbname=bench user=postgres' PUBLICATION pub_pg",
            src.port()
        ),
    )?;
    let work = tempfile::tempdir()?;
    if std::env::var_os("SYNAPSE_BENCH_KEEP").is_some() {
        eprintln!("keeping the work directory {}", work.path().display());
    }
    let work =
        if std::env::var_os("SYNAPSE_BENCH_KEEP").is_some() { KeepDir::Kept(work.keep()) } else { KeepDir::Temp(work) };
    let listen = format!("127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    });
    let config = work.path().join("synapse.yaml");
    std::fs::write(
        &config,
        format!(
            "log:\n  dir: {}\n{}sources:\n  - name: a\n    url: {}\n    tables: [public.bulk, public.oltp, public.huge, public.marker, public.lat]\ntargets:\n  - name: b\n    url: {}\nops:\n  listen: \"{listen}\"\napi:\n  listen: \"\"\n",
            work.path().join("log").display(),
            // tansu counts offsets per record batch (see log.kafka.batch_records).
            kafka
                .map(|b| {
                    // tansu answers a fetch only when fetch.wait.max.ms (500 ms by default) has
                    // passed, even when records arrived (Kafka answers at once): a waiting
                    // reader would be up to 500 ms late. Measured P2k: 8,328 txns/s at the
                    // default, 31,587 at 5 ms.
                    let mut props = vec![("fetch.wait.max.ms".to_string(), "5".to_string())];
                    for (k, v) in &o.kafka_properties {
                        props.retain(|(d, _)| d != k);
                        props.push((k.clone(), v.clone()));
                    }
                    let properties: String = props.iter().map(|(k, v)| format!("      {k}: '{v}'\n")).collect();
                    let properties = if properties.is_empty() { properties } else { format!("    properties:\n{properties}") };
                    format!("  kafka:\n    brokers: {b}\n    batch_records: false\n{properties}")
                })
                .unwrap_or_default(),
            src.url("bench"),
            tsyn.url("bench")
        ),
    )?;
    let log = work.path().join("synapse.log");
    let source = sql(&src.url("bench")).await?;
    let pg_target = sql(&tpg.url("bench")).await?;
    let syn_target = sql(&tsyn.url("bench")).await?;

    eprintln!("setup: initial sync of both targets");
    let mut child = spawn_synapse(&config, &log)?;
    source.execute("INSERT INTO marker VALUES (0, 'setup')", &[]).await?;
    wait_marker(&pg_target, 0, Duration::from_secs(300)).await.context("baseline initial sync")?;
    wait_marker(&syn_target, 0, Duration::from_secs(300))
        .await
        .with_context(|| format!("synapse initial sync; see {}", log.display()))?;
    stop(&mut child)?;

    let mut rows = Vec::new();
    let want = |id: &str| o.scenarios.iter().any(|s| s.eq_ignore_ascii_case(id));
    if kafka.is_none() && !["P1", "P2", "P3", "P4", "P8"].iter().any(|id| want(id)) {
        // P7 alone.
        if o.big_mb > 0 {
            rows.extend(p7(o, &src, &tpg, &pg_target, &syn_target, &config, &log, round).await?);
        }
        return Ok(rows);
    }
    let lock = sql(&tpg.url("bench")).await?;
    let syn_lock = sql(&tsyn.url("bench")).await?;
    let source_url = src.url("bench");
    let round_env = Round {
        source: &source,
        source_url: &source_url,
        pg_target: &pg_target,
        syn_target: &syn_target,
        lock: &lock,
        syn_lock: &syn_lock,
        method: o.method,
        config: &config,
        log: &log,
        listen: &listen,
        work: work.path(),
        profile: o.profile && round == 0,
    };
    if kafka.is_none() && want("P4") && !["P1", "P2", "P3", "P8"].iter().any(|id| want(id)) {
        // P4 (and P7) alone.
        rows.push(p4(o, &round_env, round).await?);
        if want("P7") && o.big_mb > 0 {
            rows.extend(p7(o, &src, &tpg, &pg_target, &syn_target, &config, &log, round).await?);
        }
        return Ok(rows);
    }
    let p3_recv = "bench_recv";
    source.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&p3_recv]).await?;
    // Capture alone into its own log, on the publication synapse created; no heartbeats, so
    // it drains exactly the P1 transactions.
    let mut drain_cfg = synapse_capture::CaptureConfig::new("drain", src.url("bench").parse()?);
    drain_cfg.slot = "bench_drain".into();
    drain_cfg.create_publication = false;
    drain_cfg.heartbeat_interval = Duration::from_secs(3600);
    let drain = synapse_capture::Capture::connect(drain_cfg).await?;
    // Its log is created later, empty.
    drain.prepare_with(&synapse_log::WriterState::default()).await?;

    // ---- P1: bulk catch-up ----
    let txns = o.rows / o.txn_rows;
    eprintln!("P1: {} rows in {txns} transactions, {}", o.rows, o.method.describe());
    let p1 = round_env
        .catch_up(
            "P1",
            "bulk",
            &format!(
                "DO $$ BEGIN FOR i IN 0..{} LOOP
                    INSERT INTO bulk SELECT g, g % 1000, md5(g::text), now() FROM generate_series(i * {n} + 1, (i + 1) * {n}) g;
                    COMMIT;
                 END LOOP; END $$",
                txns - 1,
                n = o.txn_rows
            ),
            1,
        )
        .await?;
    let end_p1 = p1.end_lsn.clone();
    p1.print_lag("P1");
    rows.push(Row {
        id: id("P1", "P1k"),
        what: format!("bulk {}, {} rows", o.method.short(), o.rows),
        synapse: o.rows as f64 / p1.synapse_secs,
        baseline: o.rows as f64 / p1.baseline_secs,
        unit: "rows/s",
        higher_is_better: true,
        goal: goal("≥ 1.5×"),
    });

    // ---- P3: capture drain of the P1 WAL ----
    eprintln!("P3: draining the P1 WAL: pg_recvlogical, then synapse capture");
    let t = Instant::now();
    let status = recvlogical(&src, p3_recv, &end_p1).status()?;
    let pg_p3 = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    let drain_log = match kafka {
        None => {
            SourceLog::Embedded(synapse_log::EmbeddedLog::open(&work.path().join("drain.redb"), Default::default())?)
        }
        Some(b) => {
            let options = synapse_log::KafkaLogOptions {
                batch_records: false,
                ..synapse_log::KafkaLogOptions::new(b, &format!("drain{round}"))
            };
            SourceLog::Kafka(synapse_log::KafkaLog::open(options).await?)
        }
    };
    let (stop_drain, rx) = tokio::sync::watch::channel(false);
    let stats = drain.stats();
    let t = Instant::now();
    let task = tokio::spawn(async move { drain.stream(drain_log, rx).await });
    while stats.transactions.load(Ordering::Relaxed) < txns + 1 {
        if task.is_finished() {
            bail!("synapse capture stopped early");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let syn_p3 = t.elapsed().as_secs_f64();
    stop_drain.send(true)?;
    let _ = task.await;
    source
        .batch_execute("SELECT pg_drop_replication_slot('bench_recv'); SELECT pg_drop_replication_slot('bench_drain');")
        .await?;
    rows.push(Row {
        id: id("P3", "P3k"),
        what: format!("capture drain, {} rows", o.rows),
        synapse: o.rows as f64 / syn_p3,
        baseline: o.rows as f64 / pg_p3,
        unit: "rows/s",
        higher_is_better: true,
        goal: goal("≥ 0.8×"),
    });

    // ---- P2: OLTP catch-up ----
    eprintln!("P2: {} single-row update transactions, {}", o.updates, o.method.describe());
    let p2 = round_env
        .catch_up(
            "P2",
            "oltp",
            &format!(
                "DO $$ BEGIN FOR i IN 1..{} LOOP
                    UPDATE oltp SET v = v + 1 WHERE id = 1 + (i::int8 * 7919) % 100000;
                    COMMIT;
                 END LOOP; END $$",
                o.updates
            ),
            2,
        )
        .await?;
    let same: bool = {
        let q = "SELECT sum(v)::int8 FROM oltp";
        let a: i64 = pg_target.query_one(q, &[]).await?.get(0);
        let b: i64 = syn_target.query_one(q, &[]).await?.get(0);
        let s: i64 = source.query_one(q, &[]).await?.get(0);
        a == s && b == s
    };
    if !same {
        bail!("P2 targets differ from the source");
    }
    p2.print_lag("P2");
    rows.push(Row {
        id: id("P2", "P2k"),
        what: format!("OLTP {}, {} txns", o.method.short(), o.updates),
        synapse: o.updates as f64 / p2.synapse_secs,
        baseline: o.updates as f64 / p2.baseline_secs,
        unit: "txns/s",
        higher_is_better: true,
        goal: goal("≥ 2×"),
    });

    if want("P4") && kafka.is_none() {
        rows.push(p4(o, &round_env, round).await?);
    }

    if kafka.is_some() {
        // Initial copy does not go through the log; P7's memory bound is the embedded log's.
        return Ok(rows);
    }

    // ---- P8: initial copy ----
    eprintln!("P8: initial copy of bulk into empty databases: COPY | COPY, then synapse");
    tsyn.create_database("copy_pg")?;
    tsyn.create_database("copy_syn")?;
    tsyn.psql("copy_pg", SCHEMA)?;
    let t = Instant::now();
    let pipe = format!(
        "{psql} -X -q -d {src} -c 'COPY bulk TO STDOUT' | {psql} -X -q -d {dst} -c 'COPY bulk FROM STDIN'",
        psql = src.bindir().join("psql").display(),
        src = src.url("bench"),
        dst = tsyn.url("copy_pg")
    );
    let status = Command::new("sh").args(["-c", &pipe]).status()?;
    let pg_p8 = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("baseline COPY pipe failed");
    }
    let mut copy_cfg = synapse_capture::CaptureConfig::new("copy", src.url("bench").parse()?);
    copy_cfg.slot = "bench_copy".into();
    copy_cfg.tables = vec!["public.bulk".into()];
    copy_cfg.publication = "bench_copy".into();
    let copier = synapse_capture::Capture::connect(copy_cfg).await?;
    // Copies only: no log.
    let prepared = copier.prepare_with(&synapse_log::WriterState::default()).await?;
    let t = Instant::now();
    let report = synapse_apply::initial_copy::run(
        &copier,
        &prepared.tables,
        &tsyn.url("copy_syn").parse()?,
        None,
        o.copy_parallelism,
        Default::default(),
    )
    .await?;
    let syn_p8 = t.elapsed().as_secs_f64();
    source.batch_execute("SELECT pg_drop_replication_slot('bench_copy')").await?;
    if report.rows != o.rows {
        bail!("synapse copied {} rows, expected {}", report.rows, o.rows);
    }
    rows.push(Row {
        id: "P8",
        what: format!("initial copy, {} rows", o.rows),
        synapse: o.rows as f64 / syn_p8,
        baseline: o.rows as f64 / pg_p8,
        unit: "rows/s",
        higher_is_better: true,
        goal: "≥ 0.9×".into(),
    });

    if o.big_mb > 0 {
        rows.extend(p7(o, &src, &tpg, &pg_target, &syn_target, &config, &log, round).await?);
    }

    if o.profile && round == 0 {
        print_profile("P1", &work.path().join("P1.perf"))?;
        print_profile("P2", &work.path().join("P2.perf"))?;
    }
    Ok(rows)
}

/// P4: commit → applied latency at a fixed rate, both replicating.
async fn p4(o: &Options, round_env: &Round<'_>, round: usize) -> anyhow::Result<Row> {
    eprintln!("P4: {} single-row transactions/s for {} s, both replicating", o.p4_rate, o.p4_seconds);
    let l = round_env.latency(o.p4_rate, o.p4_seconds).await?;
    let ms = |q: [f64; 4]| format!("p25 {:.1} / p50 {:.1} / p75 {:.1} / p99 {:.1} ms", q[0], q[1], q[2], q[3]);
    println!(
        "P4 round {}: {} txns at {:.0}/s achieved (offered {}/s) — commit → applied synapse {}; publication/subscription {}",
        round + 1,
        l.txns,
        l.achieved_rate,
        o.p4_rate,
        ms(l.synapse),
        ms(l.baseline)
    );
    println!("P4 round {} synapse tail: {}", round + 1, l.tail);
    Ok(Row {
        id: "P4",
        what: format!("commit→applied p99 at {}/s", o.p4_rate),
        synapse: l.synapse[3],
        baseline: l.baseline[3],
        unit: "ms",
        higher_is_better: false,
        goal: "≥ 1×".into(),
    })
}

/// P7: one large transaction, replicated while it runs — by synapse on protocol 2, then 1,
/// then by PostgreSQL's subscription with `streaming = on`, each alone.
#[allow(clippy::too_many_arguments)]
async fn p7(
    o: &Options,
    src: &LocalCluster,
    tpg: &LocalCluster,
    pg_target: &Client,
    syn_target: &Client,
    config: &Path,
    log: &Path,
    round: usize,
) -> anyhow::Result<Vec<Row>> {
    let source = sql(&src.url("bench")).await?;
    let mut rows = Vec::new();
    // ---- P7: one large transaction, replicated while it runs ----
    let n = o.big_mb * 1024 * 1024 / 256;
    eprintln!("P7: one transaction of ~{} MB ({n} rows), each replicator alone and running", o.big_mb);
    tpg.psql("bench", "ALTER SUBSCRIPTION sub DISABLE")?;
    // The source's own time for the transaction with nothing replicating it: in a database of
    // its own (logical decoding passes over other databases' changes), synapse stopped and the
    // subscription disabled. Each run below also slows its source by decoding it meanwhile.
    src.create_database("p7ref")?;
    src.psql("p7ref", "CREATE TABLE huge (id bigint PRIMARY KEY, pad text NOT NULL)")?;
    // Every timed transaction starts from a checkpoint: a checkpoint that the workloads before
    // left due would otherwise land in one run and not another.
    src.psql("p7ref", "CHECKPOINT")?;
    let cpu = cpu_jiffies();
    let alone = {
        let c = sql(&src.url("p7ref")).await?;
        let t = Instant::now();
        c.batch_execute(&format!("INSERT INTO huge SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, {n}) g"))
            .await?;
        t.elapsed().as_secs_f64()
    };
    let alone_busy = busy_since(cpu);
    src.psql("postgres", "DROP DATABASE p7ref")?;
    let mut syn = Vec::new();
    for (i, streaming) in [true, false].into_iter().enumerate() {
        let cfg = config.with_file_name(format!("p7-{i}.yaml"));
        let yaml = std::fs::read_to_string(config)?;
        std::fs::write(&cfg, yaml.replacen("    tables: [", &format!("    streaming: {streaming}\n    tables: ["), 1))?;
        let mut child = spawn_synapse(&cfg, log)?;
        let ready = 70 + 2 * i as i32;
        // Caught up (the previous run's TRUNCATE included) before the clock starts.
        source.execute("INSERT INTO marker VALUES ($1, 'p7 ready')", &[&ready]).await?;
        wait_marker(syn_target, ready, Duration::from_secs(900)).await.context("P7 catch-up")?;
        let before = slot_spill_stream(&source, "synapse_a").await?;
        let r = big_transaction(src, syn_target, i as u64 * n, n, ready + 1, Watch::Process(child.id()))
            .await
            .with_context(|| format!("P7 (synapse, streaming {streaming}); see {}", log.display()))?;
        stop(&mut child)?;
        let after = slot_spill_stream(&source, "synapse_a").await?;
        print_spill(round, &format!("synapse streaming {streaming}"), before, after);
        source.batch_execute("TRUNCATE huge").await?;
        syn.push(r);
    }
    // PostgreSQL's subscription with streaming on; the synapse runs' WAL is not its work.
    source.execute("SELECT pg_replication_slot_advance('sub', pg_current_wal_lsn())", &[]).await?;
    tpg.psql("bench", "ALTER SUBSCRIPTION sub SET (streaming = on)")?;
    tpg.psql("bench", "ALTER SUBSCRIPTION sub ENABLE")?;
    source.execute("INSERT INTO marker VALUES (74, 'p7 ready')", &[]).await?;
    wait_marker(pg_target, 74, Duration::from_secs(900)).await.context("P7 baseline catch-up")?;
    let before = slot_spill_stream(&source, "sub").await?;
    let pg = big_transaction(src, pg_target, 2 * n, n, 75, Watch::ApplyWorker(tpg)).await.context("P7 baseline")?;
    let after = slot_spill_stream(&source, "sub").await?;
    print_spill(round, "subscription streaming on", before, after);
    tpg.psql("bench", "ALTER SUBSCRIPTION sub SET (streaming = off)")?;
    let (v2, v1) = (&syn[0], &syn[1]);
    let pct = |b: f64| format!("{:.0} %", b * 100.0);
    println!(
        "P7 round {}: the transaction alone on the source {alone:.1} s (CPU busy {}). Source transaction → target \
         commit after it (CPU busy over both): synapse protocol 2 {:.1} s → {:.1} s ({}; peak RSS {:.0} MiB), \
         protocol 1 {:.1} s → {:.1} s ({}; {:.0} MiB); PostgreSQL's subscription, streaming on, {:.1} s → {:.1} s \
         ({}; apply worker peak RSS {:.0} MiB, shared buffers included)",
        round + 1,
        pct(alone_busy),
        v2.source_secs,
        v2.after_commit_secs,
        pct(v2.busy),
        v2.peak_mib,
        v1.source_secs,
        v1.after_commit_secs,
        pct(v1.busy),
        v1.peak_mib,
        pg.source_secs,
        pg.after_commit_secs,
        pct(pg.busy),
        pg.peak_mib
    );
    rows.push(Row {
        id: "P7",
        what: format!("peak RSS, one {} MB transaction", o.big_mb),
        synapse: v2.peak_mib,
        baseline: pg.peak_mib,
        unit: "MiB",
        higher_is_better: false,
        goal: "< 256 MiB".into(),
    });
    // Source transaction start → target commit, in times the source takes for it alone: the
    // goal is the target's commit within 2× that.
    let times = |id, what: String, synapse: &BigTransaction, goal: &str| Row {
        id,
        what,
        synapse: synapse.total_secs() / alone,
        baseline: pg.total_secs() / alone,
        unit: "×",
        higher_is_better: false,
        goal: goal.into(),
    };
    rows.push(times("P7t", format!("start → target commit, {} MB, × source alone", o.big_mb), v2, "≤ 2×"));
    rows.push(times("P7t1", format!("the same, synapse on protocol 1 ({} MB)", o.big_mb), v1, "—"));
    Ok(rows)
}

/// Bytes a slot's walsender spilled to disk and streamed so far (`pg_stat_replication_slots`).
async fn slot_spill_stream(source: &Client, slot: &str) -> anyhow::Result<(i64, i64)> {
    let row = source
        .query_opt(
            "SELECT coalesce(spill_bytes, 0), coalesce(stream_bytes, 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map_or((0, 0), |r| (r.get(0), r.get(1))))
}

/// What the source's walsender did with P7's transaction for `who`: spilled or streamed.
fn print_spill(round: usize, who: &str, before: (i64, i64), after: (i64, i64)) {
    let mb = |b: i64| b as f64 / 1e6;
    println!(
        "P7 round {}, {who}: the source spilled {:.0} MB to pg_replslot and streamed {:.0} MB",
        round + 1,
        mb(after.0 - before.0),
        mb(after.1 - before.1)
    );
}

/// Whose memory P7 watches while its transaction flows.
enum Watch<'a> {
    Process(u32),
    /// The subscription's apply worker on this cluster.
    ApplyWorker(&'a LocalCluster),
}

struct BigTransaction {
    /// Start → the source's COMMIT returned.
    source_secs: f64,
    /// The source's COMMIT → the marker row written last in it visible on the target.
    after_commit_secs: f64,
    peak_mib: f64,
    /// Share of the machine's CPU time busy from start to the target's commit.
    busy: f64,
}

impl BigTransaction {
    fn total_secs(&self) -> f64 {
        self.source_secs + self.after_commit_secs
    }
}

/// Runs P7's transaction (`n` rows after id `from`, then marker `marker`) on the source while
/// the replicator watched runs, and times it to the marker's arrival on `target`.
async fn big_transaction(
    src: &LocalCluster,
    target: &Client,
    from: u64,
    n: u64,
    marker: i32,
    watch: Watch<'_>,
) -> anyhow::Result<BigTransaction> {
    let client = sql(&src.url("bench")).await?;
    client.batch_execute("CHECKPOINT").await?;
    target.batch_execute("CHECKPOINT").await?;
    let sql_text = format!(
        "BEGIN; INSERT INTO huge SELECT g, repeat(md5(g::text), 6) FROM generate_series({}, {}) g;
         INSERT INTO marker VALUES ({marker}, 'p7'); COMMIT",
        from + 1,
        from + n
    );
    let cpu = cpu_jiffies();
    let start = Instant::now();
    let mut txn = tokio::spawn(async move { client.batch_execute(&sql_text).await.map(|()| start.elapsed()) });
    let mut committed: Option<Duration> = None;
    let mut peak: f64 = 0.0;
    let mut pid: Option<u32> = None;
    let deadline = start + Duration::from_secs(3600);
    loop {
        // The apply worker is looked up once (again only if it went): a psql process every
        // 50 ms would load the machine during the baseline's own measurement.
        if pid.is_none_or(|p| peak_rss_mib(p).is_none()) {
            pid = match &watch {
                Watch::Process(pid) => Some(*pid),
                Watch::ApplyWorker(c) => c
                    .psql("bench", "SELECT pid FROM pg_stat_subscription WHERE relid IS NULL")
                    .ok()
                    .and_then(|p| p.parse().ok()),
            };
        }
        if let Some(pid) = pid {
            peak = peak.max(peak_rss_mib(pid).unwrap_or(0.0));
        }
        if committed.is_none() && txn.is_finished() {
            committed = Some((&mut txn).await??);
        }
        if committed.is_some() && target.query_opt("SELECT 1 FROM marker WHERE id = $1", &[&marker]).await?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("P7's transaction never reached the target");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = start.elapsed().as_secs_f64();
    let source_secs = committed.map_or(total, |d| d.as_secs_f64());
    Ok(BigTransaction { source_secs, after_commit_secs: total - source_secs, peak_mib: peak, busy: busy_since(cpu) })
}

/// Busy and all CPU time of every core since boot, in jiffies (`/proc/stat`).
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((all - idle, all))
}

/// User and system CPU seconds (every thread) of process `pid` since it started.
fn process_cpu(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return (0.0, 0.0) };
    // Fields after the command's closing parenthesis: state is the first, utime the 12th.
    let Some((_, rest)) = stat.rsplit_once(')') else { return (0.0, 0.0) };
    let f: Vec<f64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    // Linux reports in clock ticks: USER_HZ, 100 on every mainstream build.
    match f[..] {
        [user, system] => (user / 100.0, system / 100.0),
        _ => (0.0, 0.0),
    }
}

/// CPU seconds used so far by the processes a query returns (`pid`s) on `client`'s server.
async fn backends_cpu_secs(client: &Client, query: &str) -> anyhow::Result<f64> {
    let rows = client.query(query, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (user, system) = process_cpu(r.get::<_, i32>(0) as u32);
            user + system
        })
        .sum())
}

/// Where one side's catch-up spent CPU: the source's walsender, the target's backends, and
/// (synapse) its own process — each started with the catch-up, so their totals are its cost.
async fn side_cpu(source: &Client, target: &Client, synapse: Option<u32>) -> anyhow::Result<String> {
    let (sender, receiver, name, own) = match synapse {
        None => (
            "SELECT pid FROM pg_stat_replication WHERE application_name = 'sub'",
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'logical replication worker'",
            "apply worker",
            String::new(),
        ),
        Some(pid) => {
            let (user, system) = process_cpu(pid);
            (
                "SELECT pid FROM pg_stat_replication WHERE application_name LIKE 'synapse-%'",
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'synapse target'",
                "target backends",
                format!(" + synapse {:.1} (system {system:.1})", user + system),
            )
        }
    };
    let walsender = backends_cpu_secs(source, sender).await?;
    let backends = backends_cpu_secs(target, receiver).await?;
    Ok(format!("walsender {walsender:.1} + {name} {backends:.1}{own}"))
}

/// The share of CPU time busy since `before` (0 when unknown).
fn busy_since(before: Option<(u64, u64)>) -> f64 {
    match (before, cpu_jiffies()) {
        (Some((b0, a0)), Some((b1, a1))) if a1 > a0 => (b1 - b0) as f64 / (a1 - a0) as f64,
        _ => 0.0,
    }
}
