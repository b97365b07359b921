//! NDB databases (`Packages.db`): SUSE.
//!
//! A 32-byte header ("RpmP", version 0, generation, number of slot pages), slot pages of 16-byte
//! slots ("Slot", package index, block offset, block count; blocks are 16 bytes), and one blob
//! per package: a head ("BlbS", package index, generation, length), the header blob, padding,
//! and a tail (Adler-32 of everything before the tail, length, "BlbE"). Every slot is checked
//! against the file and every blob against its checksum; a damaged one is skipped with an
//! error, as rpm skips it. Blobs may not overlap: a slot whose blob shares blocks with one
//! already read is damaged (many slots naming one large blob would otherwise cost slots × blob),
//! so the work is linear in the file size.

use std::collections::BTreeMap;

use crate::{BytesError, Decoded, EntryError, ReadOptions};

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

/// Reads every package from the bytes of a `Packages.db`.
pub fn read_bytes(data: &[u8]) -> Result<(Vec<crate::Package>, Vec<EntryError>), String> {
    crate::owned(read_bytes_with(data, &ReadOptions::default()))
}

/// [`read_bytes`] with options (deadline, largest header), and what it decoded.
pub fn read_bytes_with(data: &[u8], options: &ReadOptions) -> Result<Decoded<'static>, BytesError> {
    read_into(data, options, Decoded::default())
}

/// Decodes the bytes of the whole file (read by the crate's [`crate::read_whole`]).
pub(crate) fn read_into<'r>(
    data: &[u8],
    options: &ReadOptions,
    mut out: Decoded<'r>,
) -> Result<Decoded<'r>, BytesError> {
    if le32(data, 0) != Some(DB_MAGIC) {
        return Err(BytesError::Invalid("not an NDB database".into()));
    }
    match le32(data, 4) {
        Some(0) => {}
        other => {
            return Err(BytesError::Invalid(format!(
                "unsupported NDB version {other:?}"
            )));
        }
    }
    let slot_pages = le32(data, 12).unwrap_or(0) as usize;
    if slot_pages == 0 || slot_pages.saturating_mul(PAGE_SIZE) > data.len() {
        return Err(BytesError::Invalid(format!(
            "{slot_pages} slot pages do not fit in the file"
        )));
    }
    let file_blocks = data.len() / BLK_SIZE;
    let first_blob_block = slot_pages * PAGE_SIZE / BLK_SIZE;
    // Blobs read so far: first block -> (end block, package index).
    let mut read: BTreeMap<usize, (usize, u32)> = BTreeMap::new();
    for at in (HEADER_SIZE..slot_pages * PAGE_SIZE).step_by(SLOT_SIZE) {
        if options.expired() {
            return Err(BytesError::Deadline);
        }
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
            out.errors.push(slot("bad magic"));
            continue;
        }
        if blkoff == 0 {
            continue; // an empty slot
        }
        let (blkoff, blkcnt) = (blkoff as usize, blkcnt as usize);
        if pkgidx == 0 || blkcnt == 0 || blkoff < first_blob_block {
            out.errors.push(slot("bad slot entry"));
            continue;
        }
        let pkg = |reason: String| EntryError {
            entry: format!("pkg {pkgidx}"),
            reason,
        };
        let Some((end, blob)) = blkoff
            .checked_add(blkcnt)
            .filter(|end| *end <= file_blocks)
            .and_then(|end| Some((end, data.get(blkoff * BLK_SIZE..end * BLK_SIZE)?)))
        else {
            out.errors.push(pkg("blob extent outside file".into()));
            continue;
        };
        // The blob read last before `end` is the only one that can overlap this one.
        if let Some((_, (prev_end, prev_pkg))) = read.range(..end).next_back()
            && *prev_end > blkoff
        {
            out.errors.push(pkg(format!(
                "blob shares blocks with the blob of pkg {prev_pkg} (read once)"
            )));
            continue;
        }
        read.insert(blkoff, (end, pkgidx));
        if blob.len() > options.max_header_bytes + HEAD_SIZE + TAIL_SIZE + BLK_SIZE {
            out.errors.push(pkg(format!(
                "blob of {} bytes, more than a header may have",
                blob.len()
            )));
            continue;
        }
        out.bytes_decoded += blob.len() as u64;
        let added = blob_header(blob, pkgidx).and_then(|h| {
            out.keep(options, || format!("pkg {pkgidx}"), h);
            out.header(u64::from(pkgidx), h).map_err(|e| e.to_string())
        });
        if let Err(reason) = added {
            out.errors.push(pkg(reason));
        }
    }
    Ok(out)
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
