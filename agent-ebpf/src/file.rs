//! Changes to watched database files: the evidence that joins a transaction to the database it
//! wrote, and the tamper signal.
//!
//! Opens for writing of watched paths are remembered per descriptor (sys_enter/sys_exit of
//! the open family, followed through dup/dup2/dup3/fcntl(F_DUPFD)), by every process but the
//! agent. A write through such a descriptor is reported once per transaction when the process
//! is inside `rpmtsRun` (with the transaction's start, and counted in `TX_STATE`), once per
//! descriptor when the process never entered `rpmtsRun` (tampering), and not at all when it
//! ran a transaction before (SQLite's checkpoint on close). Truncating opens, `truncate`,
//! renames and unlinks of watched paths are reported directly by the same rule. A path is
//! watched when it is absolute and starts with a prefix userspace put in `WATCH_PREFIXES`, or
//! relative and equal to a name in `WATCH_NAMES` (userspace then locates it by the identities
//! recorded at the call: of the directory it is relative to and, for a write, of the file).
//! Syscall tracepoint argument offsets are the stable layout of `syscalls:*` events: arguments
//! start at byte 16, eight bytes apart.
//!
//! Helpers are `#[inline(always)]`: BPF-to-BPF calls cannot pass Rust's wider arguments (an
//! `Option<u64>` takes two registers, one left unset for `None`), which the verifier rejects.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_uid_gid, bpf_probe_read_kernel_buf,
        bpf_probe_read_user, bpf_probe_read_user_str_bytes,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use guestwatch_agent_common::{
    AT_FDCWD, COMM_LEN, EventKind, FileEvent, FileOp, InodeId, MAX_NAMES, MAX_PREFIXES, NAME_LEN,
    PATH_LEN, PREFIX_LEN,
};

use crate::{
    maps::{
        EVENTS, OpenedFile, PENDING_DUP, PENDING_OPEN, REPORTED_OUTSIDE, SCRATCH, WATCH_NAMES,
        WATCH_PREFIXES, WRITE_FDS,
    },
    task::{Phase, base_dir, fd_inode, now_ns, phase, pid_tgid, tgid_of},
};

const O_WRONLY: u32 = 0o1;
const O_RDWR: u32 = 0o2;
const O_TRUNC: u32 = 0o1000;
const O_CREAT: u32 = 0o100;

/// Argument `n` (0-based) of a `syscalls:sys_enter_*` tracepoint.
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: syscall tracepoints carry six 8-byte argument slots from offset 16; reading one
    // is a bounded read of the tracepoint record.
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

/// The return value of a `syscalls:sys_exit_*` tracepoint.
#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: as in `arg`; the return value sits at offset 16.
    unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1)
}

// Indexing goes through `get` so no bounds-check panic (unlinkable in BPF) is generated.
#[inline(always)]
fn has_prefix(path: &[u8; PATH_LEN], prefix: &[u8; PREFIX_LEN], len: usize) -> bool {
    let mut i = 0;
    while i < PREFIX_LEN {
        if i >= len {
            return true;
        }
        match (path.get(i), prefix.get(i)) {
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn equals_name(path: &[u8; PATH_LEN], name: &[u8; NAME_LEN], len: usize) -> bool {
    let mut i = 0;
    while i < NAME_LEN {
        if i >= len {
            return path.get(i) == Some(&0);
        }
        match (path.get(i), name.get(i)) {
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn watched(path: &[u8; PATH_LEN]) -> bool {
    if path[0] == b'/' {
        let mut i = 0;
        while i < MAX_PREFIXES {
            if let Some(p) = WATCH_PREFIXES.get(i)
                && p.len > 0
                && has_prefix(path, &p.bytes, p.len as usize)
            {
                return true;
            }
            i += 1;
        }
    } else if path[0] != 0 {
        let mut i = 0;
        while i < MAX_NAMES {
            if let Some(n) = WATCH_NAMES.get(i)
                && n.len > 0
                && equals_name(path, &n.bytes, n.len as usize)
            {
                return true;
            }
            i += 1;
        }
    }
    false
}

/// Reads a user path into scratch slot `slot`; `None` when it cannot be read.
#[inline(always)]
fn read_path(slot: u32, user_ptr: u64) -> Option<*mut OpenedFile> {
    let scratch = SCRATCH.get_ptr_mut(slot)?;
    // SAFETY: scratch points at this CPU's map value, which nothing else touches while this
    // program runs; the helper bounds the copy by the buffer length.
    let buf = unsafe { &mut (*scratch).path };
    buf[0] = 0;
    // SAFETY: the pointer came from the syscall's arguments; the helper validates it.
    unsafe { bpf_probe_read_user_str_bytes(user_ptr as *const u8, buf) }.ok()?;
    Some(scratch)
}

/// Which transaction a record is evidence for (0: tampering) or the tail of, and the
/// directory descriptors its paths are relative to.
#[derive(Clone, Copy)]
struct Context {
    tx_start_ns: u64,
    tail: bool,
    dirfd: i32,
    dirfd2: i32,
}

#[inline(always)]
fn emit(
    op: FileOp,
    fd: i32,
    flags: u32,
    at: Context,
    path: *const [u8; PATH_LEN],
    path2: Option<*const [u8; PATH_LEN]>,
) {
    let id = pid_tgid();
    let Some(mut entry) = EVENTS.reserve::<FileEvent>(0) else {
        return;
    };
    let event = entry.as_mut_ptr();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: `event` points at ring-buffer memory reserved for one FileEvent; every field is
    // written before submit. The paths point at map values.
    unsafe {
        (*event).kind = EventKind::File as u32;
        (*event).op = op as u32;
        (*event).tgid = tgid_of(id);
        (*event).pid = id as u32;
        (*event).uid = uid_gid as u32;
        (*event).gid = (uid_gid >> 32) as u32;
        (*event).fd = fd;
        (*event).flags = flags;
        (*event).dirfd = at.dirfd;
        (*event).dirfd2 = at.dirfd2;
        (*event).now_ns = now_ns();
        (*event).tx_start_ns = at.tx_start_ns;
        (*event).tail = u32::from(at.tail);
        (*event)._pad = 0;
        (*event).file = if op == FileOp::Write {
            fd_inode(fd)
        } else {
            InodeId::default()
        };
        // Relative names are located by their directory's identity, read now: the process
        // (or its descriptor) may be gone before userspace looks.
        (*event).dir = InodeId::default();
        (*event).dir2 = InodeId::default();
        if (*path)[0] != b'/' {
            (*event).dir = base_dir(at.dirfd);
        }
        if let Some(path2) = path2
            && (*path2)[0] != b'/'
            && (*path2)[0] != 0
        {
            (*event).dir2 = base_dir(at.dirfd2);
        }
        (*event).comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
        if bpf_probe_read_kernel_buf(path.cast(), &mut (*event).path).is_err() {
            (*event).path[0] = 0;
        }
        (*event).path2[0] = 0;
        if let Some(path2) = path2
            && bpf_probe_read_kernel_buf(path2.cast(), &mut (*event).path2).is_err()
        {
            (*event).path2[0] = 0;
        }
    }
    entry.submit(0);
}

/// Whether a change by process `tgid` is reported, and how: inside a transaction it is its
/// evidence (`Some((start, false))`, counted); by a process that ran one before, that
/// transaction's tail (`Some((start, true))`); outside any, tampering (`Some((0, false))`); the
/// agent's are not reported (`None`).
#[inline(always)]
fn report_as(tgid: u32) -> Option<(u64, bool)> {
    match phase(tgid) {
        Phase::InTransaction(state) => {
            // SAFETY: the pointer is this key's map value, valid for the program's run.
            unsafe {
                (*state).writes += 1;
                Some(((*state).start_ns, false))
            }
        }
        // SAFETY: as above.
        Phase::RanTransaction(state) => Some((unsafe { (*state).start_ns }, true)),
        Phase::Outsider => Some((0, false)),
        Phase::Agent => None,
    }
}

/// `OpenedFile::reported` for a record reported as `tx` (see `report_as`).
#[inline(always)]
fn reported_mark(tx: u64) -> u64 {
    if tx == 0 { REPORTED_OUTSIDE } else { tx }
}

#[inline(always)]
fn open_enter(dirfd: i32, user_path: u64, flags: u32) {
    if flags & (O_WRONLY | O_RDWR | O_TRUNC) == 0 {
        return;
    }
    let id = pid_tgid();
    if matches!(phase(tgid_of(id)), Phase::Agent) {
        return;
    }
    let Some(scratch) = read_path(0, user_path) else {
        return;
    };
    // SAFETY: scratch is this CPU's map value (see read_path).
    unsafe {
        if !watched(&(*scratch).path) {
            return;
        }
        (*scratch).flags = flags;
        (*scratch).dirfd = dirfd;
        (*scratch).reported = 0;
        (*scratch).tail_reported = 0;
        if flags & O_TRUNC != 0
            && let Some((tx, tail)) = report_as(tgid_of(id))
        {
            let at = Context {
                tx_start_ns: tx,
                tail,
                dirfd,
                dirfd2: AT_FDCWD,
            };
            emit(FileOp::OpenTruncate, -1, flags, at, &(*scratch).path, None);
            if tail {
                (*scratch).tail_reported = tx;
            } else {
                (*scratch).reported = reported_mark(tx);
            }
        }
        // By reference: a copy of the 272-byte value would take half the 512-byte BPF stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = PENDING_OPEN.insert(id, &*scratch, 0);
    }
}

#[tracepoint]
pub fn openat_enter(ctx: TracePointContext) -> u32 {
    open_enter(arg(&ctx, 0) as i32, arg(&ctx, 1), arg(&ctx, 2) as u32);
    0
}

#[tracepoint]
pub fn openat2_enter(ctx: TracePointContext) -> u32 {
    // struct open_how starts with `__u64 flags`.
    // SAFETY: the pointer came from the syscall's arguments; the helper validates it.
    let flags = unsafe { bpf_probe_read_user(arg(&ctx, 2) as *const u64) }.unwrap_or(0);
    open_enter(arg(&ctx, 0) as i32, arg(&ctx, 1), flags as u32);
    0
}

#[tracepoint]
pub fn open_enter_legacy(ctx: TracePointContext) -> u32 {
    open_enter(AT_FDCWD, arg(&ctx, 0), arg(&ctx, 1) as u32);
    0
}

#[tracepoint]
pub fn creat_enter(ctx: TracePointContext) -> u32 {
    open_enter(AT_FDCWD, arg(&ctx, 0), O_CREAT | O_WRONLY | O_TRUNC);
    0
}

/// Shared by the exits of open, openat, openat2 and creat.
#[tracepoint]
pub fn open_exit(ctx: TracePointContext) -> u32 {
    let id = pid_tgid();
    // SAFETY: the value is copied into WRITE_FDS before the entry is removed.
    if let Some(opened) = unsafe { PENDING_OPEN.get(id) } {
        let fd = ret(&ctx);
        if fd >= 0 {
            let _ = WRITE_FDS.insert(fd_key(tgid_of(id), fd as u64), opened, 0);
        }
        let _ = PENDING_OPEN.remove(id);
    }
    0
}

/// Shared by write, pwrite64, writev, pwritev, pwritev2, ftruncate and fallocate, whose
/// first argument is the descriptor.
#[tracepoint]
pub fn fd_write(ctx: TracePointContext) -> u32 {
    let id = pid_tgid();
    let fd = arg(&ctx, 0);
    let Some(opened) = WRITE_FDS.get_ptr_mut(fd_key(tgid_of(id), fd)) else {
        return 0;
    };
    // Concurrent writers of the same descriptor can at worst both report, which userspace
    // coalesces.
    let (tx, tail) = match phase(tgid_of(id)) {
        // SAFETY: `opened` and `state` point at map values valid for the program's run.
        Phase::InTransaction(state) => unsafe {
            let start = (*state).start_ns;
            if (*opened).reported == start {
                return 0;
            }
            (*state).writes += 1;
            (*opened).reported = start;
            (start, false)
        },
        // SAFETY: as above.
        Phase::RanTransaction(state) => unsafe {
            let start = (*state).start_ns;
            if (*opened).tail_reported == start {
                return 0;
            }
            (*opened).tail_reported = start;
            (start, true)
        },
        // SAFETY: as above.
        Phase::Outsider if unsafe { (*opened).reported } == 0 => unsafe {
            (*opened).reported = REPORTED_OUTSIDE;
            (0, false)
        },
        _ => return 0,
    };
    // SAFETY: `opened` points at this key's map value.
    unsafe {
        let at = Context {
            tx_start_ns: tx,
            tail,
            dirfd: (*opened).dirfd,
            dirfd2: AT_FDCWD,
        };
        emit(
            FileOp::Write,
            fd as i32,
            (*opened).flags,
            at,
            &(*opened).path,
            None,
        );
    }
    0
}

#[inline(always)]
fn fd_key(tgid: u32, fd: u64) -> u64 {
    (u64::from(tgid) << 32) | (fd & 0xffff_ffff)
}

/// Copies the tracking of `old` to `new` (shells redirect with dup2 and close the original).
#[inline(always)]
fn track_copy(tgid: u32, old: u64, new: u64) {
    // SAFETY: the value is copied into the map by the helper; the reference does not escape.
    if let Some(opened) = unsafe { WRITE_FDS.get(fd_key(tgid, old)) } {
        let _ = WRITE_FDS.insert(fd_key(tgid, new), opened, 0);
    }
}

/// In `PENDING_DUP`: the call replaces whatever its result descriptor was (dup2 and dup3 close
/// `newfd` first), so an untracked `oldfd` clears the result's tracking.
const REPLACES: u64 = 1 << 63;

/// dup2 and dup3: (oldfd, newfd, …), applied at the exit, when the call has succeeded. Every
/// call is remembered, not only a tracked `oldfd`'s: a shell restoring its stdout
/// (`dup2(saved, 1)` after `echo x >> Packages`) must end fd 1's tracking.
#[tracepoint]
pub fn dup2_enter(ctx: TracePointContext) -> u32 {
    let _ = PENDING_DUP.insert(pid_tgid(), (arg(&ctx, 0) & 0xffff_ffff) | REPLACES, 0);
    0
}

#[inline(always)]
fn dup_pending(fd: u64) {
    let id = pid_tgid();
    // SAFETY: only the presence of the key is used.
    if unsafe { WRITE_FDS.get(fd_key(tgid_of(id), fd)) }.is_some() {
        let _ = PENDING_DUP.insert(id, fd, 0);
    }
}

/// dup(oldfd): the new descriptor is the return value.
#[tracepoint]
pub fn dup_enter(ctx: TracePointContext) -> u32 {
    dup_pending(arg(&ctx, 0));
    0
}

const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

/// fcntl(fd, F_DUPFD[_CLOEXEC], …): the new descriptor is the return value.
#[tracepoint]
pub fn fcntl_enter(ctx: TracePointContext) -> u32 {
    let cmd = arg(&ctx, 1);
    if cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC {
        dup_pending(arg(&ctx, 0));
    }
    0
}

/// Shared by the exits of dup, dup2, dup3 and fcntl.
#[tracepoint]
pub fn dup_exit(ctx: TracePointContext) -> u32 {
    let id = pid_tgid();
    // SAFETY: the value is a plain u64 copied out before the entry is removed.
    if let Some(pending) = unsafe { PENDING_DUP.get(id) }.copied() {
        let new = ret(&ctx);
        if new >= 0 {
            let tgid = tgid_of(id);
            let old = pending & !REPLACES;
            // SAFETY: only the presence of the key is used.
            let tracked = unsafe { WRITE_FDS.get(fd_key(tgid, old)) }.is_some();
            if tracked {
                track_copy(tgid, old, new as u64);
            } else if pending & REPLACES != 0 {
                let _ = WRITE_FDS.remove(fd_key(tgid, new as u64));
            }
        }
        let _ = PENDING_DUP.remove(id);
    }
    0
}

#[tracepoint]
pub fn close_enter(ctx: TracePointContext) -> u32 {
    let _ = WRITE_FDS.remove(fd_key(tgid_of(pid_tgid()), arg(&ctx, 0)));
    0
}

#[inline(always)]
fn path_op(op: FileOp, dirfd: i32, path: u64, second: Option<(i32, u64)>, flags: u32) {
    let tgid = tgid_of(pid_tgid());
    if matches!(phase(tgid), Phase::Agent) {
        return;
    }
    let Some(first) = read_path(0, path) else {
        return;
    };
    // SAFETY: both scratch slots are this CPU's map values (see read_path).
    unsafe {
        let (dirfd2, second) = match second {
            Some((dirfd2, p)) => match read_path(1, p) {
                Some(s) => (dirfd2, Some(s)),
                None => return,
            },
            None => (AT_FDCWD, None),
        };
        let hit = watched(&(*first).path) || second.is_some_and(|s| watched(&(*s).path));
        if hit && let Some((tx, tail)) = report_as(tgid) {
            let at = Context {
                tx_start_ns: tx,
                tail,
                dirfd,
                dirfd2,
            };
            emit(
                op,
                -1,
                flags,
                at,
                &(*first).path,
                second.map(|s| &(*s).path as *const _),
            );
        }
    }
}

#[tracepoint]
pub fn renameat_enter(ctx: TracePointContext) -> u32 {
    // renameat and renameat2: (olddfd, oldname, newdfd, newname[, flags]).
    path_op(
        FileOp::Rename,
        arg(&ctx, 0) as i32,
        arg(&ctx, 1),
        Some((arg(&ctx, 2) as i32, arg(&ctx, 3))),
        arg(&ctx, 4) as u32,
    );
    0
}

#[tracepoint]
pub fn rename_enter(ctx: TracePointContext) -> u32 {
    path_op(
        FileOp::Rename,
        AT_FDCWD,
        arg(&ctx, 0),
        Some((AT_FDCWD, arg(&ctx, 1))),
        0,
    );
    0
}

#[tracepoint]
pub fn unlinkat_enter(ctx: TracePointContext) -> u32 {
    path_op(
        FileOp::Unlink,
        arg(&ctx, 0) as i32,
        arg(&ctx, 1),
        None,
        arg(&ctx, 2) as u32,
    );
    0
}

#[tracepoint]
pub fn unlink_enter(ctx: TracePointContext) -> u32 {
    path_op(FileOp::Unlink, AT_FDCWD, arg(&ctx, 0), None, 0);
    0
}

#[tracepoint]
pub fn truncate_enter(ctx: TracePointContext) -> u32 {
    path_op(FileOp::Truncate, AT_FDCWD, arg(&ctx, 0), None, 0);
    0
}

/// The BTF-enabled variant, loaded only where the kernel permits fentry programs: truncation
/// through `security_path_truncate` (both `truncate(2)` and `O_TRUNC` opens), with the path
/// resolved by the kernel (`bpf_d_path`), so relative paths and symlinks are caught exactly.
#[aya_ebpf::macros::fentry(function = "security_path_truncate")]
pub fn path_truncate(ctx: aya_ebpf::programs::FEntryContext) -> u32 {
    if !matches!(phase(tgid_of(pid_tgid())), Phase::Outsider) {
        return 0;
    }
    let path: *mut aya_ebpf::bindings::path = ctx.arg(0);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `path` is the hook's typed argument, which bpf_d_path accepts in this hook;
    // scratch is this CPU's map value and the helper bounds the write by its length.
    unsafe {
        let buf = &mut (*scratch).path;
        let len = aya_ebpf::helpers::generated::bpf_d_path(
            path,
            buf.as_mut_ptr().cast(),
            PATH_LEN as u32,
        );
        if len <= 0 || !watched(buf) {
            return 0;
        }
        let at = Context {
            tx_start_ns: 0,
            tail: false,
            dirfd: AT_FDCWD,
            dirfd2: AT_FDCWD,
        };
        emit(FileOp::Truncate, -1, 0, at, buf, None);
    }
    0
}
