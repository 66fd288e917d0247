//! `kiln storage ...`: named result storages in kiln.toml.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln::result::{ResultStorage, StorageConfig};
use kiln::settings::Settings;
use serde::Serialize;

use crate::table;

#[derive(Subcommand)]
pub(crate) enum StorageCommand {
    /// Add (or replace) a storage in kiln.toml.
    Add(Box<AddArgs>),
    /// List the storages (secrets are never shown).
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write, read and delete a probe object, and say what failed.
    Test {
        /// The storage's name.
        name: String,
    },
    /// Remove a storage from kiln.toml (its objects are left alone).
    Rm {
        /// The storage's name.
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Local,
    Memory,
    S3,
    Gcs,
    Azure,
}

#[derive(Args)]
pub(crate) struct AddArgs {
    /// The storage's name (letters, digits, '-' and '_').
    name: String,
    /// What kind of storage.
    #[arg(long, value_enum)]
    kind: Kind,
    /// local: the folder [default: $KILN_HOME/storage/NAME].
    #[arg(long)]
    path: Option<PathBuf>,
    /// s3, gcs: the bucket.
    #[arg(long)]
    bucket: Option<String>,
    /// s3, azure: the endpoint of a compatible server or emulator.
    #[arg(long)]
    endpoint: Option<String>,
    /// s3: the region [default: us-east-1].
    #[arg(long)]
    region: Option<String>,
    /// s3: the access key id.
    #[arg(long)]
    access_key_id: Option<String>,
    /// s3: the secret access key.
    #[arg(long)]
    secret_access_key: Option<String>,
    /// s3, azure: allow plain http endpoints.
    #[arg(long)]
    allow_http: bool,
    /// s3, gcs, azure: a folder inside the bucket or container.
    #[arg(long)]
    prefix: Option<String>,
    /// gcs: a service account key file.
    #[arg(long)]
    service_account_path: Option<String>,
    /// azure: the container.
    #[arg(long)]
    container: Option<String>,
    /// azure: the storage account.
    #[arg(long)]
    account: Option<String>,
    /// azure: the account key.
    #[arg(long)]
    access_key: Option<String>,
    /// azure: use the Azurite emulator's well-known account.
    #[arg(long)]
    use_emulator: bool,
}

impl AddArgs {
    fn config(self) -> Result<StorageConfig> {
        let need = |v: Option<String>, flag: &str, kind: &str| -> Result<String> {
            v.ok_or_else(|| anyhow::anyhow!("a storage of kind {kind} needs --{flag}"))
        };
        Ok(match self.kind {
            Kind::Local => StorageConfig::Local { path: self.path },
            Kind::Memory => StorageConfig::Memory,
            Kind::S3 => StorageConfig::S3 {
                bucket: need(self.bucket, "bucket", "s3")?,
                endpoint: self.endpoint,
                region: self.region,
                access_key_id: self.access_key_id,
                secret_access_key: self.secret_access_key,
                allow_http: self.allow_http,
                prefix: self.prefix,
            },
            Kind::Gcs => StorageConfig::Gcs {
                bucket: need(self.bucket, "bucket", "gcs")?,
                service_account_path: self.service_account_path,
                prefix: self.prefix,
            },
            Kind::Azure => StorageConfig::Azure {
                container: need(self.container, "container", "azure")?,
                account: self.account,
                access_key: self.access_key,
                endpoint: self.endpoint,
                use_emulator: self.use_emulator,
                allow_http: self.allow_http,
                prefix: self.prefix,
            },
        })
    }
}

#[derive(Serialize)]
struct Listed {
    name: String,
    kind: &'static str,
    location: String,
}

pub(crate) fn run(home: &Path, cmd: StorageCommand) -> Result<()> {
    let mut settings = Settings::load(home)?;
    let mut out = std::io::stdout().lock();
    match cmd {
        StorageCommand::Add(args) => {
            let name = args.name.clone();
            let config = (*args).config()?;
            let location = config.location(&name, home);
            settings.put_storage(&name, config)?;
            eprintln!("storage '{name}' ({location}) saved in {}", settings.file().display());
        }
        StorageCommand::Ls { json } => {
            let listed: Vec<Listed> = settings
                .storages()
                .into_iter()
                .map(|(name, c)| Listed {
                    kind: c.kind(),
                    location: c.location(&name, home),
                    name,
                })
                .collect();
            if json {
                serde_json::to_writer_pretty(&mut out, &listed)?;
                writeln!(out)?;
            } else {
                let rows: Vec<Vec<String>> = listed
                    .into_iter()
                    .map(|l| vec![l.name, l.kind.to_string(), l.location])
                    .collect();
                table::print(&mut out, &["NAME", "KIND", "LOCATION"], &rows)?;
            }
        }
        StorageCommand::Test { name } => {
            let Some(config) = settings.storage(&name) else {
                bail!(
                    "unknown storage '{name}' (configured: {})",
                    settings.storages().into_keys().collect::<Vec<_>>().join(", ")
                );
            };
            let storage = ResultStorage::build(&name, &config, home)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(storage.probe())?;
            writeln!(out, "write, read back and delete: ok")?;
            writeln!(out, "storage '{name}' works ({})", config.location(&name, home))?;
        }
        StorageCommand::Rm { name } => {
            if !settings.remove_storage(&name)? {
                bail!("no storage '{name}' in {}", settings.file().display());
            }
            eprintln!(
                "storage '{name}' removed from {} (its objects were left alone)",
                settings.file().display()
            );
        }
    }
    Ok(())
}
