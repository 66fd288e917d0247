//! Shared helpers of the integration tests: a fresh Kiln home per test.
#![allow(dead_code)]

use kiln::Engine;
use kiln::store::model::{FlowRun, TaskRun};
use kiln::{StateType, store::Store};
use uuid::Uuid;

/// A temporary home with its engine; the folder lives as long as the guard.
pub struct Home {
    pub dir: tempfile::TempDir,
    pub engine: Engine,
}

pub fn home() -> Home {
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = Engine::open(dir.path()).expect("open engine");
    Home { dir, engine }
}

/// Waits for a store read from sync test code (the SQLite store's reads need no runtime).
pub fn wait<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

impl Home {
    pub fn store(&self) -> &dyn Store {
        &**self.engine.store()
    }

    /// The newest flow run with this name.
    pub fn flow(&self, name: &str) -> FlowRun {
        wait(self.store().flow_runs(1000))
            .unwrap()
            .into_iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no flow run named {name}"))
    }

    pub fn tasks(&self, flow: Uuid) -> Vec<TaskRun> {
        wait(self.store().task_runs(flow)).unwrap()
    }

    pub fn task(&self, flow: Uuid, name: &str) -> TaskRun {
        self.tasks(flow)
            .into_iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no task run named {name}"))
    }

    /// The state history as (state, attempt) pairs.
    pub fn history(&self, run: Uuid) -> Vec<(StateType, u32)> {
        wait(self.store().states(run))
            .unwrap()
            .into_iter()
            .map(|s| (s.state, s.attempt))
            .collect()
    }
}

/// Resident memory now and at its peak, in bytes (Linux: /proc/self/status).
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// How many files are below `dir` (0 when it does not exist).
pub fn files_below(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| if e.path().is_dir() { files_below(&e.path()) } else { 1 })
                .sum()
        })
        .unwrap_or(0)
}
