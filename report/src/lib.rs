//! Turning a scanned system into the reports security teams consume:
//!
//! - [`system`]: what the root says about itself — the distribution (`os-release`,
//!   `system-release-cpe`) and which repository each package came from (dnf4/dnf5 history);
//! - [`hash`]: the order-independent content hash of a package set;
//! - [`changes`]: what changed between two scans;
//! - [`claircore`]: a claircore-compatible IndexReport with guestwatch's facts;
//! - [`cyclonedx`]: a CycloneDX 1.6 SBOM.
//!
//! Reports are deterministic: ids derive from content and maps are ordered, so the same system
//! gives byte-identical documents.
#![forbid(unsafe_code)]
//!
//! Rendering (`claircore`, `changes`, `hash`, `facts`) works on the protocol's compact
//! [`Document`] and needs no I/O: the relay renders with it too. Reading a system (`system`,
//! `inventory`, `cyclonedx`) is the `read` feature (default), which the relay does without.

pub mod changes;
pub mod claircore;
#[cfg(feature = "read")]
pub mod cyclonedx;
pub mod facts;
pub mod hash;
#[cfg(feature = "read")]
pub mod inventory;
#[cfg(feature = "read")]
pub mod system;

pub use changes::{Change, ChangeSummary};
pub use facts::Facts;
pub use guestwatch_protocol::inventory::{Distribution, Document, PackageRecord, SystemFacts};
pub use hash::content_hash;
#[cfg(feature = "read")]
pub use rpmdb::Package;
#[cfg(feature = "read")]
pub use system::{SystemInfo, SystemReader};

/// Everything a CycloneDX SBOM is built from (the rpm database's full headers).
#[cfg(feature = "read")]
pub struct ReportInput<'a> {
    /// Installed packages (gpg-pubkeys excluded).
    pub packages: &'a [std::sync::Arc<Package>],
    /// Where the packages were read, as `<backend>:<path relative to the root>`.
    pub package_db: &'a str,
    pub system: &'a SystemInfo,
    pub facts: &'a Facts,
}

/// How claircore names a package database: `<backend>:<directory relative to the root>`,
/// e.g. `sqlite:usr/lib/sysimage/rpm`.
#[cfg(feature = "read")]
pub fn package_db(
    backend: rpmdb::Backend,
    dir: &std::path::Path,
    root: Option<&std::path::Path>,
) -> String {
    let shown = root
        .and_then(|r| dir.strip_prefix(r).ok())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| dir.display().to_string());
    format!("{}:{shown}", backend.as_str())
}

/// `[epoch:]version-release`, as rpm and claircore write an installed version.
pub fn evr(p: &PackageRecord) -> String {
    match p.epoch {
        Some(e) => format!("{e}:{}-{}", p.version, p.release),
        None => format!("{}-{}", p.version, p.release),
    }
}

/// The order of [`RecordKey`](guestwatch_protocol::inventory::RecordKey) (its fields, in
/// declaration order), on borrowed fields: a [`Document`]'s order.
pub fn key_order(a: &PackageRecord, b: &PackageRecord) -> std::cmp::Ordering {
    (&a.name, a.epoch, &a.version, &a.release, &a.arch)
        .cmp(&(&b.name, b.epoch, &b.version, &b.release, &b.arch))
}

/// A short, stable id for a string: the first 8 bytes of its SHA-256, as hex.
pub(crate) fn id_of(text: &str) -> String {
    id_of_parts([text])
}

/// [`id_of`] the concatenation of `parts`, without making it.
pub(crate) fn id_of_parts<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}
