//! Embeds the BPF object built by `cargo xtask build-ebpf`, when there is one.
//!
//! The object is produced by a separate nightly toolchain, so the agent does not build it
//! here: a host without nightly or bpf-linker still builds a working agent (inotify mode),
//! and `cfg(guestwatch_bpf)` tells the code whether an object was embedded.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(guestwatch_bpf)");
    println!("cargo::rerun-if-env-changed=GUESTWATCH_BPF_OBJECT");

    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let default_dir = manifest_dir.join("../target/bpf");
    // Watch the directory (created if missing) rather than a file that may not exist yet,
    // which would make cargo rerun this script on every build.
    let _ = std::fs::create_dir_all(&default_dir);
    println!("cargo::rerun-if-changed={}", default_dir.display());

    let object = std::env::var_os("GUESTWATCH_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| default_dir.join("guestwatch.bpf.o"));
    if object.is_file() {
        println!("cargo::rerun-if-changed={}", object.display());
        println!("cargo::rustc-cfg=guestwatch_bpf");
        println!(
            "cargo::rustc-env=GUESTWATCH_BPF_OBJECT_PATH={}",
            object.display()
        );
    } else {
        println!(
            "cargo::warning=no BPF object at {}: building guestwatch-agent without eBPF \
             (run `cargo xtask build-ebpf` first for a full build)",
            object.display()
        );
    }
}
