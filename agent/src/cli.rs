//! Command-line interface: every option also reads a `GUESTWATCH_*` environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "guestwatch-agent",
    version,
    about = "guestwatch guest agent: kernel-level rpm change detection and package inventory",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Scan the rpm database once and print one report to stdout.
    Scan(ScanArgs),
    /// Run detection and scanning locally; print one JSON line per event.
    Watch(WatchArgs),
}

/// Which system (or database) to look at.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// Root of the system to inventory; its rpm database is found under it
    /// (usr/lib/sysimage/rpm, var/lib/rpm, usr/share/rpm).
    #[arg(long, env = "GUESTWATCH_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// An rpm database directory (or file) to read directly.
    #[arg(long, env = "GUESTWATCH_DBPATH", value_name = "DIR")]
    pub dbpath: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    #[command(flatten)]
    pub target: Target,
    /// Output format.
    #[arg(long, env = "GUESTWATCH_FORMAT", value_enum, default_value_t = Format::Claircore)]
    pub format: Format,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A claircore-compatible IndexReport (JSON).
    Claircore,
    /// JSON lines, one package per line, rpm tag names as field names.
    Packages,
    /// A CycloneDX 1.6 JSON SBOM.
    Cyclonedx,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub target: Target,
}
