//! The one trigger and attribution schema: what made the agent scan, and who was behind it.
//!
//! The agent fills it in, protocol version 2 carries it as is, and the relay hands the same
//! values to every sink; `watch` prints it. Its JSON form (field names, `null` for what is not
//! known, times as RFC 3339 with milliseconds) is the interface contract in `docs/reports.md`.

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bincode::{Decode, Encode};
use serde::{Serialize, Serializer};

/// A point in time: milliseconds since the Unix epoch (UTC). On the wire a varint; in JSON an
/// RFC 3339 string with milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    /// Times before the epoch become the epoch; times past u64 milliseconds saturate.
    pub fn from_system(t: SystemTime) -> Self {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self(ms)
    }

    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH
            .checked_add(Duration::from_millis(self.0))
            .unwrap_or(UNIX_EPOCH)
    }

    /// `2026-12-01T19:59:27.123Z`.
    pub fn rfc3339(self) -> String {
        humantime::format_rfc3339_millis(self.to_system()).to_string()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.rfc3339())
    }
}

/// Why a scan ran. Ordered by how much a trigger tells about the change: when several are
/// coalesced into one scan, the highest is reported as its cause. The wire encodes the variant
/// index, so the order of variants is part of protocol version 2: only append.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    /// A one-off `guestwatch-agent scan`.
    Manual,
    /// The scan every agent does when it starts.
    Startup,
    /// The periodic rescan (default every 4 h).
    Periodic,
    /// inotify saw the rpm database change, and no transaction or tamper record explains it.
    Inotify,
    /// A process outside librpm changed database files (BPF tamper signal).
    Tamper,
    /// A librpm transaction that wrote the watched database ended.
    Transaction,
}

impl TriggerKind {
    pub const ALL: [TriggerKind; 6] = [
        Self::Manual,
        Self::Startup,
        Self::Periodic,
        Self::Inotify,
        Self::Tamper,
        Self::Transaction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Startup => "startup",
            Self::Periodic => "periodic",
            Self::Inotify => "inotify",
            Self::Tamper => "tamper",
            Self::Transaction => "transaction",
        }
    }

    /// The kind named `text` (the JSON and protocol-1 spelling).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether scans for this kind wait for a quiet period: file-level signals come in bursts
    /// while a writer is busy; a transaction end is already the moment the change is complete.
    pub fn debounced(self) -> bool {
        matches!(self, Self::Inotify | Self::Tamper)
    }
}

impl fmt::Display for TriggerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a transaction was tied to the watched database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Evidence {
    /// The kernel saw the transaction's process write a file of the database inside its
    /// `rpmtsRun` window.
    Syscall,
    /// inotify saw a database file change inside the transaction's window, and it was the only
    /// transaction running (backends whose writes are not syscalls, e.g. `mmap`).
    Inotify,
}

/// A process in the chain of parents of the one that made the change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
}

/// Who caused a kernel-observed change. Kernel facts (ids, comm, loginuid, sessionid, times,
/// return code) come from the task in the BPF program; the rest was read from `/proc` while the
/// process was alive (when its transaction started), never when a report is built.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Attribution {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The task's command name.
    pub comm: String,
    /// The executable, as `/proc/<pid>/exe` named it.
    pub exe: Option<String>,
    /// `rpmtsRun`'s return value: 0 success, negative error, positive number of problems;
    /// `null` for tampering and for a transaction whose process died inside `rpmtsRun`.
    pub return_code: Option<i32>,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    /// The audit login uid (the person behind `sudo`); `null` when unset.
    pub loginuid: Option<u32>,
    /// The audit session id; `null` when unset.
    pub sessionid: Option<u32>,
    /// The controlling terminal (`pts/3`), if any.
    pub tty: Option<String>,
    /// The command line (bounded; userinfo in URLs redacted; empty with
    /// `--attribution minimal`).
    pub cmdline: Vec<String>,
    /// Parents, nearest first (at most 8).
    pub ancestors: Vec<Ancestor>,
    /// The systemd unit or scope of the process (`session-3.scope`, `packagekit.service`).
    pub unit: Option<String>,
    /// The database the change was made to.
    pub database: Option<String>,
    /// The librpm whose `rpmtsRun` fired.
    pub library: Option<String>,
    /// How the transaction was tied to the database.
    pub evidence: Option<Evidence>,
    /// Tampering: the file operations seen (`write`, `rename`, …), comma-separated.
    pub operation: Option<String>,
    /// Tampering: every file touched, absolute where it could be resolved.
    pub paths: Vec<String>,
}

/// One reason to scan.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Trigger {
    pub kind: TriggerKind,
    /// What was seen, in a few words.
    pub detail: Option<String>,
    pub at: Timestamp,
    pub attribution: Option<Attribution>,
}

impl Trigger {
    pub fn new(kind: TriggerKind) -> Self {
        Self {
            kind,
            detail: None,
            at: Timestamp::now(),
            attribution: None,
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

    pub fn at(mut self, at: Timestamp) -> Self {
        self.at = at;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significance_order() {
        use TriggerKind::*;
        assert!(Transaction > Tamper && Tamper > Inotify && Inotify > Periodic);
        assert!(Periodic > Startup && Startup > Manual);
        for kind in TriggerKind::ALL {
            assert_eq!(TriggerKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(TriggerKind::parse("Transaction"), None);
    }

    #[test]
    fn json_has_every_field_with_null_for_the_unknown() {
        let t = Trigger {
            kind: TriggerKind::Transaction,
            detail: None,
            at: Timestamp(1_000),
            attribution: Some(Attribution {
                pid: 7,
                comm: "rpm".into(),
                return_code: Some(0),
                cmdline: vec!["rpm".into(), "-i".into()],
                evidence: Some(Evidence::Syscall),
                ..Default::default()
            }),
        };
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["kind"], "transaction");
        assert_eq!(json["at"], "1970-01-01T00:00:01.000Z");
        let a = &json["attribution"];
        assert_eq!(a["pid"], 7);
        assert_eq!(a["return_code"], 0);
        assert_eq!(a["cmdline"], serde_json::json!(["rpm", "-i"]));
        assert_eq!(a["evidence"], "syscall");
        for null in ["exe", "loginuid", "sessionid", "tty", "unit", "database"] {
            assert!(a[null].is_null(), "{null} present as null: {a}");
            assert!(a.get(null).is_some(), "{null} missing: {a}");
        }
        assert_eq!(a["ancestors"], serde_json::json!([]));
    }

    #[test]
    fn timestamps_round_trip_through_system_time() {
        let t = Timestamp(1_764_619_167_123);
        assert_eq!(Timestamp::from_system(t.to_system()), t);
        assert_eq!(t.rfc3339(), "2025-12-01T19:59:27.123Z");
        assert_eq!(
            Timestamp::from_system(UNIX_EPOCH - Duration::from_secs(1)),
            Timestamp(0)
        );
    }
}
