//! Change detection: one trigger stream from three sources, chosen at start.
//!
//! - eBPF (`ebpf.rs`): transaction ends from `rpmtsRun`, and tampering from syscall tracepoints
//!   (`confirm.rs` locates records of processes gone before /proc could be read).
//! - inotify (`inotify.rs`): the fallback, and beside eBPF a safety net for changes the
//!   probes cannot see (an unattached librpm copy, a writer BPF misses). In eBPF mode an inotify
//!   event during or just after a transaction is explained by it and dropped.
//! - periodic and startup scans (`pipeline.rs`).
//!
//! Triggers are coalesced into scans by `schedule.rs`, driven by `pipeline.rs`.

pub mod confirm;
pub mod ebpf;
pub mod inotify;
pub mod pipeline;
pub mod schedule;
pub mod trigger;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use self::{
    confirm::TamperConfirmer,
    ebpf::{EbpfSource, Signal},
    inotify::{DbDirWatcher, DirEvent},
    trigger::{Trigger, TriggerKind},
};
use crate::bpf::{BpfError, ProbeOptions, Probes, TamperStatus, TamperWatch};

/// How long after a transaction ends inotify events are still attributed to it.
const EXPLAINED_WINDOW: Duration = Duration::from_secs(2);

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
                Ok(probes) => (Some(EbpfSource::new(probes, watch_dirs.clone())), None),
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
        })
    }

    pub fn status(&self) -> &DetectorStatus {
        &self.status
    }

    /// Feeds triggers into `triggers` until `stop` is cancelled or the receiver is gone.
    ///
    /// Beside eBPF, an inotify change is held for [`EXPLAINED_WINDOW`]: a transaction that
    /// starts or ends meanwhile (rpm opens its database before `rpmtsRun`, and SQLite
    /// checkpoints after it) explains it and it is dropped; otherwise it becomes an `inotify`
    /// trigger, a change the probes did not see. Inotify changes also confirm tamper records
    /// whose process exited too soon to be located (`confirm.rs`).
    pub async fn run(mut self, triggers: mpsc::Sender<Trigger>, stop: CancellationToken) {
        let mut confirmer = TamperConfirmer::default();
        let mut active_tx: u32 = 0;
        let mut last_tx: Option<Instant> = None;
        let mut held: Option<(Instant, Trigger)> = None;
        let mut rediscover = self
            .rediscover
            .map(|every| tokio::time::interval_at(Instant::now() + every, every));
        loop {
            let release_at = held.as_ref().map(|(at, _)| *at + EXPLAINED_WINDOW);
            let trigger = tokio::select! {
                () = stop.cancelled() => return,
                () = tick(&mut rediscover) => {
                    // New librpm copies (another soname, a container) are found on the periodic
                    // schedule; replaced ones are caught after every transaction.
                    if let Some(ebpf) = &mut self.ebpf {
                        ebpf.rediscover_libraries();
                    }
                    continue;
                }
                () = sleep_until(release_at) => match held.take() {
                    Some((_, t)) if active_tx == 0 && last_tx.is_none_or(|l| l.elapsed() >= EXPLAINED_WINDOW) => t,
                    Some(_) | None => continue,
                },
                signal = next_bpf(&mut self.ebpf) => match signal {
                    Ok(Signal::TxStarted) => {
                        active_tx = active_tx.saturating_add(1);
                        last_tx = Some(Instant::now());
                        held = None;
                        continue;
                    }
                    Ok(Signal::Trigger(t)) => {
                        if t.kind == TriggerKind::Transaction {
                            active_tx = active_tx.saturating_sub(1);
                            last_tx = Some(Instant::now());
                            held = None;
                        }
                        *t
                    }
                    Ok(Signal::Unconfirmed(record)) => match confirmer.record(Instant::now(), *record) {
                        Some(t) => t,
                        None => continue,
                    },
                    Ok(Signal::None) => continue,
                    Err(e) => {
                        log::error!("reading BPF events failed: {e}; continuing with inotify");
                        self.ebpf = None;
                        continue;
                    }
                },
                event = next_dir(&mut self.inotify) => match event {
                    Ok(event) => {
                        if let DirEvent::Moved { now_at } = &event {
                            log::info!("the rpm database directory moved; now watching {}",
                                now_at.as_deref().map_or("its nearest ancestor".to_owned(), |p| p.display().to_string()));
                        }
                        if let (DirEvent::Changed { file, .. }, Some(dir), true) = (
                            &event,
                            self.inotify.as_ref().and_then(DbDirWatcher::watched_dir),
                            self.ebpf.is_some(),
                        ) {
                            for tamper in confirmer.change(Instant::now(), file, dir) {
                                if triggers.send(tamper).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let trigger = inotify_trigger(&event);
                        let explainable = matches!(event, DirEvent::Changed { .. });
                        if self.ebpf.is_some() && explainable {
                            let recent = active_tx > 0 || last_tx.is_some_and(|l| l.elapsed() < EXPLAINED_WINDOW);
                            if !recent && held.is_none() {
                                held = Some((Instant::now(), trigger));
                            }
                            continue;
                        }
                        trigger
                    }
                    Err(e) => {
                        log::error!("inotify failed: {e}; relying on the other detectors");
                        self.inotify = None;
                        continue;
                    }
                },
            };
            if triggers.send(trigger).await.is_err() {
                return;
            }
        }
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

async fn next_bpf(source: &mut Option<EbpfSource>) -> std::io::Result<Signal> {
    match source {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn next_dir(watcher: &mut Option<DbDirWatcher>) -> std::io::Result<DirEvent> {
    match watcher {
        Some(w) => w.next().await,
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
