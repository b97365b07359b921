//! `rpmtsRun` entry and return: transaction boundaries with attribution.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_comm, bpf_get_current_uid_gid, generated::bpf_get_attach_cookie},
    macros::{tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use guestwatch_agent_common::{COMM_LEN, EventKind, TxEvent};

use crate::{
    maps::{EVENTS, IN_TX, TX_TGIDS},
    task::{is_agent, now_ns, pid_tgid, tgid_of},
};

#[inline(always)]
fn emit(kind: EventKind, pid_tgid: u64, cookie: u64, start_ns: u64, now: u64, ret: i32) {
    let uid_gid = bpf_get_current_uid_gid();
    let comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
    let event = TxEvent {
        kind: kind as u32,
        tgid: tgid_of(pid_tgid),
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        ret,
        cookie,
        start_ns,
        now_ns: now,
        comm,
    };
    // A full ring buffer drops the event rather than stalling the traced process; the
    // inotify safety net and the periodic rescan still catch the change.
    let _ = EVENTS.output::<TxEvent>(&event, 0);
}

#[uprobe]
pub fn rpmts_run_enter(ctx: ProbeContext) -> u32 {
    let id = pid_tgid();
    let tgid = tgid_of(id);
    if is_agent(tgid) {
        return 0;
    }
    let now = now_ns();
    let _ = IN_TX.insert(id, now, 0);
    let _ = TX_TGIDS.insert(tgid, 1u32, 0);
    // SAFETY: ctx.as_ptr() is the probe's context pointer, which is what the helper expects.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    emit(EventKind::TxStart, id, cookie, now, now, 0);
    0
}

#[uretprobe]
pub fn rpmts_run_exit(ctx: RetProbeContext) -> u32 {
    let id = pid_tgid();
    let tgid = tgid_of(id);
    if is_agent(tgid) {
        return 0;
    }
    // SAFETY: the map value is a plain u64 copied out before the entry is removed.
    let start = unsafe { IN_TX.get(id) }.copied().unwrap_or(0);
    let _ = IN_TX.remove(id);
    let _ = TX_TGIDS.insert(tgid, 0u32, 0);
    let ret: i32 = ctx.ret();
    // SAFETY: as in rpmts_run_enter.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    emit(EventKind::TxEnd, id, cookie, start, now_ns(), ret);
    0
}

/// Forgets a process that ran transactions once its thread-group leader exits, so a later
/// process reusing the pid is not trusted by mistake.
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let id = pid_tgid();
    if id as u32 == tgid_of(id) {
        let _ = TX_TGIDS.remove(tgid_of(id));
    }
    0
}
