//! The form a report takes on a connection: protocol version 2 carries the compact document,
//! from which the relay renders the claircore JSON; a version-1 relay takes the JSON itself,
//! so the agent renders it (the same bytes the relay would).

use std::{borrow::Cow, sync::Arc};

use guestwatch_protocol::{
    ContentHash, DEFAULT_MAX_REPORT_PAYLOAD, Payload, PayloadEncoding, Report, ReportBody,
    ReportId, inventory::Document,
};

/// The base of delta reports: the last report the relay acknowledged, and its document.
#[derive(Clone, Debug)]
pub struct Base {
    pub id: ReportId,
    pub content_hash: ContentHash,
    pub document: Arc<Document>,
}

/// `report` (whole, carrying `document`) as a delta against `base`, if that is smaller.
pub fn as_delta(report: &Report, document: &Document, base: &Base) -> Option<Report> {
    let ReportBody::Full(full) = &report.body else {
        return None;
    };
    let delta = document.delta_from(&base.document.packages);
    let payload = Payload::document(delta.to_bytes());
    // The base's id and hash travel too.
    (payload.bytes.len() + 48 < full.bytes.len()).then(|| Report {
        id: report.id,
        content_hash: report.content_hash,
        facts: report.facts.clone(),
        body: ReportBody::Delta {
            base: base.id,
            base_hash: base.content_hash,
            payload,
        },
    })
}

/// The decompressed size of a payload, from the zstd frame header (the agent compressed it
/// itself, with the size recorded) rather than by decompressing it.
pub fn payload_len(payload: &Payload) -> Option<u64> {
    match payload.encoding {
        PayloadEncoding::Json | PayloadEncoding::Document => {
            u64::try_from(payload.bytes.len()).ok()
        }
        PayloadEncoding::JsonZstd | PayloadEncoding::DocumentZstd => {
            zstd::zstd_safe::get_frame_content_size(&payload.bytes)
                .ok()
                .flatten()
        }
    }
}

/// `report` as a relay speaking `version` takes it: unchanged for version 2; for version 1
/// a compact full report is rendered to claircore JSON (a delta cannot be: `None`).
pub fn for_version(report: &Report, version: u16) -> Option<Cow<'_, Report>> {
    if version >= 2 {
        return Some(Cow::Borrowed(report));
    }
    let ReportBody::Full(payload) = &report.body else {
        return None;
    };
    if !payload.is_document() {
        return Some(Cow::Borrowed(report));
    }
    let bytes = payload.to_document(DEFAULT_MAX_REPORT_PAYLOAD).ok()?;
    let doc = Document::from_bytes(&bytes).ok()?;
    let facts = report::Facts::of_report(
        &doc,
        &report.facts,
        report.id.generation,
        &report.content_hash,
    );
    let json = serde_json::to_vec(&report::claircore::render(&doc, &facts)).ok()?;
    Some(Cow::Owned(Report {
        body: ReportBody::Full(Payload::json(json)),
        ..report.clone()
    }))
}
