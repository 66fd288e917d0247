//! `kiln deployment ...`: the deployments serving processes registered, and runs of them.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use kiln::store::model::now_micros;
use kiln::store::work::Schedule;

use crate::table;

#[derive(Subcommand)]
pub(crate) enum DeploymentCommand {
    /// List the deployments, with their schedules and next runs.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a run of a deployment: queued in its pool, run by a worker serving it.
    Run {
        /// The deployment's name.
        name: String,
        /// A parameter, `name=value`; the value is read as JSON when it is JSON (`n=3`,
        /// `tags=["a"]`), else taken as a string (`day=monday`). Repeat for several.
        #[arg(long = "param", short = 'p', value_name = "NAME=VALUE", value_parser = parse_param)]
        params: Vec<(String, serde_json::Value)>,
        /// A tag for this run (repeat for several).
        #[arg(long)]
        tag: Vec<String>,
        /// Wait until the run ends; exit non-zero unless it Completed.
        #[arg(long)]
        wait: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a deployment: no more scheduled runs; its runs still waiting for a worker are
    /// cancelled (runs in progress go on). A worker serving it registers it again on start.
    Rm {
        /// The deployment's name.
        name: String,
    },
}

fn parse_param(text: &str) -> Result<(String, serde_json::Value), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not NAME=VALUE"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("'{text}' has no parameter name before '='"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok((name.to_owned(), value))
}

pub(crate) fn run(home: &Path, cmd: DeploymentCommand) -> Result<()> {
    let settings = kiln::settings::Settings::load(home)?;
    let Some(store) = crate::open_store(home, &settings)
        .with_context(|| format!("reading the state database of {}", home.display()))?
    else {
        bail!(
            "nothing is recorded in {} yet: start a worker (kiln::serve()) with this KILN_HOME or KILN_DATABASE_URL first",
            home.display()
        );
    };
    let mut out = std::io::stdout().lock();
    match cmd {
        DeploymentCommand::Ls { json } => {
            let deployments = crate::wait(store.deployments())?;
            if json {
                serde_json::to_writer_pretty(&mut out, &deployments)?;
                writeln!(out)?;
                return Ok(());
            }
            if deployments.is_empty() {
                eprintln!("no deployments: a serving process registers them (kiln::serve().deployment(...))");
                return Ok(());
            }
            let now = now_micros();
            let rows: Vec<Vec<String>> = deployments
                .iter()
                .map(|d| {
                    let next = d
                        .schedule
                        .as_ref()
                        .and_then(|s| kiln::deployment::next_slots(s, now, now + 400 * 86_400_000_000, 1).ok())
                        .and_then(|s| s.first().copied())
                        .map_or_else(|| "-".to_owned(), |t| table::time(Some(t)));
                    vec![
                        d.name.clone(),
                        d.flow.clone(),
                        d.pool.clone(),
                        d.schedule.as_ref().map_or_else(|| "-".to_owned(), describe),
                        next,
                        d.concurrency.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                    ]
                })
                .collect();
            table::print(
                &mut out,
                &["NAME", "FLOW", "POOL", "SCHEDULE", "NEXT RUN", "LIMIT"],
                &rows,
            )?;
            Ok(())
        }
        DeploymentCommand::Rm { name } => {
            let cancelled = crate::wait(kiln::deployment::remove_deployment(&*store, &name))?;
            for id in &cancelled {
                writeln!(out, "{id} Cancelled")?;
            }
            eprintln!(
                "removed deployment '{name}'{}; a worker serving it registers it again when it starts",
                match cancelled.len() {
                    0 => String::new(),
                    1 => " and cancelled its run that was waiting for a worker".into(),
                    n => format!(" and cancelled its {n} runs that were waiting for a worker"),
                }
            );
            Ok(())
        }
        DeploymentCommand::Run {
            name,
            params,
            tag,
            wait,
            json,
        } => {
            let mut parameters = serde_json::Map::new();
            for (k, v) in params {
                if parameters.insert(k.clone(), v).is_some() {
                    bail!("parameter '{k}' is given twice");
                }
            }
            let request = kiln::deployment::RunRequest {
                parameters: serde_json::Value::Object(parameters),
                tags: tag,
                scheduled: None,
                retry_of: None,
            };
            let id = crate::wait(kiln::deployment::run_deployment(&*store, &name, request))?;
            if !wait {
                if json {
                    writeln!(out, "{}", serde_json::json!({ "id": id, "state": "Scheduled" }))?;
                } else {
                    writeln!(out, "{id}")?;
                    eprintln!("flow run {id} of deployment '{name}' is queued; follow it with `kiln runs show {id}`");
                }
                return Ok(());
            }
            let run = crate::wait(async {
                loop {
                    if let Some(run) = store.flow_run(id).await?
                        && run.state.is_terminal()
                    {
                        return Ok::<_, kiln::Error>(run);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })?;
            if json {
                serde_json::to_writer_pretty(&mut out, &run)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{id} {}", run.state)?;
            }
            if run.state != kiln::StateType::Completed {
                bail!(
                    "flow run {id} of deployment '{name}' ended {}: {}",
                    run.state,
                    run.state_message.unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

fn describe(schedule: &Schedule) -> String {
    match schedule {
        Schedule::Cron { expr, timezone } => format!("cron '{expr}' {}", timezone.as_deref().unwrap_or("UTC")),
        Schedule::Interval { seconds } => {
            format!("every {}", humantime::format_duration(Duration::from_secs(*seconds)))
        }
    }
}
