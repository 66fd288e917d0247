//! `kiln runs watch`: a flow run's progress, live, until it ends.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::StateType;
use kiln::store::Store;
use kiln::store::model::{RunRef, TaskRun};

use crate::table;

/// How often the run is looked at.
const LOOK: Duration = Duration::from_millis(250);

/// How often runs of processes that died are marked Crashed meanwhile (a watched run whose
/// process was killed would otherwise show Running forever).
const CRASH_CHECK: Duration = Duration::from_secs(2);

/// A flow run's task runs, counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Progress {
    total: usize,
    done: usize,
    running: usize,
    failed: usize,
}

impl Progress {
    fn of(tasks: &[TaskRun]) -> Progress {
        let mut p = Progress {
            total: tasks.len(),
            ..Progress::default()
        };
        for t in tasks {
            match t.state {
                s if s.is_success() => p.done += 1,
                s if s.is_terminal() => p.failed += 1,
                StateType::Running => p.running += 1,
                _ => {}
            }
        }
        p
    }
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} task runs done, {} running, {} failed",
            self.done, self.total, self.running, self.failed
        )
    }
}

/// Follows flow run `id` until it ends: a progress bar on a terminal (stderr), a line per
/// change otherwise (stdout), each failed task run once; an error when it does not complete.
pub(crate) fn watch(store: &dyn Store, id: &str) -> Result<()> {
    let id = match crate::wait(store.resolve(id))? {
        RunRef::Flow(id) => id,
        RunRef::Task(task) => {
            let flow = crate::wait(store.task_run(task))?.and_then(|t| t.flow_run_id);
            match flow {
                Some(flow) => bail!("{task} is a task run; watch its flow run: `kiln runs watch {flow}`"),
                None => bail!("{task} is a task run outside any flow; see it with `kiln runs show {task}`"),
            }
        }
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar
    });
    let mut out = std::io::stdout().lock();
    let mut last: Option<(StateType, Progress)> = None;
    let mut told_failed = std::collections::HashSet::new();
    let mut last_crash_check = std::time::Instant::now();
    loop {
        let Some(flow) = crate::wait(store.flow_run(id))? else {
            bail!("flow run {id} was deleted while being watched");
        };
        let tasks = crate::wait(store.task_runs(id))?;
        let progress = Progress::of(&tasks);
        let name = table::clean(&flow.name, false);
        for t in tasks.iter().filter(|t| t.state.is_terminal() && !t.state.is_success()) {
            if told_failed.insert(t.id) {
                let line = format!(
                    "task run {} ({}) {}: {}",
                    table::clean(&t.name, false),
                    t.id,
                    t.state,
                    table::clean(t.state_message.as_deref().unwrap_or("-"), false)
                );
                match &bar {
                    Some(bar) => bar.println(line),
                    None => writeln!(out, "{line}")?,
                }
            }
        }
        let now = (flow.state, progress.clone());
        if last.as_ref() != Some(&now) {
            match &bar {
                Some(bar) => {
                    bar.set_prefix(format!("{name} {}", flow.state));
                    bar.set_length(progress.total as u64);
                    bar.set_position((progress.done + progress.failed) as u64);
                    bar.set_message(format!(
                        "done, {} running, {} failed",
                        progress.running, progress.failed
                    ));
                }
                None => {
                    writeln!(
                        out,
                        "{} {name} {}: {progress}",
                        table::time(Some(kiln::store::model::now_micros())),
                        flow.state
                    )?;
                    out.flush()?;
                }
            }
            last = Some(now);
        }
        if flow.state.is_terminal() {
            if let Some(bar) = &bar {
                bar.finish();
            }
            let message = flow
                .state_message
                .as_deref()
                .map(|m| format!(": {}", table::clean(m, false)))
                .unwrap_or_default();
            let summary = format!(
                "flow run {id} ({name}) ended {} after {}{message}",
                flow.state,
                table::duration(flow.start_time, flow.end_time)
            );
            if !flow.state.is_success() {
                bail!("{summary}");
            }
            writeln!(out, "{summary}")?;
            return Ok(());
        }
        if last_crash_check.elapsed() >= CRASH_CHECK {
            last_crash_check = std::time::Instant::now();
            let _ = crate::wait(kiln::heartbeat::crash_dead_processes(store, None));
        }
        std::thread::sleep(LOOK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_done_running_and_failed() {
        let json = |state: &str| -> TaskRun {
            serde_json::from_value(serde_json::json!({
                "id": uuid::Uuid::now_v7(), "flow_run_id": null, "name": "t", "task_key": "k", "inputs": {},
                "tags": [], "state": state, "state_message": null, "attempt": 1, "created": 0,
                "start_time": null, "end_time": null, "result": null, "call_key": null,
            }))
            .unwrap()
        };
        let tasks: Vec<TaskRun> = ["Completed", "Cached", "Running", "Failed", "Pending", "Crashed"]
            .into_iter()
            .map(json)
            .collect();
        let p = Progress::of(&tasks);
        assert_eq!(
            p,
            Progress {
                total: 6,
                done: 2,
                running: 1,
                failed: 2
            }
        );
        assert_eq!(p.to_string(), "2/6 task runs done, 1 running, 2 failed");
    }
}
