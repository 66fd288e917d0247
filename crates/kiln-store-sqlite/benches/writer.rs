//! The SQLite writer alone: task runs recorded per second by its thread, with nothing else
//! running in the process (the engine, tokio's workers and the task bodies measured by
//! `kiln`'s benchmarks and `bench/process` are absent). Each run is three writes, as the
//! engine sends them: its creation (Pending), Running, Completed with a result reference.
//!
//! ```sh
//! cargo bench -p kiln-store-sqlite --bench writer
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_store::Store;
use kiln_store::model::{RunKind, Write};
use kiln_store::state::StateType::{Completed, Pending, Running};
use kiln_store::suite;
use kiln_store_sqlite::SqliteStore;

/// Task runs per measured flood.
const RUNS: usize = 10_000;

/// The writes of `RUNS` task runs of one flow, each run's three together.
fn writes(flow_run_id: uuid::Uuid) -> Vec<Write> {
    let mut writes = Vec::with_capacity(3 * RUNS);
    for i in 0..RUNS {
        let mut t = suite::task("step", Some(flow_run_id));
        t.inputs = serde_json::json!({ "x": { "type": "u64", "value": i } }).into();
        t.call_key = Some(format!("suite::step#{i}"));
        let id = t.id;
        writes.push(Write::TaskRun(t));
        writes.push(Write::State(suite::change(RunKind::Task, id, Pending, Running, 1)));
        let mut done = suite::change(RunKind::Task, id, Running, Completed, 1);
        done.result = Some(r#"{"storage":"local","key":"k","serializer":"msgpack"}"#.into());
        writes.push(Write::State(done));
    }
    writes
}

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
                let writes = writes(flow_run_id);
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
