//! `berth`: runs the server (`berth serve`), manages API keys offline
//! (`berth keys`), and is the client of a running server for everything else.

#![forbid(unsafe_code)]

mod agents;
mod audit;
mod client;
mod doctor;
mod invoke;
mod keys;
mod logs;
mod payload;
mod render;
mod serve;
mod sessions;
mod stream;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Where `serve` and `keys` keep their state when no data dir is given.
const DEFAULT_DATA_DIR: &str = "./berth-data";

#[derive(Parser)]
#[command(name = "berth", version, about = "Session-aware runtime for AI agents")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand accepts.
#[derive(Args, Clone)]
pub struct Global {
    /// The berth server to talk to.
    #[arg(
        long,
        env = "BERTH_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub url: String,
    /// API key. If unset, `<data-dir>/dev-api-key` (written by
    /// `berth serve --dev`) is used when it exists.
    #[arg(long, env = "BERTH_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Data directory of `serve` and `keys` [default: ./berth-data].
    #[arg(long, env = "BERTH_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Print raw JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Global {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }

    /// A client for `--url`, authenticated as described on `api_key`.
    pub fn client(&self) -> anyhow::Result<client::Client> {
        let key = client::resolve_api_key(self.api_key.clone(), &self.data_dir());
        client::Client::new(&self.url, key)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the berth server until SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
    /// Manage API keys, directly in the data dir (no server needed).
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Pack a directory and deploy it as a new agent version.
    Deploy(agents::DeployArgs),
    /// List, inspect and delete agents.
    #[command(subcommand)]
    Agents(agents::AgentsCmd),
    /// Invoke an agent and stream its response to stdout.
    Invoke(invoke::InvokeArgs),
    /// List, inspect and stop sessions.
    #[command(subcommand)]
    Sessions(sessions::SessionsCmd),
    /// Print a session's event log.
    Logs(logs::LogsArgs),
    /// Resource usage, summed per session, agent, user or tenant.
    Usage(sessions::UsageArgs),
    /// Check what this host supports for sandboxing, and which substrates
    /// (process, gvisor, microvm) it can run and why not.
    Doctor(doctor::DoctorArgs),
    /// Authentication failures, denied accesses and admin actions.
    Audit(audit::AuditArgs),
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Serve(args) => serve::run(g, args).await,
        Command::Keys(cmd) => keys::run(g, cmd).await,
        Command::Deploy(args) => agents::deploy(g, args).await,
        Command::Agents(cmd) => agents::run(g, cmd).await,
        Command::Invoke(args) => invoke::run(g, args).await,
        Command::Sessions(cmd) => sessions::run(g, cmd).await,
        Command::Logs(args) => logs::run(g, args).await,
        Command::Usage(args) => sessions::usage(g, args).await,
        Command::Doctor(args) => doctor::run(g, &args).await,
        Command::Audit(args) => audit::run(g, args).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        // `berth logs | head` closing the pipe is the reader's choice, not
        // a failure worth a message.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line; a server error is
            // the bare `message (code)`.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_subcommand() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["berth", "agents", "ls", "--json", "--url", "http://x:1"])?;
        assert!(cli.global.json);
        assert_eq!(cli.global.url, "http://x:1");
        Ok(())
    }
}
