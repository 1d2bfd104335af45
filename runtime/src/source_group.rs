//! Scale-out on Kafka: `synapse run` processes with the same `log.kafka.group` share the
//! sources through a Kafka consumer group.
//!
//! Each member subscribes to the sources' `<prefix>.<node>.changes` topics (one partition
//! each). The partition of source S assigned to a member means: S's capture, its appliers
//! (one per target) and its public-topic publisher run in that member, and nowhere else.
//! Adding a member moves some sources to it (cooperative-sticky assignment: the others keep
//! running); a member that stops leaves the group and its sources move at once; one that dies
//! is noticed after the group's session timeout.
//!
//! Guarantees:
//! * **Nothing lost or applied twice across a rebalance**: positions live in each target
//!   (`synapse.applied`, written in the same transaction as the data) and in the source's slot,
//!   not in Kafka. A revoked source is stopped before the partition is released (bounded by
//!   [`HANDOVER`]); should an old owner still run (a paused process), PostgreSQL fences it:
//!   a slot has one reader, and a target one applier per source (advisory lock, `APP006`).
//! * The group consumer reads nothing (its partitions are paused): it is membership only. It
//!   commits, every few seconds, the Kafka offset up to which every target of each owned source
//!   has applied, so Kafka tooling (`kafka-consumer-groups --describe`) shows the lag per
//!   partition; these commits are informational.

use crate::ops::ComponentState;
use crate::pipeline::{start_source, ComponentFailed, Shared, SourceParts};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;
use synapse_apply::ApplyStats;
use synapse_log::{KafkaContext, SourceLog};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// How long a revoked source may take to stop before its partition is released anyway.
const HANDOVER: Duration = Duration::from_secs(30);
/// How often the group's Kafka offsets follow the appliers.
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

enum Change {
    Assigned(Vec<String>),
    /// The sources to stop, and where to say they have stopped.
    Revoked(Vec<String>, std_mpsc::SyncSender<()>),
}

/// Turns librdkafka's rebalance callbacks (on the polling thread) into [`Change`]s.
struct GroupContext {
    sources: BTreeMap<String, String>,
    changes: mpsc::UnboundedSender<Change>,
}

impl GroupContext {
    fn sources_of(&self, tpl: &TopicPartitionList) -> Vec<String> {
        tpl.elements().iter().filter_map(|e| self.sources.get(e.topic()).cloned()).collect()
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        KafkaContext.log(level, fac, message)
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        KafkaContext.error(error, reason)
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let sources = self.sources_of(tpl);
            if sources.is_empty() {
                return;
            }
            // Block the rebalance until the sources stopped: their next owner starts after.
            let (done, stopped) = std_mpsc::sync_channel(1);
            if self.changes.send(Change::Revoked(sources, done)).is_ok() {
                let _ = stopped.recv_timeout(HANDOVER + Duration::from_secs(5));
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Membership only: the data is read by the sources' own readers.
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pausing the group's partitions");
                }
                let _ = self.changes.send(Change::Assigned(self.sources_of(tpl)));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance failed; librdkafka retries"),
        }
    }
}

/// Each applier's component name and live figures.
type ApplierFigures = Vec<(String, Arc<ApplyStats>)>;

/// A source running in this member.
struct Owned {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ComponentFailed>>,
    appliers: Arc<std::sync::Mutex<ApplierFigures>>,
}

/// Joins `group` and runs the sources assigned to this member until `shutdown`.
pub async fn run(shared: Arc<Shared>, group: String, shutdown: watch::Receiver<bool>) -> Result<(), ComponentFailed> {
    let failed = |error: String| ComponentFailed {
        component: "group".into(),
        code: "SYN004",
        error,
        hint: "check log.kafka (brokers, credentials allowing the consumer group) and log.kafka.group",
    };
    let Some(kafka) = shared.config.log.kafka.clone() else { return Err(failed("log.kafka is not set".into())) };
    let sources: BTreeMap<String, String> =
        shared.config.sources.iter().map(|s| (kafka.log_options(&s.name).changes_topic(), s.name.clone())).collect();
    let (tx, mut changes) = mpsc::unbounded_channel();
    let mut client = kafka.log_options("group").client();
    client
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky");
    let consumer: BaseConsumer<GroupContext> = client
        .create_with_context(GroupContext { sources: sources.clone(), changes: tx })
        .map_err(|e| failed(format!("creating the group consumer: {e}")))?;
    let topics: Vec<&str> = sources.keys().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| failed(format!("joining group {group}: {e}")))?;
    let consumer = Arc::new(consumer);
    shared.health.set("group", ComponentState::Starting);
    tracing::info!(%group, sources = sources.len(), "joining the consumer group");

    // librdkafka serves rebalances from poll(); it runs on a thread of its own.
    let stop_polling = Arc::new(AtomicBool::new(false));
    let poller = {
        let (consumer, stop) = (consumer.clone(), stop_polling.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Err(e)) = consumer.poll(Duration::from_millis(200)) {
                    tracing::debug!(error = %e, "group consumer");
                }
            }
            // Leave the group now (its revocation finds the coordinator gone and returns).
            consumer.unsubscribe();
        })
    };

    let mut owned: BTreeMap<String, Owned> = BTreeMap::new();
    let mut sd = shutdown.clone();
    let mut commit_tick = tokio::time::interval(COMMIT_INTERVAL);
    let mut result = Ok(());
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Some(Change::Assigned(names)) => {
                    shared.health.set("group", ComponentState::Streaming);
                    let stopping = *shutdown.borrow();
                    for name in names {
                        if owned.contains_key(&name) || stopping {
                            continue;
                        }
                        tracing::info!(source = %name, "source assigned to this process");
                        metrics::gauge!("synapse_group_source_owned", "source" => name.clone()).set(1.0);
                        owned.insert(name.clone(), spawn_source(&shared, &name));
                    }
                }
                Some(Change::Revoked(names, done)) => {
                    for name in names {
                        if let Some(o) = owned.remove(&name) {
                            tracing::info!(source = %name, "source handed over");
                            if let Err(e) = stop_source(&shared, &name, o).await {
                                result = Err(e);
                            }
                        }
                    }
                    let _ = done.send(());
                    if result.is_err() {
                        break;
                    }
                }
                None => break,
            },
            _ = commit_tick.tick() => commit_positions(&consumer, &shared, &owned),
            _ = async { let _ = sd.wait_for(|s| *s).await; } => break,
        }
        // A source that stopped by itself failed definitely: stop this process, as without a
        // group (the source then moves to another member).
        let finished: Vec<String> =
            owned.iter().filter(|(_, o)| o.task.is_finished()).map(|(n, _)| n.clone()).collect();
        for name in finished {
            if let Some(o) = owned.remove(&name) {
                if let Err(e) = stop_source(&shared, &name, o).await {
                    result = Err(e);
                }
            }
        }
        if result.is_err() {
            break;
        }
    }
    for (name, o) in std::mem::take(&mut owned) {
        if let Err(e) = stop_source(&shared, &name, o).await {
            result = result.and(Err(e));
        }
    }
    drop(changes);
    stop_polling.store(true, Ordering::Relaxed);
    let _ = poller.await;
    shared.health.set("group", ComponentState::Stopped);
    result
}

/// Starts a source's components on a stop signal of their own.
fn spawn_source(shared: &Arc<Shared>, name: &str) -> Owned {
    let (stop, stop_rx) = watch::channel(false);
    let appliers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (shared, name, figures) = (shared.clone(), name.to_owned(), appliers.clone());
    let task = tokio::spawn(async move {
        let Some(source) = shared.config.sources.iter().find(|s| s.name == name) else { return Ok(()) };
        let mut tasks = JoinSet::new();
        let (mut captures, mut started) = (Vec::new(), Vec::new());
        let parts = SourceParts { tasks: &mut tasks, captures: &mut captures, appliers: &mut started };
        let begun = start_source(&shared, source, parts, &stop_rx).await.map_err(|e| ComponentFailed {
            component: format!("source/{name}"),
            code: "SYN003",
            error: format!("{e:#}"),
            hint: "see the error; fix the configuration of this source",
        })?;
        if let Ok(mut f) = figures.lock() {
            *f = started;
        }
        if !begun {
            return Ok(());
        }
        // The first definite failure stops the source's other components.
        let mut first = Ok(());
        while let Some(r) = tasks.join_next().await {
            if let Ok(Err(e)) = r {
                tasks.abort_all();
                first = first.and(Err(e));
            }
        }
        first
    });
    Owned { stop, task, appliers }
}

/// Stops a source's components (bounded by [`HANDOVER`]) and forgets their health entries.
async fn stop_source(shared: &Shared, name: &str, o: Owned) -> Result<(), ComponentFailed> {
    let _ = o.stop.send(true);
    let mut task = o.task;
    let r = match tokio::time::timeout(HANDOVER, &mut task).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(ComponentFailed {
            component: format!("source/{name}"),
            code: "SYN001",
            error: format!("a task panicked: {join}"),
            hint: "report this as a bug with the log output",
        }),
        Err(_) => {
            tracing::warn!(source = %name, "the source did not stop in time; aborting it");
            task.abort();
            Ok(())
        }
    };
    metrics::gauge!("synapse_group_source_owned", "source" => name.to_owned()).set(0.0);
    shared.health.forget_source(name);
    r
}

/// Commits, per owned source, the Kafka offset every one of its targets has applied up to.
fn commit_positions(consumer: &BaseConsumer<GroupContext>, shared: &Shared, owned: &BTreeMap<String, Owned>) {
    let mut tpl = TopicPartitionList::new();
    for (name, o) in owned {
        let Some(SourceLog::Kafka(log)) = shared.logs.get(name).map(|l| &**l) else { continue };
        let Ok(appliers) = o.appliers.lock() else { continue };
        let Some(next) = appliers.iter().map(|(_, s)| s.next_offset.load(Ordering::Relaxed)).min() else { continue };
        let position = rdkafka::Offset::Offset(log.kafka_position(next));
        let _ = tpl.add_partition_offset(&log.options().changes_topic(), 0, position);
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            tracing::debug!(error = %e, "committing the group's offsets");
        }
    }
}
