//! State writes per second with several writer processes on one database.
//!
//! ```text
//! cargo run --release -p kiln --example store_load -- PROCESSES TASKS_PER_PROCESS
//! KILN_DATABASE_URL=postgres://... cargo run --release -p kiln --features postgres --example store_load -- 4 20000
//! KILN_API_URL=http://127.0.0.1:4200 cargo run --release -p kiln --features api --example store_load -- 4 20000
//! ```
//!
//! Starts PROCESSES copies of itself at once, each running one flow of TASKS_PER_PROCESS
//! trivial task runs (submitted together) against `KILN_DATABASE_URL` (or one shared
//! SQLite home), and reports the wall time from the first start to the last exit and the
//! state rows written per second (three per task run: Pending, Running, Completed; plus the
//! flow run's). Every process must exit 0: their records are durable when they do.

use std::time::Instant;

use kiln::prelude::*;

#[task]
async fn trivial(i: u64) -> u64 {
    i + 1
}

#[flow]
async fn load(n: u64) -> Result<u64, kiln::Error> {
    Ok(kiln::join_all(trivial.map(0..n)).await?.into_iter().sum())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(n) = std::env::var("KILN_LOAD_CHILD") {
        let n: u64 = n.parse()?;
        let engine = kiln::Engine::open(std::env::var("KILN_HOME")?)?;
        let rt = tokio::runtime::Runtime::new()?;
        let sum = rt.block_on(engine.scope(load(n)))?;
        anyhow::ensure!(sum == n * (n + 1) / 2, "wrong sum {sum}");
        return Ok(());
    }
    let processes: usize = args.get(1).map_or(Ok(4), |a| a.parse())?;
    let tasks: u64 = args.get(2).map_or(Ok(20_000), |a| a.parse())?;
    let home = tempfile::tempdir()?;
    let started = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|_| {
            std::process::Command::new(std::env::current_exe()?)
                .env("KILN_LOAD_CHILD", tasks.to_string())
                .env("KILN_HOME", home.path())
                .env("KILN_LOG", "warn")
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut child in children {
        anyhow::ensure!(child.wait()?.success(), "a writer process failed");
    }
    let wall = started.elapsed();
    let rows = processes as u64 * (tasks * 3 + 3);
    let backend = match (std::env::var("KILN_API_URL"), std::env::var("KILN_DATABASE_URL")) {
        (Ok(url), _) if !url.is_empty() => format!("server at {url}"),
        (_, Ok(url)) if !url.is_empty() => url.split(':').next().unwrap_or("?").to_owned(),
        _ => "sqlite".into(),
    };
    println!(
        "{backend}: {processes} processes x {tasks} task runs in {:.2} s: {:.0} state rows/s, {:.1} us per task run",
        wall.as_secs_f64(),
        rows as f64 / wall.as_secs_f64(),
        wall.as_secs_f64() * 1e6 / (processes as u64 * tasks) as f64
    );
    Ok(())
}
