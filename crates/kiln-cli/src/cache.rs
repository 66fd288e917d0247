//! `kiln cache ...`: the cached results of tasks (records under `cache/` in a storage).

use std::io::Write;
use std::path::Path;

use anyhow::{Result, bail};
use clap::Subcommand;
use kiln::result::{CacheEntry, ResultStorage, StorageKey};
use kiln::settings::Settings;

use crate::table;

#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// List cached results: key, size, created, expires, producing run.
    Ls {
        /// The storage [default: the default storage, `local` unless set].
        #[arg(long)]
        storage: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete one cached result (the next run computes it again).
    Rm {
        /// The key, as `kiln cache ls` shows it.
        key: String,
        /// The storage [default: the default storage].
        #[arg(long)]
        storage: Option<String>,
    },
    /// Delete cached results.
    Prune {
        /// Delete the expired ones.
        #[arg(long)]
        expired: bool,
        /// The storage [default: the default storage].
        #[arg(long)]
        storage: Option<String>,
    },
}

pub(crate) fn run(home: &Path, cmd: CacheCommand) -> Result<()> {
    let settings = Settings::load(home)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let open = |name: Option<String>| -> Result<ResultStorage> {
        let name = name.unwrap_or_else(|| settings.default_storage.clone());
        let Some(config) = settings.storage(&name) else {
            bail!(
                "unknown storage '{name}' (configured: {})",
                settings.storages().into_keys().collect::<Vec<_>>().join(", ")
            );
        };
        Ok(ResultStorage::build(&name, &config, home)?)
    };
    let entries = |storage: &ResultStorage| -> Result<Vec<CacheEntry>> {
        let listing = rt.block_on(storage.cache_entries())?;
        for (key, e) in &listing.unreadable {
            eprintln!("skipping {key}: {e}");
        }
        Ok(listing.entries)
    };
    let mut out = std::io::stdout().lock();
    match cmd {
        CacheCommand::Ls { storage, json } => {
            let storage = open(storage)?;
            let listed = entries(&storage)?;
            if json {
                serde_json::to_writer_pretty(&mut out, &listed)?;
                writeln!(out)?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = listed
                .iter()
                .map(|e| {
                    vec![
                        e.key.clone(),
                        e.size.to_string(),
                        table::time(Some(e.created)),
                        e.expires.map_or("never".into(), |x| table::time(Some(x))),
                        e.run_id.map_or("-".into(), |r| format!("{} ({r})", e.run_name)),
                    ]
                })
                .collect();
            table::print(
                &mut out,
                &["KEY", "SIZE", "CREATED (UTC)", "EXPIRES (UTC)", "PRODUCED BY"],
                &rows,
            )?;
        }
        CacheCommand::Rm { key, storage } => {
            let storage = open(storage)?;
            let key = StorageKey::new(key).map_err(anyhow::Error::msg)?;
            if !key.as_str().starts_with("cache/") {
                bail!("'{key}' is not a cache key (they start with cache/; see `kiln cache ls`)");
            }
            if !rt.block_on(storage.exists(&key))? {
                bail!("no cached result '{key}' in storage '{}'", storage.name());
            }
            rt.block_on(storage.delete(&key))?;
            eprintln!("deleted {key}");
        }
        CacheCommand::Prune { expired, storage } => {
            if !expired {
                bail!("say what to prune: --expired");
            }
            let storage = open(storage)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_micros() as i64;
            let pruned = rt.block_on(storage.prune_expired_cache(now))?;
            eprintln!(
                "pruned {pruned} expired cached result(s) from storage '{}'",
                storage.name()
            );
        }
    }
    Ok(())
}
