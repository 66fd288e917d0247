//! The SQLite writer alone: task runs recorded per second by its thread, with nothing else
//! running in the process (the engine, tokio's workers and the task bodies measured by
//! `kiln`'s benchmarks and `bench/process` are absent). Each run is three writes, as the
//! engine sends them: its creation (Pending), Running, Completed (`suite::task_run_flood`).
//!
//! ```sh
//! cargo bench -p kiln-store-sqlite --bench writer
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_store::Store;
use kiln_store::model::Write;
use kiln_store::suite;
use kiln_store_sqlite::SqliteStore;

/// Task runs per measured flood.
const RUNS: usize = 10_000;

fn writer(c: &mut Criterion) {
    let rt = suite::runtime();
    let mut group = c.benchmark_group("sqlite_writer");
    group.sample_size(20).measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(RUNS as u64));
    group.bench_function("task_runs_10000", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                // A new database each time: the writer's cost on a table that grows from
                // empty, as in a fresh process, not on one grown by earlier iterations.
                let dir = tempfile::tempdir().expect("a temporary directory");
                let store = SqliteStore::open(dir.path().join("kiln.db")).expect("the store opens");
                let flow = suite::flow("flood", None);
                let flow_run_id = flow.id;
                store.send(Write::FlowRun(flow), None).expect("sent");
                rt.block_on(store.flush()).expect("the flow run is recorded");
                let writes = suite::task_run_flood(flow_run_id, RUNS);
                let started = Instant::now();
                for w in writes {
                    store.send(w, None).expect("sent");
                }
                rt.block_on(store.flush()).expect("every write is recorded");
                took += started.elapsed();
                black_box(&store);
            }
            took
        })
    });
    group.finish();
}

criterion_group!(benches, writer);
criterion_main!(benches);
