//! The guestwatch binaries for the guest.
//!
//! The agent is the static build shared with `cargo xtask package-rpm` (see
//! `package::static_agent`). The relay is the workspace's
//! ordinary dev build, shared with `cargo build`/`cargo test` (a static release relay would
//! compile its whole dependency tree a second time, minutes on two cores); it serves as the
//! host relay as it is, and goes into the guest with its `ldd` closure like rpm does.

use std::path::PathBuf;

use anyhow::Result;

use crate::{
    package,
    util::{cargo, run, workspace_root},
};

/// What the scenarios use.
pub struct Binaries {
    /// Static, release, BPF object embedded.
    pub agent: PathBuf,
    /// The workspace's dynamically linked dev build.
    pub relay: PathBuf,
}

pub fn build() -> Result<Binaries> {
    let agent = package::static_agent()?;
    run(
        cargo().args(["build", "--package", "guestwatch-relay"]),
        "see the build error above",
    )?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(Binaries {
        agent,
        relay: target_dir.join("debug/guestwatch-relay"),
    })
}
