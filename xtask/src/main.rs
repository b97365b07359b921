//! `cargo xtask …`: guestwatch's developer commands.

mod bench;
mod build;
mod demo;
mod dictionary;
mod ebpf;
mod fuzz;
mod package;
mod setup;
mod test;
mod util;
mod vmtest;

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
    /// Build the BPF object, then guestwatch-agent (with the object embedded) and
    /// guestwatch-relay in release mode; says what it built and where.
    Build,
    /// Build only the BPF programs for bpfel-unknown-none and check the object has BTF.
    BuildEbpf,
    /// Run every check CI runs: setup, build-ebpf, fmt, clippy -D warnings, all tests, the
    /// agent RPM and its contents (rpm -qlp), vm-test.
    Test,
    /// The main job end to end on a real rpm database, showing changes as they are detected.
    Demo,
    /// Build a static agent and package it as an RPM for RHEL/Fedora guests (installs the
    /// pinned cargo-generate-rpm when missing), then check its contents with rpm.
    PackageRpm,
    /// Run benchmarks (all, or the named `cargo bench` targets), each against its peer.
    Bench {
        /// Benchmark names, e.g. `e2e`; none runs all.
        names: Vec<String>,
    },
    /// Train the zstd dictionary for compact documents from go-rpmdb's package lists
    /// (pkg/rpmdb_testcase_test.go of knqyf263/go-rpmdb); see docs/protocol.md.
    TrainDict {
        /// The go-rpmdb test-case file.
        testcases: std::path::PathBuf,
    },
    /// Run the cargo-fuzz targets in fuzz/ and print executions and crashes per target.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run; none runs all.
        targets: Vec<String>,
    },
    /// Boot a QEMU guest (Debian 6.1 kernel, TCG) and run the agent there: eBPF in the guest
    /// kernel, AF_VSOCK to the host through vhost-device-vsock. See docs/vm-test.md.
    VmTest {
        /// Scenarios to run (see --list); none runs all.
        scenarios: Vec<String>,
        /// List the scenarios and what each proves, then exit.
        #[arg(long)]
        list: bool,
        /// After the scenarios, keep the guest running with its shell on this terminal.
        #[arg(long)]
        keep: bool,
        /// Print every guest console line as it arrives.
        #[arg(long, short)]
        verbose: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build => build::build(),
        Cmd::BuildEbpf => ebpf::build_ebpf().map(drop),
        Cmd::Test => test::test(),
        Cmd::Demo => demo::demo(),
        Cmd::PackageRpm => package::package_rpm().map(drop),
        Cmd::Bench { names } => bench::bench(&names),
        Cmd::TrainDict { testcases } => dictionary::train(&testcases),
        Cmd::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
        Cmd::VmTest {
            scenarios,
            list,
            keep,
            verbose,
        } => vmtest::vm_test(&vmtest::Options {
            scenarios,
            list,
            keep,
            verbose,
        }),
    };
    if let Err(e) = result {
        eprintln!("\nerror: {e:#}");
        std::process::exit(1);
    }
}
