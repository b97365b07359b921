//! `cargo xtask demo`: the main job end to end.
//!
//! Until the relay lands, the demo runs what exists: the agent's kernel-level transaction
//! detection on a real rpm database with real installs.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use guestwatch_testkit::{PackageSpec, RpmDb, build_packages, generated_specs};

use crate::{
    ebpf, setup,
    util::{cargo, note, run, step, workspace_root},
};

pub fn demo() -> Result<()> {
    setup::setup()?;
    ebpf::build_ebpf()?;
    step("building guestwatch-agent (release)");
    run(
        cargo().args(["build", "--release", "--package", "guestwatch-agent"]),
        "see the build error above",
    )?;
    let agent = workspace_root().join("target/release/guestwatch-agent");

    step("creating a real rpm database with Debian's rpmbuild + rpm --justdb (200 packages)");
    let work = tempfile_dir()?;
    let db = RpmDb::at(work.join("rpmdb")).context("creating the rpm database")?;
    let rpms = build_packages(&generated_specs("demo-base", 200), &work.join("rpms"))?;
    db.install(&rpms)?;
    note(&format!(
        "{} packages in {}",
        db.query("%{NAME}\n")?.len(),
        db.path().display()
    ));

    step("starting `guestwatch-agent watch` (eBPF transaction probes)");
    let mut child = Command::new(&agent)
        .args(["watch", "--dbpath"])
        .arg(db.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let printer = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("    agent: {line}");
        }
    });
    std::thread::sleep(Duration::from_secs(1));

    step("installing a new package with rpm -i");
    let new = build_packages(
        &[PackageSpec::new("demo-new", "1.0", "1")],
        &work.join("rpms"),
    )?;
    db.install(&new)?;
    std::thread::sleep(Duration::from_millis(500));

    let _ = child.kill();
    let _ = child.wait();
    let _ = printer.join();
    step(&format!("done; the database is in {}", db.path().display()));
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = workspace_root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
