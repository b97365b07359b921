//! Command-line interface. Every option also reads a `GUESTWATCH_*` environment variable, and
//! the daemon options can come from a TOML file (`--config`); flags and environment win over
//! the file, the file over built-in defaults (see `config.rs`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use guestwatch_daemon::duration::parse_duration;

use crate::detect::{DetectorChoice, process::AttributionMode};

#[derive(Parser, Debug)]
#[command(
    name = "guestwatch-agent",
    version,
    about = "guestwatch guest agent: kernel-level rpm change detection and package inventory",
    long_about = "guestwatch guest agent: sees every rpm/dnf transaction in the kernel (eBPF \
                  uprobes on librpm), falls back to inotify, scans the rpm database into an index \
                  report and delivers it to guestwatch-relay on the host over VSOCK: pushed \
                  (the agent dials, --relay) or pulled (the relay dials, --listen).\n\n\
                  Logging: GUESTWATCH_LOG=error|warn|info|debug|trace (default info), to stderr."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Scan the rpm database once and print one report to stdout.
    Scan(ScanArgs),
    /// Run detection and scanning locally; print one JSON line per event to stdout.
    Watch(WatchArgs),
    /// The daemon: detect, scan, and deliver reports to the relay until acknowledged.
    Run(RunArgs),
}

/// Which system (or database) to look at.
#[derive(Args, Debug, Clone, Default)]
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
    /// The compact inventory document a report carries (binary, zstd-compressed; see
    /// docs/protocol.md): what a full report of this system costs on the wire.
    Document,
}

/// Detection tuning, shared by `watch` and `run`.
#[derive(Args, Debug, Clone, Default)]
pub struct DetectArgs {
    /// Detector: auto (eBPF if it loads and attaches, else inotify), ebpf, inotify, periodic.
    /// [default: auto]
    #[arg(long, env = "GUESTWATCH_DETECTOR", value_enum)]
    pub detector: Option<DetectorChoice>,
    /// Quiet period before scanning after file-level (inotify, tamper) events. [default: 150ms]
    #[arg(long, env = "GUESTWATCH_QUIET_PERIOD", value_parser = parse_duration, value_name = "DURATION")]
    pub quiet_period: Option<Duration>,
    /// Longest a file-level event waits for quiet before it is scanned anyway. [default: 2s]
    #[arg(long, env = "GUESTWATCH_MAX_DELAY", value_parser = parse_duration, value_name = "DURATION")]
    pub max_delay: Option<Duration>,
    /// Periodic rescan interval; 0 disables it. [default: 4h]
    #[arg(long, env = "GUESTWATCH_PERIODIC_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    pub periodic_interval: Option<Duration>,
    /// Storm limit: scans per minute on average, 0 for no limit. [default: 60]
    #[arg(long, env = "GUESTWATCH_MAX_SCANS_PER_MINUTE", value_name = "N")]
    pub max_scans_per_minute: Option<u32>,
    /// Keep BPF off with this reason (exercises and reports the inotify fallback).
    #[arg(long, env = "GUESTWATCH_DISABLE_BPF", value_name = "REASON")]
    pub disable_bpf: Option<String>,
    /// What is recorded of who ran a transaction: full, or minimal (no command lines, which
    /// can carry secrets). [default: full]
    #[arg(long, env = "GUESTWATCH_ATTRIBUTION", value_enum)]
    pub attribution: Option<AttributionMode>,
    /// A scan still running after this long is abandoned and recorded; detection goes on and
    /// the next trigger scans again. [default: 30s]
    #[arg(long, env = "GUESTWATCH_SCAN_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub scan_timeout: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub detect: DetectArgs,
    /// TOML configuration file (same keys as the options).
    #[arg(long, env = "GUESTWATCH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub detect: DetectArgs,
    /// Where the relay is: vsock:CID:PORT (AF_VSOCK) or unix:PATH (a hybrid-vsock host
    /// socket, or tests). [default: vsock:2:919, unless only --listen is given]
    #[arg(long, env = "GUESTWATCH_RELAY", value_name = "ADDR")]
    pub relay: Option<String>,
    /// Pull mode: accept the relay's connection here instead of (or as well as) dialing it:
    /// vsock:PORT (only the host, CID 2, is accepted) or unix:PATH (only its owner or root).
    /// One session at a time; a newer connection replaces the old one.
    #[arg(long, env = "GUESTWATCH_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// State directory: installation epoch, generation counter, the pending report.
    /// [default: /var/lib/guestwatch]
    #[arg(long = "state", env = "GUESTWATCH_STATE_DIR", value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Serve Prometheus metrics and /healthz on this address (e.g. 127.0.0.1:9917).
    #[arg(long, env = "GUESTWATCH_METRICS", value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Connecting to the relay gives up after this long. [default: 5s]
    #[arg(long, env = "GUESTWATCH_CONNECT_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Option<Duration>,
    /// A report not acknowledged within this long is retransmitted. [default: 10s]
    #[arg(long, env = "GUESTWATCH_ACK_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub ack_timeout: Option<Duration>,
    /// Cap of the exponential reconnect/retransmit backoff: a relay that comes back is found
    /// within this long. [default: 5s]
    #[arg(long, env = "GUESTWATCH_MAX_BACKOFF", value_parser = parse_duration, value_name = "DURATION")]
    pub max_backoff: Option<Duration>,
    /// The machine-id file the epoch is bound to, instead of the target's /etc/machine-id
    /// (for tests).
    #[arg(
        long,
        env = "GUESTWATCH_MACHINE_ID_FILE",
        value_name = "FILE",
        hide = true
    )]
    pub machine_id_file: Option<PathBuf>,
    /// TOML configuration file (same keys as the options).
    #[arg(long, env = "GUESTWATCH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
