//! `changes::compare_evr` (rpm-rs's `rpm-version`) against the comparisons rpm's own test suite
//! asserts: every `RPMVERCMP` case of rpm's `tests/rpmvercmp.at`, and the epoch/release
//! orderings of its version-object tests (`tests/rpmmacro.at`, `tests/rpmpython.at`), as of
//! rpm's main branch of July 2026. Then the change classes those orderings give.

use std::cmp::Ordering;

use report::{
    PackageRecord,
    changes::{ChangeClass, classify, compare_evr},
};

/// `(a, b, rpm.vercmp(a, b))`, as rpm's `tests/rpmvercmp.at` lists them (the cases it keeps
/// commented out as "oddities" are left out too).
const VERCMP: &[(&str, &str, i8)] = &[
    ("1.0", "1.0", 0),
    ("1.0", "2.0", -1),
    ("2.0", "1.0", 1),
    ("2.0.1", "2.0.1", 0),
    ("2.0", "2.0.1", -1),
    ("2.0.1", "2.0", 1),
    ("2.0.1a", "2.0.1a", 0),
    ("2.0.1a", "2.0.1", 1),
    ("2.0.1", "2.0.1a", -1),
    ("5.5p1", "5.5p1", 0),
    ("5.5p1", "5.5p2", -1),
    ("5.5p2", "5.5p1", 1),
    ("5.5p10", "5.5p10", 0),
    ("5.5p1", "5.5p10", -1),
    ("5.5p10", "5.5p1", 1),
    ("10xyz", "10.1xyz", -1),
    ("10.1xyz", "10xyz", 1),
    ("xyz10", "xyz10", 0),
    ("xyz10", "xyz10.1", -1),
    ("xyz10.1", "xyz10", 1),
    ("xyz.4", "xyz.4", 0),
    ("xyz.4", "8", -1),
    ("8", "xyz.4", 1),
    ("xyz.4", "2", -1),
    ("2", "xyz.4", 1),
    ("5.5p2", "5.6p1", -1),
    ("5.6p1", "5.5p2", 1),
    ("5.6p1", "6.5p1", -1),
    ("6.5p1", "5.6p1", 1),
    ("6.0.rc1", "6.0", 1),
    ("6.0", "6.0.rc1", -1),
    ("10b2", "10a1", 1),
    ("10a2", "10b2", -1),
    ("1.0aa", "1.0aa", 0),
    ("1.0a", "1.0aa", -1),
    ("1.0aa", "1.0a", 1),
    // Leading zeros.
    ("10.0001", "10.0001", 0),
    ("10.0001", "10.1", 0),
    ("10.1", "10.0001", 0),
    ("10.0001", "10.0039", -1),
    ("10.0039", "10.0001", 1),
    ("4.999.9", "5.0", -1),
    ("5.0", "4.999.9", 1),
    ("20101121", "20101121", 0),
    ("20101121", "20101122", -1),
    ("20101122", "20101121", 1),
    // Separators.
    ("2_0", "2_0", 0),
    ("2.0", "2_0", 0),
    ("2_0", "2.0", 0),
    // RhBug:178798.
    ("a", "a", 0),
    ("a+", "a+", 0),
    ("a+", "a_", 0),
    ("a_", "a+", 0),
    ("+a", "+a", 0),
    ("+a", "_a", 0),
    ("_a", "+a", 0),
    ("+_", "+_", 0),
    ("_+", "+_", 0),
    ("_+", "_+", 0),
    ("+", "_", 0),
    ("_", "+", 0),
    // Tilde: sorts before anything, even the end of the string.
    ("1.0~rc1", "1.0~rc1", 0),
    ("1.0~rc1", "1.0", -1),
    ("1.0", "1.0~rc1", 1),
    ("1.0~rc1", "1.0~rc2", -1),
    ("1.0~rc2", "1.0~rc1", 1),
    ("1.0~rc1~git123", "1.0~rc1~git123", 0),
    ("1.0~rc1~git123", "1.0~rc1", -1),
    ("1.0~rc1", "1.0~rc1~git123", 1),
    // Caret: sorts after the end of the string, before anything else.
    ("1.0^", "1.0^", 0),
    ("1.0^", "1.0", 1),
    ("1.0", "1.0^", -1),
    ("1.0^git1", "1.0^git1", 0),
    ("1.0^git1", "1.0", 1),
    ("1.0", "1.0^git1", -1),
    ("1.0^git1", "1.0^git2", -1),
    ("1.0^git2", "1.0^git1", 1),
    ("1.0^git1", "1.01", -1),
    ("1.01", "1.0^git1", 1),
    ("1.0^20160101", "1.0^20160101", 0),
    ("1.0^20160101", "1.0.1", -1),
    ("1.0.1", "1.0^20160101", 1),
    ("1.0^20160101^git1", "1.0^20160101^git1", 0),
    ("1.0^20160102", "1.0^20160101^git1", 1),
    ("1.0^20160101^git1", "1.0^20160102", -1),
    // Tilde and caret together.
    ("1.0~rc1^git1", "1.0~rc1^git1", 0),
    ("1.0~rc1^git1", "1.0~rc1", 1),
    ("1.0~rc1", "1.0~rc1^git1", -1),
    ("1.0^git1~pre", "1.0^git1~pre", 0),
    ("1.0^git1", "1.0^git1~pre", 1),
    ("1.0^git1~pre", "1.0^git1", -1),
];

/// Whole `[epoch:]version[-release]` orderings of rpm's version-object tests.
const EVR: &[(&str, &str, i8)] = &[
    // tests/rpmmacro.at, "lua rpm version objects".
    ("1:4.16-5", "4.4-1", 1),
    ("1:4.16-5", "1:4.16-5", 0),
    // tests/rpmpython.at, "version objects 1".
    ("1.0", "1.0", 0),
    ("1.0", "4:1.0", -1),
    ("4:1.0", "1.5-1", 1),
    ("1.5-1", "3:2.0-1", -1),
    ("3:2.0-1", "3:2.0-1", 0),
    // A missing epoch is 0 (rpmverCmp).
    ("0:1.0-1", "1.0-1", 0),
];

/// A record of `[epoch:]version[-release]` (no release: empty).
fn record(evr: &str) -> PackageRecord {
    let (epoch, rest) = match evr.split_once(':') {
        Some((e, rest)) => (Some(e.parse().unwrap()), rest),
        None => (None, evr),
    };
    let (version, release) = rest.rsplit_once('-').unwrap_or((rest, ""));
    PackageRecord {
        name: "p".into(),
        epoch,
        version: version.into(),
        release: release.into(),
        arch: Some("x86_64".into()),
        ..Default::default()
    }
}

fn sign(o: Ordering) -> i8 {
    o as i8
}

/// Every case in both directions, each mismatch listed (not only the first).
fn check(what: &str, cases: &[(&str, &str, i8)], make: impl Fn(&str) -> PackageRecord) {
    let mut wrong = Vec::new();
    for &(a, b, want) in cases {
        let (ra, rb) = (make(a), make(b));
        let got = sign(compare_evr(&ra, &rb));
        let back = sign(compare_evr(&rb, &ra));
        if got != want || back != -want {
            wrong.push(format!(
                "{what} {a:?} vs {b:?}: rpm says {want}, compare_evr {got} (reversed {back})"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "disagreements with rpm:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn versions_order_as_rpmvercmp_at_says() {
    check("version", VERCMP, |v| record(&format!("{v}-1")));
}

#[test]
fn releases_order_as_rpmvercmp_at_says() {
    // Releases are compared with the same algorithm once epoch and version are equal.
    check("release", VERCMP, |r| PackageRecord {
        release: r.into(),
        ..record("1:2.0")
    });
}

#[test]
fn epochs_outrank_versions_as_rpms_version_objects_say() {
    check("evr", EVR, record);
}

/// One package going from `from` to `to`: its class.
fn class(from: &str, to: &str) -> ChangeClass {
    let changes = classify(&[record(from)], &[record(to)]);
    assert_eq!(changes.len(), 1, "{from} -> {to}: {changes:?}");
    changes[0].class
}

#[test]
fn change_classes_follow_rpms_order() {
    use ChangeClass::*;
    for (from, to, want) in [
        ("1.0~rc1-1", "1.0-1", Upgraded),
        ("1.0-1", "1.0~rc1-1", Downgraded),
        ("1.0-1", "1.0^git1-1", Upgraded),
        ("1.0^git1-1", "1.01-1", Upgraded),
        ("5.5p10-1", "5.5p2-1", Downgraded),
        ("6.0-1", "6.0.rc1-1", Upgraded),
        ("2.0-9", "1:1.0-1", Upgraded),
        ("1:1.0-1", "2.0-9", Downgraded),
        ("4.999.9-1", "5.0-1", Upgraded),
        ("2.0-1.fc40", "2.0-1.fc40.1", Upgraded),
        // Other strings, the same version in rpm's order: a reinstall.
        ("10.0001-1", "10.1-1", Reinstalled),
        ("2.0-1", "2_0-1", Reinstalled),
        ("1.0-1", "0:1.0-1", Reinstalled),
    ] {
        assert_eq!(class(from, to), want, "{from} -> {to}");
    }
    // The same EVR with other content (another install time or digest): a reinstall too.
    let was = record("1.0-1");
    let is = PackageRecord {
        sigmd5: Some("00".into()),
        ..was.clone()
    };
    let changes = classify(std::slice::from_ref(&was), &[is]);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].class, Reinstalled);
    assert_eq!(changes[0].from, changes[0].to);
    // Nothing different: nothing.
    assert!(classify(std::slice::from_ref(&was), std::slice::from_ref(&was)).is_empty());
    // New and gone.
    assert_eq!(classify(&[], std::slice::from_ref(&was))[0].class, Added);
    assert_eq!(classify(std::slice::from_ref(&was), &[])[0].class, Removed);
}

/// The cases `rpmvercmp.at` keeps commented out (not run by rpm's suite) to document rpm's
/// current, "arguably buggy" behaviour: RhBug:811992, and non-ASCII bytes counting as
/// separators. What rpm does today is what a classification in rpm's order must do.
const ODDITIES: &[(&str, &str, i8)] = &[
    ("1b.fc17", "1b.fc17", 0),
    ("1b.fc17", "1.fc17", -1),
    ("1.fc17", "1b.fc17", 1),
    ("1g.fc17", "1g.fc17", 0),
    ("1g.fc17", "1.fc17", 1),
    ("1.fc17", "1g.fc17", -1),
    ("1.1.α", "1.1.α", 0),
    ("1.1.α", "1.1.β", 0),
    ("1.1.β", "1.1.α", 0),
    ("1.1.αα", "1.1.α", 0),
    ("1.1.α", "1.1.ββ", 0),
    ("1.1.ββ", "1.1.αα", 0),
];

#[test]
fn rpms_documented_oddities_hold_too() {
    check("oddity", ODDITIES, |v| record(&format!("{v}-1")));
}
