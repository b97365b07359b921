//! guestwatch's facts about a report, carried under the `guestwatch` key of the claircore
//! document and as properties of the CycloneDX SBOM.

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
    /// The facts of a one-off scan of `scan` (the agent fills in detector, trigger, duration,
    /// generation and changes when it reports continuously). `database` is the database file
    /// as shown in reports; `problems` are what could not be read of the rest of the system.
    pub fn of_scan(
        agent_version: &str,
        scan: &rpmdb::Scan,
        database: String,
        problems: &[String],
    ) -> Self {
        Self {
            agent_version: agent_version.to_owned(),
            detector: "none".into(),
            trigger: serde_json::json!({ "kind": "manual" }),
            transactions: serde_json::json!([]),
            tampers: serde_json::json!([]),
            backend: scan.backend.as_str().into(),
            database,
            package_count: scan.packages.len(),
            gpg_pubkeys: scan
                .pubkeys
                .iter()
                .map(|k| format!("{}-{}-{}", k.name, k.version, k.release))
                .collect(),
            scan_duration_ms: None,
            content_hash: hex::encode(crate::content_hash(&scan.packages)),
            errors: scan
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.entry, e.reason))
                .chain(problems.iter().cloned())
                .collect(),
            generation: None,
            changes: ChangeSummary::default(),
        }
    }
}
