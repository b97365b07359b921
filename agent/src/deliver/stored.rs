//! How a report is kept in the state directory: exactly one protocol frame, as it goes on the
//! wire in this build's protocol version.

use guestwatch_protocol::{Message, PROTOCOL_VERSION, Report, frame};

/// Encodes a report for the state directory; `None` if it cannot be encoded.
pub fn encode(report: &Report) -> Option<Vec<u8>> {
    frame::encode(
        PROTOCOL_VERSION,
        &Message::Report(Box::new(report.clone())),
        u32::MAX,
    )
    .ok()
}

/// Decodes a stored report; `None` if it is damaged (it is then discarded).
pub fn decode(bytes: &[u8]) -> Option<Report> {
    match frame::decode(bytes, u32::MAX).ok()??.message.ok()? {
        Message::Report(report) => Some(*report),
        _ => None,
    }
}
