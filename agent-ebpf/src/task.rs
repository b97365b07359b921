//! Facts about the current task.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, generated::bpf_ktime_get_boot_ns};

use crate::maps::{AGENT_TGID, TX_TGIDS};

#[inline(always)]
pub fn pid_tgid() -> u64 {
    bpf_get_current_pid_tgid()
}

#[inline(always)]
pub fn tgid_of(pid_tgid: u64) -> u32 {
    (pid_tgid >> 32) as u32
}

/// True for the agent's own process, which no program reports on.
#[inline(always)]
pub fn is_agent(tgid: u32) -> bool {
    // SAFETY: a plain read of a global the loader may have rewritten before load; volatile so
    // the compiler does not fold the initial 0 into the program.
    tgid == unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

/// True when the process has entered a librpm transaction during its life.
#[inline(always)]
pub fn ran_transaction(tgid: u32) -> bool {
    // SAFETY: only the presence of the key is used.
    unsafe { TX_TGIDS.get(tgid) }.is_some()
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments, available to every tracing program type.
    unsafe { bpf_ktime_get_boot_ns() }
}
