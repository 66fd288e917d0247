//! Orchestration overhead of trivial task runs inside a flow, store writes included.
//!
//! ```text
//! cargo bench -p kiln --bench orchestration
//! KILN_BENCH_DATABASE_URL=postgres://... cargo bench -p kiln --features postgres --bench orchestration
//! ```
//!
//! Each iteration runs one flow of N trivial task runs and returns only when every state is
//! durable in the store (the embedded SQLite file, and PostgreSQL when
//! `KILN_BENCH_DATABASE_URL` is set), so the time covers the whole orchestration cost.
//! Criterion reports time per flow; divide by N for the overhead per task run
//! (throughput is reported in task runs per second).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln::prelude::*;

#[task]
async fn trivial(i: u64) -> u64 {
    i + 1
}

#[flow]
async fn chain(n: u64) -> Result<u64, kiln::Error> {
    let mut v = 0;
    for _ in 0..n {
        v = trivial(v).await?;
    }
    Ok(v)
}

#[flow]
async fn fan_out(n: u64) -> Result<u64, kiln::Error> {
    let futures = trivial.map(0..n);
    Ok(kiln::join_all(futures).await?.into_iter().sum())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut engines = vec![("task_runs", kiln::Engine::open(home.path()).unwrap())];
    if let Ok(url) = std::env::var("KILN_BENCH_DATABASE_URL") {
        let settings = kiln::settings::Settings::load(home.path()).unwrap();
        let store = kiln::open_store(home.path(), Some(&url)).unwrap();
        engines.push(("task_runs_postgres", kiln::Engine::with_store(settings, store)));
    }
    for (group_name, engine) in &engines {
        run_group(c, &rt, group_name, engine);
    }
}

fn run_group(c: &mut Criterion, rt: &tokio::runtime::Runtime, group_name: &str, engine: &kiln::Engine) {
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for (name, n) in [("chain", 1_000u64), ("chain", 10_000), ("submitted", 10_000)] {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    rt.block_on(engine.scope(async {
                        match name {
                            "chain" => assert_eq!(chain(n).await.unwrap(), n),
                            _ => assert_eq!(fan_out(n).await.unwrap(), n * (n + 1) / 2),
                        }
                    }));
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
