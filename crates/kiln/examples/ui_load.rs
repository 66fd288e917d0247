//! Fills a home for the web UI's figures (`bench/ui`): many finished flow runs, written
//! straight into the state store, and one real flow run of 1,000 task runs in ten
//! stages of 100 (each task waits for one of the stage before it: 900 edges).
//!
//! ```text
//! KILN_HOME=/tmp/ui-load cargo run --release -p kiln --example ui_load -- 100000
//! ```
//!
//! Prints the id of the 1,000-task flow run.

use kiln::prelude::*;
use kiln::store::model::*;
use kiln::store::state::StateType;
use uuid::Uuid;

#[task]
async fn stage(i: u64) -> u64 {
    i + 1
}

#[flow]
async fn wide(width: u64, depth: u64) -> Result<u64, kiln::Error> {
    let mut layer: Vec<_> = (0..width).map(|i| stage.submit(i)).collect();
    for _ in 1..depth {
        layer = layer.iter().map(|f| stage.submit(f)).collect();
    }
    Ok(kiln::join_all(layer).await?.into_iter().sum())
}

/// A finished flow run created at `created`: its creation and two state changes.
fn finished(id: Uuid, created: Micros, i: u64) -> [Write; 3] {
    let state = match i % 10 {
        0 => StateType::Failed,
        1 => StateType::Crashed,
        _ => StateType::Completed,
    };
    let change = |from, to, at, seq: u64| {
        Write::State(StateChange {
            id: Uuid::from_u64_pair(id.as_u64_pair().0, id.as_u64_pair().1 ^ seq),
            kind: RunKind::Flow,
            run_id: id,
            from,
            to,
            message: matches!(to, StateType::Failed | StateType::Crashed)
                .then(|| "a failure, for the UI's figures".to_owned()),
            attempt: 1,
            timestamp: at,
            result: None,
            fence: None,
        })
    };
    [
        Write::FlowRun(NewFlowRun {
            id,
            name: format!("flow_{}", i % 7),
            parent_id: None,
            parameters: serde_json::json!({ "i": i }),
            tags: vec![format!("batch-{}", i % 3)],
            created,
            initial_state: StateType::Pending,
            command: None,
            retry_of: None,
            process_id: None,
        }),
        change(StateType::Pending, StateType::Running, created + 1_000, 1),
        change(StateType::Running, state, created + 1_000 + (i % 997) as i64 * 1_000, 2),
    ]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args().nth(1).map_or(Ok(100_000), |a| a.parse())?;
    let home = std::env::var("KILN_HOME")?;
    let engine = kiln::Engine::open(&home)?;
    let store = engine.store().clone();
    // Spread over the last 30 days, oldest first.
    let now = now_micros();
    let step = 30 * 86_400_000_000 / n.max(1) as i64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
        let writes = chunk.iter().flat_map(|&i| {
            let created = now - (n - i) as i64 * step;
            let id = Uuid::now_v7();
            finished(id, created, i)
        });
        for outcome in futures::future::join_all(writes.map(|w| {
            let store = store.clone();
            async move { store.write(w).await }
        }))
        .await
        {
            anyhow::ensure!(
                matches!(outcome?, kiln::store::Outcome::Applied { .. }),
                "a write was refused"
            );
        }
    }
    let sum = engine.scope(wide(100, 10)).await?;
    anyhow::ensure!(sum == (1..=100).map(|i| i + 9).sum::<u64>(), "wrong sum {sum}");
    let run = store
        .flow_runs(1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the wide flow run is not recorded"))?;
    println!("{}", run.id);
    Ok(())
}
