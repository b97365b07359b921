//! Turning BPF records into triggers: transaction ends with attribution, and verified tamper
//! events.

use std::{
    collections::HashMap,
    path::{Component, Path, PathBuf},
};

use guestwatch_agent_common::{EventKind, FileOp};

use super::{
    inotify::reader_written,
    trigger::{Attribution, Trigger, TriggerKind},
};
use crate::{
    bpf::{BpfRecord, FileRecord, Probes, TxRecord},
    clock,
};

/// What a BPF record means for detection.
#[derive(Debug)]
pub enum Signal {
    /// A transaction started (used to explain concurrent inotify events).
    TxStarted,
    /// A transaction ended or tampering was seen: scan.
    Trigger(Box<Trigger>),
    /// Tampering by a process that exited before its relative path could be resolved; it
    /// becomes a trigger once inotify confirms the directory (see `confirm.rs`).
    Unconfirmed(Box<UnconfirmedTamper>),
    /// Nothing to act on (e.g. a tamper record outside the watched directory).
    None,
}

/// Transaction starts waiting for their end, by thread.
struct Started {
    exe: Option<String>,
}

/// The BPF half of detection.
pub struct EbpfSource {
    probes: Probes,
    /// Directories (as configured and resolved) whose files count for tampering.
    watch_dirs: Vec<PathBuf>,
    started: HashMap<u32, Started>,
}

impl EbpfSource {
    pub fn new(probes: Probes, watch_dirs: Vec<PathBuf>) -> Self {
        Self {
            probes,
            watch_dirs,
            started: HashMap::new(),
        }
    }

    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// The next record, interpreted.
    pub async fn next(&mut self) -> std::io::Result<Signal> {
        let record = self.probes.next().await?;
        Ok(match record {
            BpfRecord::Tx(tx) if tx.kind == EventKind::TxStart => {
                // Read the executable now: the process is alive for the whole transaction,
                // but may be gone by the time it ends.
                let exe = exe_of(tx.tgid);
                if self.started.len() > 4096 {
                    // Starts whose end was lost (killed processes): forget them.
                    self.started.clear();
                }
                self.started.insert(tx.pid, Started { exe });
                Signal::TxStarted
            }
            BpfRecord::Tx(tx) => {
                let exe = self
                    .started
                    .remove(&tx.pid)
                    .and_then(|s| s.exe)
                    .or_else(|| exe_of(tx.tgid));
                let trigger = self.transaction_trigger(&tx, exe);
                self.check_library_upgrade();
                Signal::Trigger(Box::new(trigger))
            }
            BpfRecord::File(file) => self.tamper_signal(file),
        })
    }

    fn transaction_trigger(&self, tx: &TxRecord, exe: Option<String>) -> Trigger {
        let library = self
            .probes
            .libraries()
            .get(tx.cookie as usize)
            .map(|l| l.path.display().to_string());
        let ended_at = clock::boot_ns_to_timestamp(tx.now_ns);
        let detail = if tx.ret == 0 {
            format!("{} (pid {}) finished an rpm transaction", tx.comm, tx.tgid)
        } else {
            format!(
                "{} (pid {}) ended an rpm transaction with code {}",
                tx.comm, tx.tgid, tx.ret
            )
        };
        Trigger {
            kind: TriggerKind::Transaction,
            at: ended_at,
            attribution: Some(Attribution {
                pid: tx.tgid,
                tid: tx.pid,
                uid: tx.uid,
                gid: tx.gid,
                comm: tx.comm.clone(),
                exe,
                return_code: Some(tx.ret),
                started_at: (tx.start_ns > 0).then(|| clock::boot_ns_to_timestamp(tx.start_ns)),
                ended_at: Some(ended_at),
                library,
                ..Default::default()
            }),
            detail: Some(detail),
        }
    }

    /// An rpm-libs upgrade replaces librpm with a new inode, which the probes are not
    /// attached to; transactions are when that happens, so check after each one.
    fn check_library_upgrade(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let replaced = self.probes.libraries().iter().any(|l| {
            std::fs::metadata(&l.path).map_or(true, |m| m.ino() != l.ino || m.dev() != l.dev)
        });
        if replaced {
            for library in self.probes.refresh_libraries() {
                log::info!(
                    "librpm changed: attached to rpmtsRun in {}",
                    library.path.display()
                );
            }
        }
    }

    /// Full re-discovery of librpm copies (new sonames, containers); cheap enough for the
    /// periodic rescan.
    pub fn rediscover_libraries(&mut self) {
        for library in self.probes.refresh_libraries() {
            log::info!(
                "attached to rpmtsRun in newly found {}",
                library.path.display()
            );
        }
    }

    fn tamper_signal(&self, file: FileRecord) -> Signal {
        let mut paths = Vec::new();
        let mut unresolved = Vec::new();
        // Read once, so that both names of a rename resolve against the same answer (the
        // process may exit between two reads); not at all when every name is absolute.
        let relative = std::iter::once(&file.path)
            .chain(file.path2.iter())
            .any(|raw| !raw.starts_with('/'));
        let cwd = relative
            .then(|| std::fs::read_link(format!("/proc/{}/cwd", file.tgid)).ok())
            .flatten();
        // The executable as the process stood now: a later read could find its pid reused.
        let exe = exe_of(file.tgid);
        for (i, raw) in std::iter::once(&file.path)
            .chain(file.path2.iter())
            .enumerate()
        {
            let fd = if i == 0 { file.fd } else { None };
            match resolve(file.tgid, raw, fd, cwd.as_deref()) {
                Some(path) => paths.push(path),
                None => unresolved.push(raw.clone()),
            }
        }
        let inside: Vec<PathBuf> = paths
            .iter()
            .filter(|p| {
                self.watch_dirs
                    .iter()
                    .any(|d| p.parent() == Some(d.as_path()))
            })
            // Readers write these too (SQLite's shared-memory index, Berkeley DB regions).
            .filter(|p| {
                !p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(reader_written)
            })
            .cloned()
            .collect();
        if !inside.is_empty() {
            let how = "outside any rpm transaction";
            return Signal::Trigger(Box::new(tamper_trigger(&file, exe, &inside, &paths, how)));
        }
        // Only a bare database file name reaches userspace unresolved (the kernel side matched
        // it against the watched names); its directory died with the process.
        let names: Vec<String> = unresolved
            .into_iter()
            .filter(|n| !n.is_empty() && !n.contains('/') && !reader_written(n))
            .collect();
        if names.is_empty() {
            return Signal::None;
        }
        Signal::Unconfirmed(Box::new(UnconfirmedTamper::new(file, exe, paths, names)))
    }
}

/// A tamper record whose process exited before `/proc` could say which directory its relative
/// path was in.
#[derive(Debug)]
pub struct UnconfirmedTamper {
    file: FileRecord,
    /// Read with the record (usually `None`: the process is gone).
    exe: Option<String>,
    /// The paths of the record that did resolve (absolute ones).
    resolved: Vec<PathBuf>,
    /// Bare file names the process used relative to a directory it no longer has.
    pub names: Vec<String>,
}

impl UnconfirmedTamper {
    pub(super) fn new(
        file: FileRecord,
        exe: Option<String>,
        resolved: Vec<PathBuf>,
        names: Vec<String>,
    ) -> Self {
        Self {
            file,
            exe,
            resolved,
            names,
        }
    }

    /// The trigger, now that a file of one of these names changed in `dir`.
    pub fn confirm(&self, dir: &Path) -> Trigger {
        let inside: Vec<PathBuf> = self.names.iter().map(|n| dir.join(n)).collect();
        let paths: Vec<PathBuf> = self.resolved.iter().chain(&inside).cloned().collect();
        let how =
            "outside any rpm transaction (the process had exited; inotify confirmed the directory)";
        tamper_trigger(&self.file, self.exe.clone(), &inside, &paths, how)
    }
}

/// A tamper trigger for `file` by the process running `exe`: `inside` are its paths in a
/// watched directory, `paths` all of them.
fn tamper_trigger(
    file: &FileRecord,
    exe: Option<String>,
    inside: &[PathBuf],
    paths: &[PathBuf],
    how: &str,
) -> Trigger {
    let operation = match file.op {
        FileOp::Write => "write",
        FileOp::OpenTruncate => "open-truncate",
        FileOp::Rename => "rename",
        FileOp::Unlink => "unlink",
        FileOp::Truncate => "truncate",
    };
    let at = clock::boot_ns_to_timestamp(file.now_ns);
    let inside: Vec<String> = inside.iter().map(|p| p.display().to_string()).collect();
    Trigger {
        kind: TriggerKind::Tamper,
        at,
        detail: Some(format!(
            "{} (pid {}, uid {}) did {operation} on {} {how}",
            file.comm,
            file.tgid,
            file.uid,
            inside.join(", ")
        )),
        attribution: Some(Attribution {
            pid: file.tgid,
            tid: file.pid,
            uid: file.uid,
            gid: file.gid,
            comm: file.comm.clone(),
            exe,
            ended_at: Some(at),
            operation: Some(operation.to_owned()),
            paths: paths.iter().map(|p| p.display().to_string()).collect(),
            ..Default::default()
        }),
    }
}

fn exe_of(tgid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{tgid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}

/// An absolute, lexically normalised path for what the process named: through its open
/// descriptor when there is one, else relative to its working directory `cwd`.
fn resolve(tgid: u32, raw: &str, fd: Option<i32>, cwd: Option<&Path>) -> Option<PathBuf> {
    if let Some(fd) = fd
        && let Ok(path) = std::fs::read_link(format!("/proc/{tgid}/fd/{fd}"))
    {
        return Some(normalize(&path));
    }
    let raw = Path::new(raw);
    if raw.is_absolute() {
        return Some(normalize(raw));
    }
    Some(normalize(&cwd?.join(raw)))
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_dot_dot() {
        assert_eq!(
            normalize(Path::new("/var/lib/rpm/../rpm/./Packages")),
            PathBuf::from("/var/lib/rpm/Packages")
        );
        assert_eq!(normalize(Path::new("/../../etc")), PathBuf::from("/etc"));
    }

    #[test]
    fn relative_paths_resolve_against_the_working_directory_read() {
        let me = std::process::id();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            resolve(me, "x/y", None, Some(&cwd)),
            Some(normalize(&cwd.join("x/y")))
        );
        assert_eq!(resolve(me, "x/y", None, None), None);
        assert_eq!(
            resolve(me, "/abs/z", None, None),
            Some(PathBuf::from("/abs/z"))
        );
    }
}
