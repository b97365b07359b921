//! `rpmtsRun` entry and return: transaction boundaries with attribution, and the end of
//! transactions whose thread died inside `rpmtsRun`.
//!
//! A transaction is `(tgid, start_ns)`. `TX_STATE` counts the process's threads inside
//! `rpmtsRun` and the watched-file writes it made meanwhile (`file.rs` adds them), so its end
//! says whether it wrote the watched database at all.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_uid_gid,
        generated::{bpf_get_attach_cookie, bpf_probe_read_user},
    },
    macros::{tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use guestwatch_agent_common::{
    CMDLINE_LEN, COMM_LEN, EventKind, MAX_ANCESTORS, TxEvent, TxStartEvent, UNSET,
};

use crate::{
    maps::{EVENTS, IN_TX, TX_STATE, TxState},
    task::{self, Phase, current_task, now_ns, offsets, pid_tgid, read_u32, read_u64, tgid_of},
};

/// Fills the boundary fields every transaction record has.
#[inline(always)]
fn fill(event: &mut TxEvent, kind: EventKind, id: u64, cookie: u64, start_ns: u64, ret: i32) {
    let uid_gid = bpf_get_current_uid_gid();
    let o = offsets();
    let task = current_task();
    event.kind = kind as u32;
    event.tgid = tgid_of(id);
    event.pid = id as u32;
    event.uid = uid_gid as u32;
    event.gid = (uid_gid >> 32) as u32;
    event.ret = ret;
    event.loginuid = read_u32(task, o.loginuid);
    event.sessionid = read_u32(task, o.sessionid);
    event.writes = 0;
    event._pad = 0;
    event.cookie = cookie;
    event.start_ns = start_ns;
    event.now_ns = now_ns();
    event.comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
}

/// The parents of the current task, nearest first, and its command line.
#[inline(always)]
fn fill_who(event: &mut TxStartEvent) {
    let o = offsets();
    let mut task = current_task();
    let mut i = 0;
    while i < MAX_ANCESTORS {
        let parent = read_u64(task, o.real_parent);
        let tgid = read_u32(parent, o.tgid);
        if let Some(slot) = event.ancestors.get_mut(i) {
            slot.tgid = 0;
            slot.comm = [0; COMM_LEN];
            if parent != 0 && parent != task && tgid != UNSET && tgid != 0 {
                slot.tgid = tgid;
                task::read_comm(parent, o.comm, &mut slot.comm);
            }
        }
        // init (pid 1) is its own last ancestor; a parent of itself ends the chain too.
        if parent == 0 || parent == task || tgid == UNSET || tgid <= 1 {
            task = 0;
        } else {
            task = parent;
        }
        i += 1;
    }

    event.cmdline_len = 0;
    event._pad = 0;
    let mm = read_u64(current_task(), o.mm);
    let start = read_u64(mm, o.arg_start);
    let end = read_u64(mm, o.arg_end);
    if start == 0 || end <= start {
        return;
    }
    let mut len = end - start;
    if len > CMDLINE_LEN as u64 {
        len = CMDLINE_LEN as u64;
    }
    // The verifier wants the size bounded by the buffer: the mask states it explicitly.
    let size = (len as u32) & (2 * CMDLINE_LEN as u32 - 1);
    if size == 0 || size > CMDLINE_LEN as u32 {
        return;
    }
    // SAFETY: the destination is this record's buffer of CMDLINE_LEN bytes and `size` is at
    // most that; the helper validates the user address (the process's own argv area).
    let rc = unsafe {
        bpf_probe_read_user(
            event.cmdline.as_mut_ptr().cast(),
            size,
            start as *const core::ffi::c_void,
        )
    };
    if rc == 0 {
        event.cmdline_len = size;
    }
}

#[uprobe]
pub fn rpmts_run_enter(ctx: ProbeContext) -> u32 {
    let id = pid_tgid();
    let tgid = tgid_of(id);
    let now = now_ns();
    let start = match task::phase(tgid) {
        Phase::Agent => return 0,
        // Another thread of this process is inside already: the same transaction.
        Phase::InTransaction(state) => {
            // SAFETY: the pointer is this key's map value, valid for the program's run.
            unsafe {
                (*state).depth += 1;
                (*state).start_ns
            }
        }
        Phase::RanTransaction(_) | Phase::Outsider => {
            let fresh = TxState {
                depth: 1,
                writes: 0,
                start_ns: now,
            };
            let _ = TX_STATE.insert(tgid, fresh, 0);
            now
        }
    };
    let _ = IN_TX.insert(id, start, 0);
    // SAFETY: ctx.as_ptr() is the probe's context pointer, which is what the helper expects.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    // A full ring buffer drops the record rather than stalling the traced process; the end
    // record still carries the start time, and userspace reads /proc instead.
    let Some(mut entry) = EVENTS.reserve::<TxStartEvent>(0) else {
        return 0;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at ring-buffer memory reserved for one TxStartEvent; every field
    // is written before submit.
    unsafe {
        fill(&mut (*event).tx, EventKind::TxStart, id, cookie, start, 0);
        fill_who(&mut *event);
    }
    entry.submit(0);
    0
}

/// Leaves the transaction of thread `id`: returns its start and the process's writes.
#[inline(always)]
fn leave(id: u64) -> Option<(u64, u32)> {
    // SAFETY: the map value is a plain u64 copied out before the entry is removed.
    let start = unsafe { IN_TX.get(id) }.copied()?;
    let _ = IN_TX.remove(id);
    let mut writes = 0;
    if let Some(state) = TX_STATE.get_ptr_mut(tgid_of(id)) {
        // SAFETY: the pointer is this key's map value, valid for the program's run.
        unsafe {
            writes = (*state).writes;
            if (*state).depth > 0 {
                (*state).depth -= 1;
            }
        }
    }
    Some((start, writes))
}

#[inline(always)]
fn emit_end(kind: EventKind, id: u64, cookie: u64, start: u64, writes: u32, ret: i32) {
    let Some(mut entry) = EVENTS.reserve::<TxEvent>(0) else {
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at ring-buffer memory reserved for one TxEvent; every field is
    // written before submit.
    unsafe {
        fill(&mut *event, kind, id, cookie, start, ret);
        (*event).writes = writes;
    }
    entry.submit(0);
}

#[uretprobe]
pub fn rpmts_run_exit(ctx: RetProbeContext) -> u32 {
    let id = pid_tgid();
    if task::is_agent(tgid_of(id)) {
        return 0;
    }
    // An end without a start (the probe attached mid-transaction) carries start 0.
    let (start, writes) = leave(id).unwrap_or((0, 0));
    let ret: i32 = ctx.ret();
    // SAFETY: as in rpmts_run_enter.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    emit_end(EventKind::TxEnd, id, cookie, start, writes, ret);
    0
}

/// A thread exiting inside `rpmtsRun` (SIGKILL) ends its transaction without a return; the
/// process's leader exiting forgets the process, so a later process reusing the pid is not
/// trusted by mistake.
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let id = pid_tgid();
    if let Some((start, writes)) = leave(id) {
        emit_end(EventKind::TxAbort, id, 0, start, writes, 0);
    }
    if id as u32 == tgid_of(id) {
        // SAFETY: only the presence of the key and a copied u64 are used.
        if let Some(state) = unsafe { TX_STATE.get(tgid_of(id)) } {
            let start = state.start_ns;
            emit_end(EventKind::TxExit, id, 0, start, 0, 0);
        }
        let _ = TX_STATE.remove(tgid_of(id));
    }
    0
}
