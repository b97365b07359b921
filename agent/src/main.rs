//! `guestwatch-agent`: the guest daemon and CLI.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use guestwatch_agent::bpf::{self, ProbeOptions, TxProbes};

#[derive(Parser)]
#[command(
    name = "guestwatch-agent",
    version,
    about = "guestwatch guest agent: rpm change detection and package inventory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run detection locally and print one JSON line per event.
    Watch,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("GUESTWATCH_LOG", "info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    if !bpf::built_with_bpf() {
        log::warn!("{}", bpf::BpfError::NotBuilt);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Watch => watch().await,
        }
    })
}

async fn watch() -> Result<()> {
    let mut probes = TxProbes::load(&ProbeOptions {
        ignore_tgid: Some(std::process::id()),
        ..Default::default()
    })
    .context("loading the rpmtsRun probes")?;
    for library in probes.libraries() {
        log::info!("attached to rpmtsRun in {}", library.path.display());
    }
    loop {
        let record = probes.next().await.context("reading BPF events")?;
        println!(
            "{}",
            serde_json::json!({
                "event": "transaction",
                "phase": format!("{:?}", record.kind),
                "pid": record.tgid,
                "tid": record.pid,
                "uid": record.uid,
                "comm": record.comm,
                "ret": record.ret,
            })
        );
    }
}
