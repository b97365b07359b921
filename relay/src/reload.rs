//! VMs come and go while the relay runs: the CID map (`--cid-map`), the TOML file's `pull`
//! list and the sockets in `--pull-dir` are read again when they change (inotify on their
//! directories, so editors' and Kubernetes' rename-into-place count), on SIGHUP, and every
//! [`RECHECK`] as a safety net. A reload that fails keeps what was loaded before.
//!
//! Applying a reload touches only what changed: other VMs keep their sessions and their cached
//! reports. A name the CID map no longer gives (or gives to another CID) has its connections
//! closed — its guest reconnects under its new identity — and a pull target that is gone is
//! closed; both are counted (`vms_removed_total`). A removed VM's cached report, already
//! accepted from it, is still delivered.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use inotify::{Inotify, WatchMask};
use tokio::{io::unix::AsyncFd, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{FileConfig, HybridVm, check_pull_names},
    identity::CidMap,
    listen::Admitter,
    metrics::Metrics,
    pull::{PullAddr, PullTarget, Puller},
    pulldir,
};

/// How often everything is read again even without a notification.
pub const RECHECK: Duration = Duration::from_secs(30);
/// Changes arriving together (an editor's write-rename-chmod) are one reload.
const SETTLE: Duration = Duration::from_millis(100);

/// Where the reloadable configuration comes from.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// The TOML file; its `pull` list is reread when `pull_from_file`.
    pub config_file: Option<PathBuf>,
    pub pull_from_file: bool,
    /// Pull targets given as flags (fixed for the relay's lifetime).
    pub fixed_pull: Vec<PullTarget>,
    pub pull_dir: Option<PathBuf>,
    pub pull_port: u32,
    pub cid_map: Option<PathBuf>,
    pub allow_loopback_cid: bool,
    /// `--hybrid` VMs (fixed): their names are taken.
    pub hybrid: Vec<HybridVm>,
}

/// One consistent reading of the sources.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    pub cids: CidMap,
    /// Configured targets first, then the pull directory's.
    pub targets: Vec<PullTarget>,
    /// Entries of the pull directory that were not taken, and why.
    pub skipped: Vec<String>,
}

impl Sources {
    /// Reads every source; an error names the file and leaves the caller's state alone.
    pub fn load(&self) -> Result<Loaded, String> {
        let cids = match &self.cid_map {
            Some(path) => CidMap::load_allowing_loopback(path, self.allow_loopback_cid)
                .map_err(|e| e.to_string())?,
            None => CidMap::default(),
        }
        .allow_loopback(self.allow_loopback_cid);
        let configured = match (&self.config_file, self.pull_from_file) {
            (Some(path), true) => FileConfig::load(path)
                .and_then(|file| file.pull_targets())
                .map_err(|e| e.to_string())?,
            _ => self.fixed_pull.clone(),
        };
        check_pull_names(&configured, &self.hybrid).map_err(|e| e.to_string())?;
        for target in &configured {
            check_against_cid_map(target, &cids)?;
        }
        let mut targets = configured;
        let mut skipped = Vec::new();
        if let Some(dir) = &self.pull_dir {
            let found = pulldir::scan(dir, self.pull_port)
                .map_err(|e| format!("reading the pull directory {}: {e}", dir.display()))?;
            skipped.extend(
                found
                    .skipped
                    .into_iter()
                    .map(|name| format!("{name}: not a valid VM name")),
            );
            for target in found.targets {
                let taken = targets.iter().any(|t| t.name == target.name)
                    || self.hybrid.iter().any(|h| h.name == target.name)
                    || cids.cid_of(&target.name).is_some();
                if taken {
                    skipped.push(format!(
                        "{}{}: the name {} is configured elsewhere",
                        target.name,
                        pulldir::SUFFIX,
                        target.name
                    ));
                } else {
                    targets.push(target);
                }
            }
        }
        Ok(Loaded {
            cids,
            targets,
            skipped,
        })
    }

    /// The directories whose changes may change what [`Sources::load`] reads.
    fn watched_dirs(&self) -> Vec<PathBuf> {
        let parent = |p: &Path| {
            p.parent()
                .map(|d| {
                    if d.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        d.to_path_buf()
                    }
                })
                .unwrap_or_else(|| PathBuf::from("/"))
        };
        let mut dirs = BTreeSet::new();
        if self.pull_from_file
            && let Some(file) = &self.config_file
        {
            dirs.insert(parent(file));
        }
        if let Some(map) = &self.cid_map {
            dirs.insert(parent(map));
        }
        if let Some(dir) = &self.pull_dir {
            dirs.insert(dir.clone());
        }
        dirs.into_iter().collect()
    }
}

/// A pull target and the CID map must agree on who a vsock VM is: one VM, one name.
fn check_against_cid_map(target: &PullTarget, cids: &CidMap) -> Result<(), String> {
    if let PullAddr::Vsock { cid, .. } = target.addr
        && let Some(name) = cids.name_of(cid)
        && name != target.name
    {
        return Err(format!(
            "pull target {} dials CID {cid}, which the CID map names {name}",
            target.name
        ));
    }
    if let Some(cid) = cids.cid_of(&target.name)
        && !matches!(target.addr, PullAddr::Vsock { cid: c, .. } if c == cid)
    {
        return Err(format!(
            "pull target {} is not at CID {cid}, which the CID map names {}",
            target.name, target.name
        ));
    }
    Ok(())
}

/// Applies reloads until `stop`, then ends the pulled VMs' sessions within `grace`.
pub struct Reloader {
    pub sources: Sources,
    pub current: Loaded,
    pub cids: watch::Sender<Arc<CidMap>>,
    pub admitter: Arc<Admitter>,
    pub puller: Puller,
    pub metrics: Metrics,
}

impl Reloader {
    pub async fn run(mut self, stop: CancellationToken, grace: Duration) {
        let mut watcher = match DirWatcher::new() {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!(
                    "cannot watch the configuration for changes ({e}); it is reloaded on \
                     SIGHUP and every {RECHECK:?}"
                );
                None
            }
        };
        if let Some(w) = watcher.as_mut() {
            w.watch(&self.sources.watched_dirs());
        }
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        loop {
            let why = tokio::select! {
                () = stop.cancelled() => break,
                Some(()) = recv_opt(&mut hangup) => "SIGHUP",
                changed = changes(&mut watcher) => {
                    if let Err(e) = changed {
                        log::warn!("watching the configuration: {e}");
                        watcher = None;
                    }
                    // The rest of a burst of changes is part of this reload.
                    tokio::time::sleep(SETTLE).await;
                    if let Some(w) = watcher.as_mut() {
                        let _ = w.drain();
                    }
                    "a file changed"
                }
                _ = recheck.tick() => "recheck",
            };
            self.reload(why);
            // Directories may have been created or replaced: watch what is there now.
            if let Some(w) = watcher.as_mut() {
                w.watch(&self.sources.watched_dirs());
            }
        }
        self.puller.shutdown(grace).await;
    }

    /// Reads the sources and applies what changed.
    pub fn reload(&mut self, why: &str) {
        let quiet = why == "recheck";
        let loaded = match self.sources.load() {
            Ok(loaded) => loaded,
            Err(e) => {
                Metrics::result(&self.metrics.reloads, "failed");
                log::error!("reload ({why}) failed, keeping the previous configuration: {e}");
                return;
            }
        };
        if loaded == self.current {
            if !quiet {
                Metrics::result(&self.metrics.reloads, "unchanged");
                log::info!("reload ({why}): nothing changed");
            }
            return;
        }
        Metrics::result(&self.metrics.reloads, "applied");
        for skipped in &loaded.skipped {
            if !self.current.skipped.contains(skipped) {
                log::warn!("pull directory: skipping {skipped}");
            }
        }
        if loaded.cids != self.current.cids {
            for name in self.current.cids.names_dropped_by(&loaded.cids) {
                let closed = self.admitter.close_vm(&name);
                Metrics::reason(&self.metrics.vms_removed, "cid_map");
                log::info!(
                    "the CID map no longer names {name} as before: closed its {closed} \
                     connection(s)"
                );
            }
            self.cids.send_replace(Arc::new(loaded.cids.clone()));
            log::info!("reload ({why}): CID map applied");
        }
        if loaded.targets != self.current.targets {
            let removed = self.puller.apply(&loaded.targets);
            log::info!(
                "reload ({why}): {} pull target(s), {} removed",
                loaded.targets.len(),
                removed.len()
            );
        }
        self.current = loaded;
    }
}

async fn recv_opt(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn changes(watcher: &mut Option<DirWatcher>) -> io::Result<()> {
    match watcher {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// inotify on a few directories: says only *that* something in them changed; what changed is
/// found by reading the sources again.
struct DirWatcher {
    inotify: AsyncFd<Inotify>,
    buffer: Vec<u8>,
}

impl DirWatcher {
    fn new() -> io::Result<Self> {
        let inotify = Inotify::init()?;
        // SAFETY: the Inotify owns its (non-blocking) descriptor and keeps it open, unchanged,
        // for as long as it lives; the AsyncFd owns the Inotify, so the descriptor outlives
        // the registration.
        let inotify = unsafe { AsyncFd::register(inotify) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            inotify,
            buffer: vec![0u8; 16 * 1024],
        })
    }

    /// Watches `dirs` (adding a directory twice is harmless; missing ones are skipped and
    /// watched once they exist, at a later reload).
    fn watch(&mut self, dirs: &[PathBuf]) {
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MODIFY
            | WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::ATTRIB
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR;
        for dir in dirs {
            if let Err(e) = self.inotify.get_mut().watches().add(dir, mask) {
                log::debug!("not watching {}: {e}", dir.display());
            }
        }
    }

    /// Waits for the next change. Cancel-safe.
    async fn changed(&mut self) -> io::Result<()> {
        loop {
            if self.drain()? {
                return Ok(());
            }
            let mut guard = self.inotify.readable_mut().await?;
            guard.clear_ready();
        }
    }

    /// Reads every queued event; whether there was any.
    fn drain(&mut self) -> io::Result<bool> {
        let mut any = false;
        loop {
            match self.inotify.get_mut().read_events(&mut self.buffer) {
                Ok(events) => {
                    let n = events.count();
                    if n == 0 {
                        return Ok(any);
                    }
                    any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(spec: &str) -> PullTarget {
        spec.parse().unwrap()
    }

    #[test]
    fn loads_configured_and_directory_targets_and_checks_names() {
        let dir = tempfile::tempdir().unwrap();
        let pulls = dir.path().join("vms");
        std::fs::create_dir(&pulls).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(pulls.join("a.vsock")).unwrap();
        let _web = std::os::unix::net::UnixListener::bind(pulls.join("web-1.vsock")).unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, "pull = [\"a=unix:/run/a.sock\"]\n").unwrap();
        let map = dir.path().join("cids");
        std::fs::write(&map, "3 web-1\n4 b\n").unwrap();
        let sources = Sources {
            config_file: Some(config.clone()),
            pull_from_file: true,
            pull_dir: Some(pulls.clone()),
            pull_port: 919,
            cid_map: Some(map.clone()),
            ..Sources::default()
        };
        let loaded = sources.load().unwrap();
        // a from the file wins over a.vsock; web-1.vsock collides with the CID map.
        assert_eq!(loaded.targets, vec![target("a=unix:/run/a.sock")]);
        assert_eq!(loaded.skipped.len(), 2, "{:?}", loaded.skipped);
        assert_eq!(loaded.cids.name_of(3), Some("web-1"));
        let mut dirs = sources.watched_dirs();
        dirs.sort();
        assert_eq!(dirs, vec![dir.path().to_path_buf(), pulls]);

        // A vsock pull target must agree with the CID map.
        std::fs::write(&config, "pull = [\"b=vsock:4:919\"]\n").unwrap();
        assert!(sources.load().is_ok());
        std::fs::write(&config, "pull = [\"c=vsock:4:919\"]\n").unwrap();
        assert!(sources.load().unwrap_err().contains("names b"));
        std::fs::write(&config, "pull = [\"b=unix:/x\"]\n").unwrap();
        assert!(sources.load().unwrap_err().contains("CID 4"));
        std::fs::write(&config, "pull = [\"x=nonsense\"]\n").unwrap();
        assert!(sources.load().is_err());
        std::fs::write(&map, "2 host\n").unwrap();
        assert!(sources.load().is_err());
    }
}
