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

#[test]
fn scans_during_a_loop_of_installs_never_fail_or_tear() {
    if !have_rpm_tools() {
        assert!(!in_ci(), "CI must have rpm");
        eprintln!("SKIPPED: rpm/rpmbuild not installed");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let specs = guestwatch_testkit::generated_specs("race", 60);
    let rpms = build_packages(&specs, work.path()).unwrap();
    let db = RpmDb::temp().unwrap();
    db.install(&rpms[..10]).unwrap();
    let order: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let dbpath = db.path().to_path_buf();
    let writer = std::thread::spawn(move || {
        for rpm in &rpms[10..] {
            let status = std::process::Command::new("rpm")
                .arg("--dbpath")
                .arg(&dbpath)
                .args(["-i", "--justdb", "--nodeps", "--nosignature"])
                .arg(rpm)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
        }
    });
    let mut scans = 0;
    let mut last = 10;
    while !writer.is_finished() || scans == 0 {
        let scan = rpmdb::read(db.path())
            .unwrap_or_else(|e| panic!("scan {scans} failed during installs: {e}"));
        let mut names: Vec<&str> = scan.packages.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        // Installs are sequential: every consistent snapshot is the first k packages.
        let k = names.len();
        let mut want: Vec<&str> = order[..k].iter().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(names, want, "scan {scans} saw a torn package list");
        assert!(
            k >= last,
            "the package count went backwards: {last} then {k}"
        );
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
        last = k;
        scans += 1;
    }
    writer.join().unwrap();
    assert_eq!(rpmdb::read(db.path()).unwrap().packages.len(), 60);
    println!("{scans} consistent scans during 50 concurrent installs");
}
