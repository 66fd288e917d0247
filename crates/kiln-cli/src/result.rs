//! `kiln result ...`: inspect persisted results.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use kiln::result::{ResultRef, ResultStorage, StorageKey, record};
use kiln::serializer::{Rendered, render};
use kiln::settings::Settings;
use kiln::store::model::RunRef;

use serde::Serialize;

use crate::table;

#[derive(Subcommand)]
pub(crate) enum ResultCommand {
    /// Show a result record's metadata and verify its hash.
    Show {
        /// A task run or flow run id (or unique prefix), or `storage:key`.
        target: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a result's value to a file: images as image files, serde values as JSON,
    /// anything else as its raw payload.
    Get {
        /// A task run or flow run id (or unique prefix), or `storage:key`.
        target: String,
        /// The file to write (`-` for standard output).
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
    },
}

#[derive(Serialize)]
struct Shown {
    storage: String,
    key: String,
    #[serde(flatten)]
    header: record::RecordHeader,
    verified: bool,
}

pub(crate) fn run(home: &Path, cmd: ResultCommand) -> Result<()> {
    let settings = Settings::load(home)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match cmd {
        ResultCommand::Show { target, json } => {
            let located = locate(home, &settings, &target)?;
            let (storage, kind, key) = located.names();
            let bytes = located.bytes(&rt)?;
            let (header, _) = record::decode_unverified(bytes.clone())
                .with_context(|| format!("result '{key}' in storage '{storage}'"))?;
            let verified = record::decode(bytes);
            let mut out = std::io::stdout().lock();
            if json {
                let shown = Shown {
                    storage: storage.clone(),
                    key: key.clone(),
                    header,
                    verified: verified.is_ok(),
                };
                serde_json::to_writer_pretty(&mut out, &shown)?;
                writeln!(out)?;
            } else {
                writeln!(out, "storage    {storage} ({kind})")?;
                writeln!(out, "key        {key}")?;
                writeln!(out, "serializer {}", header.serializer)?;
                if !header.value_type.is_empty() {
                    writeln!(out, "type       {}", header.value_type)?;
                }
                writeln!(out, "size       {} bytes", header.length)?;
                writeln!(out, "hash       {}", header.hash)?;
                writeln!(out, "created    {}", table::time(Some(header.created)))?;
                if let Some(run) = header.run_id {
                    writeln!(out, "run        {} ({run})", header.run_name)?;
                }
                match &verified {
                    Ok(_) => writeln!(out, "verified   yes: the payload matches its hash")?,
                    Err(_) => writeln!(out, "verified   NO")?,
                }
            }
            verified
                .map(drop)
                .with_context(|| format!("result '{key}' in storage '{storage}'"))
        }
        ResultCommand::Get { target, output } => {
            let located = locate(home, &settings, &target)?;
            let (storage, _, key) = located.names();
            let (header, payload) = match &located {
                Located::Stored(s, k) => rt.block_on(s.get_record(k))?,
                Located::Inline(r) => r.inline_record().expect("an inline reference")?,
            };
            let rendered = render(&header.serializer, &payload)
                .map_err(|e| anyhow::anyhow!("result '{key}' in storage '{storage}': cannot decode it: {e}"))?;
            let (bytes, what) = match rendered {
                Rendered::Json(v) => (serde_json::to_vec_pretty(&v)?, "JSON".to_string()),
                Rendered::Image { extension, bytes } => (bytes, format!("a {extension} image")),
                Rendered::Raw(bytes) => (bytes, format!("the raw '{}' payload", header.serializer)),
                _ => bail!("this kind of result cannot be written yet"),
            };
            if output.as_os_str() == "-" {
                std::io::stdout().lock().write_all(&bytes)?;
            } else {
                std::fs::write(&output, &bytes).with_context(|| format!("writing {}", output.display()))?;
                eprintln!("wrote {} ({} bytes, {what})", output.display(), bytes.len());
            }
            Ok(())
        }
    }
}

/// Where a result's record is: a storage and key, or inline in the state database.
enum Located {
    Stored(ResultStorage, StorageKey),
    Inline(ResultRef),
}

impl Located {
    /// The record's bytes as they are (not verified).
    fn bytes(&self, rt: &tokio::runtime::Runtime) -> Result<bytes::Bytes> {
        match self {
            Located::Stored(storage, key) => Ok(rt.block_on(storage.get_bytes(key))?),
            Located::Inline(r) => Ok(r.inline_bytes().expect("an inline reference")?),
        }
    }

    /// `(storage, kind, key)` for messages.
    fn names(&self) -> (String, String, String) {
        match self {
            Located::Stored(storage, key) => (storage.name().into(), storage.kind().into(), key.to_string()),
            Located::Inline(r) => (kiln::result::INLINE.into(), "the state database".into(), r.hash.clone()),
        }
    }
}

/// A run id (its result) or `storage:key`.
fn locate(home: &Path, settings: &Settings, target: &str) -> Result<Located> {
    let reference: ResultRef = match target.split_once(':') {
        Some((storage, key)) if !storage.is_empty() && !key.is_empty() => ResultRef {
            storage: storage.into(),
            key: key.into(),
            serializer: String::new(),
            size: 0,
            hash: String::new(),
            call: None,
            inline: None,
        },
        _ => {
            let Some(store) = crate::open_store(home, settings)? else {
                bail!(
                    "no run '{target}': nothing is recorded in {} yet",
                    home.join("kiln.db").display()
                );
            };
            let result = match crate::wait(store.resolve(target))? {
                RunRef::Task(id) => crate::wait(store.task_run(id))?.and_then(|r| r.result),
                RunRef::Flow(id) => crate::wait(store.flow_run(id))?.and_then(|r| r.result),
            };
            let Some(result) = result else {
                bail!("run '{target}' has no persisted result (persist it with `#[task(persist)]`)");
            };
            serde_json::from_value(result).context("the run's result reference cannot be read")?
        }
    };
    if reference.inline.is_some() {
        return Ok(Located::Inline(reference));
    }
    let config = settings.storage(&reference.storage).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown storage '{}' (configured: {}); it is defined in kiln.toml of the program that wrote it",
            reference.storage,
            settings.storages().into_keys().collect::<Vec<_>>().join(", ")
        )
    })?;
    let storage = ResultStorage::build(&reference.storage, &config, settings.home())?;
    let key = StorageKey::new(reference.key).map_err(anyhow::Error::msg)?;
    Ok(Located::Stored(storage, key))
}
