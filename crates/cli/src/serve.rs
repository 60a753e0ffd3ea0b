//! `berth serve`: config file, then flags on top, then the server.

use crate::Global;
use anyhow::{Context, Result};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (overrides the config file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TOML config file; built-in defaults when not given.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Development mode: mints an admin key into `<data-dir>/dev-api-key`.
    #[arg(long)]
    dev: bool,
    /// Minimum lifetime of an activation in seconds (overrides the file).
    #[arg(long)]
    min_lifetime_s: Option<u64>,
}

pub async fn run(g: &Global, args: ServeArgs) -> Result<()> {
    init_tracing();
    let config = load_config(g, args)?;
    berth_server::run(config).await.context("server failed")
}

/// Flags win over the file, and only flags that were given: an absent flag
/// must not reset a value the file set.
fn load_config(g: &Global, args: ServeArgs) -> Result<berth_server::Config> {
    let mut config =
        berth_server::Config::load(args.config.as_deref()).with_context(|| match &args.config {
            Some(path) => format!("loading config {}", path.display()),
            None => "loading the default config".to_owned(),
        })?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &g.data_dir {
        config.data_dir = dir.clone();
    }
    if args.dev {
        config.dev = true;
    }
    if let Some(s) = args.min_lifetime_s {
        config.min_lifetime_s = s;
    }
    Ok(config)
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal; a log file or journald gets text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
