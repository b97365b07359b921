//! Incremental reads give exactly what full reads give: the same packages in the same order,
//! the same gpg-pubkeys, the same errors — on the fixtures of every backend, on copies of them
//! damaged byte by byte, and over many random transactions of a real rpm database.

use std::path::{Path, PathBuf};

use guestwatch_testkit::{PackageSpec, RpmDb, build_packages, have_rpm_tools};
use rpmdb::{DbError, Incremental, ReadOptions, Records, Scan, Source};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/rpmdb")
}

/// One database of each backend, and damaged ones.
const DATABASES: &[&str] = &[
    "go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite",
    "preflight_sqlite-fedora36-tzdata/rpmdb.sqlite",
    "go-rpmdb_libuuid/Packages",
    "syft_dive-centos8/Packages",
    "preflight_bdb-ubi7-tzdata/Packages",
    "go-rpmdb_sle15-bci/Packages.db",
    "corrupt/bdb-be_from_go-rpmdb_libuuid/Packages",
    "corrupt/bdb-cyclic-overflow-chain/Packages",
    "corrupt/bdb-zeroed-overflow-page/Packages",
    "corrupt/ndb-bad-blob-checksum/Packages.db",
    "corrupt/ndb-blob-pkgidx-mismatch/Packages.db",
];

fn full(path: &Path) -> Result<Scan, DbError> {
    rpmdb::read_with(Source::Path(path), &ReadOptions::default())
}

fn incremental(path: &Path, previous: &Records) -> Result<Incremental, DbError> {
    rpmdb::read_incremental(Source::Path(path), &ReadOptions::default(), previous)
}

/// Everything a scan says, compared as a whole.
fn same(a: &Scan, b: &Scan, what: &str) {
    assert_eq!(a.backend, b.backend, "{what}: backend");
    assert_eq!(a.path, b.path, "{what}: path");
    assert_eq!(a.packages, b.packages, "{what}: packages");
    assert_eq!(a.pubkeys, b.pubkeys, "{what}: pubkeys");
    assert_eq!(a.errors, b.errors, "{what}: errors");
    assert_eq!(a.bytes_decoded, b.bytes_decoded, "{what}: bytes_decoded");
}

/// The incremental read of `path` with `previous` against the full read; returns the new
/// records.
fn check(path: &Path, previous: &Records, what: &str) -> Option<Incremental> {
    match (full(path), incremental(path, previous)) {
        (Ok(f), Ok(i)) => {
            same(&f, &i.scan, what);
            assert_eq!(
                i.reused + i.decoded,
                f.packages.len() + f.pubkeys.len(),
                "{what}: every valid header is reused or decoded"
            );
            assert!(i.records.len() <= i.reused + i.decoded, "{what}: records");
            Some(i)
        }
        (Err(f), Err(i)) => {
            assert_eq!(f.to_string(), i.to_string(), "{what}: error");
            None
        }
        (f, i) => panic!(
            "{what}: full {:?} but incremental {:?}",
            f.map(|s| s.packages.len()),
            i.map(|s| s.scan.packages.len())
        ),
    }
}

#[test]
fn fixtures_read_incrementally_as_fully() {
    for rel in DATABASES {
        let path = fixtures().join(rel);
        let first = check(&path, &Records::default(), rel).expect(rel);
        assert_eq!(first.reused, 0, "{rel}: nothing to reuse the first time");
        let second = check(&path, &first.records, rel).expect(rel);
        assert_eq!(
            second.decoded, 0,
            "{rel}: an unchanged database decodes nothing"
        );
        assert_eq!(second.reused, first.decoded, "{rel}");
        assert_eq!(second.records.len(), first.records.len(), "{rel}");
    }
}

/// Copies of the fixtures with bytes changed at random places: whatever the damage, the
/// incremental read (with the records of the intact file) reads what the full read reads.
#[test]
fn damaged_copies_read_incrementally_as_fully() {
    let mut rng = fastrand::Rng::with_seed(0x16_2000);
    let tmp = tempfile::tempdir().unwrap();
    for rel in DATABASES {
        let original = std::fs::read(fixtures().join(rel)).unwrap();
        let name = Path::new(rel).file_name().unwrap();
        let dir = tmp.path().join(rel.replace('/', "_"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, &original).unwrap();
        let Some(intact) = check(&path, &Records::default(), rel) else {
            continue;
        };
        for round in 0..25 {
            let mut data = original.clone();
            // Past the file's first page: damage to blobs and pages, not only to the magic.
            let from = 4096.min(data.len() / 2);
            for _ in 0..1 + round % 4 {
                let at = rng.usize(from..data.len());
                data[at] ^= 1 << rng.u8(0..8);
            }
            std::fs::write(&path, &data).unwrap();
            check(&path, &intact.records, &format!("{rel} round {round}"));
        }
    }
}

/// Random installs, upgrades and removals on a database written by the real rpm: after each,
/// the incremental read (with the records of the read before) equals a full read, and decodes
/// only the headers the transaction wrote.
#[test]
fn random_transactions_read_incrementally_as_fully() {
    if !have_rpm_tools() {
        eprintln!("SKIPPED: needs rpm and rpmbuild");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let db = RpmDb::at(tmp.path().join("rpmdb")).unwrap();
    const NAMES: usize = 24;
    // Two versions of each name (one rpmbuild each): installs, upgrades and downgrades.
    let version = |v: &str| {
        let specs: Vec<PackageSpec> = (0..NAMES)
            .map(|i| PackageSpec::new(format!("inc-{i:02}"), v, "1"))
            .collect();
        build_packages(&specs, &tmp.path().join(format!("rpms-{v}"))).unwrap()
    };
    let rpms = [version("1.0"), version("2.0")];
    let mut installed: Vec<Option<usize>> = vec![None; NAMES];
    let mut rng = fastrand::Rng::with_seed(16);
    let mut records = Records::default();
    let dbpath = db.path().to_path_buf();
    for step in 0..60 {
        // 1-3 names changed in one transaction.
        let mut touched: Vec<usize> = (0..rng.usize(1..=3)).map(|_| rng.usize(..NAMES)).collect();
        touched.sort_unstable();
        touched.dedup();
        let (mut erase, mut upgrade) = (Vec::new(), Vec::new());
        for &n in &touched {
            match installed[n] {
                Some(_) if rng.bool() => {
                    erase.push(format!("inc-{n:02}"));
                    installed[n] = None;
                }
                Some(v) => {
                    upgrade.push(rpms[1 - v][n].clone());
                    installed[n] = Some(1 - v);
                }
                None => {
                    let v = rng.usize(..2);
                    upgrade.push(rpms[v][n].clone());
                    installed[n] = Some(v);
                }
            }
        }
        if !erase.is_empty() {
            db.erase(&erase.iter().map(String::as_str).collect::<Vec<_>>())
                .unwrap();
        }
        if !upgrade.is_empty() {
            // -U --oldpackage: upgrades, downgrades and installs alike.
            let mut cmd = db.command(&[
                "-U",
                "--oldpackage",
                "--justdb",
                "--nodeps",
                "--nosignature",
            ]);
            cmd.args(&upgrade);
            guestwatch_testkit::run(&mut cmd).unwrap();
        }
        let what = format!("step {step}");
        let read = check(&dbpath, &records, &what).expect("the database reads");
        let count = installed.iter().flatten().count();
        assert_eq!(read.scan.packages.len(), count, "{what}");
        if step > 0 {
            // Only the new headers (an upgrade writes one, an erase none) are decoded.
            assert!(
                read.decoded <= upgrade.len(),
                "{what}: decoded {} after {} new headers",
                read.decoded,
                upgrade.len()
            );
            assert_eq!(read.reused + read.decoded, count, "{what}");
        }
        records = read.records;
    }
}
