//! The `rpm` crate (rpm-rs) as a differential oracle for the header decoder: every header blob
//! of the fixture databases (SQLite, Berkeley DB, NDB, and the damaged ones' surviving entries)
//! and of `header-blobs/` is decoded by `rpmdb` and by `rpm`, and the fields reports use must
//! agree.
//!
//! `rpm` reads package files only, so each bare database blob is wrapped as one: a lead, an
//! empty signature header, then the blob behind the header magic. Its parser indexes the data
//! with the blob's offsets unchecked and can panic on a bad one; every call is contained with
//! `catch_unwind`.

use std::{
    cell::Cell,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    sync::Once,
};

use rpm::{IndexTag, PackageMetadata};
use rpmdb::{HeaderBlob, ReadOptions, Source};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/rpmdb")
}

/// The fields compared, as both decoders give them (`None`: the tag is absent or unusable).
#[derive(Debug, PartialEq, Eq)]
struct Fields {
    name: Option<String>,
    epoch: Option<u32>,
    version: Option<String>,
    release: Option<String>,
    arch: Option<String>,
    license: Option<String>,
    vendor: Option<String>,
    sourcerpm: Option<String>,
    size: Option<u64>,
    installtime: Option<u64>,
}

fn ours(blob: &[u8]) -> Result<Fields, String> {
    let p = rpmdb::decode_header(blob).map_err(|e| e.to_string())?;
    Ok(Fields {
        name: Some(p.name),
        epoch: p.epoch,
        version: Some(p.version),
        release: Some(p.release),
        arch: p.arch,
        license: p.license,
        vendor: p.vendor,
        sourcerpm: p.sourcerpm,
        size: p.size,
        installtime: p.installtime,
    })
}

const RPM_LEAD_MAGIC: [u8; 4] = [0xed, 0xab, 0xee, 0xdb];
const HEADER_MAGIC: [u8; 8] = [0x8e, 0xad, 0xe8, 0x01, 0, 0, 0, 0];

/// A bare database blob (index count, data length, index, data) as the metadata of a package
/// file: a 96-byte lead (magic, format 3.0, signature type 5: a header), a signature header of
/// no entries (16 bytes, already 8-aligned), then the blob behind the header magic.
fn as_package(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + 16 + 8 + blob.len());
    out.extend_from_slice(&RPM_LEAD_MAGIC);
    out.extend_from_slice(&[3, 0]); // major, minor
    out.extend_from_slice(&[0; 2 + 2 + 66 + 2]); // type, arch, name, os
    out.extend_from_slice(&5u16.to_be_bytes()); // signature type
    out.extend_from_slice(&[0; 16]); // reserved
    assert_eq!(out.len(), 96);
    out.extend_from_slice(&HEADER_MAGIC);
    out.extend_from_slice(&[0; 8]); // no entries, no data
    out.extend_from_slice(&HEADER_MAGIC);
    out.extend_from_slice(blob);
    out
}

thread_local! {
    /// Set while the oracle runs on this thread: its panics are results, not test failures,
    /// and are not printed.
    static IN_ORACLE: Cell<bool> = const { Cell::new(false) };
}

fn quiet_oracle_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_ORACLE.with(Cell::get) {
                default(info);
            }
        }));
    });
}

/// What `rpm` makes of a blob: `Err` for an error, or for a panic (contained).
fn oracle(blob: &[u8]) -> Result<Fields, String> {
    quiet_oracle_panics();
    let wrapped = as_package(blob);
    let run = || -> Result<Fields, String> {
        let m = PackageMetadata::parse(&mut wrapped.as_slice()).map_err(|e| e.to_string())?;
        let text = |r: Result<&str, rpm::Error>| r.ok().map(str::to_owned);
        Ok(Fields {
            name: text(m.get_name()),
            epoch: m.get_epoch().ok(),
            version: text(m.get_version()),
            release: text(m.get_release()),
            arch: text(m.get_arch()),
            license: text(m.get_license()),
            vendor: text(m.get_vendor()),
            sourcerpm: text(m.get_source_rpm()),
            size: m.get_installed_size().ok(),
            installtime: m
                .header
                .get_entry_data_as_u32(IndexTag::RPMTAG_INSTALLTIME)
                .ok()
                .map(u64::from),
        })
    };
    IN_ORACLE.with(|q| q.set(true));
    let outcome = catch_unwind(AssertUnwindSafe(run));
    IN_ORACLE.with(|q| q.set(false));
    outcome.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("panicked: {what}"))
    })
}

/// Every header blob `rpmdb` hands to its decoder for the database `rel`, or the read's error.
fn blobs(rel: &str) -> Result<Vec<HeaderBlob>, rpmdb::DbError> {
    let options = ReadOptions {
        keep_blobs: true,
        ..ReadOptions::default()
    };
    let scan = rpmdb::read_with(Source::Path(&fixtures().join(rel)), &options)?;
    // The copies are the blobs the scan decoded: as many as it found packages and skipped
    // undecodable blobs, in the same order.
    let decoded: Vec<rpmdb::Package> = scan
        .blobs
        .iter()
        .filter_map(|b| rpmdb::decode_header(&b.bytes).ok())
        .collect();
    let mut scanned: Vec<rpmdb::Package> = scan.packages.iter().map(|p| (**p).clone()).collect();
    scanned.extend(scan.pubkeys.iter().map(|p| (**p).clone()));
    let key = |p: &rpmdb::Package| format!("{p:?}");
    let (mut a, mut b) = (decoded, scanned);
    a.sort_by_key(key);
    b.sort_by_key(key);
    assert_eq!(
        a, b,
        "{rel}: the kept blobs are not the ones the scan decoded"
    );
    Ok(scan.blobs)
}

/// Compares both decoders on every blob our decoder accepts; returns how many were compared
/// and lists each disagreement. A blob we refuse is not compared (ours is the stricter one by
/// design), but counted.
struct Tally {
    compared: usize,
    refused: Vec<String>,
    disagreements: Vec<String>,
    /// Per field of [`Fields`], in order: how many compared blobs had a value for it.
    present: [usize; 10],
}

impl Fields {
    fn present(&self) -> [bool; 10] {
        [
            self.name.is_some(),
            self.epoch.is_some(),
            self.version.is_some(),
            self.release.is_some(),
            self.arch.is_some(),
            self.license.is_some(),
            self.vendor.is_some(),
            self.sourcerpm.is_some(),
            self.size.is_some(),
            self.installtime.is_some(),
        ]
    }
}

fn compare(what: &str, blobs: &[HeaderBlob]) -> Tally {
    let mut t = Tally {
        compared: 0,
        refused: Vec::new(),
        disagreements: Vec::new(),
        present: [0; 10],
    };
    for b in blobs {
        let Ok(mine) = ours(&b.bytes) else {
            t.refused.push(b.entry.clone());
            continue;
        };
        t.compared += 1;
        for (n, here) in t.present.iter_mut().zip(mine.present()) {
            *n += usize::from(here);
        }
        match oracle(&b.bytes) {
            Ok(theirs) if theirs == mine => {}
            Ok(theirs) => t.disagreements.push(format!(
                "{what} {}: rpmdb {mine:?}\n    rpm {theirs:?}",
                b.entry
            )),
            Err(e) => t.disagreements.push(format!(
                "{what} {}: rpmdb decodes it ({} {}), rpm fails: {e}",
                b.entry,
                mine.name.as_deref().unwrap_or_default(),
                mine.version.as_deref().unwrap_or_default()
            )),
        }
    }
    t
}

/// The real databases with packages, and how many header blobs each holds (pubkeys included).
const DATABASES: &[(&str, usize)] = &[
    ("go-rpmdb_sle15-bci/Packages.db", 35),
    ("go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite", 129),
    ("go-rpmdb_libuuid/Packages", 1),
    ("scalibr_Packages_epoch/Packages_epoch", 1),
    ("syft_dive-centos8/Packages", 1),
    ("preflight_bdb-ubi7-tzdata/Packages", 1),
    ("preflight_sqlite-fedora36-tzdata/rpmdb.sqlite", 1),
];

#[test]
fn every_blob_of_the_real_databases_decodes_alike() {
    let mut report = Vec::new();
    let mut present = [0; 10];
    for &(rel, want) in DATABASES {
        let blobs = blobs(rel).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let t = compare(rel, &blobs);
        assert!(t.compared > 0, "{rel}: no blob compared");
        assert!(t.refused.is_empty(), "{rel}: rpmdb refuses {:?}", t.refused);
        assert_eq!(t.compared, want, "{rel}: blobs compared");
        report.extend(t.disagreements);
        for (all, here) in present.iter_mut().zip(t.present) {
            *all += here;
        }
        eprintln!("{rel}: {} blobs compared", t.compared);
    }
    assert!(
        report.is_empty(),
        "rpmdb and rpm disagree:\n{}",
        report.join("\n")
    );
    // Every field was compared on real values somewhere, not only as absent on both sides.
    assert!(
        present.iter().all(|&n| n > 0),
        "fields with a value: {present:?}"
    );
    eprintln!(
        "fields with a value (name, epoch, version, release, arch, license, vendor, sourcerpm, size, installtime): {present:?}"
    );
}

#[test]
fn the_bare_header_blobs_decode_alike() {
    for rel in [
        "header-blobs/go-rpmdb_blob-bin/blob.bin",
        "header-blobs/claircore_package-header/package.header",
    ] {
        let bytes = std::fs::read(fixtures().join(rel)).unwrap();
        let blob = HeaderBlob {
            entry: "file".into(),
            bytes,
        };
        let t = compare(rel, std::slice::from_ref(&blob));
        assert_eq!((t.compared, t.refused.len()), (1, 0), "{rel}");
        assert!(t.disagreements.is_empty(), "{}", t.disagreements.join("\n"));
    }
}

/// Every fixture directory holding a database is either in [`DATABASES`] or one the peers
/// expect to fail or to be empty, so a fixture added later is not silently left out.
#[test]
fn no_fixture_database_is_left_out() {
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if !dir.is_dir() || name == "corrupt" || name == "header-blobs" {
            continue;
        }
        if DATABASES
            .iter()
            .any(|(rel, _)| rel.starts_with(&format!("{name}/")))
        {
            continue;
        }
        match blobs(&name) {
            Err(_) => {}
            Ok(found) => assert!(
                found.is_empty(),
                "{name}: {} blobs not compared",
                found.len()
            ),
        }
    }
}

/// The damaged databases: whatever entries survive the storage checks and decode must decode
/// alike; refusals are ours to make (rpm's parser is not the stricter one).
#[test]
fn the_surviving_blobs_of_damaged_databases_decode_alike() {
    let mut report = Vec::new();
    let mut compared = 0;
    for entry in std::fs::read_dir(fixtures().join("corrupt")).unwrap() {
        let dir = entry.unwrap().path();
        let rel = format!("corrupt/{}", dir.file_name().unwrap().to_string_lossy());
        let Ok(blobs) = blobs(&rel) else { continue };
        let t = compare(&rel, &blobs);
        eprintln!(
            "{rel}: {} blobs compared, {} refused by rpmdb",
            t.compared,
            t.refused.len()
        );
        compared += t.compared;
        report.extend(t.disagreements);
    }
    assert!(compared > 0, "no surviving blob compared");
    assert!(
        report.is_empty(),
        "rpmdb and rpm disagree:\n{}",
        report.join("\n")
    );
}

/// The reason for the decoder of our own: an entry offset past the data is refused by ours with
/// an error and, here, contained in rpm's.
#[test]
fn a_bad_offset_is_an_error_for_us_and_contained_for_the_oracle() {
    let bytes = std::fs::read(fixtures().join("header-blobs/go-rpmdb_blob-bin/blob.bin")).unwrap();
    assert!(ours(&bytes).is_ok() && oracle(&bytes).is_ok());
    let il = u32::from_be_bytes(bytes[0..4].try_into().unwrap()) as usize;
    let mut outcomes = Vec::new();
    for i in 0..il {
        for offset in [0x7fff_fff0u32, 0xffff_fff0] {
            let mut bad = bytes.clone();
            let at = 8 + 16 * i + 8;
            bad[at..at + 4].copy_from_slice(&offset.to_be_bytes());
            assert!(
                ours(&bad).is_err(),
                "entry {i} at offset {offset:#x} accepted"
            );
            outcomes.push(oracle(&bad));
        }
    }
    // rpm does not check offsets when it parses: at least one of these reaches a slice index.
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Err(e) if e.starts_with("panicked"))),
        "{outcomes:?}"
    );
}
