//! `kiln`: inspect what Kiln recorded.
//!
//! Results go to stdout (a table, or JSON with `--json`); diagnostics go to stderr, and a
//! failure exits non-zero.

mod cache;
mod deployment;
mod limit;
mod result;
mod runs;
mod server;
mod storage;
mod table;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Inspect Kiln's flow runs, task runs and logs")]
struct Cli {
    /// Kiln's home folder, holding kiln.db [default: ~/.kiln]
    #[arg(long, global = true, env = "KILN_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Flow runs and task runs.
    #[command(subcommand)]
    Runs(runs::RunsCommand),
    /// Persisted results.
    #[command(subcommand)]
    Result(result::ResultCommand),
    /// Named result storages.
    #[command(subcommand)]
    Storage(storage::StorageCommand),
    /// Cached task results.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Deployments: flows that workers serve, and runs of them.
    #[command(subcommand)]
    Deployment(deployment::DeploymentCommand),
    /// Global concurrency limits by tag.
    #[command(subcommand)]
    Limit(limit::LimitCommand),
    /// The Kiln server: the state store over HTTP for many processes and machines.
    #[command(subcommand)]
    Server(server::ServerCommand),
}

/// The state store the CLI reads: through the server at `KILN_API_URL`, else the database
/// (opened without creating or migrating it). `None`: nothing is recorded there yet.
pub(crate) fn open_store(
    home: &std::path::Path,
    settings: &kiln::settings::Settings,
) -> Result<Option<std::sync::Arc<dyn kiln::store::Store>>, kiln::Error> {
    match settings.api_url.as_deref() {
        Some(api) => kiln::open_api(api, settings.api_key.as_deref()).map(Some),
        None => kiln::open_existing_store(home, settings.database_url.as_deref()),
    }
}

/// Runs a future to completion on the CLI's runtime (store reads are async).
pub(crate) fn wait<F: std::future::Future>(f: F) -> F::Output {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cannot start a tokio runtime")
        })
        .block_on(f)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Given with `--home` or `KILN_HOME`, rather than the default.
    let home_given = cli.home.as_ref().is_some_and(|h| !h.as_os_str().is_empty());
    let home = match cli.home.filter(|h| !h.as_os_str().is_empty()) {
        Some(home) => home,
        None => match kiln::home_dir() {
            Ok(home) => home,
            Err(e) => return fail(&e.into()),
        },
    };
    // A home given that does not exist is a typo, not an empty home: commands that read
    // runs and results say so (those that set one up, `storage add` and `server`, create it).
    let reads = !matches!(cli.command, Command::Storage(_) | Command::Server(_));
    if reads && home_given && !home.exists() && std::env::var_os("KILN_API_URL").is_none() {
        return fail(&anyhow::anyhow!(
            "Kiln home {} does not exist (given with --home or KILN_HOME); check the path",
            home.display()
        ));
    }
    let outcome = match cli.command {
        Command::Runs(cmd) => runs::run(&home, cmd),
        Command::Result(cmd) => result::run(&home, cmd),
        Command::Storage(cmd) => storage::run(&home, cmd),
        Command::Cache(cmd) => cache::run(&home, cmd),
        Command::Deployment(cmd) => deployment::run(&home, cmd),
        Command::Limit(cmd) => limit::run(&home, cmd),
        Command::Server(cmd) => server::run(&home, cmd),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    // A closed pipe (`kiln runs ls | head`) is not an error worth reporting.
    if e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return ExitCode::SUCCESS;
    }
    // Error text may quote a run's name, a panic message or a server's answer.
    eprintln!("error: {}", table::clean(&format!("{e:#}"), true));
    ExitCode::FAILURE
}
