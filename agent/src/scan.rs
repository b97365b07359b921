//! Scanning the system: find the rpm database (under a root, or given directly), read it with
//! what the root says about itself (distribution, dnf history), fingerprint the package set,
//! and turn the result into the report documents of the `report` crate.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use report::{Document, Facts, ReportInput, SystemInfo, SystemReader};

use crate::{
    config::TargetSpec,
    detect::{pipeline::Scanner, schedule::Batch},
};

/// One scan's result.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub scan: rpmdb::Scan,
    /// Distribution and repositories; empty for a database scanned directly.
    pub system: SystemInfo,
    /// The report's records and facts (its `changes` empty: a report fills them in).
    pub document: Document,
    /// The content hash of `document`'s records.
    pub content_hash: [u8; 32],
    pub duration: Duration,
    pub finished_at: SystemTime,
    /// The database file as reports show it (relative to the root when a root was scanned).
    pub database: String,
    /// claircore's `package_db`: `<backend>:<directory>`.
    pub package_db: String,
}

/// Why a scan failed (only an unreadable rpm database is fatal to a scan).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Db(#[from] rpmdb::DbError),
}

/// Scans one system.
#[derive(Debug)]
pub struct SystemScanner {
    target: TargetSpec,
    /// Reads the root's distribution and history again only when their files change.
    system: Option<SystemReader>,
}

impl SystemScanner {
    pub fn new(target: TargetSpec) -> Self {
        let system = match &target {
            TargetSpec::Root(root) => Some(SystemReader::new(root)),
            TargetSpec::DbPath(_) => None,
        };
        Self { target, system }
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

    /// What to read: under a root, every file is resolved inside it.
    fn source(&self) -> rpmdb::Source<'_> {
        match &self.target {
            TargetSpec::DbPath(path) => rpmdb::Source::Path(path),
            TargetSpec::Root(root) => rpmdb::Source::Root(root),
        }
    }

    /// Scans now, with the default deadline.
    pub fn scan_now(&mut self) -> Result<Snapshot, ScanError> {
        self.scan_until(Instant::now() + rpmdb::DEFAULT_TIMEOUT)
    }

    /// Scans now; past `deadline` the database and history readers give up
    /// (`DbError::Deadline`), so an abandoned scan's thread stops too.
    pub fn scan_until(&mut self, deadline: Instant) -> Result<Snapshot, ScanError> {
        let started = Instant::now();
        let options = rpmdb::ReadOptions {
            deadline: Some(deadline),
            ..rpmdb::ReadOptions::default()
        };
        let scan = rpmdb::read_with(self.source(), &options)?;
        let system = self
            .system
            .as_mut()
            .map(|reader| reader.read_with(&options))
            .unwrap_or_else(SystemInfo::none);
        let root = match &self.target {
            TargetSpec::Root(root) => Some(root.as_path()),
            TargetSpec::DbPath(_) => None,
        };
        let dir = scan.path.parent().unwrap_or(&scan.path);
        let database = shown_path(&self.target, &scan.path);
        let package_db = report::package_db(scan.backend, dir, root);
        let duration = started.elapsed();
        let document = report::inventory::document(
            &report::inventory::Scanned {
                scan: &scan,
                system: &system,
                package_db: package_db.clone(),
                database: database.clone(),
                scan_duration_ms: Some(millis(duration)),
            },
            report::ChangeSummary::default(),
        );
        Ok(Snapshot {
            content_hash: document.content_hash().0,
            document,
            duration,
            finished_at: SystemTime::now(),
            database,
            package_db,
            system,
            scan,
        })
    }
}

impl Scanner for SystemScanner {
    type Output = Snapshot;
    type Error = ScanError;

    fn scan(&mut self, _batch: &Batch, deadline: Instant) -> Result<Snapshot, ScanError> {
        // The pipeline abandons the scan at `deadline` whatever happens; the readers stop there
        // too, so the abandoned thread does not linger.
        self.scan_until(deadline)
    }

    fn fresh(&self) -> Self {
        Self::new(self.target.clone())
    }
}

impl Snapshot {
    /// The facts of this scan as a one-off report; continuous reporting fills in the rest.
    pub fn facts(&self) -> Facts {
        Facts::of_document(env!("CARGO_PKG_VERSION"), &self.document)
    }

    /// What the report documents are built from.
    pub fn input<'a>(&'a self, facts: &'a Facts) -> ReportInput<'a> {
        ReportInput {
            packages: &self.scan.packages,
            package_db: &self.package_db,
            system: &self.system,
            facts,
        }
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

/// Milliseconds of a duration, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
