//! Berkeley DB hash databases (`Packages`): RHEL/CentOS 5–8, Amazon Linux 2, SLES 12.
//!
//! The whole file is read once (databases are megabytes) and walked page by page: every hash
//! page's key/data pairs, with data stored inline or in overflow-page chains. Both byte orders
//! are accepted (the metadata magic tells which); header blobs themselves are always big
//! endian. Every page number, offset and length is checked against the file before use.
//! Each overflow page is read at most once in the whole file: a chain that loops, or that runs
//! into a page another entry's chain already used (many entries sharing one large chain would
//! otherwise cost entries × chain), is a damaged entry. So is anything else wrong with an
//! entry: it is skipped with an error and the rest is still read. The work is linear in the
//! file size: items of a page cannot overlap, and every overflow page is decoded once.

use crate::{BytesError, Decoded, EntryError, ReadOptions};

const HASH_MAGIC: u32 = 0x0006_1561;
const BTREE_MAGIC: u32 = 0x0005_3162;
const PAGE_HEADER: usize = 26;

// Page types.
const P_HASH_UNSORTED: u8 = 2;
const P_OVERFLOW: u8 = 7;
const P_HASHMETA: u8 = 8;
const P_HASH: u8 = 13;

// Hash item types.
const H_KEYDATA: u8 = 1;
const H_OFFPAGE: u8 = 3;

#[derive(Clone, Copy)]
enum Order {
    Little,
    Big,
}

struct Db<'a> {
    data: &'a [u8],
    page_size: usize,
    /// Pages that exist in the file (the metadata's last page number, capped by the file size).
    pages: usize,
    order: Order,
}

impl<'a> Db<'a> {
    fn u16(&self, bytes: &[u8], at: usize) -> Option<u16> {
        let b: [u8; 2] = bytes.get(at..at + 2)?.try_into().ok()?;
        Some(match self.order {
            Order::Little => u16::from_le_bytes(b),
            Order::Big => u16::from_be_bytes(b),
        })
    }

    fn u32(&self, bytes: &[u8], at: usize) -> Option<u32> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(match self.order {
            Order::Little => u32::from_le_bytes(b),
            Order::Big => u32::from_be_bytes(b),
        })
    }

    fn page(&self, pgno: u32) -> Option<&'a [u8]> {
        let pgno = pgno as usize;
        if pgno >= self.pages {
            return None;
        }
        self.data
            .get(pgno * self.page_size..(pgno + 1) * self.page_size)
    }

    /// Follows an overflow chain from `start`, expecting `total` bytes.
    fn overflow(&self, start: u32, total: u32, walk: &mut Walk) -> Result<Vec<u8>, String> {
        self.follow(start, total, walk)
            .map_err(|detail| format!("bad overflow chain at {start}: {detail}"))
    }

    fn follow(&self, start: u32, total: u32, walk: &mut Walk) -> Result<Vec<u8>, String> {
        if total as usize > self.data.len() {
            return Err(format!("overflow length {total} exceeds the file"));
        }
        if total as usize > walk.max_blob {
            return Err(format!(
                "{total} bytes, more than the {} a header may have",
                walk.max_blob
            ));
        }
        walk.chains += 1;
        let chain = walk.chains;
        let mut out = Vec::with_capacity(total as usize);
        let mut pgno = start;
        // Each page is marked with the chain that read it: a chain can visit each page at most
        // once (more is a cycle), and a page read by another chain is not read again.
        for _ in 0..self.pages {
            let Some(page) = self.page(pgno).filter(|_| pgno != 0) else {
                return Err(format!("page {pgno} is not in the file"));
            };
            match walk.owner.get(pgno as usize).copied() {
                Some(0) => {}
                Some(c) if c == chain => return Err("the chain loops".into()),
                _ => {
                    return Err(format!(
                        "page {pgno} belongs to another entry's chain (read once)"
                    ));
                }
            }
            if let Some(owner) = walk.owner.get_mut(pgno as usize) {
                *owner = chain;
            }
            if page[25] != P_OVERFLOW {
                return Err(format!("page {pgno}: not an overflow page"));
            }
            let len = self.u16(page, 22).unwrap_or(0) as usize;
            let Some(chunk) = page.get(PAGE_HEADER..PAGE_HEADER + len) else {
                return Err(format!("page {pgno}: overflow length {len} > page"));
            };
            if out.len() + len > total as usize {
                return Err(format!("longer than its {total} bytes"));
            }
            out.extend_from_slice(chunk);
            let next = self.u32(page, 16).unwrap_or(0);
            if next == 0 {
                if out.len() != total as usize {
                    return Err(format!("holds {} of its {total} bytes", out.len()));
                }
                return Ok(out);
            }
            pgno = next;
        }
        Err("the chain loops".into())
    }

    /// The key/data pairs of one hash page, data resolved.
    fn entries(
        &self,
        pgno: u32,
        page: &[u8],
        out: &mut Decoded<'_>,
        walk: &mut Walk,
    ) -> Result<(), BytesError> {
        let count = self.u16(page, 20).unwrap_or(0) as usize;
        let index = |i: usize| self.u16(page, PAGE_HEADER + 2 * i).map(usize::from);
        // Items are packed from the end of the page downwards: item i ends where item i-1 starts.
        let end = |i: usize| {
            if i == 0 {
                Some(self.page_size)
            } else {
                index(i - 1)
            }
        };
        let mut i = 0;
        while i + 1 < count {
            let entry = format!("page {pgno} entry {}", i / 2);
            let (Some(key_at), Some(key_end), Some(data_at), Some(data_end)) =
                (index(i), end(i), index(i + 1), end(i + 1))
            else {
                out.errors.push(EntryError {
                    entry,
                    reason: "item index outside the page".into(),
                });
                return Ok(());
            };
            i += 2;
            if key_at >= key_end
                || key_end > self.page_size
                || data_at >= data_end
                || data_end > self.page_size
            {
                out.errors.push(EntryError {
                    entry,
                    reason: "item outside the page".into(),
                });
                continue;
            }
            if walk.options.expired() {
                return Err(BytesError::Deadline);
            }
            // Key 0 holds rpm's next-instance counter, not a package.
            let key = &page[key_at..key_end];
            if key.first() == Some(&H_KEYDATA) && key[1..].iter().all(|&b| b == 0) {
                continue;
            }
            let blob = match page[data_at] {
                H_KEYDATA => Ok(page[data_at + 1..data_end].to_vec()),
                H_OFFPAGE => match (self.u32(page, data_at + 4), self.u32(page, data_at + 8)) {
                    (Some(start), Some(len)) if data_at + 12 <= data_end => self
                        .overflow(start, len, walk)
                        .map_err(|e| format!("page {pgno}: {e}")),
                    _ => Err(format!("page {pgno}: truncated off-page item")),
                },
                other => Err(format!("page {pgno}: unsupported item type {other}")),
            };
            // Where the entry is: its page and its pair's index on the page.
            let slot = (u64::from(pgno) << 32) | (i / 2 - 1) as u64;
            let added = blob.and_then(|b| {
                if b.len() > walk.max_blob {
                    return Err(format!(
                        "{} bytes, more than the {} a header may have",
                        b.len(),
                        walk.max_blob
                    ));
                }
                out.bytes_decoded += b.len() as u64;
                out.keep(walk.options, || entry.clone(), &b);
                out.header(slot, &b).map_err(|e| e.to_string())
            });
            if let Err(reason) = added {
                out.errors.push(EntryError { entry, reason });
            }
        }
        Ok(())
    }
}

/// The state of one read: which chain read each overflow page, and its limits.
struct Walk<'o> {
    /// Per page: 0, or the number of the chain that read it.
    owner: Vec<u32>,
    chains: u32,
    max_blob: usize,
    options: &'o ReadOptions,
}

/// Reads every package from the bytes of a `Packages` file; `Err` when the file as a whole is
/// not a usable hash database.
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
    let invalid = |s: String| BytesError::Invalid(s);
    let magic = |order: Order| {
        let b: [u8; 4] = data.get(12..16)?.try_into().ok()?;
        Some(match order {
            Order::Little => u32::from_le_bytes(b),
            Order::Big => u32::from_be_bytes(b),
        })
    };
    let order = match (magic(Order::Little), magic(Order::Big)) {
        (Some(HASH_MAGIC), _) => Order::Little,
        (_, Some(HASH_MAGIC)) => Order::Big,
        (Some(BTREE_MAGIC), _) | (_, Some(BTREE_MAGIC)) => {
            return Err(invalid(
                "a Berkeley DB btree (an rpm index file), not the Packages hash database".into(),
            ));
        }
        _ => return Err(invalid("not a Berkeley DB hash database".into())),
    };
    let mut db = Db {
        data,
        page_size: 0,
        pages: 0,
        order,
    };
    let page_size = db.u32(data, 20).unwrap_or(0) as usize;
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(invalid(format!("bad page size {page_size}")));
    }
    db.page_size = page_size;
    if data.get(25) != Some(&P_HASHMETA) {
        return Err(invalid("the first page is not hash metadata".into()));
    }
    let last_pgno = db.u32(data, 32).unwrap_or(0) as usize;
    db.pages = (last_pgno + 1).min(data.len() / page_size);
    let mut walk = Walk {
        owner: vec![0; db.pages],
        chains: 0,
        max_blob: options.max_header_bytes,
        options,
    };
    for pgno in 1..db.pages as u32 {
        if options.expired() {
            return Err(BytesError::Deadline);
        }
        let Some(page) = db.page(pgno) else { break };
        if matches!(page[25], P_HASH | P_HASH_UNSORTED) {
            db.entries(pgno, page, &mut out, &mut walk)?;
        }
    }
    if last_pgno + 1 > db.pages {
        out.errors.push(EntryError {
            entry: format!("pages {}..={last_pgno}", db.pages),
            reason: "the file ends before its last page".into(),
        });
    }
    Ok(out)
}
