//! `cargo xtask test`: the whole check suite, exactly as CI runs it: setup, the BPF object,
//! formatting, lints, every test, the agent's RPM and its contents, and the nested-guest
//! end-to-end test.

use anyhow::Result;

use crate::{
    ebpf, setup,
    util::{cargo, run, step},
};

pub fn test() -> Result<()> {
    setup::setup()?;
    ebpf::build_ebpf()?;

    step("checking formatting (cargo fmt --check)");
    run(
        cargo().args(["fmt", "--all", "--", "--check"]),
        "run `cargo fmt --all` to fix",
    )?;

    step("linting (cargo clippy --all-targets -- -D warnings)");
    run(
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "fix the lints above",
    )?;

    step("running all tests (output of tests that print, e.g. SKIPPED lines, is shown)");
    run(
        cargo().args(["test", "--workspace", "--", "--show-output"]),
        "see the failing test above",
    )?;

    // Before vm-test, which uses the same static agent: the package costs only its own step.
    crate::package::build_rpm()?;

    step("the real guest kernel end to end (cargo xtask vm-test)");
    crate::vmtest::vm_test(&crate::vmtest::Options {
        scenarios: Vec::new(),
        list: false,
        keep: false,
        verbose: false,
    })?;
    step("all checks passed");
    Ok(())
}
