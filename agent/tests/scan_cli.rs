//! `guestwatch-agent scan` as a process: every format on a complete root built here (the
//! CBL-Mariner 2.0 database from go-rpmdb's tests, an os-release, claircore's dnf4 history).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use tempfile::TempDir;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/rpmdb")
}

fn agent(args: &[&str], path_args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guestwatch-agent"))
        .args(args)
        .args(path_args)
        .output()
        .unwrap()
}

fn root() -> TempDir {
    let dir = TempDir::new().unwrap();
    let r = dir.path();
    for d in ["usr/lib/sysimage/rpm", "var/lib/dnf", "etc"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy(
        fixtures().join("go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite"),
        r.join("usr/lib/sysimage/rpm/rpmdb.sqlite"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("claircore_dnf4-history/history.sqlite"),
        r.join("var/lib/dnf/history.sqlite"),
    )
    .unwrap();
    std::fs::write(
        r.join("etc/os-release"),
        "ID=mariner\nVERSION_ID=\"2.0\"\nPRETTY_NAME=\"CBL-Mariner/Linux\"\n",
    )
    .unwrap();
    std::fs::write(
        r.join("etc/system-release-cpe"),
        "cpe:/o:microsoft:mariner:2.0\n",
    )
    .unwrap();
    dir
}

fn ok(out: &Output) -> &[u8] {
    assert!(
        out.status.success(),
        "scan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

#[test]
fn claircore_scan_of_a_root_is_byte_identical_twice() {
    let root = root();
    let first = agent(&["scan", "--format", "claircore", "--root"], &[root.path()]);
    let second = agent(&["scan", "--format", "claircore", "--root"], &[root.path()]);
    assert_eq!(ok(&first), ok(&second));
    let doc: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(doc["packages"].as_object().unwrap().len(), 129);
    let dist = doc["distributions"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    assert_eq!(dist["cpe"], "cpe:/o:microsoft:mariner:2.0");
    assert_eq!(
        doc["guestwatch"]["database"],
        "/usr/lib/sysimage/rpm/rpmdb.sqlite"
    );
    assert_eq!(doc["guestwatch"]["detector"], "none");
    assert!(doc["guestwatch"].get("scan_duration_ms").is_none());
}

#[test]
fn every_format_from_root_and_dbpath() {
    let root = root();
    let lines = agent(&["scan", "--format", "packages", "--root"], &[root.path()]);
    let lines: Vec<Value> = String::from_utf8(ok(&lines).to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 129);
    let curl = lines.iter().find(|p| p["name"] == "curl").unwrap();
    assert_eq!(curl["sourcerpm"], "curl-7.76.0-6.cm2.src.rpm");
    assert_eq!(curl["epoch"], Value::Null);

    let bom = agent(&["scan", "--format", "cyclonedx", "--root"], &[root.path()]);
    let bom: Value = serde_json::from_slice(ok(&bom)).unwrap();
    assert_eq!(bom["specVersion"], "1.6");
    assert_eq!(bom["components"].as_array().unwrap().len(), 129);
    assert!(
        bom["components"].as_array().unwrap().iter().any(
            |c| c["purl"] == "pkg:rpm/mariner/curl@7.76.0-6.cm2?arch=x86_64&distro=mariner-2.0"
        )
    );

    // A database scanned directly has no root: no distribution, no repositories, no error.
    let db = root.path().join("usr/lib/sysimage/rpm");
    let direct = agent(&["scan", "--format", "claircore", "--dbpath"], &[&db]);
    let direct: Value = serde_json::from_slice(ok(&direct)).unwrap();
    assert_eq!(direct["packages"].as_object().unwrap().len(), 129);
    assert!(direct["distributions"].as_object().unwrap().is_empty());
    assert_eq!(direct["guestwatch"]["errors"], serde_json::json!([]));
}

#[test]
fn only_an_unreadable_rpm_database_is_fatal() {
    let root = root();
    std::fs::write(
        root.path().join("usr/lib/sysimage/rpm/rpmdb.sqlite"),
        b"CORRUPT\n",
    )
    .unwrap();
    let out = agent(&["scan", "--root"], &[root.path()]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no partial report on stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown format"), "{stderr}");
}

#[test]
fn a_database_symlink_escaping_the_root_is_not_followed_out() {
    // A real database outside the root, and a root whose rpm directory climbs out to it.
    let outside = root();
    let root = TempDir::new().unwrap();
    std::fs::create_dir_all(root.path().join("usr/lib/sysimage")).unwrap();
    let climb = "../".repeat(root.path().components().count() + 3);
    let target = format!(
        "{climb}{}",
        outside
            .path()
            .join("usr/lib/sysimage/rpm")
            .strip_prefix("/")
            .unwrap()
            .display()
    );
    std::os::unix::fs::symlink(&target, root.path().join("usr/lib/sysimage/rpm")).unwrap();
    let out = agent(&["scan", "--root"], &[root.path()]);
    assert!(
        !out.status.success(),
        "read a database outside the root through {target}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no rpm database found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
