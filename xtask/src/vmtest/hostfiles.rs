//! Host programs copied into the guest with their shared-library closure (`ldd`).
//!
//! The guest's `rpm` is the host's Debian `rpm`: it is installed anyway (testkit's `rpmbuild`
//! builds the test packages), it is the very rpm that made them, and `ldd` gives its exact
//! closure, where downloading `.deb`s would need apt's dependency resolution for a dozen
//! library packages. Files keep their host paths, and symlinks on the way (`/lib` →
//! `usr/lib`, `librpm.so.9` → `librpm.so.9.3.0`) are recreated, so the dynamic loader and
//! the agent's librpm discovery see the same layout as on a Debian system.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::cpio::{Archive, Source};

/// Adds `program` (found on PATH) and every library `ldd` says it loads.
pub fn add_program(archive: &mut Archive, program: &str, package: &str) -> Result<PathBuf> {
    let path = which(program).with_context(|| {
        format!("`{program}` is not installed on the host: run `cargo xtask setup` (Debian package {package})")
    })?;
    add_with_libraries(archive, &path)?;
    Ok(path)
}

/// Adds an ELF file and its `ldd` closure.
pub fn add_with_libraries(archive: &mut Archive, path: &Path) -> Result<()> {
    add_path(archive, path)?;
    for library in ldd(path)? {
        add_path(archive, &library)?;
    }
    Ok(())
}

/// Adds the host ELF file `host` at `guest`, and its `ldd` closure at the host paths.
pub fn add_as_with_libraries(archive: &mut Archive, host: &Path, guest: &str) -> Result<()> {
    let mode = fs::metadata(host)
        .with_context(|| format!("reading {}", host.display()))?
        .permissions()
        .mode();
    archive.file(guest, Source::Host(host.to_path_buf()), mode)?;
    for library in ldd(host)? {
        add_path(archive, &library)?;
    }
    Ok(())
}

/// Adds every file under a host directory (e.g. `/usr/lib/rpm`: rpmrc, macros, platforms).
pub fn add_tree(archive: &mut Archive, dir: &Path) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if fs::symlink_metadata(&path)?.is_dir() {
                stack.push(path);
            } else {
                add_path(archive, &path)?;
            }
        }
    }
    Ok(())
}

/// Adds the host file at `path` under the same path, recreating every symlink met on the way.
pub fn add_path(archive: &mut Archive, path: &Path) -> Result<()> {
    add_resolving(archive, path, 0)
}

fn add_resolving(archive: &mut Archive, path: &Path, depth: u32) -> Result<()> {
    if depth > 40 {
        bail!("too many symlinks resolving {}", path.display());
    }
    if !path.is_absolute() {
        bail!("host path {} is not absolute", path.display());
    }
    let mut at = PathBuf::from("/");
    let components: Vec<Component> = path.components().skip(1).collect();
    for (i, component) in components.iter().enumerate() {
        let Component::Normal(name) = component else {
            bail!("host path {} is not normalized", path.display());
        };
        at.push(name);
        let meta =
            fs::symlink_metadata(&at).with_context(|| format!("reading {}", at.display()))?;
        let guest = guest_path(&at)?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&at)?;
            archive.symlink(&guest, &target.to_string_lossy())?;
            let resolved = if target.is_absolute() {
                target
            } else {
                at.parent().unwrap_or(Path::new("/")).join(target)
            };
            let rest: PathBuf = components[i + 1..].iter().collect();
            return add_resolving(archive, &normalize(&resolved.join(rest)), depth + 1);
        }
        if meta.is_dir() {
            archive.dir(&guest)?;
        } else if i + 1 == components.len() && meta.is_file() {
            let mode = meta.permissions().mode();
            archive.file(&guest, Source::Host(at.clone()), mode)?;
        } else {
            bail!(
                "{} is neither a file, a directory nor a symlink",
                at.display()
            );
        }
    }
    Ok(())
}

/// Removes `.` and resolves `..` lexically (symlink targets like `../lib/x`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

fn guest_path(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("host path {} is not UTF-8", path.display()))
}

/// The libraries (and the dynamic loader) `ldd` lists for an ELF file.
fn ldd(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("`ldd` is missing: install Debian's libc-bin")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && !text.contains("statically linked") {
        bail!(
            "`ldd {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let candidate = match line.split_once("=>") {
            Some((_, right)) => right.trim(),
            None => line.trim(),
        };
        let file = candidate.split_whitespace().next().unwrap_or_default();
        if line.contains("not found") {
            bail!("`ldd {}`: {}", path.display(), line.trim());
        }
        if file.starts_with('/') {
            libraries.push(PathBuf::from(file));
        }
    }
    Ok(libraries)
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
