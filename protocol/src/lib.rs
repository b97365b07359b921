//! The guestwatch wire protocol between `guestwatch-agent` (in the guest) and
//! `guestwatch-relay` (on the host).
//!
//! Every message travels in a frame: a 12-byte header (magic, protocol version, message type,
//! payload length) and a bincode-encoded payload. Limits are checked on the header, before
//! anything is allocated. [`Connection`] owns the framing over any async byte stream; [`frame`]
//! offers the same as pure functions. The byte-level specification is `docs/protocol.md`.
//!
//! The trigger and attribution schema (`trigger.rs`) is defined here once and used by the
//! agent, the relay and every sink. This crate knows nothing about sockets, VSOCK, sinks or
//! BPF.
#![forbid(unsafe_code)]

mod codec;
mod columns;
mod connection;
pub mod dictionary;
pub mod frame;
pub mod inventory;
mod limits;
mod message;
mod payload;
mod trigger;
pub mod v1;

pub use codec::encoded_len;
pub use connection::{Connection, Timeout};
pub use frame::{FrameHeader, HEADER_LEN, MAGIC};
pub use limits::{DEFAULT_MAX_FRAME, DEFAULT_MAX_REPORT_PAYLOAD, LimitError, Limits, guest};
pub use message::{
    Ack, AckStatus, AgentInfo, ChangeCounts, ContentHash, ErrorCode, ErrorMessage, Hello, Message,
    MessageType, Nack, NackReason, Payload, PayloadEncoding, Report, ReportBody, ReportFacts,
    ReportId, Welcome,
};
pub use payload::{
    COMPRESSION_THRESHOLD, DOCUMENT_BEST_UP_TO, DOCUMENT_ZSTD_LEVEL, DOCUMENT_ZSTD_LEVEL_FAST,
    DOCUMENT_ZSTD_LEVEL_LARGE, PayloadError,
};
pub use trigger::{Ancestor, Attribution, Evidence, Timestamp, Trigger, TriggerKind};

/// The protocol version this build prefers (the highest it speaks).
pub const PROTOCOL_VERSION: u16 = 2;
/// Versions this build can speak, oldest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[1, 2];

/// Why a frame or message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer closed the stream in the middle of a frame.
    #[error("the peer closed the connection mid-frame ({buffered} bytes of an incomplete frame)")]
    ClosedMidFrame { buffered: usize },
    /// The bytes are not a guestwatch frame.
    #[error("not a guestwatch frame (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A frame of a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// A frame longer than the limit; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    /// A message type this build does not know; the frame was consumed, the stream is still in
    /// step, and the peer should be answered with an `Error`.
    #[error("unknown message type {0}")]
    UnknownType(u16),
    /// The payload does not decode as the message its header announces.
    #[error("malformed {kind:?} payload: {reason}")]
    Malformed { kind: MessageType, reason: String },
    /// A message could not be encoded (too large for the limit, or an encoder failure).
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// Whether the connection is still usable after this error (the frame boundary is intact).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, Self::UnknownType(_) | Self::Malformed { .. })
    }

    /// The error code to send the peer before acting on this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::UnknownType(_) => ErrorCode::UnknownMessageType,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::Malformed { .. } | Self::BadMagic(_) | Self::ClosedMidFrame { .. } => {
                ErrorCode::Malformed
            }
            Self::Encode(_) | Self::Io(_) => ErrorCode::Internal,
        }
    }
}
