//! Berkeley DB and NDB work is linear in the file size: databases derived from the real
//! fixtures, patched so that many entries share one large overflow chain or blob, decode that
//! chain or blob once (a counter of bytes decoded, not a clock, is the measure).

use std::path::{Path, PathBuf};

use rpmdb::ReadOptions;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/rpmdb")
        .join(rel)
}

fn le16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

fn le32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
}

#[test]
fn bdb_entries_sharing_one_overflow_chain_decode_it_once() {
    let mut data = std::fs::read(fixture("go-rpmdb_libuuid/Packages")).unwrap();
    let page_size = le32(&data, 20) as usize;
    // The hash page whose data item is off-page: libuuid's one package, an overflow chain.
    let (pgno, item) = (1..data.len() / page_size)
        .find_map(|p| {
            let page = &data[p * page_size..(p + 1) * page_size];
            if page[25] != 13 {
                return None;
            }
            (0..le16(page, 20) as usize)
                .map(|i| le16(page, 26 + 2 * i) as usize)
                .find(|&at| page[at] == 3)
                .map(|at| (p, page[at..at + 12].to_vec()))
        })
        .expect("an off-page item");
    let chain_len = le32(&item, 8) as usize;
    assert!(chain_len > 50_000, "a large chain: {chain_len}");
    // Rewrite that page: N key/data pairs, every data item pointing at the same chain.
    const N: usize = 150;
    let page = &mut data[pgno * page_size..(pgno + 1) * page_size];
    page[PAGE_HEADER_END..].fill(0);
    let mut top = page_size;
    for k in 0..N {
        let mut key = vec![1u8];
        key.extend_from_slice(&(k as u32 + 1).to_le_bytes());
        for (slot, bytes) in [(2 * k, &key), (2 * k + 1, &item)] {
            top -= bytes.len();
            page[top..top + bytes.len()].copy_from_slice(bytes);
            page[26 + 2 * slot..28 + 2 * slot].copy_from_slice(&(top as u16).to_le_bytes());
        }
    }
    page[20..22].copy_from_slice(&((2 * N) as u16).to_le_bytes());
    page[22..24].copy_from_slice(&(top as u16).to_le_bytes());

    let read = rpmdb::bdb::read_bytes_with(&data, &ReadOptions::default()).unwrap();
    assert_eq!(read.packages.len(), 1, "the chain is still read once");
    assert_eq!(read.packages[0].name, "libuuid");
    assert_eq!(read.errors.len(), N - 1, "{:?}", read.errors.first());
    assert!(
        read.errors
            .iter()
            .all(|e| e.reason.contains("belongs to another entry's chain")),
        "{:?}",
        read.errors.first()
    );
    // Without the rule this is N × the chain (12 MB from a 94 KB file).
    assert_eq!(read.bytes_decoded, chain_len as u64);
    assert!(read.bytes_decoded <= data.len() as u64);
}

/// Where a Berkeley DB hash page's header ends (items and their index follow).
const PAGE_HEADER_END: usize = 26;

#[test]
fn ndb_slots_sharing_one_blob_decode_it_once() {
    let mut data = std::fs::read(fixture("go-rpmdb_sle15-bci/Packages.db")).unwrap();
    let slot_end = le32(&data, 12) as usize * 4096;
    // The slot of the largest blob.
    let largest = (32..slot_end)
        .step_by(16)
        .filter(|&at| &data[at..at + 4] == b"Slot" && le32(&data, at + 8) != 0)
        .max_by_key(|&at| le32(&data, at + 12))
        .unwrap();
    let slot = data[largest..largest + 16].to_vec();
    let blob_bytes = le32(&slot, 12) as u64 * 16;
    assert!(blob_bytes > 300_000, "a large blob: {blob_bytes}");
    // Every slot (empty ones too) now names that blob.
    let slots = (slot_end - 32) / 16;
    for at in (32..slot_end).step_by(16) {
        data[at..at + 16].copy_from_slice(&slot);
    }
    let read = rpmdb::ndb::read_bytes_with(&data, &ReadOptions::default()).unwrap();
    assert_eq!(read.packages.len(), 1);
    assert_eq!(read.errors.len(), slots - 1, "{:?}", read.errors.first());
    assert!(
        read.errors
            .iter()
            .all(|e| e.reason.contains("shares blocks")),
        "{:?}",
        read.errors.first()
    );
    // Without the rule: 254 × 342 KB = 87 MB from a 1.3 MB file.
    assert_eq!(read.bytes_decoded, blob_bytes);
    assert!(read.bytes_decoded <= data.len() as u64);
}

#[test]
fn ndb_overlapping_blobs_are_read_once() {
    // A slot whose extent starts inside another blob (not at the same block).
    let mut data = std::fs::read(fixture("go-rpmdb_sle15-bci/Packages.db")).unwrap();
    let slot_end = le32(&data, 12) as usize * 4096;
    let used: Vec<usize> = (32..slot_end)
        .step_by(16)
        .filter(|&at| &data[at..at + 4] == b"Slot" && le32(&data, at + 8) != 0)
        .collect();
    let (a, b) = (used[0], used[1]);
    let (off, cnt) = (le32(&data, a + 8), le32(&data, a + 12));
    data[b + 8..b + 12].copy_from_slice(&(off + cnt / 2).to_le_bytes());
    let read = rpmdb::ndb::read_bytes_with(&data, &ReadOptions::default()).unwrap();
    assert_eq!(read.packages.len(), 34);
    assert!(
        read.errors
            .iter()
            .any(|e| e.reason.contains("shares blocks")),
        "{:?}",
        read.errors
    );
}

#[test]
fn real_databases_decode_about_their_size() {
    for rel in [
        "go-rpmdb_libuuid/Packages",
        "preflight_bdb-ubi7-tzdata/Packages",
        "go-rpmdb_sle15-bci/Packages.db",
        "go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite",
    ] {
        let scan = rpmdb::read(&fixture(rel)).unwrap();
        let size = std::fs::metadata(fixture(rel)).unwrap().len();
        assert!(
            scan.bytes_decoded > 0 && scan.bytes_decoded <= size,
            "{rel}"
        );
    }
}
