//! Memory and database bytes per recorded task run.
//!
//! ```text
//! cargo bench -p kiln --bench memory
//! ```
//!
//! Runs flows of trivial task runs (chained and submitted) and prints how much resident
//! memory the process gained per task run while the flow ran (peak) and kept afterwards,
//! and how many bytes each task run adds to the SQLite file.

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
    Ok(kiln::join_all(trivial.map(0..n)).await?.into_iter().sum())
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn db_bytes(home: &std::path::Path) -> u64 {
    ["kiln.db", "kiln.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(home.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let engine = kiln::Engine::open(home.path()).unwrap();
    // Warm up: runtime, SQLite caches, allocator arenas.
    rt.block_on(engine.scope(chain(1_000))).unwrap();
    println!(
        "{:<22} {:>14} {:>16} {:>14}",
        "workload", "peak B/run", "retained B/run", "db B/run"
    );
    for (name, n) in [("chain 100000", 100_000u64), ("submitted 100000", 100_000)] {
        let (before, _) = rss_kib();
        let db_before = db_bytes(home.path());
        rt.block_on(engine.scope(async {
            if name.starts_with("chain") {
                chain(n).await
            } else {
                fan_out(n).await.map(|_| n)
            }
        }))
        .unwrap();
        let (after, peak) = rss_kib();
        let db_after = db_bytes(home.path());
        println!(
            "{:<22} {:>14.0} {:>16.0} {:>14.0}",
            name,
            (peak.saturating_sub(before) * 1024) as f64 / n as f64,
            (after.saturating_sub(before) * 1024) as f64 / n as f64,
            db_after.saturating_sub(db_before) as f64 / n as f64,
        );
    }
}
