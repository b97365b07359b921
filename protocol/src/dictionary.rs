//! The zstd dictionary compact documents are compressed with: trained on the installed-package
//! lists of public RPM distributions (`cargo xtask train-dict`, see docs/protocol.md), it holds
//! the strings every inventory repeats (licences, vendors, common names, `.src.rpm`, `x86_64`)
//! and zstd's entropy tables, which a small document otherwise pays for itself.
//!
//! A frame names its dictionary by id (zstd's frame header). This id is part of protocol
//! version 2: a new dictionary gets a new id, and relays keep every id they ever shipped.

use std::sync::OnceLock;

use zstd::dict::{DecoderDictionary, EncoderDictionary};

/// The id of the dictionary below (ids from 32,768 up are free for private use).
pub const ID: u32 = 32_770;
/// The size it is trained to.
pub const SIZE: usize = 32 * 1024;
/// Where it lives, from the workspace root.
pub const PATH: &str = "protocol/dictionaries/rpm-packages-32770.zdict";

/// The dictionary itself (empty only while it is being trained for the first time).
pub const BYTES: &[u8] = include_bytes!("../dictionaries/rpm-packages-32770.zdict");

/// zstd's dictionary magic number, little-endian, before the id.
const MAGIC: [u8; 4] = [0x37, 0xa4, 0x30, 0xec];

/// Not a zstd dictionary.
#[derive(Debug, thiserror::Error)]
#[error("not a zstd dictionary")]
pub struct NotADictionary;

/// Gives a trained dictionary our id (zstd's trainer picks a random one).
pub fn set_id(dict: &mut [u8], id: u32) -> Result<(), NotADictionary> {
    match dict.get(..4) {
        Some(magic) if magic == MAGIC && dict.len() > 8 => {
            dict[4..8].copy_from_slice(&id.to_le_bytes());
            Ok(())
        }
        _ => Err(NotADictionary),
    }
}

/// The prepared dictionary for compressing documents at `level`: one of the levels documents
/// are compressed at (`payload.rs`), each prepared once.
pub(crate) fn encoder(level: i32) -> Option<&'static EncoderDictionary<'static>> {
    static PREPARED: [OnceLock<EncoderDictionary<'static>>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = crate::payload::DOCUMENT_LEVELS
        .iter()
        .position(|l| *l == level)?;
    (!BYTES.is_empty())
        .then(|| PREPARED[slot].get_or_init(|| EncoderDictionary::copy(BYTES, level)))
}

/// The prepared dictionary a frame naming `id` needs, if this build has it.
pub(crate) fn decoder(id: u32) -> Option<&'static DecoderDictionary<'static>> {
    static PREPARED: OnceLock<DecoderDictionary<'static>> = OnceLock::new();
    (id == ID && !BYTES.is_empty()).then(|| PREPARED.get_or_init(|| DecoderDictionary::copy(BYTES)))
}
