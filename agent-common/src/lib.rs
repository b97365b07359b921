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
}

impl EventKind {
    /// Decodes a discriminant read from the ring buffer; `None` for kinds this build does not know.
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::TxStart),
            2 => Some(Self::TxEnd),
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

#[cfg(feature = "user")]
mod user {
    // SAFETY: TxEvent is repr(C), Copy, has no padding-dependent invariants and every bit
    // pattern is a valid value, which is what aya requires of map values.
    unsafe impl aya::Pod for super::TxEvent {}
}
