//! Finding every librpm on the system, by absolute path.
//!
//! Uprobes attach to an inode, so each distinct copy of librpm (several sonames, a container's
//! own copy) needs its own attachment. Candidates come from the dynamic loader's cache
//! (`/etc/ld.so.cache`), the usual library directories, and `/proc/*/maps` (libraries in
//! unusual places or other mount namespaces that some process has loaded right now).

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// One librpm file to attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    /// Canonical path as this process can open it.
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

/// Directories searched when the loader cache is missing or incomplete.
const LIBRARY_DIRS: &[&str] = &[
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
    "/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/local/lib",
    "/usr/local/lib64",
];

/// True for `librpm.so` and `librpm.so.N[.M…]`, not for librpmio, librpmbuild or librpmsign.
pub fn is_librpm_name(name: &str) -> bool {
    name.strip_prefix("librpm.so")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Every distinct librpm found, deduplicated by inode, in a stable order.
pub fn discover() -> Vec<Library> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(cache) = fs::read("/etc/ld.so.cache") {
        candidates.extend(ld_cache_paths(&cache, is_librpm_name));
    }
    for dir in LIBRARY_DIRS {
        if let Ok(entries) = fs::read_dir(dir) {
            candidates.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_str().is_some_and(is_librpm_name))
                    .map(|e| e.path()),
            );
        }
    }
    candidates.extend(mapped_libraries());
    dedupe(candidates)
}

fn dedupe(candidates: Vec<PathBuf>) -> Vec<Library> {
    let mut seen = HashSet::new();
    let mut libraries = Vec::new();
    for candidate in candidates {
        let Ok(path) = fs::canonicalize(&candidate) else {
            continue;
        };
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
            libraries.push(Library {
                path,
                dev: meta.dev(),
                ino: meta.ino(),
            });
        }
    }
    libraries.sort_by(|a, b| a.path.cmp(&b.path));
    libraries
}

/// librpm files mapped by running processes, reachable through `/proc/<pid>/root`
/// when the process lives in another mount namespace.
fn mapped_libraries() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(maps) = fs::read_to_string(entry.path().join("maps")) else {
            continue;
        };
        for path in maps_library_paths(&maps, is_librpm_name) {
            let direct = PathBuf::from(&path);
            if direct.exists() {
                found.push(direct);
            } else {
                found.push(
                    Path::new("/proc")
                        .join(pid)
                        .join("root")
                        .join(path.trim_start_matches('/')),
                );
            }
        }
    }
    found
}

/// Paths in a `/proc/<pid>/maps` text whose file name matches.
pub fn maps_library_paths(maps: &str, matches: impl Fn(&str) -> bool) -> Vec<String> {
    let mut paths: Vec<String> = maps
        .lines()
        // address perms offset dev inode path — the path is the sixth field and may hold spaces.
        .filter_map(|line| line.splitn(6, char::is_whitespace).nth(5))
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
        .filter(|p| {
            Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(&matches)
        })
        .map(str::to_owned)
        .collect();
    paths.dedup();
    paths
}

const CACHE_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
const CACHE_HEADER_LEN: usize = 48;
const CACHE_ENTRY_LEN: usize = 24;

/// Library paths in a glibc `ld.so.cache` (the "new" format, possibly after an old-format
/// prefix) whose key matches. Malformed caches yield whatever could be read safely.
pub fn ld_cache_paths(cache: &[u8], matches: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Some(base) = cache
        .windows(CACHE_MAGIC.len())
        .position(|w| w == CACHE_MAGIC)
    else {
        return Vec::new();
    };
    let table = &cache[base..];
    let read_u32 = |at: usize| -> Option<u32> {
        table
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    // Offsets in entries are relative to the start of the new-format header.
    let c_str = |at: u32| -> Option<&str> {
        let bytes = table.get(at as usize..)?;
        let end = bytes.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&bytes[..end]).ok()
    };
    let Some(nlibs) = read_u32(20) else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for i in 0..nlibs as usize {
        let entry = CACHE_HEADER_LEN + i * CACHE_ENTRY_LEN;
        let (Some(key), Some(value)) = (read_u32(entry + 4), read_u32(entry + 8)) else {
            break;
        };
        if let (Some(key), Some(value)) = (c_str(key), c_str(value))
            && matches(key)
        {
            paths.push(PathBuf::from(value));
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librpm_names() {
        assert!(is_librpm_name("librpm.so"));
        assert!(is_librpm_name("librpm.so.9"));
        assert!(is_librpm_name("librpm.so.10.0.1"));
        assert!(!is_librpm_name("librpmio.so.9"));
        assert!(!is_librpm_name("librpmbuild.so.9"));
        assert!(!is_librpm_name("librpm.sox"));
    }

    #[test]
    fn maps_paths_with_spaces_and_pseudo_entries() {
        let maps = "\
7f0000000000-7f0000001000 r--p 00000000 fd:01 123 /usr/lib64/librpm.so.9.3.0
7f0000001000-7f0000002000 r-xp 00001000 fd:01 123 /usr/lib64/librpm.so.9.3.0
7f0000003000-7f0000004000 r--p 00000000 fd:01 124 /opt/my dir/librpm.so.10
7f0000005000-7f0000006000 r--p 00000000 fd:01 125 /usr/lib64/librpmio.so.9
7ffc00000000-7ffc00001000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            maps_library_paths(maps, is_librpm_name),
            vec!["/usr/lib64/librpm.so.9.3.0", "/opt/my dir/librpm.so.10"]
        );
    }

    fn cache_with(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut strings = Vec::new();
        let strings_at = CACHE_HEADER_LEN + entries.len() * CACHE_ENTRY_LEN;
        let mut table = Vec::new();
        for (key, value) in entries {
            let k = strings_at + strings.len();
            strings.extend_from_slice(key.as_bytes());
            strings.push(0);
            let v = strings_at + strings.len();
            strings.extend_from_slice(value.as_bytes());
            strings.push(0);
            table.extend_from_slice(&1i32.to_ne_bytes());
            table.extend_from_slice(&(k as u32).to_ne_bytes());
            table.extend_from_slice(&(v as u32).to_ne_bytes());
            table.extend_from_slice(&0u32.to_ne_bytes());
            table.extend_from_slice(&0u64.to_ne_bytes());
        }
        let mut cache = CACHE_MAGIC.to_vec();
        cache.extend_from_slice(&(entries.len() as u32).to_ne_bytes());
        cache.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
        cache.resize(CACHE_HEADER_LEN, 0);
        cache.extend(table);
        cache.extend(strings);
        cache
    }

    #[test]
    fn ld_cache_finds_librpm_only() {
        let cache = cache_with(&[
            ("librpmio.so.9", "/usr/lib64/librpmio.so.9"),
            ("librpm.so.9", "/usr/lib64/librpm.so.9"),
            ("libc.so.6", "/usr/lib64/libc.so.6"),
        ]);
        assert_eq!(
            ld_cache_paths(&cache, is_librpm_name),
            vec![PathBuf::from("/usr/lib64/librpm.so.9")]
        );
    }

    #[test]
    fn ld_cache_truncated_or_lying_is_harmless() {
        let cache = cache_with(&[("librpm.so.9", "/usr/lib64/librpm.so.9")]);
        for cut in 0..cache.len() {
            let _ = ld_cache_paths(&cache[..cut], is_librpm_name);
        }
        let mut lying = cache.clone();
        lying[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(ld_cache_paths(&lying, is_librpm_name).len(), 1);
        assert!(ld_cache_paths(b"not a cache", is_librpm_name).is_empty());
    }

    #[test]
    fn real_system_cache_parses() {
        // The host's own cache must at least name libc when it exists.
        if let Ok(cache) = fs::read("/etc/ld.so.cache") {
            assert!(!ld_cache_paths(&cache, |k| k.starts_with("libc.so")).is_empty());
        }
    }
}
