//! Facts about the current task.

use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
    generated::{bpf_get_current_task, bpf_ktime_get_boot_ns},
};
use guestwatch_agent_common::{AT_FDCWD, COMM_LEN, InodeId, TaskOffsets, UNSET};

use crate::maps::{AGENT_TGID, TASK_OFFSETS, TX_STATE, TxState};

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

/// Where the current process stands with respect to librpm transactions.
#[derive(Clone, Copy)]
pub enum Phase {
    /// The agent itself: nothing is reported.
    Agent,
    /// Inside the transaction that started at this time: its writes are its evidence.
    InTransaction(*mut TxState),
    /// It ran a transaction before (its writes now are the transaction's tail, such as
    /// SQLite's checkpoint on close): trusted, reported as the tail.
    RanTransaction(*mut TxState),
    /// Never entered `rpmtsRun`: its writes are tampering.
    Outsider,
}

#[inline(always)]
pub fn phase(tgid: u32) -> Phase {
    if is_agent(tgid) {
        return Phase::Agent;
    }
    match TX_STATE.get_ptr_mut(tgid) {
        // SAFETY: the pointer is this key's map value, valid for the program's run.
        Some(state) if unsafe { (*state).depth } > 0 => Phase::InTransaction(state),
        Some(state) => Phase::RanTransaction(state),
        None => Phase::Outsider,
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments, available to every tracing program type.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The loader's offsets (see `TaskOffsets`).
#[inline(always)]
pub fn offsets() -> TaskOffsets {
    // SAFETY: volatile read of a global the loader rewrote before load (as in `is_agent`).
    unsafe { core::ptr::read_volatile(&TASK_OFFSETS) }
}

/// The current `task_struct`.
#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: helper without arguments, available to uprobes and tracepoints.
    unsafe { bpf_get_current_task() }
}

/// A `u32` at `offset` in kernel object `base`; [`UNSET`] when either is unknown.
#[inline(always)]
pub fn read_u32(base: u64, offset: u32) -> u32 {
    if base == 0 || offset == UNSET {
        return UNSET;
    }
    // SAFETY: the helper validates the kernel address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u32) }.unwrap_or(UNSET)
}

/// A pointer or `unsigned long` at `offset` in kernel object `base`; 0 when unknown.
#[inline(always)]
pub fn read_u64(base: u64, offset: u32) -> u64 {
    if base == 0 || offset == UNSET {
        return 0;
    }
    // SAFETY: as in `read_u32`.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }.unwrap_or(0)
}

/// The command name of `task` into `out` (left zeroed when unknown).
#[inline(always)]
pub fn read_comm(task: u64, offset: u32, out: &mut [u8; COMM_LEN]) {
    if task == 0 || offset == UNSET {
        return;
    }
    // SAFETY: as in `read_u32`; the helper bounds the copy by `out`'s length.
    if unsafe { bpf_probe_read_kernel_buf((task + u64::from(offset)) as *const u8, out) }.is_err() {
        *out = [0; COMM_LEN];
    }
}

/// The identity of kernel `inode` (0s when unknown).
#[inline(always)]
fn inode_id(inode: u64, o: &TaskOffsets) -> InodeId {
    if inode == 0 {
        return InodeId::default();
    }
    let ino = read_u64(inode, o.i_ino);
    let sb = read_u64(inode, o.i_sb);
    let dev = read_u32(sb, o.s_dev);
    if ino == 0 || dev == UNSET {
        return InodeId::default();
    }
    InodeId { ino, dev, _pad: 0 }
}

/// The file behind descriptor `fd` of the current task (0 when unknown).
#[inline(always)]
fn file_of(fd: i32, o: &TaskOffsets) -> u64 {
    if fd < 0 {
        return 0;
    }
    let files = read_u64(current_task(), o.files);
    let fdt = read_u64(files, o.fdt);
    let max = read_u32(fdt, o.max_fds);
    if max == UNSET || fd as u32 >= max {
        return 0;
    }
    let array = read_u64(fdt, o.fdtable_fd);
    if array == 0 {
        return 0;
    }
    read_u64(array + 8 * u64::from(fd as u32), 0)
}

/// The identity of the file descriptor `fd` refers to.
#[inline(always)]
pub fn fd_inode(fd: i32) -> InodeId {
    let o = offsets();
    let file = file_of(fd, &o);
    inode_id(read_u64(file, o.f_inode), &o)
}

/// The directory a path given with `dirfd` is relative to: the descriptor's, or the working
/// directory's for `AT_FDCWD`.
#[inline(always)]
pub fn base_dir(dirfd: i32) -> InodeId {
    if dirfd != AT_FDCWD {
        return fd_inode(dirfd);
    }
    let o = offsets();
    let fs = read_u64(current_task(), o.fs);
    let dentry = read_u64(fs, o.pwd_dentry);
    inode_id(read_u64(dentry, o.d_inode), &o)
}
