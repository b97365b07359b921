//! `cargo xtask build`: what operators and packagers build — the BPF object, then both daemons
//! in release mode with the object embedded in the agent — and where each one is.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{
    ebpf,
    util::{cargo, note, run, step, workspace_root},
};

pub fn build() -> Result<()> {
    // Written where agent/build.rs embeds it from (the default path, so `cargo bench` and
    // this build share their compiled crates).
    let object = ebpf::build_ebpf()?;
    step("building guestwatch-agent and guestwatch-relay (release, BPF object embedded)");
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
    let release = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release");
    let agent = release.join("guestwatch-agent");
    let relay = release.join("guestwatch-relay");
    let object_bytes =
        std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    if !embeds(&agent, &object_bytes)? {
        bail!(
            "{} does not embed {}: was it built without the object?",
            agent.display(),
            object.display()
        );
    }
    step("built");
    note(&format!(
        "BPF object    {} ({} bytes)",
        object.display(),
        object_bytes.len()
    ));
    note(&format!(
        "agent         {} ({}, BPF object embedded)",
        agent.display(),
        size(&agent)?
    ));
    note(&format!(
        "relay         {} ({})",
        relay.display(),
        size(&relay)?
    ));
    note("a static agent for any glibc, packaged as an RPM: `cargo xtask package-rpm`");
    Ok(())
}

fn size(path: &Path) -> Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{} was not built", path.display()))?
        .len();
    Ok(format!("{:.1} MiB", len as f64 / (1024.0 * 1024.0)))
}

/// Whether the binary at `path` holds `object` (the agent embeds it byte for byte).
fn embeds(path: &Path, object: &[u8]) -> Result<bool> {
    let binary = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // A 4 KiB stretch from the object's middle is specific enough and quick to look for.
    let start = object.len() / 2;
    let needle = &object[start..object.len().min(start + 4096)];
    Ok(!needle.is_empty() && binary.windows(needle.len()).any(|w| w == needle))
}
