//! The messages. Field order is the wire order (bincode encodes fields in declaration order):
//! never reorder or remove fields within a protocol version; new fields mean a new version
//! (see `docs/protocol.md`, "Versions").

use std::fmt;

use bincode::{Decode, Encode};

/// Message type codes (the header's `type` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    Hello = 1,
    Welcome = 2,
    Report = 3,
    Ack = 4,
    Nack = 5,
    Ping = 6,
    Pong = 7,
    Error = 8,
}

impl MessageType {
    pub fn from_u16(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Report,
            4 => Self::Ack,
            5 => Self::Nack,
            6 => Self::Ping,
            7 => Self::Pong,
            8 => Self::Error,
            _ => return None,
        })
    }
}

/// Identifies a report: the agent installation's epoch and a generation that only grows.
/// Ordered by (epoch, generation); within one epoch, higher generations supersede lower ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct ReportId {
    pub epoch: u64,
    pub generation: u64,
}

impl fmt::Display for ReportId {
    /// `<epoch as 16 hex digits>-<generation>`: the sinks' idempotency key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.epoch, self.generation)
    }
}

/// SHA-256 of the reported package set (computed by the agent).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

/// What the agent says about itself. The relay records it as claims; it never identifies the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct AgentInfo {
    pub agent_version: String,
    pub hostname: String,
    /// `PRETTY_NAME` of the guest's os-release.
    pub os: String,
    pub kernel: String,
    /// `ebpf`, `inotify` or `periodic`.
    pub detector: String,
}

/// Agent → relay, first message on every connection.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    /// Protocol versions the agent speaks.
    pub versions: Vec<u16>,
    /// The agent installation's epoch (see [`ReportId`]).
    pub epoch: u64,
    pub agent: AgentInfo,
    /// Free-form additions (key, value) a newer agent may send; unknown keys are ignored.
    pub extensions: Vec<(String, String)>,
}

/// Relay → agent, answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Welcome {
    /// The version both sides speak from now on.
    pub version: u16,
    /// The largest frame the relay accepts.
    pub max_frame: u32,
    /// The largest report payload (decompressed) the relay accepts.
    pub max_report_payload: u32,
    /// Optional capabilities, e.g. `zstd`.
    pub features: Vec<String>,
    /// The agent should send a `Ping` when idle this long (the relay closes idle connections
    /// after a longer time).
    pub ping_interval_secs: u32,
    pub relay_version: String,
}

/// How a report's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum PayloadEncoding {
    /// The claircore JSON as is.
    Json,
    /// The claircore JSON, zstd-compressed.
    JsonZstd,
}

/// The trigger of a scan and who caused it, as the agent saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct TriggerFacts {
    /// `startup`, `periodic`, `inotify`, `tamper` or `transaction`.
    pub kind: String,
    pub detail: Option<String>,
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    /// `rpmtsRun`'s return value.
    pub return_code: Option<i32>,
    /// Unix milliseconds.
    pub started_at_ms: Option<u64>,
    /// Unix milliseconds.
    pub ended_at_ms: Option<u64>,
    pub library: Option<String>,
    /// Tamper: the file operation.
    pub operation: Option<String>,
    /// Tamper: the files touched.
    pub paths: Vec<String>,
    /// How many triggers this scan answers.
    pub coalesced: u32,
}

/// How the package set changed since the previous report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct ChangeCounts {
    pub added: u32,
    pub removed: u32,
    pub changed: u32,
}

/// Facts the relay needs without parsing the payload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct ReportFacts {
    pub trigger: TriggerFacts,
    /// When the scan finished, Unix milliseconds.
    pub scanned_at_ms: u64,
    pub package_count: u32,
    pub changes: ChangeCounts,
    pub agent_version: String,
    pub detector: String,
}

/// Agent → relay: one index report.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Report {
    pub id: ReportId,
    pub content_hash: ContentHash,
    pub facts: ReportFacts,
    pub encoding: PayloadEncoding,
    pub payload: Vec<u8>,
}

/// What an `Ack` confirms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum AckStatus {
    /// The sink accepted the report.
    Delivered,
    /// The sink already had this content.
    Duplicate,
}

/// Relay → agent: the sink has the report.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Ack {
    pub id: ReportId,
    pub status: AckStatus,
}

/// Relay → agent: not delivered yet; send it again after `retry_after_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Nack {
    pub id: ReportId,
    pub reason: String,
    pub retry_after_ms: u32,
}

/// Error codes of the `Error` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ErrorCode {
    /// No common protocol version; the sender closes the connection.
    UnsupportedVersion,
    /// The message type is unknown; the connection stays open.
    UnknownMessageType,
    /// A frame or payload could not be decoded.
    Malformed,
    /// A frame or payload exceeds a limit; the sender closes the connection.
    TooLarge,
    /// A message out of order (e.g. `Report` before `Hello`).
    ProtocolViolation,
    /// A limit other than size (connections, rate); retry later.
    Busy,
    Internal,
}

/// Either side: something went wrong.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
}

/// Every message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    /// Boxed: reports are far larger than the other messages.
    Report(Box<Report>),
    Ack(Ack),
    Nack(Nack),
    /// Keep-alive with a nonce the `Pong` echoes.
    Ping(u64),
    Pong(u64),
    Error(ErrorMessage),
}

impl Message {
    pub fn kind(&self) -> MessageType {
        match self {
            Self::Hello(_) => MessageType::Hello,
            Self::Welcome(_) => MessageType::Welcome,
            Self::Report(_) => MessageType::Report,
            Self::Ack(_) => MessageType::Ack,
            Self::Nack(_) => MessageType::Nack,
            Self::Ping(_) => MessageType::Ping,
            Self::Pong(_) => MessageType::Pong,
            Self::Error(_) => MessageType::Error,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorMessage {
            code,
            message: message.into(),
        })
    }
}
