//! Reading installed-package databases the way `rpm -qa` sees them.
//!
//! This crate is the ground truth of every guestwatch report and reads files an attacker inside
//! the VM may have crafted: it never panics, never allocates more than its input, opens
//! everything strictly read-only and never creates or deletes anything next to a database.
#![forbid(unsafe_code)]

pub mod bdb;
pub mod confine;
mod header;
mod incremental;
mod locate;
pub mod ndb;
mod package;
mod pgp;
pub mod sqlite;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

pub use header::HeaderError;
pub use incremental::{BlobKey, Incremental, Records, blob_digest, read_incremental};

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
    /// Installed packages, in database order (gpg-pubkey pseudo-packages excluded). Shared:
    /// an incremental read hands out the packages an earlier read decoded, without copies.
    pub packages: Vec<Arc<Package>>,
    /// gpg-pubkey pseudo-packages (imported signing keys).
    pub pubkeys: Vec<Arc<Package>>,
    /// Entries skipped.
    pub errors: Vec<EntryError>,
    /// Bytes of header blobs handed to the decoder: at most about the file's size, whatever
    /// the file says (shared overflow chains or blobs are read once).
    pub bytes_decoded: u64,
    /// With [`ReadOptions::keep_blobs`]: a copy of every header blob handed to the decoder.
    pub blobs: Vec<HeaderBlob>,
}

/// One header blob as the database stores it (no lead, no header magic), as handed to the
/// decoder: every blob the storage layer delivered whole, whether it then decoded or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderBlob {
    /// Where it was stored (`hnum 12`, `page 3 entry 0`, `pkg 7`), as [`EntryError`] names it.
    pub entry: String,
    pub bytes: Vec<u8>,
}

/// How long [`read`] may take: the agent's default `--scan-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// rpm's largest header blob: 65535 index entries of 16 bytes, 256 MiB of data, 8 bytes of
/// counts.
pub const MAX_HEADER_BYTES: usize = 8 + 0xffff * 16 + 0x0fff_ffff;

/// How a database is read.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Past this instant the read is abandoned with [`DbError::Deadline`] (`None`: no limit).
    pub deadline: Option<Instant>,
    /// Header blobs larger than this are skipped as damaged entries, never loaded (default:
    /// rpm's own limit, [`MAX_HEADER_BYTES`]).
    pub max_header_bytes: usize,
    /// Keep a copy of every header blob handed to the decoder, gpg-pubkeys included, in
    /// [`Scan::blobs`] (off by default: it doubles what a scan holds). For differential tests
    /// against other decoders and for tools.
    pub keep_blobs: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            deadline: None,
            max_header_bytes: MAX_HEADER_BYTES,
            keep_blobs: false,
        }
    }
}

impl ReadOptions {
    /// Options whose deadline is `timeout` from now.
    pub fn timeout(timeout: Duration) -> Self {
        Self {
            deadline: Instant::now().checked_add(timeout),
            ..Self::default()
        }
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// `Err(Deadline)` once the deadline has passed.
    pub(crate) fn check(&self, path: &Path) -> Result<(), DbError> {
        if self.expired() {
            return Err(DbError::Deadline {
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }
}

/// What to read.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// The system at this root: the database is located inside it and every file is resolved
    /// inside it ([`confine`]).
    Root(&'a Path),
    /// A database directory or file named directly (`--dbpath`): the path is followed as
    /// given; the database files in a directory are still opened without following links.
    Path(&'a Path),
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
    #[error("{}: refused: {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{}: refused: {links} hard links (another one may be outside the root)", path.display())]
    HardLinked { path: PathBuf, links: u64 },
    #[error("{}: refused: replaced while it was being opened", path.display())]
    Replaced { path: PathBuf },
    #[error("{}: abandoned: the scan deadline passed", path.display())]
    Deadline { path: PathBuf },
    #[error("{}: over a reading limit: {reason}", path.display())]
    Limit { path: PathBuf, reason: String },
}

/// Database file names, in the order rpm prefers them.
const FILES: &[(&str, Backend)] = &[
    ("rpmdb.sqlite", Backend::Sqlite),
    ("Packages.db", Backend::Ndb),
    ("Packages", Backend::Bdb),
];

/// Detects a database's format from its first bytes.
fn sniff(file: &confine::Opened) -> Result<Backend, DbError> {
    let mut head = [0u8; 16];
    let n = file.read_head(&mut head)?;
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
        path: file.path().to_path_buf(),
    })
}

/// The first database file name present in `dir` (present as an entry of any kind: a
/// symlink or fifo by that name is then refused when opened, not skipped).
fn database_in(dir: &confine::Dir) -> Result<Option<&'static str>, DbError> {
    for (name, _) in FILES {
        if dir.entry(name)?.is_some() {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Reads every package from the database at `path` (a database directory or file), with
/// [`DEFAULT_TIMEOUT`] as deadline.
pub fn read(path: &Path) -> Result<Scan, DbError> {
    read_with(Source::Path(path), &ReadOptions::timeout(DEFAULT_TIMEOUT))
}

/// Reads every package from the database of `source`.
pub fn read_with(source: Source<'_>, options: &ReadOptions) -> Result<Scan, DbError> {
    read_into(source, options, None).map(|(scan, _)| scan)
}

/// Reads the database of `source`; with `reuse`, every blob is keyed and the packages of
/// blobs `reuse` already holds are taken from it instead of being decoded again.
pub(crate) fn read_into<'r>(
    source: Source<'_>,
    options: &ReadOptions,
    reuse: Option<&'r Records>,
) -> Result<(Scan, Option<incremental::Reuse<'r>>), DbError> {
    let (dir, name) = match source {
        Source::Root(root) => {
            options.check(root)?;
            let (dir, name) = locate::locate_in(&locate::open_root(root)?)?;
            (dir, name.to_owned())
        }
        Source::Path(path) => {
            options.check(path)?;
            plain(path)?
        }
    };
    let file = dir.open_file(&name)?;
    let backend = sniff(&file)?;
    let fresh = || Decoded::new(reuse);
    let read = match backend {
        Backend::Sqlite => sqlite::read(&dir, &name, &file, options, &fresh)?,
        Backend::Bdb => read_whole(&file, |data| bdb::read_into(data, options, fresh()))?,
        Backend::Ndb => read_whole(&file, |data| ndb::read_into(data, options, fresh()))?,
    };
    let (pubkeys, packages) = read
        .packages
        .into_iter()
        .partition(|p: &Arc<Package>| p.name == "gpg-pubkey");
    Ok((
        Scan {
            backend,
            path: file.path().to_path_buf(),
            packages,
            pubkeys,
            errors: read.errors,
            bytes_decoded: read.bytes_decoded,
            blobs: read.blobs,
        },
        read.reuse,
    ))
}

/// A database named directly: a directory (the first database file in it) or a file.
fn plain(path: &Path) -> Result<(confine::Dir, String), DbError> {
    let not_found = || DbError::NotFound {
        path: path.to_path_buf(),
    };
    let meta = std::fs::metadata(path).map_err(|source| DbError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        let dir = confine::Dir::open_plain(path)?;
        let name = database_in(&dir)?.ok_or_else(not_found)?;
        return Ok((dir, name.to_owned()));
    }
    // A file: the caller's path is followed as given, to the file it names.
    let real = std::fs::canonicalize(path).map_err(|source| DbError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (Some(parent), Some(file)) = (real.parent(), real.file_name().and_then(|n| n.to_str()))
    else {
        return Err(not_found());
    };
    Ok((confine::Dir::open_plain(parent)?, file.to_owned()))
}

/// Reads a backend that decodes its file whole (Berkeley DB, NDB), opened through its checked
/// descriptor: the file's bytes, handed to `decode`.
fn read_whole<'r>(
    file: &confine::Opened,
    decode: impl FnOnce(&[u8]) -> Result<Decoded<'r>, BytesError>,
) -> Result<Decoded<'r>, DbError> {
    let data = file.read_all(u64::MAX)?;
    decode(&data).map_err(|e| e.at(file.path()))
}

/// The `read_bytes` form of a whole-file read: the packages unshared, or why not.
pub(crate) fn owned(
    read: Result<Decoded<'static>, BytesError>,
) -> Result<(Vec<Package>, Vec<EntryError>), String> {
    read.map(Decoded::into_owned).map_err(|e| match e {
        BytesError::Invalid(reason) => reason,
        BytesError::Deadline => "deadline".into(),
    })
}

/// Why the bytes of a Berkeley DB or NDB file were not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BytesError {
    /// Not a usable database of that format.
    Invalid(String),
    /// The deadline passed.
    Deadline,
}

impl BytesError {
    fn at(self, path: &Path) -> DbError {
        let path = path.to_path_buf();
        match self {
            Self::Invalid(reason) => DbError::NotRpmDb { path, reason },
            Self::Deadline => DbError::Deadline { path },
        }
    }
}

/// What a backend read from one database file.
#[derive(Debug, Default)]
pub struct Decoded<'r> {
    pub packages: Vec<Arc<Package>>,
    pub errors: Vec<EntryError>,
    /// Bytes of header blobs handed to the decoder (or, read incrementally, looked up in the
    /// earlier read's records: the same number either way).
    pub bytes_decoded: u64,
    /// With [`ReadOptions::keep_blobs`]: every header blob handed to the decoder.
    pub blobs: Vec<HeaderBlob>,
    /// Reading incrementally: the earlier read's records and the ones kept for the next read.
    reuse: Option<incremental::Reuse<'r>>,
}

impl<'r> Decoded<'r> {
    pub(crate) fn new(reuse: Option<&'r Records>) -> Self {
        Self {
            packages: Vec::with_capacity(reuse.map_or(0, Records::len)),
            reuse: reuse.map(incremental::Reuse::new),
            ..Self::default()
        }
    }

    /// Keeps a copy of `blob`, about to be decoded, when the options ask for it.
    pub(crate) fn keep(
        &mut self,
        options: &ReadOptions,
        entry: impl FnOnce() -> String,
        blob: &[u8],
    ) {
        if options.keep_blobs {
            self.blobs.push(HeaderBlob {
                entry: entry(),
                bytes: blob.to_vec(),
            });
        }
    }

    /// The packages, unshared (nothing else holds them when no records were involved).
    pub(crate) fn into_owned(self) -> (Vec<Package>, Vec<EntryError>) {
        let packages = self
            .packages
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .collect();
        (packages, self.errors)
    }

    /// Adds the package of the header `blob`, stored at `slot` of its database (SQLite's
    /// `hnum`, a Berkeley DB page and entry, an NDB package index). `Err`, and nothing added,
    /// when the blob is not a valid header. (The caller counts `bytes_decoded`.)
    pub(crate) fn header(&mut self, slot: u64, blob: &[u8]) -> Result<(), HeaderError> {
        let package = match &mut self.reuse {
            None => Arc::new(header::package(blob)?),
            Some(reuse) => reuse.package(slot, blob)?,
        };
        self.packages.push(package);
        Ok(())
    }
}
