//! `guestwatch-agent`: the guest daemon and CLI. A thin layer over the library.

use anyhow::{Context, Result};
use clap::Parser;
use guestwatch_agent::{
    bpf,
    cli::{Cli, Command},
    commands,
};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("GUESTWATCH_LOG", "info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line, as the interface contract asks of failures.
        eprintln!("guestwatch-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Scan(args) => commands::scan::scan(&args),
        Command::Watch(args) => {
            if !bpf::built_with_bpf() {
                log::warn!("{}", bpf::BpfError::NotBuilt);
            }
            in_runtime(commands::watch::watch(&args))
        }
        Command::Run(args) => {
            if !bpf::built_with_bpf() {
                log::warn!("{}", bpf::BpfError::NotBuilt);
            }
            in_runtime(commands::run::run(&args))
        }
    }
}

/// Runs `work` on a current-thread runtime. The runtime is then shut down without waiting for
/// blocking threads: a scan abandoned at its deadline must not hold up the exit.
fn in_runtime(work: impl Future<Output = Result<()>>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(work);
    runtime.shutdown_background();
    result
}
