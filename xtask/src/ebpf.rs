//! `cargo xtask build-ebpf`: compile `agent-ebpf` for `bpfel-unknown-none`, check it, and put it
//! where `agent/build.rs` embeds it from.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection, ObjectSymbol};

use crate::{
    setup,
    util::{note, run, step, workspace_root},
};

/// Where the agent's build script looks for the object.
pub fn object_path() -> PathBuf {
    workspace_root().join("target/bpf/guestwatch.bpf.o")
}

/// Programs the object must contain (the agent looks them up by name).
const REQUIRED_PROGRAMS: &[&str] = &["rpmts_run_enter", "rpmts_run_exit"];

pub fn build_ebpf() -> Result<PathBuf> {
    step("building the BPF programs (agent-ebpf → bpfel-unknown-none, release)");
    let linker = setup::bpf_linker_path()
        .context("bpf-linker is not installed or does not run: run `cargo xtask setup`")?;
    let linker_dir = linker.parent().map(PathBuf::from).unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(linker_dir).chain(std::env::split_paths(&path)))?;
    let root = workspace_root();
    let target_dir = root.join("target/bpf-build");
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        // BTF is what lets the kernel verify and describe the maps and programs.
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    run(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "build",
                "--release",
                "--package",
                "guestwatch-agent-ebpf",
            ])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .current_dir(&root)
            .env("PATH", path)
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", flags)
            // The outer (stable) cargo's settings must not leak into the nightly build.
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET"),
        "run `cargo xtask setup` to install nightly rust-src and bpf-linker",
    )?;
    let built = target_dir.join("bpfel-unknown-none/release/guestwatch-agent-ebpf");
    let bytes = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    check_object(&bytes)?;
    let dest = object_path();
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Rewrite only on change: the agent's build script reruns when this file changes.
    if std::fs::read(&dest).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::write(&dest, &bytes).with_context(|| format!("writing {}", dest.display()))?;
    }
    note(&format!(
        "BPF object: {} ({} bytes, BTF present)",
        dest.display(),
        bytes.len()
    ));
    Ok(dest)
}

/// The object must be a BPF ELF with BTF and the programs the agent expects.
fn check_object(bytes: &[u8]) -> Result<()> {
    let file = object::File::parse(bytes).context("the BPF object is not a valid ELF file")?;
    if file.architecture() != object::Architecture::Bpf {
        bail!("the object is for {:?}, not BPF", file.architecture());
    }
    for section in [".BTF", ".BTF.ext"] {
        let found = file.section_by_name(section).is_some_and(|s| s.size() > 0);
        if !found {
            bail!("the BPF object has no {section} section: is bpf-linker called with --btf?");
        }
    }
    // A panic path (e.g. an index the compiler could not prove in bounds) lands in a section
    // the loader does not link, and the verifier then rejects the program with an obscure
    // "last insn is not an exit or jmp".
    if let Some(symbol) = file
        .symbols()
        .filter_map(|s| s.name().ok())
        .find(|name| name.contains("panicking"))
    {
        bail!("the BPF object contains a panic path ({symbol}); use `get` instead of indexing");
    }
    for program in REQUIRED_PROGRAMS {
        if !file.symbols().any(|s| s.name() == Ok(program)) {
            bail!("the BPF object lacks program `{program}`");
        }
    }
    Ok(())
}
