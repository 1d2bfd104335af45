//! Bounded model check (stateright) of the whole mesh protocol as the pipeline implements it:
//! capture → log → apply → resolve, with positions, crashes and restarts. Three nodes write one
//! row from fixed scripts; every reachable interleaving of writes, captures, slot confirmations,
//! reads, commits and crashes (within a budget) is explored. Which writes are made is varied by
//! the resolver's own model check (`tests/model.rs`); this one varies when things happen.
//!
//! What each step models (and where the real code is):
//! * **Local write** (`apply/src/mesh.rs`, `synapse_local_write` trigger): the row and its
//!   version commit together; the transaction enters the node's WAL. Applied changes never do:
//!   the applier's session has a replication origin and capture drops those (loop prevention).
//! * **Capture** (`capture/src/replication.rs`): decodes the WAL from its cursor and appends a
//!   transaction to the node's log in two appends (`Begin`+change, then `Commit`: large
//!   transactions stream through in bounded batches). It skips transactions whose LSN is at or
//!   below the last `Commit` in the log, and confirms the replication slot only up to what the
//!   log has acknowledged. A crash loses the cursor: the capture restarts from the slot's
//!   confirmed position, and writer recovery (`ChangeLog::recover_writer`) closes a half-written
//!   transaction with a `Discarded` marker.
//! * **Apply** (`apply/src/lib.rs`): one reader per (source, target) reads the source's log from
//!   the position stored in the target and commits whole source transactions — rows resolved
//!   against the target's row (`resolve`) and the position — in one target transaction. A
//!   `Discarded` marker rolls the open transaction back and re-reads from the stored position,
//!   skipping the discarded range. A crash loses everything not committed. (The applier may
//!   group several source transactions per commit; rolling back a group is, for the target,
//!   an applier crash before that commit, which the model explores.)
//!
//! Invariants: the slot never passes what the log holds; positions are stored only at
//! transaction boundaries; no source transaction is applied twice on a target. Once everything
//! is written, captured, confirmed and applied: all nodes hold the same row, every acknowledged
//! write is present or superseded (each node's version vector covers every write of every node),
//! every increment counts once, and every target applied every other node's transactions.
#![allow(clippy::unwrap_used)]

mod support;

use stateright::{Checker, Model, Property};
use std::hash::{Hash, Hasher};
use support::{counter_value, encode, local_write, policy, view, Write, NODES};
use synapse_resolver::{resolve, Decision, RowVersion, TablePolicy};

/// A source transaction's LSN: its 1-based index in the node's WAL.
type Lsn = u8;
/// A record's position in a node's log.
type Offset = u8;

#[derive(Clone, Debug)]
enum Record {
    Begin(Lsn),
    Change(RowVersion),
    Commit(Lsn),
    Discarded,
}

/// The capture process of one node (volatile: a crash loses it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Capture {
    /// WAL index of the next transaction to decode.
    next: u8,
    /// Its `Begin` and change are in the log, its `Commit` not yet.
    open: bool,
}

/// One applier: a source's log read into one target (volatile).
#[derive(Clone, Debug, Default)]
struct Reader {
    next: Offset,
    /// The source transaction being read: its `Begin` offset and changes so far.
    open: Option<(Offset, Vec<RowVersion>)>,
    /// Log ranges marked discarded, skipped on re-read.
    discarded: Vec<(Offset, Offset)>,
}

#[derive(Clone, Debug)]
struct Node {
    row: Option<RowVersion>,
    clock: u64,
    /// Committed local transactions (one row version each); LSN = index + 1.
    wal: Vec<RowVersion>,
    /// The replication slot's confirmed position: WAL transactions up to it are never resent.
    slot: u8,
    capture: Capture,
    /// This node's change stream (durable).
    log: Vec<Record>,
    /// Per source: the next offset, stored in this node's database with the applied data.
    applied: [Offset; NODES],
    readers: [Reader; NODES],
    /// Ghost: bit `lsn - 1` set once source `s`'s transaction `lsn` committed here.
    applied_lsns: [u32; NODES],
}

#[derive(Clone, Debug)]
struct State {
    nodes: [Node; NODES],
    crashes_left: u8,
    increments: i64,
    /// Ghost flags for the sanity ("sometimes") properties and the "at most once" invariant.
    applied_twice: bool,
    merges: u32,
    rollbacks: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// Node n makes its next scripted write.
    Write(usize),
    /// Capture of node n appends the next WAL transaction's `Begin` and change (or skips it).
    CaptureBegin(usize),
    CaptureCommit(usize),
    ConfirmSlot(usize),
    CrashCapture(usize),
    /// Applier (target, source) reads one record.
    Read(usize, usize),
    CrashApplier(usize, usize),
}

fn encode_record(r: &Record) -> Vec<u8> {
    match r {
        Record::Begin(l) => vec![0, *l],
        Record::Change(v) => [vec![1], encode(v)].concat(),
        Record::Commit(l) => vec![2, *l],
        Record::Discarded => vec![3],
    }
}

/// Canonical bytes of a state (the ghost counters only feed "sometimes" properties).
fn fingerprint(s: &State) -> Vec<u8> {
    let mut out = vec![s.crashes_left, s.applied_twice as u8, (s.merges > 0) as u8, (s.rollbacks > 0) as u8];
    out.extend(s.increments.to_le_bytes());
    for n in &s.nodes {
        out.extend(n.row.as_ref().map(encode).unwrap_or_default());
        out.push(0xff);
        out.extend(n.clock.to_le_bytes());
        out.extend([n.slot, n.capture.next, n.capture.open as u8]);
        out.extend(n.wal.iter().flat_map(encode));
        out.push(0xfe);
        for r in &n.log {
            out.extend(encode_record(r));
        }
        out.push(0xfd);
        out.extend(n.applied);
        for l in n.applied_lsns {
            out.extend(l.to_le_bytes());
        }
        for r in &n.readers {
            out.push(r.next);
            if let Some((b, rows)) = &r.open {
                out.push(*b);
                out.extend(rows.iter().flat_map(encode));
            }
            out.push(0xfb);
            for (a, b) in &r.discarded {
                out.extend([*a, *b]);
            }
            out.push(0xfa);
        }
    }
    out
}

impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        fingerprint(self).hash(h);
    }
}

impl PartialEq for State {
    fn eq(&self, o: &Self) -> bool {
        fingerprint(self) == fingerprint(o)
    }
}

impl Eq for State {}

/// LSN of the last transaction whose `Commit` is in the log (the writer state a restarted
/// capture resumes from).
fn last_commit(log: &[Record]) -> Lsn {
    log.iter().rev().find_map(|r| if let Record::Commit(l) = r { Some(*l) } else { None }).unwrap_or(0)
}

/// Whether the log ends inside a transaction (a `Begin` not followed by `Commit`/`Discarded`).
fn ends_open(log: &[Record]) -> bool {
    for r in log.iter().rev() {
        match r {
            Record::Begin(_) => return true,
            Record::Commit(_) | Record::Discarded => return false,
            Record::Change(_) => {}
        }
    }
    false
}

fn quiescent(model: &Protocol, s: &State) -> bool {
    s.nodes.iter().zip(&model.scripts).all(|(n, script)| {
        n.wal.len() == script.len()
            && !n.capture.open
            && n.capture.next as usize == n.wal.len()
            && n.slot as usize == n.wal.len()
    }) && (0..NODES).all(|t| {
        (0..NODES).filter(|src| *src != t).all(|src| {
            let r = &s.nodes[t].readers[src];
            r.next as usize == s.nodes[src].log.len() && r.open.is_none()
        })
    })
}

struct Protocol {
    policy: TablePolicy,
    /// What each node writes, in order (the resolver's model check varies the writes; this one
    /// varies when they happen, travel, crash and restart).
    scripts: [Vec<Write>; NODES],
    crashes: u8,
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let node = Node {
            row: None,
            clock: 0,
            wal: Vec::new(),
            slot: 0,
            capture: Capture::default(),
            log: Vec::new(),
            applied: [0; NODES],
            readers: Default::default(),
            applied_lsns: [0; NODES],
        };
        vec![State {
            nodes: [node.clone(), node.clone(), node],
            crashes_left: self.crashes,
            increments: 0,
            applied_twice: false,
            merges: 0,
            rollbacks: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (n, node) in s.nodes.iter().enumerate() {
            if node.wal.len() < self.scripts[n].len() {
                actions.push(Action::Write(n));
            }
            if node.capture.open {
                actions.push(Action::CaptureCommit(n));
            } else if (node.capture.next as usize) < node.wal.len() {
                actions.push(Action::CaptureBegin(n));
            }
            if !node.capture.open && node.slot < node.capture.next {
                actions.push(Action::ConfirmSlot(n));
            }
            if s.crashes_left > 0 && node.capture != Capture::default() {
                actions.push(Action::CrashCapture(n));
            }
            for src in (0..NODES).filter(|src| *src != n) {
                let r = &node.readers[src];
                if (r.next as usize) < s.nodes[src].log.len() {
                    actions.push(Action::Read(n, src));
                }
                if s.crashes_left > 0 && r.next > 0 {
                    actions.push(Action::CrashApplier(n, src));
                }
            }
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut s = s.clone();
        match action {
            Action::Write(n) => {
                let node = &mut s.nodes[n];
                let w = self.scripts[n][node.wal.len()];
                let row = local_write(node.row.as_ref(), n, &mut node.clock, w);
                if w == Write::Increment {
                    s.increments += 1;
                }
                node.wal.push(row.clone());
                node.row = Some(row);
            }
            Action::CaptureBegin(n) => {
                let node = &mut s.nodes[n];
                let lsn = node.capture.next + 1;
                if lsn <= last_commit(&node.log) {
                    node.capture.next += 1; // already in the log before a restart
                } else {
                    let change = node.wal[node.capture.next as usize].clone();
                    node.log.extend([Record::Begin(lsn), Record::Change(change)]);
                    node.capture.open = true;
                }
            }
            Action::CaptureCommit(n) => {
                let node = &mut s.nodes[n];
                node.capture.next += 1;
                node.log.push(Record::Commit(node.capture.next));
                node.capture.open = false;
            }
            Action::ConfirmSlot(n) => {
                let node = &mut s.nodes[n];
                node.slot = node.capture.next;
            }
            Action::CrashCapture(n) => {
                s.crashes_left -= 1;
                let node = &mut s.nodes[n];
                node.capture = Capture { next: node.slot, open: false };
                if ends_open(&node.log) {
                    node.log.push(Record::Discarded);
                }
            }
            Action::Read(t, src) => {
                // Reading is private to the applier until it commits, so one step reads up to
                // the next transaction boundary (or the log's end): finer steps only add states
                // that a crash cannot tell apart from these. Each log holds one transaction
                // (one write per node), so a group never holds two: committing at each
                // `Commit` is the applier's grouping for this configuration.
                let stored = s.nodes[t].applied[src];
                let log = s.nodes[src].log.clone();
                let node = &mut s.nodes[t];
                let r = &mut node.readers[src];
                while let Some(record) = log.get(r.next as usize) {
                    let offset = r.next;
                    r.next += 1;
                    if r.discarded.iter().any(|(a, b)| (*a..=*b).contains(&offset)) {
                        continue;
                    }
                    match record {
                        Record::Begin(_) => r.open = Some((offset, Vec::new())),
                        Record::Change(v) => {
                            if let Some((_, rows)) = r.open.as_mut() {
                                rows.push(v.clone());
                            }
                        }
                        Record::Commit(lsn) => {
                            let Some((_, rows)) = r.open.take() else { continue };
                            // One target transaction: the resolved rows and the position.
                            let bit = 1u32 << (lsn - 1);
                            s.applied_twice |= node.applied_lsns[src] & bit != 0;
                            node.applied_lsns[src] |= bit;
                            for v in rows {
                                let (decision, row) = resolve(&self.policy, node.row.as_ref(), &v);
                                if decision == Decision::Merge {
                                    s.merges += 1;
                                }
                                node.row = Some(row);
                            }
                            node.applied[src] = r.next;
                            break;
                        }
                        Record::Discarded => {
                            if let Some((begin, _)) = r.open.take() {
                                r.discarded.push((begin, offset));
                                r.next = stored;
                                s.rollbacks += 1;
                                break;
                            }
                        }
                    }
                }
            }
            Action::CrashApplier(t, src) => {
                s.crashes_left -= 1;
                let node = &mut s.nodes[t];
                node.readers[src] = Reader { next: node.applied[src], ..Reader::default() };
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("the slot never passes what the log holds", |_, s: &State| {
                s.nodes.iter().all(|n| n.slot <= last_commit(&n.log))
            }),
            Property::always("positions are stored at transaction boundaries", |_, s: &State| {
                (0..NODES).all(|t| {
                    (0..NODES).all(|src| match s.nodes[t].applied[src] {
                        0 => true,
                        p => matches!(s.nodes[src].log[p as usize - 1], Record::Commit(_) | Record::Discarded),
                    })
                })
            }),
            Property::always("no source transaction is applied twice", |_, s: &State| !s.applied_twice),
            Property::always("quiescent nodes converge", |m, s: &State| {
                !quiescent(m, s) || s.nodes.iter().all(|n| view(&n.row) == view(&s.nodes[0].row))
            }),
            Property::always("no acknowledged write is lost", |m, s: &State| {
                !quiescent(m, s)
                    || s.nodes.iter().all(|n| {
                        let row = n.row.as_ref().unwrap();
                        (0..NODES).all(|w| {
                            row.stamp.vv.get(synapse_resolver::NodeId(w as u16)) as usize >= s.nodes[w].wal.len()
                        }) && counter_value(&n.row) == s.increments
                    })
            }),
            Property::always("quiescent targets applied every transaction once", |m, s: &State| {
                !quiescent(m, s)
                    || (0..NODES).all(|t| {
                        (0..NODES)
                            .filter(|src| *src != t)
                            .all(|src| s.nodes[t].applied_lsns[src] == (1u32 << s.nodes[src].wal.len()) - 1)
                    })
            }),
            Property::sometimes("a discarded transaction is rolled back and re-read", |m, s: &State| {
                s.rollbacks > 0 && quiescent(m, s)
            }),
            Property::sometimes("a concurrent merge happens", |m, s: &State| s.merges > 0 && quiescent(m, s)),
        ]
    }
}

fn check(model: Protocol) {
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let checker = model.checker().threads(threads).spawn_bfs().join();
    let states = checker.unique_state_count();
    eprintln!("explored {states} unique states in {:?}", started.elapsed());
    checker.assert_properties();
    assert!(states > 10_000, "the model explored suspiciously little: {states}");
}

/// Crash budget (capture or applier crashes, anywhere): `default`, or SYNAPSE_MODEL_CRASHES for
/// a deeper run (each extra crash multiplies the states by about ten).
fn crashes(default: u8) -> u8 {
    std::env::var("SYNAPSE_MODEL_CRASHES").ok().and_then(|c| c.parse().ok()).unwrap_or(default)
}

/// Three concurrent writes of different kinds (an increment, a rename, a delete) on three nodes.
#[test]
fn three_writers_converge_through_crashes_and_restarts() {
    use Write::*;
    check(Protocol {
        policy: policy(),
        scripts: [vec![Increment], vec![SetName(1)], vec![Delete]],
        crashes: crashes(1),
    });
}

/// Two transactions in one node's log (a rename, then an increment) racing an increment from
/// another node, with the third node only applying, and two crashes: a restarted capture must not resend the
/// first transaction once its `Commit` is in the log, nor lose the second.
#[test]
fn two_transactions_from_one_node_apply_once_through_crashes_and_restarts() {
    use Write::*;
    check(Protocol {
        policy: policy(),
        scripts: [vec![SetName(0), Increment], vec![Increment], vec![]],
        crashes: crashes(2),
    });
}
