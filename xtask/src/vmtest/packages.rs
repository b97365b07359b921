//! The small rpm packages the guest installs, built once on the host with testkit's real
//! `rpmbuild` and cached.

use std::path::PathBuf;

use anyhow::{Context, Result};
use guestwatch_testkit::{PackageSpec, build_packages};

use super::Dirs;
use crate::util::note;

/// Names the guest scripts use (`/gw/pkgs/NAME.rpm`).
const NAMES: &[&str] = &[
    "gw-vmtest-base",
    "gw-vmtest-ebpf",
    "gw-vmtest-new-1",
    "gw-vmtest-new-2",
    "gw-vmtest-new-3",
    "gw-vmtest-while-down",
    "gw-vmtest-loopback",
    "gw-vmtest-pulled",
    "gw-vmtest-nobpf",
    "gw-vmtest-renamed",
];

pub struct TestPackage {
    pub name: &'static str,
    pub path: PathBuf,
}

pub fn build(dirs: &Dirs) -> Result<Vec<TestPackage>> {
    let path = |name: &str| dirs.rpms.join(format!("{name}-1.0-1.noarch.rpm"));
    if NAMES.iter().all(|n| path(n).is_file()) {
        note(&format!("cached in {}", dirs.rpms.display()));
    } else {
        // One rpmbuild per package: they are few and built once, and a main package's file
        // name never depends on how rpmbuild names subpackages.
        for name in NAMES {
            // rpmbuild writes no package that owns no file.
            let spec =
                PackageSpec::new(*name, "1.0", "1").file(format!("/usr/share/gw-vmtest/{name}"));
            build_packages(&[spec], &dirs.rpms).with_context(|| {
                format!("building {name} with rpmbuild (run `cargo xtask setup` if it is missing)")
            })?;
        }
        note(&format!(
            "built {} packages in {}",
            NAMES.len(),
            dirs.rpms.display()
        ));
    }
    NAMES
        .iter()
        .map(|name| {
            let path = path(name);
            path.is_file()
                .then(|| TestPackage {
                    name,
                    path: path.clone(),
                })
                .with_context(|| format!("{} is missing after rpmbuild", path.display()))
        })
        .collect()
}
