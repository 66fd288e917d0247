//! `kiln server start`: the state store over HTTP.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum ServerCommand {
    /// Serve the API over this home's state database (or KILN_DATABASE_URL) until Ctrl-C.
    Start {
        /// The address to listen on. Only loopback addresses for now: the API has no tokens
        /// yet, so anyone who reaches it could change runs.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// The port (0: a free one, printed at start).
        #[arg(long, default_value_t = 4200)]
        port: u16,
    },
}

pub(crate) fn run(home: &Path, cmd: ServerCommand) -> Result<()> {
    let ServerCommand::Start { host, port } = cmd;
    if !host.is_loopback() {
        bail!(
            "refusing to listen on {host}: the API has no authentication yet, so anyone who reaches it could \
             record and change runs; listen on 127.0.0.1 (the default) and reach it through an SSH tunnel or \
             an authenticating proxy"
        );
    }
    let settings = kiln::settings::Settings::load(home)?;
    let store = kiln::open_store(home, settings.database_url.as_deref())
        .with_context(|| format!("opening the state database of {}", home.display()))?;
    crate::wait(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}; is another server running there?"))?;
        let addr = listener.local_addr()?;
        println!("kiln server listening on http://{addr} (KILN_API_URL=http://{addr})");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("stopping: finishing the requests in flight");
        };
        kiln_server::serve(listener, store, shutdown).await?;
        Ok(())
    })
}
