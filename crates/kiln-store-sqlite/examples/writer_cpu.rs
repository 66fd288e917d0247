//! The CPU time of the SQLite writer's thread per task run: floods of 10,000 task runs (three
//! writes each, as the engine sends them) into a new database, timed by the thread's own CPU
//! clock (`/proc/self/task/*/schedstat`, Linux), which the other threads of a busy machine
//! disturb less than wall time. Prints the better quarter's figure and the best one.
//!
//! ```sh
//! cargo run --release -p kiln-store-sqlite --example writer_cpu -- 15
//! ```

use kiln_store::Store;
use kiln_store::model::Write;
use kiln_store::suite;
use kiln_store_sqlite::SqliteStore;

const RUNS: usize = 10_000;

/// CPU nanoseconds used so far by this process's threads named like the writer.
fn writer_cpu_ns() -> u64 {
    let mut ns = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("Linux's /proc") {
        let task = task.expect("a thread").path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if name.starts_with("kiln-store-writ") {
            let stat = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns
}

fn main() {
    let floods: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(15);
    let rt = suite::runtime();
    let mut per_run = Vec::with_capacity(floods);
    for _ in 0..floods {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = SqliteStore::open(dir.path().join("kiln.db")).expect("the store opens");
        let flow = suite::flow("flood", None);
        let flow_run_id = flow.id;
        store.send(Write::FlowRun(flow), None).expect("sent");
        rt.block_on(store.flush()).expect("the flow run is recorded");
        let writes = suite::task_run_flood(flow_run_id, RUNS);
        let before = writer_cpu_ns();
        for w in writes {
            store.send(w, None).expect("sent");
        }
        rt.block_on(store.flush()).expect("every write is recorded");
        per_run.push((writer_cpu_ns() - before) as f64 / RUNS as f64);
    }
    per_run.sort_by(f64::total_cmp);
    println!(
        "the writer's CPU per task run: {:.0} ns (better quarter of {floods} floods), best {:.0} ns",
        per_run[per_run.len() / 4],
        per_run[0]
    );
}
