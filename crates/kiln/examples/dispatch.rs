//! Dispatch through a work pool, for `bench/dispatch`: no-op task runs queued by one flow
//! and run by worker processes.
//!
//! ```text
//! KILN_DATABASE_URL=postgres://... dispatch worker            # as many as wanted
//! KILN_DATABASE_URL=postgres://... dispatch submit 2000       # prints one JSON line
//! KILN_DATABASE_URL=postgres://... dispatch latency 200       # one task run at a time
//! ```
//!
//! `submit N` runs a flow that submits N task runs of `noop` to pool `bench` at once and
//! waits for all; it prints the wall time, the task runs per second, and the submit-to-start
//! latency of each task run (from its creation to its Running state, as the store recorded
//! them): p50 and p99.

use kiln::prelude::*;

/// Does nothing, on a worker of pool `bench`.
#[task(pool = "bench")]
async fn noop(i: u64) -> u64 {
    i
}

/// One task run at a time: the latency of a lone submission, without a queue before it.
#[flow]
async fn one_by_one(n: u64) -> Result<u64, kiln::Error> {
    let mut sum = 0;
    for i in 0..n {
        sum += noop(i).await?;
    }
    Ok(sum)
}

#[flow]
async fn fan_out(n: u64) -> Result<u64, kiln::Error> {
    let futures: Vec<_> = (0..n).map(|i| noop(i).submit()).collect();
    Ok(kiln::join_all(futures).await?.into_iter().sum())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("worker") => {
            let limit = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(64);
            kiln::serve().pool("bench").limit(limit).run().await?;
        }
        Some(mode @ ("submit" | "latency")) => {
            let n: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1000);
            let engine = kiln::Engine::current()?;
            let started = std::time::Instant::now();
            let (name, sum) = if mode == "submit" {
                ("fan_out", engine.scope(fan_out(n)).await?)
            } else {
                ("one_by_one", engine.scope(one_by_one(n)).await?)
            };
            let seconds = started.elapsed().as_secs_f64();
            anyhow::ensure!(sum == n * (n.saturating_sub(1)) / 2, "wrong sum {sum}");
            let store = engine.store();
            let flow = store
                .flow_runs(50)
                .await?
                .into_iter()
                .find(|r| r.name == name)
                .ok_or_else(|| anyhow::anyhow!("no flow run recorded"))?;
            let mut latencies = Vec::new();
            for run in store.task_runs(flow.id).await? {
                let states = store.states(run.id).await?;
                let running = states.iter().find(|s| s.state == kiln::StateType::Running);
                if let Some(r) = running {
                    latencies.push((r.timestamp - run.created) as f64 / 1000.0);
                }
            }
            latencies.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({
                    "mode": mode,
                    "n": n,
                    "seconds": seconds,
                    "runs_per_second": n as f64 / seconds,
                    "start_p50_ms": percentile(&latencies, 0.5),
                    "start_p99_ms": percentile(&latencies, 0.99),
                })
            );
        }
        _ => anyhow::bail!("usage: dispatch worker [limit] | dispatch submit N | dispatch latency N"),
    }
    Ok(())
}
