//! Incremental reads: after a transaction only a few header blobs of a database are new, so a
//! read that keys every blob by where it is stored and a digest of its bytes can take the
//! packages of the blobs it saw last time from that read's [`Records`], and decode only the
//! others.
//!
//! The traversal is the full read's, with all its bounds (deadline, largest header, linear
//! work in the file size): only the decoding of a blob is skipped when an identical blob was
//! decoded at the same place before. A header's package is a function of its bytes alone, so
//! the result is the full read's, in the same order, with the same errors (damaged entries
//! are never kept, so they are decoded and reported again each time).
//!
//! The digest is 128-bit XXH3: not a cryptographic hash, which would cost more than the
//! decoding it saves. A guest that wants its database to say something else than the packages
//! it reports can write that in the database directly; colliding with a blob the agent already
//! holds, at the same slot, buys it nothing more.

use std::{collections::HashMap, sync::Arc};

use crate::{DbError, HeaderError, Package, ReadOptions, Scan, Source, header};

/// Identifies one header blob of a database: where it is stored and a digest of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey {
    /// SQLite: `Packages.hnum`; Berkeley DB: the page number (high 32 bits) and the entry's
    /// index on the page; NDB: the package index of its slot.
    pub slot: u64,
    /// [`blob_digest`] of the blob's bytes.
    pub digest: u128,
}

/// The digest of a header blob that [`BlobKey`]s carry: 128-bit XXH3 of its bytes.
pub fn blob_digest(blob: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(blob)
}

/// The packages a read decoded, by the key of their blob (gpg-pubkey headers included):
/// what the next [`read_incremental`] of the same database may reuse. It holds the packages
/// of one read only, so its size follows the inventory's.
#[derive(Clone, Debug, Default)]
pub struct Records {
    by_key: HashMap<BlobKey, Arc<Package>>,
}

impl Records {
    /// How many packages it holds.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The package decoded from the blob `key`, if an earlier read saw that blob.
    pub fn get(&self, key: &BlobKey) -> Option<&Package> {
        self.by_key.get(key).map(|p| &**p)
    }

    /// Every key held, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &BlobKey> {
        self.by_key.keys()
    }
}

/// The result of [`read_incremental`].
#[derive(Clone, Debug)]
pub struct Incremental {
    /// What a full read ([`read_with`](crate::read_with)) would have returned.
    pub scan: Scan,
    /// This read's records, for the next one.
    pub records: Records,
    /// Valid headers whose package was taken from the earlier records.
    pub reused: usize,
    /// Valid headers decoded (new or changed blobs).
    pub decoded: usize,
}

/// Reads every package of the database of `source` like [`read_with`](crate::read_with),
/// decoding only the header blobs that `previous` (an earlier read's records; empty for the
/// first read) does not hold.
pub fn read_incremental(
    source: Source<'_>,
    options: &ReadOptions,
    previous: &Records,
) -> Result<Incremental, DbError> {
    let (scan, reuse) = crate::read_into(source, options, Some(previous))?;
    let reuse = reuse.unwrap_or_else(|| Reuse::new(previous));
    Ok(Incremental {
        scan,
        records: reuse.next,
        reused: reuse.reused,
        decoded: reuse.decoded,
    })
}

/// The state of one incremental read.
#[derive(Debug)]
pub(crate) struct Reuse<'r> {
    previous: &'r Records,
    next: Records,
    reused: usize,
    decoded: usize,
}

impl<'r> Reuse<'r> {
    pub(crate) fn new(previous: &'r Records) -> Self {
        Self {
            previous,
            next: Records {
                by_key: HashMap::with_capacity(previous.len()),
            },
            reused: 0,
            decoded: 0,
        }
    }

    /// The package of the header `blob` at `slot`: the earlier read's, or decoded now.
    pub(crate) fn package(&mut self, slot: u64, blob: &[u8]) -> Result<Arc<Package>, HeaderError> {
        let key = BlobKey {
            slot,
            digest: blob_digest(blob),
        };
        let package = match self.previous.by_key.get(&key) {
            Some(p) => {
                self.reused += 1;
                p.clone()
            }
            None => {
                let package = Arc::new(header::package(blob)?);
                self.decoded += 1;
                package
            }
        };
        self.next.by_key.insert(key, package.clone());
        Ok(package)
    }
}
