//! The messages, as protocol version 2 defines them: the model both sides work with. Field
//! order is the wire order (bincode encodes fields in declaration order): never reorder or
//! remove fields within a protocol version; new fields mean a new version (see
//! `docs/protocol.md`, "Versions"). Version 1's different shapes live in `v1.rs`, converted to
//! and from these.

use std::fmt;

use bincode::{Decode, Encode};

use crate::trigger::{Attribution, Timestamp, Trigger, TriggerKind};

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
    /// The compact document (`inventory::Document`, or `DeltaDocument` in a delta), from which
    /// the relay renders the claircore JSON (version 2 only).
    Document,
    /// The same, zstd-compressed.
    DocumentZstd,
}

/// A report's payload: the bytes and how they are encoded.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Payload {
    pub encoding: PayloadEncoding,
    pub bytes: Vec<u8>,
}

/// What a report carries (protocol version 2; version 1 knows only `Full`).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ReportBody {
    /// The whole document.
    Full(Payload),
    /// Package records added, removed and changed since `base`, a report the relay
    /// acknowledged, whose content hash was `base_hash` (see `docs/protocol.md`, "Delta
    /// reports").
    Delta {
        base: ReportId,
        base_hash: ContentHash,
        payload: Payload,
    },
}

impl ReportBody {
    pub fn payload(&self) -> &Payload {
        match self {
            Self::Full(p) | Self::Delta { payload: p, .. } => p,
        }
    }
}

/// How the package set changed since the previous report, in rpm's version order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct ChangeCounts {
    pub added: u32,
    pub removed: u32,
    pub upgraded: u32,
    pub downgraded: u32,
    /// Same version, different content (digest or install time).
    pub reinstalled: u32,
}

impl ChangeCounts {
    /// Packages present before and after whose record changed.
    pub fn changed(&self) -> u32 {
        self.upgraded
            .saturating_add(self.downgraded)
            .saturating_add(self.reinstalled)
    }
}

/// Facts the relay needs without parsing the payload. All of it is the guest's claim.
///
/// On the wire the cause's attribution, when it is one of the listed transactions or tamper
/// records (as it usually is), is sent as a reference to it rather than a second copy
/// (`WireFacts`): attribution is most of a small report's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportFacts {
    /// The most significant trigger of the scan (its cause).
    pub trigger: Trigger,
    /// Every transaction the scan answers, oldest first (at most
    /// [`guest::MAX_LISTED`](crate::guest::MAX_LISTED); `coalesced` has the full count).
    pub transactions: Vec<Attribution>,
    /// Every tamper record the scan answers, oldest first (bounded likewise).
    pub tampers: Vec<Attribution>,
    /// How many triggers of each kind the scan answers.
    pub coalesced: Vec<(TriggerKind, u32)>,
    /// When the scan finished.
    pub scanned_at: Timestamp,
    pub package_count: u32,
    pub changes: ChangeCounts,
    pub agent_version: String,
    /// `ebpf`, `inotify` or `periodic`.
    pub detector: String,
}

impl Default for ReportFacts {
    fn default() -> Self {
        Self {
            trigger: Trigger::new(TriggerKind::Startup).at(Timestamp(0)),
            transactions: Vec::new(),
            tampers: Vec::new(),
            coalesced: Vec::new(),
            scanned_at: Timestamp(0),
            package_count: 0,
            changes: ChangeCounts::default(),
            agent_version: String::new(),
            detector: String::new(),
        }
    }
}

/// [`ReportFacts`] as encoded: the trigger's attribution by reference where it can be.
#[derive(Encode, Decode)]
struct WireFacts {
    kind: TriggerKind,
    detail: Option<String>,
    at: Timestamp,
    attribution: WireAttribution,
    transactions: Vec<Attribution>,
    tampers: Vec<Attribution>,
    coalesced: Vec<(TriggerKind, u32)>,
    scanned_at: Timestamp,
    package_count: u32,
    changes: ChangeCounts,
    agent_version: String,
    detector: String,
}

/// The trigger's attribution: 0 none, 1 inline, 2 the transaction at this index, 3 the tamper
/// record at this index.
#[derive(Encode, Decode)]
enum WireAttribution {
    None,
    Inline(Box<Attribution>),
    Transaction(u32),
    Tamper(u32),
}

impl Encode for ReportFacts {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        let index = |list: &[Attribution], a: &Attribution| {
            list.iter()
                .rposition(|x| x == a)
                .and_then(|i| u32::try_from(i).ok())
        };
        let attribution = match &self.trigger.attribution {
            None => WireAttribution::None,
            Some(a) => match (index(&self.transactions, a), index(&self.tampers, a)) {
                (Some(i), _) => WireAttribution::Transaction(i),
                (None, Some(i)) => WireAttribution::Tamper(i),
                (None, None) => WireAttribution::Inline(Box::new(a.clone())),
            },
        };
        WireFacts {
            kind: self.trigger.kind,
            detail: self.trigger.detail.clone(),
            at: self.trigger.at,
            attribution,
            transactions: self.transactions.clone(),
            tampers: self.tampers.clone(),
            coalesced: self.coalesced.clone(),
            scanned_at: self.scanned_at,
            package_count: self.package_count,
            changes: self.changes,
            agent_version: self.agent_version.clone(),
            detector: self.detector.clone(),
        }
        .encode(encoder)
    }
}

impl<Context> Decode<Context> for ReportFacts {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let w = WireFacts::decode(decoder)?;
        let listed = |list: &[Attribution], i: u32| {
            usize::try_from(i)
                .ok()
                .and_then(|i| list.get(i))
                .cloned()
                .ok_or(bincode::error::DecodeError::Other(
                    "the trigger refers to an attribution that is not listed",
                ))
        };
        let attribution = match w.attribution {
            WireAttribution::None => None,
            WireAttribution::Inline(a) => Some(*a),
            WireAttribution::Transaction(i) => Some(listed(&w.transactions, i)?),
            WireAttribution::Tamper(i) => Some(listed(&w.tampers, i)?),
        };
        Ok(Self {
            trigger: Trigger {
                kind: w.kind,
                detail: w.detail,
                at: w.at,
                attribution,
            },
            transactions: w.transactions,
            tampers: w.tampers,
            coalesced: w.coalesced,
            scanned_at: w.scanned_at,
            package_count: w.package_count,
            changes: w.changes,
            agent_version: w.agent_version,
            detector: w.detector,
        })
    }
}

bincode::impl_borrow_decode!(ReportFacts);

impl ReportFacts {
    /// The number of triggers this scan answers.
    pub fn coalesced_total(&self) -> u32 {
        self.coalesced
            .iter()
            .fold(0u32, |sum, (_, n)| sum.saturating_add(*n))
    }
}

/// Agent → relay: one index report.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Report {
    pub id: ReportId,
    /// The content hash of the whole package set (for a delta: of the set it reconstructs).
    pub content_hash: ContentHash,
    pub facts: ReportFacts,
    pub body: ReportBody,
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

/// Why a report was not acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub enum NackReason {
    /// The report exceeds a size limit (frame, decompressed payload, facts).
    TooLarge,
    /// The payload or facts do not decode, or are not what a report must be.
    Malformed,
    /// Well-formed but refused (a string or list over its limit, an encoding the relay does not
    /// take).
    Rejected,
    /// The VM is over its rate limit (reports or sink bytes per minute); the relay keeps the
    /// newest report and delivers it itself when the limit allows.
    RateLimited,
    /// The sink did not accept it yet; the relay keeps it and retries.
    SinkUnavailable,
    /// A delta whose base the relay does not have, or whose result does not match the content
    /// hash: send the full report.
    NeedFull,
}

impl NackReason {
    pub const ALL: [NackReason; 6] = [
        Self::TooLarge,
        Self::Malformed,
        Self::Rejected,
        Self::RateLimited,
        Self::SinkUnavailable,
        Self::NeedFull,
    ];

    /// The label used in metrics, logs and protocol version 1's text reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::Rejected => "rejected",
            Self::RateLimited => "rate_limited",
            Self::SinkUnavailable => "sink_unavailable",
            Self::NeedFull => "need_full",
        }
    }

    /// Whether sending the same report again can never succeed: the agent gives up on that
    /// generation (until something changes) instead of retrying.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::TooLarge | Self::Malformed | Self::Rejected)
    }
}

impl fmt::Display for NackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Relay → agent: not delivered. Retryable reasons: send the newest report again after
/// `retry_after_ms`; terminal ones ([`NackReason::is_terminal`]): do not send this one again.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Nack {
    pub id: ReportId,
    pub reason: NackReason,
    /// Human-readable detail (at most [`guest::MAX_TEXT`](crate::guest::MAX_TEXT) bytes).
    pub detail: String,
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
