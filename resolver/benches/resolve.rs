//! Resolver micro-benchmarks: `cargo bench -p synapse-resolver`. The per-row cost of conflict
//! handling on the apply path (compare, merge, encode/decode of stored CRDT states).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::json;
use synapse_resolver::column::{Counter, OrSet};
use synapse_resolver::{
    merge_rows, resolve, Cell, Hlc, NodeId, RowVersion, Stamp, Strategy, TablePolicy, VersionVector,
};

fn version(node: u16, writes: u64, wall_ms: u64) -> RowVersion {
    let n = NodeId(node);
    let mut vv = VersionVector::new();
    for other in 1..=4u16 {
        for _ in 0..writes {
            vv.increment(NodeId(other));
        }
    }
    vv.increment(n);
    let hlc = Hlc { wall_ms, logical: 0 };
    let mut counter = Counter::default();
    counter.local_write(n, 0, 5);
    let mut tags = OrSet::default();
    tags.add(n, &json!("red"));
    tags.add(n, &json!(node));
    let cells = [
        ("name".to_string(), Cell::Value { value: json!(format!("name from {node}")), at: (hlc, n) }),
        ("hits".to_string(), Cell::Counter(counter)),
        ("tags".to_string(), Cell::Set(tags)),
    ]
    .into();
    RowVersion { stamp: Stamp { vv, hlc, node: n }, live: true, cells }
}

fn benches(c: &mut Criterion) {
    let policy = TablePolicy {
        columns: [("hits".to_string(), Strategy::Counter), ("tags".to_string(), Strategy::Set)].into(),
        ..Default::default()
    };
    let (a, b) = (version(1, 10, 100), version(2, 10, 101));
    c.bench_function("vv compare, 4 nodes", |bench| {
        bench.iter(|| black_box(&a.stamp.vv).compare(black_box(&b.stamp.vv)))
    });
    c.bench_function("resolve: duplicate (skip)", |bench| {
        bench.iter(|| resolve(&policy, Some(black_box(&a)), black_box(&a)))
    });
    c.bench_function("resolve: concurrent (merge lww + counter + set)", |bench| {
        bench.iter(|| resolve(&policy, Some(black_box(&a)), black_box(&b)))
    });
    c.bench_function("merge_rows", |bench| bench.iter(|| merge_rows(&policy, black_box(&a), black_box(&b))));
    // Baseline: the crdts merges alone on the same states (the floor merge_rows builds on).
    let (Cell::Counter(ca), Cell::Counter(cb)) = (&a.cells["hits"], &b.cells["hits"]) else { return };
    let (Cell::Set(sa), Cell::Set(sb)) = (&a.cells["tags"], &b.cells["tags"]) else { return };
    c.bench_function("baseline: crdts counter + set merges alone", |bench| {
        bench.iter(|| {
            let (mut c2, mut s2) = (black_box(ca).clone(), black_box(sa).clone());
            c2.merge(black_box(cb));
            s2.merge(black_box(sb));
            (c2, s2)
        })
    });
    let cell = b.cells["tags"].clone();
    let bytes = cell.encode();
    c.bench_function("cell encode (or-set)", |bench| bench.iter(|| black_box(&cell).encode()));
    c.bench_function("cell decode (or-set)", |bench| bench.iter(|| Cell::decode(black_box(&bytes))));
}

criterion_group!(resolver, benches);
criterion_main!(resolver);
