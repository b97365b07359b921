//! `guestwatch-relay`: the host daemon. A thin CLI over the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use guestwatch_relay::{
    config::{RunArgs, Settings},
    server,
};

#[derive(Parser)]
#[command(
    name = "guestwatch-relay",
    version,
    about = "guestwatch host relay: receives guests' package reports over VSOCK, delivers them to a sink, acknowledges them",
    long_about = "guestwatch host relay: receives guests' index reports over AF_VSOCK and hybrid-vsock \
                  Unix sockets, identifies each VM from the kernel, delivers reports to a sink \
                  (directory, HTTP(S), Redis Streams) and acknowledges a guest only once the sink has \
                  its report.\n\nLogging: GUESTWATCH_LOG=error|warn|info|debug|trace (default info), to stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Run(RunArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("GUESTWATCH_LOG", "info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("guestwatch-relay: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let settings = Settings::resolve(&args)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("guestwatch-relay")
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(server::run(settings))
        }
    }
}
