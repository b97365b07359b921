//! `cargo xtask test`: the whole check suite, exactly as CI runs it.

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
    step("all checks passed");
    Ok(())
}
