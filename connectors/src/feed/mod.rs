//! Reads one source node's log and turns committed transactions into public events.
//!
//! Only committed transactions are visible: a `Begin` is held back until its `Commit` is in the
//! log, and a transaction that ends in a `Discarded` marker (capture crashed while writing it;
//! it follows again, complete) is skipped. Memory stays bounded for large transactions: the
//! feed buffers at most [`BUFFER_RECORDS`] records and otherwise scans ahead for the commit
//! without keeping what it read.

use crate::filter::RowFilter;
use crate::ConnectorError;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use synapse_log::{ChangeLog, Offset, Seek};
use synapse_schemas::cloudevent::{self, EventContext};
use synapse_schemas::{Begin, Cursor, LogRecord, Op, Relation, RelationKey, ResyncMark, RowChange, Tuple, Value};
use tokio::time::Instant;

/// Records read from the log per call.
const READ_PAGE: usize = 4_096;
/// A transaction bigger than this is not buffered: the feed scans ahead for its end instead.
pub const BUFFER_RECORDS: usize = 16_384;

/// What a change did; the unit of the `operations` filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A table's columns changed (a new relation version appeared in the stream).
    Schema,
    /// A gap in the source's stream (`LogRecord::Resync`): changes were lost; re-read the
    /// source. Delivered to every reader whatever its tables, operations and filter.
    Resync,
}

/// One public event, rendered.
#[derive(Clone, Debug)]
pub struct Event {
    pub cursor: Cursor,
    /// The CloudEvents `id` (`<node>/<cursor>`): stable across redeliveries.
    pub id: String,
    /// `schema.table`.
    pub table: Arc<str>,
    pub op: Operation,
    /// Ordering groups: hashes of table + primary key, before and after the change (equal
    /// unless the change moved the row to another key).
    pub keys: [u64; 2],
    /// Truncates and schema changes are ordered against every other event of the stream.
    pub barrier: bool,
    pub commit_time_us: i64,
    /// Offset of the transaction's `Begin`: reading from here again re-creates this event.
    pub txn_offset: Offset,
    /// The CloudEvent, JSON-encoded (structured mode).
    pub body: Bytes,
    /// The table's definition when the event was written (key columns, types); `None` for
    /// a resync, which concerns every table.
    pub relation: Option<Arc<Relation>>,
}

/// Which events a reader wants.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    /// `schema.table` names; `None` = all.
    pub tables: Option<HashSet<String>>,
    /// `None` = all operations.
    pub operations: Option<HashSet<Operation>>,
    pub filter: Option<RowFilter>,
}

impl Selector {
    fn wants_table(&self, table: &str) -> bool {
        self.tables.as_ref().is_none_or(|t| t.contains(table))
    }
    fn wants_op(&self, op: Operation) -> bool {
        self.operations.as_ref().is_none_or(|o| o.contains(&op))
    }
}

/// Names the source node in events.
#[derive(Clone, Debug)]
pub struct SourceInfo {
    pub node: String,
    pub database: String,
}

/// What one [`ChangeFeed::next_batch`] call produced.
#[derive(Debug, Default)]
pub struct FeedBatch {
    pub events: Vec<Event>,
    /// Everything up to this cursor has been read, delivered here or filtered out: a reader
    /// that resumes after it misses nothing and sees nothing twice. `None` before anything.
    pub position: Option<Cursor>,
    /// Transactions whose `Commit` this batch read, in order (for transaction metadata).
    pub ended: Vec<TxnEnd>,
}

/// The end of a committed transaction, as read by a feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnEnd {
    pub commit_lsn: synapse_schemas::Lsn,
    pub commit_time_us: i64,
    /// How many of the batch's events precede this end: events `[..events_before]` of the
    /// batch belong to this transaction or earlier ones.
    pub events_before: usize,
}

#[derive(Debug)]
enum State {
    /// Between transactions.
    Idle,
    /// Inside a committed transaction whose `Commit` is at `end`.
    Committed { begin: Box<Begin>, begin_offset: Offset, end: Offset, last_index: u32 },
    /// Skipping a discarded transaction up to and including `end`.
    Discarding { end: Offset },
}

/// A reader of one source's change stream that yields committed events after a cursor.
pub struct ChangeFeed<L> {
    log: Arc<L>,
    source: SourceInfo,
    selector: Selector,
    /// Events at or before this cursor were seen by the reader before (resume point).
    after: Option<Cursor>,
    position: Option<Cursor>,
    next_read: Offset,
    buf: VecDeque<(Offset, LogRecord)>,
    state: State,
    /// For a large transaction: how far the scan for its end has come (begin offset, next).
    scan: Option<(Offset, Offset)>,
    relations: HashMap<RelationKey, Arc<Relation>>,
    versions: HashMap<u32, u64>,
    ended: Vec<TxnEnd>,
}

impl<L: ChangeLog> ChangeFeed<L> {
    /// Opens a feed of everything after `after` (`None`: from the oldest retained transaction).
    /// Fails with [`ConnectorError::CursorGone`] when retention deleted what the reader needs.
    pub async fn open(
        log: Arc<L>,
        source: SourceInfo,
        after: Option<Cursor>,
        selector: Selector,
    ) -> Result<Self, ConnectorError> {
        let start = match after {
            Some(c) => match log.seek(c).await? {
                Seek::At(o) => o,
                Seek::Gone { oldest } => return Err(ConnectorError::CursorGone { cursor: c, oldest }),
            },
            None => match log.seek(Cursor::default()).await? {
                Seek::At(o) => o,
                Seek::Gone { oldest: Some(l) } => match log.seek(Cursor { commit_lsn: l, index: 0 }).await? {
                    Seek::At(o) => o,
                    Seek::Gone { .. } => log.next_offset(),
                },
                Seek::Gone { oldest: None } => log.next_offset(),
            },
        };
        Ok(ChangeFeed {
            log,
            source,
            selector,
            after,
            position: after,
            next_read: start,
            buf: VecDeque::new(),
            state: State::Idle,
            scan: None,
            relations: HashMap::new(),
            versions: HashMap::new(),
            ended: Vec::new(),
        })
    }

    /// The next log offset the feed reads (to wait for new records).
    pub fn read_offset(&self) -> Offset {
        self.next_read
    }

    pub fn position(&self) -> Option<Cursor> {
        self.position
    }

    /// The offset a reader must keep (for retention) to re-create everything after
    /// [`Self::position`].
    pub fn retention_offset(&self) -> Offset {
        match &self.state {
            State::Committed { begin_offset, .. } => *begin_offset,
            _ => self.buf.front().map_or(self.next_read, |(o, _)| *o),
        }
    }

    /// Returns up to `max` events, waiting up to `wait` for the first one. An empty batch with
    /// a moved `position` means only filtered-out traffic passed.
    pub async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<FeedBatch, ConnectorError> {
        let deadline = Instant::now() + wait;
        let mut events = Vec::new();
        while events.len() < max {
            if self.buf.is_empty() && !self.fill().await? {
                if !events.is_empty() || !self.wait_until(deadline).await {
                    break;
                }
                continue;
            }
            let Some((offset, _)) = self.buf.front() else { continue };
            let offset = *offset;
            match &self.state {
                State::Discarding { end } => {
                    if offset >= *end {
                        self.state = State::Idle;
                    }
                    self.buf.pop_front();
                }
                State::Idle => {
                    if !matches!(self.buf.front(), Some((_, LogRecord::Begin(_)))) {
                        // Records before the first Begin (a read that started inside a
                        // transaction retention cut) or markers between transactions.
                        match self.buf.pop_front() {
                            Some((_, LogRecord::Relation(r))) => {
                                self.remember(r);
                            }
                            Some((offset, LogRecord::Resync(mark))) => {
                                let cursor = mark.cursor();
                                if self.after.is_none_or(|a| a < cursor) {
                                    events.push(self.resync_event(offset, &mark));
                                }
                                self.position = Some(self.position.map_or(cursor, |p| p.max(cursor)));
                            }
                            _ => {}
                        }
                        continue;
                    }
                    match self.find_end(offset).await? {
                        Some((end, true)) => {
                            let Some((_, LogRecord::Begin(begin))) = self.buf.pop_front() else { continue };
                            self.state =
                                State::Committed { begin: Box::new(begin), begin_offset: offset, end, last_index: 0 };
                        }
                        Some((end, false)) => self.state = State::Discarding { end },
                        None => {
                            // The transaction is still being written.
                            if !events.is_empty() || !self.wait_until(deadline).await {
                                break;
                            }
                        }
                    }
                }
                State::Committed { .. } => {
                    let Some((_, record)) = self.buf.pop_front() else { continue };
                    self.consume(offset, record, &mut events).await?;
                }
            }
        }
        Ok(FeedBatch { events, position: self.position, ended: std::mem::take(&mut self.ended) })
    }

    /// Waits for new records; false once the deadline passed.
    async fn wait_until(&self, deadline: Instant) -> bool {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        self.log.wait_readable(self.next_read, deadline - now).await;
        true
    }

    /// Reads the next page into the buffer; false if there was nothing new.
    async fn fill(&mut self) -> Result<bool, ConnectorError> {
        let page = self.log.read(self.next_read, READ_PAGE).await?;
        let Some((last, _)) = page.last() else { return Ok(false) };
        self.next_read = last + 1;
        self.buf.extend(page);
        Ok(true)
    }

    /// Finds the terminal record of the transaction beginning at `begin`: `(offset, committed)`,
    /// or `None` if it is not written yet.
    async fn find_end(&mut self, begin: Offset) -> Result<Option<(Offset, bool)>, ConnectorError> {
        let terminal = |(o, r): &(Offset, LogRecord)| match r {
            LogRecord::Commit(_) if *o > begin => Some((*o, true)),
            LogRecord::Discarded { .. } if *o > begin => Some((*o, false)),
            _ => None,
        };
        loop {
            if let Some(found) = self.buf.iter().find_map(terminal) {
                self.scan = None;
                return Ok(Some(found));
            }
            if self.buf.len() >= BUFFER_RECORDS {
                break;
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
        // Too big to buffer: scan ahead without keeping the records.
        let mut from = match self.scan {
            Some((b, next)) if b == begin => next,
            _ => self.next_read,
        };
        loop {
            let page = self.log.read(from, READ_PAGE).await?;
            let Some((last, _)) = page.last() else {
                self.scan = Some((begin, from));
                return Ok(None);
            };
            from = last + 1;
            if let Some(found) = page.iter().find_map(terminal) {
                self.scan = None;
                return Ok(Some(found));
            }
        }
    }

    fn remember(&mut self, rel: Relation) -> Option<Arc<Relation>> {
        let key = rel.key();
        let previous = self.versions.insert(rel.oid, key.version);
        let rel = Arc::new(rel);
        self.relations.insert(key, rel.clone());
        match previous {
            Some(v) if v != key.version => Some(rel),
            _ => None,
        }
    }

    async fn relation(&mut self, key: RelationKey) -> Result<Arc<Relation>, ConnectorError> {
        if let Some(r) = self.relations.get(&key) {
            return Ok(r.clone());
        }
        let rel = self.log.relation(key).await?.ok_or(ConnectorError::UnknownRelation { oid: key.oid })?;
        let rel = Arc::new(rel);
        self.relations.insert(key, rel.clone());
        Ok(rel)
    }

    async fn consume(&mut self, offset: Offset, record: LogRecord, out: &mut Vec<Event>) -> Result<(), ConnectorError> {
        let State::Committed { begin, begin_offset, end, last_index } = &self.state else { return Ok(()) };
        let (begin, begin_offset, end, index) = (begin.clone(), *begin_offset, *end, *last_index);
        let lsn = begin.commit_lsn;
        let after = self.after;
        let seen = |index: u32| after.is_some_and(|a| Cursor { commit_lsn: lsn, index } <= a);
        match record {
            LogRecord::Relation(r) => {
                // A reader that started after the previous definition asks the log for it.
                if !self.versions.contains_key(&r.oid) {
                    if let Some(prev) = self.log.previous_relation(r.oid, offset).await? {
                        self.versions.insert(r.oid, prev.version);
                    }
                }
                if let Some(changed) = self.remember(r) {
                    let ctx = EventContext { node: &self.source.node, database: &self.source.database, begin: &begin };
                    let table: Arc<str> = changed.name().into();
                    if !seen(index) && self.selector.wants_table(&table) && self.selector.wants_op(Operation::Schema) {
                        let mut json = cloudevent::schema_change_event(&ctx, &changed, index);
                        // Several tables may change between two changes: the id names the table.
                        json["id"] =
                            format!("{}/{}/schema/{}", self.source.node, Cursor { commit_lsn: lsn, index }, table)
                                .into();
                        out.push(event(
                            json,
                            Cursor { commit_lsn: lsn, index },
                            (table, Some(changed.clone())),
                            Operation::Schema,
                            &begin,
                            begin_offset,
                            [0; 2],
                            true,
                        ));
                    }
                }
            }
            LogRecord::Change(c) => {
                if let State::Committed { last_index, .. } = &mut self.state {
                    *last_index = c.index;
                }
                let cursor = Cursor { commit_lsn: lsn, index: c.index };
                if !seen(c.index) {
                    let rel = self.relation(c.relation).await?;
                    if let Some(e) = self.render_change(&begin, begin_offset, &rel, &c, cursor) {
                        out.push(e);
                    }
                }
                self.position = Some(cursor);
            }
            LogRecord::Truncate(t) => {
                if let State::Committed { last_index, .. } = &mut self.state {
                    *last_index = t.index;
                }
                let cursor = Cursor { commit_lsn: lsn, index: t.index };
                if !seen(t.index) && self.selector.wants_op(Operation::Truncate) {
                    let many = t.relations.len() > 1;
                    for key in &t.relations {
                        let rel = self.relation(*key).await?;
                        let table: Arc<str> = rel.name().into();
                        if !self.selector.wants_table(&table) {
                            continue;
                        }
                        let ctx =
                            EventContext { node: &self.source.node, database: &self.source.database, begin: &begin };
                        let mut json = cloudevent::truncate_event(&ctx, &rel, t.index);
                        if many {
                            json["id"] = format!("{}/{}/{}", self.source.node, cursor, table).into();
                        }
                        out.push(event(
                            json,
                            cursor,
                            (table, Some(rel.clone())),
                            Operation::Truncate,
                            &begin,
                            begin_offset,
                            [0; 2],
                            true,
                        ));
                    }
                }
                self.position = Some(cursor);
            }
            LogRecord::Commit(c) => {
                self.position = Some(Cursor { commit_lsn: lsn, index: c.event_count.saturating_add(1) });
                self.ended.push(TxnEnd {
                    commit_lsn: lsn,
                    commit_time_us: begin.commit_time_us,
                    events_before: out.len(),
                });
                self.state = State::Idle;
            }
            // The statement, per table it touched; the new relation follows with the rows.
            LogRecord::Schema(change) => {
                let ctx = EventContext { node: &self.source.node, database: &self.source.database, begin: &begin };
                let statement = synapse_postgres::ddl::statement(&change.sql, change.nth, &change.tag).ok();
                for (n, table) in change.tables.iter().enumerate() {
                    if seen(index) || !self.selector.wants_table(table) || !self.selector.wants_op(Operation::Schema) {
                        continue;
                    }
                    let mut json = cloudevent::ddl_event(&ctx, &change, statement.as_deref(), table, index);
                    // Several statements (and tables) may come between two changes.
                    json["id"] =
                        format!("{}/{}/ddl/{offset}/{n}", self.source.node, Cursor { commit_lsn: lsn, index }).into();
                    out.push(event(
                        json,
                        Cursor { commit_lsn: lsn, index },
                        (table.as_str().into(), None),
                        Operation::Schema,
                        &begin,
                        begin_offset,
                        [0; 2],
                        true,
                    ));
                }
            }
            LogRecord::Begin(_) | LogRecord::Discarded { .. } | LogRecord::Resync(_) => {
                // Cannot happen inside a committed transaction (they never interleave); treat
                // it as the end of this one rather than trusting the rest.
                tracing::warn!(offset, end, "unexpected record inside a committed transaction");
                self.state = State::Idle;
            }
        }
        Ok(())
    }

    /// The control event of a gap, for every reader (a gap concerns every table).
    fn resync_event(&self, offset: Offset, mark: &ResyncMark) -> Event {
        let snapshot = format!("/v1/streams/{}/snapshot", self.source.node);
        let json = cloudevent::resync_event(&self.source.node, &self.source.database, mark, Some(&snapshot));
        Event {
            cursor: mark.cursor(),
            id: json["id"].as_str().unwrap_or_default().to_owned(),
            table: "*".into(),
            op: Operation::Resync,
            keys: [0; 2],
            barrier: true,
            commit_time_us: mark.found_at_us,
            txn_offset: offset,
            body: Bytes::from(serde_json::to_vec(&json).unwrap_or_default()),
            relation: None,
        }
    }

    fn render_change(
        &self,
        begin: &Begin,
        begin_offset: Offset,
        rel: &Arc<Relation>,
        c: &RowChange,
        cursor: Cursor,
    ) -> Option<Event> {
        let op = match c.op {
            Op::Insert => Operation::Insert,
            Op::Update => Operation::Update,
            Op::Delete => Operation::Delete,
        };
        let table: Arc<str> = rel.name().into();
        if !self.selector.wants_table(&table) || !self.selector.wants_op(op) {
            return None;
        }
        if let Some(f) = &self.selector.filter {
            let image = if c.op == Op::Delete { c.before.as_ref().map(|(_, t)| t) } else { c.after.as_ref() };
            if !image.is_some_and(|t| f.matches(&cloudevent::row_json(rel, t))) {
                return None;
            }
        }
        let ctx = EventContext { node: &self.source.node, database: &self.source.database, begin };
        let mut body = Vec::with_capacity(512);
        cloudevent::write_change_event(&ctx, rel, c, &mut body);
        let after = c.after.as_ref().map(|t| key_hash(rel, t));
        let before = c.before.as_ref().map(|(_, t)| key_hash(rel, t));
        let keys = match (before, after) {
            (Some(b), Some(a)) => [b, a],
            (Some(k), None) | (None, Some(k)) => [k, k],
            (None, None) => [0, 0],
        };
        Some(Event {
            cursor,
            id: format!("{}/{}", self.source.node, cursor),
            table,
            op,
            keys,
            barrier: false,
            commit_time_us: begin.commit_time_us,
            txn_offset: begin_offset,
            body: Bytes::from(body),
            relation: Some(rel.clone()),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn event(
    json: serde_json::Value,
    cursor: Cursor,
    (table, relation): (Arc<str>, Option<Arc<Relation>>),
    op: Operation,
    begin: &Begin,
    txn_offset: Offset,
    keys: [u64; 2],
    barrier: bool,
) -> Event {
    let id = json["id"].as_str().unwrap_or_default().to_owned();
    // Serialising a `Value` cannot fail (string keys only).
    let body = Bytes::from(serde_json::to_vec(&json).unwrap_or_default());
    Event { cursor, id, table, op, keys, barrier, commit_time_us: begin.commit_time_us, txn_offset, body, relation }
}

/// FNV-1a over the table and its key values: the per-key ordering group of a row.
fn key_hash(rel: &Relation, row: &Tuple) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(&rel.oid.to_le_bytes());
    for ((_, col), v) in rel.columns.iter().enumerate().zip(row.values()).filter(|((_, c), _)| c.is_key) {
        eat(col.name.as_bytes());
        match v {
            Value::Text(t) => eat(t.as_bytes()),
            Value::Null => eat(b"\0n"),
            Value::UnchangedToast => eat(b"\0u"),
        }
    }
    h
}

/// Parses a cursor given by a user, naming the parameter on error.
pub fn parse_cursor(field: &str, s: &str) -> Result<Cursor, ConnectorError> {
    s.parse().map_err(|e| ConnectorError::BadRequest { field: field.to_owned(), message: format!("{e}") })
}

#[cfg(test)]
mod tests;
