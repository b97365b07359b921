//! `cargo xtask package-rpm`: a static agent in an RPM for RHEL/Fedora guests.

use std::{path::PathBuf, process::Command};

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

pub fn package_rpm() -> Result<PathBuf> {
    crate::setup::setup()?;
    static_agent()?;
    step("packaging the agent as an RPM (cargo generate-rpm)");
    if output(Command::new("cargo").args(["generate-rpm", "--version"])).is_none() {
        note("installing cargo-generate-rpm from crates.io");
        run(
            Command::new("cargo")
                .args(["install", "--locked", "cargo-generate-rpm"])
                .env_remove("RUSTUP_TOOLCHAIN"),
            "needs network access to crates.io",
        )?;
    }
    let out_dir = workspace_root().join("target/generate-rpm");
    // cargo generate-rpm treats a path that is not an existing directory as the output file.
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
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
    let rpm = std::fs::read_dir(&out_dir)
        .with_context(|| format!("reading {}", out_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rpm"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .context("cargo generate-rpm produced no .rpm")?;
    step("checking the package with rpm");
    run(
        Command::new("rpm")
            .args(["-qp", "--nosignature", "-i", "-l"])
            .arg(&rpm),
        "the package is malformed",
    )?;
    note(&format!("RPM: {}", rpm.display()));
    Ok(rpm)
}
