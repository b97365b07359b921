//! Which kernel module files the guest loads, and in which order.
//!
//! Debian's kernel package ships no `modules.dep` (depmod writes it when the package is
//! installed), and the host may have no `depmod`. Each module's `.modinfo` section carries the
//! same dependency list modpost computed (`depends=a,b`), so the order is computed from that,
//! with no tool needed. Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are decompressed
//! on the host, so the guest needs only busybox `insmod`.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection};

/// A module ready for the initramfs.
pub struct Module {
    /// The name `insmod`/`/sys/module` use, e.g. `vmw_vsock_virtio_transport`.
    pub name: String,
    /// The uncompressed `.ko`.
    pub bytes: Vec<u8>,
}

/// The modules `wanted` and everything they depend on, dependencies first.
pub fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let index = index(&modules_dir.join("kernel"))?;
    let mut ordered = Vec::new();
    let mut done = HashSet::new();
    for name in wanted {
        visit(
            &index,
            &normalize(name),
            &mut done,
            &mut Vec::new(),
            &mut ordered,
        )?;
    }
    Ok(ordered)
}

/// Depth-first: a module is pushed after all its dependencies.
fn visit(
    index: &HashMap<String, PathBuf>,
    name: &str,
    done: &mut HashSet<String>,
    path: &mut Vec<String>,
    ordered: &mut Vec<Module>,
) -> Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if path.iter().any(|p| p == name) {
        bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
    }
    let file = index.get(name).with_context(|| {
        format!(
            "the guest kernel has no module `{name}` (needed by {}); is it built in, or is \
             this not a Debian 6.1 amd64 kernel?",
            path.last().map_or("vm-test", String::as_str)
        )
    })?;
    let bytes = read_module(file)?;
    path.push(name.to_owned());
    for dep in depends(&bytes).with_context(|| format!("reading {}", file.display()))? {
        visit(index, &normalize(&dep), done, path, ordered)?;
    }
    path.pop();
    done.insert(name.to_owned());
    ordered.push(Module {
        name: name.to_owned(),
        bytes,
    });
    Ok(())
}

/// Module name → file, for every module under `dir`.
fn index(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut found = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if let Some(name) = entry.file_name().to_str().and_then(module_stem) {
                found.insert(normalize(name), path);
            }
        }
    }
    Ok(found)
}

/// `vsock.ko`, `vsock.ko.xz`, … → `vsock`.
fn module_stem(file: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
}

/// The kernel treats `-` and `_` in module names alike; `/sys/module` uses `_`.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let file = path.to_string_lossy();
    let (tool, package) = if file.ends_with(".ko.xz") {
        ("xz", "xz-utils")
    } else if file.ends_with(".ko.zst") {
        ("zstd", "zstd")
    } else if file.ends_with(".ko.gz") {
        ("gzip", "gzip")
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| {
            format!("decompressing kernel modules needs `{tool}`: run `apt-get install {package}`")
        })?;
    if !out.status.success() {
        bail!(
            "`{tool} -dc {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The `depends=` list of a module's `.modinfo` section (NUL-separated `key=value` strings).
fn depends(ko: &[u8]) -> Result<Vec<String>> {
    let elf = object::File::parse(ko).context("not an ELF module")?;
    let modinfo = elf
        .section_by_name(".modinfo")
        .context("the module has no .modinfo section")?
        .data()
        .context("unreadable .modinfo section")?;
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_stem("vsock.ko"), Some("vsock"));
        assert_eq!(module_stem("vsock_loopback.ko.xz"), Some("vsock_loopback"));
        assert_eq!(module_stem("virtio-rng.ko.zst"), Some("virtio-rng"));
        assert_eq!(module_stem("modules.order"), None);
        assert_eq!(normalize("virtio-rng"), "virtio_rng");
    }
}
