//! Loading the transaction probes and reading their events.

use std::{collections::VecDeque, io, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{UProbe, uprobe::UProbeScope},
};
use tokio::io::{Interest, unix::AsyncFd};

use super::{
    event::{TxRecord, decode},
    librpm::{self, Library},
    object,
};

/// The function every librpm transaction passes through.
pub const RPMTS_RUN: &str = "rpmtsRun";
const ENTER: &str = "rpmts_run_enter";
const EXIT: &str = "rpmts_run_exit";
const EVENTS: &str = "EVENTS";

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

/// Options for [`TxProbes::load`].
#[derive(Clone, Debug, Default)]
pub struct ProbeOptions {
    /// Libraries to attach to; `None` discovers them (see [`librpm::discover`]).
    pub libraries: Option<Vec<PathBuf>>,
    /// A process whose transactions are not reported (the agent itself).
    pub ignore_tgid: Option<u32>,
}

/// The `rpmtsRun` uprobe/uretprobe pair, attached to every librpm, and its event stream.
pub struct TxProbes {
    // Owns the programs and links: dropping it detaches everything.
    _ebpf: Ebpf,
    events: AsyncFd<RingBuf<MapData>>,
    pending: VecDeque<TxRecord>,
    libraries: Vec<Library>,
}

impl TxProbes {
    /// Loads the embedded object and attaches to `rpmtsRun` in every librpm.
    pub fn load(options: &ProbeOptions) -> Result<Self, BpfError> {
        let bytes = object::OBJECT.ok_or(BpfError::NotBuilt)?;
        let libraries = match &options.libraries {
            Some(paths) => paths
                .iter()
                .filter_map(|p| {
                    use std::os::unix::fs::MetadataExt;
                    let meta = std::fs::metadata(p).ok()?;
                    Some(Library {
                        path: p.clone(),
                        dev: meta.dev(),
                        ino: meta.ino(),
                    })
                })
                .collect(),
            None => librpm::discover(),
        };
        if libraries.is_empty() {
            return Err(BpfError::NoLibrpm);
        }
        raise_memlock_limit();

        let ignore = options.ignore_tgid.unwrap_or(0);
        let mut ebpf = EbpfLoader::new()
            .override_global("AGENT_TGID", &ignore, true)
            .load(bytes)
            .map_err(BpfError::Load)?;

        let mut attached = Vec::new();
        let mut failures = Vec::new();
        for program in [ENTER, EXIT] {
            let probe: &mut UProbe = ebpf
                .program_mut(program)
                .ok_or(BpfError::ProgramMissing(program))?
                .try_into()
                .map_err(|source| BpfError::Program { program, source })?;
            probe
                .load()
                .map_err(|source| BpfError::Program { program, source })?;
            for (cookie, library) in libraries.iter().enumerate() {
                let point = aya::programs::uprobe::UProbeAttachPoint {
                    location: RPMTS_RUN.into(),
                    cookie: Some(cookie as u64),
                };
                match probe.attach(point, &library.path, UProbeScope::AllProcesses) {
                    Ok(_) if program == EXIT => attached.push(library.clone()),
                    Ok(_) => {}
                    Err(e) => failures.push(format!("{}: {e}", library.path.display())),
                }
            }
        }
        if attached.is_empty() {
            return Err(BpfError::Attach(failures.join("; ")));
        }
        for failure in &failures {
            log::warn!("could not attach to {RPMTS_RUN} in {failure}");
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
        Ok(Self {
            _ebpf: ebpf,
            events,
            pending: VecDeque::new(),
            libraries: attached,
        })
    }

    /// The libraries the probes are attached to; an event's `cookie` indexes this list.
    pub fn libraries(&self) -> &[Library] {
        &self.libraries
    }

    /// The next transaction record. Cancel-safe.
    pub async fn next(&mut self) -> io::Result<TxRecord> {
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
