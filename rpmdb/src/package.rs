//! One installed package, as the rpm database describes it.

use serde::{Deserialize, Serialize};

/// An installed package. Field names are rpm tag names in lower case (the `--format packages`
/// JSON-lines contract serialises this struct as is). Optional tags absent from the header
/// are `None`; in particular `epoch: None` (no EPOCH tag) differs from `Some(0)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub epoch: Option<u32>,
    pub version: String,
    pub release: String,
    /// `None` for headers without ARCH (gpg-pubkey pseudo-packages).
    pub arch: Option<String>,
    /// The source package file name, e.g. `curl-7.76.0-6.cm2.src.rpm`.
    pub sourcerpm: Option<String>,
    pub license: Option<String>,
    pub vendor: Option<String>,
    /// Installed size in bytes (LONGSIZE when present, else SIZE).
    pub size: Option<u64>,
    /// Install time, seconds since the Unix epoch.
    pub installtime: Option<u64>,
    /// Header+payload MD5 as lower-case hex.
    pub sigmd5: Option<String>,
    /// `name:stream:version:context` for modular packages.
    pub modularitylabel: Option<String>,
    pub summary: Option<String>,
    /// PROVIDENAME, in header order.
    pub provides: Vec<String>,
    /// REQUIRENAME, in header order (duplicates kept, as rpm stores them).
    pub requires: Vec<String>,
    /// The file digest algorithm, e.g. `PGPHASHALGO_SHA256`.
    pub filedigestalgo: Option<String>,
    /// Summary of the header+payload OpenPGP signature (SIGPGP), as rpm's `pgpsig` prints it.
    pub pgp: Option<String>,
    /// Summary of the header-only RSA signature (RSAHEADER).
    pub rsaheader: Option<String>,
}
