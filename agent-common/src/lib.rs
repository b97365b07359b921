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
    /// A process outside any librpm transaction wrote, truncated, renamed or unlinked a file
    /// in a watched rpm database directory (the tamper signal).
    File = 3,
}

impl EventKind {
    /// Decodes a discriminant read from the ring buffer; `None` for kinds this build does not know.
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::TxStart),
            2 => Some(Self::TxEnd),
            3 => Some(Self::File),
            _ => None,
        }
    }
}

/// A librpm transaction boundary, emitted by the `rpmtsRun` uprobe and uretprobe.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TxEvent {
    /// An [`EventKind`] as `u32`: `TxStart` or `TxEnd`.
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

/// A file-level change in a watched directory by a process outside any librpm transaction.
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
    /// `CLOCK_BOOTTIME` nanoseconds of the event.
    pub now_ns: u64,
    pub comm: [u8; COMM_LEN],
    /// The path as the process passed it (possibly relative), NUL-padded.
    pub path: [u8; PATH_LEN],
    /// The rename destination, else empty.
    pub path2: [u8; PATH_LEN],
}

impl FileEvent {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

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
    // SAFETY (all three): repr(C), Copy, no pointers, every bit pattern valid.
    unsafe impl aya::Pod for super::FileEvent {}
    unsafe impl aya::Pod for super::WatchPrefix {}
    unsafe impl aya::Pod for super::WatchName {}
    // SAFETY: TxEvent is repr(C), Copy, has no padding-dependent invariants and every bit
    // pattern is a valid value, which is what aya requires of map values.
    unsafe impl aya::Pod for super::TxEvent {}
}
