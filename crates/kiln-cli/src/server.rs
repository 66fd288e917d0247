//! `kiln server start`: the state store over HTTP.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum ServerCommand {
    /// Serve the API over this home's state database (or KILN_DATABASE_URL) until Ctrl-C or SIGTERM.
    Start {
        /// The address to listen on. Beyond loopback only once an API token exists.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// The port (0: a free one, printed at start).
        #[arg(long, default_value_t = 4200)]
        port: u16,
    },
    /// API tokens: once one exists, every request needs one.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token and print its secret (shown this once; only its hash is stored).
    Create {
        /// A name for it (`ci`, `alice-laptop`).
        name: String,
        /// It may only read.
        #[arg(long)]
        read_only: bool,
    },
    /// List the tokens (names, never secrets).
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: every server sharing the database refuses it within seconds.
    Revoke {
        /// Its name.
        name: String,
    },
}

fn database(home: &Path) -> Result<std::sync::Arc<dyn kiln::store::Store>> {
    let settings = kiln::settings::Settings::load(home)?;
    kiln::open_store(home, settings.database_url.as_deref())
        .with_context(|| format!("opening the state database of {}", home.display()))
}

pub(crate) fn run(home: &Path, cmd: ServerCommand) -> Result<()> {
    let (host, port) = match cmd {
        ServerCommand::Start { host, port } => (host, port),
        ServerCommand::Token(cmd) => return token(home, cmd),
    };
    let settings = kiln::settings::Settings::load(home)?;
    let store = database(home)?;
    let tokens = crate::wait(store.api_tokens())?;
    if !host.is_loopback() && !tokens.iter().any(|t| t.revoked.is_none()) {
        bail!(
            "refusing to listen on {host} without API tokens: anyone who reaches it could record and change runs; \
             create one first (`kiln server token create NAME`), or listen on 127.0.0.1 (the default)"
        );
    }
    crate::wait(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}; is another server running there?"))?;
        let addr = listener.local_addr()?;
        println!("kiln server listening on http://{addr} (KILN_API_URL=http://{addr})");
        eprintln!(
            "web UI: http://{addr}/runs{}",
            if tokens.is_empty() {
                ""
            } else {
                " (log in with an API token)"
            }
        );
        let shutdown = async {
            stopped().await;
            eprintln!("stopping: finishing the requests in flight");
        };
        kiln_server::Server::new(store)
            .with_results(settings)
            .serve(listener, shutdown)
            .await?;
        Ok(())
    })
}

/// Ctrl-C, or SIGTERM (what service managers and container runtimes send to stop).
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn token(home: &Path, cmd: TokenCommand) -> Result<()> {
    use kiln::store::model::{ApiToken, Write, now_micros};
    let store = database(home)?;
    let mut out = std::io::stdout().lock();
    use std::io::Write as _;
    match cmd {
        TokenCommand::Create { name, read_only } => {
            if crate::wait(store.api_tokens())?.iter().any(|t| t.name == name) {
                bail!("there is already a token named '{name}'; revoke it or choose another name");
            }
            let secret = ApiToken::new_secret();
            let token = ApiToken {
                name: name.clone(),
                hash: ApiToken::hash_secret(&secret),
                read_only,
                created: now_micros(),
                revoked: None,
            };
            write(&*store, Write::PutToken(token))?;
            writeln!(out, "{secret}")?;
            eprintln!(
                "token '{name}'{} created; its secret (above) is shown only now: give it to clients as KILN_API_KEY",
                if read_only { " (read-only)" } else { "" }
            );
        }
        TokenCommand::Ls { json } => {
            let tokens = crate::wait(store.api_tokens())?;
            if json {
                let listed: Vec<_> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "name": t.name, "read_only": t.read_only, "created": t.created, "revoked": t.revoked
                        })
                    })
                    .collect();
                serde_json::to_writer_pretty(&mut out, &listed)?;
                writeln!(out)?;
            } else {
                for t in &tokens {
                    let mode = if t.read_only { "read-only" } else { "read-write" };
                    let state = if t.revoked.is_some() { "revoked" } else { "active" };
                    writeln!(
                        out,
                        "{:<24} {mode:<10} {state:<8} {}",
                        t.name,
                        crate::table::time(Some(t.created))
                    )?;
                }
                if tokens.is_empty() {
                    eprintln!("no API tokens: the server is open (and listens on loopback only)");
                }
            }
        }
        TokenCommand::Revoke { name } => {
            write(
                &*store,
                Write::RevokeToken {
                    name: name.clone(),
                    at: now_micros(),
                },
            )?;
            eprintln!("token '{name}' revoked");
        }
    }
    Ok(())
}

/// Sends one write and says whether it was recorded.
/// Writes `write` and waits for it: an error unless the store applied it.
pub(crate) fn write(store: &dyn kiln::store::Store, write: kiln::store::model::Write) -> Result<()> {
    match crate::wait(store.write(write))? {
        kiln::store::Outcome::Applied { .. } => Ok(()),
        // Refused with a reason for the user: said as is.
        kiln::store::Outcome::Failed(e) if !e.is_retryable() => Err(anyhow::anyhow!("{}", e.reason())),
        kiln::store::Outcome::Failed(e) => Err(anyhow::anyhow!("{e}")),
        other => Err(anyhow::anyhow!("the store did not record it: {other:?}")),
    }
}
