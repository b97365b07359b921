//! Report payloads: zstd compression above a threshold, and bounded decompression.

use std::io::Read;

use crate::message::{Payload, PayloadEncoding};

/// Payloads larger than this are compressed (when that makes them smaller).
pub const COMPRESSION_THRESHOLD: usize = 64 * 1024;

/// zstd level for compact documents: they are small, and every byte crosses the wire and
/// lands in sinks, so the slow end of the scale pays (measured by `cargo xtask bench wire`).
pub const DOCUMENT_ZSTD_LEVEL: i32 = 19;

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
    /// compressed with the shipped [`crate::dictionary`] when that makes them smaller.
    pub fn document(bytes: Vec<u8>) -> Self {
        let compressed = match crate::dictionary::encoder() {
            Some(dict) => zstd::bulk::Compressor::with_prepared_dictionary(dict)
                .and_then(|mut c| c.compress(&bytes)),
            None => zstd::bulk::compress(&bytes, DOCUMENT_ZSTD_LEVEL),
        };
        if let Ok(compressed) = compressed
            && compressed.len() < bytes.len()
        {
            return Self {
                encoding: PayloadEncoding::DocumentZstd,
                bytes: compressed,
            };
        }
        Self {
            encoding: PayloadEncoding::Document,
            bytes,
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
