//! The column codec of compact documents: package records as columns (every name, then every
//! epoch, …), which a compressor packs far better than rows. The byte layout is specified in
//! docs/protocol.md, "Compact documents".
//!
//! - A text column is its values, each ended by a NUL: no length stream to pay for, and a
//!   dictionary's known names match with their terminator. rpm's strings cannot hold a NUL; a
//!   column where a value does is written with lengths instead.
//! - An optional column starts with a presence byte per record; numbers are LEB128.
//! - `sourcerpm` is stored short when it is what it usually is: `SAME_SOURCE` for
//!   `<name>-<version>-<release>.src.rpm`, `<stem>` + `SAME_VERSION` for
//!   `<stem>-<version>-<release>.src.rpm`; any other value that could be read as one of those
//!   is stored behind `LITERAL`. Install times are offsets from the smallest.
//! - Header MD5s, 16 random bytes each and the one part no compressor shrinks, come last and
//!   raw, so that the compressor can put them in a block of their own, out of the text's
//!   literal statistics.

use crate::inventory::{InventoryError, PackageRecord};

const SAME_VERSION: char = '\u{1}';
const SAME_SOURCE: &str = "\u{2}";
const LITERAL: char = '\u{3}';

/// Text column modes.
const NUL_ENDED: u8 = 0;
const LENGTHS: u8 = 1;

/// Header digest kinds: absent, rpm's lowercase hex MD5 (stored as its 16 bytes, at the end),
/// any other text (stored as text).
const DIGEST_NONE: u8 = 0;
const DIGEST_MD5: u8 = 1;
const DIGEST_TEXT: u8 = 2;

/// The fewest bytes a record can take: a byte each for name, version and release, nine
/// presence bytes and a digest kind. A count claiming more records than that allows is
/// refused before anything is allocated for them.
const MIN_RECORD_BYTES: usize = 13;

/// A block of columns: the text part, then the raw digests that end it.
pub(crate) struct Encoded {
    pub text: Vec<u8>,
    pub digests: Vec<u8>,
}

fn short_sourcerpm(r: &PackageRecord, source: &str) -> String {
    let tail = format!("-{}-{}.src.rpm", r.version, r.release);
    match source.strip_suffix(&tail) {
        Some(stem) if stem == r.name => SAME_SOURCE.to_owned(),
        Some(stem) if !stem.contains([SAME_VERSION, LITERAL]) && !stem.starts_with(SAME_SOURCE) => {
            format!("{stem}{SAME_VERSION}")
        }
        _ if source == SAME_SOURCE
            || source.ends_with(SAME_VERSION)
            || source.starts_with(LITERAL) =>
        {
            format!("{LITERAL}{source}")
        }
        _ => source.to_owned(),
    }
}

fn full_sourcerpm(name: &str, version: &str, release: &str, short: String) -> String {
    if let Some(literal) = short.strip_prefix(LITERAL) {
        literal.to_owned()
    } else if short == SAME_SOURCE {
        format!("{name}-{version}-{release}.src.rpm")
    } else if let Some(stem) = short.strip_suffix(SAME_VERSION) {
        format!("{stem}-{version}-{release}.src.rpm")
    } else {
        short
    }
}

/// 16 bytes when `text` is rpm's lowercase hex MD5.
fn md5_bytes(text: &str) -> Option<[u8; 16]> {
    let lower_hex = text.len() == 32
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut bytes = [0u8; 16];
    (lower_hex && hex::decode_to_slice(text, &mut bytes).is_ok()).then_some(bytes)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn text_column<'a>(out: &mut Vec<u8>, values: impl Iterator<Item = &'a str> + Clone) {
    if values.clone().any(|v| v.contains('\0')) {
        out.push(LENGTHS);
        for v in values.clone() {
            varint(out, v.len() as u64);
        }
        for v in values {
            out.extend_from_slice(v.as_bytes());
        }
    } else {
        out.push(NUL_ENDED);
        for v in values {
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
    }
}

fn presence<T>(out: &mut Vec<u8>, values: &[Option<T>]) {
    out.extend(values.iter().map(|v| u8::from(v.is_some())));
}

fn opt_text_column(out: &mut Vec<u8>, values: &[Option<&str>]) {
    presence(out, values);
    text_column(out, values.iter().flatten().copied());
}

fn opt_num_column(out: &mut Vec<u8>, values: &[Option<u64>]) {
    presence(out, values);
    for v in values.iter().flatten() {
        varint(out, *v);
    }
}

/// The records as a block of columns.
pub(crate) fn encode(records: &[PackageRecord]) -> Encoded {
    let mut out = Vec::with_capacity(64 + records.len() * 96);
    varint(&mut out, records.len() as u64);
    let opt = |f: fn(&PackageRecord) -> Option<&str>| records.iter().map(f).collect::<Vec<_>>();
    text_column(&mut out, records.iter().map(|r| r.name.as_str()));
    opt_num_column(
        &mut out,
        &records
            .iter()
            .map(|r| r.epoch.map(u64::from))
            .collect::<Vec<_>>(),
    );
    text_column(&mut out, records.iter().map(|r| r.version.as_str()));
    text_column(&mut out, records.iter().map(|r| r.release.as_str()));
    opt_text_column(&mut out, &opt(|r| r.arch.as_deref()));
    let sources: Vec<Option<String>> = records
        .iter()
        .map(|r| r.sourcerpm.as_deref().map(|s| short_sourcerpm(r, s)))
        .collect();
    opt_text_column(
        &mut out,
        &sources.iter().map(Option::as_deref).collect::<Vec<_>>(),
    );
    opt_text_column(&mut out, &opt(|r| r.license.as_deref()));
    opt_text_column(&mut out, &opt(|r| r.vendor.as_deref()));
    opt_num_column(
        &mut out,
        &records.iter().map(|r| r.size).collect::<Vec<_>>(),
    );
    let base = records
        .iter()
        .filter_map(|r| r.installtime)
        .min()
        .unwrap_or(0);
    varint(&mut out, base);
    opt_num_column(
        &mut out,
        &records
            .iter()
            .map(|r| r.installtime.map(|t| t - base))
            .collect::<Vec<_>>(),
    );
    let digests: Vec<(u8, Option<[u8; 16]>)> = records
        .iter()
        .map(|r| match r.sigmd5.as_deref() {
            None => (DIGEST_NONE, None),
            Some(text) => match md5_bytes(text) {
                Some(bytes) => (DIGEST_MD5, Some(bytes)),
                None => (DIGEST_TEXT, None),
            },
        })
        .collect();
    out.extend(digests.iter().map(|(kind, _)| *kind));
    text_column(
        &mut out,
        records
            .iter()
            .zip(&digests)
            .filter(|(_, (kind, _))| *kind == DIGEST_TEXT)
            .filter_map(|(r, _)| r.sigmd5.as_deref()),
    );
    opt_text_column(&mut out, &opt(|r| r.modularitylabel.as_deref()));
    opt_text_column(&mut out, &opt(|r| r.repository.as_deref()));
    let raw = digests
        .iter()
        .filter_map(|(_, bytes)| *bytes)
        .flatten()
        .collect();
    Encoded {
        text: out,
        digests: raw,
    }
}

fn malformed(what: &str) -> InventoryError {
    InventoryError::Decode(format!("columns: {what}"))
}

fn text(bytes: &[u8]) -> Result<String, InventoryError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| malformed("text is not UTF-8"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InventoryError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| malformed("ends early"))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, InventoryError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, InventoryError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return Err(malformed("a number overflows 64 bits"));
            }
            value |= part << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("a number overflows 64 bits"))
    }

    fn text_column(&mut self, n: usize) -> Result<Vec<String>, InventoryError> {
        let mut values = Vec::with_capacity(n.min(self.bytes.len() - self.at));
        match self.byte()? {
            NUL_ENDED => {
                for _ in 0..n {
                    let rest = &self.bytes[self.at..];
                    let len = rest
                        .iter()
                        .position(|b| *b == 0)
                        .ok_or_else(|| malformed("a text value is not ended"))?;
                    let value = self.take(len)?;
                    self.at += 1;
                    values.push(text(value)?);
                }
            }
            LENGTHS => {
                let mut lengths = Vec::with_capacity(values.capacity());
                for _ in 0..n {
                    lengths.push(self.varint()?);
                }
                for len in lengths {
                    let len = usize::try_from(len).map_err(|_| malformed("a length overflows"))?;
                    let value = self.take(len)?;
                    values.push(text(value)?);
                }
            }
            _ => return Err(malformed("unknown text column mode")),
        }
        Ok(values)
    }

    fn presence(&mut self, n: usize) -> Result<Vec<bool>, InventoryError> {
        self.take(n)?
            .iter()
            .map(|b| match b {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(malformed("a presence byte is neither 0 nor 1")),
            })
            .collect()
    }

    fn opt_text_column(&mut self, n: usize) -> Result<Vec<Option<String>>, InventoryError> {
        let present = self.presence(n)?;
        let mut values = self
            .text_column(present.iter().filter(|p| **p).count())?
            .into_iter();
        Ok(present
            .into_iter()
            .map(|p| if p { values.next() } else { None })
            .collect())
    }

    fn opt_num_column(&mut self, n: usize) -> Result<Vec<Option<u64>>, InventoryError> {
        self.presence(n)?
            .into_iter()
            .map(|p| p.then(|| self.varint()).transpose())
            .collect()
    }
}

/// Reads a block of columns from the start of `bytes`; returns the records and the bytes the
/// block took.
pub(crate) fn decode(bytes: &[u8]) -> Result<(Vec<PackageRecord>, usize), InventoryError> {
    let mut r = Reader { bytes, at: 0 };
    let n = usize::try_from(r.varint()?).map_err(|_| malformed("too many records"))?;
    if n > bytes.len() / MIN_RECORD_BYTES {
        return Err(malformed("more records than the bytes can hold"));
    }
    let names = r.text_column(n)?;
    let mut epochs = r.opt_num_column(n)?.into_iter();
    let mut versions = r.text_column(n)?.into_iter();
    let mut releases = r.text_column(n)?.into_iter();
    let mut arches = r.opt_text_column(n)?.into_iter();
    let mut sources = r.opt_text_column(n)?.into_iter();
    let mut licenses = r.opt_text_column(n)?.into_iter();
    let mut vendors = r.opt_text_column(n)?.into_iter();
    let mut sizes = r.opt_num_column(n)?.into_iter();
    let base = r.varint()?;
    let mut installtimes = r.opt_num_column(n)?.into_iter();
    let kinds = r.take(n)?.to_vec();
    if kinds.iter().any(|k| *k > DIGEST_TEXT) {
        return Err(malformed("unknown digest kind"));
    }
    let mut text_digests = r
        .text_column(kinds.iter().filter(|k| **k == DIGEST_TEXT).count())?
        .into_iter();
    let mut labels = r.opt_text_column(n)?.into_iter();
    let mut repositories = r.opt_text_column(n)?.into_iter();
    let md5s = kinds.iter().filter(|k| **k == DIGEST_MD5).count();
    let mut raw = r.take(md5s * 16)?.chunks_exact(16);

    let mut out = Vec::with_capacity(n);
    for (name, kind) in names.into_iter().zip(kinds) {
        // Every column was read with `n` values: each has one here.
        let missing = || malformed("a column is short");
        let version = versions.next().ok_or_else(missing)?;
        let release = releases.next().ok_or_else(missing)?;
        let sigmd5 = match kind {
            DIGEST_MD5 => Some(hex::encode(raw.next().ok_or_else(missing)?)),
            DIGEST_TEXT => Some(text_digests.next().ok_or_else(missing)?),
            _ => None,
        };
        let sourcerpm = sources
            .next()
            .flatten()
            .map(|s| full_sourcerpm(&name, &version, &release, s));
        let epoch = match epochs.next().flatten() {
            Some(e) => Some(u32::try_from(e).map_err(|_| malformed("an epoch overflows"))?),
            None => None,
        };
        out.push(PackageRecord {
            name,
            epoch,
            version,
            release,
            arch: arches.next().flatten(),
            sourcerpm,
            license: licenses.next().flatten(),
            vendor: vendors.next().flatten(),
            size: sizes.next().flatten(),
            installtime: installtimes
                .next()
                .flatten()
                .map(|t| t.saturating_add(base)),
            sigmd5,
            modularitylabel: labels.next().flatten(),
            repository: repositories.next().flatten(),
        });
    }
    Ok((out, r.at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_at_every_width_and_overflow_is_refused() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            let mut r = Reader { bytes: &out, at: 0 };
            assert_eq!(r.varint(), Ok(v));
            assert_eq!(r.at, out.len());
        }
        let eleven = [0xffu8; 11];
        assert!(
            Reader {
                bytes: &eleven,
                at: 0
            }
            .varint()
            .is_err()
        );
        let mut over = vec![0xffu8; 9];
        over.push(0x02);
        assert!(
            Reader {
                bytes: &over,
                at: 0
            }
            .varint()
            .is_err()
        );
    }

    #[test]
    fn a_value_with_a_nul_switches_its_column_to_lengths() {
        let mut record = PackageRecord {
            name: "a\0b".into(),
            version: "1".into(),
            release: "1".into(),
            ..PackageRecord::default()
        };
        record.license = Some("x\0".into());
        let encoded = encode(std::slice::from_ref(&record));
        let mut bytes = encoded.text;
        bytes.extend(encoded.digests);
        assert_eq!(bytes[1], LENGTHS, "the name column");
        let (back, used) = decode(&bytes).unwrap();
        assert_eq!(back, vec![record]);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn a_count_beyond_what_the_bytes_hold_is_refused() {
        let mut bytes = Vec::new();
        varint(&mut bytes, 1 << 40);
        bytes.resize(64, 0);
        assert!(decode(&bytes).is_err());
    }
}
