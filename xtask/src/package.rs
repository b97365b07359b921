//! `cargo xtask package-rpm`: a static agent in an RPM for RHEL/Fedora guests.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    ebpf,
    util::{cargo, note, output, run, step, workspace_root},
};

/// The host triple static builds target (explicit, so RUSTFLAGS do not reach build scripts).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Where static builds go: their own target directory, so they never invalidate the normal one.
pub fn static_target_dir() -> PathBuf {
    workspace_root().join("target/static")
}

/// Builds a statically linked release agent with the BPF object embedded (for guests of any
/// glibc, the RPM and the nested-guest test); returns its path.
pub fn static_agent() -> Result<PathBuf> {
    ebpf::build_ebpf()?;
    step("building a static guestwatch-agent (release, +crt-static)");
    run(
        cargo()
            .args([
                "build",
                "--release",
                "--package",
                "guestwatch-agent",
                "--target",
                STATIC_TARGET,
            ])
            .env("CARGO_TARGET_DIR", static_target_dir())
            // With --target, RUSTFLAGS reach only the target's crates, not build scripts.
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET"),
        &format!(
            "static builds need the {STATIC_TARGET} target: `rustup target add {STATIC_TARGET}`"
        ),
    )?;
    let binary = static_target_dir()
        .join(STATIC_TARGET)
        .join("release/guestwatch-agent");
    let bytes = std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    let elf = object::File::parse(bytes.as_slice()).context("the agent binary is not ELF")?;
    // A dynamically linked executable names its loader in .interp.
    if object::Object::section_by_name(&elf, ".interp").is_some() {
        bail!(
            "{} is dynamically linked; the static build did not take",
            binary.display()
        );
    }
    note(&format!("{}", binary.display()));
    Ok(binary)
}

/// `cargo xtask package-rpm`: setup (cargo-generate-rpm included), then [`build_rpm`].
pub fn package_rpm() -> Result<PathBuf> {
    crate::setup::setup()?;
    build_rpm()
}

/// Builds the agent's RPM from the static agent (built here unless current) and checks its
/// contents ([`check_rpm`]); returns its path. `cargo xtask test` runs this before vm-test,
/// which uses the same static agent, so the step costs one `cargo generate-rpm` and a few
/// `rpm -q` calls.
pub fn build_rpm() -> Result<PathBuf> {
    crate::setup::cargo_generate_rpm()?;
    static_agent()?;
    step("packaging the agent as an RPM (cargo generate-rpm)");
    let out_dir = workspace_root().join("target/generate-rpm");
    // cargo generate-rpm treats a path that is not an existing directory as the output file.
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // An older package left here must not pass for this one.
    for old in rpms_in(&out_dir)? {
        std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    run(
        cargo()
            .args([
                "generate-rpm",
                "--package",
                "agent",
                "--target",
                STATIC_TARGET,
                "--target-dir",
            ])
            .arg(static_target_dir())
            .arg("--output")
            .arg(&out_dir),
        "see the cargo generate-rpm output above",
    )?;
    let rpm = match rpms_in(&out_dir)?.as_slice() {
        [rpm] => rpm.clone(),
        [] => bail!(
            "cargo generate-rpm produced no .rpm in {}",
            out_dir.display()
        ),
        more => bail!("cargo generate-rpm produced several packages: {more:?}"),
    };
    check_rpm(&rpm)?;
    note(&format!("RPM: {}", rpm.display()));
    Ok(rpm)
}

fn rpms_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rpm"))
        .collect())
}

/// One file the package must hold: from an asset of the agent's
/// `[package.metadata.generate-rpm]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    path: String,
    /// Permission bits, e.g. `0o755`.
    mode: Option<u32>,
    /// Marked `%config` (any `config` value).
    config: bool,
}

/// The files the agent's package metadata puts in the RPM.
fn expected_files() -> Result<Vec<Expected>> {
    let meta = output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))
        .context("`cargo metadata` failed")?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("`cargo metadata` output")?;
    let agent = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "guestwatch-agent"))
        .context("no guestwatch-agent package in `cargo metadata`")?;
    let assets = agent["metadata"]["generate-rpm"]["assets"]
        .as_array()
        .context("guestwatch-agent has no [package.metadata.generate-rpm] assets")?;
    assets
        .iter()
        .map(|a| {
            Ok(Expected {
                path: a["dest"]
                    .as_str()
                    .context("an asset without a dest")?
                    .to_owned(),
                mode: a["mode"]
                    .as_str()
                    .map(|m| u32::from_str_radix(m, 8))
                    .transpose()
                    .context("an asset mode that is not octal")?,
                config: !a["config"].is_null() && a["config"] != false,
            })
        })
        .collect()
}

/// What is wrong with a package whose `rpm -qlp` is `listed`, `rpm -qcp` is `configs` and
/// `rpm -qp --qf '[%{FILEMODES:octal} %{FILENAMES}\n]'` is `modes`, against `expected`: each
/// expected file present, with its mode, configs marked `%config`; and, whatever the metadata
/// says, at least an executable in /usr/bin, a systemd unit and a config file under /etc.
fn rpm_problems(expected: &[Expected], listed: &str, configs: &str, modes: &str) -> Vec<String> {
    let listed: Vec<&str> = listed.lines().map(str::trim).collect();
    let configs: Vec<&str> = configs.lines().map(str::trim).collect();
    let mode_of = |path: &str| {
        modes.lines().find_map(|l| {
            let (mode, name) = l.trim().split_once(' ')?;
            (name == path).then(|| u32::from_str_radix(mode, 8).ok())?
        })
    };
    let mut problems = Vec::new();
    for e in expected {
        if !listed.contains(&e.path.as_str()) {
            problems.push(format!("{} is missing", e.path));
            continue;
        }
        if let Some(want) = e.mode {
            match mode_of(&e.path) {
                Some(got) if got & 0o7777 == want => {}
                got => problems.push(format!(
                    "{} has mode {:o}, not {want:o}",
                    e.path,
                    got.unwrap_or(0) & 0o7777
                )),
            }
        }
        if e.config && !configs.contains(&e.path.as_str()) {
            problems.push(format!("{} is not marked %config", e.path));
        }
    }
    let has = |what: &str, ok: &dyn Fn(&str) -> bool| {
        (!listed.iter().any(|p| ok(p))).then(|| format!("no {what} in the package"))
    };
    problems.extend(has("executable in /usr/bin", &|p| {
        p.starts_with("/usr/bin/") && mode_of(p).is_some_and(|m| m & 0o111 != 0)
    }));
    problems.extend(has("systemd unit", &|p| {
        p.starts_with("/usr/lib/systemd/system/") && p.ends_with(".service")
    }));
    problems.extend(has("config file under /etc", &|p| {
        p.starts_with("/etc/") && configs.contains(&p)
    }));
    problems
}

/// Checks the package with rpm itself: every asset of the metadata in `rpm -qlp`, with its
/// mode, configuration files marked `%config` (`rpm -qcp`).
pub fn check_rpm(rpm: &Path) -> Result<()> {
    step("checking the package's contents (rpm -qlp)");
    let query = |args: &[&str]| {
        let mut cmd = Command::new("rpm");
        cmd.args(["-qp", "--nosignature"]).args(args).arg(rpm);
        output(&mut cmd).with_context(|| {
            format!(
                "`{}` failed: is the package malformed?",
                crate::util::display(&cmd)
            )
        })
    };
    let listed = query(&["-l"])?;
    let configs = query(&["-c"])?;
    let modes = query(&["--qf", "[%{FILEMODES:octal} %{FILENAMES}\n]"])?;
    for line in listed.lines() {
        note(line);
    }
    let problems = rpm_problems(&expected_files()?, &listed, &configs, &modes);
    if !problems.is_empty() {
        bail!(
            "{} is incomplete: {} (see [package.metadata.generate-rpm] in agent/Cargo.toml)",
            rpm.display(),
            problems.join("; ")
        );
    }
    note("binaries, systemd unit and configuration present, modes and %config as declared");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Vec<Expected> {
        vec![
            Expected {
                path: "/usr/bin/guestwatch-agent".into(),
                mode: Some(0o755),
                config: false,
            },
            Expected {
                path: "/usr/lib/systemd/system/guestwatch-agent.service".into(),
                mode: Some(0o644),
                config: false,
            },
            Expected {
                path: "/etc/guestwatch/agent.toml".into(),
                mode: Some(0o644),
                config: true,
            },
        ]
    }

    const LISTED: &str = "/etc/guestwatch/agent.toml\n/usr/bin/guestwatch-agent\n\
                          /usr/lib/systemd/system/guestwatch-agent.service\n";
    const MODES: &str = "0100644 /etc/guestwatch/agent.toml\n0100755 /usr/bin/guestwatch-agent\n\
                         0100644 /usr/lib/systemd/system/guestwatch-agent.service\n";
    const CONFIGS: &str = "/etc/guestwatch/agent.toml\n";

    #[test]
    fn a_complete_package_passes() {
        assert_eq!(
            rpm_problems(&expected(), LISTED, CONFIGS, MODES),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_missing_file_a_wrong_mode_or_an_unmarked_config_fails() {
        let without_unit = LISTED.replace("/usr/lib/systemd/system/guestwatch-agent.service\n", "");
        let p = rpm_problems(&expected(), &without_unit, CONFIGS, MODES);
        assert!(
            p.iter()
                .any(|p| p.contains("guestwatch-agent.service is missing")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.contains("no systemd unit")), "{p:?}");
        let not_executable = MODES.replace("0100755", "0100644");
        let p = rpm_problems(&expected(), LISTED, CONFIGS, &not_executable);
        assert!(p.iter().any(|p| p.contains("mode 644, not 755")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("no executable")), "{p:?}");
        let p = rpm_problems(&expected(), LISTED, "", MODES);
        assert!(p.iter().any(|p| p.contains("not marked %config")), "{p:?}");
        // Metadata that lost an asset still fails on what every package must hold.
        let p = rpm_problems(&[], "/usr/bin/guestwatch-agent\n", "", MODES);
        assert_eq!(p.len(), 2, "{p:?}");
    }
}
