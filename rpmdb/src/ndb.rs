//! NDB databases (`Packages.db`): SUSE.
//!
//! A 32-byte header ("RpmP", version 0, generation, number of slot pages), slot pages of 16-byte
//! slots ("Slot", package index, block offset, block count; blocks are 16 bytes), and one blob
//! per package: a head ("BlbS", package index, generation, length), the header blob, padding,
//! and a tail (Adler-32 of everything before the tail, length, "BlbE"). Every slot is checked
//! against the file and every blob against its checksum; a damaged one is skipped with an
//! error, as rpm skips it.

use std::path::Path;

use crate::{DbError, EntryError, Package, header};

const DB_MAGIC: u32 = u32::from_le_bytes(*b"RpmP");
const SLOT_MAGIC: u32 = u32::from_le_bytes(*b"Slot");
const HEAD_MAGIC: u32 = u32::from_le_bytes(*b"BlbS");
const TAIL_MAGIC: u32 = u32::from_le_bytes(*b"BlbE");
const HEADER_SIZE: usize = 32;
const PAGE_SIZE: usize = 4096;
const SLOT_SIZE: usize = 16;
const BLK_SIZE: usize = 16;
const HEAD_SIZE: usize = 16;
const TAIL_SIZE: usize = 12;

fn le32(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
}

/// Adler-32 (RFC 1950).
pub fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 is the longest run before the sums can overflow u32.
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// Reads every package from an NDB `Packages.db`.
pub fn read(path: &Path) -> Result<(Vec<Package>, Vec<EntryError>), DbError> {
    let data = std::fs::read(path).map_err(|source| DbError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_bytes(&data).map_err(|reason| DbError::NotRpmDb {
        path: path.to_path_buf(),
        reason,
    })
}

/// Reads every package from the bytes of a `Packages.db`.
pub fn read_bytes(data: &[u8]) -> Result<(Vec<Package>, Vec<EntryError>), String> {
    if le32(data, 0) != Some(DB_MAGIC) {
        return Err("not an NDB database".into());
    }
    match le32(data, 4) {
        Some(0) => {}
        other => return Err(format!("unsupported NDB version {other:?}")),
    }
    let slot_pages = le32(data, 12).unwrap_or(0) as usize;
    if slot_pages == 0 || slot_pages.saturating_mul(PAGE_SIZE) > data.len() {
        return Err(format!("{slot_pages} slot pages do not fit in the file"));
    }
    let file_blocks = data.len() / BLK_SIZE;
    let first_blob_block = slot_pages * PAGE_SIZE / BLK_SIZE;
    let mut packages = Vec::new();
    let mut errors = Vec::new();
    for at in (HEADER_SIZE..slot_pages * PAGE_SIZE).step_by(SLOT_SIZE) {
        let (Some(magic), Some(pkgidx), Some(blkoff), Some(blkcnt)) = (
            le32(data, at),
            le32(data, at + 4),
            le32(data, at + 8),
            le32(data, at + 12),
        ) else {
            break;
        };
        let slot = |reason: &str| EntryError {
            entry: format!("slot@{at}"),
            reason: reason.into(),
        };
        if magic != SLOT_MAGIC {
            errors.push(slot("bad magic"));
            continue;
        }
        if blkoff == 0 {
            continue; // an empty slot
        }
        let (blkoff, blkcnt) = (blkoff as usize, blkcnt as usize);
        if pkgidx == 0 || blkcnt == 0 || blkoff < first_blob_block {
            errors.push(slot("bad slot entry"));
            continue;
        }
        let pkg = |reason: String| EntryError {
            entry: format!("pkg {pkgidx}"),
            reason,
        };
        let Some(blob) = blkoff
            .checked_add(blkcnt)
            .filter(|end| *end <= file_blocks)
            .and_then(|end| data.get(blkoff * BLK_SIZE..end * BLK_SIZE))
        else {
            errors.push(pkg("blob extent outside file".into()));
            continue;
        };
        match blob_header(blob, pkgidx).and_then(|h| header::package(h).map_err(|e| e.to_string()))
        {
            Ok(p) => packages.push(p),
            Err(reason) => errors.push(pkg(reason)),
        }
    }
    Ok((packages, errors))
}

/// Checks a blob's head, tail and checksum; returns the header blob inside.
fn blob_header(blob: &[u8], pkgidx: u32) -> Result<&[u8], String> {
    if blob.len() < HEAD_SIZE + TAIL_SIZE {
        return Err("blob too small".into());
    }
    let (Some(magic), Some(idx), Some(len)) = (le32(blob, 0), le32(blob, 4), le32(blob, 12)) else {
        return Err("bad blob header".into());
    };
    let len = len as usize;
    if magic != HEAD_MAGIC
        || idx != pkgidx
        || (HEAD_SIZE + len + TAIL_SIZE).div_ceil(BLK_SIZE) * BLK_SIZE != blob.len()
    {
        return Err("bad blob header".into());
    }
    let tail = blob.len() - TAIL_SIZE;
    if le32(blob, tail + 8) != Some(TAIL_MAGIC) || le32(blob, tail + 4) != Some(len as u32) {
        return Err("bad blob trailer".into());
    }
    if le32(blob, tail) != Some(adler32(&blob[..tail])) {
        return Err("adler32 mismatch (skipped, as rpm does)".into());
    }
    Ok(&blob[HEAD_SIZE..HEAD_SIZE + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_known_values() {
        assert_eq!(adler32(b""), 1);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(adler32(&vec![0xffu8; 100_000]), {
            // Reference computed bytewise without chunking (u64 cannot overflow here).
            let (mut a, mut b) = (1u64, 0u64);
            for _ in 0..100_000 {
                a = (a + 0xff) % 65_521;
                b = (b + a) % 65_521;
            }
            ((b << 16) | a) as u32
        });
    }
}
