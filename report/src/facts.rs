//! guestwatch's facts about a report, carried under the `guestwatch` key of the claircore
//! document and as properties of the CycloneDX SBOM.

use guestwatch_protocol::{ContentHash, ReportFacts, inventory::Document};
use serde::Serialize;

use crate::changes::ChangeSummary;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Facts {
    pub agent_version: String,
    /// `ebpf`, `inotify`, `periodic`, or `none` for a one-off `scan`.
    pub detector: String,
    /// The trigger and its attribution, as the agent recorded it (`{"kind": "manual"}` for a
    /// one-off scan).
    pub trigger: serde_json::Value,
    /// Every transaction the scan answers, with its attribution (`[]` for a one-off scan).
    pub transactions: serde_json::Value,
    /// Every tamper record the scan answers.
    pub tampers: serde_json::Value,
    /// `sqlite`, `bdb` or `ndb`.
    pub backend: String,
    /// The database file, relative to the root when a root was scanned.
    pub database: String,
    pub package_count: usize,
    /// gpg-pubkey pseudo-packages (imported signing keys), kept out of `packages`.
    pub gpg_pubkeys: Vec<String>,
    /// Time the scan took; `None` in one-off scans so their output is byte-identical.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scan_duration_ms: Option<u64>,
    /// See `hash.rs`.
    pub content_hash: String,
    /// Skipped database entries and problems reading the system (os-release, dnf history).
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    pub changes: ChangeSummary,
}

impl Facts {
    /// The facts of a one-off scan whose compact document is `doc` (a continuous report's are
    /// [`Facts::of_report`]).
    pub fn of_document(agent_version: &str, doc: &Document) -> Self {
        Self::of_hashed(agent_version, doc, &doc.content_hash())
    }

    /// The same, for a document whose content hash is known already.
    fn of_hashed(agent_version: &str, doc: &Document, content_hash: &ContentHash) -> Self {
        let system = &doc.system;
        Self {
            agent_version: agent_version.to_owned(),
            detector: "none".into(),
            trigger: serde_json::json!({ "kind": "manual" }),
            transactions: serde_json::json!([]),
            tampers: serde_json::json!([]),
            backend: system.backend.clone(),
            database: system.database.clone(),
            package_count: doc.packages.len(),
            gpg_pubkeys: system.gpg_pubkeys.clone(),
            scan_duration_ms: None,
            content_hash: content_hash.to_hex(),
            errors: system.errors.clone(),
            generation: None,
            changes: ChangeSummary::default(),
        }
    }

    /// The facts of report `generation` with `facts` (what travels with it) and
    /// `content_hash` (the report's, which the caller has checked against `doc`): the agent
    /// and the relay, rendering the same document, write the same facts.
    pub fn of_report(
        doc: &Document,
        facts: &ReportFacts,
        generation: u64,
        content_hash: &ContentHash,
    ) -> Self {
        let json = |v: &dyn erased::Json| v.to_json();
        Self {
            agent_version: facts.agent_version.clone(),
            detector: facts.detector.clone(),
            trigger: json(&facts.trigger),
            transactions: json(&facts.transactions),
            tampers: json(&facts.tampers),
            scan_duration_ms: doc.system.scan_duration_ms,
            generation: Some(generation),
            changes: doc.system.changes.clone(),
            ..Self::of_hashed(&facts.agent_version, doc, content_hash)
        }
    }
}

mod erased {
    /// Serialises to a JSON value whatever the type (a failure is `null`: these are the
    /// protocol's own plain types, which always serialise).
    pub trait Json {
        fn to_json(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}
