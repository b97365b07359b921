//! Frames: a 12-byte header and a payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic      "GWAT"
//!      4     2  version    protocol version, big endian
//!      6     2  type       message type, big endian
//!      8     4  length     payload length in bytes, big endian
//!     12     n  payload    bincode-encoded message
//! ```

use crate::{
    ProtocolError, SUPPORTED_VERSIONS,
    codec::{decode_payload, encode_payload},
    message::{Message, MessageType},
};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"GWAT";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: u16,
    pub len: u32,
}

impl FrameHeader {
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Parses and checks a header: magic, a version this build speaks, the length limit.
    pub fn parse(bytes: &[u8; HEADER_LEN], max_frame: u32) -> Result<Self, ProtocolError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let header = Self {
            version: u16::from_be_bytes([bytes[4], bytes[5]]),
            kind: u16::from_be_bytes([bytes[6], bytes[7]]),
            len: u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        };
        if !SUPPORTED_VERSIONS.contains(&header.version) {
            return Err(ProtocolError::UnsupportedVersion(header.version));
        }
        if header.len > max_frame {
            return Err(ProtocolError::TooLarge {
                len: header.len,
                max: max_frame,
            });
        }
        Ok(header)
    }
}

/// Encodes `message` as one frame of protocol `version`.
pub fn encode(version: u16, message: &Message, max_frame: u32) -> Result<Vec<u8>, ProtocolError> {
    let payload = encode_payload(version, message)?;
    let len = u32::try_from(payload.len())
        .map_err(|_| ProtocolError::Encode("payload over 4 GiB".into()))?;
    if len > max_frame {
        return Err(ProtocolError::TooLarge {
            len,
            max: max_frame,
        });
    }
    let header = FrameHeader {
        version,
        kind: message.kind() as u16,
        len,
    };
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// One frame taken off the front of a buffer.
#[derive(Debug)]
pub struct Decoded {
    /// Bytes the frame occupied (consume them whatever `message` is).
    pub consumed: usize,
    /// The protocol version of the frame.
    pub version: u16,
    /// The message, or a recoverable error ([`ProtocolError::UnknownType`],
    /// [`ProtocolError::Malformed`]): the stream is still in step after it.
    pub message: Result<Message, ProtocolError>,
}

/// Decodes the frame at the start of `buf`. `Ok(None)`: more bytes are needed. `Err`: the
/// stream is unusable (bad magic, unsupported version, over the limit) — nothing was allocated
/// for the frame's payload.
pub fn decode(buf: &[u8], max_frame: u32) -> Result<Option<Decoded>, ProtocolError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(head, max_frame)?;
    let end = HEADER_LEN + header.len as usize;
    let Some(payload) = buf.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    let message = match MessageType::from_u16(header.kind) {
        Some(kind) => decode_payload(header.version, kind, payload),
        None => Err(ProtocolError::UnknownType(header.kind)),
    };
    Ok(Some(Decoded {
        consumed: end,
        version: header.version,
        message,
    }))
}
