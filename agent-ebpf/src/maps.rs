//! Maps shared by the programs, and the one global the loader sets.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use guestwatch_agent_common::{MAX_NAMES, MAX_PREFIXES, TaskOffsets, WatchName, WatchPrefix};

/// Set by the loader: the agent's own tgid, which no program reports on.
#[unsafe(no_mangle)]
pub static AGENT_TGID: u32 = 0;

/// Set by the loader from the kernel's BTF: where task fields are.
#[unsafe(no_mangle)]
pub static TASK_OFFSETS: TaskOffsets = TaskOffsets::UNKNOWN;

/// Every record for userspace. A transaction start is about 4 KiB (its command line), so this
/// holds a few hundred starts if userspace falls behind.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// Threads inside `rpmtsRun`, keyed by pid_tgid, valued by the transaction's start (boot ns).
#[map]
pub static IN_TX: HashMap<u64, u64> = HashMap::with_max_entries(8192, 0);

/// A process that has entered `rpmtsRun` at least once.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TxState {
    /// Threads of the process inside `rpmtsRun` now.
    pub depth: u32,
    /// Watched-file writes (first per descriptor) since the transaction started.
    pub writes: u32,
    /// When the current (or last) transaction started: its identity with the tgid.
    pub start_ns: u64,
}

/// Processes that have entered `rpmtsRun`, by tgid. Their writes inside a transaction are its
/// evidence; their writes outside one (SQLite's checkpoint on close, after `rpmtsRun`
/// returns) are never reported as tampering. Entries are removed when the process exits; LRU
/// bounds the map if exits are missed.
#[map]
pub static TX_STATE: LruHashMap<u32, TxState> = LruHashMap::with_max_entries(8192, 0);

/// Watched directory prefixes (absolute, trailing `/`), set by userspace.
#[map]
pub static WATCH_PREFIXES: Array<WatchPrefix> = Array::with_max_entries(MAX_PREFIXES, 0);

/// Watched bare file names (matched against relative paths), set by userspace.
#[map]
pub static WATCH_NAMES: Array<WatchName> = Array::with_max_entries(MAX_NAMES, 0);

pub use guestwatch_agent_common::{OpenedFile, REPORTED_OUTSIDE};

/// Watched opens between syscall entry and exit, keyed by pid_tgid.
#[map]
pub static PENDING_OPEN: HashMap<u64, OpenedFile> = HashMap::with_max_entries(1024, 0);

/// dup/fcntl(F_DUPFD) of a tracked descriptor, and every dup2/dup3, between syscall entry and
/// exit: pid_tgid → old fd (with `REPLACES` for dup2/dup3, see file.rs).
#[map]
pub static PENDING_DUP: HashMap<u64, u64> = HashMap::with_max_entries(1024, 0);

/// Descriptors of watched files open for writing, keyed by `tgid << 32 | fd`.
#[map]
pub static WRITE_FDS: LruHashMap<u64, OpenedFile> = LruHashMap::with_max_entries(4096, 0);

/// Per-CPU scratch space for paths (the BPF stack is 512 bytes).
#[map]
pub static SCRATCH: PerCpuArray<OpenedFile> = PerCpuArray::with_max_entries(2, 0);
