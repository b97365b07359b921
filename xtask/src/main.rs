//! `cargo xtask …`: guestwatch's developer commands.

mod demo;
mod ebpf;
mod setup;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "guestwatch developer commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and tests need: Debian packages, nightly rust-src, bpf-linker.
    /// Idempotent; safe to run every time.
    Setup,
    /// Build the BPF programs for bpfel-unknown-none and check the object has BTF.
    BuildEbpf,
    /// Run every check CI runs: setup, build-ebpf, fmt, clippy -D warnings, all tests.
    Test,
    /// The main job end to end on a real rpm database, showing changes as they are detected.
    Demo,
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf => ebpf::build_ebpf().map(drop),
        Cmd::Test => test::test(),
        Cmd::Demo => demo::demo(),
    };
    if let Err(e) = result {
        eprintln!("\nerror: {e:#}");
        std::process::exit(1);
    }
}
