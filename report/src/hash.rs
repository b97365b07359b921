//! The content hash of a package set: defined on the report's records by the protocol
//! (`guestwatch_protocol::inventory::content_hash`, specified in `docs/protocol.md`), so the
//! relay and any third party can verify it.

pub use guestwatch_protocol::inventory::content_hash;

use guestwatch_protocol::{ContentHash, inventory::PackageRecord};
use sha2::{Digest, Sha256};

/// The digest [`content_hash`] takes of one record: SHA-256 of its canonical form.
pub fn record_digest(record: &PackageRecord) -> [u8; 32] {
    Sha256::digest(record.canonical()).into()
}

/// [`content_hash`] of the records whose [`record_digest`]s these are (in any order), for a
/// caller that keeps each record's digest instead of hashing every record again.
pub fn content_hash_of_digests(mut digests: Vec<[u8; 32]>) -> ContentHash {
    digests.sort_unstable();
    let mut hasher = Sha256::new();
    for digest in &digests {
        hasher.update(digest);
    }
    ContentHash(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_give_the_protocols_content_hash() {
        let records: Vec<PackageRecord> = (0..50u32)
            .map(|i| PackageRecord {
                name: format!("p{}", i % 17),
                epoch: (i % 3 == 0).then_some(i),
                version: format!("1.{i}"),
                release: "1".into(),
                arch: (i % 5 != 0).then(|| "x86_64".into()),
                size: Some(u64::from(i) * 1000),
                repository: (i % 7 == 0).then(|| "baseos".into()),
                ..PackageRecord::default()
            })
            .collect();
        let digests = records.iter().rev().map(record_digest).collect();
        assert_eq!(content_hash_of_digests(digests), content_hash(&records));
        assert_eq!(content_hash_of_digests(Vec::new()), content_hash(&[]));
    }
}
