//! Reading installed-package databases the way `rpm -qa` sees them.
//!
//! This crate is the ground truth of every guestwatch report and reads files an attacker inside
//! the VM may have crafted: it never panics, never allocates more than its input, opens
//! everything strictly read-only and never creates or deletes anything next to a database.
#![forbid(unsafe_code)]

pub mod bdb;
mod header;
mod locate;
pub mod ndb;
mod package;
mod pgp;
pub mod sqlite;

use std::path::{Path, PathBuf};

pub use header::HeaderError;

/// Decodes one header blob as stored in a database (no lead, no header magic).
pub fn decode_header(blob: &[u8]) -> Result<Package, HeaderError> {
    header::package(blob)
}
pub use locate::{locate, resolve_in_root};
pub use package::Package;

/// The storage format of a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    /// Berkeley DB hash `Packages`.
    Bdb,
    /// SUSE's `Packages.db`.
    Ndb,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Bdb => "bdb",
            Self::Ndb => "ndb",
        }
    }
}

/// An entry that was skipped, and why; the rest of the database is still read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EntryError {
    pub entry: String,
    pub reason: String,
}

/// Everything read from one database.
#[derive(Clone, Debug)]
pub struct Scan {
    pub backend: Backend,
    /// The database file read.
    pub path: PathBuf,
    /// Installed packages, in database order (gpg-pubkey pseudo-packages excluded).
    pub packages: Vec<Package>,
    /// gpg-pubkey pseudo-packages (imported signing keys).
    pub pubkeys: Vec<Package>,
    /// Entries skipped.
    pub errors: Vec<EntryError>,
}

/// Why a database could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{}: no rpm database found (looked for rpmdb.sqlite, Packages.db, Packages)", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: unknown format (not SQLite, Berkeley DB or NDB)", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("{}: not an rpm database: {reason}", path.display())]
    NotRpmDb { path: PathBuf, reason: String },
    #[error("{}: bad schema: {reason}", path.display())]
    BadSchema { path: PathBuf, reason: String },
    #[error("{}: locked by a running transaction", path.display())]
    Locked { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Sqlite { path: PathBuf, reason: String },
}

/// Database file names, in the order rpm prefers them.
const FILES: &[(&str, Backend)] = &[
    ("rpmdb.sqlite", Backend::Sqlite),
    ("Packages.db", Backend::Ndb),
    ("Packages", Backend::Bdb),
];

/// Detects a database's format from its first bytes.
fn sniff(path: &Path) -> Result<Backend, DbError> {
    use std::io::Read;
    let io = |source| DbError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 16];
    let mut file = std::fs::File::open(path).map_err(io)?;
    let n = file.read(&mut head).map_err(io)?;
    let head = &head[..n];
    if head.starts_with(b"SQLite format 3\0") {
        return Ok(Backend::Sqlite);
    }
    if head.starts_with(b"RpmP") {
        return Ok(Backend::Ndb);
    }
    // Berkeley DB: magic at byte 12, either byte order (hash 0x061561; btree 0x053162 is an
    // index file, which the reader then refuses by name).
    if head.len() >= 16 {
        let magic_le = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
        let magic_be = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        if [magic_le, magic_be]
            .iter()
            .any(|m| *m == 0x0006_1561 || *m == 0x0005_3162)
        {
            return Ok(Backend::Bdb);
        }
    }
    Err(DbError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

/// Reads every package from the database at `path` (a database directory or file).
pub fn read(path: &Path) -> Result<Scan, DbError> {
    let file = if path.is_dir() {
        FILES
            .iter()
            .map(|(name, _)| path.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| DbError::NotFound {
                path: path.to_path_buf(),
            })?
    } else {
        path.to_path_buf()
    };
    let backend = sniff(&file)?;
    let (all, errors) = match backend {
        Backend::Sqlite => sqlite::read(&file)?,
        Backend::Bdb => bdb::read(&file)?,
        Backend::Ndb => ndb::read(&file)?,
    };
    let (pubkeys, packages) = all
        .into_iter()
        .partition(|p: &Package| p.name == "gpg-pubkey");
    Ok(Scan {
        backend,
        path: file,
        packages,
        pubkeys,
        errors,
    })
}
