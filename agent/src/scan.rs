//! Scanning the system: find the rpm database (under a root, or given directly), read it, and
//! fingerprint the package set.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::TargetSpec,
    detect::{pipeline::Scanner, schedule::Batch},
    inventory,
};

/// One scan's result.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub scan: rpmdb::Scan,
    pub content_hash: [u8; 32],
    pub duration: Duration,
    pub finished_at: SystemTime,
}

/// Why a scan failed (only an unreadable rpm database is fatal to a scan).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Db(#[from] rpmdb::DbError),
}

/// Scans one system.
#[derive(Clone, Debug)]
pub struct SystemScanner {
    target: TargetSpec,
}

impl SystemScanner {
    pub fn new(target: TargetSpec) -> Self {
        Self { target }
    }

    pub fn target(&self) -> &TargetSpec {
        &self.target
    }

    /// The database directory detection should watch (it may not exist yet).
    pub fn dbdir(&self) -> PathBuf {
        match &self.target {
            TargetSpec::DbPath(path) => crate::detect::dbdir_for(path),
            TargetSpec::Root(root) => {
                rpmdb::locate(root).unwrap_or_else(|_| root.join("usr/lib/sysimage/rpm"))
            }
        }
    }

    /// The database path to read.
    fn database(&self) -> Result<PathBuf, rpmdb::DbError> {
        match &self.target {
            TargetSpec::DbPath(path) => Ok(path.clone()),
            TargetSpec::Root(root) => rpmdb::locate(root),
        }
    }

    /// Scans now.
    pub fn scan_now(&self) -> Result<Snapshot, ScanError> {
        let started = Instant::now();
        let scan = rpmdb::read(&self.database()?)?;
        let content_hash = inventory::content_hash(&scan.packages);
        Ok(Snapshot {
            content_hash,
            duration: started.elapsed(),
            finished_at: SystemTime::now(),
            scan,
        })
    }
}

impl Scanner for SystemScanner {
    type Output = Snapshot;
    type Error = ScanError;

    fn scan(&mut self, _batch: &Batch) -> Result<Snapshot, ScanError> {
        self.scan_now()
    }
}

/// Path of the database as shown in reports: relative to the root when scanning a root.
pub fn shown_path(target: &TargetSpec, database: &Path) -> String {
    match target {
        TargetSpec::Root(root) => database
            .strip_prefix(root)
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_else(|_| database.display().to_string()),
        TargetSpec::DbPath(_) => database.display().to_string(),
    }
}
