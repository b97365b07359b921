//! guestwatch's BPF programs.
//!
//! `rpmts_run_enter` / `rpmts_run_exit` sit on librpm's `rpmtsRun`, the one function every rpm,
//! dnf, dnf5, microdnf and PackageKit transaction passes through. They report the start and the
//! end (with the return code) of each transaction to userspace through the `EVENTS` ring buffer,
//! and keep `IN_TX` (thread → start time) so that other programs can tell whether a task is
//! inside a librpm transaction.
//!
//! On the host the crate compiles as an empty binary, so `cargo build --workspace` and clippy
//! work without the BPF toolchain; only `bpfel-unknown-none` builds produce programs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_attach_cookie, bpf_ktime_get_boot_ns},
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use guestwatch_agent_common::{COMM_LEN, EventKind, TxEvent};

/// Set by the loader: the agent's own tgid, whose transactions are not reported.
#[unsafe(no_mangle)]
static AGENT_TGID: u32 = 0;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Threads currently inside `rpmtsRun`, keyed by pid_tgid, valued by start time.
#[map]
static IN_TX: HashMap<u64, u64> = HashMap::with_max_entries(8192, 0);

fn agent_tgid() -> u32 {
    // SAFETY: a plain read of a global the loader may have rewritten before load; volatile so
    // the compiler does not fold the initial 0 into the program.
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

fn now_ns() -> u64 {
    // SAFETY: helper without arguments, available to kprobe-type programs.
    unsafe { bpf_ktime_get_boot_ns() }
}

fn emit(kind: EventKind, cookie: u64, start_ns: u64, now: u64, ret: i32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
    let event = TxEvent {
        kind: kind as u32,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        ret,
        cookie,
        start_ns,
        now_ns: now,
        comm,
    };
    // A full ring buffer drops the event; userspace counts lost transactions through the
    // periodic and inotify safety nets rather than blocking the traced process.
    let _ = EVENTS.output::<TxEvent>(&event, 0);
}

#[uprobe]
pub fn rpmts_run_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == agent_tgid() {
        return 0;
    }
    let now = now_ns();
    let _ = IN_TX.insert(pid_tgid, now, 0);
    // SAFETY: ctx.as_ptr() is the probe's context pointer, which is what the helper expects.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    emit(EventKind::TxStart, cookie, now, now, 0);
    0
}

#[uretprobe]
pub fn rpmts_run_exit(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == agent_tgid() {
        return 0;
    }
    // SAFETY: the map value is a plain u64 copied out before the entry is removed.
    let start = unsafe { IN_TX.get(pid_tgid) }.copied().unwrap_or(0);
    let _ = IN_TX.remove(pid_tgid);
    let ret: i32 = ctx.ret();
    // SAFETY: as in rpmts_run_enter.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    emit(EventKind::TxEnd, cookie, start, now_ns(), ret);
    0
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
