//! The newest appended batches, kept in memory from before their fsync: what an applier reads
//! early (see [`crate::ChangeLog::read_early`]) instead of waiting for the fsync and reading the
//! records back from the file and decoding them.

use crate::Offset;
use std::collections::VecDeque;
use std::sync::Arc;
use synapse_schemas::{LogRecord, Relation, RelationKey};

/// Encoded bytes of durable batches kept for readers a little behind the writer (batches not
/// yet durable are always kept). Small: an applier at the head reads a batch as it is staged,
/// one further behind reads the file; records held longer are freed late, which cost bench P4
/// stalls in the allocator's page purging (8 MiB: p99 16–30 ms alone, 1 MiB: see BENCHMARKS).
pub(super) const KEEP_DURABLE_BYTES: usize = 1 << 20;
/// Durable batches kept at most: live traffic stages many small batches.
const KEEP_DURABLE_BATCHES: usize = 16;

struct Batch {
    first: Offset,
    records: Arc<Vec<LogRecord>>,
    bytes: usize,
}

impl Batch {
    fn end(&self) -> Offset {
        self.first + self.records.len() as Offset
    }
}

#[derive(Default)]
pub(super) struct Tail {
    batches: VecDeque<Batch>,
    /// Encoded bytes of `batches`.
    bytes: usize,
    /// Bumped when batches not yet durable were dropped (their append failed): a reader that
    /// read them must check its position again.
    epoch: u64,
}

impl Tail {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A batch given offsets from `first` on (where the last one held ends). Batches below
    /// `durable` past the byte budget are let go; those not yet written never are.
    pub fn push(&mut self, first: Offset, records: Arc<Vec<LogRecord>>, bytes: usize, durable: Offset) {
        if self.batches.back().is_some_and(|b| b.end() != first) {
            self.batches.clear(); // the store was reopened further on: start again
            self.bytes = 0;
        }
        while self.bytes > KEEP_DURABLE_BYTES || self.batches.len() > KEEP_DURABLE_BATCHES {
            match self.batches.front() {
                Some(old) if old.end() <= durable => self.bytes -= old.bytes,
                _ => break,
            }
            self.batches.pop_front();
        }
        self.bytes += bytes;
        self.batches.push_back(Batch { first, records, bytes });
    }

    /// Drops every batch at or after `durable` (their append failed).
    pub fn rewind(&mut self, durable: Offset) {
        let before = self.batches.len();
        self.batches.retain(|b| b.end() <= durable);
        self.bytes = self.batches.iter().map(|b| b.bytes).sum();
        if self.batches.len() != before {
            self.epoch += 1;
        }
    }

    /// The first offset held, if any.
    pub fn start(&self) -> Option<Offset> {
        self.batches.front().map(|b| b.first)
    }

    /// Up to `max` records from `from` on (contiguous), as shared batches and the range of each
    /// to take: the caller clones them outside the lock.
    pub fn slices(&self, from: Offset, max: usize) -> Vec<(Offset, Arc<Vec<LogRecord>>, std::ops::Range<usize>)> {
        let mut out = Vec::new();
        let mut at = from;
        let mut left = max;
        // Batches are in offset order: start at the one holding `from`.
        let skip = self.batches.partition_point(|b| b.end() <= from);
        for b in self.batches.range(skip..) {
            if left == 0 {
                break;
            }
            if b.first > at {
                break; // not contiguous (cannot happen: batches follow each other)
            }
            let lo = (at - b.first) as usize;
            let hi = b.records.len().min(lo + left);
            out.push((at, b.records.clone(), lo..hi));
            left -= hi - lo;
            at = b.first + hi as Offset;
        }
        out
    }

    /// The definition of `key` if a batch held here registers it.
    pub fn relation(&self, key: RelationKey) -> Option<Relation> {
        self.batches.iter().rev().flat_map(|b| b.records.iter()).find_map(|r| match r {
            LogRecord::Relation(rel) if rel.key() == key => Some(rel.clone()),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synapse_schemas::Lsn;

    fn batch(n: usize) -> Arc<Vec<LogRecord>> {
        Arc::new((0..n).map(|i| LogRecord::Discarded { commit_lsn: Lsn(i as u64) }).collect())
    }

    #[test]
    fn slices_span_batches_and_durable_batches_are_bounded() {
        let mut t = Tail::default();
        t.push(0, batch(3), 10, 0);
        t.push(3, batch(2), 10, 0);
        let s = t.slices(1, 3);
        assert_eq!(s.iter().map(|(at, _, r)| (*at, r.clone())).collect::<Vec<_>>(), vec![(1, 1..3), (3, 0..1)]);
        assert!(t.slices(5, 3).is_empty(), "nothing past the end");
        // Batches not yet durable stay, whatever their size.
        t.push(5, batch(1), KEEP_DURABLE_BYTES, 0);
        t.push(6, batch(1), KEEP_DURABLE_BYTES, 0);
        assert_eq!(t.start(), Some(0));
        // Durable ones beyond the budget go, oldest first.
        t.push(7, batch(1), KEEP_DURABLE_BYTES, 6);
        assert_eq!(t.start(), Some(6));
        assert_eq!(t.epoch(), 0);
    }

    #[test]
    fn batches_that_never_became_durable_are_dropped_with_a_new_epoch() {
        let mut t = Tail::default();
        t.push(0, batch(3), 10, 0);
        t.push(3, batch(2), 10, 3);
        t.rewind(3);
        assert_eq!(t.epoch(), 1);
        assert_eq!(t.slices(0, 10).iter().map(|(_, _, r)| r.len()).sum::<usize>(), 3);
        t.rewind(3);
        assert_eq!(t.epoch(), 1, "nothing more to drop");
        // A writer that starts elsewhere (the store reopened further on) replaces what is held.
        t.push(10, batch(1), 10, 10);
        assert_eq!(t.start(), Some(10));
    }
}
