//! Bounded model check (stateright) of replicated writes resolved by `resolve`: three nodes
//! write one row (set a last-writer-wins column, increment a counter, delete), every write is
//! sent to the other nodes, and the network reorders and duplicates messages (a capture that
//! restarts resends what it had not confirmed). Every reachable state is explored.
//!
//! Invariants, in every state where nothing is in flight any more:
//! * convergence: all nodes hold the same row (existence, causal history, visible values);
//! * no acknowledged increment lost: the counter equals the sum of all increments, deleted row
//!   or not (tombstones keep their cells).
#![allow(clippy::unwrap_used)]

mod support;

use stateright::{Checker, Model, Property};
use std::hash::{Hash, Hasher};
use support::{counter_value, encode, local_write, policy, view, Write, NODES};
use synapse_resolver::{resolve, Decision, RowVersion, TablePolicy};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    Write(usize, Write),
    /// Deliver message `i`; `keep` leaves a copy in flight (a duplicate later).
    Deliver(usize, bool),
}

#[derive(Clone, Debug)]
struct State {
    rows: [Option<RowVersion>; NODES],
    /// Last HLC wall reading per node (a logical clock is enough: HLC only orders concurrency).
    clocks: [u64; NODES],
    writes_left: [u8; NODES],
    /// (to, version) in flight, kept sorted by its encoding so equal multisets are equal states.
    network: Vec<(usize, RowVersion)>,
    increments: i64,
    merges: u32,
}

impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        for r in &self.rows {
            r.as_ref().map(encode).hash(h);
        }
        self.clocks.hash(h);
        self.writes_left.hash(h);
        for (to, v) in &self.network {
            to.hash(h);
            encode(v).hash(h);
        }
        self.increments.hash(h);
    }
}

impl PartialEq for State {
    fn eq(&self, o: &Self) -> bool {
        let rows = |s: &State| s.rows.iter().map(|r| r.as_ref().map(encode)).collect::<Vec<_>>();
        let net = |s: &State| s.network.iter().map(|(t, v)| (*t, encode(v))).collect::<Vec<_>>();
        rows(self) == rows(o)
            && self.clocks == o.clocks
            && self.writes_left == o.writes_left
            && net(self) == net(o)
            && self.increments == o.increments
    }
}

impl Eq for State {}

struct Mesh {
    policy: TablePolicy,
    writes_per_node: u8,
}

impl Model for Mesh {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            rows: [None, None, None],
            clocks: [0; NODES],
            writes_left: [self.writes_per_node; NODES],
            network: Vec::new(),
            increments: 0,
            merges: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for n in 0..NODES {
            if s.writes_left[n] > 0 {
                for w in Write::choices(n) {
                    actions.push(Action::Write(n, w));
                }
            }
        }
        for i in 0..s.network.len() {
            actions.push(Action::Deliver(i, false));
            actions.push(Action::Deliver(i, true));
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut s = s.clone();
        match action {
            Action::Write(n, w) => {
                let row = local_write(s.rows[n].as_ref(), n, &mut s.clocks[n], w);
                if w == Write::Increment {
                    s.increments += 1;
                }
                for to in (0..NODES).filter(|t| *t != n) {
                    s.network.push((to, row.clone()));
                }
                s.rows[n] = Some(row);
                s.writes_left[n] -= 1;
            }
            Action::Deliver(i, keep) => {
                let (to, msg) = s.network[i].clone();
                if !keep {
                    s.network.remove(i);
                }
                let (decision, row) = resolve(&self.policy, s.rows[to].as_ref(), &msg);
                if decision == Decision::Merge {
                    s.merges += 1;
                }
                // The receiving node's clock moves past what it saw (HLC receive rule).
                s.clocks[to] = s.clocks[to].max(row.stamp.hlc.wall_ms);
                if keep && decision == Decision::Skip {
                    // A duplicate that changes nothing leads back to a visited state.
                    return None;
                }
                s.rows[to] = Some(row);
            }
        }
        s.network.sort_by_key(|(t, v)| (*t, encode(v)));
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("quiescent nodes converge", |_, s: &State| {
                if !s.network.is_empty() {
                    return true;
                }
                let first = view(&s.rows[0]);
                s.rows.iter().all(|r| view(r) == first)
            }),
            Property::always("no acknowledged increment is lost", |_, s: &State| {
                !s.network.is_empty() || s.rows.iter().all(|r| counter_value(r) == s.increments)
            }),
            Property::sometimes("a concurrent merge happens", |_, s: &State| s.merges > 0),
        ]
    }
}

#[test]
fn three_nodes_converge_under_reordering_and_duplication() {
    let model = Mesh { policy: policy(), writes_per_node: 1 };
    let checker = model.checker().spawn_bfs().join();
    checker.assert_properties();
    let states = checker.unique_state_count();
    eprintln!("explored {states} unique states");
    assert!(states > 1_000, "the model explored suspiciously little: {states}");
}
