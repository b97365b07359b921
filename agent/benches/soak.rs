//! `cargo xtask bench soak`: 1,000 transactions on the watched database in eBPF mode, spaced
//! randomly 0-500 ms apart, installs and removals alternating, while another database sees
//! transactions all along. Every change must appear in a scan within 1 s of rpm's exit, listing
//! the right process (target 1,000 / 1,000), and nothing may be attributed to the other
//! database's processes (target 0). The storm limit is off here (`--max-scans-per-minute 0`):
//! it spaces scans on purpose, which is not what this measures.

#[path = "detect.rs"]
#[allow(dead_code)]
mod detect;

use detect::support::{ms, percentile};
use guestwatch_testkit::is_root;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !is_root() {
        println!("soak SKIPPED: eBPF needs root");
        return;
    }
    let packages: usize = std::env::var("GUESTWATCH_SOAK_TRANSACTIONS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(500, |n| n.div_ceil(2).max(1));
    let work = tempfile::tempdir().expect("temp dir");
    let started = std::time::Instant::now();
    let Some((o, noise)) = detect::series(
        "ebpf",
        work.path(),
        "soak",
        packages,
        (0, 500),
        &["--max-scans-per-minute", "0"],
    ) else {
        println!("soak FAILED to run (is the agent built with BPF?)");
        return;
    };
    let ok = |good: bool| if good { "ok" } else { "MISSED" };
    println!(
        "soak: {} transactions in {:.0} s, the other database {noise}",
        o.performed,
        started.elapsed().as_secs_f64()
    );
    println!(
        "  in a scan within 1 s: {} / {} {}",
        o.detected,
        o.performed,
        ok(o.detected == o.performed)
    );
    println!(
        "  listing the right process: {} / {} {}",
        o.attributed,
        o.performed,
        ok(o.attributed == o.performed)
    );
    println!(
        "  attributed to the other database: {} {}",
        o.crosstalk,
        ok(o.crosstalk == 0)
    );
    println!(
        "  rpm exit -> scan: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&o.latencies, 0.5)),
        ms(percentile(&o.latencies, 0.99)),
        ms(o.latencies.last().copied().unwrap_or_default())
    );
}
