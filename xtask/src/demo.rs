//! `cargo xtask demo`: the main job end to end, for a person to watch.
//!
//! A real rpm database (Debian's rpmbuild + `rpm --justdb`, a few hundred packages), the relay
//! with the `dir` sink on a hybrid-vsock socket, the agent delivering to it (eBPF where
//! available), then real installs, an upgrade, a removal and a tampering write, each shown
//! arriving at the sink with its attribution and latency.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use guestwatch_testkit::{PackageSpec, RpmDb, build_packages, generated_specs};

use crate::{
    ebpf, setup,
    util::{cargo, note, run, step, workspace_root},
};

const VM: &str = "demo-vm";

/// One change the demo makes to the system.
type Step<'a> = Box<dyn Fn() -> Result<()> + 'a>;

/// A child process stopped with SIGTERM on drop.
struct Daemon {
    name: &'static str,
    child: Child,
}

impl Daemon {
    fn start(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                note(&format!("{} stopped ({status})", self.name));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

struct Sink {
    dir: PathBuf,
}

impl Sink {
    fn latest_id(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("vms").join(VM).join("latest.id")).ok()
    }

    fn latest(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(
            &std::fs::read(self.dir.join("vms").join(VM).join("latest.json")).ok()?,
        )
        .ok()
    }

    /// Waits until the latest report differs from `before`; returns how long that took.
    fn wait_new(&self, before: &Option<String>, since: Instant) -> Result<Duration> {
        let deadline = since + Duration::from_secs(30);
        while self.latest_id() == *before {
            if Instant::now() > deadline {
                bail!("no new report reached the sink within 30 s (see target/demo/*.log)");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(since.elapsed())
    }
}

fn describe(latest: &serde_json::Value) -> String {
    let d = &latest["delivery"];
    let t = &d["trigger"];
    let a = &t["attribution"];
    let who = match t["kind"].as_str() {
        Some("transaction") => format!(
            "rpm transaction by {} (pid {}, uid {}, {}), return code {}",
            a["comm"].as_str().unwrap_or("?"),
            a["pid"],
            a["uid"],
            a["exe"].as_str().unwrap_or("?"),
            a["return_code"]
        ),
        Some("tamper") => format!(
            "TAMPER: {} (pid {}, uid {}) did {} on {} outside any rpm transaction",
            a["comm"].as_str().unwrap_or("?"),
            a["pid"],
            a["uid"],
            a["operation"].as_str().unwrap_or("?"),
            a["paths"]
        ),
        Some(kind) => match t["detail"].as_str() {
            Some(detail) => format!("{kind}: {detail}"),
            None => format!("{kind} scan"),
        },
        None => "?".into(),
    };
    let c = &t["changes"];
    format!(
        "report {} — {} packages (+{} -{} ~{}) — {who}",
        d["report_id"].as_str().unwrap_or("?"),
        d["package_count"],
        c["added"],
        c["removed"],
        c["changed"]
    )
}

pub fn demo() -> Result<()> {
    setup::setup()?;
    ebpf::build_ebpf()?;
    step("building guestwatch-agent and guestwatch-relay (release)");
    run(
        cargo().args([
            "build",
            "--release",
            "--package",
            "guestwatch-agent",
            "--package",
            "guestwatch-relay",
        ]),
        "see the build error above",
    )?;
    let bin = workspace_root().join("target/release");
    let work = workspace_root().join("target/demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    step("creating a real rpm database: rpmbuild + rpm --justdb, 300 packages");
    let db = RpmDb::at(work.join("rpmdb")).context("creating the rpm database")?;
    db.install(&build_packages(
        &generated_specs("demo-base", 300),
        &work.join("rpms"),
    )?)?;
    note(&format!(
        "{} packages in {}",
        db.query("%{NAME}\n")?.len(),
        db.path().display()
    ));

    step("starting guestwatch-relay: dir sink, hybrid-vsock socket for VM demo-vm");
    let sink = Sink {
        dir: work.join("sink"),
    };
    let uds = work.join("demo-vm.vsock");
    let mut relay = Daemon::start(
        "guestwatch-relay",
        Command::new(bin.join("guestwatch-relay"))
            .args(["run", "--hybrid"])
            .arg(format!("{VM}={}", uds.display()))
            .arg("--sink")
            .arg(format!("dir:{}", sink.dir.display()))
            .args(["--metrics", "127.0.0.1:9918"]),
        &work.join("relay.log"),
    )?;
    let socket = work.join("demo-vm.vsock_919");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the relay did not start; see {}",
                work.join("relay.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    note(&format!(
        "listening on {} (what a Firecracker/Cloud Hypervisor VMM exposes)",
        socket.display()
    ));

    step("starting guestwatch-agent run (the guest daemon) on that database");
    let started = Instant::now();
    let mut agent = Daemon::start(
        "guestwatch-agent",
        Command::new(bin.join("guestwatch-agent"))
            .args(["run", "--dbpath"])
            .arg(db.path())
            .arg("--relay")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state")
            .arg(work.join("agent-state")),
        &work.join("agent.log"),
    )?;
    sink.wait_new(&None, started)?;
    let agent_log = std::fs::read_to_string(work.join("agent.log")).unwrap_or_default();
    if let Some(line) = agent_log.lines().find(|l| l.contains("detector:")) {
        note(
            line.split("detector:")
                .nth(1)
                .map(|s| format!("detector:{s}"))
                .as_deref()
                .unwrap_or(line),
        );
    }
    let latest = sink.latest().context("reading the first report")?;
    note(&format!(
        "first report delivered {:.0?} after start: {}",
        started.elapsed(),
        describe(&latest)
    ));

    let rpms = work.join("rpms");
    let steps: Vec<(&str, Step)> = vec![
        (
            "install demo-editor-1.0 (rpm -i)",
            Box::new(|| {
                db.install(&build_packages(
                    &[PackageSpec::new("demo-editor", "1.0", "1")],
                    &rpms,
                )?)
                .map_err(Into::into)
            }),
        ),
        (
            "upgrade demo-editor to 2.0 (rpm -U)",
            Box::new(|| {
                db.upgrade(&build_packages(
                    &[PackageSpec::new("demo-editor", "2.0", "1")],
                    &rpms,
                )?)
                .map_err(Into::into)
            }),
        ),
        (
            "install demo-libs-1:3.4 with an epoch (rpm -i)",
            Box::new(|| {
                db.install(&build_packages(
                    &[PackageSpec::new("demo-libs", "3.4", "2").epoch(1)],
                    &rpms,
                )?)
                .map_err(Into::into)
            }),
        ),
        (
            "remove demo-editor (rpm -e)",
            Box::new(|| db.erase(&["demo-editor"]).map_err(Into::into)),
        ),
        (
            "tamper: a shell appends to the database directory, bypassing rpm",
            Box::new(|| {
                let target = db.path().join("Packages");
                let status = Command::new("sh")
                    .arg("-c")
                    .arg(format!("echo forged >> '{}'", target.display()))
                    .status()?;
                if !status.success() {
                    bail!("sh failed");
                }
                Ok(())
            }),
        ),
    ];
    step("changing the system; each change is detected in the kernel and delivered");
    for (what, action) in &steps {
        let before = sink.latest_id();
        action()?;
        let exited = Instant::now();
        match sink.wait_new(&before, exited) {
            Ok(latency) => {
                let latest = sink.latest().context("reading the report")?;
                println!(
                    "    ✔ {what}\n      delivered {:.1} ms after the command exited: {}",
                    latency.as_secs_f64() * 1e3,
                    describe(&latest)
                );
            }
            // The tamper write changes no package, so there is no new report to deliver; the
            // signal itself is in the agent's log.
            Err(_) if what.starts_with("tamper") => {
                let log = std::fs::read_to_string(work.join("agent.log")).unwrap_or_default();
                let seen = log.lines().rev().find(|l| l.contains("tamper"));
                println!(
                    "    ✔ {what}\n      no package changed, so no new report; the agent saw: {}",
                    seen.unwrap_or("(nothing)")
                );
            }
            Err(e) => return Err(e),
        }
    }
    let _ = std::fs::remove_file(db.path().join("Packages"));

    agent.stop();
    relay.stop();
    step("where the reports are");
    let rel = |p: &Path| {
        p.strip_prefix(workspace_root())
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let latest = rel(&sink.dir.join("vms").join(VM).join("latest.json"));
    let log = rel(&sink.dir.join("deliveries.jsonl"));
    println!(
        "    {}    the VM's newest report (claircore IndexReport under .report, delivery metadata under .delivery)",
        latest.display()
    );
    println!("    {}    one line per delivery", log.display());
    println!(
        "    agent and relay logs: {} and {}",
        rel(&work.join("agent.log")).display(),
        rel(&work.join("relay.log")).display()
    );
    println!("\n    try:");
    println!("      jq '.report.packages | length' {}", latest.display());
    println!(
        "      jq -r '.report.packages[] | \"\\(.name) \\(.version)\"' {} | grep demo-",
        latest.display()
    );
    println!(
        "      jq -c '{{report_id, trigger: .trigger.kind, comm: .trigger.attribution.comm, packages: .package_count}}' {}",
        log.display()
    );
    Ok(())
}
