//! `cargo xtask bench wire`: what a report costs on the wire, per encoding option, for the real
//! fixture databases (`../shared/fixtures/rpmdb`) and a generated 2,000-package system.
//!
//! For each: full-report payload bytes per package as version 1 sent it (claircore JSON, zstd
//! only above 64 KiB: the peer), as claircore JSON at zstd 19, and as the compact document raw,
//! at zstd 3, at zstd 19, at zstd 19 with the shipped dictionary, and the same with the raw
//! header digests in a zstd block of their own (what version 2 sends).
//! Then the whole frame of a full report beside the frame of a delta report for a one-package
//! change (target ≤ 1 KiB), both with the facts a dnf transaction's report carries.
//!
//! On the fixtures the change is made to the document (one package upgraded: new version,
//! release, digest, install time); on the generated system it is a real `rpm -U`.

use std::path::{Path, PathBuf};

use guestwatch_protocol::{
    Ancestor, Attribution, ChangeCounts, ContentHash, Evidence, Message, Payload, Report,
    ReportBody, ReportFacts, ReportId, Timestamp, Trigger, TriggerKind, dictionary, frame,
    inventory::Document,
};
use guestwatch_testkit::{PackageSpec, RpmDb, build_packages, generated_specs, have_rpm_tools};
use report::{Facts, SystemInfo, claircore, inventory};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/rpmdb")
}

/// The document of the database at `dir`, as the agent's scanner makes it for a guest whose
/// database this is (at `/var/lib/rpm`, named as a guest's is, not by the bench's path).
fn document(dir: &Path) -> Option<Document> {
    let scan = rpmdb::read_with(rpmdb::Source::Path(dir), &rpmdb::ReadOptions::default()).ok()?;
    let system = SystemInfo::none();
    let file = scan.path.file_name()?.to_string_lossy().into_owned();
    Some(inventory::document(
        &inventory::Scanned {
            scan: &scan,
            system: &system,
            package_db: format!("{}:var/lib/rpm", scan.backend.as_str()),
            database: format!("/var/lib/rpm/{file}"),
            scan_duration_ms: Some(12),
        },
        Default::default(),
    ))
}

/// What a report of a `dnf upgrade` run from a login shell carries beside its packages.
fn dnf_facts(doc: &Document, changes: ChangeCounts) -> ReportFacts {
    let attribution = Attribution {
        pid: 48_213,
        tid: 48_213,
        comm: "dnf".into(),
        exe: Some("/usr/bin/python3.9".into()),
        return_code: Some(0),
        started_at: Some(Timestamp(1_764_619_200_000_000_000)),
        ended_at: Some(Timestamp(1_764_619_203_500_000_000)),
        loginuid: Some(1000),
        sessionid: Some(7),
        tty: Some("pts/0".into()),
        cmdline: ["/usr/bin/dnf", "-y", "upgrade", "bash"]
            .map(String::from)
            .to_vec(),
        ancestors: vec![
            Ancestor {
                pid: 48_200,
                comm: "sudo".into(),
                exe: Some("/usr/bin/sudo".into()),
            },
            Ancestor {
                pid: 41_002,
                comm: "bash".into(),
                exe: Some("/usr/bin/bash".into()),
            },
        ],
        unit: Some("session-7.scope".into()),
        database: Some("/var/lib/rpm/rpmdb.sqlite".into()),
        library: Some("/usr/lib64/librpm.so.9".into()),
        evidence: Some(Evidence::Syscall),
        ..Attribution::default()
    };
    ReportFacts {
        trigger: Trigger::new(TriggerKind::Transaction)
            .at(Timestamp(1_764_619_203_500_000_000))
            .with_attribution(attribution.clone()),
        transactions: vec![attribution],
        coalesced: vec![(TriggerKind::Transaction, 1)],
        scanned_at: Timestamp(1_764_619_203_510_000_000),
        package_count: doc.packages.len() as u32,
        changes,
        agent_version: "0.1.0".into(),
        detector: "ebpf".into(),
        ..ReportFacts::default()
    }
}

fn frame_len(body: ReportBody, content_hash: ContentHash, facts: ReportFacts) -> usize {
    let report = Report {
        id: ReportId {
            epoch: 0x6a1f_33c0_9d2e_b104,
            generation: 42,
        },
        content_hash,
        facts,
        body,
    };
    frame::encode(2, &Message::Report(Box::new(report)), u32::MAX).map_or(0, |f| f.len())
}

/// One package of `doc` upgraded, as a dnf transaction leaves it.
fn upgraded_one(doc: &Document) -> Document {
    let mut packages = doc.packages.clone();
    let middle = packages.len() / 2;
    if let Some(p) = packages.get_mut(middle) {
        p.release = format!("{}.1", p.release);
        p.sigmd5 = Some("5f0c6a3a8d1b4e27c9f03b6d2e8a7c41".into());
        p.installtime = p.installtime.map(|t| t + 86_400 * 30);
        p.size = p.size.map(|s| s + 4096);
    }
    Document::new(packages, doc.system.clone())
}

struct Row {
    name: String,
    packages: usize,
    options: Vec<(&'static str, usize)>,
    full_frame: usize,
    change_frame: usize,
}

fn measure(name: &str, base: &Document, changed: &Document) -> Row {
    let n = base.packages.len();
    let facts = Facts::of_document("0.1.0", base);
    let json = serde_json::to_vec(&claircore::render(base, &facts)).unwrap_or_default();
    let raw = base.to_bytes();
    let zstd = |bytes: &[u8], level| zstd::bulk::compress(bytes, level).map_or(0, |c| c.len());
    let with_dict = Payload::document(raw.clone());
    let split = Payload::of_document(base);
    let options = vec![
        ("v1 JSON (peer)", Payload::json(json.clone()).bytes.len()),
        ("JSON z19", zstd(&json, 19)),
        ("doc raw", raw.len()),
        ("doc z3", zstd(&raw, 3)),
        ("doc z19", zstd(&raw, 19)),
        ("doc z19+dict", with_dict.bytes.len()),
        ("+split blocks", split.bytes.len()),
    ];
    let summary = report::changes::between(&base.packages, &changed.packages);
    let counts = ChangeCounts {
        added: summary.added.len() as u32,
        removed: summary.removed.len() as u32,
        upgraded: summary.upgraded.len() as u32,
        downgraded: summary.downgraded.len() as u32,
        reinstalled: summary.reinstalled.len() as u32,
    };
    let mut changed = changed.clone();
    changed.system.changes = summary;
    let full_frame = frame_len(
        ReportBody::Full(Payload::of_document(&changed)),
        changed.content_hash(),
        dnf_facts(&changed, counts),
    );
    let delta = changed.delta_from(&base.packages);
    let change_frame = frame_len(
        ReportBody::Delta {
            base: ReportId {
                epoch: 0x6a1f_33c0_9d2e_b104,
                generation: 41,
            },
            base_hash: base.content_hash(),
            payload: Payload::document(delta.to_bytes()),
        },
        changed.content_hash(),
        dnf_facts(&changed, counts),
    );
    Row {
        name: name.to_owned(),
        packages: n,
        options,
        full_frame,
        change_frame,
    }
}

/// A 2,000-package database and the same after a real `rpm -U` of one package.
fn generated(work: &Path) -> Option<(Document, Document)> {
    if !have_rpm_tools() {
        println!("wire: the generated system SKIPPED: rpm/rpmbuild are not installed");
        return None;
    }
    let db = RpmDb::at(work.join("rpmdb")).ok()?;
    let specs = generated_specs("wire", 2000);
    db.install(&build_packages(&specs, &work.join("rpms")).ok()?)
        .ok()?;
    let before = document(db.path())?;
    let next = PackageSpec::new(&specs[1000].name, "9.9.9", "1.gw");
    db.upgrade(&build_packages(&[next], &work.join("next")).ok()?)
        .ok()?;
    let after = document(db.path())?;
    Some((before, after))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut rows = Vec::new();
    for (name, dir) in [
        ("SLE 15 BCI (ndb)", "go-rpmdb_sle15-bci"),
        ("CBL-Mariner 2.0 (sqlite)", "go-rpmdb_cbl-mariner-2.0"),
        ("libuuid (bdb)", "go-rpmdb_libuuid"),
        (
            "Fedora 36 tzdata (sqlite)",
            "preflight_sqlite-fedora36-tzdata",
        ),
        ("CentOS 8 tzdata (bdb)", "syft_dive-centos8"),
    ] {
        match document(&fixtures().join(dir)) {
            Some(doc) => rows.push(measure(name, &doc, &upgraded_one(&doc))),
            None => println!("wire: {name} could not be read"),
        }
    }
    let work = tempfile::tempdir().expect("temp dir");
    if let Some((before, after)) = generated(work.path()) {
        rows.push(measure("generated (sqlite)", &before, &after));
    }

    println!(
        "wire: full-report payload, bytes per package (dictionary {} bytes, id {})",
        dictionary::BYTES.len(),
        dictionary::ID
    );
    let Some(first) = rows.first() else {
        return;
    };
    print!("  {:<27} {:>5}", "database", "pkgs");
    for (option, _) in &first.options {
        print!(" {option:>14}");
    }
    println!(" {:>8}", "vs peer");
    for r in &rows {
        print!("  {:<27} {:>5}", r.name, r.packages);
        let per = |bytes: usize| bytes as f64 / r.packages.max(1) as f64;
        for (_, bytes) in &r.options {
            print!(" {:>14.1}", per(*bytes));
        }
        let peer = r.options.first().map_or(0, |o| o.1);
        let kept = r.options.last().map_or(0, |o| o.1);
        println!(" {:>7.1}x", peer as f64 / kept.max(1) as f64);
    }
    println!("wire: one package upgraded, whole frames (facts of a dnf transaction included)");
    println!(
        "  {:<27} {:>5} {:>12} {:>14} {:>9} {:>6}",
        "database", "pkgs", "full frame", "change frame", "ratio", "≤1 KiB"
    );
    for r in &rows {
        println!(
            "  {:<27} {:>5} {:>12} {:>14} {:>8.1}x {:>6}",
            r.name,
            r.packages,
            r.full_frame,
            r.change_frame,
            r.full_frame as f64 / r.change_frame.max(1) as f64,
            if r.change_frame <= 1024 { "ok" } else { "OVER" }
        );
    }
}
