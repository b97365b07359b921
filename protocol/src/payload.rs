//! Report payloads: zstd compression above a threshold, and bounded decompression.

use std::io::Read;

use crate::message::{Payload, PayloadEncoding};

/// Payloads larger than this are compressed (when that makes them smaller).
pub const COMPRESSION_THRESHOLD: usize = 64 * 1024;

/// Why a payload could not be turned back into JSON bytes.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("the payload decompresses to more than {max} bytes")]
    TooLarge { max: u32 },
    #[error("the payload is not valid zstd: {0}")]
    Corrupt(String),
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

    /// The JSON bytes, decompressing at most `max` bytes (a zstd bomb stops there without
    /// allocating more).
    pub fn to_json(&self, max: u32) -> Result<std::borrow::Cow<'_, [u8]>, PayloadError> {
        match self.encoding {
            PayloadEncoding::Json => {
                if self.bytes.len() > max as usize {
                    return Err(PayloadError::TooLarge { max });
                }
                Ok(std::borrow::Cow::Borrowed(&self.bytes))
            }
            PayloadEncoding::JsonZstd => {
                let decoder = zstd::stream::read::Decoder::new(self.bytes.as_slice())
                    .map_err(|e| PayloadError::Corrupt(e.to_string()))?;
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
