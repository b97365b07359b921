//! inotify on the rpm database directory: the fallback detector, and the safety net beside BPF.
//!
//! The directory is resolved through symlinks and watched for writes, renames, creations and
//! deletions of database files; `IN_CLOSE_WRITE` on `.rpm.lock` marks the end of a transaction.
//! The parents of both the configured path and its resolution are watched too, so the directory
//! being deleted, recreated, renamed or replaced by a symlink is noticed and followed. While the
//! directory does not exist, its nearest existing ancestor is watched until it reappears.

use std::{
    ffi::OsStr,
    io,
    path::{Component, Path, PathBuf},
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::io::unix::AsyncFd;

/// A change the watcher noticed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirEvent {
    /// A database file changed (`what` names the inotify event, `file` the entry).
    Changed { file: String, what: &'static str },
    /// The database directory itself was replaced, appeared or vanished; the watcher now
    /// follows `now_at` (`None`: it does not exist, an ancestor is watched).
    Moved { now_at: Option<PathBuf> },
    /// The kernel's event queue overflowed: something happened, details were lost.
    Overflow,
}

/// Files that readers write too (SQLite's shared-memory index, Berkeley DB environment
/// regions): changes there say nothing about the package set.
pub fn reader_written(name: &str) -> bool {
    name.ends_with("-shm") || name.starts_with("__db.")
}

/// The lock file librpm holds for the duration of a transaction.
pub const LOCK_FILE: &str = ".rpm.lock";

fn dir_mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

fn parent_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// A watched ancestor and the entry in it whose changes matter.
struct ParentWatch {
    wd: WatchDescriptor,
    child: std::ffi::OsString,
}

/// One raw event, copied out of the read buffer.
struct RawEvent {
    wd: WatchDescriptor,
    mask: EventMask,
    name: Option<std::ffi::OsString>,
}

/// Watches one rpm database directory, following it when it is replaced.
pub struct DbDirWatcher {
    configured: PathBuf,
    inotify: AsyncFd<Inotify>,
    buffer: Vec<u8>,
    /// Events read but not yet interpreted.
    queue: std::collections::VecDeque<RawEvent>,
    watches: Watches,
    dir: Option<(WatchDescriptor, PathBuf)>,
    parents: Vec<ParentWatch>,
}

impl DbDirWatcher {
    /// Starts watching `path` (which may not exist yet).
    pub fn new(path: &Path) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let configured = absolute(path)?;
        // SAFETY: the Inotify owns its descriptor and keeps it open, unchanged, for as long as
        // it lives; the AsyncFd owns the Inotify, so the descriptor outlives the registration.
        let inotify =
            unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        let mut watcher = Self {
            configured,
            inotify,
            buffer: vec![0u8; 64 * 1024],
            queue: std::collections::VecDeque::new(),
            watches,
            dir: None,
            parents: Vec::new(),
        };
        watcher.rewatch()?;
        Ok(watcher)
    }

    /// The directory being watched now, resolved through symlinks; `None` while it is missing.
    pub fn watched_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(|(_, p)| p.as_path())
    }

    fn rewatch(&mut self) -> io::Result<()> {
        if let Some((wd, _)) = self.dir.take() {
            let _ = self.watches.remove(wd);
        }
        for parent in self.parents.drain(..) {
            let _ = self.watches.remove(parent.wd);
        }
        match std::fs::canonicalize(&self.configured) {
            Ok(resolved) if resolved.is_dir() => {
                let wd = self.watches.add(&resolved, dir_mask())?;
                self.dir = Some((wd, resolved.clone()));
                for path in [self.configured.clone(), resolved] {
                    if let (Some(parent), Some(name)) = (path.parent(), path.file_name()) {
                        self.watch_parent(parent, name)?;
                    }
                }
            }
            _ => {
                let (ancestor, child) = nearest_existing_ancestor(&self.configured);
                self.watch_parent(&ancestor, &child)?;
            }
        }
        Ok(())
    }

    fn watch_parent(&mut self, dir: &Path, child: &OsStr) -> io::Result<()> {
        let wd = self.watches.add(dir, parent_mask())?;
        // The same directory may already be watched for another child (same wd).
        self.parents.push(ParentWatch {
            wd,
            child: child.to_owned(),
        });
        Ok(())
    }

    /// The next relevant change. Cancel-safe.
    /// The next change. Cancel-safe.
    pub async fn next(&mut self) -> io::Result<DirEvent> {
        loop {
            if let Some(event) = self.try_next()? {
                return Ok(event);
            }
            let mut guard = self.inotify.readable_mut().await?;
            // Clear readiness before reading: an event queued meanwhile re-arms it.
            guard.clear_ready();
        }
    }

    /// Waits until changes may be queued. Cancel-safe.
    pub async fn readable(&mut self) -> io::Result<()> {
        if !self.queue.is_empty() {
            return Ok(());
        }
        let mut guard = self.inotify.readable_mut().await?;
        // Clear readiness before the caller drains: an event queued meanwhile re-arms it.
        guard.clear_ready();
        Ok(())
    }

    /// The next change already queued in the kernel, without waiting: `None` once the
    /// queue is empty. Everything the kernel queued before the call is seen by calls until it
    /// returns `None` (detection relies on this to order inotify against BPF records).
    pub fn try_next(&mut self) -> io::Result<Option<DirEvent>> {
        loop {
            while let Some(raw) = self.queue.pop_front() {
                if let Some(event) = self.interpret(raw)? {
                    return Ok(Some(event));
                }
            }
            let read = self.inotify.get_mut().read_events(&mut self.buffer);
            match read {
                Ok(events) => {
                    let mut any = false;
                    for e in events {
                        any = true;
                        self.queue.push_back(RawEvent {
                            wd: e.wd,
                            mask: e.mask,
                            name: e.name.map(OsStr::to_owned),
                        });
                    }
                    if !any {
                        return Ok(None);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// What a raw event means, if anything.
    fn interpret(&mut self, event: RawEvent) -> io::Result<Option<DirEvent>> {
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            self.rewatch()?;
            return Ok(Some(DirEvent::Overflow));
        }
        let name = event.name.as_deref();
        let on_dir = self.dir.as_ref().is_some_and(|(wd, _)| *wd == event.wd);
        if on_dir {
            if event
                .mask
                .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED)
            {
                return self.moved().map(Some);
            }
            let Some(name) = name.and_then(OsStr::to_str) else {
                return Ok(None);
            };
            return Ok(classify(name, event.mask).map(|what| DirEvent::Changed {
                file: name.to_owned(),
                what,
            }));
        }
        let relevant_parent = self.parents.iter().any(|p| {
            p.wd == event.wd
                && (event
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                    || name == Some(p.child.as_os_str()))
        });
        if relevant_parent {
            return self.moved().map(Some);
        }
        Ok(None)
    }

    fn moved(&mut self) -> io::Result<DirEvent> {
        self.rewatch()?;
        Ok(DirEvent::Moved {
            now_at: self.watched_dir().map(Path::to_path_buf),
        })
    }
}

/// Which database-file events count as a change, and how to name them.
fn classify(name: &str, mask: EventMask) -> Option<&'static str> {
    if name == LOCK_FILE {
        // Opening and closing the lock for writing brackets every transaction.
        return mask
            .contains(EventMask::CLOSE_WRITE)
            .then_some("transaction lock released");
    }
    if reader_written(name) {
        return None;
    }
    // CLOSE_WRITE alone is not a change: readers may open the database read-write.
    if mask.contains(EventMask::MODIFY) {
        Some("modified")
    } else if mask.contains(EventMask::MOVED_TO) {
        Some("renamed into place")
    } else if mask.contains(EventMask::MOVED_FROM) {
        Some("renamed away")
    } else if mask.contains(EventMask::CREATE) {
        Some("created")
    } else if mask.contains(EventMask::DELETE) {
        Some("deleted")
    } else {
        None
    }
}

fn absolute(path: &Path) -> io::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}

/// The deepest existing directory on the way to `path`, and the next component below it.
fn nearest_existing_ancestor(path: &Path) -> (PathBuf, std::ffi::OsString) {
    let mut existing = PathBuf::from("/");
    let mut next = std::ffi::OsString::new();
    for component in path.components() {
        let Component::Normal(part) = component else {
            continue;
        };
        let candidate = existing.join(part);
        if candidate.is_dir() {
            existing = candidate;
        } else {
            next = part.to_owned();
            break;
        }
    }
    (existing, next)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn expect_event(w: &mut DbDirWatcher) -> DirEvent {
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("no inotify event within 5 s")
            .expect("inotify error")
    }

    async fn expect_quiet(w: &mut DbDirWatcher) {
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(200), w.next()).await {
            panic!("unexpected event {event:?}");
        }
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(LOCK_FILE, EventMask::CLOSE_WRITE),
            Some("transaction lock released")
        );
        assert_eq!(classify(LOCK_FILE, EventMask::MODIFY), None);
        assert_eq!(classify("rpmdb.sqlite-shm", EventMask::MODIFY), None);
        assert_eq!(classify("__db.001", EventMask::MODIFY), None);
        assert_eq!(classify("rpmdb.sqlite", EventMask::CLOSE_WRITE), None);
        assert_eq!(
            classify("rpmdb.sqlite-wal", EventMask::MODIFY),
            Some("modified")
        );
        assert_eq!(
            classify("Packages", EventMask::MOVED_TO),
            Some("renamed into place")
        );
    }

    #[test]
    fn ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let (a, next) = nearest_existing_ancestor(&dir.path().join("x/y"));
        assert_eq!(a, dir.path());
        assert_eq!(next, "x");
    }

    #[tokio::test]
    async fn sees_writes_and_ignores_reader_files() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rpm");
        std::fs::create_dir(&db).unwrap();
        let mut w = DbDirWatcher::new(&db).unwrap();
        std::fs::write(db.join("rpmdb.sqlite-shm"), b"x").unwrap();
        expect_quiet(&mut w).await;
        std::fs::write(db.join("Packages"), b"x").unwrap();
        let event = expect_event(&mut w).await;
        assert!(
            matches!(event, DirEvent::Changed { ref file, .. } if file == "Packages"),
            "{event:?}"
        );
    }

    #[tokio::test]
    async fn survives_deletion_recreation_and_symlink_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rpm");
        std::fs::create_dir(&db).unwrap();
        let mut w = DbDirWatcher::new(&db).unwrap();

        std::fs::remove_dir(&db).unwrap();
        let event = expect_event(&mut w).await;
        assert_eq!(event, DirEvent::Moved { now_at: None });

        std::fs::create_dir(&db).unwrap();
        loop {
            if let DirEvent::Moved { now_at: Some(at) } = expect_event(&mut w).await {
                assert_eq!(at, std::fs::canonicalize(&db).unwrap());
                break;
            }
        }
        std::fs::write(db.join("rpmdb.sqlite"), b"x").unwrap();
        assert!(matches!(
            expect_event(&mut w).await,
            DirEvent::Changed { .. }
        ));

        // Replace the directory by a symlink to another one.
        let elsewhere = dir.path().join("sysimage-rpm");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::remove_file(db.join("rpmdb.sqlite")).unwrap();
        std::fs::remove_dir(&db).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &db).unwrap();
        let target = std::fs::canonicalize(&elsewhere).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while w.watched_dir() != Some(target.as_path()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never followed the symlink"
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), w.next()).await;
        }
        std::fs::write(elsewhere.join("Packages.db"), b"x").unwrap();
        loop {
            if let DirEvent::Changed { file, .. } = expect_event(&mut w).await {
                assert_eq!(file, "Packages.db");
                break;
            }
        }
    }
}
