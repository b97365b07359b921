//! Report payloads: zstd compression above a threshold, and bounded decompression.

use std::io::{Read, Write};

use crate::message::{Payload, PayloadEncoding};

/// Payloads larger than this are compressed (when that makes them smaller).
pub const COMPRESSION_THRESHOLD: usize = 64 * 1024;

/// zstd level for compact documents: they are small, and every byte crosses the wire and
/// lands in sinks, so the slow end of the scale pays (measured by `cargo xtask bench wire`)...
pub const DOCUMENT_ZSTD_LEVEL: i32 = 19;
/// ...up to this size (about 600 packages); beyond it level 19 costs tens of milliseconds a
/// report, so a large inventory is compressed at [`DOCUMENT_ZSTD_LEVEL_LARGE`]: with the
/// dictionary, within 4 % of level 9's size at a quarter of its time (2,000 and 10,000
/// packages: 0.4 and 1.1 ms), on the way from a transaction to the sink.
pub const DOCUMENT_BEST_UP_TO: usize = 64 * 1024;
pub const DOCUMENT_ZSTD_LEVEL_LARGE: i32 = 3;
/// For documents stored rather than sent (the relay's copy of each VM's inventory).
pub const DOCUMENT_ZSTD_LEVEL_FAST: i32 = 3;
/// The levels a dictionary is prepared for (large and fast are one level today).
pub(crate) const DOCUMENT_LEVELS: [i32; 3] = [
    DOCUMENT_ZSTD_LEVEL,
    DOCUMENT_ZSTD_LEVEL_LARGE,
    DOCUMENT_ZSTD_LEVEL_FAST,
];

/// Why a payload could not be turned back into its bytes.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("the payload decompresses to more than {max} bytes")]
    TooLarge { max: u32 },
    #[error("the payload is not valid zstd: {0}")]
    Corrupt(String),
    #[error("the payload needs zstd dictionary {0}, which this build does not have")]
    UnknownDictionary(u32),
    #[error("the payload is a {found:?}, not {wanted}")]
    WrongEncoding {
        found: PayloadEncoding,
        wanted: &'static str,
    },
}

/// The level a compact document of `len` bytes is sent at.
fn document_level(len: usize) -> i32 {
    if len <= DOCUMENT_BEST_UP_TO {
        DOCUMENT_ZSTD_LEVEL
    } else {
        DOCUMENT_ZSTD_LEVEL_LARGE
    }
}

/// Raw digest bytes from which a full document puts them in a block of their own.
const SPLIT_DIGESTS_FROM: usize = 16 * 16;

impl Payload {
    /// `json`, zstd-compressed when it is large and compression pays.
    pub fn json(json: Vec<u8>) -> Self {
        if json.len() > COMPRESSION_THRESHOLD
            && let Ok(compressed) = zstd::bulk::compress(&json, 3)
            && compressed.len() < json.len()
        {
            return Self {
                encoding: PayloadEncoding::JsonZstd,
                bytes: compressed,
            };
        }
        Self {
            encoding: PayloadEncoding::Json,
            bytes: json,
        }
    }

    /// A compact document's bytes (`inventory::Document::to_bytes` or the delta's), zstd-
    /// compressed with the shipped [`crate::dictionary`] when that makes them smaller: for the
    /// wire, as small as is quick.
    pub fn document(bytes: Vec<u8>) -> Self {
        let level = document_level(bytes.len());
        Self::document_at(bytes, level)
    }

    /// A full compact document for the wire, as [`Payload::document`] compresses it but with
    /// the raw header digests in a block of their own: 16 random bytes a package, which in the
    /// text's block would flatten the statistics its literals are coded with.
    pub fn of_document(document: &crate::inventory::Document) -> Self {
        let (text, digests) = document.to_parts();
        // A block header costs 3 bytes: worth it only for more than a few digests.
        if digests.len() < SPLIT_DIGESTS_FROM {
            return Self::document([text, digests].concat());
        }
        let level = document_level(text.len() + digests.len());
        let Some(dict) = crate::dictionary::encoder(level) else {
            return Self::document_at([text, digests].concat(), level);
        };
        let in_blocks = || -> std::io::Result<Vec<u8>> {
            let mut encoder =
                zstd::stream::write::Encoder::with_prepared_dictionary(Vec::new(), dict)?;
            encoder.write_all(&text)?;
            // Ends the block: the digests start a new one.
            encoder.flush()?;
            encoder.write_all(&digests)?;
            encoder.finish()
        };
        match in_blocks() {
            Ok(compressed) if compressed.len() < text.len() + digests.len() => Self {
                encoding: PayloadEncoding::DocumentZstd,
                bytes: compressed,
            },
            // Uncompressible in blocks (not seen on real inventories): as one block, if that pays.
            _ => Self::document_at([text, digests].concat(), level),
        }
    }

    /// The same, compressed quickly (a copy kept, not sent).
    pub fn document_fast(bytes: Vec<u8>) -> Self {
        Self::document_at(bytes, DOCUMENT_ZSTD_LEVEL_FAST)
    }

    fn document_at(bytes: Vec<u8>, level: i32) -> Self {
        let compressed = match crate::dictionary::encoder(level) {
            Some(dict) => zstd::bulk::Compressor::with_prepared_dictionary(dict)
                .and_then(|mut c| c.compress(&bytes)),
            None => zstd::bulk::compress(&bytes, level),
        };
        match compressed {
            Ok(compressed) if compressed.len() < bytes.len() => Self {
                encoding: PayloadEncoding::DocumentZstd,
                bytes: compressed,
            },
            _ => Self {
                encoding: PayloadEncoding::Document,
                bytes,
            },
        }
    }

    /// Whether it is a compact document (the relay renders the JSON) rather than JSON.
    pub fn is_document(&self) -> bool {
        matches!(
            self.encoding,
            PayloadEncoding::Document | PayloadEncoding::DocumentZstd
        )
    }

    /// The JSON bytes, decompressing at most `max` bytes (a zstd bomb stops there without
    /// allocating more).
    pub fn to_json(&self, max: u32) -> Result<std::borrow::Cow<'_, [u8]>, PayloadError> {
        match self.encoding {
            PayloadEncoding::Json | PayloadEncoding::JsonZstd => self.decompressed(max),
            found => Err(PayloadError::WrongEncoding {
                found,
                wanted: "JSON",
            }),
        }
    }

    /// A compact document's bytes, decompressing at most `max` bytes.
    pub fn to_document(&self, max: u32) -> Result<std::borrow::Cow<'_, [u8]>, PayloadError> {
        match self.encoding {
            PayloadEncoding::Document | PayloadEncoding::DocumentZstd => self.decompressed(max),
            found => Err(PayloadError::WrongEncoding {
                found,
                wanted: "a compact document",
            }),
        }
    }

    /// The bytes, decompressed when the encoding says so, at most `max` of them.
    fn decompressed(&self, max: u32) -> Result<std::borrow::Cow<'_, [u8]>, PayloadError> {
        match self.encoding {
            PayloadEncoding::Json | PayloadEncoding::Document => {
                if self.bytes.len() > max as usize {
                    return Err(PayloadError::TooLarge { max });
                }
                Ok(std::borrow::Cow::Borrowed(&self.bytes))
            }
            PayloadEncoding::JsonZstd | PayloadEncoding::DocumentZstd => {
                let corrupt = |e: std::io::Error| PayloadError::Corrupt(e.to_string());
                // The frame names the dictionary it was compressed with, if any.
                let decoder = match zstd::zstd_safe::get_dict_id_from_frame(&self.bytes) {
                    None => zstd::stream::read::Decoder::with_buffer(self.bytes.as_slice()),
                    Some(id) => {
                        let dict = crate::dictionary::decoder(id.get())
                            .ok_or(PayloadError::UnknownDictionary(id.get()))?;
                        zstd::stream::read::Decoder::with_prepared_dictionary(
                            self.bytes.as_slice(),
                            dict,
                        )
                    }
                }
                .map_err(corrupt)?;
                let mut out =
                    Vec::with_capacity(self.bytes.len().saturating_mul(4).min(max as usize));
                decoder
                    .take(u64::from(max) + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| PayloadError::Corrupt(e.to_string()))?;
                if out.len() > max as usize {
                    return Err(PayloadError::TooLarge { max });
                }
                Ok(std::borrow::Cow::Owned(out))
            }
        }
    }
}
