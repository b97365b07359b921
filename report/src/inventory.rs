//! A scanned system as the protocol's compact [`Document`]: one record per installed package,
//! with the repository dnf's history names for it, and what else the report says.

use guestwatch_protocol::inventory::{ChangeSummary, Document, PackageRecord, SystemFacts};
use rpmdb::Package;

use crate::SystemInfo;

/// The record of an installed package.
pub fn record(p: &Package, repository: Option<&str>) -> PackageRecord {
    PackageRecord {
        name: p.name.clone(),
        epoch: p.epoch,
        version: p.version.clone(),
        release: p.release.clone(),
        arch: p.arch.clone(),
        sourcerpm: p.sourcerpm.clone(),
        license: p.license.clone(),
        vendor: p.vendor.clone(),
        size: p.size,
        installtime: p.installtime,
        sigmd5: p.sigmd5.clone(),
        modularitylabel: p.modularitylabel.clone(),
        repository: repository.map(str::to_owned),
    }
}

/// What one scan gives a report.
pub struct Scanned<'a> {
    pub scan: &'a rpmdb::Scan,
    pub system: &'a SystemInfo,
    /// claircore's `package_db` (see [`crate::package_db`]).
    pub package_db: String,
    /// The database file as reports show it.
    pub database: String,
    pub scan_duration_ms: Option<u64>,
}

/// The compact document of a scan, with `changes` since the previous report.
pub fn document(s: &Scanned<'_>, changes: ChangeSummary) -> Document {
    let packages = s
        .scan
        .packages
        .iter()
        .map(|p| record(p, s.system.repository_of(p)))
        .collect();
    Document::new(
        packages,
        SystemFacts {
            distribution: s.system.distribution.clone(),
            package_db: s.package_db.clone(),
            backend: s.scan.backend.as_str().into(),
            database: s.database.clone(),
            gpg_pubkeys: s
                .scan
                .pubkeys
                .iter()
                .map(|k| format!("{}-{}-{}", k.name, k.version, k.release))
                .collect(),
            errors: s
                .scan
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.entry, e.reason))
                .chain(s.system.problems.iter().cloned())
                .collect(),
            history: s.system.history.clone(),
            scan_duration_ms: s.scan_duration_ms,
            changes,
        },
    )
}
