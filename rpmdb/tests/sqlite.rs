//! SQLite databases: real fixtures and databases written by Debian's rpm, compared with
//! `rpm -qa` field by field; strictly read-only.

use std::path::{Path, PathBuf};

use guestwatch_testkit::{RpmDb, build_packages, generated_specs, have_rpm_tools, in_ci};

fn fixture(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/rpmdb")
        .join(dir)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn mariner_fixture_reads_every_package_and_creates_nothing() {
    let work = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite"),
        work.path().join("rpmdb.sqlite"),
    )
    .unwrap();
    let before = listing(work.path());
    let scan = rpmdb::read(work.path()).unwrap();
    assert_eq!(
        listing(work.path()),
        before,
        "no -wal/-shm or anything else may appear"
    );
    let expected: Vec<serde_json::Value> =
        std::fs::read_to_string(fixture("go-rpmdb_cbl-mariner-2.0/expected.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let curl = scan
        .packages
        .iter()
        .find(|p| p.name == "curl")
        .expect("curl");
    let want = expected.iter().find(|e| e["name"] == "curl").unwrap();
    assert_eq!(curl.version, want["version"]);
    assert_eq!(curl.release, want["release"]);
    assert_eq!(curl.arch.as_deref(), want["arch"].as_str());
    assert_eq!(curl.size, want["size"].as_u64());
    assert_eq!(curl.sigmd5.as_deref(), want["sigmd5"].as_str());
    assert_eq!(curl.installtime, want["installtime"].as_u64());
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
}

#[test]
fn generated_database_equals_rpm_qa() {
    if !have_rpm_tools() {
        assert!(!in_ci(), "CI must have rpm");
        eprintln!("SKIPPED: rpm/rpmbuild not installed");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let rpms = build_packages(&generated_specs("gen", 300), work.path()).unwrap();
    let db = RpmDb::temp().unwrap();
    db.install(&rpms).unwrap();
    let format = "%{NAME}|%{EPOCH}|%{VERSION}|%{RELEASE}|%{ARCH}|%{SOURCERPM}|%{LICENSE}|%{SIZE}|%{INSTALLTIME}|%{SIGMD5}\n";
    let expected = db.query(format).unwrap();
    let scan = rpmdb::read(db.path()).unwrap();
    let none = |o: Option<String>| o.unwrap_or_else(|| "(none)".into());
    let mut ours: Vec<String> = scan
        .packages
        .iter()
        .map(|p| {
            format!(
                "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
                p.name,
                none(p.epoch.map(|e| e.to_string())),
                p.version,
                p.release,
                none(p.arch.clone()),
                none(p.sourcerpm.clone()),
                none(p.license.clone()),
                none(p.size.map(|s| s.to_string())),
                none(p.installtime.map(|s| s.to_string())),
                none(p.sigmd5.clone()),
            )
        })
        .collect();
    ours.sort();
    assert_eq!(ours.len(), 300);
    assert_eq!(ours, expected);
}

#[test]
fn negative_fixtures_are_typed_errors() {
    for (dir, file) in [
        ("claircore_no-packages-sqlite", "no_packages.sqlite"),
        ("preflight_sqlite-bad-schema", "rpmdb.sqlite"),
        ("preflight_sqlite-corrupt", "rpmdb.sqlite"),
        ("scalibr_invalid", "invalid"),
        ("scalibr_empty-sqlite", "empty.sqlite"),
    ] {
        let err = rpmdb::read(&fixture(dir).join(file)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(file),
            "{dir}: the error names the file: {text}"
        );
    }
}
