//! What a report must be before it goes to a sink, and the typed `Nack` for one that is not.
//!
//! - its facts within the guest bounds (`protocol::guest`) → else `Rejected`;
//! - its payload decompresses within `max_report_payload` → else `TooLarge`, or `Malformed` if
//!   it is not valid zstd;
//! - the payload is one JSON object (the sinks splice it into their documents as is) → else
//!   `Malformed`; or a compact document that decodes, whose records have the content hash the
//!   report claims → else `Malformed`; the relay then renders its claircore JSON;
//! - a delta report: its base is the VM's latest inventory (same content hash) → else
//!   `NeedFull`; the delta decodes → else `Malformed`; it applies to the base and gives the
//!   content hash the report claims → else `NeedFull` (the guest sends the whole report, which
//!   is then checked as any other).
//!
//! [`payload_json`] is CPU work proportional to the payload (up to 64 MiB): callers run it on
//! the blocking pool, never on an async worker.

use std::collections::BTreeSet;

use guestwatch_protocol::{
    ContentHash, NackReason, Payload, PayloadEncoding, PayloadError, ReportFacts,
    inventory::{DeltaDocument, Document, PackageRecord},
};

/// Why a report is refused: the `Nack` reason, a detail for the guest, a metric label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: NackReason,
    pub detail: String,
    pub label: &'static str,
}

impl Refusal {
    fn new(reason: NackReason, label: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            label,
        }
    }
}

/// The facts are within every bound a guest must keep (cheap: do it before the payload).
pub fn check_facts(facts: &ReportFacts) -> Result<(), Refusal> {
    facts.check_limits().map_err(|e| {
        Refusal::new(
            NackReason::Rejected,
            "facts_over_limits",
            format!("facts: {e}"),
        )
    })
}

/// The payload as JSON bytes, checked to be one JSON object of at most `max` bytes. Blocking.
pub fn payload_json(payload: Payload, max: u32) -> Result<Vec<u8>, Refusal> {
    let json = match payload.encoding {
        // Taken as is: no copy of what may be a 16 MiB frame.
        PayloadEncoding::Json if payload.bytes.len() > max as usize => {
            return Err(too_large(max));
        }
        PayloadEncoding::Json => payload.bytes,
        PayloadEncoding::Document | PayloadEncoding::DocumentZstd => {
            return Err(Refusal::new(
                NackReason::Malformed,
                "bad_payload",
                "a compact document where JSON was expected",
            ));
        }
        PayloadEncoding::JsonZstd => match payload.to_json(max) {
            Ok(json) => json.into_owned(),
            Err(PayloadError::TooLarge { max }) => return Err(too_large(max)),
            Err(e) => {
                return Err(Refusal::new(
                    NackReason::Malformed,
                    "bad_payload",
                    e.to_string(),
                ));
            }
        },
    };
    let is_object = json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !is_object {
        return Err(Refusal::new(
            NackReason::Malformed,
            "bad_payload",
            "the payload is not a JSON object",
        ));
    }
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&json) {
        return Err(Refusal::new(
            NackReason::Malformed,
            "bad_payload",
            format!("the payload is not valid JSON: {e}"),
        ));
    }
    Ok(json)
}

/// A compact full report: decoded, its records' content hash checked against the claim, and
/// its claircore JSON rendered exactly as the agent would (report `generation`, `facts`).
/// Blocking.
pub fn payload_document(
    payload: &Payload,
    claimed: &ContentHash,
    facts: &ReportFacts,
    generation: u64,
    max: u32,
) -> Result<(Vec<u8>, Document), Refusal> {
    let bytes = match payload.to_document(max) {
        Ok(bytes) => bytes,
        Err(PayloadError::TooLarge { max }) => return Err(too_large(max)),
        Err(e) => {
            return Err(Refusal::new(
                NackReason::Malformed,
                "bad_payload",
                e.to_string(),
            ));
        }
    };
    let doc = Document::from_bytes(&bytes)
        .map_err(|e| Refusal::new(NackReason::Malformed, "bad_document", e.to_string()))?;
    rendered(doc, claimed, facts, generation)
}

/// What a delta report becomes: the rendered JSON, the reconstructed document, and the
/// (name, arch) groups the delta touched.
pub type Applied = (Vec<u8>, Document, BTreeSet<(String, String)>);

/// A compact delta report against `base` (the VM's latest inventory, whose hash the report
/// named): decoded, applied, the result's hash checked against the claim, rendered. Blocking.
pub fn payload_delta(
    payload: &Payload,
    base: &Document,
    claimed: &ContentHash,
    facts: &ReportFacts,
    generation: u64,
    max: u32,
) -> Result<Applied, Refusal> {
    let bytes = match payload.to_document(max) {
        Ok(bytes) => bytes,
        Err(PayloadError::TooLarge { max }) => return Err(too_large(max)),
        Err(e) => {
            return Err(Refusal::new(
                NackReason::Malformed,
                "bad_payload",
                e.to_string(),
            ));
        }
    };
    let delta = DeltaDocument::from_bytes(&bytes)
        .map_err(|e| Refusal::new(NackReason::Malformed, "bad_document", e.to_string()))?;
    let group = |r: &PackageRecord| {
        (
            r.name.clone(),
            r.arch
                .clone()
                .unwrap_or_else(|| report::changes::NO_ARCH.to_owned()),
        )
    };
    let mut touched: BTreeSet<(String, String)> = delta
        .changed
        .iter()
        .chain(&delta.added)
        .map(group)
        .collect();
    for key in &delta.removed {
        touched.insert((
            key.name.clone(),
            key.arch
                .clone()
                .unwrap_or_else(|| report::changes::NO_ARCH.to_owned()),
        ));
    }
    let doc = delta.apply(&base.packages).map_err(|e| {
        Refusal::new(
            NackReason::NeedFull,
            "delta_mismatch",
            format!("the delta does not apply to the relay's base: {e}"),
        )
    })?;
    let actual = doc.content_hash();
    if actual != *claimed {
        return Err(Refusal::new(
            NackReason::NeedFull,
            "delta_mismatch",
            format!(
                "the delta applied to the relay's base gives {actual}, not the claimed {claimed}"
            ),
        ));
    }
    let json = render(&doc, facts, generation, claimed)?;
    Ok((json, doc, touched))
}

/// The claircore JSON of `doc`, once its records are shown to have the claimed hash.
pub fn rendered(
    doc: Document,
    claimed: &ContentHash,
    facts: &ReportFacts,
    generation: u64,
) -> Result<(Vec<u8>, Document), Refusal> {
    let actual = doc.content_hash();
    if actual != *claimed {
        return Err(Refusal::new(
            NackReason::Malformed,
            "hash_mismatch",
            format!("the records' content hash is {actual}, not the claimed {claimed}"),
        ));
    }
    let json = render(&doc, facts, generation, claimed)?;
    Ok((json, doc))
}

/// The claircore JSON of `doc`, whose records were checked to have `content_hash`.
fn render(
    doc: &Document,
    facts: &ReportFacts,
    generation: u64,
    content_hash: &ContentHash,
) -> Result<Vec<u8>, Refusal> {
    let json_facts = report::Facts::of_report(doc, facts, generation, content_hash);
    serde_json::to_vec(&report::claircore::render(doc, &json_facts))
        .map_err(|e| Refusal::new(NackReason::Malformed, "bad_document", e.to_string()))
}

fn too_large(max: u32) -> Refusal {
    Refusal::new(
        NackReason::TooLarge,
        "payload_too_large",
        format!("the payload decompresses to more than {max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use guestwatch_protocol::{Attribution, Trigger, TriggerKind, guest};

    use super::*;

    #[test]
    fn json_objects_pass_everything_else_is_refused_with_its_reason() {
        let ok = payload_json(Payload::json(br#" {"packages":{}}"#.to_vec()), 1024).unwrap();
        assert_eq!(ok, br#" {"packages":{}}"#);
        let refused = |p: Payload, max| payload_json(p, max).unwrap_err().reason;
        assert_eq!(
            refused(Payload::json(b"[1,2]".to_vec()), 1024),
            NackReason::Malformed
        );
        assert_eq!(
            refused(Payload::json(br#"{"a":"#.to_vec()), 1024),
            NackReason::Malformed
        );
        assert_eq!(
            refused(Payload::json(br#"{"a":1} trailing"#.to_vec()), 1024),
            NackReason::Malformed
        );
        assert_eq!(
            refused(Payload::json(vec![b' '; 2000]), 1024),
            NackReason::TooLarge
        );
        let corrupt = Payload {
            encoding: PayloadEncoding::JsonZstd,
            bytes: b"not zstd".to_vec(),
        };
        assert_eq!(refused(corrupt, 1024), NackReason::Malformed);
        // A zstd bomb: 8 MiB of zeros compressed to a few hundred bytes, refused at 1 MiB.
        let bomb = Payload {
            encoding: PayloadEncoding::JsonZstd,
            bytes: zstd_of(&vec![b' '; 8 << 20]),
        };
        assert_eq!(refused(bomb, 1 << 20), NackReason::TooLarge);
    }

    fn zstd_of(bytes: &[u8]) -> Vec<u8> {
        let big = Payload::json(bytes.to_vec());
        assert_eq!(big.encoding, PayloadEncoding::JsonZstd);
        big.bytes
    }

    #[test]
    fn facts_over_the_guest_bounds_are_rejected() {
        let mut facts = ReportFacts {
            trigger: Trigger::new(TriggerKind::Tamper).with_attribution(Attribution {
                paths: vec!["/x".into(); guest::MAX_PATHS + 1],
                ..Default::default()
            }),
            ..Default::default()
        };
        let refusal = check_facts(&facts).unwrap_err();
        assert_eq!(refusal.reason, NackReason::Rejected);
        assert!(refusal.detail.contains("paths"), "{}", refusal.detail);
        facts.fit();
        check_facts(&facts).unwrap();
    }
}
