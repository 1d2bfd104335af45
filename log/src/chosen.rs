//! The log a deployment chose in its configuration, as one type the pipeline can hold.

use crate::{ChangeLog, EmbeddedLog, KafkaLog, LogError, Offset, Seek, WriterState};
use std::future::Future;
use std::time::Duration;
use synapse_schemas::{Cursor, LogRecord, Relation, RelationKey, ResyncMark};

/// The embedded log or the Kafka log. [`ChangeLog`]'s methods return `impl Future`, so the
/// trait has no `dyn` form; this enum lets one binary run on either while every call keeps the
/// chosen log's contract (each method only delegates). Cheap to clone.
#[derive(Clone)]
pub enum SourceLog {
    Embedded(EmbeddedLog),
    Kafka(KafkaLog),
}

macro_rules! delegate {
    ($self:ident, $log:ident => $call:expr) => {
        match $self {
            SourceLog::Embedded($log) => $call,
            SourceLog::Kafka($log) => $call,
        }
    };
}

impl ChangeLog for SourceLog {
    async fn append(&self, records: Vec<LogRecord>) -> Result<Offset, LogError> {
        delegate!(self, l => l.append(records).await)
    }

    fn stage(&self, records: Vec<LogRecord>) -> impl Future<Output = Result<Offset, LogError>> + Send + 'static {
        let staged: std::pin::Pin<Box<dyn Future<Output = Result<Offset, LogError>> + Send>> =
            delegate!(self, l => Box::pin(l.stage(records)));
        staged
    }

    async fn read(&self, from: Offset, max: usize) -> Result<Vec<(Offset, LogRecord)>, LogError> {
        delegate!(self, l => l.read(from, max).await)
    }

    async fn wait_readable(&self, from: Offset, timeout: Duration) {
        delegate!(self, l => l.wait_readable(from, timeout).await)
    }

    fn next_offset(&self) -> Offset {
        delegate!(self, l => l.next_offset())
    }

    async fn read_early(&self, from: Offset, max: usize, epoch: u64) -> Result<Vec<(Offset, LogRecord)>, LogError> {
        delegate!(self, l => l.read_early(from, max, epoch).await)
    }

    fn reads_early(&self) -> bool {
        delegate!(self, l => l.reads_early())
    }

    fn early_epoch(&self) -> u64 {
        delegate!(self, l => l.early_epoch())
    }

    fn early_head(&self) -> Offset {
        delegate!(self, l => l.early_head())
    }

    async fn wait_early(&self, from: Offset, timeout: Duration) {
        delegate!(self, l => l.wait_early(from, timeout).await)
    }

    fn records_behind(&self, from: Offset) -> u64 {
        delegate!(self, l => l.records_behind(from))
    }

    async fn relation(&self, key: RelationKey) -> Result<Option<Relation>, LogError> {
        delegate!(self, l => l.relation(key).await)
    }

    async fn previous_relation(&self, oid: u32, before: Offset) -> Result<Option<RelationKey>, LogError> {
        delegate!(self, l => l.previous_relation(oid, before).await)
    }

    async fn recover_writer(&self) -> Result<WriterState, LogError> {
        delegate!(self, l => l.recover_writer().await)
    }

    async fn consumers(&self) -> Result<Vec<(String, Offset)>, LogError> {
        delegate!(self, l => l.consumers().await)
    }

    async fn commit_consumer(&self, name: &str, next: Offset) -> Result<(), LogError> {
        delegate!(self, l => l.commit_consumer(name, next).await)
    }

    async fn record_source(&self, source: &crate::SourceIdentity) -> Result<(), LogError> {
        delegate!(self, l => l.record_source(source).await)
    }

    async fn resync_marks(&self) -> Result<Vec<(Offset, ResyncMark)>, LogError> {
        delegate!(self, l => l.resync_marks().await)
    }

    async fn consumer_position(&self, name: &str) -> Result<Option<Offset>, LogError> {
        delegate!(self, l => l.consumer_position(name).await)
    }

    async fn remove_consumer(&self, name: &str) -> Result<(), LogError> {
        delegate!(self, l => l.remove_consumer(name).await)
    }

    async fn seek(&self, after: Cursor) -> Result<Seek, LogError> {
        delegate!(self, l => l.seek(after).await)
    }

    async fn cursor_at_time(&self, commit_time_us: i64) -> Result<Option<Cursor>, LogError> {
        delegate!(self, l => l.cursor_at_time(commit_time_us).await)
    }

    async fn head_cursor(&self) -> Result<Option<Cursor>, LogError> {
        delegate!(self, l => l.head_cursor().await)
    }

    async fn apply_retention(&self, keep_since_us: Option<i64>) -> Result<u64, LogError> {
        delegate!(self, l => l.apply_retention(keep_since_us).await)
    }
}
