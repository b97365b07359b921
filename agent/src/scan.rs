//! Scanning the system: find the rpm database (under a root, or given directly), read it with
//! what the root says about itself (distribution, dnf history), fingerprint the package set,
//! and turn the result into the report documents of the `report` crate.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use report::{Document, Facts, PackageRecord, ReportInput, SystemInfo, SystemReader};

use crate::{
    config::TargetSpec,
    detect::{pipeline::Scanner, schedule::Batch, trigger::TriggerKind},
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
    /// How the database was read, and how many headers were decoded.
    pub decoding: Decoding,
}

/// How a scan read the database: every header decoded, or only those not seen before.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Decoding {
    /// Whether the scan could reuse the packages of an earlier scan.
    pub incremental: bool,
    /// Headers decoded.
    pub decoded: usize,
    /// Headers whose package was the earlier scan's (their blobs unchanged).
    pub reused: usize,
}

/// Whether a scan decodes every header or only the changed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanMode {
    /// Every header decoded anew (startup, the periodic rescan, a one-off scan).
    Full,
    /// Only the headers the last scan did not see (change triggers).
    Incremental,
    /// A one-off scan (`guestwatch-agent scan`): every header decoded, nothing kept for a
    /// next scan (no memory spent on blob keys and records nobody reuses).
    Once,
}

impl ScanMode {
    /// The mode for a batch of triggers: the startup scan and the periodic rescan (and
    /// anything coalesced with them) read everything again, so nothing an incremental scan
    /// reused can outlive a period; transactions, inotify and tamper triggers decode only what
    /// changed. (Both read every blob: an incremental scan sees every change a full one sees.)
    pub fn for_batch(batch: &Batch) -> Self {
        let full = [
            TriggerKind::Startup,
            TriggerKind::Periodic,
            TriggerKind::Manual,
        ];
        if full.iter().any(|k| batch.counts.contains_key(k)) || full.contains(&batch.cause.kind) {
            Self::Full
        } else {
            Self::Incremental
        }
    }
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
    /// The packages of the last successful scan by header blob, for the next incremental
    /// scan: one scan's worth, replaced by every scan (empty after a failed one).
    records: rpmdb::Records,
    /// The report record and content-hash digest made of each package of the last scan, by
    /// the package's address: a package an incremental scan reuses is the same shared value,
    /// so its record is too (unless its repository changed). One scan's worth, like `records`.
    made: HashMap<usize, Made>,
}

/// What a scan made of one package for the report.
#[derive(Debug)]
struct Made {
    /// Held so that its address, the key, cannot be another package's meanwhile.
    package: Arc<rpmdb::Package>,
    record: PackageRecord,
    digest: [u8; 32],
}

fn address(package: &Arc<rpmdb::Package>) -> usize {
    Arc::as_ptr(package) as usize
}

impl SystemScanner {
    pub fn new(target: TargetSpec) -> Self {
        let system = match &target {
            TargetSpec::Root(root) => Some(SystemReader::new(root)),
            TargetSpec::DbPath(_) => None,
        };
        Self {
            target,
            system,
            records: rpmdb::Records::default(),
            made: HashMap::new(),
        }
    }

    /// Packages held for the next incremental scan.
    pub fn cached_records(&self) -> usize {
        self.records.len()
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

    /// Scans now, once ([`ScanMode::Once`]); past `deadline` the database and history
    /// readers give up (`DbError::Deadline`), so an abandoned scan's thread stops too.
    pub fn scan_until(&mut self, deadline: Instant) -> Result<Snapshot, ScanError> {
        self.scan_with(ScanMode::Once, deadline)
    }

    /// Scans now in `mode`. Either way every header blob is read and keyed, so the next
    /// incremental scan can reuse this one's packages; an incremental scan decodes only the
    /// blobs the last scan did not see, and finds exactly what a full scan would.
    pub fn scan_with(&mut self, mode: ScanMode, deadline: Instant) -> Result<Snapshot, ScanError> {
        let started = Instant::now();
        let options = rpmdb::ReadOptions {
            deadline: Some(deadline),
            ..rpmdb::ReadOptions::default()
        };
        let previous = std::mem::take(&mut self.records);
        let empty = rpmdb::Records::default();
        let read = match mode {
            ScanMode::Full => rpmdb::read_incremental(self.source(), &options, &empty)?,
            ScanMode::Incremental => rpmdb::read_incremental(self.source(), &options, &previous)?,
            ScanMode::Once => {
                self.made.clear();
                let scan = rpmdb::read_with(self.source(), &options)?;
                rpmdb::Incremental {
                    decoded: scan.packages.len() + scan.pubkeys.len(),
                    reused: 0,
                    records: rpmdb::Records::default(),
                    scan,
                }
            }
        };
        drop(previous);
        self.records = read.records;
        let decoding = Decoding {
            incremental: mode == ScanMode::Incremental && read.reused > 0,
            decoded: read.decoded,
            reused: read.reused,
        };
        log::debug!(
            "{} scan: {} headers decoded, {} reused",
            if mode == ScanMode::Incremental {
                "incremental"
            } else {
                "full"
            },
            read.decoded,
            read.reused
        );
        let scan = read.scan;
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
        let scanned = report::inventory::Scanned {
            scan: &scan,
            system: &system,
            package_db: package_db.clone(),
            database: database.clone(),
            scan_duration_ms: Some(millis(duration)),
        };
        let (document, content_hash) = if mode == ScanMode::Once {
            let document = report::inventory::document(&scanned, report::ChangeSummary::default());
            let hash = document.content_hash().0;
            (document, hash)
        } else {
            let (packages, hash) = self.records_of(&scan, &system);
            let system =
                report::inventory::system_facts(&scanned, report::ChangeSummary::default());
            (Document { packages, system }, hash)
        };
        Ok(Snapshot {
            content_hash,
            document,
            duration,
            finished_at: SystemTime::now(),
            database,
            package_db,
            system,
            scan,
            decoding,
        })
    }
}

impl SystemScanner {
    /// The document's records of `scan` (as `report::inventory::document` makes them) and
    /// their content hash, taking the record and digest of every package the last scan had
    /// from what it made.
    fn records_of(
        &mut self,
        scan: &rpmdb::Scan,
        system: &SystemInfo,
    ) -> (Vec<PackageRecord>, [u8; 32]) {
        let entries: Vec<Made> = scan
            .packages
            .iter()
            .map(|p| {
                let repository = system.repository_of(p);
                match self.made.remove(&address(p)) {
                    Some(made) if made.record.repository.as_deref() == repository => made,
                    _ => {
                        let record = report::inventory::record(p, repository);
                        Made {
                            package: p.clone(),
                            digest: report::hash::record_digest(&record),
                            record,
                        }
                    }
                }
            })
            .collect();
        // The document's order (sorted by key, the first of equal keys kept), on indices:
        // moving whole records around would cost more than comparing them.
        let key_order = report::inventory::key_order;
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by(|&a, &b| key_order(&entries[a].record, &entries[b].record));
        order.dedup_by(|later, kept| {
            key_order(&entries[*later].record, &entries[*kept].record).is_eq()
        });
        let records = order.iter().map(|&i| entries[i].record.clone()).collect();
        let hash = report::hash::content_hash_of_digests(
            order.iter().map(|&i| entries[i].digest).collect(),
        );
        self.made = entries
            .into_iter()
            .map(|m| (address(&m.package), m))
            .collect();
        (records, hash.0)
    }
}

impl Scanner for SystemScanner {
    type Output = Snapshot;
    type Error = ScanError;

    fn scan(&mut self, batch: &Batch, deadline: Instant) -> Result<Snapshot, ScanError> {
        // The pipeline abandons the scan at `deadline` whatever happens; the readers stop there
        // too, so the abandoned thread does not linger.
        self.scan_with(ScanMode::for_batch(batch), deadline)
    }

    /// A scanner with no records: after an abandoned scan, the next one decodes everything.
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::detect::trigger::Trigger;

    fn batch(kinds: &[TriggerKind]) -> Batch {
        Batch {
            cause: Trigger::new(*kinds.iter().max().unwrap()),
            counts: kinds.iter().map(|k| (*k, 1)).collect::<BTreeMap<_, _>>(),
            transactions: Vec::new(),
            tampers: Vec::new(),
        }
    }

    #[test]
    fn change_triggers_scan_incrementally_and_the_schedule_fully() {
        use TriggerKind as K;
        assert_eq!(ScanMode::for_batch(&batch(&[K::Startup])), ScanMode::Full);
        assert_eq!(ScanMode::for_batch(&batch(&[K::Periodic])), ScanMode::Full);
        for kind in [K::Transaction, K::Inotify, K::Tamper] {
            assert_eq!(ScanMode::for_batch(&batch(&[kind])), ScanMode::Incremental);
        }
        // A periodic rescan coalesced with a transaction is still a full one.
        assert_eq!(
            ScanMode::for_batch(&batch(&[K::Periodic, K::Transaction])),
            ScanMode::Full
        );
    }

    #[test]
    fn incremental_scans_reuse_the_last_scans_packages_and_report_the_same() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/rpmdb/go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(&fixture, tmp.path().join("rpmdb.sqlite")).unwrap();
        let mut scanner = SystemScanner::new(TargetSpec::DbPath(tmp.path().to_path_buf()));
        let deadline = || Instant::now() + Duration::from_secs(30);
        let full = scanner.scan_with(ScanMode::Full, deadline()).unwrap();
        let n = full.scan.packages.len() + full.scan.pubkeys.len();
        assert!(n > 0);
        assert_eq!((full.decoding.decoded, full.decoding.reused), (n, 0));
        assert_eq!(scanner.cached_records(), n);
        let again = scanner
            .scan_with(ScanMode::Incremental, deadline())
            .unwrap();
        assert_eq!((again.decoding.decoded, again.decoding.reused), (0, n));
        assert!(again.decoding.incremental);
        assert_eq!(again.scan.packages, full.scan.packages);
        assert_eq!(again.content_hash, full.content_hash);
        // What the records kept give is what the report crate makes of the scan.
        for snapshot in [&full, &again] {
            let made = report::inventory::document(
                &report::inventory::Scanned {
                    scan: &snapshot.scan,
                    system: &snapshot.system,
                    package_db: snapshot.package_db.clone(),
                    database: snapshot.database.clone(),
                    scan_duration_ms: snapshot.document.system.scan_duration_ms,
                },
                report::ChangeSummary::default(),
            );
            assert_eq!(made, snapshot.document);
            assert_eq!(made.content_hash().0, snapshot.content_hash);
        }
        assert_eq!(
            scanner.cached_records(),
            n,
            "the cache holds one scan's worth"
        );

        // One header removed: the rest is reused, the report is the full scan's.
        let stderr = delete_last_row(tmp.path());
        let after = scanner
            .scan_with(ScanMode::Incremental, deadline())
            .unwrap();
        let reference = SystemScanner::new(TargetSpec::DbPath(tmp.path().to_path_buf()))
            .scan_now()
            .unwrap();
        assert_eq!(after.scan.packages, reference.scan.packages);
        assert_eq!(after.content_hash, reference.content_hash);
        assert!(after.document.packages == reference.document.packages);
        assert_eq!(
            (after.decoding.decoded, after.decoding.reused),
            (0, n - 1),
            "{stderr}"
        );
        assert_eq!(scanner.cached_records(), n - 1);

        // A failed scan empties the cache: the next one decodes everything.
        std::fs::write(tmp.path().join("rpmdb.sqlite"), b"not a database").unwrap();
        assert!(
            scanner
                .scan_with(ScanMode::Incremental, deadline())
                .is_err()
        );
        assert_eq!(scanner.cached_records(), 0);
    }

    /// Deletes the last package row with the sqlite3 tool (the agent has no SQLite writer).
    fn delete_last_row(dir: &std::path::Path) -> String {
        let out = std::process::Command::new("sqlite3")
            .arg(dir.join("rpmdb.sqlite"))
            .arg("DELETE FROM Packages WHERE hnum = (SELECT max(hnum) FROM Packages)")
            .output()
            .expect("sqlite3 (apt-get install sqlite3)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}
