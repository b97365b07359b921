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
                  Unix sockets — guests dial it (push) or it dials them (pull, --pull, --pull-dir) — \
                  identifies each VM from the kernel or the target it dialed, delivers reports to a sink \
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

/// Large buffers (frames, reports: up to 64 MiB each) go straight to the kernel and back when
/// freed, so the memory a burst of guests took is returned once they are served. glibc's default
/// raises its mmap threshold after every large free, until such buffers come from arenas that are
/// never trimmed below 64 MiB.
fn return_large_buffers_to_the_kernel() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before any other thread
    // exists and its arguments are valid parameter numbers and sizes.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

fn main() {
    return_large_buffers_to_the_kernel();
    guestwatch_daemon::logging::init();
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
