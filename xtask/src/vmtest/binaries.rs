//! The guestwatch binaries for the guest.
//!
//! The agent is static (`+crt-static`, release, BPF object embedded), built in its own target
//! directory so this build never invalidates the normal one. The relay is the workspace's
//! ordinary dev build, shared with `cargo build`/`cargo test` (a static release relay would
//! compile its whole dependency tree a second time, minutes on two cores); it serves as the
//! host relay as it is, and goes into the guest with its `ldd` closure like rpm does.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::Dirs;
use crate::{
    ebpf,
    util::{cargo, note, output, run, workspace_root},
};

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// What the scenarios can use.
pub struct Binaries {
    pub agent: PathBuf,
    /// A dynamically linked dev build; `None` until the relay crate has its binary.
    pub relay: Option<PathBuf>,
    /// The agent has its daemon, `guestwatch-agent run --relay …`.
    pub agent_daemon: bool,
}

pub fn build(dirs: &Dirs) -> Result<Binaries> {
    ebpf::build_ebpf()?;
    let root = workspace_root();
    // The relay crate gets its binary in a later change; build it as soon as it exists.
    let relay_has_binary = root.join("relay/src/main.rs").is_file();
    let mut build = cargo();
    build
        .args(["build", "--release", "--target", TARGET])
        .args(["--package", "guestwatch-agent"])
        .env("CARGO_TARGET_DIR", &dirs.cargo)
        // With --target, RUSTFLAGS reach only the target crates, not build scripts.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    run(
        &mut build,
        &format!("static builds need the {TARGET} target: `rustup target add {TARGET}`"),
    )?;
    let out = dirs.cargo.join(TARGET).join("release");
    let agent = out.join("guestwatch-agent");
    check_static(&agent)?;
    let relay = if relay_has_binary {
        run(
            cargo().args(["build", "--package", "guestwatch-relay"]),
            "see the build error above",
        )?;
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        Some(target_dir.join("debug/guestwatch-relay"))
    } else {
        note(
            "relay/src/main.rs does not exist yet: scenarios that need guestwatch-relay are skipped",
        );
        None
    };
    let agent_daemon = output(Command::new(&agent).args(["run", "--help"])).is_some();
    if !agent_daemon {
        note(
            "`guestwatch-agent run` does not exist yet: scenarios that need the agent daemon are skipped",
        );
    }
    Ok(Binaries {
        agent,
        relay,
        agent_daemon,
    })
}

/// A static binary has no program interpreter (no PT_INTERP program header).
fn check_static(path: &Path) -> Result<()> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let elf = ElfFile64::<object::Endianness>::parse(bytes.as_slice())
        .with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
    let endian = elf.endian();
    let dynamic = elf
        .elf_program_headers()
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP);
    if dynamic {
        bail!(
            "{} is dynamically linked although +crt-static was requested; \
             is RUSTFLAGS overridden by a .cargo/config.toml?",
            path.display()
        );
    }
    Ok(())
}
