//! rpm header blobs as stored in a database (no lead, no magic): a strict validator in the
//! spirit of rpm's own `hdrblobVerifyInfo`, then typed tag lookups. Nothing is read outside the
//! blob and nothing is allocated beyond it.

use crate::package::Package;

/// Why a header blob was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("blob of {0} bytes is too short for a header")]
    Short(usize),
    #[error("index count {0} out of range")]
    IndexCount(u32),
    #[error("data length {0} out of range")]
    DataLength(u32),
    #[error("blob is {actual} bytes, the header says {expected}")]
    Length { expected: usize, actual: usize },
    #[error("entry {entry}: {reason}")]
    Entry { entry: u32, reason: &'static str },
    #[error("missing required tag {0}")]
    Missing(&'static str),
}

/// rpm's limits: at most 0xffff index entries, at most 256 MiB of data.
const MAX_INDEX: u32 = 0xffff;
const MAX_DATA: u32 = 0x0fff_ffff;
/// The most strings read of one STRING_ARRAY tag (real packages list a few thousand
/// provides at most).
pub const MAX_STRINGS: usize = 65_536;
const ENTRY_LEN: usize = 16;

mod tag {
    pub const SIGPGP: i32 = 259;
    pub const SIGMD5: i32 = 261;
    pub const RSAHEADER: i32 = 268;
    pub const NAME: i32 = 1000;
    pub const VERSION: i32 = 1001;
    pub const RELEASE: i32 = 1002;
    pub const EPOCH: i32 = 1003;
    pub const SUMMARY: i32 = 1004;
    pub const INSTALLTIME: i32 = 1008;
    pub const SIZE: i32 = 1009;
    pub const VENDOR: i32 = 1011;
    pub const LICENSE: i32 = 1014;
    pub const ARCH: i32 = 1022;
    pub const SOURCERPM: i32 = 1044;
    pub const PROVIDENAME: i32 = 1047;
    pub const REQUIRENAME: i32 = 1049;
    pub const FILEDIGESTALGO: i32 = 5011;
    pub const LONGSIZE: i32 = 5009;
    pub const MODULARITYLABEL: i32 = 5096;
}

mod kind {
    pub const CHAR: u32 = 1;
    pub const INT8: u32 = 2;
    pub const INT16: u32 = 3;
    pub const INT32: u32 = 4;
    pub const INT64: u32 = 5;
    pub const STRING: u32 = 6;
    pub const BIN: u32 = 7;
    pub const STRING_ARRAY: u32 = 8;
    pub const I18NSTRING: u32 = 9;
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    tag: i32,
    kind: u32,
    offset: usize,
    count: usize,
}

/// A validated header.
pub struct Header<'a> {
    entries: Vec<Entry>,
    data: &'a [u8],
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
}

impl<'a> Header<'a> {
    /// Validates `blob` and indexes its entries.
    pub fn parse(blob: &'a [u8]) -> Result<Self, HeaderError> {
        let (Some(il), Some(dl)) = (be32(blob, 0), be32(blob, 4)) else {
            return Err(HeaderError::Short(blob.len()));
        };
        if il == 0 || il > MAX_INDEX {
            return Err(HeaderError::IndexCount(il));
        }
        if dl > MAX_DATA {
            return Err(HeaderError::DataLength(dl));
        }
        let data_start = 8 + il as usize * ENTRY_LEN;
        let expected = data_start + dl as usize;
        if blob.len() != expected {
            return Err(HeaderError::Length {
                expected,
                actual: blob.len(),
            });
        }
        let data = &blob[data_start..];
        let mut entries = Vec::with_capacity(il as usize);
        // Entries whose strings overlap would each rescan the same bytes (65535 entries over
        // one long unterminated run: quadratic); rpm's own entries never share data.
        let mut budget = data.len().saturating_mul(2).saturating_add(64);
        for i in 0..il {
            let at = 8 + i as usize * ENTRY_LEN;
            let field = |n: usize| be32(blob, at + 4 * n).ok_or(HeaderError::Short(blob.len()));
            let entry = Entry {
                tag: field(0)? as i32,
                kind: field(1)?,
                offset: field(2)? as i32 as isize as usize,
                count: field(3)? as usize,
            };
            check_entry(&entry, data, &mut budget)
                .map_err(|reason| HeaderError::Entry { entry: i, reason })?;
            entries.push(entry);
        }
        Ok(Self { entries, data })
    }

    fn find(&self, tag: i32) -> Option<&Entry> {
        self.entries.iter().find(|e| e.tag == tag)
    }

    /// A string tag (STRING, or the first element of STRING_ARRAY / I18NSTRING).
    pub fn string(&self, tag: i32) -> Option<String> {
        let e = self.find(tag)?;
        if !matches!(e.kind, kind::STRING | kind::STRING_ARRAY | kind::I18NSTRING) {
            return None;
        }
        let bytes = self.data.get(e.offset..)?;
        let end = bytes.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
    }

    /// The first value of an integer tag.
    pub fn int(&self, tag: i32) -> Option<u64> {
        let e = self.find(tag)?;
        let d = self.data;
        Some(match e.kind {
            kind::CHAR | kind::INT8 => u64::from(*d.get(e.offset)?),
            kind::INT16 => u64::from(u16::from_be_bytes(
                d.get(e.offset..e.offset + 2)?.try_into().ok()?,
            )),
            kind::INT32 => u64::from(u32::from_be_bytes(
                d.get(e.offset..e.offset + 4)?.try_into().ok()?,
            )),
            kind::INT64 => u64::from_be_bytes(d.get(e.offset..e.offset + 8)?.try_into().ok()?),
            _ => return None,
        })
    }

    /// The strings of a STRING_ARRAY tag (empty when absent), at most [`MAX_STRINGS`]: a
    /// header of empty strings would otherwise cost 24 bytes of memory per byte of input.
    pub fn strings(&self, tag: i32) -> Vec<String> {
        let Some(e) = self.find(tag).filter(|e| e.kind == kind::STRING_ARRAY) else {
            return Vec::new();
        };
        // check_entry proved `count` NUL-terminated strings fit from `offset`.
        let count = e.count.min(MAX_STRINGS);
        let mut out = Vec::with_capacity(count);
        let mut rest = self.data.get(e.offset..).unwrap_or_default();
        for _ in 0..count {
            let Some(end) = rest.iter().position(|&b| b == 0) else {
                break;
            };
            out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            rest = &rest[end + 1..];
        }
        out
    }

    /// The bytes of a binary tag.
    pub fn bin(&self, tag: i32) -> Option<&'a [u8]> {
        let e = self.find(tag)?;
        if e.kind != kind::BIN {
            return None;
        }
        self.data.get(e.offset..e.offset + e.count)
    }

    /// A binary tag as lower-case hex.
    pub fn hex(&self, tag: i32) -> Option<String> {
        self.bin(tag).map(hex::encode)
    }
}

/// rpm's per-entry checks: known type, offset inside the data, alignment, and the data the
/// entry describes fitting in the data store (strings NUL-terminated within it).
fn check_entry(e: &Entry, data: &[u8], budget: &mut usize) -> Result<(), &'static str> {
    if e.count == 0 {
        return Err("zero count");
    }
    if e.offset >= data.len() && !(e.offset == data.len() && e.kind == kind::BIN) {
        return Err("offset outside the data");
    }
    let size = match e.kind {
        kind::CHAR | kind::INT8 | kind::BIN => 1,
        kind::INT16 => 2,
        kind::INT32 => 4,
        kind::INT64 => 8,
        kind::STRING | kind::STRING_ARRAY | kind::I18NSTRING => 0,
        0 => return Err("NULL type"),
        _ => return Err("unknown type"),
    };
    if size > 1 && !e.offset.is_multiple_of(size) {
        return Err("misaligned");
    }
    if size > 0 {
        let end = e
            .count
            .checked_mul(size)
            .and_then(|n| n.checked_add(e.offset))
            .ok_or("count overflow")?;
        if end > data.len() {
            return Err("data beyond the end");
        }
        return Ok(());
    }
    if e.kind == kind::STRING && e.count != 1 {
        return Err("string with count != 1");
    }
    // Every string of the entry must end inside the data.
    let mut at = e.offset;
    for _ in 0..e.count {
        let rest = data.get(at..).ok_or("string beyond the end")?;
        // Never look further than the bytes still allowed for this header.
        let window = &rest[..rest.len().min(*budget)];
        let Some(len) = window.iter().position(|&b| b == 0) else {
            return Err(if window.len() < rest.len() {
                "string data shared by several entries"
            } else {
                "unterminated string"
            });
        };
        *budget -= len + 1;
        at += len + 1;
    }
    Ok(())
}

/// Decodes a package from a header blob.
pub fn package(blob: &[u8]) -> Result<Package, HeaderError> {
    let h = Header::parse(blob)?;
    let name = h.string(tag::NAME).ok_or(HeaderError::Missing("NAME"))?;
    let version = h
        .string(tag::VERSION)
        .ok_or(HeaderError::Missing("VERSION"))?;
    let release = h
        .string(tag::RELEASE)
        .ok_or(HeaderError::Missing("RELEASE"))?;
    Ok(Package {
        name,
        epoch: h.int(tag::EPOCH).map(|e| e as u32),
        version,
        release,
        arch: h.string(tag::ARCH),
        sourcerpm: h.string(tag::SOURCERPM),
        license: h.string(tag::LICENSE),
        vendor: h.string(tag::VENDOR),
        size: h.int(tag::LONGSIZE).or_else(|| h.int(tag::SIZE)),
        installtime: h.int(tag::INSTALLTIME),
        sigmd5: h.hex(tag::SIGMD5),
        modularitylabel: h.string(tag::MODULARITYLABEL),
        summary: h.string(tag::SUMMARY),
        provides: h.strings(tag::PROVIDENAME),
        requires: h.strings(tag::REQUIRENAME),
        filedigestalgo: h.int(tag::FILEDIGESTALGO).map(|a| {
            format!(
                "PGPHASHALGO_{}",
                crate::pgp::hash_name(a as u8).replace("(unknown)", "UNKNOWN")
            )
        }),
        pgp: h.bin(tag::SIGPGP).and_then(crate::pgp::summary),
        rsaheader: h.bin(tag::RSAHEADER).and_then(crate::pgp::summary),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a blob from (tag, type, data) entries.
    pub fn blob(entries: &[(i32, u32, u32, Vec<u8>)]) -> Vec<u8> {
        let mut data = Vec::new();
        let mut index = Vec::new();
        for (tag, kind, count, bytes) in entries {
            while !data.len().is_multiple_of(8) {
                data.push(0);
            }
            index.extend_from_slice(&tag.to_be_bytes());
            index.extend_from_slice(&kind.to_be_bytes());
            index.extend_from_slice(&(data.len() as u32).to_be_bytes());
            index.extend_from_slice(&count.to_be_bytes());
            data.extend_from_slice(bytes);
        }
        let mut out = (entries.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend(index);
        out.extend(data);
        out
    }

    fn s(text: &str) -> Vec<u8> {
        let mut v = text.as_bytes().to_vec();
        v.push(0);
        v
    }

    #[test]
    fn decodes_fields() {
        let b = blob(&[
            (tag::NAME, kind::STRING, 1, s("bash")),
            (tag::VERSION, kind::STRING, 1, s("5.1")),
            (tag::RELEASE, kind::STRING, 1, s("1.el9")),
            (tag::EPOCH, kind::INT32, 1, 2u32.to_be_bytes().to_vec()),
            (tag::SIZE, kind::INT32, 1, 100u32.to_be_bytes().to_vec()),
            (
                tag::LONGSIZE,
                kind::INT64,
                1,
                5_000_000_000u64.to_be_bytes().to_vec(),
            ),
            (tag::SIGMD5, kind::BIN, 4, vec![0xde, 0xad, 0xbe, 0xef]),
        ]);
        let p = package(&b).unwrap();
        assert_eq!(
            (p.name.as_str(), p.version.as_str(), p.release.as_str()),
            ("bash", "5.1", "1.el9")
        );
        assert_eq!(p.epoch, Some(2));
        assert_eq!(p.size, Some(5_000_000_000));
        assert_eq!(p.sigmd5.as_deref(), Some("deadbeef"));
        assert_eq!(p.arch, None);
    }

    #[test]
    fn rejects_lies_without_panicking() {
        let good = blob(&[
            (tag::NAME, kind::STRING, 1, s("x")),
            (tag::VERSION, kind::STRING, 1, s("1")),
            (tag::RELEASE, kind::STRING, 1, s("1")),
        ]);
        assert!(package(&good).is_ok());
        for cut in 0..good.len() {
            assert!(package(&good[..cut]).is_err());
        }
        // Every single-byte corruption terminates with a result.
        for i in 0..good.len() {
            for v in [0u8, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[i] = v;
                let _ = package(&bad);
            }
        }
        // 65535 entries over one long string: refused after scanning about twice the data,
        // not 65535 times it.
        let mut entries = vec![(tag::NAME, kind::STRING, 1, s("x"))];
        let mut long = vec![b'a'; 100_000];
        long[99_999] = 0;
        entries.push((tag::SUMMARY, kind::BIN, long.len() as u32, long));
        let mut shared = blob(&entries);
        let il = 0xffffu32;
        let data_start = 8 + 2 * 16;
        let data = shared.split_off(data_start);
        let mut index = Vec::new();
        for _ in 0..il {
            index.extend_from_slice(&tag::SUMMARY.to_be_bytes());
            index.extend_from_slice(&kind::STRING.to_be_bytes());
            index.extend_from_slice(&8u32.to_be_bytes());
            index.extend_from_slice(&1u32.to_be_bytes());
        }
        let mut hostile = il.to_be_bytes().to_vec();
        hostile.extend_from_slice(&(data.len() as u32).to_be_bytes());
        hostile.extend(index);
        hostile.extend(data);
        let started = std::time::Instant::now();
        assert!(matches!(
            Header::parse(&hostile),
            Err(HeaderError::Entry { entry: 2, reason }) if reason.contains("shared")
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));

        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        assert_eq!(
            package(&huge).err(),
            Some(HeaderError::IndexCount(0xffff_ffff))
        );
    }

    #[test]
    fn a_string_array_of_empty_strings_is_read_up_to_the_cap() {
        let n = MAX_STRINGS + 10_000;
        let b = blob(&[
            (tag::NAME, kind::STRING, 1, s("x")),
            (tag::VERSION, kind::STRING, 1, s("1")),
            (tag::RELEASE, kind::STRING, 1, s("1")),
            (tag::PROVIDENAME, kind::STRING_ARRAY, n as u32, vec![0; n]),
        ]);
        let p = package(&b).unwrap();
        assert_eq!(p.provides.len(), MAX_STRINGS);
        assert!(p.provides.iter().all(String::is_empty));
    }
}
