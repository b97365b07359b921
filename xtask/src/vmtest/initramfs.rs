//! The guest's whole root file system, as one initramfs: busybox, the host's rpm and socat
//! with their libraries, the static guestwatch binaries, the vsock/virtio modules, the test
//! packages, `/init` and the scenario scripts.
//!
//! Guest layout (besides the host paths the copied programs keep):
//! `/gw/config.sh` (variables), `/gw/lib.sh` (helpers), `/gw/scenarios/NAME.{sh,timeout}`,
//! `/gw/modules/NAME.ko`, `/gw/pkgs/NAME.rpm`, `/usr/local/bin/guestwatch-{agent,relay}`.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context, Result};

use super::{
    binaries::Binaries,
    cpio::{Archive, Source},
    fetch::Kernel,
    hostfiles,
    kmod::Module,
    machine::{GUEST_CID, PULL_PORT, RELAY_PORT},
    packages::TestPackage,
    scenarios::{LOOPBACK_PORT, LOOPBACK_RELAY_PORT, PROBE_PORT, Scenario},
};

pub struct Contents<'a> {
    pub kernel: &'a Kernel,
    pub modules: &'a [Module],
    pub busybox: &'a Path,
    pub binaries: &'a Binaries,
    pub packages: &'a [TestPackage],
    pub scenarios: &'a [&'a Scenario],
    /// Leave a shell on the console after the scenarios instead of powering off.
    pub keep: bool,
}

/// Writes the initramfs to `out`; returns its size in bytes.
pub fn build(contents: &Contents, out: &Path) -> Result<u64> {
    let mut fs = Archive::default();
    for dir in [
        "/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/var/tmp", "/var/lib", "/etc",
    ] {
        fs.dir(dir)?;
    }
    // The kernel opens /dev/console for init before anything mounts devtmpfs.
    fs.char_dev("/dev/console", 5, 1)?;

    // rpm from the host (see hostfiles.rs for why), with its configuration. rpm execs
    // rpmdb for --initdb/--rebuilddb and rpmkeys for signature options.
    for program in ["rpm", "rpmdb", "rpmkeys"] {
        hostfiles::add_program(&mut fs, program, "rpm")?;
    }
    hostfiles::add_tree(&mut fs, Path::new("/usr/lib/rpm"))?;
    hostfiles::add_program(&mut fs, "socat", "socat")?;
    // util-linux setpriv (busybox's cannot change the bounding set): the agent without its
    // BPF capabilities, in `bpf-refused`.
    hostfiles::add_program(&mut fs, "setpriv", "util-linux")?;

    // Debian's layout is merged-usr: keep /bin and /sbin working for scripts if the copied
    // files did not already bring those links in.
    for (link, target) in [("/bin", "usr/bin"), ("/sbin", "usr/sbin")] {
        if !fs.contains(link) {
            fs.symlink(link, target)?;
        }
    }
    fs.file(
        "/usr/bin/busybox",
        Source::Host(contents.busybox.to_path_buf()),
        0o755,
    )?;
    for applet in busybox_applets(contents.busybox)? {
        // Real programs (rpm!) win over busybox's applets of the same name.
        let path = format!("/usr/bin/{applet}");
        if !fs.contains(&path) && !fs.contains(&format!("/usr/sbin/{applet}")) {
            fs.symlink(&path, "busybox")?;
        }
    }

    fs.file(
        "/usr/local/bin/guestwatch-agent",
        Source::Host(contents.binaries.agent.clone()),
        0o755,
    )?;
    {
        let relay = &contents.binaries.relay;
        hostfiles::add_as_with_libraries(&mut fs, relay, "/usr/local/bin/guestwatch-relay")?;
    }

    for module in contents.modules {
        fs.file(
            &format!("/gw/modules/{}.ko", module.name),
            Source::Bytes(module.bytes.clone()),
            0o644,
        )?;
    }
    for package in contents.packages {
        fs.file(
            &format!("/gw/pkgs/{}.rpm", package.name),
            Source::Host(package.path.clone()),
            0o644,
        )?;
    }

    fs.file(
        "/etc/passwd",
        text("root:x:0:0:root:/root:/bin/sh\n"),
        0o644,
    )?;
    fs.file("/etc/group", text("root:x:0:\n"), 0o644)?;
    fs.file(
        "/etc/os-release",
        text("NAME=\"guestwatch vm-test guest\"\nID=guestwatch-vmtest\nVERSION_ID=1\n"),
        0o644,
    )?;

    fs.file("/init", text(include_str!("guest/init.sh")), 0o755)?;
    fs.file("/gw/lib.sh", text(include_str!("guest/lib.sh")), 0o644)?;
    fs.file(
        "/gw/config.sh",
        Source::Bytes(config(contents).into_bytes()),
        0o644,
    )?;
    for scenario in contents.scenarios {
        let script = format!(
            "# vm-test scenario {name}: {proves}\n. /gw/config.sh\n. /gw/lib.sh\n{body}",
            name = scenario.name,
            proves = scenario.proves,
            body = scenario.guest
        );
        fs.file(
            &format!("/gw/scenarios/{}.sh", scenario.name),
            Source::Bytes(script.into_bytes()),
            0o644,
        )?;
        fs.file(
            &format!("/gw/scenarios/{}.timeout", scenario.name),
            text(&scenario.timeout.as_secs().to_string()),
            0o644,
        )?;
    }
    fs.write(out)
}

fn text(s: &str) -> Source {
    Source::Bytes(s.as_bytes().to_vec())
}

/// `/gw/config.sh`: everything the guest scripts need to know about this run.
fn config(contents: &Contents) -> String {
    let names = |items: &mut dyn Iterator<Item = &str>| items.collect::<Vec<_>>().join(" ");
    let mut s = String::from("# Written by `cargo xtask vm-test` for this run.\n");
    let _ = writeln!(s, "GW_KERNEL_RELEASE={}", contents.kernel.release);
    let _ = writeln!(
        s,
        "GW_MODULES=\"{}\"",
        names(&mut contents.modules.iter().map(|m| m.name.as_str()))
    );
    let _ = writeln!(
        s,
        "GW_SCENARIOS=\"{}\"",
        names(&mut contents.scenarios.iter().map(|sc| sc.name))
    );
    let _ = writeln!(s, "GW_KEEP={}", u8::from(contents.keep));
    let _ = writeln!(s, "GW_GUEST_CID={GUEST_CID}");
    let _ = writeln!(s, "GW_RELAY_PORT={RELAY_PORT}");
    let _ = writeln!(s, "GW_PULL_PORT={PULL_PORT}");
    let _ = writeln!(s, "GW_PROBE_PORT={PROBE_PORT}");
    let _ = writeln!(s, "GW_LOOPBACK_PORT={LOOPBACK_PORT}");
    let _ = writeln!(s, "GW_LOOPBACK_RELAY_PORT={LOOPBACK_RELAY_PORT}");
    let _ = writeln!(s, "export GUESTWATCH_LOG=debug");
    s
}

/// The applet names the (static, so host-runnable) busybox provides.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(str::to_owned)
        .collect())
}
