//! Protocol version 1's shapes of the messages that changed in version 2 (`Report`, `Nack`),
//! and their conversion to and from the model in `message.rs`. The other messages are
//! encoded the same way in both versions.
//!
//! Version 1 has a flat, stringly trigger, one `changed` count and text `Nack` reasons; a
//! version-2 report with a delta body has no version-1 form.

use bincode::{Decode, Encode};

use crate::{
    message::{self, ChangeCounts, PayloadEncoding, ReportBody, ReportId},
    trigger::{Attribution, Timestamp, Trigger, TriggerKind},
};

/// The trigger of a scan and who caused it (version 1).
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
    pub return_code: Option<i32>,
    /// Unix milliseconds.
    pub started_at_ms: Option<u64>,
    /// Unix milliseconds.
    pub ended_at_ms: Option<u64>,
    pub library: Option<String>,
    pub operation: Option<String>,
    pub paths: Vec<String>,
    /// How many triggers this scan answers.
    pub coalesced: u32,
}

/// Version 1's change counts: upgrades, downgrades and reinstalls are one `changed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct ChangeCountsV1 {
    pub added: u32,
    pub removed: u32,
    pub changed: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct ReportFacts {
    pub trigger: TriggerFacts,
    pub scanned_at_ms: u64,
    pub package_count: u32,
    pub changes: ChangeCountsV1,
    pub agent_version: String,
    pub detector: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Report {
    pub id: ReportId,
    pub content_hash: message::ContentHash,
    pub facts: ReportFacts,
    pub encoding: PayloadEncoding,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Nack {
    pub id: ReportId,
    pub reason: String,
    pub retry_after_ms: u32,
}

/// Why a message has no version-1 form, or a version-1 message no model form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Incompatible {
    #[error("delta reports need protocol version 2")]
    Delta,
    #[error("compact documents need protocol version 2")]
    Document,
    #[error("unknown trigger kind {0:?}")]
    TriggerKind(String),
}

impl Report {
    pub fn from_model(report: &message::Report) -> Result<Self, Incompatible> {
        let ReportBody::Full(payload) = &report.body else {
            return Err(Incompatible::Delta);
        };
        if payload.is_document() {
            // Version-1 relays take the claircore JSON only: the sender renders it first.
            return Err(Incompatible::Document);
        }
        let facts = &report.facts;
        let trigger = &facts.trigger;
        let a = trigger.attribution.clone();
        let has = a.is_some();
        let a = a.unwrap_or_default();
        Ok(Self {
            id: report.id,
            content_hash: report.content_hash,
            facts: ReportFacts {
                trigger: TriggerFacts {
                    kind: trigger.kind.as_str().to_owned(),
                    detail: trigger.detail.clone(),
                    pid: has.then_some(a.pid),
                    tid: has.then_some(a.tid),
                    uid: has.then_some(a.uid),
                    gid: has.then_some(a.gid),
                    comm: has.then_some(a.comm),
                    exe: a.exe,
                    return_code: a.return_code,
                    started_at_ms: a.started_at.map(|t| t.0),
                    ended_at_ms: a.ended_at.map(|t| t.0),
                    library: a.library,
                    operation: a.operation,
                    paths: a.paths,
                    coalesced: facts.coalesced_total(),
                },
                scanned_at_ms: facts.scanned_at.0,
                package_count: facts.package_count,
                changes: ChangeCountsV1 {
                    added: facts.changes.added,
                    removed: facts.changes.removed,
                    changed: facts.changes.changed(),
                },
                agent_version: facts.agent_version.clone(),
                detector: facts.detector.clone(),
            },
            encoding: payload.encoding,
            payload: payload.bytes.clone(),
        })
    }

    pub fn into_model(self) -> Result<message::Report, Incompatible> {
        let t = self.facts.trigger;
        let kind = TriggerKind::parse(&t.kind).ok_or(Incompatible::TriggerKind(t.kind))?;
        let attribution = t.pid.map(|pid| Attribution {
            pid,
            tid: t.tid.unwrap_or(pid),
            uid: t.uid.unwrap_or_default(),
            gid: t.gid.unwrap_or_default(),
            comm: t.comm.unwrap_or_default(),
            exe: t.exe,
            return_code: t.return_code,
            started_at: t.started_at_ms.map(Timestamp),
            ended_at: t.ended_at_ms.map(Timestamp),
            library: t.library,
            operation: t.operation,
            paths: t.paths,
            ..Default::default()
        });
        let at = t
            .ended_at_ms
            .map_or(Timestamp(self.facts.scanned_at_ms), Timestamp);
        let (transactions, tampers) = match (&attribution, kind) {
            (Some(a), TriggerKind::Transaction) => (vec![a.clone()], vec![]),
            (Some(a), TriggerKind::Tamper) => (vec![], vec![a.clone()]),
            _ => (vec![], vec![]),
        };
        Ok(message::Report {
            id: self.id,
            content_hash: self.content_hash,
            facts: message::ReportFacts {
                trigger: Trigger {
                    kind,
                    detail: t.detail,
                    at,
                    attribution,
                },
                transactions,
                tampers,
                coalesced: vec![(kind, t.coalesced)],
                scanned_at: Timestamp(self.facts.scanned_at_ms),
                package_count: self.facts.package_count,
                // Version 1 does not say which way a version moved.
                changes: ChangeCounts {
                    added: self.facts.changes.added,
                    removed: self.facts.changes.removed,
                    upgraded: self.facts.changes.changed,
                    downgraded: 0,
                    reinstalled: 0,
                },
                agent_version: self.facts.agent_version,
                detector: self.facts.detector,
            },
            body: ReportBody::Full(message::Payload {
                encoding: self.encoding,
                bytes: self.payload,
            }),
        })
    }
}

/// Version-1 reason texts, as version-1 relays wrote them.
const RATE_LIMITED_V1: &str = "rate limited";
const SINK_UNAVAILABLE_V1: &str = "sink unavailable";

impl Nack {
    pub fn from_model(nack: &message::Nack) -> Self {
        use message::NackReason::*;
        let label = match nack.reason {
            RateLimited => RATE_LIMITED_V1,
            SinkUnavailable => SINK_UNAVAILABLE_V1,
            other => other.as_str(),
        };
        Self {
            id: nack.id,
            reason: if nack.detail.is_empty() {
                label.to_owned()
            } else {
                format!("{label}: {}", nack.detail)
            },
            retry_after_ms: nack.retry_after_ms,
        }
    }

    /// Version-1 relays only ever deferred (rate limit, sink); any other text is taken as a
    /// retryable sink problem, which is how version-1 agents treated every `Nack`.
    pub fn into_model(self) -> message::Nack {
        use message::NackReason;
        let (label, detail) = match self.reason.split_once(": ") {
            Some((label, detail)) => (label, detail),
            None => (self.reason.as_str(), ""),
        };
        let reason = match label {
            RATE_LIMITED_V1 => NackReason::RateLimited,
            SINK_UNAVAILABLE_V1 => NackReason::SinkUnavailable,
            other => NackReason::ALL
                .into_iter()
                .find(|r| r.as_str() == other)
                .unwrap_or(NackReason::SinkUnavailable),
        };
        message::Nack {
            id: self.id,
            reason,
            detail: detail.to_owned(),
            retry_after_ms: self.retry_after_ms,
        }
    }
}
