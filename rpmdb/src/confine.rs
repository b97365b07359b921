//! Opening files of a scanned system without ever leaving its root.
//!
//! Everything under a root belongs to whoever controls the guest or image, including its
//! symlinks and hard links. Paths under a [`Root`] are resolved by the kernel with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` relative to the root's descriptor: an
//! absolute link restarts at the root, `..` stops at it, `/proc` magic links are refused. Where
//! `openat2` is missing (ENOSYS, or EPERM from a seccomp filter) the same rule is applied by a
//! walk that opens one component at a time with `O_NOFOLLOW` and keeps the directories it
//! passed as descriptors, so `..` is answered from that stack, never by the kernel.
//!
//! Files are then read through the descriptor that was checked: a regular file (not a symlink,
//! fifo, device, socket or directory), and under a root that is not the whole system, with a
//! single link — a hard link can name a file outside the root. Opening takes two steps: an
//! `O_PATH` descriptor (opening it has no side effect even on a fifo or a device) is checked,
//! then the file is opened for reading (`O_NONBLOCK`, `O_NOCTTY`) and must be the same inode.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io::Read,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use rustix::{
    fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat},
    io::Errno,
};

use crate::DbError;

/// Symlinks followed in one resolution, as Linux allows.
const MAX_LINKS: usize = 40;
/// `openat2` answers EAGAIN when a rename raced with `..` resolution; it may be retried.
const RACE_RETRIES: usize = 8;

/// Set once `openat2` proved unavailable, so later opens go straight to the walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// How paths under a root are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    /// `openat2` when the kernel allows it, else the walk.
    Auto,
    /// Always the component-wise walk (what runs where `openat2` is missing).
    Walk,
}

/// Identity of a file: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    fn of(st: &Stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// What identifies a file's state on disk: if it changes during a read, the read may be torn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub id: FileId,
    pub size: u64,
    pub mtime: (i64, u64),
    pub ctime: (i64, u64),
}

impl Stamp {
    fn of(st: &Stat) -> Self {
        Self {
            id: FileId::of(st),
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// Whether a file with several hard links may be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Links {
    /// Under a root that is not the whole system: another link may be outside it.
    Single,
    /// The whole system (`/`), or a directory named directly (`--dbpath`): nothing is outside.
    Any,
}

fn io(path: &Path, e: impl Into<std::io::Error>) -> DbError {
    DbError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

fn kind_of(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::Symlink => "a symbolic link",
        FileType::Directory => "a directory",
        FileType::Fifo => "a fifo",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Socket => "a socket",
        _ => "not a regular file",
    }
}

/// Refuses anything but a regular file with an acceptable number of links.
fn check_regular(st: &Stat, links: Links, shown: &Path) -> Result<(), DbError> {
    let kind = kind_of(st);
    if kind != FileType::RegularFile {
        return Err(DbError::NotRegular {
            path: shown.to_path_buf(),
            kind: kind_name(kind),
        });
    }
    if links == Links::Single && st.st_nlink > 1 {
        return Err(DbError::HardLinked {
            path: shown.to_path_buf(),
            links: st.st_nlink,
        });
    }
    Ok(())
}

/// The real path of an open descriptor, from `/proc/self/fd`.
fn real_path(fd: &OwnedFd) -> std::io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A directory every later open is confined to.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    links: Links,
    resolver: Resolver,
}

impl Root {
    /// Opens the root directory itself; the path given is the operator's and is followed as is.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Self::open_with(path, Resolver::Auto)
    }

    /// [`Root::open`] with a chosen resolver (tests run every rule through both).
    pub fn open_with(path: &Path, resolver: Resolver) -> Result<Self, DbError> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(path, e))?;
        let here = rustix::fs::fstat(&fd).map_err(|e| io(path, e))?;
        let slash = rustix::fs::stat("/").map_err(|e| io(Path::new("/"), e))?;
        // A hard link cannot lead outside a root that is the whole file system view.
        let links = if FileId::of(&here) == FileId::of(&slash) {
            Links::Any
        } else {
            Links::Single
        };
        Ok(Self {
            fd,
            path: path.to_path_buf(),
            links,
            resolver,
        })
    }

    /// The root as the caller named it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self, rel: &Path) -> PathBuf {
        self.path.join(strip(rel))
    }

    /// Opens the directory `rel` inside the root, following symlinks as if the root were `/`.
    pub fn open_dir(&self, rel: &Path) -> Result<Dir, DbError> {
        let shown = self.shown(rel);
        let (fd, inside) = self.resolve(rel, Want::Dir, &shown)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| io(&shown, e))?;
        if kind_of(&st) != FileType::Directory {
            return Err(io(&shown, Errno::NOTDIR));
        }
        // Show where the links led, inside the root, when that is known.
        let shown = match inside.or_else(|| self.inside_path(&fd)) {
            Some(inside) => self.path.join(inside),
            None => shown,
        };
        Ok(Dir {
            fd,
            shown,
            links: self.links,
        })
    }

    /// Opens the regular file `rel` inside the root for reading, following symlinks (the last
    /// component's too) inside the root: `etc/os-release` is usually a link to
    /// `../usr/lib/os-release`.
    pub fn open_file(&self, rel: &Path) -> Result<Opened, DbError> {
        let shown = self.shown(rel);
        let (probe, _) = self.resolve(rel, Want::Path, &shown)?;
        let st = rustix::fs::fstat(&probe).map_err(|e| io(&shown, e))?;
        check_regular(&st, self.links, &shown)?;
        let (fd, _) = self.resolve(rel, Want::Read, &shown)?;
        Opened::checked(fd, FileId::of(&st), shown)
    }

    /// Size, times and inode of `rel` inside the root (symlinks followed inside it), `None`
    /// when it does not exist.
    pub fn stamp(&self, rel: &Path) -> Option<Stamp> {
        let shown = self.shown(rel);
        let (fd, _) = self.resolve(rel, Want::Path, &shown).ok()?;
        rustix::fs::fstat(&fd).ok().map(|st| Stamp::of(&st))
    }

    /// Where `fd` is, relative to the root, from the kernel's names of both.
    fn inside_path(&self, fd: &OwnedFd) -> Option<PathBuf> {
        let root = real_path(&self.fd).ok()?;
        let here = real_path(fd).ok()?;
        here.strip_prefix(&root).ok().map(Path::to_path_buf)
    }

    /// Resolves `rel` (every symlink followed inside the root) to a descriptor of the kind
    /// wanted, and, from the walk, the path it reached inside the root.
    fn resolve(
        &self,
        rel: &Path,
        want: Want,
        shown: &Path,
    ) -> Result<(OwnedFd, Option<PathBuf>), DbError> {
        let rel = strip(rel);
        if self.resolver == Resolver::Auto && !NO_OPENAT2.load(Ordering::Relaxed) {
            match openat2_in_root(&self.fd, &rel, want) {
                Ok(fd) => return Ok((fd, None)),
                // Missing, or filtered by seccomp: walk instead, from now on.
                Err(Errno::NOSYS) | Err(Errno::PERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
                Err(e) => return Err(io(shown, e)),
            }
        }
        walk(&self.fd, &rel, want)
            .map(|(fd, inside)| (fd, Some(inside)))
            .map_err(|e| io(shown, e))
    }
}

/// What a resolution opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// An `O_PATH` descriptor of whatever is there (nothing is really opened).
    Path,
    /// An `O_PATH` descriptor of a directory.
    Dir,
    /// The file, opened for reading.
    Read,
}

/// Flags of every open for reading: a fifo cannot block, a terminal cannot become ours.
const READ_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// `rel` as plain components (no root, no `.`), so it is always relative to the root.
fn strip(rel: &Path) -> PathBuf {
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(Component::Normal(p)),
            Component::ParentDir => Some(Component::ParentDir),
            _ => None,
        })
        .collect()
}

fn openat2_in_root(root: &OwnedFd, rel: &Path, want: Want) -> Result<OwnedFd, Errno> {
    let oflags = match want {
        Want::Path => OFlags::PATH | OFlags::CLOEXEC,
        Want::Dir => OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Want::Read => READ_FLAGS,
    };
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(
            root,
            rel,
            oflags,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::AGAIN) if tries < RACE_RETRIES => tries += 1,
            other => return other,
        }
    }
}

/// Resolves `rel` one component at a time from `root`, as if `root` were `/`. Every component
/// is opened with `O_PATH | O_NOFOLLOW` relative to the directory before it; symlinks are read
/// and their targets resolved the same way; `..` pops the stack of directories passed and never
/// pops the root. Returns the final descriptor, of the kind wanted, and the path reached inside
/// the root.
fn walk(root: &OwnedFd, rel: &Path, want: Want) -> Result<(OwnedFd, PathBuf), Errno> {
    let dup = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))
    };
    let mut dirs: Vec<OwnedFd> = vec![dup(root)?];
    let mut names: Vec<OsString> = Vec::new();
    let mut todo: Vec<OsString> = components(rel.as_os_str());
    todo.reverse();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            if dirs.len() > 1 {
                dirs.pop();
                names.pop();
            }
            continue;
        }
        let last = todo.is_empty();
        let parent = dirs.last().ok_or(Errno::IO)?;
        let fd = rustix::fs::openat(
            parent,
            &part,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        match kind_of(&st) {
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Errno::LOOP);
                }
                let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
                let target = OsStr::from_bytes(target.as_bytes());
                if target.as_bytes().first() == Some(&b'/') {
                    dirs.truncate(1);
                    names.clear();
                }
                let mut more = components(target);
                more.reverse();
                todo.extend(more);
            }
            FileType::Directory if !last => {
                dirs.push(fd);
                names.push(part);
            }
            _ if !last => return Err(Errno::NOTDIR),
            _ => {
                names.push(part.clone());
                let inside: PathBuf = names.iter().collect();
                return match want {
                    // The final open, relative to its directory and never through a link.
                    Want::Read => rustix::fs::openat(
                        parent,
                        &part,
                        READ_FLAGS | OFlags::NOFOLLOW,
                        Mode::empty(),
                    )
                    .map(|opened| (opened, inside)),
                    Want::Dir if kind_of(&st) != FileType::Directory => Err(Errno::NOTDIR),
                    Want::Path | Want::Dir => Ok((fd, inside)),
                };
            }
        }
    }
    // Resolved to a directory on the stack (the root itself, or after a trailing `..`/link).
    let top = dirs.pop().ok_or(Errno::IO)?;
    if want == Want::Read {
        return Err(Errno::ISDIR);
    }
    Ok((top, names.iter().collect()))
}

/// The normal components of a path or link target (`.` and empty ones dropped, `..` kept).
fn components(path: &OsStr) -> Vec<OsString> {
    path.as_bytes()
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| OsStr::from_bytes(c).to_owned())
        .collect()
}

/// A directory whose files are opened by name relative to its descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    shown: PathBuf,
    links: Links,
}

impl Dir {
    /// A directory the caller names directly (`--dbpath`): its path is followed as given, and
    /// there is no outside to escape to, so hard links are accepted.
    pub fn open_plain(path: &Path) -> Result<Self, DbError> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(path, e))?;
        Ok(Self {
            fd,
            shown: path.to_path_buf(),
            links: Links::Any,
        })
    }

    /// The directory as shown in messages and reports (under the root as the caller named it).
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// The path of `name` in this directory, as shown.
    pub fn shown(&self, name: &str) -> PathBuf {
        self.shown.join(name)
    }

    /// The directory's real path on this system (`/proc/self/fd`), for opening by path.
    pub fn real_path(&self) -> Result<PathBuf, DbError> {
        real_path(&self.fd).map_err(|e| io(&self.shown, e))
    }

    /// Status of the entry `name` itself (a symlink is not followed), `None` when absent.
    pub fn entry(&self, name: &str) -> Result<Option<Stat>, DbError> {
        let shown = self.shown(name);
        single(name, &shown)?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io(&shown, e)),
        }
    }

    /// Like [`Dir::entry`], and the entry, when present, must be a file this crate may read
    /// (regular, and single-linked where that matters).
    pub fn checked_entry(&self, name: &str) -> Result<Option<Stamp>, DbError> {
        match self.entry(name)? {
            None => Ok(None),
            Some(st) => {
                check_regular(&st, self.links, &self.shown(name))?;
                Ok(Some(Stamp::of(&st)))
            }
        }
    }

    /// Opens the regular file `name` in this directory for reading; a symlink is refused.
    pub fn open_file(&self, name: &str) -> Result<Opened, DbError> {
        let shown = self.shown(name);
        single(name, &shown)?;
        let probe = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(&shown, e))?;
        let st = rustix::fs::fstat(&probe).map_err(|e| io(&shown, e))?;
        check_regular(&st, self.links, &shown)?;
        let fd = rustix::fs::openat(&self.fd, name, READ_FLAGS | OFlags::NOFOLLOW, Mode::empty())
            .map_err(|e| io(&shown, e))?;
        Opened::checked(fd, FileId::of(&st), shown)
    }
}

/// `name` must be one component: a file directly in the directory.
fn single(name: &str, shown: &Path) -> Result<(), DbError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io(shown, Errno::INVAL));
    }
    Ok(())
}

/// A regular file opened for reading, checked.
#[derive(Debug)]
pub struct Opened {
    file: File,
    stamp: Stamp,
    shown: PathBuf,
}

impl Opened {
    /// The file opened for reading must be the one that was checked.
    fn checked(fd: OwnedFd, expected: FileId, shown: PathBuf) -> Result<Self, DbError> {
        let st = rustix::fs::fstat(&fd).map_err(|e| io(&shown, e))?;
        if FileId::of(&st) != expected || kind_of(&st) != FileType::RegularFile {
            return Err(DbError::Replaced { path: shown });
        }
        Ok(Self {
            file: File::from(fd),
            stamp: Stamp::of(&st),
            shown,
        })
    }

    /// The file as shown in messages.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Its identity and state when it was opened.
    pub fn stamp(&self) -> Stamp {
        self.stamp
    }

    /// Its state now (through the descriptor).
    pub fn stamp_now(&self) -> Result<Stamp, DbError> {
        rustix::fs::fstat(self.file.as_fd())
            .map(|st| Stamp::of(&st))
            .map_err(|e| io(&self.shown, e))
    }

    /// Reads up to `buf.len()` bytes from the start.
    pub fn read_head(&self, buf: &mut [u8]) -> Result<usize, DbError> {
        use std::os::unix::fs::FileExt;
        let mut n = 0;
        while n < buf.len() {
            match self.file.read_at(&mut buf[n..], n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(&self.shown, e)),
            }
        }
        Ok(n)
    }

    /// Reads the whole file, at most `limit` bytes (more is an error): never more than the
    /// size it had when checked, so a file growing meanwhile cannot make us allocate more.
    pub fn read_all(&self, limit: u64) -> Result<Vec<u8>, DbError> {
        let size = self.stamp.size;
        if size > limit {
            return Err(DbError::Limit {
                path: self.shown.clone(),
                reason: format!("{size} bytes, more than the {limit} allowed"),
            });
        }
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        (&self.file)
            .take(size)
            .read_to_end(&mut out)
            .map_err(|e| io(&self.shown, e))?;
        Ok(out)
    }

    /// Copies the file's content (as [`Opened::read_all`] sees it) to `to`.
    pub fn copy_to(&self, to: &mut impl std::io::Write) -> Result<u64, DbError> {
        use std::io::Seek;
        let mut file = &self.file;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| io(&self.shown, e))?;
        std::io::copy(&mut file.take(self.stamp.size), to).map_err(|e| io(&self.shown, e))
    }
}

/// Descriptors of this process whose kernel name is `path`, with the identity of the file each
/// has open: how we see which file SQLite (which opens by path) really opened.
pub fn open_descriptors(path: &Path) -> Vec<(String, Option<FileId>)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
        .map(|e| {
            // Following the magic link stats the open file itself.
            let id = std::fs::metadata(e.path()).ok().map(|m| FileId {
                dev: m.dev(),
                ino: m.ino(),
            });
            (e.file_name().to_string_lossy().into_owned(), id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with `etc/os-release -> ../usr/lib/os-release`, and a host file beside it.
    fn world() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let host = tmp.path().join("host");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(root.join("usr/lib/os-release"), "ID=inside\n").unwrap();
        std::os::unix::fs::symlink("../usr/lib/os-release", root.join("etc/os-release")).unwrap();
        std::fs::write(host.join("os-release"), "ID=host\n").unwrap();
        (tmp, root, host)
    }

    fn read(root: &Root, rel: &str) -> Result<String, DbError> {
        let file = root.open_file(Path::new(rel))?;
        Ok(String::from_utf8(file.read_all(1 << 20)?).unwrap())
    }

    fn not_found(r: Result<String, DbError>) -> bool {
        matches!(&r, Err(DbError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound)
    }

    #[test]
    fn both_resolvers_keep_every_link_inside_the_root() {
        for resolver in [Resolver::Auto, Resolver::Walk] {
            let (_tmp, r, host) = world();
            let root = Root::open_with(&r, resolver).unwrap();
            assert_eq!(read(&root, "etc/os-release").unwrap(), "ID=inside\n");
            // Absolute link to the host file: resolved under the root, where nothing is.
            std::os::unix::fs::symlink(host.join("os-release"), r.join("etc/abs")).unwrap();
            assert!(not_found(read(&root, "etc/abs")), "{resolver:?}");
            // `..` stops at the root.
            std::os::unix::fs::symlink("../../../../../../host/os-release", r.join("etc/rel"))
                .unwrap();
            assert!(not_found(read(&root, "etc/rel")), "{resolver:?}");
            assert!(not_found(read(&root, "../host/os-release")), "{resolver:?}");
            // An intermediate directory link to the host.
            std::os::unix::fs::symlink(&host, r.join("var")).unwrap();
            assert!(not_found(read(&root, "var/os-release")), "{resolver:?}");
            // An absolute link restarts at the root.
            std::os::unix::fs::symlink("/usr/lib", r.join("etc/lib")).unwrap();
            assert_eq!(read(&root, "etc/lib/os-release").unwrap(), "ID=inside\n");
            // A loop ends.
            std::os::unix::fs::symlink("loop", r.join("etc/loop")).unwrap();
            assert!(
                matches!(read(&root, "etc/loop"), Err(DbError::Io { .. })),
                "{resolver:?}"
            );
            // Magic links never resolve (under a root that is not `/`, /proc is the root's).
            std::os::unix::fs::symlink("/proc/self/root/etc/passwd", r.join("etc/magic")).unwrap();
            assert!(read(&root, "etc/magic").is_err(), "{resolver:?}");
            // Directories: links followed inside, shown where they led.
            let dir = root.open_dir(Path::new("etc/lib")).unwrap();
            assert_eq!(dir.path(), r.join("usr/lib"), "{resolver:?}");
            assert_eq!(
                root.open_dir(Path::new("..")).unwrap().path(),
                r.as_path(),
                "{resolver:?}"
            );
            assert!(root.open_dir(Path::new("etc/os-release")).is_err());
        }
    }

    #[test]
    fn files_must_be_regular_and_single_linked_under_a_root() {
        for resolver in [Resolver::Auto, Resolver::Walk] {
            let (_tmp, r, host) = world();
            let root = Root::open_with(&r, resolver).unwrap();
            std::fs::hard_link(host.join("os-release"), r.join("etc/hard")).unwrap();
            assert!(
                matches!(
                    read(&root, "etc/hard"),
                    Err(DbError::HardLinked { links: 2, .. })
                ),
                "{resolver:?}"
            );
            assert!(matches!(
                read(&root, "usr/lib"),
                Err(DbError::NotRegular { .. })
            ));
            // In a directory, a file is opened by name and never through a link.
            let dir = root.open_dir(Path::new("etc")).unwrap();
            assert!(matches!(
                dir.open_file("os-release"),
                Err(DbError::NotRegular { kind, .. }) if kind.contains("symbolic link")
            ));
            assert!(dir.open_file("../usr/lib/os-release").is_err());
            assert!(matches!(
                dir.checked_entry("hard"),
                Err(DbError::HardLinked { .. })
            ));
            assert_eq!(dir.checked_entry("missing").unwrap(), None);
        }
    }

    #[test]
    fn the_whole_system_has_no_outside() {
        let root = Root::open(Path::new("/")).unwrap();
        assert_eq!(root.links, Links::Any);
        let (_tmp, r, _) = world();
        assert_eq!(Root::open(&r).unwrap().links, Links::Single);
    }
}
