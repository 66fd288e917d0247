//! `kiln limit ...`: global concurrency limits by tag (at most N task runs carrying a tag
//! run at once, on every machine).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::Subcommand;
use kiln::store::limit::ConcurrencyLimit;
use kiln::store::model::{Write as StoreWrite, now_micros};

use crate::table;

#[derive(Subcommand)]
pub(crate) enum LimitCommand {
    /// Let at most N task runs tagged TAG run at once (others wait, Pending, for a slot).
    Set {
        /// The tag (`#[task(tags = ["db"])]`, or `Options::tags`).
        tag: String,
        /// The number of slots; 0 holds every run with the tag until it is raised or removed.
        slots: u32,
    },
    /// List the limits and the task runs holding their slots.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a tag's limit: its waiting runs start.
    Rm {
        /// The tag.
        tag: String,
    },
}

pub(crate) fn run(home: &Path, cmd: LimitCommand) -> Result<()> {
    let settings = kiln::settings::Settings::load(home)?;
    let store = match settings.api_url.as_deref() {
        Some(api) => kiln::open_api(api, settings.api_key.as_deref())?,
        None => kiln::open_store(home, settings.database_url.as_deref())
            .with_context(|| format!("opening the state database of {}", home.display()))?,
    };
    let mut out = std::io::stdout().lock();
    let write = |w: StoreWrite| crate::server::write(&*store, w);
    match cmd {
        LimitCommand::Set { tag, slots } => {
            let limit = ConcurrencyLimit {
                tag: tag.clone(),
                slots,
                updated: now_micros(),
            };
            limit.check().map_err(anyhow::Error::msg)?;
            write(StoreWrite::PutLimit(limit))?;
            writeln!(out, "tag '{tag}': at most {slots} task runs at once")?;
        }
        LimitCommand::Rm { tag } => {
            write(StoreWrite::DeleteLimit { tag: tag.clone() })?;
            writeln!(out, "tag '{tag}': no limit")?;
        }
        LimitCommand::Ls { json } => {
            let limits = crate::wait(store.limits())?;
            if json {
                serde_json::to_writer_pretty(&mut out, &limits)?;
                writeln!(out)?;
                return Ok(());
            }
            if limits.is_empty() {
                eprintln!("no concurrency limits: set one with `kiln limit set TAG N`");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = limits
                .iter()
                .map(|u| {
                    vec![
                        u.limit.tag.clone(),
                        u.limit.slots.to_string(),
                        u.holders.len().to_string(),
                        u.holders.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
                    ]
                })
                .collect();
            table::print(&mut out, &["TAG", "SLOTS", "IN USE", "HELD BY"], &rows)?;
        }
    }
    Ok(())
}
