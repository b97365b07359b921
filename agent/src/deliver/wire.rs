//! The form a report takes on a connection: protocol version 2 carries the compact document,
//! from which the relay renders the claircore JSON; a version-1 relay takes the JSON itself,
//! so the agent renders it (the same bytes the relay would).

use std::borrow::Cow;

use guestwatch_protocol::{
    DEFAULT_MAX_REPORT_PAYLOAD, Payload, PayloadEncoding, Report, ReportBody, inventory::Document,
};

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
    let facts = report::Facts::of_report(&doc, &report.facts, report.id.generation);
    let json = serde_json::to_vec(&report::claircore::render(&doc, &facts)).ok()?;
    Some(Cow::Owned(Report {
        body: ReportBody::Full(Payload::json(json)),
        ..report.clone()
    }))
}
