//! The guest's kernel and busybox, fetched as Debian packages with `apt-get download` and
//! unpacked with `dpkg -x`, cached under `target/vm/` so reruns need no network.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::Dirs;
use crate::util::{note, output, run};

/// An unpacked Debian kernel.
pub struct Kernel {
    /// The package file it came from, e.g. `linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb`.
    pub deb: String,
    /// `uname -r` inside the guest, e.g. `6.1.0-56-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub modules: PathBuf,
}

/// Set to a package name (`linux-image-6.1.0-47-amd64`) to boot a particular kernel.
const KERNEL_ENV: &str = "GUESTWATCH_VM_KERNEL";

/// The guest kernel: the cached package if there is one, else the newest
/// `linux-image-6.1.0-*-amd64` apt knows.
pub fn kernel(dirs: &Dirs) -> Result<Kernel> {
    let wanted = std::env::var(KERNEL_ENV).ok().filter(|s| !s.is_empty());
    if let Some(name) = &wanted
        && !is_kernel_package(name)
    {
        bail!("{KERNEL_ENV}={name} is not a linux-image-6.1.0-N-amd64 package name");
    }
    let cached = cached_debs(&dirs.debs, |name| match &wanted {
        Some(w) => name == w,
        None => is_kernel_package(name),
    })?;
    let deb = match cached.into_iter().max_by_key(|(name, _)| kernel_abi(name)) {
        Some((_, path)) => {
            note(&format!("cached: {}", path.display()));
            path
        }
        None => {
            let name = match wanted {
                Some(w) => w,
                None => newest_kernel_package()?,
            };
            download(&name, &dirs.debs)?
        }
    };
    let root = unpack(&deb, &dirs.unpacked)?;
    let modules_root = root.join("lib/modules");
    let release = fs::read_dir(&modules_root)
        .with_context(|| format!("reading {}", modules_root.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .next()
        .with_context(|| format!("{} has no lib/modules/<release>", deb.display()))?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} has no boot/vmlinuz-{release}", deb.display());
    }
    Ok(Kernel {
        deb: file_name(&deb),
        modules: modules_root.join(&release),
        release,
        vmlinuz,
    })
}

/// The static busybox from Debian's `busybox-static`.
pub fn busybox(dirs: &Dirs) -> Result<PathBuf> {
    const PACKAGE: &str = "busybox-static";
    let deb = match cached_debs(&dirs.debs, |name| name == PACKAGE)?.pop() {
        Some((_, path)) => {
            note(&format!("cached: {}", path.display()));
            path
        }
        None => download(PACKAGE, &dirs.debs)?,
    };
    let root = unpack(&deb, &dirs.unpacked)?;
    ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .with_context(|| format!("{} contains no bin/busybox", deb.display()))
}

/// `linux-image-6.1.0-N-amd64` exactly (not `-cloud-`, `-rt-` or `-dbg`).
fn is_kernel_package(name: &str) -> bool {
    kernel_abi(name).is_some()
}

/// The ABI number N of `linux-image-6.1.0-N-amd64`.
fn kernel_abi(name: &str) -> Option<u32> {
    name.strip_prefix("linux-image-6.1.0-")?
        .strip_suffix("-amd64")?
        .parse()
        .ok()
}

/// Asks apt for the newest 6.1 kernel, updating its lists once if it knows none
/// (a fresh machine or container has empty lists).
fn newest_kernel_package() -> Result<String> {
    if let Some(name) = apt_newest_kernel() {
        return Ok(name);
    }
    note("apt knows no linux-image-6.1.0-*-amd64 yet; updating its package lists once");
    run(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get update must work (as root) to fetch the guest kernel",
    )?;
    apt_newest_kernel().context(
        "apt knows no linux-image-6.1.0-*-amd64 package: the guest needs Debian 12's kernel; \
         add a Debian bookworm source to apt, run `apt-get update`, then rerun",
    )
}

fn apt_newest_kernel() -> Option<String> {
    // The metapackage names the kernel Debian currently ships; fall back to the highest ABI
    // when the host's metapackage points elsewhere (another Debian release).
    let depends = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
        .unwrap_or_default();
    let from_meta = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|n| is_kernel_package(n))
        .map(str::to_owned);
    from_meta.or_else(|| {
        output(Command::new("apt-cache").args(["pkgnames", "linux-image-6.1.0-"]))?
            .lines()
            .filter(|n| is_kernel_package(n))
            .max_by_key(|n| kernel_abi(n))
            .map(str::to_owned)
    })
}

/// Cached `.deb` files in `dir` whose package name matches, as (package, path), oldest first.
fn cached_debs(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<Vec<(String, PathBuf)>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut found: Vec<(String, PathBuf)> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let package = file.strip_suffix(".deb")?.split('_').next()?.to_owned();
            matches(&package).then(|| (package, e.path()))
        })
        .collect();
    found.sort_by_key(|(_, p)| fs::metadata(p).and_then(|m| m.modified()).ok());
    Ok(found)
}

/// `apt-get download PACKAGE` into `dir`; returns the new file.
fn download(package: &str, dir: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new("apt-get");
    cmd.args(["download", "-qq", package]).current_dir(dir);
    if crate::util::is_root() {
        // apt's sandbox user cannot write into the workspace; root downloads it itself.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    run(
        &mut cmd,
        &format!(
            "needs Debian's package lists and network access to the archive; \
             run `apt-get update` and check `apt-cache policy {package}`"
        ),
    )?;
    cached_debs(dir, |name| name == package)?
        .pop()
        .map(|(_, path)| path)
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                dir.display()
            )
        })
}

/// Unpacks `deb` with `dpkg -x` into `<unpacked>/<deb file stem>/` once; returns that directory.
fn unpack(deb: &Path, unpacked: &Path) -> Result<PathBuf> {
    let name = file_name(deb);
    let dest = unpacked.join(name.trim_end_matches(".deb"));
    if dest.is_dir() {
        return Ok(dest);
    }
    // Unpack beside and rename, so an interrupted run never leaves a half tree that looks done.
    let partial = unpacked.join(format!("{name}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    run(
        Command::new("dpkg").arg("-x").arg(deb).arg(&partial),
        "dpkg must be installed; a damaged download is fixed by deleting it and rerunning",
    )?;
    fs::rename(&partial, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(dest)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_names() {
        assert_eq!(kernel_abi("linux-image-6.1.0-56-amd64"), Some(56));
        assert!(!is_kernel_package("linux-image-6.1.0-56-cloud-amd64"));
        assert!(!is_kernel_package("linux-image-6.1.0-56-amd64-dbg"));
        assert!(!is_kernel_package("linux-image-6.12.0-1-amd64"));
        assert!(!is_kernel_package("linux-image-amd64"));
    }
}
