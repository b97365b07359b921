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
    Document {
        packages: sorted(packages),
        system: system_facts(s, changes),
    }
}

/// Records in a [`Document`]'s order: sorted by [`RecordKey`](guestwatch_protocol::inventory::RecordKey),
/// the first of equal keys kept — what `Document::new` does, without making a key per record
/// and two per comparison (which, for 10,000 packages, cost more than the scan's decoding).
pub fn sorted(mut records: Vec<PackageRecord>) -> Vec<PackageRecord> {
    records.sort_by(key_order);
    records.dedup_by(|later, kept| key_order(later, kept).is_eq());
    records
}

pub use crate::key_order;

/// What a document says about the system beside its packages.
pub fn system_facts(s: &Scanned<'_>, changes: ChangeSummary) -> SystemFacts {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_records_are_in_the_order_documents_keep() {
        let mut rng_state = 16u64;
        let mut next = move |n: u64| {
            rng_state = rng_state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng_state >> 33) % n
        };
        let records: Vec<PackageRecord> = (0..400)
            .map(|i| PackageRecord {
                name: format!("n{}", next(20)),
                epoch: [None, Some(0), Some(1)][next(3) as usize],
                version: format!("{}.{}", next(3), next(2)),
                release: format!("{}", next(2)),
                arch: [None, Some("noarch".to_owned()), Some("x86_64".to_owned())]
                    [next(3) as usize]
                    .clone(),
                // Records of equal keys differ here: which one is kept matters.
                size: Some(i),
                ..PackageRecord::default()
            })
            .collect();
        let want = Document::new(records.clone(), SystemFacts::default()).packages;
        assert!(want.len() < records.len(), "duplicates were made");
        assert_eq!(sorted(records.clone()), want);
    }
}
