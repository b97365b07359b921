//! Change detection: one trigger stream from three sources, chosen at start.
//!
//! - eBPF (`ebpf.rs`): transaction boundaries from `rpmtsRun` with who ran them
//!   (`process.rs`), their writes, and tampering from syscall tracepoints (`confirm.rs`
//!   locates records of processes gone before /proc could be read).
//! - inotify (`inotify.rs`): the fallback, and beside eBPF a safety net for changes the
//!   probes cannot see (an unattached librpm copy, a writer BPF misses).
//! - periodic and startup scans (`pipeline.rs`).
//!
//! Beside eBPF, `explain.rs` decides by evidence which transactions changed the watched
//! database and which inotify changes they explain. Triggers are coalesced into scans by
//! `schedule.rs`, driven by `pipeline.rs`.

pub mod confirm;
pub mod ebpf;
pub mod explain;
pub mod inotify;
pub mod pipeline;
pub mod process;
pub mod schedule;
pub mod trigger;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use self::{
    confirm::TamperConfirmer,
    ebpf::{EbpfSource, Signal},
    explain::{Decision, ExplainConfig, Explainer, IgnoreReason},
    inotify::{DbDirWatcher, DirEvent, LOCK_FILE},
    process::{AttributionMode, Procfs},
    trigger::{Attribution, Trigger, TriggerKind},
};
use crate::{
    bpf::{BpfError, ProbeOptions, Probes, TamperStatus, TamperWatch},
    clock,
};

/// How often running transactions' processes are checked to be alive (a process killed
/// inside `rpmtsRun` whose exit record was lost must not keep its transaction open).
const LIVENESS_EVERY: Duration = Duration::from_secs(1);

/// Called for every transaction that does not count for the watched database.
#[derive(Clone)]
pub struct IgnoredHook(pub Arc<IgnoredFn>);

pub type IgnoredFn = dyn Fn(&Attribution, IgnoreReason) + Send + Sync;

/// Called with the reason when detection has no working source left at run time (only the
/// periodic rescan remains).
#[derive(Clone)]
pub struct LostHook(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for IgnoredHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IgnoredHook")
    }
}

/// The `--detector` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorChoice {
    /// eBPF when it loads and attaches, else inotify.
    Auto,
    /// eBPF only; fail if it cannot be used.
    Ebpf,
    /// inotify only.
    Inotify,
    /// Only the startup and periodic scans.
    Periodic,
}

/// The mode detection actually runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorMode {
    Ebpf,
    Inotify,
    Periodic,
}

impl DetectorMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Inotify => "inotify",
            Self::Periodic => "periodic",
        }
    }
}

/// What was chosen and why; logged once and reported.
#[derive(Clone, Debug, Serialize)]
pub struct DetectorStatus {
    pub mode: DetectorMode,
    /// Why eBPF is not used (when it was wanted but failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpf_unavailable: Option<String>,
    /// The tamper signal: which programs carry it, or why it is off.
    #[serde(serialize_with = "display")]
    pub tamper: TamperStatus,
    /// Why inotify is not running (when it was wanted but failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inotify_unavailable: Option<String>,
    /// librpm copies the transaction probes are attached to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub libraries: Vec<String>,
    /// The database directory being watched.
    pub watching: String,
}

/// What detection needs to know.
#[derive(Clone, Debug)]
pub struct DetectorConfig {
    pub choice: DetectorChoice,
    /// The rpm database directory (may not exist yet).
    pub dbdir: PathBuf,
    /// When set, BPF loading fails with this reason: a switch for exercising the fallback and
    /// for operators who must keep BPF off without changing `--detector`.
    pub disable_bpf: Option<String>,
    /// How often to look for new librpm copies (the periodic rescan interval).
    pub rediscover: Option<Duration>,
    /// The root being scanned, if any: attributions show database paths relative to it.
    pub root: Option<PathBuf>,
    /// How much of a transaction's context to record.
    pub attribution: AttributionMode,
    /// Told about every ignored transaction (metrics).
    pub on_ignored: Option<IgnoredHook>,
}

/// Names of files in an rpm database directory, for the tamper programs' relative-path check.
const DB_FILE_NAMES: &[&str] = &[
    "rpmdb.sqlite",
    "rpmdb.sqlite-wal",
    "rpmdb.sqlite-journal",
    "Packages",
    "Packages.db",
    "Index.db",
    ".rpm.lock",
];

/// The running sources, ready to be driven by [`Detector::run`].
pub struct Detector {
    ebpf: Option<EbpfSource>,
    inotify: Option<DbDirWatcher>,
    status: DetectorStatus,
    rediscover: Option<Duration>,
    on_ignored: Option<IgnoredHook>,
    on_lost: Option<LostHook>,
}

impl Detector {
    /// Sets up the sources for `config` (synchronously: loading BPF takes a moment).
    pub fn start(config: &DetectorConfig) -> Result<Self, DetectError> {
        let dbdir = &config.dbdir;
        let resolved = std::fs::canonicalize(dbdir).unwrap_or_else(|_| dbdir.clone());
        let mut watch_dirs = vec![dbdir.clone()];
        if resolved != *dbdir {
            watch_dirs.push(resolved);
        }
        let want_bpf = matches!(config.choice, DetectorChoice::Auto | DetectorChoice::Ebpf);
        let want_inotify = config.choice != DetectorChoice::Periodic;

        let (ebpf, bpf_unavailable) = if want_bpf {
            match load_probes(&watch_dirs, config.disable_bpf.as_deref()) {
                Ok(probes) => (
                    Some(EbpfSource::new(
                        probes,
                        watch_dirs.clone(),
                        config.root.clone(),
                        config.attribution,
                    )),
                    None,
                ),
                Err(e) if config.choice == DetectorChoice::Ebpf => return Err(DetectError::Bpf(e)),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        let (inotify, inotify_unavailable) = if want_inotify {
            match DbDirWatcher::new(dbdir) {
                Ok(w) => (Some(w), None),
                Err(e) if ebpf.is_none() && config.choice == DetectorChoice::Inotify => {
                    return Err(DetectError::Inotify {
                        dir: dbdir.clone(),
                        source: e,
                    });
                }
                Err(e) => (None, Some(format!("watching {}: {e}", dbdir.display()))),
            }
        } else {
            (None, None)
        };
        let mode = if ebpf.is_some() {
            DetectorMode::Ebpf
        } else if inotify.is_some() {
            DetectorMode::Inotify
        } else {
            DetectorMode::Periodic
        };
        let tamper = ebpf
            .as_ref()
            .map_or(TamperStatus::Off, |e| e.probes().tamper_status().clone());
        let libraries = ebpf
            .as_ref()
            .map(|e| {
                e.probes()
                    .libraries()
                    .iter()
                    .map(|l| l.path.display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let status = DetectorStatus {
            mode,
            bpf_unavailable,
            tamper,
            inotify_unavailable,
            libraries,
            watching: dbdir.display().to_string(),
        };
        status.log();
        Ok(Self {
            ebpf,
            inotify,
            status,
            rediscover: config.rediscover.filter(|d| !d.is_zero()),
            on_ignored: config.on_ignored.clone(),
            on_lost: None,
        })
    }

    pub fn status(&self) -> &DetectorStatus {
        &self.status
    }

    /// Tells `hook` when the last working source fails (for `/healthz`).
    pub fn on_lost(&mut self, hook: LostHook) {
        self.on_lost = Some(hook);
    }

    /// A source failed at run time: says so once nothing is left but the periodic rescan.
    fn source_failed(&mut self, what: &str, error: &std::io::Error) {
        log::error!("{what} failed: {error}; relying on the other detectors");
        if self.ebpf.is_none()
            && self.inotify.is_none()
            && let Some(hook) = &self.on_lost
        {
            (hook.0)(&format!(
                "no change detection left ({what} failed: {error}); only periodic rescans run"
            ));
        }
    }

    /// Feeds triggers into `triggers` until `stop` is cancelled or the receiver is gone.
    ///
    /// Beside eBPF, transactions and inotify changes go through the [`Explainer`]: a
    /// transaction that wrote the watched database triggers a scan when it ends; one that did
    /// not is ignored (and counted); an inotify change no transaction with evidence covers
    /// becomes an `inotify` trigger. Whenever either source is readable both are drained
    /// without waiting, so the explainer knows up to when each is complete. Inotify changes
    /// also confirm tamper records whose process exited too soon to be located
    /// (`confirm.rs`). Without eBPF, every inotify change is a trigger.
    pub async fn run(mut self, triggers: mpsc::Sender<Trigger>, stop: CancellationToken) {
        let mut state = Loop {
            confirmer: TamperConfirmer::default(),
            explainer: Explainer::new(ExplainConfig::default()),
            out: Vec::new(),
        };
        let procfs = Procfs::default();
        let mut rediscover = self
            .rediscover
            .map(|every| tokio::time::interval_at(Instant::now() + every, every));
        let mut discovering: Option<tokio::task::JoinHandle<Vec<crate::bpf::librpm::Library>>> =
            None;
        let mut liveness = tokio::time::interval(LIVENESS_EVERY);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = state.explainer.next_deadline().map(instant_of_boot_ns);
            let checking = state.explainer.running().next().is_some();
            tokio::select! {
                () = stop.cancelled() => return,
                ready = readable_bpf(&mut self.ebpf) => if let Err(e) = ready {
                    self.ebpf = None;
                    self.source_failed("reading BPF events", &e);
                },
                ready = readable_dir(&mut self.inotify) => if let Err(e) = ready {
                    self.inotify = None;
                    self.source_failed("inotify", &e);
                },
                () = sleep_until(deadline) => {}
                _ = liveness.tick(), if checking => {
                    let gone: Vec<_> = state
                        .explainer
                        .running()
                        .filter(|k| !process::still_running(&procfs, k.tgid, k.start_ns))
                        .collect();
                    let now = clock::boot_ns();
                    for key in gone {
                        log::debug!("process {} is gone inside its transaction", key.tgid);
                        state.out.extend(state.explainer.ended(key, Attribution::default, None, now, 0));
                    }
                }
                () = tick(&mut rediscover) => {
                    // New librpm copies (another soname, a container) are found on the periodic
                    // schedule, off the event loop (it walks every process's maps); replaced
                    // ones are caught after every transaction.
                    if self.ebpf.is_some() && discovering.is_none() {
                        discovering = Some(tokio::task::spawn_blocking(crate::bpf::librpm::discover));
                    }
                }
                found = join(&mut discovering) => {
                    discovering = None;
                    if let (Ok(found), Some(ebpf)) = (found, &mut self.ebpf) {
                        for library in ebpf.probes_mut().attach_libraries(found) {
                            log::info!("attached to rpmtsRun in newly found {}", library.path.display());
                        }
                    }
                }
            }
            self.pump(&mut state);
            let now = clock::boot_ns();
            let decided = state.explainer.settle(now);
            state.out.extend(decided);
            for decision in std::mem::take(&mut state.out) {
                match decision {
                    Decision::Trigger(trigger) => {
                        if triggers.send(*trigger).await.is_err() {
                            return;
                        }
                    }
                    Decision::Ignored { who, reason } => {
                        log::debug!(
                            "transaction of {} (pid {}) ignored: {}",
                            who.comm,
                            who.pid,
                            reason.as_str()
                        );
                        if let Some(hook) = &self.on_ignored {
                            (hook.0)(&who, reason);
                        }
                    }
                }
            }
        }
    }

    /// Drains both sources without waiting, telling the explainer up to when each is complete;
    /// a few rounds at most, so a flood cannot keep the loop from deciding.
    fn pump(&mut self, state: &mut Loop) {
        for _ in 0..8 {
            let mut progressed = false;
            if self.ebpf.is_some() {
                let until = clock::boot_ns();
                while let Some(signal) = self.ebpf.as_mut().and_then(EbpfSource::try_next) {
                    progressed = true;
                    state.signal(signal);
                }
                state.explainer.drained(Some(until), None);
            }
            if self.inotify.is_some() {
                let until = clock::boot_ns();
                loop {
                    let next = self.inotify.as_mut().map(DbDirWatcher::try_next);
                    match next {
                        Some(Ok(Some(event))) => {
                            progressed = true;
                            self.dir_event(event, state);
                        }
                        Some(Ok(None)) | None => break,
                        Some(Err(e)) => {
                            self.inotify = None;
                            self.source_failed("inotify", &e);
                            break;
                        }
                    }
                }
                state.explainer.drained(None, Some(until));
            } else {
                // Nothing can arrive by inotify: nothing is missing from it.
                state.explainer.drained(None, Some(clock::boot_ns()));
            }
            if !progressed {
                break;
            }
        }
    }

    /// What an inotify event means: beside eBPF a change for the explainer (the lock file says
    /// nothing the probes do not), else a trigger of its own.
    fn dir_event(&mut self, event: DirEvent, state: &mut Loop) {
        if let DirEvent::Moved { now_at } = &event {
            log::info!(
                "the rpm database directory moved; now watching {}",
                now_at
                    .as_deref()
                    .map_or("its nearest ancestor".to_owned(), |p| p
                        .display()
                        .to_string())
            );
        }
        let DirEvent::Changed { file, what } = &event else {
            state.trigger(inotify_trigger(&event));
            return;
        };
        if self.ebpf.is_none() {
            state.trigger(inotify_trigger(&event));
            return;
        }
        let read_ns = clock::boot_ns();
        let dir = self.inotify.as_ref().and_then(DbDirWatcher::watched_dir);
        let mut at_ns = read_ns;
        if let Some(dir) = dir {
            for tamper in state.confirmer.change(Instant::now(), file, dir) {
                state.trigger(tamper);
            }
            // Dated by the kernel: the file's ctime (the directory's for a removal).
            let changed = std::fs::symlink_metadata(dir.join(file))
                .or_else(|_| std::fs::metadata(dir))
                .and_then(|m| m.modified().map(|_| m));
            if let Ok(meta) = changed {
                use std::os::unix::fs::MetadataExt;
                let ctime = std::time::UNIX_EPOCH
                    + Duration::new(
                        u64::try_from(meta.ctime()).unwrap_or(0),
                        u32::try_from(meta.ctime_nsec()).unwrap_or(0),
                    );
                at_ns = clock::system_time_to_boot_ns(ctime).min(read_ns);
            }
        }
        if file == LOCK_FILE {
            return;
        }
        state.explainer.changed(at_ns, read_ns, file, what);
    }
}

/// What the detection loop carries between sources.
struct Loop {
    confirmer: TamperConfirmer,
    explainer: Explainer,
    /// Decisions waiting to be sent.
    out: Vec<Decision>,
}

impl Loop {
    fn trigger(&mut self, trigger: Trigger) {
        self.out.push(Decision::Trigger(Box::new(trigger)));
    }

    fn signal(&mut self, signal: Signal) {
        match signal {
            Signal::TxStarted { key, who, opened } => self.explainer.started(key, *who, opened),
            Signal::TxWrote { key, who, written } => self.explainer.wrote(key, || *who, written),
            Signal::TxEnded {
                key,
                who,
                return_code,
                end_ns,
                writes,
            } => {
                let decided = self
                    .explainer
                    .ended(key, || *who, return_code, end_ns, writes);
                self.out.extend(decided);
            }
            Signal::Tail { tgid, at_ns, name } => self.explainer.tail(tgid, at_ns, &name),
            Signal::Exited { tgid, exit_ns } => {
                let decided = self.explainer.exited(tgid, exit_ns);
                self.out.extend(decided);
            }
            Signal::Tamper(t) => self.out.push(Decision::Trigger(t)),
            Signal::Unconfirmed(record) => {
                if let Some(t) = self.confirmer.record(Instant::now(), *record) {
                    self.trigger(t);
                }
            }
            Signal::None => {}
        }
    }
}

/// The tokio instant at which the boot clock reads `ns`.
fn instant_of_boot_ns(ns: u64) -> Instant {
    let now = clock::boot_ns();
    Instant::now() + Duration::from_nanos(ns.saturating_sub(now))
}

async fn join<T>(
    handle: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match handle {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl DetectorStatus {
    fn log(&self) {
        match (&self.mode, &self.bpf_unavailable) {
            (DetectorMode::Ebpf, _) => log::info!(
                "detector: ebpf (rpmtsRun in {}; tamper signal: {}; inotify safety net on {})",
                self.libraries.join(", "),
                self.tamper,
                self.watching
            ),
            (mode, Some(why)) => {
                log::warn!("detector: {} — eBPF unavailable: {why}", mode.as_str())
            }
            (mode, None) => log::info!("detector: {} on {}", mode.as_str(), self.watching),
        }
        if let Some(why) = &self.inotify_unavailable {
            log::warn!("inotify unavailable: {why}");
        }
    }
}

fn display<T: std::fmt::Display, S: serde::Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn load_probes(watch_dirs: &[PathBuf], disabled: Option<&str>) -> Result<Probes, BpfError> {
    if let Some(reason) = disabled {
        return Err(BpfError::Disabled(reason.to_owned()));
    }
    Probes::load(&ProbeOptions {
        libraries: None,
        ignore_tgid: Some(std::process::id()),
        tamper: Some(TamperWatch {
            dirs: watch_dirs.to_vec(),
            names: DB_FILE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
        }),
    })
}

async fn readable_bpf(source: &mut Option<EbpfSource>) -> std::io::Result<()> {
    match source {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

async fn readable_dir(watcher: &mut Option<DbDirWatcher>) -> std::io::Result<()> {
    match watcher {
        Some(w) => w.readable().await,
        None => std::future::pending().await,
    }
}

fn inotify_trigger(event: &DirEvent) -> Trigger {
    let detail = match event {
        DirEvent::Changed { file, what } => format!("{file} {what}"),
        DirEvent::Moved { now_at: Some(at) } => {
            format!("database directory now at {}", at.display())
        }
        DirEvent::Moved { now_at: None } => "database directory disappeared".to_owned(),
        DirEvent::Overflow => "inotify queue overflowed".to_owned(),
    };
    Trigger::new(TriggerKind::Inotify).with_detail(detail)
}

/// Why detection could not start in the requested mode.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("--detector ebpf: {0}")]
    Bpf(#[source] BpfError),
    #[error("--detector inotify: cannot watch {}: {source}", dir.display())]
    Inotify {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The database directory to watch for a `--dbpath` (a directory, or a database file in one).
pub fn dbdir_for(dbpath: &Path) -> PathBuf {
    if dbpath.is_file() {
        dbpath
            .parent()
            .map_or_else(|| dbpath.to_path_buf(), Path::to_path_buf)
    } else {
        dbpath.to_path_buf()
    }
}
