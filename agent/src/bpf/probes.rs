//! Loading the probes and reading their events.
//!
//! The transaction probes (`rpmtsRun` uprobe/uretprobe) are required: without them the agent
//! runs on inotify. The tamper programs (syscall tracepoints) are optional: when the kernel
//! refuses them the agent says why and carries on with transaction-level detection.

use std::{
    collections::VecDeque,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData, RingBuf},
    programs::{FEntry, TracePoint, UProbe, uprobe::UProbeAttachPoint, uprobe::UProbeScope},
};
use guestwatch_agent_common::{
    AT_FDCWD, MAX_NAMES, MAX_PREFIXES, NAME_LEN, OpenedFile, PATH_LEN, PREFIX_LEN, WatchName,
    WatchPrefix,
};
use tokio::io::{Interest, unix::AsyncFd};

use super::{
    event::{BpfRecord, decode},
    librpm::{self, Library},
    object, tracefs,
};

/// The function every librpm transaction passes through.
pub const RPMTS_RUN: &str = "rpmtsRun";
const ENTER: &str = "rpmts_run_enter";
const EXIT: &str = "rpmts_run_exit";
/// Ends the transactions of threads that die inside `rpmtsRun` and forgets exited processes.
const PROCESS_EXIT: &str = "process_exit";
const EVENTS: &str = "EVENTS";

/// Tamper programs and the syscall tracepoints each attaches to. The first tracepoint of a
/// `required` entry must attach for the tamper signal to be considered working.
const TAMPER_HOOKS: &[(&str, &str, &[&str], bool)] = &[
    ("openat_enter", "syscalls", &["sys_enter_openat"], true),
    ("openat2_enter", "syscalls", &["sys_enter_openat2"], false),
    ("open_enter_legacy", "syscalls", &["sys_enter_open"], false),
    ("creat_enter", "syscalls", &["sys_enter_creat"], false),
    (
        "open_exit",
        "syscalls",
        &[
            "sys_exit_openat",
            "sys_exit_openat2",
            "sys_exit_open",
            "sys_exit_creat",
        ],
        true,
    ),
    (
        "fd_write",
        "syscalls",
        &[
            "sys_enter_write",
            "sys_enter_pwrite64",
            "sys_enter_writev",
            "sys_enter_pwritev",
            "sys_enter_pwritev2",
            "sys_enter_ftruncate",
            "sys_enter_fallocate",
        ],
        true,
    ),
    ("close_enter", "syscalls", &["sys_enter_close"], true),
    (
        "dup2_enter",
        "syscalls",
        &["sys_enter_dup2", "sys_enter_dup3"],
        false,
    ),
    ("dup_enter", "syscalls", &["sys_enter_dup"], false),
    ("fcntl_enter", "syscalls", &["sys_enter_fcntl"], false),
    (
        "dup_exit",
        "syscalls",
        &[
            "sys_exit_dup",
            "sys_exit_dup2",
            "sys_exit_dup3",
            "sys_exit_fcntl",
        ],
        false,
    ),
    (
        "renameat_enter",
        "syscalls",
        &["sys_enter_renameat2", "sys_enter_renameat"],
        true,
    ),
    ("rename_enter", "syscalls", &["sys_enter_rename"], false),
    ("unlinkat_enter", "syscalls", &["sys_enter_unlinkat"], true),
    ("unlink_enter", "syscalls", &["sys_enter_unlink"], false),
    ("truncate_enter", "syscalls", &["sys_enter_truncate"], false),
];

/// Why the BPF transaction probes are unavailable. The message is what the agent logs once
/// before it falls back to inotify, so each says what failed and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this guestwatch-agent was built without BPF programs \
         (build them with `cargo xtask build-ebpf`, then rebuild the agent)"
    )]
    NotBuilt,
    #[error("BPF disabled by request ({0})")]
    Disabled(String),
    #[error(
        "no librpm found (searched /etc/ld.so.cache, the standard library directories and \
         /proc/*/maps); is the rpm package installed?"
    )]
    NoLibrpm,
    #[error("the kernel refused to load the BPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program `{0}` is missing from the BPF object")]
    ProgramMissing(&'static str),
    #[error("the kernel refused program `{program}`: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("could not attach to {RPMTS_RUN} in any librpm: {0}")]
    Attach(String),
    #[error("map `{0}` is missing from the BPF object")]
    MapMissing(&'static str),
    #[error("map `{name}` is unusable: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot poll the event ring buffer: {0}")]
    Poll(#[source] io::Error),
}

/// What to watch for tampering.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TamperWatch {
    /// Absolute directories (the database directory and its aliases), at most four.
    pub dirs: Vec<PathBuf>,
    /// Bare file names matched against relative paths (the database's files).
    pub names: Vec<String>,
}

/// Options for [`Probes::load`].
#[derive(Clone, Debug, Default)]
pub struct ProbeOptions {
    /// Libraries to attach to; `None` discovers them (see [`librpm::discover`]).
    pub libraries: Option<Vec<PathBuf>>,
    /// A process whose activity is never reported (the agent itself).
    pub ignore_tgid: Option<u32>,
    /// Paths to watch for tampering; `None` leaves the tamper programs unloaded.
    pub tamper: Option<TamperWatch>,
}

/// Whether the tamper signal is working.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TamperStatus {
    /// Syscall tracepoints are attached; `fentry` says whether the BTF-enabled variant is too.
    Tracepoints { fentry: Result<(), String> },
    /// Not requested.
    Off,
    /// Requested but refused; the reason is logged once.
    Unavailable(String),
}

impl std::fmt::Display for TamperStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tracepoints { fentry: Ok(()) } => write!(f, "tracepoints + fentry"),
            Self::Tracepoints { fentry: Err(why) } => {
                write!(f, "tracepoints (fentry not used: {why})")
            }
            Self::Off => write!(f, "off"),
            Self::Unavailable(why) => write!(f, "unavailable: {why}"),
        }
    }
}

/// The optional fentry program and the kernel function it hooks.
const FENTRY_PROGRAM: &str = "path_truncate";
const FENTRY_FUNCTION: &str = "security_path_truncate";

/// The loaded programs, attached to every librpm, and their event stream.
pub struct Probes {
    // Owns the programs and links: dropping it detaches everything.
    ebpf: Ebpf,
    events: AsyncFd<RingBuf<MapData>>,
    pending: VecDeque<BpfRecord>,
    /// Attached libraries; an event's cookie indexes this list (entries are never removed).
    libraries: Vec<Library>,
    tamper: TamperStatus,
}

impl Probes {
    /// Loads the embedded object, attaches to `rpmtsRun` in every librpm and, if asked, the
    /// tamper tracepoints.
    pub fn load(options: &ProbeOptions) -> Result<Self, BpfError> {
        let bytes = object::OBJECT.ok_or(BpfError::NotBuilt)?;
        let candidates = match &options.libraries {
            Some(paths) => paths.iter().filter_map(|p| library_at(p)).collect(),
            None => librpm::discover(),
        };
        if candidates.is_empty() {
            return Err(BpfError::NoLibrpm);
        }
        raise_memlock_limit();

        let ignore = options.ignore_tgid.unwrap_or(0);
        let offsets = super::btf::kernel_task_offsets();
        let mut ebpf = EbpfLoader::new()
            .override_global("AGENT_TGID", &ignore, true)
            .override_global("TASK_OFFSETS", &offsets, true)
            .load(bytes)
            .map_err(BpfError::Load)?;
        for program in [ENTER, EXIT] {
            uprobe(&mut ebpf, program)?
                .load()
                .map_err(|source| BpfError::Program { program, source })?;
        }
        let map = ebpf.take_map(EVENTS).ok_or(BpfError::MapMissing(EVENTS))?;
        let ring = RingBuf::try_from(map).map_err(|source| BpfError::Map {
            name: EVENTS,
            source,
        })?;
        // Readable-only interest: the ring buffer is never written from userspace.
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long as it
        // lives; the AsyncFd owns the RingBuf, so the fd outlives the registration.
        let events = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| BpfError::Poll(e.into()))?;
        let mut probes = Self {
            ebpf,
            events,
            pending: VecDeque::new(),
            libraries: Vec::new(),
            tamper: TamperStatus::Off,
        };

        let failures = probes.attach_all(candidates);
        if probes.libraries.is_empty() {
            return Err(BpfError::Attach(failures.join("; ")));
        }
        probes.attach_process_exit()?;
        for failure in &failures {
            log::warn!("could not attach to {RPMTS_RUN} in {failure}");
        }
        if let Some(watch) = &options.tamper {
            probes.tamper = match probes.load_tamper(watch) {
                Ok(()) => TamperStatus::Tracepoints {
                    fentry: probes.load_fentry(),
                },
                Err(reason) => {
                    // Programs that did attach would report half a picture: drop them all.
                    probes.unload_tamper();
                    TamperStatus::Unavailable(reason)
                }
            };
        }
        Ok(probes)
    }

    /// Without the exit hook a transaction whose process was killed inside `rpmtsRun` would
    /// stay open for good, so it is as required as the probes.
    fn attach_process_exit(&mut self) -> Result<(), BpfError> {
        tracefs::ensure_mounted().map_err(|e| {
            BpfError::Attach(format!(
                "tracefs is not available for sched_process_exit: {e}"
            ))
        })?;
        let program = PROCESS_EXIT;
        let tp: &mut TracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or(BpfError::ProgramMissing(program))?
            .try_into()
            .map_err(|source| BpfError::Program { program, source })?;
        tp.load()
            .map_err(|source| BpfError::Program { program, source })?;
        tp.attach("sched", "sched_process_exit")
            .map(drop)
            .map_err(|source| BpfError::Program { program, source })
    }

    /// Attaches both probes to each library not attached yet (by inode); returns failures.
    fn attach_all(&mut self, candidates: Vec<Library>) -> Vec<String> {
        let mut failures = Vec::new();
        for library in candidates {
            if self
                .libraries
                .iter()
                .any(|l| l.dev == library.dev && l.ino == library.ino)
            {
                continue;
            }
            let cookie = self.libraries.len() as u64;
            let attached = [ENTER, EXIT].into_iter().try_for_each(|program| {
                let probe = uprobe(&mut self.ebpf, program).map_err(|e| e.to_string())?;
                let point = UProbeAttachPoint {
                    location: RPMTS_RUN.into(),
                    cookie: Some(cookie),
                };
                probe
                    .attach(point, &library.path, UProbeScope::AllProcesses)
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
            match attached {
                Ok(()) => self.libraries.push(library),
                // A half-attached library (entry without return) only costs unmatched start
                // events; the return probe is what triggers scans.
                Err(e) => failures.push(format!("{}: {e}", library.path.display())),
            }
        }
        failures
    }

    /// Looks for librpm copies that are new or were replaced (an rpm-libs upgrade writes a new
    /// inode) and attaches to them. Returns the newly attached libraries.
    pub fn refresh_libraries(&mut self) -> Vec<Library> {
        self.attach_libraries(librpm::discover())
    }

    /// Attaches to those of `found` (a [`librpm::discover`] result, which can be computed off
    /// the event loop: it walks every process's maps) that are new. Returns them.
    pub fn attach_libraries(&mut self, found: Vec<Library>) -> Vec<Library> {
        let before = self.libraries.len();
        for failure in self.attach_all(found) {
            log::warn!("could not attach to {RPMTS_RUN} in {failure}");
        }
        self.libraries[before..].to_vec()
    }

    fn load_tamper(&mut self, watch: &TamperWatch) -> Result<(), String> {
        tracefs::ensure_mounted().map_err(|e| format!("tracefs is not available: {e}"))?;
        self.set_tamper_watch(watch).map_err(|e| e.to_string())?;
        for (program, category, tracepoints, required) in TAMPER_HOOKS {
            let tp: &mut TracePoint = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| format!("program `{program}` is missing from the BPF object"))?
                .try_into()
                .map_err(|e| format!("program `{program}`: {e}"))?;
            if let Err(e) = tp.load() {
                return Err(format!(
                    "the kernel refused tracepoint program `{program}`: {e}"
                ));
            }
            for (i, name) in tracepoints.iter().enumerate() {
                match tp.attach(category, name) {
                    Ok(_) => {}
                    Err(e) if *required && i == 0 => {
                        return Err(format!("attaching `{program}` to {category}/{name}: {e}"));
                    }
                    // Absent on some architectures or kernels (open, rename, openat2…).
                    Err(e) => log::debug!("tracepoint {category}/{name} not attached: {e}"),
                }
            }
        }
        Ok(())
    }

    fn unload_tamper(&mut self) {
        for (program, ..) in TAMPER_HOOKS {
            if let Some(Ok(tp)) = self
                .ebpf
                .program_mut(program)
                .map(<&mut TracePoint>::try_from)
            {
                let _ = tp.unload();
            }
        }
    }

    /// Loads the BTF-enabled fentry variant where the kernel permits it (detected by trying:
    /// many kernels, and these build machines, refuse fentry with EPERM).
    fn load_fentry(&mut self) -> Result<(), String> {
        let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
        let program: &mut FEntry = self
            .ebpf
            .program_mut(FENTRY_PROGRAM)
            .ok_or_else(|| format!("program `{FENTRY_PROGRAM}` is missing from the BPF object"))?
            .try_into()
            .map_err(|e| format!("program `{FENTRY_PROGRAM}`: {e}"))?;
        program.load(FENTRY_FUNCTION, &btf).map_err(|e| {
            format!(
                "the kernel refused fentry/{FENTRY_FUNCTION}: {}",
                root_cause(&e)
            )
        })?;
        program
            .attach()
            .map(drop)
            .map_err(|e| format!("attaching fentry/{FENTRY_FUNCTION}: {}", root_cause(&e)))
    }

    /// Replaces the watched directories and names (e.g. after the database moved).
    pub fn set_tamper_watch(&mut self, watch: &TamperWatch) -> Result<(), BpfError> {
        let mut prefixes: Array<_, WatchPrefix> = Array::try_from(
            self.ebpf
                .map_mut("WATCH_PREFIXES")
                .ok_or(BpfError::MapMissing("WATCH_PREFIXES"))?,
        )
        .map_err(|source| BpfError::Map {
            name: "WATCH_PREFIXES",
            source,
        })?;
        for i in 0..MAX_PREFIXES {
            let entry = watch
                .dirs
                .get(i as usize)
                .and_then(|d| prefix_entry(d))
                .unwrap_or(WatchPrefix {
                    len: 0,
                    bytes: [0; PREFIX_LEN],
                });
            prefixes.set(i, entry, 0).map_err(|source| BpfError::Map {
                name: "WATCH_PREFIXES",
                source,
            })?;
        }
        let mut names: Array<_, WatchName> = Array::try_from(
            self.ebpf
                .map_mut("WATCH_NAMES")
                .ok_or(BpfError::MapMissing("WATCH_NAMES"))?,
        )
        .map_err(|source| BpfError::Map {
            name: "WATCH_NAMES",
            source,
        })?;
        let mut usable = watch
            .names
            .iter()
            .filter(|n| !n.is_empty() && n.len() < NAME_LEN);
        for i in 0..MAX_NAMES {
            let entry = usable.next().map_or(
                WatchName {
                    len: 0,
                    bytes: [0; NAME_LEN],
                },
                |n| {
                    let mut bytes = [0; NAME_LEN];
                    bytes[..n.len()].copy_from_slice(n.as_bytes());
                    WatchName {
                        len: n.len() as u32,
                        bytes,
                    }
                },
            );
            names.set(i, entry, 0).map_err(|source| BpfError::Map {
                name: "WATCH_NAMES",
                source,
            })?;
        }
        Ok(())
    }

    /// Tracks descriptor `fd` of process `tgid`, open for writing on the watched file `path`,
    /// as if the open tracepoint had seen it (it was opened before the probes were there):
    /// its writes inside a transaction then become evidence. An entry the kernel has already
    /// is left alone.
    pub fn track_descriptor(&mut self, tgid: u32, fd: u32, path: &Path, flags: u32) {
        let Some(map) = self.ebpf.map_mut("WRITE_FDS") else {
            return;
        };
        let mut fds = match aya::maps::HashMap::<_, u64, OpenedFile>::try_from(map) {
            Ok(fds) => fds,
            Err(e) => {
                log::debug!("cannot track descriptors: {e}");
                return;
            }
        };
        let bytes = path.as_os_str().as_encoded_bytes();
        if bytes.len() >= PATH_LEN {
            return;
        }
        let mut entry = OpenedFile {
            reported: 0,
            tail_reported: 0,
            flags,
            dirfd: AT_FDCWD,
            path: [0; PATH_LEN],
        };
        entry.path[..bytes.len()].copy_from_slice(bytes);
        let key = (u64::from(tgid) << 32) | u64::from(fd);
        // BPF_NOEXIST: an entry the open tracepoint made keeps its reporting state.
        const BPF_NOEXIST: u64 = 1;
        // An error means the open tracepoint had it already (or the map is full: LRU).
        if fds.insert(key, entry, BPF_NOEXIST).is_ok() {
            log::debug!("tracking descriptor {fd} of {tgid} on {}", path.display());
        }
    }

    /// The libraries the probes are attached to; an event's `cookie` indexes this list.
    pub fn libraries(&self) -> &[Library] {
        &self.libraries
    }

    /// Whether the tamper signal works.
    pub fn tamper_status(&self) -> &TamperStatus {
        &self.tamper
    }

    /// The next record already in the ring buffer, without waiting: `None` once it is empty.
    /// Every record the kernel submitted before the call is seen by calls until it returns
    /// `None` (detection relies on this to order BPF records against inotify).
    pub fn try_next(&mut self) -> Option<BpfRecord> {
        if let Some(record) = self.pending.pop_front() {
            return Some(record);
        }
        let ring = self.events.get_mut();
        while let Some(item) = ring.next() {
            match decode(&item) {
                Ok(record) => self.pending.push_back(record),
                Err(e) => log::warn!("ignoring a BPF record: {e}"),
            }
        }
        self.pending.pop_front()
    }

    /// Waits until the ring buffer may have records. Cancel-safe.
    pub async fn readable(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            return Ok(());
        }
        let mut guard = self.events.readable_mut().await?;
        // Clear readiness before the caller drains: a record submitted meanwhile re-arms it.
        guard.clear_ready();
        Ok(())
    }

    /// The next record. Cancel-safe.
    pub async fn next(&mut self) -> io::Result<BpfRecord> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                return Ok(record);
            }
            let mut guard = self.events.readable_mut().await?;
            // Clear readiness before draining: a record submitted while we drain re-arms it,
            // so no wake-up is lost between the last read and the next wait.
            guard.clear_ready();
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                match decode(&item) {
                    Ok(record) => self.pending.push_back(record),
                    Err(e) => log::warn!("ignoring a BPF record: {e}"),
                }
            }
        }
    }
}

/// The innermost message of an error chain (aya wraps the OS error a few levels deep).
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message = format!("{message}: {inner}");
        source = inner.source();
    }
    message
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut UProbe, BpfError> {
    ebpf.program_mut(program)
        .ok_or(BpfError::ProgramMissing(program))?
        .try_into()
        .map_err(|source| BpfError::Program { program, source })
}

fn library_at(path: &Path) -> Option<Library> {
    let path = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    Some(Library {
        path,
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// A prefix entry for an absolute directory: the path with a trailing `/`, if it fits.
fn prefix_entry(dir: &Path) -> Option<WatchPrefix> {
    let mut text = dir.to_str()?.trim_end_matches('/').to_owned();
    if !text.starts_with('/') {
        return None;
    }
    text.push('/');
    if text.len() > PREFIX_LEN {
        log::warn!("{text} is too long to watch for tampering ({PREFIX_LEN} bytes at most)");
        return None;
    }
    let mut bytes = [0; PREFIX_LEN];
    bytes[..text.len()].copy_from_slice(text.as_bytes());
    Some(WatchPrefix {
        len: text.len() as u32,
        bytes,
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memory cgroups and
/// ignore it. Raising it is best effort.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct and has no other effects.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_get_one_trailing_slash() {
        let p = prefix_entry(Path::new("/var/lib/rpm/")).unwrap();
        assert_eq!(&p.bytes[..p.len as usize], b"/var/lib/rpm/");
        let p = prefix_entry(Path::new("/var/lib/rpm")).unwrap();
        assert_eq!(&p.bytes[..p.len as usize], b"/var/lib/rpm/");
        assert!(prefix_entry(Path::new("relative/dir")).is_none());
        assert!(prefix_entry(&Path::new("/").join("x".repeat(200))).is_none());
    }
}
