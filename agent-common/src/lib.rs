//! Event layouts shared by the guestwatch agent (userspace) and its BPF programs.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers, because the BPF side writes
//! these records into a ring buffer byte for byte and userspace reads them back. Every record
//! starts with a `u32` [`EventKind`] so userspace can tell records apart before trusting a size.
#![no_std]

/// Length of `task_struct::comm` in the kernel.
pub const COMM_LEN: usize = 16;

/// Discriminant at offset 0 of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A thread entered `rpmtsRun` (a transaction starts).
    TxStart = 1,
    /// A thread returned from `rpmtsRun` (a transaction ended, successfully or not).
    TxEnd = 2,
    /// A watched database file was written, truncated, renamed or unlinked: inside a librpm
    /// transaction (the evidence that joins the transaction to the database), or by a process
    /// outside any (the tamper signal).
    File = 3,
    /// A thread exited while inside `rpmtsRun` (the process was killed mid-transaction).
    TxAbort = 4,
    /// A process that ran a transaction exited (after SQLite's checkpoint on close).
    TxExit = 5,
}

impl EventKind {
    /// Decodes a discriminant read from the ring buffer; `None` for kinds this build does not know.
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::TxStart),
            2 => Some(Self::TxEnd),
            3 => Some(Self::File),
            4 => Some(Self::TxAbort),
            5 => Some(Self::TxExit),
            _ => None,
        }
    }
}

/// "Not known" for the audit ids (the kernel's own `AUDIT_UID_UNSET`/unset session) and for
/// offsets the loader could not find.
pub const UNSET: u32 = u32::MAX;

/// A librpm transaction boundary, emitted by the `rpmtsRun` uprobe and uretprobe, and when a
/// thread dies inside `rpmtsRun`.
///
/// A transaction is identified by `(tgid, start_ns)`: `start_ns` is when the first thread of
/// the process entered `rpmtsRun` (threads of one process entering concurrently share it).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TxEvent {
    /// An [`EventKind`] as `u32`: `TxStart`, `TxEnd` or `TxAbort`.
    pub kind: u32,
    /// Process id (the kernel's tgid).
    pub tgid: u32,
    /// Thread id (the kernel's pid).
    pub pid: u32,
    /// Real uid of the calling task.
    pub uid: u32,
    /// Real gid of the calling task.
    pub gid: u32,
    /// `rpmtsRun`'s return value on `TxEnd` (0 = success, <0 = error, >0 = problems); 0 on start.
    pub ret: i32,
    /// The task's audit login uid, [`UNSET`] when unset or unknown.
    pub loginuid: u32,
    /// The task's audit session id, [`UNSET`] when unset or unknown.
    pub sessionid: u32,
    /// On `TxEnd`/`TxAbort`: writes to watched database files the process made inside the
    /// transaction (each descriptor counted once).
    pub writes: u32,
    pub _pad: u32,
    /// The attach cookie: which of the attached librpm copies fired.
    pub cookie: u64,
    /// `CLOCK_BOOTTIME` nanoseconds when the transaction started (0 if the start was missed).
    pub start_ns: u64,
    /// `CLOCK_BOOTTIME` nanoseconds of this event.
    pub now_ns: u64,
    /// The task's command name, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

impl TxEvent {
    /// Size of the record in the ring buffer.
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Parents read from the task at a transaction's start.
pub const MAX_ANCESTORS: usize = 8;
/// Bytes of the command line (`argv`, NUL-separated) read at a transaction's start.
pub const CMDLINE_LEN: usize = 4096;

/// A parent process, from `task_struct::real_parent`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TaskAncestor {
    /// Its tgid; 0 ends the list.
    pub tgid: u32,
    pub comm: [u8; COMM_LEN],
}

/// A transaction's start: the boundary record plus what the task says about who runs it, read
/// in the kernel so that it is known even if the process is gone before userspace looks.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TxStartEvent {
    /// `kind` is [`EventKind::TxStart`].
    pub tx: TxEvent,
    /// Nearest first; unused entries have tgid 0.
    pub ancestors: [TaskAncestor; MAX_ANCESTORS],
    /// Bytes of `cmdline` read (0: not readable, userspace falls back to `/proc`).
    pub cmdline_len: u32,
    pub _pad: u32,
    pub cmdline: [u8; CMDLINE_LEN],
}

impl TxStartEvent {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Where the BPF programs find task fields, in bytes: kernel structure layouts differ between
/// kernels, so the loader reads them from the kernel's BTF. [`UNSET`] = not found (the program
/// then leaves the fact unset and userspace reads `/proc`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct::loginuid` (a `kuid_t`).
    pub loginuid: u32,
    /// `task_struct::sessionid`.
    pub sessionid: u32,
    /// `task_struct::real_parent` (a pointer).
    pub real_parent: u32,
    /// `task_struct::tgid`.
    pub tgid: u32,
    /// `task_struct::comm`.
    pub comm: u32,
    /// `task_struct::mm` (a pointer).
    pub mm: u32,
    /// `mm_struct::arg_start` and `arg_end` (unsigned longs).
    pub arg_start: u32,
    pub arg_end: u32,
    /// `task_struct::files`, `files_struct::fdt`, `fdtable::fd` and `fdtable::max_fds`: from a
    /// descriptor to its `struct file`.
    pub files: u32,
    pub fdt: u32,
    pub fdtable_fd: u32,
    pub max_fds: u32,
    /// `file::f_inode`, `inode::i_ino`, `inode::i_sb`, `super_block::s_dev`: a file's identity.
    pub f_inode: u32,
    pub i_ino: u32,
    pub i_sb: u32,
    pub s_dev: u32,
    /// `task_struct::fs`, then `fs_struct::pwd` + `path::dentry`, and `dentry::d_inode`: the
    /// working directory's inode.
    pub fs: u32,
    pub pwd_dentry: u32,
    pub d_inode: u32,
}

impl TaskOffsets {
    pub const UNKNOWN: Self = Self {
        loginuid: UNSET,
        sessionid: UNSET,
        real_parent: UNSET,
        tgid: UNSET,
        comm: UNSET,
        mm: UNSET,
        arg_start: UNSET,
        arg_end: UNSET,
        files: UNSET,
        fdt: UNSET,
        fdtable_fd: UNSET,
        max_fds: UNSET,
        f_inode: UNSET,
        i_ino: UNSET,
        i_sb: UNSET,
        s_dev: UNSET,
        fs: UNSET,
        pwd_dentry: UNSET,
        d_inode: UNSET,
    };
}

/// A file or directory as the kernel knows it: `dev` in the kernel's own encoding
/// (`major << 20 | minor`), 0 for unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeId {
    pub ino: u64,
    pub dev: u32,
    pub _pad: u32,
}

/// Bytes of a path captured from a syscall argument (NUL-terminated when shorter).
pub const PATH_LEN: usize = 256;
/// Bytes of a watched directory prefix (absolute, with a trailing `/`).
pub const PREFIX_LEN: usize = 128;
/// Bytes of a watched bare file name (matched against relative paths).
pub const NAME_LEN: usize = 32;
/// Watched directory prefixes (the database directory and its aliases).
pub const MAX_PREFIXES: u32 = 4;
/// Watched bare file names.
pub const MAX_NAMES: u32 = 16;

/// What a [`FileEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// First write (write, pwrite, writev, ftruncate, fallocate…) through a descriptor opened
    /// for writing on a watched path.
    Write = 1,
    /// An open with `O_TRUNC` of a watched path.
    OpenTruncate = 2,
    /// `rename*` with a watched source (`path`) or destination (`path2`).
    Rename = 3,
    /// `unlink*` of a watched path.
    Unlink = 4,
    /// `truncate(2)` of a watched path.
    Truncate = 5,
}

impl FileOp {
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Write),
            2 => Some(Self::OpenTruncate),
            3 => Some(Self::Rename),
            4 => Some(Self::Unlink),
            5 => Some(Self::Truncate),
            _ => None,
        }
    }
}

/// `AT_FDCWD`: a `*at` call relative to the working directory.
pub const AT_FDCWD: i32 = -100;

/// A file-level change of a watched path: by a process inside a librpm transaction
/// (`tx_start_ns` names the transaction), or outside any (`tx_start_ns` 0: tampering).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileEvent {
    /// [`EventKind::File`] as `u32`.
    pub kind: u32,
    /// A [`FileOp`] as `u32`.
    pub op: u32,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The descriptor written through (for [`FileOp::Write`]), else -1.
    pub fd: i32,
    /// Open flags (writes, opens) or rename flags.
    pub flags: u32,
    /// The directory descriptor `path` is relative to (`*at` calls), [`AT_FDCWD`] otherwise.
    pub dirfd: i32,
    /// The same for `path2`.
    pub dirfd2: i32,
    /// `CLOCK_BOOTTIME` nanoseconds of the event.
    pub now_ns: u64,
    /// The transaction (its `start_ns`) the writing process is inside, or (with `tail`) the
    /// one it ran last; 0 for none.
    pub tx_start_ns: u64,
    /// 1: a write after the process's transaction ended (SQLite's checkpoint on close), not
    /// inside it.
    pub tail: u32,
    pub _pad: u32,
    /// The written file, for [`FileOp::Write`].
    pub file: InodeId,
    /// The directories a relative `path` and `path2` are relative to (the directory
    /// descriptor's, else the working directory), read when the call was made: so a process
    /// gone before userspace looks is still located exactly.
    pub dir: InodeId,
    pub dir2: InodeId,
    pub comm: [u8; COMM_LEN],
    /// The path as the process passed it (possibly relative), NUL-padded.
    pub path: [u8; PATH_LEN],
    /// The rename destination, else empty.
    pub path2: [u8; PATH_LEN],
}

impl FileEvent {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// A watched file opened for writing, by descriptor (the `WRITE_FDS` map, keyed by
/// `tgid << 32 | fd`): entered by the open tracepoints, or by userspace for descriptors a
/// transaction's process opened before the probes were there.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OpenedFile {
    /// 0 until a write through it is reported; then the transaction it was reported in (its
    /// start), or [`REPORTED_OUTSIDE`]: one record per descriptor per transaction is enough.
    pub reported: u64,
    /// The transaction (its start) after whose end a write through it was reported as that
    /// transaction's tail, 0 for none.
    pub tail_reported: u64,
    pub flags: u32,
    /// The directory descriptor of a relative open ([`AT_FDCWD`] otherwise).
    pub dirfd: i32,
    pub path: [u8; PATH_LEN],
}

/// `OpenedFile::reported` of a descriptor whose first write was reported as tampering.
pub const REPORTED_OUTSIDE: u64 = 1;

/// A watched directory prefix, written by userspace into the `WATCH_PREFIXES` array.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WatchPrefix {
    /// Bytes used in `bytes`; 0 marks an unused slot.
    pub len: u32,
    pub bytes: [u8; PREFIX_LEN],
}

/// A watched bare file name, written by userspace into the `WATCH_NAMES` array.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WatchName {
    /// Bytes used in `bytes`; 0 marks an unused slot.
    pub len: u32,
    pub bytes: [u8; NAME_LEN],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all of these): repr(C), Copy, no pointers, every bit pattern valid.
    unsafe impl aya::Pod for super::TaskOffsets {}
    unsafe impl aya::Pod for super::OpenedFile {}
    unsafe impl aya::Pod for super::FileEvent {}
    unsafe impl aya::Pod for super::WatchPrefix {}
    unsafe impl aya::Pod for super::WatchName {}
    // SAFETY: TxEvent is repr(C), Copy, has no padding-dependent invariants and every bit
    // pattern is a valid value, which is what aya requires of map values.
    unsafe impl aya::Pod for super::TxEvent {}
}
