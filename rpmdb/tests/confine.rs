//! Reading under a root never reads a file outside it. Each test puts a distinguishable
//! database outside the root (mariner: 129 packages) and, where a link should resolve inside,
//! another one inside (fedora36: one package, tzdata), then asserts on what was read.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use rpmdb::{DbError, ReadOptions, Scan, Source};
use tempfile::TempDir;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/rpmdb")
        .join(rel)
}

const OUTSIDE_DB: &str = "go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite";
const INSIDE_DB: &str = "preflight_sqlite-fedora36-tzdata/rpmdb.sqlite";
const OUTSIDE_COUNT: usize = 129;

/// A root and, beside it (same file system, for hard links), an outside directory holding the
/// outside database.
struct World {
    _tmp: TempDir,
    root: PathBuf,
    outside: PathBuf,
}

impl World {
    fn new() -> Self {
        let tmp = TempDir::new().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside/rpm");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::copy(fixture(OUTSIDE_DB), outside.join("rpmdb.sqlite")).unwrap();
        Self {
            _tmp: tmp,
            root,
            outside,
        }
    }

    fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn link(&self, target: impl AsRef<Path>, rel: &str) {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }

    /// The inside database at `rel` (a directory under the root).
    fn inside_db(&self, rel: &str) {
        std::fs::copy(fixture(INSIDE_DB), self.mkdir(rel).join("rpmdb.sqlite")).unwrap();
    }

    fn scan(&self) -> Result<Scan, DbError> {
        rpmdb::read_with(
            Source::Root(&self.root),
            &ReadOptions::timeout(Duration::from_secs(20)),
        )
    }
}

/// Never the outside database: either an error or the inside one.
fn assert_not_outside(result: &Result<Scan, DbError>) {
    if let Ok(scan) = result {
        assert_ne!(
            scan.packages.len(),
            OUTSIDE_COUNT,
            "read the database outside the root"
        );
    }
}

fn assert_inside(result: Result<Scan, DbError>) {
    let scan = result.expect("the database inside the root");
    let names: Vec<&str> = scan.packages.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["tzdata"]);
}

#[test]
fn absolute_directory_link_resolves_inside_the_root() {
    let w = World::new();
    // var/lib/rpm -> the absolute host path of the outside directory.
    w.link(&w.outside, "var/lib/rpm");
    let result = w.scan();
    assert!(
        matches!(result, Err(DbError::NotFound { .. })),
        "{result:?}"
    );
    // The same path under the root is what the link names.
    let mirror = w
        .outside
        .strip_prefix("/")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    w.inside_db(&mirror);
    let scan = w.scan();
    assert_not_outside(&scan);
    let shown = scan.as_ref().unwrap().path.clone();
    assert_inside(scan);
    assert_eq!(shown, w.root.join(&mirror).join("rpmdb.sqlite"));
}

#[test]
fn dot_dot_never_climbs_out() {
    let w = World::new();
    let up = "../".repeat(30);
    let target = format!("{up}{}", w.outside.strip_prefix("/").unwrap().display());
    w.link(&target, "var/lib/rpm");
    let result = w.scan();
    assert_not_outside(&result);
    assert!(
        matches!(result, Err(DbError::NotFound { .. })),
        "{result:?}"
    );
    // A relative link from the root's top to the outside directory beside it.
    w.link("../outside/rpm", "usr/share/rpm");
    let result = w.scan();
    assert_not_outside(&result);
    assert!(
        matches!(result, Err(DbError::NotFound { .. })),
        "{result:?}"
    );
}

#[test]
fn intermediate_directory_link_resolves_inside_the_root() {
    let w = World::new();
    // var/lib -> /…/outside: var/lib/rpm would be the outside database on the host.
    w.mkdir("var");
    w.link(w.outside.parent().unwrap(), "var/lib");
    let result = w.scan();
    assert_not_outside(&result);
    assert!(
        matches!(result, Err(DbError::NotFound { .. })),
        "{result:?}"
    );
    // Links that stay inside are followed, as rpm would (var/lib/rpm -> ../../usr/lib/...).
    std::fs::remove_file(w.root.join("var/lib")).unwrap();
    w.inside_db("usr/lib/sysimage/rpm");
    w.link("../../usr/lib/sysimage/rpm", "var/lib/rpm");
    std::fs::rename(
        w.root.join("usr/lib/sysimage/rpm"),
        w.root.join("usr/lib/sysimage/real"),
    )
    .unwrap();
    w.link("real", "usr/lib/sysimage/rpm");
    assert_inside(w.scan());
}

#[test]
fn database_file_links_are_refused() {
    let w = World::new();
    let dir = w.mkdir("usr/lib/sysimage/rpm");
    // Absolute, to the outside file.
    std::os::unix::fs::symlink(w.outside.join("rpmdb.sqlite"), dir.join("rpmdb.sqlite")).unwrap();
    let result = w.scan();
    assert!(
        matches!(&result, Err(DbError::NotRegular { kind, .. }) if kind.contains("symbolic link")),
        "{result:?}"
    );
    // Even to a file inside the root: SQLite would refuse it too (SQLITE_OPEN_NOFOLLOW).
    std::fs::remove_file(dir.join("rpmdb.sqlite")).unwrap();
    std::fs::copy(fixture(INSIDE_DB), dir.join("real.sqlite")).unwrap();
    std::os::unix::fs::symlink("real.sqlite", dir.join("rpmdb.sqlite")).unwrap();
    let result = w.scan();
    assert!(
        matches!(result, Err(DbError::NotRegular { .. })),
        "{result:?}"
    );
}

#[test]
fn wal_and_shm_links_are_refused() {
    let w = World::new();
    w.inside_db("usr/lib/sysimage/rpm");
    let dir = w.root.join("usr/lib/sysimage/rpm");
    std::fs::write(w.outside.join("rpmdb.sqlite-wal"), b"outside wal").unwrap();
    std::os::unix::fs::symlink(
        w.outside.join("rpmdb.sqlite-wal"),
        dir.join("rpmdb.sqlite-wal"),
    )
    .unwrap();
    let result = w.scan();
    assert!(
        matches!(&result, Err(DbError::NotRegular { path, .. }) if path.ends_with("rpmdb.sqlite-wal")),
        "{result:?}"
    );
    std::fs::remove_file(dir.join("rpmdb.sqlite-wal")).unwrap();
    std::os::unix::fs::symlink("/dev/shm/x", dir.join("rpmdb.sqlite-shm")).unwrap();
    let result = w.scan();
    assert!(
        matches!(&result, Err(DbError::NotRegular { path, .. }) if path.ends_with("rpmdb.sqlite-shm")),
        "{result:?}"
    );
    assert!(
        !dir.join("rpmdb.sqlite-wal").exists(),
        "nothing was created next to the database"
    );
}

#[test]
fn hard_links_are_refused_under_a_root() {
    let w = World::new();
    let dir = w.mkdir("usr/lib/sysimage/rpm");
    std::fs::hard_link(w.outside.join("rpmdb.sqlite"), dir.join("rpmdb.sqlite")).unwrap();
    let result = w.scan();
    assert!(
        matches!(result, Err(DbError::HardLinked { links: 2, .. })),
        "{result:?}"
    );
    // A -wal hard-linked to an outside file, beside a good database.
    std::fs::remove_file(dir.join("rpmdb.sqlite")).unwrap();
    std::fs::copy(fixture(INSIDE_DB), dir.join("rpmdb.sqlite")).unwrap();
    std::fs::write(w.outside.join("secret"), b"host file").unwrap();
    std::fs::hard_link(w.outside.join("secret"), dir.join("rpmdb.sqlite-wal")).unwrap();
    let result = w.scan();
    assert!(
        matches!(&result, Err(DbError::HardLinked { path, .. }) if path.ends_with("rpmdb.sqlite-wal")),
        "{result:?}"
    );
}

#[test]
fn a_database_named_directly_may_be_hard_linked_but_not_a_link() {
    // --dbpath: no root, nothing outside; the operator's path is followed as given.
    let w = World::new();
    let plain = w.mkdir("plain");
    std::fs::hard_link(w.outside.join("rpmdb.sqlite"), plain.join("rpmdb.sqlite")).unwrap();
    let scan = rpmdb::read(&plain).unwrap();
    assert_eq!(scan.packages.len(), OUTSIDE_COUNT);
    let linked = w.mkdir("linked");
    std::os::unix::fs::symlink(w.outside.join("rpmdb.sqlite"), linked.join("rpmdb.sqlite"))
        .unwrap();
    assert!(matches!(
        rpmdb::read(&linked),
        Err(DbError::NotRegular { .. })
    ));
    // A directory link given by the operator is followed.
    std::os::unix::fs::symlink(&plain, w.root.join("to-plain")).unwrap();
    assert_eq!(
        rpmdb::read(&w.root.join("to-plain"))
            .unwrap()
            .packages
            .len(),
        OUTSIDE_COUNT
    );
}

/// Runs `f` on a thread and fails (instead of hanging the suite) if it takes over 10 s.
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the read hung")
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn fifos_and_devices_are_refused_without_blocking() {
    let w = World::new();
    let dir = w.mkdir("var/lib/rpm");
    for name in ["rpmdb.sqlite", "Packages.db", "Packages"] {
        mkfifo(&dir.join(name));
        let root = w.root.clone();
        let result = within_10s(move || {
            rpmdb::read_with(Source::Root(&root), &ReadOptions::default()).map(|s| s.packages.len())
        });
        assert!(
            matches!(&result, Err(DbError::NotRegular { kind, .. }) if kind.contains("fifo")),
            "{name}: {result:?}"
        );
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    // A fifo as -wal beside a real database.
    w.inside_db("var/lib/rpm");
    mkfifo(&dir.join("rpmdb.sqlite-wal"));
    let root = w.root.clone();
    let result = within_10s(move || {
        rpmdb::read_with(Source::Root(&root), &ReadOptions::default()).map(|s| s.packages.len())
    });
    assert!(
        matches!(result, Err(DbError::NotRegular { .. })),
        "{result:?}"
    );
    std::fs::remove_file(dir.join("rpmdb.sqlite-wal")).unwrap();
    std::fs::remove_file(dir.join("rpmdb.sqlite")).unwrap();
    // A character device (/dev/zero's numbers) as Packages: needs CAP_MKNOD.
    let made = std::process::Command::new("mknod")
        .arg(dir.join("Packages"))
        .args(["c", "1", "5"])
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let root = w.root.clone();
        let result = within_10s(move || {
            rpmdb::read_with(Source::Root(&root), &ReadOptions::default()).map(|s| s.packages.len())
        });
        assert!(
            matches!(&result, Err(DbError::NotRegular { kind, .. }) if kind.contains("character device")),
            "{result:?}"
        );
    } else {
        eprintln!("SKIPPED: the device case (mknod not permitted)");
    }
}

#[test]
fn a_root_scan_creates_nothing_and_reads_wal_content() {
    // The WAL-mode fixture with a -wal and -shm, as a live writer leaves them: read through
    // them (mode=ro) with the descriptors SQLite opened checked against the ones resolved.
    let w = World::new();
    w.inside_db("usr/lib/sysimage/rpm");
    let dir = w.root.join("usr/lib/sysimage/rpm");
    {
        // Make real -wal/-shm: a writer that keeps its connection open while we read.
        let writer = rusqlite::Connection::open(dir.join("rpmdb.sqlite")).unwrap();
        writer.pragma_update(None, "journal_mode", "wal").unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
            .execute(
                "INSERT INTO Packages (blob) SELECT blob FROM Packages WHERE hnum = (SELECT min(hnum) FROM Packages)",
                [],
            )
            .unwrap();
        assert!(dir.join("rpmdb.sqlite-wal").exists() && dir.join("rpmdb.sqlite-shm").exists());
        let before: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let scan = w.scan().unwrap();
        assert_eq!(scan.packages.len(), 2, "the committed WAL row is visible");
        let after: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(before, after);
    }
}
