//! guestwatch's BPF programs.
//!
//! - `tx`: `rpmtsRun` uprobe/uretprobe — transaction start and end, with attribution.
//! - `file`: syscall tracepoints — writes, truncations, renames and unlinks of files in the
//!   watched rpm database directory by processes that never entered a librpm transaction
//!   (the tamper signal).
//!
//! Everything reaches userspace through the one `EVENTS` ring buffer; record layouts live in
//! `guestwatch-agent-common`.
//!
//! On the host the crate compiles as an empty binary, so `cargo build --workspace` and clippy
//! work without the BPF toolchain; only `bpfel-unknown-none` builds produce programs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod file;
mod maps;
mod task;
mod tx;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
