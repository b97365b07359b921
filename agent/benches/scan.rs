//! `cargo xtask bench scan`: `guestwatch-agent scan --format packages` against `rpm -qa --qf`
//! with the same fields, as whole processes in the same run, on a 2,000-package SQLite database
//! written by Debian's rpm. Prints median times, the ratio, and each side's peak RSS beside the
//! database's size. Targets: at least as fast as rpm (goal 2x), peak memory under 2x the database.
//!
//! Then full against incremental scans in the agent's process, at 2,000 and 10,000 packages:
//! the database read alone (`rpmdb::read_with` against `rpmdb::read_incremental` with the
//! records of the read before one package was installed) and the agent's whole scan (read,
//! report document, content hash), with the ratio. The databases are generated once and kept
//! under the target directory.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use guestwatch_agent::{
    config::TargetSpec,
    scan::{ScanMode, SystemScanner},
};
use guestwatch_testkit::{PackageSpec, RpmDb, build_packages, generated_db, generated_specs};

const RUNS: usize = 15;
const QUERY: &str = "%{NAME}|%{EPOCH}|%{VERSION}|%{RELEASE}|%{ARCH}|%{SOURCERPM}|%{LICENSE}|%{VENDOR}|%{SIZE}|\
%{INSTALLTIME}|%{SIGMD5}|%{SUMMARY}|%{MODULARITYLABEL}|%{FILEDIGESTALGO}|%{RSAHEADER:pgpsig}|%{SIGPGP:pgpsig}|\
[%{PROVIDENAME},]|[%{REQUIRENAME},]\n";

/// Runs a command to completion; returns its wall time and peak RSS in KiB.
fn measure(cmd: &mut Command) -> (Duration, u64) {
    let started = Instant::now();
    // Reaped by wait4 below (which also gives its resource usage), not by Child::wait.
    #[allow(clippy::zombie_processes)]
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for the child we just spawned; the pointers are valid for the call.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let took = started.elapsed();
    assert!(
        rc > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "command failed: {cmd:?}"
    );
    (took, usage.ru_maxrss as u64)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs of each incremental measurement (one package installed before each).
const CHANGES: usize = 15;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Full against incremental reads and scans of a generated `count`-package database.
fn incremental(count: usize, work: &Path) {
    let db = generated_db("bench", count, &work.join(format!("db-{count}"))).expect("database");
    let specs: Vec<PackageSpec> = (0..CHANGES)
        .map(|i| PackageSpec::new(format!("bench-change-{i:02}"), "1.0", "1"))
        .collect();
    let rpms = build_packages(&specs, &work.join(format!("changes-{count}"))).expect("rpmbuild");
    let source = rpmdb::Source::Path(db.path());
    let options = rpmdb::ReadOptions::default();
    let target = TargetSpec::DbPath(db.path().to_path_buf());
    let mut scanner = SystemScanner::new(target);
    let deadline = || Instant::now() + rpmdb::DEFAULT_TIMEOUT;
    let (mut read_full, mut scan_full) = (Vec::new(), Vec::new());
    for run in 0..=RUNS {
        let started = Instant::now();
        let scan = rpmdb::read_with(source, &options).expect("read");
        let took = started.elapsed();
        assert_eq!(scan.packages.len(), count);
        let started = Instant::now();
        scanner.scan_with(ScanMode::Full, deadline()).expect("scan");
        if run > 0 {
            read_full.push(took);
            scan_full.push(started.elapsed());
        }
    }
    let mut records = rpmdb::read_incremental(source, &options, &rpmdb::Records::default())
        .expect("read")
        .records;
    let (mut read_incr, mut scan_incr) = (Vec::new(), Vec::new());
    let (mut decoded, mut reused) = (0, 0);
    let mut previous = scanner
        .scan_with(ScanMode::Incremental, deadline())
        .expect("scan");
    // What `run` does with each changed scan today, step by step.
    let mut steps: [Vec<Duration>; 4] = Default::default();
    for rpm in &rpms {
        db.install(std::slice::from_ref(rpm)).expect("install");
        let started = Instant::now();
        let read = rpmdb::read_incremental(source, &options, &records).expect("read");
        read_incr.push(started.elapsed());
        (decoded, reused) = (read.decoded, read.reused);
        assert_eq!(decoded, 1, "one new header");
        records = read.records;
        let started = Instant::now();
        let snapshot = scanner
            .scan_with(ScanMode::Incremental, deadline())
            .expect("scan");
        scan_incr.push(started.elapsed());
        assert_eq!(snapshot.decoding.decoded, 1, "one new header");
        let timed = |f: &mut dyn FnMut()| {
            let started = Instant::now();
            f();
            started.elapsed()
        };
        let (old, new) = (&previous.document, &snapshot.document);
        steps[0].push(timed(&mut || {
            std::hint::black_box(report::changes::between(&old.packages, &new.packages));
        }));
        steps[1].push(timed(&mut || {
            std::hint::black_box(new.clone());
        }));
        steps[2].push(timed(&mut || {
            std::hint::black_box(new.content_hash());
        }));
        steps[3].push(timed(&mut || {
            std::hint::black_box(guestwatch_protocol::Payload::of_document(new));
        }));
        previous = snapshot;
    }
    let rows = [
        ("rpmdb read", median(read_full), median(read_incr)),
        (
            "agent scan (read + document + content hash)",
            median(scan_full),
            median(scan_incr),
        ),
    ];
    for (what, full, incr) in rows {
        println!(
            "{:<14} {:<44} {:>8.1}ms {:>12.1}ms {:>7.1}x",
            format!("{count} packages"),
            what,
            ms(full),
            ms(incr),
            full.as_secs_f64() / incr.as_secs_f64()
        );
    }
    println!(
        "{:<14} (incremental: {decoded} header decoded, {reused} reused, after each of {CHANGES} one-package installs)",
        ""
    );
    let [between, clone, hash, payload] = steps.map(median);
    println!(
        "{:<14} after the scan, building the report today: changes {:.1}ms, document copy {:.1}ms, content hash {:.1}ms, encoding + zstd {:.1}ms",
        "",
        ms(between),
        ms(clone),
        ms(hash),
        ms(payload)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let work = tempfile::tempdir().expect("temp dir");
    let db = RpmDb::at(work.path().join("rpmdb")).expect("rpm database");
    let rpms = build_packages(&generated_specs("bench", 2000), &work.path().join("rpms"))
        .expect("rpmbuild");
    db.install(&rpms).expect("install");
    let db_file = db.path().join("rpmdb.sqlite");
    let db_bytes = std::fs::metadata(&db_file).map(|m| m.len()).unwrap_or(0);
    let agent = Path::new(env!("CARGO_BIN_EXE_guestwatch-agent"));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut our_rss, mut their_rss) = (0, 0);
    // Interleaved, after one warm-up each, so both see the same page cache.
    for run in 0..=RUNS {
        let (t, rss) = measure(
            Command::new(agent)
                .args(["scan", "--format", "packages", "--dbpath"])
                .arg(db.path()),
        );
        let (u, rpm_rss) = measure(&mut db.command(&["-qa", "--qf", QUERY]));
        if run > 0 {
            ours.push(t);
            theirs.push(u);
            our_rss = our_rss.max(rss);
            their_rss = their_rss.max(rpm_rss);
        }
    }
    let (ours, theirs) = (median(ours), median(theirs));
    // What the process costs before it reads anything (binary, runtime): the same for both.
    let (_, agent_idle) = measure(Command::new(agent).arg("--version"));
    let (_, rpm_idle) = measure(Command::new("rpm").arg("--version"));
    println!(
        "scan of a 2,000-package rpmdb.sqlite ({:.1} MiB), median of {RUNS} runs each",
        db_bytes as f64 / 1048576.0
    );
    println!(
        "{:<44} {:>10} {:>12} {:>16}",
        "", "time", "peak RSS", "above --version"
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{:<44} {:>8.1}ms {:>8.1} MiB {:>12.1} MiB",
        "guestwatch-agent scan --format packages",
        ours.as_secs_f64() * 1e3,
        mib(our_rss),
        mib(our_rss.saturating_sub(agent_idle))
    );
    println!(
        "{:<44} {:>8.1}ms {:>8.1} MiB {:>12.1} MiB",
        "rpm -qa --qf <same fields>",
        theirs.as_secs_f64() * 1e3,
        mib(their_rss),
        mib(their_rss.saturating_sub(rpm_idle))
    );
    let ratio = theirs.as_secs_f64() / ours.as_secs_f64();
    println!(
        "speed-up vs rpm -qa: {ratio:.1}x (target >= 1x, goal 2x) {}",
        if ratio >= 1.0 { "ok" } else { "MISSED" }
    );
    // Memory the scan itself takes: peak RSS above the same binary doing nothing.
    let mem = (our_rss.saturating_sub(agent_idle) * 1024) as f64 / db_bytes.max(1) as f64;
    println!(
        "scan memory (peak RSS above the idle binary) / database size: {mem:.2} (target < 2) {}",
        if mem < 2.0 { "ok" } else { "MISSED" }
    );
    println!();
    println!(
        "full vs incremental scan in process (median of {RUNS} full, {CHANGES} incremental after a one-package install)"
    );
    println!(
        "{:<14} {:<44} {:>10} {:>14} {:>8}",
        "", "", "full", "incremental", "ratio"
    );
    for count in [2000, 10_000] {
        incremental(count, work.path());
    }
}
