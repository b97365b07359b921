//! `guestwatch-agent`: the guest daemon and CLI. A thin layer over the library.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Parser;
use guestwatch_agent::{
    bpf,
    cli::{Cli, Command},
    commands,
};

fn main() {
    // Logging to a closed stderr is silent, never a panic.
    guestwatch_daemon::logging::init();
    let cli = Cli::parse();
    // `scan` and `watch` are filters: when their reader goes away (`… | head -1`), they stop
    // quietly with status 0. The daemon has no stdout to lose; its errors are real.
    let filter = matches!(cli.command, Command::Scan(_) | Command::Watch(_));
    if let Err(e) = run(cli) {
        if filter && is_broken_pipe(&e) {
            std::process::exit(0);
        }
        // One line, as the interface contract asks of failures; not `eprintln!`, which
        // panics when stderr is closed too.
        let _ = writeln!(std::io::stderr(), "guestwatch-agent: {e:#}");
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

/// Whether `e` comes from writing to a pipe whose reader is gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let kind = cause
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| {
                cause
                    .downcast_ref::<serde_json::Error>()
                    .and_then(serde_json::Error::io_error_kind)
            });
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}
