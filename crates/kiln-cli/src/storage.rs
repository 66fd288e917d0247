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
    /// Add (or replace) a storage in kiln.toml, after writing, reading back and deleting a
    /// probe object through it (secrets are best given with `--*-env` or `--*-stdin`: a
    /// flag's value shows in `ps` and in the shell's history).
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
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
    /// s3: the secret access key (visible in `ps`: prefer the two flags below).
    #[arg(long)]
    secret_access_key: Option<String>,
    /// s3: the secret access key, read from this environment variable.
    #[arg(long, value_name = "VAR", conflicts_with_all = ["secret_access_key", "secret_access_key_stdin"])]
    secret_access_key_env: Option<String>,
    /// s3: the secret access key, read from standard input (its first line).
    #[arg(long, conflicts_with = "secret_access_key")]
    secret_access_key_stdin: bool,
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
    /// azure: the account key (visible in `ps`: prefer the two flags below).
    #[arg(long)]
    access_key: Option<String>,
    /// azure: the account key, read from this environment variable.
    #[arg(long, value_name = "VAR", conflicts_with_all = ["access_key", "access_key_stdin"])]
    access_key_env: Option<String>,
    /// azure: the account key, read from standard input (its first line).
    #[arg(long, conflicts_with = "access_key")]
    access_key_stdin: bool,
    /// azure: use the Azurite emulator's well-known account.
    #[arg(long)]
    use_emulator: bool,
    /// Save it without trying it first (an endpoint not reachable from here yet).
    #[arg(long)]
    no_test: bool,
}

/// A secret given one of three ways: the flag's value, an environment variable, stdin.
fn secret(value: Option<String>, env: Option<String>, stdin: bool, flag: &str) -> Result<Option<String>> {
    if let Some(var) = env {
        return match std::env::var(&var) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            _ => bail!("--{flag}-env {var}: the environment variable {var} is not set (or empty)"),
        };
    }
    if stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            bail!("--{flag}-stdin: standard input held no secret (an empty first line)");
        }
        return Ok(Some(line));
    }
    if value.is_some() {
        eprintln!(
            "note: --{flag} given as a flag shows in `ps` and the shell's history; --{flag}-env VAR or \
             --{flag}-stdin keep it out of both"
        );
    }
    Ok(value)
}

impl AddArgs {
    /// The flags given that a storage of its kind does not take.
    fn stray_flags(&self) -> Vec<&'static str> {
        let given: [(&str, bool, &[Kind]); 13] = [
            ("path", self.path.is_some(), &[Kind::Local]),
            ("bucket", self.bucket.is_some(), &[Kind::S3, Kind::Gcs]),
            ("endpoint", self.endpoint.is_some(), &[Kind::S3, Kind::Azure]),
            ("region", self.region.is_some(), &[Kind::S3]),
            ("access-key-id", self.access_key_id.is_some(), &[Kind::S3]),
            (
                "secret-access-key",
                self.secret_access_key.is_some()
                    || self.secret_access_key_env.is_some()
                    || self.secret_access_key_stdin,
                &[Kind::S3],
            ),
            ("allow-http", self.allow_http, &[Kind::S3, Kind::Azure]),
            ("prefix", self.prefix.is_some(), &[Kind::S3, Kind::Gcs, Kind::Azure]),
            (
                "service-account-path",
                self.service_account_path.is_some(),
                &[Kind::Gcs],
            ),
            ("container", self.container.is_some(), &[Kind::Azure]),
            ("account", self.account.is_some(), &[Kind::Azure]),
            (
                "access-key",
                self.access_key.is_some() || self.access_key_env.is_some() || self.access_key_stdin,
                &[Kind::Azure],
            ),
            ("use-emulator", self.use_emulator, &[Kind::Azure]),
        ];
        given
            .into_iter()
            .filter(|(_, set, kinds)| *set && !kinds.contains(&self.kind))
            .map(|(flag, _, _)| flag)
            .collect()
    }

    fn config(self) -> Result<StorageConfig> {
        let stray = self.stray_flags();
        if !stray.is_empty() {
            bail!(
                "{} {} not apply to a storage of kind {} (see `kiln storage add --help`)",
                stray.iter().map(|f| format!("--{f}")).collect::<Vec<_>>().join(", "),
                if stray.len() == 1 { "does" } else { "do" },
                self.kind.to_possible_value().expect("no variant is skipped").get_name()
            );
        }
        let need = |v: Option<String>, flag: &str, kind: &str| -> Result<String> {
            v.ok_or_else(|| anyhow::anyhow!("a storage of kind {kind} needs --{flag}"))
        };
        let secret_access_key = secret(
            self.secret_access_key,
            self.secret_access_key_env,
            self.secret_access_key_stdin,
            "secret-access-key",
        )?;
        let access_key = secret(
            self.access_key,
            self.access_key_env,
            self.access_key_stdin,
            "access-key",
        )?;
        Ok(match self.kind {
            Kind::Local => StorageConfig::Local { path: self.path },
            Kind::Memory => StorageConfig::Memory,
            Kind::S3 => StorageConfig::S3 {
                bucket: need(self.bucket, "bucket", "s3")?,
                endpoint: self.endpoint,
                region: self.region,
                access_key_id: self.access_key_id,
                secret_access_key,
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
                access_key,
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
            let test = !args.no_test && !matches!(args.kind, Kind::Memory);
            let config = (*args).config()?;
            let location = config.location(&name, home);
            // Refused before anything is tried (a relative folder would be created first).
            kiln::settings::check_storage(&name, &config)?;
            // Tried before it is saved: a storage that cannot hold results is not kept.
            if test {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let tried = ResultStorage::build(&name, &config, home)
                    .map_err(anyhow::Error::from)
                    .and_then(|storage| Ok(rt.block_on(storage.probe())?));
                tried.map_err(|e| {
                    // Not saved, so not a storage `kiln storage test` knows: that advice goes.
                    let why = format!("{e:#}").replace(&format!("; `kiln storage test {name}` tries it again"), "");
                    anyhow::anyhow!("{why}\nstorage '{name}' was not saved (add --no-test to save it untried)")
                })?;
            }
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
