//! The compact report: a system's package records and what else its report says, as protocol
//! version 2 carries it (`PayloadEncoding::Document*`), and deltas against a base the relay
//! has. The relay renders the claircore document from it, exactly as the agent would.
//!
//! The content hash is defined here, on these records, so that the relay (and any third
//! party) can verify a reconstructed inventory: see [`content_hash`] and `docs/protocol.md`,
//! "Content hash".

use std::cmp::Ordering;

use bincode::{Decode, Encode};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{columns, message::ContentHash};

/// One installed package, as reports show it. Field names are rpm tag names in lower case;
/// `epoch: None` (no EPOCH tag) differs from `Some(0)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PackageRecord {
    pub name: String,
    pub epoch: Option<u32>,
    pub version: String,
    pub release: String,
    pub arch: Option<String>,
    /// The source package file name, e.g. `curl-7.76.0-6.cm2.src.rpm`.
    pub sourcerpm: Option<String>,
    pub license: Option<String>,
    pub vendor: Option<String>,
    pub size: Option<u64>,
    /// Seconds since the Unix epoch.
    pub installtime: Option<u64>,
    /// Header+payload MD5, lower-case hex.
    pub sigmd5: Option<String>,
    pub modularitylabel: Option<String>,
    /// The repository id dnf's history records it was installed from.
    pub repository: Option<String>,
}

/// What identifies a record in an inventory (a name can be installed in several versions and
/// for several arches at once).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode, Serialize)]
pub struct RecordKey {
    pub name: String,
    pub epoch: Option<u32>,
    pub version: String,
    pub release: String,
    pub arch: Option<String>,
}

/// A [`RecordKey`] borrowed from a record, in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRef<'a> {
    name: &'a str,
    epoch: Option<u32>,
    version: &'a str,
    release: &'a str,
    arch: Option<&'a str>,
}

impl KeyRef<'_> {
    pub fn to_key(self) -> RecordKey {
        RecordKey {
            name: self.name.to_owned(),
            epoch: self.epoch,
            version: self.version.to_owned(),
            release: self.release.to_owned(),
            arch: self.arch.map(str::to_owned),
        }
    }
}

impl RecordKey {
    pub fn as_ref(&self) -> KeyRef<'_> {
        KeyRef {
            name: &self.name,
            epoch: self.epoch,
            version: &self.version,
            release: &self.release,
            arch: self.arch.as_deref(),
        }
    }
}

impl PackageRecord {
    /// The record's key, borrowed (sorting and merging without copies).
    pub fn key_ref(&self) -> KeyRef<'_> {
        KeyRef {
            name: &self.name,
            epoch: self.epoch,
            version: &self.version,
            release: &self.release,
            arch: self.arch.as_deref(),
        }
    }

    pub fn key(&self) -> RecordKey {
        RecordKey {
            name: self.name.clone(),
            epoch: self.epoch,
            version: self.version.clone(),
            release: self.release.clone(),
            arch: self.arch.clone(),
        }
    }

    /// The canonical form the content hash covers: every field in declaration order, each as
    /// a 4-byte little-endian length and its UTF-8 text (numbers in decimal), an absent one as
    /// the length `0xFFFF_FFFF` alone; so no two different records share a form.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        let mut field = |text: Option<&str>| match text {
            Some(text) => {
                // Records are bounded far below 4 GiB (guest limits); saturate regardless.
                let len = u32::try_from(text.len()).unwrap_or(u32::MAX - 1);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        };
        let num = |n: Option<u64>| n.map(|n| n.to_string());
        field(Some(&self.name));
        field(num(self.epoch.map(u64::from)).as_deref());
        field(Some(&self.version));
        field(Some(&self.release));
        field(self.arch.as_deref());
        field(self.sourcerpm.as_deref());
        field(self.license.as_deref());
        field(self.vendor.as_deref());
        field(num(self.size).as_deref());
        field(num(self.installtime).as_deref());
        field(self.sigmd5.as_deref());
        field(self.modularitylabel.as_deref());
        field(self.repository.as_deref());
        out
    }
}

/// The content hash of a set of records: SHA-256 of the concatenated, sorted SHA-256 digests
/// of their canonical lines. Independent of order; any field of any record changes it.
pub fn content_hash(records: &[PackageRecord]) -> ContentHash {
    let mut digests: Vec<[u8; 32]> = records
        .iter()
        .map(|r| Sha256::digest(r.canonical()).into())
        .collect();
    digests.sort_unstable();
    let mut hasher = Sha256::new();
    for digest in &digests {
        hasher.update(digest);
    }
    ContentHash(hasher.finalize().into())
}

/// The distribution, with claircore's field names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Distribution {
    /// `ID` (e.g. `rhel`).
    pub did: String,
    pub name: String,
    pub version: String,
    pub version_id: String,
    pub version_code_name: String,
    pub pretty_name: String,
    /// `CPE_NAME`, else `etc/system-release-cpe`.
    pub cpe: String,
}

/// One package whose record changed between two reports.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Change {
    pub name: String,
    pub arch: String,
    /// `[epoch:]version-release` before and after.
    pub from: String,
    pub to: String,
}

/// What changed since the previous report, in rpm's version order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct ChangeSummary {
    /// `name-[epoch:]version-release.arch` of packages that appeared.
    pub added: Vec<String>,
    /// The same for packages that disappeared.
    pub removed: Vec<String>,
    /// A newer version replaced an older one.
    pub upgraded: Vec<Change>,
    /// An older version replaced a newer one.
    pub downgraded: Vec<Change>,
    /// The same version with another record (digest, install time, any reported field).
    pub reinstalled: Vec<Change>,
}

impl ChangeSummary {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.upgraded.is_empty()
            && self.downgraded.is_empty()
            && self.reinstalled.is_empty()
    }

    /// `+2 -1 ^1 v0 =0` (added, removed, upgraded, downgraded, reinstalled), for logs.
    pub fn short(&self) -> String {
        format!(
            "+{} -{} ^{} v{} ={}",
            self.added.len(),
            self.removed.len(),
            self.upgraded.len(),
            self.downgraded.len(),
            self.reinstalled.len()
        )
    }
}

/// What a report says besides its package records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct SystemFacts {
    pub distribution: Option<Distribution>,
    /// claircore's `package_db`: `<backend>:<directory relative to the root>`.
    pub package_db: String,
    /// `sqlite`, `bdb` or `ndb`.
    pub backend: String,
    /// The database file, relative to the root when a root was scanned.
    pub database: String,
    /// Imported signing keys (gpg-pubkey pseudo-packages), `name-version-release`.
    pub gpg_pubkeys: Vec<String>,
    /// Skipped entries and what could not be read of the system.
    pub errors: Vec<String>,
    /// The dnf history the repositories came from, relative to the root.
    pub history: Option<String>,
    pub scan_duration_ms: Option<u64>,
    /// Changes since the agent's previous report.
    pub changes: ChangeSummary,
}

/// A whole report in compact form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Document {
    /// Sorted by [`RecordKey`], unique.
    pub packages: Vec<PackageRecord>,
    pub system: SystemFacts,
}

/// A report as the difference from a base inventory: the base's records minus `removed`,
/// with `changed` replacing the records of the same key, plus `added`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaDocument {
    pub removed: Vec<RecordKey>,
    pub changed: Vec<PackageRecord>,
    pub added: Vec<PackageRecord>,
    pub system: SystemFacts,
}

/// Why a compact payload could not be read or applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InventoryError {
    #[error("the payload does not decode: {0}")]
    Decode(String),
    #[error("record {0:?} appears twice")]
    Duplicate(RecordKey),
    #[error("the delta removes or changes {0:?}, which the base does not have")]
    NotInBase(RecordKey),
    #[error("the delta adds {0:?}, which the base has already")]
    AlreadyInBase(RecordKey),
}

impl Document {
    /// The records sorted by key; of records with the same key only the first is kept.
    pub fn new(mut packages: Vec<PackageRecord>, system: SystemFacts) -> Self {
        packages.sort_by(|a, b| a.key_ref().cmp(&b.key_ref()));
        packages.dedup_by(|a, b| a.key_ref() == b.key_ref());
        Self { packages, system }
    }

    pub fn content_hash(&self) -> ContentHash {
        content_hash(&self.packages)
    }

    /// The delta that turns `base` (sorted and unique by key, as a [`Document`] holds them)
    /// into this one: one merge of the two sorted lists.
    pub fn delta_from(&self, base: &[PackageRecord]) -> DeltaDocument {
        let mut delta = DeltaDocument {
            system: self.system.clone(),
            ..DeltaDocument::default()
        };
        let (mut old, mut new) = (base.iter().peekable(), self.packages.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (Some(o), Some(n)) => match o.key_ref().cmp(&n.key_ref()) {
                    Ordering::Less => {
                        delta.removed.push(o.key());
                        old.next();
                    }
                    Ordering::Greater => {
                        delta.added.push((*n).clone());
                        new.next();
                    }
                    Ordering::Equal => {
                        if o != n {
                            delta.changed.push((*n).clone());
                        }
                        old.next();
                        new.next();
                    }
                },
                (Some(o), None) => {
                    delta.removed.push(o.key());
                    old.next();
                }
                (None, Some(n)) => {
                    delta.added.push((*n).clone());
                    new.next();
                }
                (None, None) => break,
            }
        }
        delta
    }
}

impl DeltaDocument {
    /// Applies the delta to `base` (sorted and unique by key), strictly: removing or changing a
    /// record the base lacks, adding one it has, or naming one key twice is an error (the base
    /// is not the one the delta was made from). One merge of the base with the sorted edits.
    pub fn apply(&self, base: &[PackageRecord]) -> Result<Document, InventoryError> {
        enum Edit<'a> {
            Remove,
            Change(&'a PackageRecord),
            Add(&'a PackageRecord),
        }
        let mut edits: Vec<(KeyRef<'_>, Edit<'_>)> = self
            .removed
            .iter()
            .map(|k| (k.as_ref(), Edit::Remove))
            .chain(self.changed.iter().map(|r| (r.key_ref(), Edit::Change(r))))
            .chain(self.added.iter().map(|r| (r.key_ref(), Edit::Add(r))))
            .collect();
        edits.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(twice) = edits.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(InventoryError::Duplicate(twice[0].0.to_key()));
        }
        let mut packages = Vec::with_capacity(base.len() + self.added.len());
        let mut base = base.iter().peekable();
        for (key, edit) in &edits {
            while let Some(r) = base.next_if(|r| r.key_ref() < *key) {
                packages.push(r.clone());
            }
            let present = base.next_if(|r| r.key_ref() == *key).is_some();
            match (edit, present) {
                (Edit::Remove, true) => {}
                (Edit::Change(r), true) | (Edit::Add(r), false) => packages.push((*r).clone()),
                (Edit::Remove | Edit::Change(_), false) => {
                    return Err(InventoryError::NotInBase(key.to_key()));
                }
                (Edit::Add(_), true) => return Err(InventoryError::AlreadyInBase(key.to_key())),
            }
        }
        packages.extend(base.cloned());
        Ok(Document {
            packages,
            system: self.system.clone(),
        })
    }

    /// Records carried (for sizing and limits).
    pub fn len(&self) -> usize {
        self.removed.len() + self.changed.len() + self.added.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check_unique(records: &[PackageRecord]) -> Result<(), InventoryError> {
    let mut seen = std::collections::BTreeSet::new();
    for r in records {
        if !seen.insert(r.key()) {
            return Err(InventoryError::Duplicate(r.key()));
        }
    }
    Ok(())
}

/// Decodes a bincode value from the start of `bytes`, with bincode's allocation limit at the
/// tier above 32 × the input (a string costs a byte of input and 24 of memory), so a small
/// payload claiming huge lists allocates nothing like them; returns it and the bytes it took.
fn decode_prefix<T: Decode<()>>(bytes: &[u8]) -> Result<(T, usize), InventoryError> {
    fn with<T: Decode<()>, C: bincode::config::Config>(
        bytes: &[u8],
        cfg: C,
    ) -> Result<(T, usize), InventoryError> {
        bincode::decode_from_slice::<T, _>(bytes, cfg)
            .map_err(|e| InventoryError::Decode(e.to_string()))
    }
    const KIB: usize = 1024;
    let base = bincode::config::standard();
    match bytes.len() {
        n if n <= 4 * KIB => with::<T, _>(bytes, base.with_limit::<{ 128 * KIB }>()),
        n if n <= 64 * KIB => with::<T, _>(bytes, base.with_limit::<{ 2048 * KIB }>()),
        n if n <= 1024 * KIB => with::<T, _>(bytes, base.with_limit::<{ 32 * 1024 * KIB }>()),
        _ => with::<T, _>(bytes, base.with_limit::<{ 512 * 1024 * KIB }>()),
    }
}

/// Reads a block of columns at `at`; returns the records and where the block ends.
fn columns_at(bytes: &[u8], at: usize) -> Result<(Vec<PackageRecord>, usize), InventoryError> {
    let rest = bytes
        .get(at..)
        .ok_or_else(|| InventoryError::Decode("the payload ends early".into()))?;
    let (records, used) = columns::decode(rest)?;
    Ok((records, at + used))
}

fn no_trailing(bytes: &[u8], used: usize) -> Result<(), InventoryError> {
    if used != bytes.len() {
        return Err(InventoryError::Decode(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(())
}

fn encode<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, bincode::config::standard()).unwrap_or_default()
}

/// What a delta says besides its records, ahead of its two blocks of columns.
#[derive(Encode, Decode)]
struct DeltaHead {
    removed: Vec<RecordKey>,
    system: SystemFacts,
}

impl Document {
    /// The wire form (before compression): the system facts, then the records' columns.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (mut bytes, digests) = self.to_parts();
        bytes.extend_from_slice(&digests);
        bytes
    }

    /// The wire form in two parts: everything but the raw header digests, then those (what
    /// [`crate::Payload::of_document`] compresses in separate blocks).
    pub fn to_parts(&self) -> (Vec<u8>, Vec<u8>) {
        let mut bytes = encode(&self.system);
        let columns = columns::encode(&self.packages);
        bytes.extend_from_slice(&columns.text);
        (bytes, columns.digests)
    }

    /// Reads the wire form: records must be unique (they are sorted here).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InventoryError> {
        let (system, used) = decode_prefix::<SystemFacts>(bytes)?;
        let (mut packages, used) = columns_at(bytes, used)?;
        no_trailing(bytes, used)?;
        check_unique(&packages)?;
        packages.sort_by_cached_key(PackageRecord::key);
        Ok(Self { packages, system })
    }
}

impl DeltaDocument {
    /// The wire form: removed keys and system facts, then the changed and the added records'
    /// columns.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = encode(&DeltaHead {
            removed: self.removed.clone(),
            system: self.system.clone(),
        });
        for records in [&self.changed, &self.added] {
            let columns = columns::encode(records);
            bytes.extend_from_slice(&columns.text);
            bytes.extend_from_slice(&columns.digests);
        }
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InventoryError> {
        let (head, used) = decode_prefix::<DeltaHead>(bytes)?;
        let (changed, used) = columns_at(bytes, used)?;
        let (added, used) = columns_at(bytes, used)?;
        no_trailing(bytes, used)?;
        Ok(Self {
            removed: head.removed,
            changed,
            added,
            system: head.system,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, version: &str) -> PackageRecord {
        PackageRecord {
            name: name.into(),
            version: version.into(),
            release: "1.el9".into(),
            arch: Some("x86_64".into()),
            sourcerpm: Some(format!("{name}-{version}-1.el9.src.rpm")),
            license: Some("MIT".into()),
            vendor: Some("Red Hat, Inc.".into()),
            size: Some(12_345),
            installtime: Some(1_700_000_000),
            sigmd5: Some("00112233445566778899aabbccddeeff".into()),
            ..Default::default()
        }
    }

    fn doc(records: Vec<PackageRecord>) -> Document {
        Document::new(records, SystemFacts::default())
    }

    #[test]
    fn the_wire_form_round_trips() {
        let mut odd = record("odd", "1");
        odd.sourcerpm = Some("other-9-9.src.rpm".into());
        odd.epoch = Some(0);
        odd.installtime = None;
        // Not lowercase hex MD5: kept as text, exactly.
        odd.sigmd5 = Some("00112233445566778899AABBCCDDEEFF".into());
        let mut short = record("short", "1");
        short.sigmd5 = Some("abc".into());
        let mut records = vec![record("bash", "5.1"), record("curl", "7.76"), odd, short];
        // Source rpms that look like the short forms are carried as they are.
        for (i, source) in [
            "\u{2}",
            "x\u{1}",
            "\u{3}y",
            "\u{2}-1-1.el9.src.rpm",
            "a\u{1}b-1-1.el9.src.rpm",
            "lib-1-1.el9.src.rpm",
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = record(&format!("tricky{i}"), "1");
            r.sourcerpm = Some(source.into());
            records.push(r);
        }
        let d = doc(records);
        let back = Document::from_bytes(&d.to_bytes()).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.content_hash(), d.content_hash());
    }

    #[test]
    fn deltas_apply_exactly_and_refuse_a_wrong_base() {
        let base = doc(vec![
            record("bash", "5.1"),
            record("curl", "7.76"),
            record("vim", "9"),
        ]);
        let mut reinstalled = record("vim", "9");
        reinstalled.installtime = Some(1_800_000_000);
        let new = doc(vec![
            record("bash", "5.1"),
            record("curl", "7.80"),
            reinstalled,
            record("zsh", "5.9"),
        ]);
        let delta = new.delta_from(&base.packages);
        assert_eq!(delta.removed.len(), 1, "old curl");
        assert_eq!(delta.changed.len(), 1, "vim reinstalled");
        assert_eq!(delta.added.len(), 2, "new curl, zsh");
        let wire = DeltaDocument::from_bytes(&delta.to_bytes()).unwrap();
        let applied = wire.apply(&base.packages).unwrap();
        assert_eq!(applied.content_hash(), new.content_hash());
        assert_eq!(applied.packages, new.packages);
        // Against another base it fails, or gives another hash.
        let other = doc(vec![record("bash", "5.1")]);
        assert!(matches!(
            wire.apply(&other.packages),
            Err(InventoryError::NotInBase(_))
        ));
        let applied_twice = wire.apply(&new.packages);
        assert!(applied_twice.is_err());
    }

    #[test]
    fn the_hash_covers_every_field_and_not_the_order() {
        let a = vec![record("a", "1"), record("b", "1")];
        let b = vec![record("b", "1"), record("a", "1")];
        assert_eq!(content_hash(&a), content_hash(&b));
        let mut c = a.clone();
        c[0].repository = Some("baseos".into());
        assert_ne!(content_hash(&a), content_hash(&c));
        let mut e = a.clone();
        e[0].epoch = Some(0);
        assert_ne!(
            content_hash(&a),
            content_hash(&e),
            "no epoch differs from epoch 0"
        );
        let mut empty = a.clone();
        empty[0].vendor = Some(String::new());
        let mut absent = a.clone();
        absent[0].vendor = None;
        assert_ne!(
            content_hash(&empty),
            content_hash(&absent),
            "empty is not absent"
        );
        let mut shifted = a.clone();
        shifted[0].name = "a1".into();
        shifted[0].version = String::new();
        assert_ne!(
            content_hash(&a),
            content_hash(&shifted),
            "field boundaries count"
        );
    }

    /// The test vector docs/protocol.md gives third parties ("Content hash").
    #[test]
    fn the_documented_test_vector() {
        let bash = PackageRecord {
            name: "bash".into(),
            version: "5.1.8".into(),
            release: "9.el9".into(),
            arch: Some("x86_64".into()),
            sourcerpm: Some("bash-5.1.8-9.el9.src.rpm".into()),
            license: Some("GPLv3+".into()),
            vendor: Some("Red Hat, Inc.".into()),
            size: Some(7_738_634),
            installtime: Some(1_700_000_000),
            sigmd5: Some("1db541afa1eaf0dc0dbfc6471df30ba0".into()),
            ..PackageRecord::default()
        };
        let tzdata = PackageRecord {
            name: "tzdata".into(),
            version: "2024a".into(),
            release: "1.el9".into(),
            arch: Some("noarch".into()),
            ..PackageRecord::default()
        };
        let canonical = tzdata.canonical();
        assert_eq!(&canonical[..10], b"\x06\0\0\0tzdata");
        assert_eq!(&canonical[10..14], &[0xff; 4], "no epoch");
        assert_eq!(
            content_hash(&[bash, tzdata]).to_hex(),
            "750b6d1c4349efe0d9a4d3a95955c358e539c8c60da6720a05a76f0718df74c2"
        );
    }

    /// Random inventories and random edits: the merge-built delta always applies back to the
    /// exact new inventory, and a key named twice is refused.
    #[test]
    fn deltas_round_trip_over_random_inventories() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let base: Vec<PackageRecord> = (0..next(40))
                .map(|i| {
                    let mut r = record(&format!("p{}", next(30)), &format!("{}", next(3)));
                    r.arch = [None, Some("x86_64".into()), Some("i686".into())][(i % 3) as usize]
                        .clone();
                    r
                })
                .collect();
            let base = doc(base);
            let mut records = base.packages.clone();
            records.retain(|_| next(4) != 0);
            for r in &mut records {
                if next(5) == 0 {
                    r.installtime = Some(next(1_000_000));
                }
            }
            for _ in 0..next(6) {
                records.push(record(&format!("n{}", next(50)), "1"));
            }
            let new = doc(records);
            let delta = new.delta_from(&base.packages);
            let applied = delta.apply(&base.packages).unwrap();
            assert_eq!(applied, new);
        }
        let base = doc(vec![record("bash", "5.1"), record("curl", "7.76")]);
        let twice = DeltaDocument {
            removed: vec![record("bash", "5.1").key(), record("bash", "5.1").key()],
            ..DeltaDocument::default()
        };
        assert!(matches!(
            twice.apply(&base.packages),
            Err(InventoryError::Duplicate(_))
        ));
    }

    #[test]
    fn hostile_wire_forms_are_errors() {
        let d = doc(vec![record("bash", "5.1"), record("curl", "7.76")]);
        let bytes = d.to_bytes();
        for cut in 0..bytes.len() {
            assert!(Document::from_bytes(&bytes[..cut]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Document::from_bytes(&longer).is_err(), "trailing bytes");
        // A duplicated record.
        let dup = Document {
            packages: vec![record("x", "1"), record("x", "1")],
            system: SystemFacts::default(),
        };
        assert!(matches!(
            Document::from_bytes(&dup.to_bytes()),
            Err(InventoryError::Duplicate(_))
        ));
        // Every single-byte change decodes to something, or is an error: never a panic.
        for at in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[at] ^= flip;
                let _ = Document::from_bytes(&bad);
            }
        }
    }
}
