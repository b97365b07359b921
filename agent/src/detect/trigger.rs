//! What made the agent scan: the trigger, and who was behind it.

use std::time::SystemTime;

use serde::{Serialize, Serializer};

/// Why a scan ran. Ordered by how much a trigger tells about the change: when several are
/// coalesced into one scan, the highest one is reported as its cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    /// The scan every agent does when it starts.
    Startup,
    /// The periodic rescan (default every 4 h).
    Periodic,
    /// inotify saw the rpm database change.
    Inotify,
    /// A process outside librpm changed database files (BPF tamper signal).
    Tamper,
    /// A librpm transaction ended (BPF `rpmtsRun` return).
    Transaction,
}

impl TriggerKind {
    pub const ALL: [TriggerKind; 5] = [
        Self::Startup,
        Self::Periodic,
        Self::Inotify,
        Self::Tamper,
        Self::Transaction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Periodic => "periodic",
            Self::Inotify => "inotify",
            Self::Tamper => "tamper",
            Self::Transaction => "transaction",
        }
    }

    /// Whether scans for this kind wait for a quiet period: file-level signals come in bursts
    /// while a writer is busy; a transaction end is already the moment the change is complete.
    pub fn debounced(self) -> bool {
        matches!(self, Self::Inotify | Self::Tamper)
    }
}

/// Who caused a kernel-observed change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Attribution {
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The task's command name.
    pub comm: String,
    /// The executable, when it could be read from `/proc/<pid>/exe` in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// `rpmtsRun`'s return value: 0 success, negative error, positive number of problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_time")]
    pub started_at: Option<SystemTime>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_time")]
    pub ended_at: Option<SystemTime>,
    /// The librpm whose `rpmtsRun` fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    /// For tamper triggers: the file operation (`write`, `rename`, `unlink`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// For tamper triggers: the file(s) touched, resolved to absolute paths where possible.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// One reason to scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Trigger {
    pub kind: TriggerKind,
    #[serde(serialize_with = "time")]
    pub at: SystemTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
    /// What was seen, in a few words (e.g. the inotify event and file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Trigger {
    pub fn new(kind: TriggerKind) -> Self {
        Self {
            kind,
            at: SystemTime::now(),
            attribution: None,
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_attribution(mut self, attribution: Attribution) -> Self {
        self.attribution = Some(attribution);
        self
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn opt_time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => time(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significance_order() {
        assert!(TriggerKind::Transaction > TriggerKind::Tamper);
        assert!(TriggerKind::Tamper > TriggerKind::Inotify);
        assert!(TriggerKind::Inotify > TriggerKind::Periodic);
        assert!(TriggerKind::Periodic > TriggerKind::Startup);
    }

    #[test]
    fn serialises_kind_and_attribution() {
        let t = Trigger {
            kind: TriggerKind::Transaction,
            at: SystemTime::UNIX_EPOCH,
            attribution: Some(Attribution {
                pid: 7,
                comm: "rpm".into(),
                return_code: Some(0),
                ..Default::default()
            }),
            detail: None,
        };
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["kind"], "transaction");
        assert_eq!(json["at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["attribution"]["pid"], 7);
        assert_eq!(json["attribution"]["comm"], "rpm");
        assert_eq!(json["attribution"]["return_code"], 0);
        assert!(json["attribution"].get("exe").is_none());
    }
}
