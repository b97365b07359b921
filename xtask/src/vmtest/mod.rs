//! `cargo xtask vm-test`: guestwatch in a real guest kernel.
//!
//! The agent runs in a QEMU (TCG) guest booted from Debian's 6.1 kernel and an initramfs,
//! loads its BPF programs in that kernel, and talks real AF_VSOCK through
//! `vhost-device-vsock`, whose host side is plain Unix sockets (hybrid vsock). Stages:
//! static guest binaries → kernel and busybox (`apt-get download`, cached) → test packages →
//! initramfs → vhost-device-vsock + QEMU → the scenarios of [`scenarios::table`].
//! See docs/vm-test.md.

mod binaries;
mod console;
mod cpio;
mod fetch;
mod hostfiles;
mod initramfs;
mod kmod;
mod machine;
mod packages;
mod relay;
mod runner;
mod scenarios;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    setup,
    util::{note, step, workspace_root},
};
use runner::{Outcome, RunOptions, Status};
use scenarios::Scenario;

/// Modules the guest loads (their dependencies are found from the modules themselves).
const MODULES: &[&str] = &["virtio_pci", "vmw_vsock_virtio_transport", "vsock_loopback"];
/// Guest memory; QEMU allocates it lazily from a shared memfd.
const MEMORY_MIB: u32 = 1024;

pub struct Options {
    /// Scenario names to run; empty runs all.
    pub scenarios: Vec<String>,
    pub list: bool,
    pub keep: bool,
    pub verbose: bool,
}

/// Everything vm-test keeps under `target/vm/`.
pub struct Dirs {
    /// Downloaded `.deb`s (delete to refetch).
    pub debs: PathBuf,
    /// `dpkg -x` trees, one per `.deb`.
    pub unpacked: PathBuf,
    /// The guest's test packages.
    pub rpms: PathBuf,
    /// This run: initramfs, logs, per-scenario host files.
    pub run: PathBuf,
}

impl Dirs {
    fn new() -> Self {
        let vm = workspace_root().join("target/vm");
        Self {
            debs: vm.join("debs"),
            unpacked: vm.join("unpacked"),
            rpms: vm.join("rpms"),
            run: vm.join("run"),
        }
    }
}

/// Times each stage and prints it as it finishes.
struct Stages(Vec<(&'static str, Duration)>);

impl Stages {
    fn run<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        step(&format!("vm-test: {name}"));
        let started = Instant::now();
        let value = f()?;
        let took = started.elapsed();
        note(&format!("{name}: {:.1}s", took.as_secs_f64()));
        self.0.push((name, took));
        Ok(value)
    }
}

pub fn vm_test(options: &Options) -> Result<()> {
    let table = scenarios::table();
    if options.list {
        for s in &table {
            println!("{:<15} {}", s.name, s.proves);
        }
        return Ok(());
    }
    let selected = select(&table, &options.scenarios)?;
    let started = Instant::now();
    let dirs = Dirs::new();
    let mut stages = Stages(Vec::new());

    stages.run("setup (idempotent)", setup::setup)?;
    let binaries = stages.run("static guest binaries", binaries::build)?;
    let kernel = stages.run("guest kernel", || fetch::kernel(&dirs))?;
    note(&format!("{} ({})", kernel.deb, kernel.release));
    let modules = stages.run("kernel modules", || kmod::resolve(&kernel.modules, MODULES))?;
    let busybox = stages.run("busybox", || fetch::busybox(&dirs))?;
    let packages = stages.run("test packages", || packages::build(&dirs))?;

    let mut outcomes: Vec<Outcome> = Vec::new();
    let runnable: Vec<&Scenario> = selected;

    // Each run starts with an empty run directory: logs and sinks are this run's only.
    let _ = std::fs::remove_dir_all(&dirs.run);
    std::fs::create_dir_all(&dirs.run)?;
    let initramfs = dirs.run.join("initramfs.cpio");
    let size = stages.run("initramfs", || {
        initramfs::build(
            &initramfs::Contents {
                kernel: &kernel,
                modules: &modules,
                busybox: &busybox,
                binaries: &binaries,
                packages: &packages,
                scenarios: &runnable,
                keep: options.keep,
            },
            &initramfs,
        )
    })?;
    note(&format!(
        "{} ({:.1} MiB)",
        initramfs.display(),
        size as f64 / (1024.0 * 1024.0)
    ));

    let mut boot = None;
    if !runnable.is_empty() {
        let result = stages.run("guest run", || {
            let sockets = socket_dir(&dirs);
            let (mut machine, control) = machine::Machine::start(&machine::MachineConfig {
                kernel: &kernel.vmlinuz,
                initramfs: &initramfs,
                logs: &dirs.run,
                sockets: &sockets,
                memory_mib: MEMORY_MIB,
                interactive: options.keep,
            })?;
            note(&format!("serial console: {}", machine.serial_log.display()));
            println!();
            let result = runner::run(
                &mut machine,
                control,
                &runnable,
                &RunOptions {
                    relay_binary: binaries.relay.clone(),
                    scratch: &dirs.run,
                    verbose: options.verbose,
                    keep: options.keep,
                },
            );
            // Stops QEMU and vhost-device-vsock (by PID) and removes the sockets.
            drop(machine);
            Ok(result)
        })?;
        boot = result.boot;
        if result.outcomes.iter().any(Outcome::failed) {
            let log = dirs.run.join("serial.log");
            step(&format!(
                "last lines of the guest console ({})",
                log.display()
            ));
            for line in console::last_lines(&log, 60) {
                println!("    guest| {line}");
            }
        }
        outcomes.extend(result.outcomes);
    }
    outcomes.sort_by_key(|o| table.iter().position(|s| s.name == o.name));

    step("vm-test results");
    for outcome in &outcomes {
        println!("{}", outcome.line());
    }
    let stage_times: Vec<String> = stages
        .0
        .iter()
        .map(|(name, took)| format!("{name} {:.1}s", took.as_secs_f64()))
        .collect();
    note(&format!("stages: {}", stage_times.join(", ")));
    if let Some(boot) = boot {
        note(&format!("guest boot to /init: {:.1}s", boot.as_secs_f64()));
    }
    let count = |f: fn(&Status) -> bool| outcomes.iter().filter(|o| f(&o.status)).count();
    let passed = count(|s| matches!(s, Status::Pass));
    let failed = count(|s| matches!(s, Status::Fail(_)));
    let ok = failed == 0;
    println!(
        "\nvm-test: {} — {passed} passed, {failed} failed in {:.0}s",
        if ok { "PASS" } else { "FAIL" },
        started.elapsed().as_secs_f64()
    );
    if !ok {
        bail!(
            "{failed} scenario(s) failed; the guest console is {} and host logs are in {}",
            dirs.run.join("serial.log").display(),
            dirs.run.display()
        );
    }
    Ok(())
}

fn select<'a>(table: &'a [Scenario], names: &[String]) -> Result<Vec<&'a Scenario>> {
    if names.is_empty() {
        return Ok(table.iter().collect());
    }
    for name in names {
        if !table.iter().any(|s| s.name == name) {
            let all: Vec<&str> = table.iter().map(|s| s.name).collect();
            bail!("no scenario '{name}'; there are: {}", all.join(", "));
        }
    }
    // Table order, whatever order they were named in.
    Ok(table
        .iter()
        .filter(|s| names.iter().any(|n| n == s.name))
        .collect())
}

/// Unix socket paths must fit in 107 bytes; deep checkouts fall back to the temp directory.
fn socket_dir(dirs: &Dirs) -> PathBuf {
    let preferred = dirs.run.join("sockets");
    // The longest name is "vsock.uds_NNNNN".
    if preferred.as_os_str().len() + 20 < 100 {
        preferred
    } else {
        std::env::temp_dir().join(format!("guestwatch-vm-{}", std::process::id()))
    }
}
