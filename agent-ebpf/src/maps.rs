//! Maps shared by the programs, and the one global the loader sets.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use guestwatch_agent_common::{MAX_NAMES, MAX_PREFIXES, PATH_LEN, WatchName, WatchPrefix};

/// Set by the loader: the agent's own tgid, which no program reports on.
#[unsafe(no_mangle)]
pub static AGENT_TGID: u32 = 0;

/// Every record for userspace.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(512 * 1024, 0);

/// Threads inside `rpmtsRun`, keyed by pid_tgid, valued by start time (boot ns).
#[map]
pub static IN_TX: HashMap<u64, u64> = HashMap::with_max_entries(8192, 0);

/// Processes that have entered `rpmtsRun` at least once (tgid → 1 while inside, 0 after).
/// Their database writes are the transaction's own (including SQLite's checkpoint on close,
/// which happens after `rpmtsRun` returns), so they are never reported as tampering.
/// Entries are removed when the process exits; LRU bounds the map if exits are missed.
#[map]
pub static TX_TGIDS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(8192, 0);

/// Watched directory prefixes (absolute, trailing `/`), set by userspace.
#[map]
pub static WATCH_PREFIXES: Array<WatchPrefix> = Array::with_max_entries(MAX_PREFIXES, 0);

/// Watched bare file names (matched against relative paths), set by userspace.
#[map]
pub static WATCH_NAMES: Array<WatchName> = Array::with_max_entries(MAX_NAMES, 0);

/// A watched file opened for writing.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OpenedFile {
    /// Non-zero once its first write was reported: one event per descriptor is enough.
    pub reported: u32,
    pub flags: u32,
    pub path: [u8; PATH_LEN],
}

/// Watched opens between syscall entry and exit, keyed by pid_tgid.
#[map]
pub static PENDING_OPEN: HashMap<u64, OpenedFile> = HashMap::with_max_entries(1024, 0);

/// dup/fcntl(F_DUPFD) of a tracked descriptor between syscall entry and exit: pid_tgid → old fd.
#[map]
pub static PENDING_DUP: HashMap<u64, u64> = HashMap::with_max_entries(1024, 0);

/// Descriptors of watched files open for writing, keyed by `tgid << 32 | fd`.
#[map]
pub static WRITE_FDS: LruHashMap<u64, OpenedFile> = LruHashMap::with_max_entries(4096, 0);

/// Per-CPU scratch space for paths (the BPF stack is 512 bytes).
#[map]
pub static SCRATCH: PerCpuArray<OpenedFile> = PerCpuArray::with_max_entries(2, 0);
