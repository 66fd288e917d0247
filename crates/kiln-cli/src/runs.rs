//! `kiln runs ...`: list, show and read the logs of flow runs and task runs.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::Subcommand;
use kiln::store::Store;
use kiln::store::model::{FlowRun, RunRef, StateRecord, TaskRun};
use serde::Serialize;
use uuid::Uuid;

use crate::table;

#[derive(Subcommand)]
pub(crate) enum RunsCommand {
    /// List flow runs, newest first (with `--tasks`: task runs called outside any flow).
    Ls {
        /// How many to show.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Only runs in this state (repeat for several: `--state Failed --state Crashed`).
        #[arg(long, value_parser = parse_state)]
        state: Vec<kiln::StateType>,
        /// Only runs of this flow.
        #[arg(long)]
        flow: Option<String>,
        /// Only runs with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only runs created within this long (`30m`, `2h`, `7d`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// The page after this run id (the last id of the page before).
        #[arg(long)]
        after: Option<Uuid>,
        /// List the task runs called outside any flow instead (`--flow` then names the task).
        #[arg(long)]
        tasks: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow a flow run until it ends: its task runs done, running and failed, as a
    /// progress bar on a terminal, as a line per change otherwise. Exits non-zero when
    /// the run does not complete.
    Watch {
        /// A flow run id, or an unambiguous prefix of one.
        id: String,
    },
    /// Delete a run that has ended: a flow run with its task runs and subflow runs, their
    /// state histories, edges and logs.
    Delete {
        /// A flow run or task run id, or an unambiguous prefix of one.
        id: String,
        /// Also delete the result records its runs persisted under keys of their own (a key
        /// that does not name the run may be another run's too: it is kept and listed).
        #[arg(long)]
        results: bool,
    },
    /// Show a flow run (its task runs, edges and subflows) or a task run (its state history).
    Show {
        /// A flow run or task run id, or an unambiguous prefix of one.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a flow run that failed (or crashed, or was cancelled) again in the program that
    /// ran it, with the same home: task runs that completed with persisted results are
    /// loaded instead of run again. Exits non-zero unless the new flow run completes.
    Retry {
        /// The flow run's id (or an unambiguous prefix).
        id: String,
        /// Retry even though the program was rebuilt since the run (its results may come
        /// from other code).
        #[arg(long)]
        force: bool,
        /// Compute every task again instead of loading the results of the run before.
        #[arg(long)]
        refresh: bool,
    },
    /// Cancel a run: one not started yet at once; a running one is stopped by its process,
    /// a worker or the program that started it (Cancelling, then Cancelled).
    Cancel {
        /// A flow run or task run id, or an unambiguous prefix of one.
        id: String,
        /// Wait until the run has stopped.
        #[arg(long)]
        wait: bool,
    },
    /// Print the logs captured in a run (for a flow run: its own and its task runs').
    Logs {
        /// A flow run or task run id, or an unambiguous prefix of one.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(home: &Path, cmd: RunsCommand) -> Result<()> {
    let db = home.join("kiln.db");
    let mut out = std::io::stdout().lock();
    let settings = kiln::settings::Settings::load(home)?;
    let store = crate::open_store(home, &settings)
        .with_context(|| format!("reading the state database of {}", home.display()))?;
    let Some(store) = store else {
        return match cmd {
            RunsCommand::Ls { json, .. } => {
                eprintln!("no runs recorded yet: {} does not exist", db.display());
                if json {
                    writeln!(out, "[]")?;
                }
                Ok(())
            }
            RunsCommand::Show { id, .. }
            | RunsCommand::Logs { id, .. }
            | RunsCommand::Retry { id, .. }
            | RunsCommand::Watch { id }
            | RunsCommand::Delete { id, .. }
            | RunsCommand::Cancel { id, .. } => Err(anyhow::anyhow!(
                "no flow run or task run with id '{id}': nothing is recorded in {} yet",
                db.display()
            )),
        };
    };
    let store = &*store;
    // A run whose process died is Crashed, not Running, before anything is shown or retried.
    if let Err(e) = crate::wait(kiln::heartbeat::crash_dead_processes(store, None)) {
        note_unchecked(&e);
    }
    match cmd {
        RunsCommand::Ls {
            limit,
            state,
            flow,
            tag,
            since,
            after,
            tasks,
            json,
        } => {
            let filter = kiln::store::model::RunFilter {
                states: state,
                name: flow,
                tag,
                since: since.map(|d| kiln::store::model::now_micros() - d.as_micros() as i64),
                after,
                top_level: tasks,
                ..kiln::store::model::RunFilter::newest(limit)
            };
            if tasks {
                ls_tasks(store, &mut out, &filter, json)
            } else {
                ls(store, &mut out, &filter, json)
            }
        }
        RunsCommand::Watch { id } => crate::watch::watch(store, &id),
        RunsCommand::Delete { id, results } => delete(store, home, &mut out, &id, results),
        RunsCommand::Show { id, json } => match crate::wait(store.resolve(&id))? {
            RunRef::Flow(id) => show_flow(store, &mut out, id, json),
            RunRef::Task(id) => show_task(store, &mut out, id, json),
        },
        RunsCommand::Retry { id, force, refresh } => retry(store, home, &id, force, refresh),
        RunsCommand::Cancel { id, wait } => cancel(store, &mut out, &id, wait),
        RunsCommand::Logs { id, json } => {
            let id = match crate::wait(store.resolve(&id))? {
                RunRef::Flow(id) | RunRef::Task(id) => id,
            };
            logs(store, &mut out, id, json)
        }
    }
}

fn cancel(store: &dyn Store, out: &mut impl Write, id: &str, wait: bool) -> Result<()> {
    let id = match crate::wait(store.resolve(id))? {
        RunRef::Flow(id) | RunRef::Task(id) => id,
    };
    let mut state = crate::wait(kiln::deployment::cancel(store, id))?;
    if wait && state == kiln::StateType::Cancelling {
        eprintln!("run {id} is Cancelling: waiting for its worker to stop it");
        state = crate::wait(async {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let now = match store.flow_run(id).await? {
                    Some(r) => r.state,
                    None => store
                        .task_run(id)
                        .await?
                        .map_or(kiln::StateType::Cancelled, |t| t.state),
                };
                if now.is_terminal() {
                    return Ok::<_, kiln::Error>(now);
                }
            }
        })?;
    }
    writeln!(out, "{id} {state}")?;
    Ok(())
}

/// The database could not be checked for dead processes (a read-only home): said once, quietly.
fn note_unchecked(e: &kiln::Error) {
    if std::env::var_os("KILN_LOG").is_some() {
        eprintln!("note: runs of dead processes were not checked: {e}");
    }
}

fn json_line(out: &mut impl Write, value: &impl Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn parse_state(text: &str) -> Result<kiln::StateType, String> {
    text.parse().map_err(|_| {
        let all: Vec<&str> = kiln::StateType::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown state '{text}'; states: {}", all.join(", "))
    })
}

fn ls_tasks(store: &dyn Store, out: &mut impl Write, filter: &kiln::store::model::RunFilter, json: bool) -> Result<()> {
    let page = crate::wait(store.list_task_runs(filter))?;
    if let Some(next) = page.next {
        eprintln!("more runs: add `--after {next}` for the next page");
    }
    if json {
        return json_line(out, &page.runs);
    }
    let rows: Vec<Vec<String>> = page
        .runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.name.clone(),
                r.state.to_string(),
                table::time(r.start_time.or(Some(r.created))),
                table::duration(r.start_time, r.end_time),
            ]
        })
        .collect();
    table::print(out, &["ID", "TASK", "STATE", "START (UTC)", "DURATION"], &rows)?;
    Ok(())
}

/// Deletes an ended run (and with `results`, the records named after its runs).
fn delete(store: &dyn Store, home: &Path, out: &mut impl Write, id: &str, results: bool) -> Result<()> {
    let (id, runs) = match crate::wait(store.resolve(id))? {
        RunRef::Flow(id) => {
            // The flow run and its subflow runs, each with its task runs.
            let mut runs = Vec::new();
            let mut flows = vec![id];
            while let Some(f) = flows.pop() {
                let flow = crate::wait(store.flow_run(f))?;
                runs.push((f, flow.and_then(|r| r.result)));
                runs.extend(crate::wait(store.task_runs(f))?.into_iter().map(|t| (t.id, t.result)));
                flows.extend(crate::wait(store.subflow_runs(f))?.iter().map(|s| s.id));
            }
            (id, runs)
        }
        RunRef::Task(id) => (id, vec![(id, crate::wait(store.task_run(id))?.and_then(|t| t.result))]),
    };
    crate::server::write(store, kiln::store::model::Write::DeleteRun { id })?;
    writeln!(out, "deleted run {id} ({} runs with it)", runs.len().saturating_sub(1))?;
    if !results {
        return Ok(());
    }
    let settings = kiln::settings::Settings::load(home)?;
    let (mut deleted, mut kept) = (0, Vec::new());
    for (run, result) in runs {
        let Some(reference) = result.and_then(|r| serde_json::from_value::<kiln::result::ResultRef>(r).ok()) else {
            continue;
        };
        // Kept in the state database: gone with the run.
        if reference.inline.is_some() {
            continue;
        }
        if !reference.key.contains(&run.to_string()) || reference.key.starts_with("cache/") {
            kept.push(format!("{}:{}", reference.storage, reference.key));
            continue;
        }
        let config = settings.storage(&reference.storage).ok_or_else(|| {
            anyhow::anyhow!(
                "run {run}'s result is in storage '{}', which this home does not configure (see `kiln storage ls`); \
                 the run is deleted, its record is not",
                reference.storage
            )
        })?;
        let storage = kiln::result::ResultStorage::build(&reference.storage, &config, home)?;
        let key = kiln::result::StorageKey::new(reference.key.clone()).map_err(anyhow::Error::msg)?;
        crate::wait(storage.delete(&key))?;
        deleted += 1;
    }
    writeln!(out, "deleted {deleted} result records")?;
    if !kept.is_empty() {
        eprintln!(
            "kept {} records whose keys do not name their run (other runs may use them): {}",
            kept.len(),
            kept.join(", ")
        );
    }
    Ok(())
}

fn ls(store: &dyn Store, out: &mut impl Write, filter: &kiln::store::model::RunFilter, json: bool) -> Result<()> {
    let page = crate::wait(store.list_flow_runs(filter))?;
    let runs = page.runs;
    if let Some(next) = page.next {
        eprintln!("more runs: add `--after {next}` for the next page");
    }
    if json {
        return json_line(out, &runs);
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.name.clone(),
                r.state.to_string(),
                table::time(r.start_time.or(Some(r.created))),
                table::duration(r.start_time, r.end_time),
                r.task_count.to_string(),
            ]
        })
        .collect();
    table::print(out, &["ID", "NAME", "STATE", "START (UTC)", "DURATION", "TASKS"], &rows)?;
    Ok(())
}

#[derive(Serialize)]
struct TaskRunDetail {
    #[serde(flatten)]
    run: TaskRun,
    states: Vec<StateRecord>,
}

#[derive(Serialize)]
struct FlowRunDetail {
    flow_run: FlowRun,
    states: Vec<StateRecord>,
    task_runs: Vec<TaskRunDetail>,
    edges: Vec<kiln::store::model::Edge>,
    subflow_runs: Vec<FlowRun>,
}

fn show_flow(store: &dyn Store, out: &mut impl Write, id: Uuid, json: bool) -> Result<()> {
    let flow =
        crate::wait(store.flow_run(id))?.ok_or_else(|| anyhow::anyhow!("flow run {id} vanished while reading"))?;
    let tasks = crate::wait(store.task_runs(id))?;
    let edges = crate::wait(store.edges(id))?;
    let subflows = crate::wait(store.subflow_runs(id))?;
    if json {
        let task_runs = tasks
            .into_iter()
            .map(|run| {
                Ok(TaskRunDetail {
                    states: crate::wait(store.states(run.id))?,
                    run,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        return json_line(
            out,
            &FlowRunDetail {
                states: crate::wait(store.states(id))?,
                flow_run: flow,
                task_runs,
                edges,
                subflow_runs: subflows,
            },
        );
    }
    writeln!(out, "flow run   {}", flow.id)?;
    writeln!(out, "name       {}", table::clean(&flow.name, false))?;
    writeln!(
        out,
        "state      {}{}",
        flow.state,
        message_suffix(flow.state_message.as_deref())
    )?;
    if let Some(parent) = flow.parent_id {
        writeln!(out, "parent     {parent}")?;
    }
    writeln!(out, "started    {}", table::time(flow.start_time))?;
    writeln!(out, "duration   {}", table::duration(flow.start_time, flow.end_time))?;
    writeln!(out, "attempts   {}", flow.attempt)?;
    writeln!(out, "parameters {}", table::clean(&flow.parameters.to_string(), false))?;
    if let Some(result) = &flow.result {
        writeln!(out, "result     {}", describe_result(result))?;
    }
    if !flow.tags.is_empty() {
        writeln!(out, "tags       {}", flow.tags.join(", "))?;
    }
    let names: HashMap<Uuid, &str> = tasks.iter().map(|t| (t.id, t.name.as_str())).collect();
    let mut upstreams: HashMap<Uuid, Vec<String>> = HashMap::new();
    for e in &edges {
        let name = names.get(&e.upstream).copied().unwrap_or("?");
        upstreams
            .entry(e.downstream)
            .or_default()
            .push(format!("{name} ({})", short(e.upstream)));
    }
    writeln!(out, "\ntask runs ({})", tasks.len())?;
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.name.clone(),
                t.state.to_string(),
                t.attempt.to_string(),
                table::duration(t.start_time, t.end_time),
                upstreams.get(&t.id).map(|u| u.join(", ")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table::print(
        out,
        &["ID", "NAME", "STATE", "ATTEMPTS", "DURATION", "WAITS FOR"],
        &rows,
    )?;
    let failed: Vec<&TaskRun> = tasks
        .iter()
        .filter(|t| t.state_message.is_some() && !t.state.is_success())
        .collect();
    if !failed.is_empty() {
        writeln!(out, "\nmessages")?;
        for t in failed {
            writeln!(
                out,
                "{} {} ({}): {}",
                t.state,
                table::clean(&t.name, false),
                short(t.id),
                table::clean(t.state_message.as_deref().unwrap_or(""), true)
            )?;
        }
    }
    if !subflows.is_empty() {
        writeln!(out, "\nsubflow runs ({})", subflows.len())?;
        let rows: Vec<Vec<String>> = subflows
            .iter()
            .map(|f| {
                vec![
                    f.id.to_string(),
                    f.name.clone(),
                    f.state.to_string(),
                    table::duration(f.start_time, f.end_time),
                    f.task_count.to_string(),
                ]
            })
            .collect();
        table::print(out, &["ID", "NAME", "STATE", "DURATION", "TASKS"], &rows)?;
    }
    Ok(())
}

fn show_task(store: &dyn Store, out: &mut impl Write, id: Uuid, json: bool) -> Result<()> {
    let run =
        crate::wait(store.task_run(id))?.ok_or_else(|| anyhow::anyhow!("task run {id} vanished while reading"))?;
    let states = crate::wait(store.states(id))?;
    if json {
        return json_line(out, &TaskRunDetail { run, states });
    }
    writeln!(out, "task run   {}", run.id)?;
    writeln!(out, "name       {}", table::clean(&run.name, false))?;
    writeln!(out, "task       {}", run.task_key)?;
    writeln!(
        out,
        "flow run   {}",
        run.flow_run_id.map_or("-".into(), |f| f.to_string())
    )?;
    writeln!(
        out,
        "state      {}{}",
        run.state,
        message_suffix(run.state_message.as_deref())
    )?;
    writeln!(out, "attempts   {}", run.attempt)?;
    writeln!(out, "duration   {}", table::duration(run.start_time, run.end_time))?;
    if let Some(result) = &run.result {
        writeln!(out, "result     {}", describe_result(result))?;
    }
    if let Some(inputs) = run.inputs.as_object().filter(|i| !i.is_empty()) {
        writeln!(out, "inputs")?;
        for (name, input) in inputs {
            writeln!(out, "  {}", table::clean(&describe_input(name, input), false))?;
        }
    }
    if !run.tags.is_empty() {
        writeln!(out, "tags       {}", run.tags.join(", "))?;
    }
    writeln!(out, "\nstates")?;
    let rows: Vec<Vec<String>> = states
        .iter()
        .map(|s| {
            vec![
                table::time(Some(s.timestamp)),
                s.state.to_string(),
                s.attempt.to_string(),
                s.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table::print(out, &["TIME (UTC)", "STATE", "ATTEMPT", "MESSAGE"], &rows)?;
    Ok(())
}

fn logs(store: &dyn Store, out: &mut impl Write, id: Uuid, json: bool) -> Result<()> {
    let logs = crate::wait(store.logs(id))?;
    if json {
        return json_line(out, &logs);
    }
    for l in &logs {
        writeln!(
            out,
            "{} {:<5} {} [{}] {}",
            table::time(Some(l.timestamp)),
            l.level,
            table::clean(&l.target, false),
            short(l.run_id),
            table::clean(&l.message, true)
        )?;
    }
    if logs.is_empty() {
        eprintln!("no logs captured for {id}");
    }
    Ok(())
}

fn retry(store: &dyn Store, home: &Path, id: &str, force: bool, refresh: bool) -> Result<()> {
    let RunRef::Flow(id) = crate::wait(store.resolve(id))? else {
        anyhow::bail!("'{id}' is a task run; retry the flow run it belongs to (see `kiln runs show {id}`)");
    };
    let run =
        crate::wait(store.flow_run(id))?.ok_or_else(|| anyhow::anyhow!("flow run {id} vanished while reading"))?;
    if !run.state.is_terminal() || run.state.is_success() {
        anyhow::bail!(
            "flow run {id} is {}; only a run that ended without success can be retried",
            run.state
        );
    }
    let Some(command) = run.command else {
        anyhow::bail!(
            "flow run {id} does not record how it was started (it is a subflow, or older than this Kiln); \
             retry its top-level flow run"
        );
    };
    let argv: Vec<String> = serde_json::from_value(command["argv"].clone()).unwrap_or_default();
    let cwd = command["cwd"].as_str().unwrap_or(".");
    let Some((program, args)) = argv.split_first() else {
        anyhow::bail!("flow run {id} recorded an empty command");
    };
    if let Some(changed) = rebuilt(&command) {
        if !force && !refresh {
            anyhow::bail!(
                "{changed} since flow run {id} ran: its code may differ from the code that computed the results a \
                 retry would load. Add --refresh to compute everything again, or --force to load them anyway"
            );
        }
        eprintln!("note: {changed} since flow run {id} ran");
    }
    let name = table::clean(&run.name, false);
    eprintln!(
        "retrying flow run {id} ('{name}'): {}",
        table::clean(&argv.join(" "), false)
    );
    let started = kiln::store::model::now_micros();
    let status = std::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("KILN_HOME", home)
        .env("KILN_RETRY_OF", id.to_string())
        .env("KILN_RETRY_REFRESH", if refresh { "1" } else { "0" })
        .status()
        .with_context(|| format!("cannot start {program} (from {cwd}); was the program moved or rebuilt elsewhere?"))?;
    let since = kiln::store::model::RunFilter {
        since: Some(started),
        top_level: true,
        ..kiln::store::model::RunFilter::newest(1000)
    };
    let retried = crate::wait(store.list_flow_runs(&since))?
        .runs
        .into_iter()
        .find(|f| f.retry_of == Some(id));
    match retried {
        Some(new) if new.state.is_success() && status.success() => {
            eprintln!("flow run {} retried {id} and ended {}", new.id, new.state);
            Ok(())
        }
        Some(new) => anyhow::bail!(
            "flow run {} retried {id} and ended {}{} (the program exited with {status})",
            new.id,
            new.state,
            message_suffix(new.state_message.as_deref())
        ),
        None => anyhow::bail!(
            "the program exited with {status} without starting a flow run named '{name}' in {}; was it changed, or \
             does it open another home than this one?",
            home.display()
        ),
    }
}

/// How the binary a run recorded differs from the one at that path now, if it does.
fn rebuilt(command: &serde_json::Value) -> Option<String> {
    let exe = command["exe"].as_str()?;
    let Ok(meta) = std::fs::metadata(exe) else {
        return Some(format!("the program {exe} is gone"));
    };
    let modified = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_micros() as i64;
    let same = command["exe_size"].as_u64() == Some(meta.len()) && command["exe_modified"].as_i64() == Some(modified);
    (!same).then(|| {
        format!(
            "the program {exe} was rebuilt (changed {})",
            table::time(Some(modified))
        )
    })
}

fn message_suffix(message: Option<&str>) -> String {
    message
        .map(|m| format!(" ({})", table::clean(m, false)))
        .unwrap_or_default()
}

/// Values longer than this are cut when shown.
const SHOWN_VALUE: usize = 120;

/// `name = value  (type)`: the value as recorded (cut when long), the run it came from, or
/// why it is not shown.
fn describe_input(name: &str, input: &serde_json::Value) -> String {
    let ty = input["type"].as_str().unwrap_or("?");
    let value = if let Some(v) = input.get("value") {
        let text = v.to_string();
        if text.chars().count() > SHOWN_VALUE {
            format!("{}… (cut)", text.chars().take(SHOWN_VALUE).collect::<String>())
        } else {
            text
        }
    } else if let Some(start) = input["value_start"].as_str() {
        format!("{}… (cut)", start.chars().take(SHOWN_VALUE).collect::<String>())
    } else if let Some(upstream) = input["upstream"].as_str() {
        let id = upstream.parse().map_or_else(|_| upstream.to_owned(), short);
        format!(
            "the result of {} ({id})",
            input["upstream_name"].as_str().unwrap_or("?")
        )
    } else {
        "(not recorded: the type does not implement Serialize)".to_owned()
    };
    format!("{name} = {value}  ({ty})")
}

/// A persisted result's reference in one line: what wrote it, its size and where it is.
fn describe_result(result: &serde_json::Value) -> String {
    match serde_json::from_value::<kiln::result::ResultRef>(result.clone()) {
        Ok(r) if r.inline.is_some() => {
            format!("{} bytes ({}), kept in the state database", r.size, r.serializer)
        }
        Ok(r) => format!(
            "{} bytes ({}) in storage '{}' at key {} ({})",
            r.size, r.serializer, r.storage, r.key, r.hash
        ),
        Err(_) => result.to_string(),
    }
}

/// The id's random tail: distinct for runs created in the same millisecond.
fn short(id: Uuid) -> String {
    let s = id.simple().to_string();
    s[s.len() - 8..].to_owned()
}
