//! `cargo xtask bench e2e`: change-to-delivery latency — from rpm's exit to the relay's sink
//! holding the new report — over 35 real transactions, for the eBPF and inotify detectors,
//! printed beside StackRox's published target for VM scanning (about 5 minutes).
//! Target: p50 under 150 ms with eBPF.

use std::time::{Duration, Instant};

use guestwatch_tests::{Agent, PackageSpec, Relay, RpmDb, build_packages, testkit};

const RUNS: usize = 35;
/// StackRox's published delivery target for VM index reports.
const STACKROX_TARGET: Duration = Duration::from_secs(5 * 60);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[(((sorted.len() as f64) - 1.0) * p).round() as usize]
}

fn run(detector: &str) -> Option<Vec<Duration>> {
    let work = tempfile::tempdir().ok()?;
    let db = RpmDb::at(work.path().join("rpmdb")).ok()?;
    db.install(
        &build_packages(
            &testkit::generated_specs("e2e-base", 200),
            &work.path().join("rpms"),
        )
        .ok()?,
    )
    .ok()?;
    let specs: Vec<PackageSpec> = (0..RUNS)
        .map(|i| PackageSpec::new(format!("e2e-lat-{i:02}"), "1.0", "1"))
        .collect();
    let rpms = build_packages(&specs, &work.path().join("rpms")).ok()?;
    let relay = Relay::start(work.path(), &["vm1"], None, &[]);
    let _agent = Agent::start(
        work.path(),
        "vm1",
        db.path(),
        &relay.socket("vm1"),
        &["--detector", detector],
    );
    let id_file = relay.sink_dir().join("vms/vm1/latest.id");
    let read_id = || std::fs::read_to_string(&id_file).ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_id().is_none() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut latencies = Vec::with_capacity(RUNS);
    for rpm in &rpms {
        let before = read_id();
        db.install(std::slice::from_ref(rpm)).ok()?;
        let exited = Instant::now();
        let deadline = exited + Duration::from_secs(30);
        while read_id() == before {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        latencies.push(exited.elapsed());
        std::thread::sleep(Duration::from_millis(1100));
    }
    latencies.sort();
    Some(latencies)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "change-to-delivery latency (rpm exit -> report in the relay's dir sink), {RUNS} transactions, 200-package system"
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>22}",
        "detector", "p50", "p99", "max", "vs StackRox (~5 min)"
    );
    for detector in ["ebpf", "inotify"] {
        if detector == "ebpf" && !testkit::is_root() {
            println!("{detector:<10} SKIPPED: needs root");
            continue;
        }
        match run(detector) {
            Some(l) => {
                let (p50, p99) = (percentile(&l, 0.5), percentile(&l, 0.99));
                println!(
                    "{detector:<10} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>20.0}x faster{}",
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3,
                    l[l.len() - 1].as_secs_f64() * 1e3,
                    STACKROX_TARGET.as_secs_f64() / p50.as_secs_f64(),
                    if detector == "ebpf" {
                        if p50 < Duration::from_millis(150) {
                            "   (target < 150 ms: ok)"
                        } else {
                            "   (target < 150 ms: MISSED)"
                        }
                    } else {
                        ""
                    }
                );
            }
            None => println!("{detector:<10} FAILED to measure"),
        }
    }
}
