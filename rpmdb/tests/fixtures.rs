//! Every fixture in `../shared/fixtures/rpmdb/`: the fields the peer projects assert, the errors
//! negative fixtures must give, and the behaviour each damaged database's NOTE.md describes —
//! always terminating, never panicking, never allocating beyond the input.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use rpmdb::{Backend, DbError, Scan};
use serde_json::Value;

/// Records the largest single allocation (shared by the tests of this binary).
struct PeakAlloc;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// Tests of this binary run one at a time, so an allocation measured belongs to its test.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/rpmdb")
}

fn expected(dir: &str) -> Vec<Value> {
    std::fs::read_to_string(fixtures().join(dir).join("expected.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read(rel: &str) -> Scan {
    rpmdb::read(&fixtures().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Compares every field the peer asserts. An absent tag is `null` for us; the peers write it
/// as `""` (Go zero values and `(none)` mapped to `''`), which counts as equal.
fn assert_fields(fixture: &str, want: &Value, got: &rpmdb::Package) {
    let ours = serde_json::to_value(got).unwrap();
    for (field, value) in want.as_object().unwrap() {
        if field.starts_with('_') {
            continue;
        }
        let mine = &ours[field];
        let equal = mine == value || (value == "" && mine.is_null());
        assert!(
            equal,
            "{fixture}: {} field {field}: expected {value}, got {mine}",
            got.name
        );
    }
}

#[test]
fn ndb_sle15_every_package_in_order() {
    let _serial = serial();
    let scan = read("go-rpmdb_sle15-bci/Packages.db");
    assert_eq!(scan.backend, Backend::Ndb);
    let want = expected("go-rpmdb_sle15-bci");
    let all: Vec<&rpmdb::Package> = scan
        .packages
        .iter()
        .chain(&scan.pubkeys)
        .map(|p| &**p)
        .collect();
    assert_eq!(scan.packages.len() + scan.pubkeys.len(), want.len());
    // Ordered equality, pubkeys aside: compare in the peer's order by name.
    for w in &want {
        let got = all
            .iter()
            .find(|p| p.name == w["name"] && p.version == w["version"])
            .expect("package present");
        assert_fields("sle15", w, got);
    }
    let names: Vec<&str> = scan.packages.iter().map(|p| p.name.as_str()).collect();
    let want_names: Vec<&str> = want
        .iter()
        .filter_map(|w| w["name"].as_str())
        .filter(|n| *n != "gpg-pubkey")
        .collect();
    assert_eq!(names, want_names, "database order");
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
}

#[test]
fn sqlite_bdb_single_package_fixtures() {
    let _serial = serial();
    for (rel, dir, backend) in [
        (
            "go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite",
            "go-rpmdb_cbl-mariner-2.0",
            Backend::Sqlite,
        ),
        (
            "go-rpmdb_libuuid/Packages",
            "go-rpmdb_libuuid",
            Backend::Bdb,
        ),
        (
            "scalibr_Packages_epoch/Packages_epoch",
            "scalibr_Packages_epoch",
            Backend::Bdb,
        ),
        (
            "syft_dive-centos8/Packages",
            "syft_dive-centos8",
            Backend::Bdb,
        ),
    ] {
        let scan = read(rel);
        assert_eq!(scan.backend, backend, "{rel}");
        for want in expected(dir) {
            let got = scan
                .packages
                .iter()
                .find(|p| p.name == want["name"])
                .unwrap_or_else(|| panic!("{rel}: {} missing", want["name"]));
            assert_fields(dir, &want, got);
        }
        assert!(scan.errors.is_empty(), "{rel}: {:?}", scan.errors);
    }
    assert_eq!(
        read("go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite").packages.len(),
        129
    );
}

#[test]
fn counts_of_whole_databases() {
    let _serial = serial();
    for (rel, count) in [
        ("preflight_bdb-ubi7-tzdata/Packages", 1),
        ("preflight_sqlite-fedora36-tzdata/rpmdb.sqlite", 1),
        ("snyk_rpm4-empty/rpm4_empty", 0),
    ] {
        let scan = read(rel);
        assert_eq!(scan.packages.len(), count, "{rel}");
        assert!(scan.errors.is_empty(), "{rel}: {:?}", scan.errors);
    }
    assert_eq!(
        read("preflight_bdb-ubi7-tzdata/Packages").packages[0].name,
        "tzdata"
    );
    assert_eq!(
        read("preflight_sqlite-fedora36-tzdata/rpmdb.sqlite").packages[0].name,
        "tzdata"
    );
}

#[test]
fn negative_fixtures_fail_with_typed_errors_naming_the_file() {
    let _serial = serial();
    type IsExpected = fn(&DbError) -> bool;
    let cases: &[(&str, IsExpected)] = &[
        ("claircore_no-packages-sqlite/no_packages.sqlite", |e| {
            matches!(e, DbError::BadSchema { .. })
        }),
        ("preflight_sqlite-bad-schema/rpmdb.sqlite", |e| {
            matches!(e, DbError::BadSchema { .. })
        }),
        ("preflight_sqlite-corrupt/rpmdb.sqlite", |e| {
            matches!(e, DbError::UnknownFormat { .. })
        }),
        ("preflight_bdb-corrupt/Packages", |e| {
            matches!(e, DbError::UnknownFormat { .. })
        }),
        (
            "preflight_bdb-index-as-packages/Packages",
            |e| matches!(e, DbError::NotRpmDb { reason, .. } if reason.contains("btree")),
        ),
        ("scalibr_invalid/invalid", |e| {
            matches!(e, DbError::UnknownFormat { .. })
        }),
        ("scalibr_empty-sqlite/empty.sqlite", |e| {
            matches!(e, DbError::UnknownFormat { .. })
        }),
    ];
    for (rel, kind) in cases {
        let err = rpmdb::read(&fixtures().join(rel)).expect_err(rel);
        assert!(kind(&err), "{rel}: wrong error kind: {err:?}");
        let file = Path::new(rel).file_name().unwrap().to_str().unwrap();
        assert!(
            err.to_string().contains(file),
            "{rel}: the message names the file: {err}"
        );
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
}

#[test]
fn header_blobs_decode() {
    let _serial = serial();
    let crypto =
        std::fs::read(fixtures().join("header-blobs/claircore_package-header/package.header"))
            .unwrap();
    let p = rpmdb::decode_header(&crypto).unwrap();
    assert_eq!(
        (p.name.as_str(), p.version.as_str(), p.release.as_str()),
        ("crypto-policies", "20210213", "1.git5c710c0.fc34")
    );
    assert_eq!(p.arch.as_deref(), Some("noarch"));
    let blob = std::fs::read(fixtures().join("header-blobs/go-rpmdb_blob-bin/blob.bin")).unwrap();
    let p = rpmdb::decode_header(&blob).unwrap();
    assert!(!p.name.is_empty());
}

fn corrupt(name: &str) -> (Result<Scan, DbError>, usize, u64) {
    let dir = fixtures().join("corrupt").join(name);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_none_or(|e| e != "md"))
        .unwrap();
    let size = std::fs::metadata(&file).unwrap().len();
    LARGEST.store(0, Ordering::SeqCst);
    let result = rpmdb::read(&file);
    (result, LARGEST.load(Ordering::SeqCst), size)
}

#[test]
fn damaged_databases_behave_as_their_notes_say() {
    let _serial = serial();
    let libuuid = read("go-rpmdb_libuuid/Packages");
    for (name, check) in [
        ("bdb-be_from_go-rpmdb_libuuid", "same"),
        ("bdb-cyclic-overflow-chain", "bad overflow chain at 3"),
        ("bdb-overflow-len-too-big", "overflow length 65535 > page"),
        ("bdb-truncated-file", "bad overflow chain at 3"),
        ("bdb-zeroed-overflow-page", "not an overflow page"),
        ("bdb-pagesize-1MiB", "bad page size 1048576"),
        ("ndb-bad-blob-checksum", "adler32 mismatch"),
        ("ndb-bad-slot-magic", "bad magic"),
        ("ndb-blob-pkgidx-mismatch", "bad blob header"),
        ("ndb-slot-beyond-eof", "blob extent outside file"),
    ] {
        let (result, largest, size) = corrupt(name);
        // Bounded memory: nothing larger than the file itself (plus small fixed buffers).
        assert!(
            largest as u64 <= size + 64 * 1024,
            "{name}: allocated {largest} bytes for a {size}-byte file"
        );
        match (name, check, result) {
            (_, "same", Ok(scan)) => {
                assert_eq!(
                    scan.packages, libuuid.packages,
                    "{name}: big endian reads like little endian"
                );
            }
            (n, reason, Err(e)) if n.contains("pagesize") => {
                assert!(e.to_string().contains(reason), "{name}: {e}")
            }
            (n, reason, Ok(scan)) if n.starts_with("ndb") => {
                assert_eq!(
                    scan.packages.len(),
                    34,
                    "{name}: the other packages are still read"
                );
                assert!(
                    scan.errors
                        .iter()
                        .any(|e| e.reason.contains(reason) || e.entry.contains(reason)),
                    "{name}: {:?}",
                    scan.errors
                );
            }
            (_, reason, Ok(scan)) => {
                assert!(
                    scan.packages.is_empty(),
                    "{name}: no package may be invented"
                );
                assert!(
                    scan.errors.iter().any(|e| e.reason.contains(reason)),
                    "{name}: {:?}",
                    scan.errors
                );
            }
            (_, _, Err(e)) => panic!("{name}: unexpected error {e}"),
        }
    }
}
