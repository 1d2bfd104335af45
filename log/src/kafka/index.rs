//! The Kafka log's in-memory index, rebuilt at open from the changes topic and kept current by
//! appends and reads: transactions by commit LSN, relations, gap marks, record counts, and the
//! packing of (message, index in it) into one log offset.

use crate::Offset;
use std::collections::{BTreeMap, HashMap};
use synapse_schemas::{LogRecord, Relation, RelationKey, ResyncMark};

/// Records per message are below 2^20 (`max_message_bytes` keeps them far below: a record
/// takes more than 4 bytes).
pub(super) const INDEX_BITS: u32 = 20;
/// The log offset of record `index` of the message at Kafka offset `message`.
pub(super) fn pack(message: i64, index: usize) -> Offset {
    ((message.max(0) as u64) << INDEX_BITS) | index as u64
}

/// (Kafka offset of the message, index in it).
pub(super) fn unpack(offset: Offset) -> (i64, usize) {
    ((offset >> INDEX_BITS) as i64, (offset & ((1 << INDEX_BITS) - 1)) as usize)
}

/// A transaction in the index: offsets of its `Begin` and `Commit` (`None` while open), its
/// event count and commit time.
#[derive(Clone, Copy, Debug)]
pub(super) struct Txn {
    pub(super) begin: Offset,
    pub(super) commit: Option<Offset>,
    pub(super) events: u32,
    pub(super) time_us: i64,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) txns: BTreeMap<u64, Txn>,
    /// Offsets of `Relation` records, and the relations by key.
    pub(super) relations: HashMap<RelationKey, Relation>,
    pub(super) history: BTreeMap<(u32, Offset), u64>,
    pub(super) open: Option<u64>,
    pub(super) last_commit_end: Option<u64>,
    /// Every offset below this one has been indexed.
    pub(super) indexed: Offset,
    pub(super) consumers: BTreeMap<String, Offset>,
    /// Gap marks: indexed from the topic, and loaded from the consumers topic (where each is
    /// also stored, so the broker's retention never forgets one).
    pub(super) resyncs: BTreeMap<Offset, ResyncMark>,
    /// The source identity, from the consumers topic.
    pub(super) source: Option<crate::SourceIdentity>,
    /// The last message indexed: its Kafka offset and how many records it holds so far.
    pub(super) last_message: Option<(i64, usize)>,
    /// Records indexed before each indexed message (for lag in records); 16 bytes a message.
    pub(super) records_before: BTreeMap<i64, u64>,
    /// Records indexed in all.
    pub(super) records: u64,
}

impl State {
    pub(super) fn index(&mut self, offset: Offset, r: &LogRecord) {
        if offset < self.indexed {
            return;
        }
        self.indexed = offset + 1;
        let (message, index) = unpack(offset);
        self.last_message = Some((message, index + 1));
        self.records_before.entry(message).or_insert(self.records.saturating_sub(index as u64));
        self.records += 1;
        match r {
            LogRecord::Begin(b) => {
                self.open = Some(b.commit_lsn.0);
                self.txns
                    .insert(b.commit_lsn.0, Txn { begin: offset, commit: None, events: 0, time_us: b.commit_time_us });
            }
            LogRecord::Commit(c) => {
                self.open = None;
                self.last_commit_end = Some(c.end_lsn.0);
                if let Some(t) = self.txns.get_mut(&c.commit_lsn.0) {
                    t.commit = Some(offset);
                    t.events = c.event_count;
                    t.time_us = c.commit_time_us;
                }
            }
            LogRecord::Discarded { commit_lsn } => {
                self.open = None;
                if self.txns.get(&commit_lsn.0).is_some_and(|t| t.commit.is_none()) {
                    self.txns.remove(&commit_lsn.0);
                }
            }
            LogRecord::Relation(rel) => {
                let k = rel.key();
                self.history.insert((k.oid, offset), k.version);
                self.relations.insert(k, rel.clone());
            }
            LogRecord::Resync(mark) => {
                self.resyncs.insert(offset, mark.clone());
            }
            _ => {}
        }
    }
}
