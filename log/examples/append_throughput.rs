//! Micro-benchmark of the embedded log: append and read 1M change records in batches of
//! various sizes. `cargo run --release -p synapse-log --example append_throughput`
#![allow(clippy::unwrap_used)]

use std::time::Instant;
use synapse_log::{ChangeLog, EmbeddedLog};
use synapse_schemas::{Datum, LogRecord, Op, RelationKey, RowChange};

#[tokio::main]
async fn main() {
    let total = 1_000_000u32;
    let concurrent_reader = std::env::args().any(|a| a == "--with-reader");
    for batch in [1_000u32, 16_384, 65_536] {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(&dir.path().join("a.redb"), Default::default()).unwrap();
        let reader = concurrent_reader.then(|| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut from = 0;
                while from < u64::from(total) {
                    let r = log.read(from, 8192).await.unwrap();
                    match r.last() {
                        Some((last, _)) => from = last + 1,
                        None => log.wait_readable(from, std::time::Duration::from_millis(100)).await,
                    }
                }
            })
        });
        let started = Instant::now();
        let mut i = 0;
        while i < total {
            let records: Vec<LogRecord> = (i..(i + batch).min(total))
                .map(|n| {
                    LogRecord::Change(RowChange {
                        index: n,
                        relation: RelationKey { oid: 1, version: 2 },
                        op: Op::Insert,
                        before: None,
                        after: Some(
                            vec![
                                Datum::Text(n.to_string()),
                                Datum::Text((n % 1000).to_string()),
                                Datum::Text(format!("{n:032x}")),
                                Datum::Text("2026-11-26 14:03:48.123456+00".into()),
                            ]
                            .into(),
                        ),
                    })
                })
                .collect();
            log.append(records).await.unwrap();
            i += batch;
        }
        let append = started.elapsed();
        if let Some(r) = reader {
            r.await.unwrap();
        }
        let started = Instant::now();
        let mut from = 0;
        loop {
            let r = log.read(from, 8192).await.unwrap();
            let Some((last, _)) = r.last() else { break };
            from = last + 1;
        }
        let read = started.elapsed();
        println!(
            "batch {batch:>6}: append {:>8.0} records/s, read {:>8.0} records/s",
            f64::from(total) / append.as_secs_f64(),
            f64::from(total) / read.as_secs_f64()
        );
    }
}
