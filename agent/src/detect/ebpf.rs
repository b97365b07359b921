//! Turning BPF records into detection signals: transaction boundaries with their attribution,
//! a transaction's writes with what they wrote, and verified tamper records.
//!
//! Nothing here decides whether a transaction counts; `explain.rs` does, from these signals.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use guestwatch_agent_common::{EventKind, FileOp};

use super::{
    explain::{TxKey, Written},
    inotify::reader_written,
    process::{self, AttributionMode, Procfs},
    trigger::{Attribution, Trigger, TriggerKind},
};
use crate::{
    bpf::{BpfRecord, FileId, FileRecord, Probes, TxRecord},
    clock,
};

/// What a BPF record means for detection.
#[derive(Debug)]
pub enum Signal {
    /// A transaction started; `who` was read while its process was alive. `opened` says
    /// whether the process had a file of the watched database open then.
    TxStarted {
        key: TxKey,
        who: Box<Attribution>,
        opened: bool,
    },
    /// A transaction's process wrote a watched path.
    TxWrote {
        key: TxKey,
        who: Box<Attribution>,
        written: Written,
    },
    /// A transaction ended (`return_code` `None`: its thread died inside `rpmtsRun`).
    TxEnded {
        key: TxKey,
        who: Box<Attribution>,
        return_code: Option<i32>,
        end_ns: u64,
        writes: u32,
    },
    /// A process that ran a transaction exited (its database closed, SQLite checkpointed).
    Exited { tgid: u32, exit_ns: u64 },
    /// A process that ran a transaction wrote file `name` of the watched database after it
    /// (the transaction's tail: SQLite's checkpoint and `-wal` removal on close).
    Tail { tgid: u32, at_ns: u64, name: String },
    /// Tampering: scan.
    Tamper(Box<Trigger>),
    /// Tampering by a process that exited before its relative path could be resolved; it
    /// becomes a trigger once inotify confirms the directory (see `confirm.rs`).
    Unconfirmed(Box<UnconfirmedTamper>),
    /// Nothing to act on (e.g. a tamper record outside the watched directory).
    None,
}

/// The BPF half of detection.
pub struct EbpfSource {
    probes: Probes,
    /// Directories (as configured and resolved) whose files are the watched database.
    watch_dirs: Vec<PathBuf>,
    /// Shown in attributions instead of the root's own path (`--root`).
    root: Option<PathBuf>,
    procfs: Procfs,
    mode: AttributionMode,
    /// Attributions of running transactions, for their later records.
    running: BTreeMap<TxKey, Attribution>,
}

/// Running transactions remembered at most (starts whose end was lost are forgotten first).
const MAX_RUNNING: usize = 4096;

impl EbpfSource {
    pub fn new(
        probes: Probes,
        watch_dirs: Vec<PathBuf>,
        root: Option<PathBuf>,
        mode: AttributionMode,
    ) -> Self {
        Self {
            probes,
            watch_dirs,
            root,
            procfs: Procfs::default(),
            mode,
            running: BTreeMap::new(),
        }
    }

    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    pub fn probes_mut(&mut self) -> &mut Probes {
        &mut self.probes
    }

    /// Waits until records may be in the ring buffer. Cancel-safe.
    pub async fn readable(&mut self) -> std::io::Result<()> {
        self.probes.readable().await
    }

    /// The next record already in the ring buffer, interpreted; `None` once it is empty.
    pub fn try_next(&mut self) -> Option<Signal> {
        let record = self.probes.try_next()?;
        Some(match record {
            BpfRecord::Tx(tx) => self.transaction_signal(tx),
            BpfRecord::File(file) if file.tail => self.tail_signal(&file),
            BpfRecord::File(file) if file.tx_start_ns.is_some() => self.write_signal(&file),
            BpfRecord::File(file) => self.tamper_signal(file),
        })
    }

    fn library(&self, cookie: u64) -> Option<String> {
        self.probes
            .libraries()
            .get(cookie as usize)
            .map(|l| l.path.display().to_string())
    }

    /// The attribution of a transaction whose start record was lost: what the kernel put in
    /// its other records.
    fn minimal(tgid: u32, tid: u32, uid: u32, gid: u32, comm: &str) -> Attribution {
        Attribution {
            pid: tgid,
            tid,
            uid,
            gid,
            comm: comm.to_owned(),
            ..Default::default()
        }
    }

    fn transaction_signal(&mut self, tx: TxRecord) -> Signal {
        let key = TxKey {
            tgid: tx.tgid,
            start_ns: tx.start_ns,
        };
        match tx.kind {
            EventKind::TxStart => {
                let opened = self.track_open_descriptors(tx.tgid);
                let mut who = process::attribution(&tx, &self.procfs, self.mode);
                who.library = self.library(tx.cookie);
                if self.running.len() >= MAX_RUNNING
                    && let Some(oldest) = self.running.keys().next().copied()
                {
                    self.running.remove(&oldest);
                }
                // Threads of one process entering together share the transaction.
                self.running.entry(key).or_insert_with(|| who.clone());
                Signal::TxStarted {
                    key,
                    who: Box::new(who),
                    opened,
                }
            }
            EventKind::TxExit => Signal::Exited {
                tgid: tx.tgid,
                exit_ns: tx.now_ns,
            },
            _ => {
                let who = self.running.remove(&key).unwrap_or_else(|| {
                    let mut who = Self::minimal(tx.tgid, tx.pid, tx.uid, tx.gid, &tx.comm);
                    who.loginuid = tx.loginuid;
                    who.sessionid = tx.sessionid;
                    who.exe = self.procfs.exe(tx.tgid);
                    who.library = self.library(tx.cookie);
                    who
                });
                if tx.kind == EventKind::TxEnd {
                    self.check_library_upgrade();
                }
                Signal::TxEnded {
                    key,
                    who: Box::new(Attribution { tid: tx.pid, ..who }),
                    return_code: (tx.kind == EventKind::TxEnd).then_some(tx.ret),
                    end_ns: tx.now_ns,
                    writes: tx.writes,
                }
            }
        }
    }

    /// Descriptors on the watched database the process opened for writing before the probes
    /// were there (a long-running daemon such as PackageKit): tracked from now on, so that the
    /// transaction's writes through them are seen as its evidence. Returns whether the process
    /// has any file of the watched database open (a transaction that has not cannot be
    /// changing it).
    fn track_open_descriptors(&mut self, tgid: u32) -> bool {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{tgid}/fd")) else {
            return false;
        };
        let mut opened = false;
        for entry in entries.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if !self.inside(&target) {
                continue;
            }
            opened = true;
            if target
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(reader_written)
            {
                continue;
            }
            let flags = std::fs::read_to_string(format!("/proc/{tgid}/fdinfo/{fd}"))
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                });
            const O_ACCMODE: u32 = 0o3;
            if let Some(flags) = flags
                && flags & O_ACCMODE != 0
            {
                self.probes.track_descriptor(tgid, fd, &target, flags);
            }
        }
        opened
    }

    /// A write after a transaction by its process: only the watched database's files matter.
    fn tail_signal(&self, file: &FileRecord) -> Signal {
        let name = Path::new(&file.path)
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned);
        match (self.what_was_written(file), name) {
            (Written::Ours { .. } | Written::Unverified { .. }, Some(name)) => Signal::Tail {
                tgid: file.tgid,
                at_ns: file.now_ns,
                name,
            },
            _ => Signal::None,
        }
    }

    /// A transaction's write: which file it really was.
    fn write_signal(&mut self, file: &FileRecord) -> Signal {
        let key = TxKey {
            tgid: file.tgid,
            start_ns: file.tx_start_ns.unwrap_or_default(),
        };
        let who =
            self.running.get(&key).cloned().unwrap_or_else(|| {
                Self::minimal(file.tgid, file.pid, file.uid, file.gid, &file.comm)
            });
        Signal::TxWrote {
            key,
            who: Box::new(who),
            written: self.what_was_written(file),
        }
    }

    /// Whether `file` (a transaction's write) is the watched database: see [`Self::written`].
    fn what_was_written(&self, file: &FileRecord) -> Written {
        let name = Path::new(&file.path).file_name();
        if name.and_then(|n| n.to_str()).is_some_and(reader_written) {
            return Written::Shared;
        }
        let ours = |path: &Path| Written::Ours {
            database: self.shown(&database_file(path)),
        };
        match self.written(file.tgid, &file.path, file.fd, file.file) {
            Some(WrittenFile::Watched(path)) => return ours(&path),
            Some(WrittenFile::Held(_, held)) => {
                // What the process holds now is the file it wrote: the watched entry or not.
                return match name.and_then(|n| self.entry_named(n, |e| e == held)) {
                    Some(path) => ours(&path),
                    None => Written::Elsewhere,
                };
            }
            Some(WrittenFile::Other(_)) => return Written::Elsewhere,
            None => {}
        }
        let cwd = std::fs::read_link(format!("/proc/{}/cwd", file.tgid)).ok();
        let candidates = std::iter::once((&file.path, file.dirfd))
            .chain(file.path2.as_ref().map(|p| (p, file.dirfd2)));
        for (raw, dirfd) in candidates {
            if let Some(path) = resolve(file.tgid, raw, dirfd, cwd.as_deref())
                && self.inside(&path)
            {
                return Written::Unverified {
                    database: self.shown(&database_file(&path)),
                };
            }
        }
        Written::Elsewhere
    }

    /// The file a write went to, when identities can tell (`None`: only its name can).
    ///
    /// By the identity the kernel recorded at the write: the entry of that name in a watched
    /// directory. Else by the descriptor while it still holds that file: by now the number may
    /// name another (a shell restores its redirected stdout; a closed number is reused by the
    /// next open), so it is never taken alone when the kernel's identity is known. When the
    /// entry of that name exists but is another file, the write went elsewhere. Without the
    /// kernel's identity (no BTF), the descriptor is all there is.
    fn written(
        &self,
        tgid: u32,
        raw: &str,
        fd: Option<i32>,
        file: Option<FileId>,
    ) -> Option<WrittenFile> {
        let name = Path::new(raw).file_name()?;
        if let Some(file) = file
            && let Some(path) = self.entry_named(name, |e| same_file(file, e, &self.watch_dirs))
        {
            return Some(WrittenFile::Watched(path));
        }
        if let Some(fd) = fd
            && let Some((path, held)) = held_file(tgid, fd)
            && file.is_none_or(|id| same_file(id, held, std::slice::from_ref(&path)))
        {
            return Some(WrittenFile::Held(path, held));
        }
        match file {
            Some(file) if self.entry_named(name, |_| true).is_some() => {
                Some(WrittenFile::Other(file))
            }
            _ => None,
        }
    }

    /// The entry named `name` in a watched directory whose identity passes `is`.
    fn entry_named(&self, name: &OsStr, is: impl Fn(FileId) -> bool) -> Option<PathBuf> {
        self.watch_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| FileId::of(p).is_some_and(&is))
    }

    /// Where a name the process used is: a written file by [`Self::written`]; a relative name
    /// by the directory the kernel identified when the call was made (it cannot have changed
    /// since, unlike the process's working directory or descriptors in `/proc`); without
    /// them, by [`resolve`].
    #[allow(clippy::too_many_arguments)]
    fn resolve(
        &self,
        tgid: u32,
        raw: &str,
        fd: Option<i32>,
        file: Option<FileId>,
        dirfd: Option<i32>,
        dir: Option<FileId>,
        cwd: Option<&Path>,
    ) -> Option<PathBuf> {
        match self.written(tgid, raw, fd, file) {
            Some(WrittenFile::Watched(path) | WrittenFile::Held(path, _)) => {
                return Some(normalize(&path));
            }
            // Shown as what it is; never inside a watched directory.
            Some(WrittenFile::Other(file)) => {
                return Some(PathBuf::from(format!("<file {}:{}>", file.dev, file.ino)));
            }
            None => {}
        }
        if let (false, Some(dir)) = (raw.starts_with('/'), dir) {
            if let Some(watched) = self.watch_dirs.iter().find(|d| {
                FileId::of(d).is_some_and(|e| same_file(dir, e, std::slice::from_ref(*d)))
            }) {
                return Some(normalize(&watched.join(raw)));
            }
            // Not a watched directory: where it was only matters for display.
            return Some(
                resolve(tgid, raw, dirfd, cwd)
                    .filter(|p| !self.inside(p))
                    .unwrap_or_else(|| {
                        PathBuf::from(format!("<directory {}:{}>/{raw}", dir.dev, dir.ino))
                    }),
            );
        }
        resolve(tgid, raw, dirfd, cwd)
    }

    fn inside(&self, path: &Path) -> bool {
        self.watch_dirs
            .iter()
            .any(|d| path.parent() == Some(d.as_path()))
    }

    /// A path as reports show it: relative to the root when one is scanned.
    fn shown(&self, path: &Path) -> String {
        match &self.root {
            Some(root) => path
                .strip_prefix(root)
                .map(|p| format!("/{}", p.display()))
                .unwrap_or_else(|_| path.display().to_string()),
            None => path.display().to_string(),
        }
    }

    /// An rpm-libs upgrade replaces librpm with a new inode, which the probes are not
    /// attached to; transactions are when that happens, so check after each one.
    fn check_library_upgrade(&mut self) {
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

    fn tamper_signal(&self, file: FileRecord) -> Signal {
        let mut paths = Vec::new();
        let mut unresolved = Vec::new();
        // Read once, so that both names of a rename resolve against the same answer (the
        // process may exit between two reads); not at all when every name is absolute or
        // relative to a directory descriptor.
        let needs_cwd = std::iter::once((&file.path, file.dirfd))
            .chain(file.path2.iter().map(|p| (p, file.dirfd2)))
            .any(|(raw, dirfd)| !raw.starts_with('/') && dirfd.is_none());
        let cwd = needs_cwd
            .then(|| std::fs::read_link(format!("/proc/{}/cwd", file.tgid)).ok())
            .flatten();
        // The executable as the process stood now (a later read could find its pid reused),
        // and only if it is still the program that made the call.
        let exe = self.procfs.exe_of(file.tgid, &file.comm);
        for (i, raw) in std::iter::once(&file.path)
            .chain(file.path2.iter())
            .enumerate()
        {
            let (fd, id, dirfd, dir) = if i == 0 {
                (file.fd, file.file, file.dirfd, file.dir)
            } else {
                (None, None, file.dirfd2, file.dir2)
            };
            match self.resolve(file.tgid, raw, fd, id, dirfd, dir, cwd.as_deref()) {
                Some(path) => paths.push(path),
                None => unresolved.push(raw.clone()),
            }
        }
        let inside: Vec<PathBuf> = paths
            .iter()
            .filter(|p| self.inside(p))
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
            return Signal::Tamper(Box::new(tamper_trigger(&file, exe, &inside, &paths, how)));
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

/// What [`EbpfSource::written`] found a write went to.
enum WrittenFile {
    /// The watched directory's entry of that name (the kernel's identity says so).
    Watched(PathBuf),
    /// The file the descriptor still holds (with the kernel's identity when it was known).
    Held(PathBuf, FileId),
    /// Another file than the watched entry of that name.
    Other(FileId),
}

/// The database file a write belongs to: SQLite's `-wal`, `-journal` and `-shm` are its
/// database's.
fn database_file(path: &Path) -> PathBuf {
    let text = path.to_string_lossy();
    for suffix in ["-wal", "-journal", "-shm"] {
        if let Some(main) = text.strip_suffix(suffix) {
            return PathBuf::from(main);
        }
    }
    path.to_path_buf()
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

/// The name of a tamper record's file operation.
pub fn operation_name(op: FileOp) -> &'static str {
    match op {
        FileOp::Write => "write",
        FileOp::OpenTruncate => "open-truncate",
        FileOp::Rename => "rename",
        FileOp::Unlink => "unlink",
        FileOp::Truncate => "truncate",
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
    let operation = operation_name(file.op);
    let at = clock::boot_ns_to_timestamp(file.now_ns);
    let inside: Vec<String> = inside.iter().map(|p| p.display().to_string()).collect();
    let distinct: BTreeSet<String> = paths.iter().map(|p| p.display().to_string()).collect();
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
            paths: distinct.into_iter().collect(),
            ..Default::default()
        }),
    }
}

/// An absolute, lexically normalised path for what the process named: as it is when absolute,
/// else relative to the directory descriptor of a `*at` call, else to its working directory
/// `cwd`.
fn resolve(tgid: u32, raw: &str, dirfd: Option<i32>, cwd: Option<&Path>) -> Option<PathBuf> {
    let raw = Path::new(raw);
    if raw.is_absolute() {
        return Some(normalize(raw));
    }
    let base = match dirfd {
        Some(dirfd) => std::fs::read_link(format!("/proc/{tgid}/fd/{dirfd}")).ok()?,
        None => cwd?.to_path_buf(),
    };
    Some(normalize(&base.join(raw)))
}

/// The file descriptor `fd` of process `tgid` holds now: its path and identity, read through
/// one `O_PATH` descriptor of it so that both describe the same file (two reads of
/// `/proc/<pid>/fd/<n>` could straddle a `dup2`). `O_PATH` opens nothing for I/O: no FIFO
/// blocks, no device is touched.
fn held_file(tgid: u32, fd: i32) -> Option<(PathBuf, FileId)> {
    use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(format!("/proc/{tgid}/fd/{fd}"))
        .ok()?;
    let meta = held.metadata().ok()?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", held.as_raw_fd())).ok()?;
    Some((
        path,
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Whether the kernel's identity of a file (its superblock's device and inode) and a `stat`
/// of it are the same file. They agree on most filesystems; on btrfs subvolumes and overlayfs
/// `st_dev` is not the superblock's device, which `/proc/self/mountinfo` shows for the mount
/// holding `paths` (one of them). Inode numbers alone would not do: anyone can make a file
/// with a chosen inode number on a filesystem of their own (FUSE, a tmpfs counter).
fn same_file(kernel: FileId, stat: FileId, paths: &[PathBuf]) -> bool {
    kernel == stat
        || (kernel.ino == stat.ino && paths.iter().any(|p| superblock_dev(p) == Some(kernel.dev)))
}

/// The device of the superblock of the mount holding `path`, as `/proc/self/mountinfo` gives
/// it: the deepest mount point above the path (the last mounted of equal ones).
fn superblock_dev(path: &Path) -> Option<u64> {
    let path = std::fs::canonicalize(path).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, u64)> = None;
    for line in mountinfo.lines() {
        let mut fields = line.split(' ');
        let (Some(dev), Some(point)) = (fields.nth(2), fields.nth(1)) else {
            continue;
        };
        let point = PathBuf::from(unescape_mountinfo(point));
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
            continue;
        };
        let depth = point.components().count();
        if path.starts_with(&point) && best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, libc::makedev(major, minor)));
        }
    }
    best.map(|(_, dev)| dev)
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn relative_paths_resolve_against_the_directory_descriptor_or_the_working_directory() {
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
        // Through a directory descriptor this process holds.
        let dir = tempfile::tempdir().unwrap();
        let handle = std::fs::File::open(dir.path()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&handle);
        assert_eq!(
            resolve(me, "Packages", Some(fd), Some(&cwd)),
            Some(normalize(
                &dir.path().canonicalize().unwrap().join("Packages")
            ))
        );
    }

    #[test]
    fn a_held_file_is_named_and_identified_through_one_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().canonicalize().unwrap().join("Packages");
        let file = std::fs::File::create(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let (held, id) = held_file(std::process::id(), fd).unwrap();
        assert_eq!(held, path);
        assert_eq!(Some(id), FileId::of(&path));
        // A number nothing holds.
        assert!(held_file(std::process::id(), 1 << 20).is_none());
    }

    #[test]
    fn a_kernel_identity_matches_only_on_the_watched_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Packages");
        std::fs::write(&path, b"").unwrap();
        let stat = FileId::of(&path).unwrap();
        let paths = [path.clone()];
        assert!(same_file(stat, stat, &paths));
        // The superblock's device of the mount holding it (what the kernel records) matches.
        let sb = superblock_dev(&path).expect("a mount holds every path");
        assert!(same_file(FileId { dev: sb, ..stat }, stat, &paths));
        // The same inode number on another filesystem (a FUSE file made to look alike) does not.
        let forged = FileId {
            dev: libc::makedev(250, 7),
            ..stat
        };
        assert!(sb != forged.dev && stat.dev != forged.dev);
        assert!(!same_file(forged, stat, &paths));
        assert!(!same_file(
            FileId {
                ino: stat.ino + 1,
                ..stat
            },
            stat,
            &paths
        ));
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            unescape_mountinfo(r"/mnt/a\040b\011c\134d"),
            "/mnt/a b\tc\\d"
        );
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
    }

    #[test]
    fn sqlite_sidecars_belong_to_their_database() {
        assert_eq!(
            database_file(Path::new("/r/var/lib/rpm/rpmdb.sqlite-wal")),
            PathBuf::from("/r/var/lib/rpm/rpmdb.sqlite")
        );
        assert_eq!(
            database_file(Path::new("/var/lib/rpm/Packages")),
            PathBuf::from("/var/lib/rpm/Packages")
        );
    }
}
