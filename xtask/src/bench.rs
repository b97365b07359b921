//! `cargo xtask bench [NAME…]`: run the `cargo bench` targets (harness = false) of the workspace.
//! Each benchmark measures guestwatch against a peer in the same run and prints the ratio.

use anyhow::Result;

use crate::{
    ebpf, setup,
    util::{cargo, run, step},
};

pub fn bench(names: &[String]) -> Result<()> {
    setup::setup()?;
    ebpf::build_ebpf()?;
    let mut cmd = cargo();
    cmd.args(["bench", "--workspace"]);
    for name in names {
        cmd.args(["--bench", name]);
    }
    step(&format!(
        "running benchmarks: {}",
        if names.is_empty() {
            "all".to_owned()
        } else {
            names.join(", ")
        }
    ));
    run(&mut cmd, "see the benchmark output above")
}
