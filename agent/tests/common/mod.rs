//! Helpers shared by the agent's integration tests.
#![allow(dead_code)]

use guestwatch_agent::bpf;
use guestwatch_testkit::{in_ci, is_root};

/// Returns false (after printing why) when this environment cannot run BPF tests. In CI a
/// missing prerequisite is a failure, never a skip; only a kernel refusal may skip (callers
/// check that separately).
pub fn bpf_prerequisites() -> bool {
    let missing = if !bpf::built_with_bpf() {
        Some("the agent was built without the BPF object (cargo xtask build-ebpf)")
    } else if !is_root() {
        Some("BPF tests need root")
    } else if !guestwatch_testkit::have_rpm_tools() {
        Some("rpm/rpmbuild are not installed (cargo xtask setup)")
    } else {
        None
    };
    match missing {
        Some(why) if in_ci() => panic!("CI must run the BPF tests, but {why}"),
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
        None => true,
    }
}

/// Same for tests that only need rpm and rpmbuild.
pub fn rpm_prerequisites() -> bool {
    if guestwatch_testkit::have_rpm_tools() {
        return true;
    }
    if in_ci() {
        panic!("CI must run the rpm tests, but rpm/rpmbuild are not installed");
    }
    eprintln!("SKIPPED: rpm/rpmbuild are not installed (cargo xtask setup)");
    false
}
