//! The report policy: what a scan means for the relay — nothing (the relay has, or is about
//! to get, this very content), or a new report: the whole document, its facts and its change
//! summary. Whether it then travels whole or as a delta is the sender's choice at send time
//! (`deliver::wire`), against the report the relay last acknowledged.
//!
//! Pure: no I/O, no clock but the snapshot's; `run` persists the generation in between.

use std::{sync::Arc, time::Duration};

use guestwatch_protocol::{
    ChangeCounts, ContentHash, Payload, Report, ReportBody, ReportFacts, ReportId, Timestamp,
    inventory::Document,
};
use report::ChangeSummary;

use crate::{
    detect::{
        DetectorMode,
        schedule::Batch,
        trigger::{Trigger, TriggerKind},
    },
    scan::{Snapshot, millis},
};

/// Scans abandoned since the last report that the next report tells of (the oldest dropped).
const MAX_TIMEOUTS: usize = 8;

/// A report ready for the sender: the wire form (whole), and the document it carries.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub report: Arc<Report>,
    pub document: Arc<Document>,
    pub changes: ChangeSummary,
}

/// The policy's state: what the relay has or will get, and the last report's document.
#[derive(Debug)]
pub struct Reporter {
    epoch: u64,
    detector: DetectorMode,
    /// The content of the newest report (pending or acknowledged): the same again is no news.
    baseline: Option<ContentHash>,
    /// The newest report's document: changes are counted from it.
    previous: Option<Arc<Document>>,
    timeouts: Vec<String>,
}

impl Reporter {
    /// `baseline` and `previous` come from the previous run (its pending report, else its
    /// last acknowledged one).
    pub fn new(
        epoch: u64,
        detector: DetectorMode,
        baseline: Option<ContentHash>,
        previous: Option<Arc<Document>>,
    ) -> Self {
        Self {
            epoch,
            detector,
            baseline,
            previous,
            timeouts: Vec::new(),
        }
    }

    /// A scan was abandoned (`--scan-timeout`): the next report says so in its errors.
    pub fn timed_out(&mut self, what: String) {
        if self.timeouts.len() == MAX_TIMEOUTS {
            self.timeouts.remove(0);
        }
        self.timeouts.push(what);
    }

    /// Whether `snapshot`, scanned for `batch`, is news. A tamper signal is news even when the
    /// package set did not change: the write itself is what security teams need to see.
    pub fn is_news(&self, snapshot: &Snapshot, batch: &Batch) -> bool {
        let tampered = batch.counts.contains_key(&TriggerKind::Tamper);
        tampered || self.baseline != Some(ContentHash(snapshot.content_hash))
    }

    /// The report of `snapshot` as generation `generation` (already persisted), which becomes
    /// the baseline. Takes the snapshot: its document becomes the report's without a copy.
    pub fn report(
        &mut self,
        snapshot: Snapshot,
        batch: &Batch,
        generation: u64,
        duration: Duration,
    ) -> Outgoing {
        let changes = self
            .previous
            .as_ref()
            .map(|p| report::changes::between(&p.packages, &snapshot.document.packages))
            .unwrap_or_default();
        let facts = facts(&snapshot, batch, &changes, self.detector);
        let content_hash = ContentHash(snapshot.content_hash);
        let mut document = snapshot.document;
        document.system.changes = changes.clone();
        document.system.scan_duration_ms = Some(millis(duration));
        document.system.errors.append(&mut self.timeouts);
        let report = Report {
            id: ReportId {
                epoch: self.epoch,
                generation,
            },
            content_hash,
            facts,
            body: ReportBody::Full(Payload::of_document(&document)),
        };
        let document = Arc::new(document);
        self.baseline = Some(content_hash);
        self.previous = Some(document.clone());
        Outgoing {
            report: Arc::new(report),
            document,
            changes,
        }
    }
}

/// The report's facts: the cause, every transaction and tamper record, counts, fitted to the
/// protocol's bounds.
fn facts(
    snapshot: &Snapshot,
    batch: &Batch,
    changes: &ChangeSummary,
    mode: DetectorMode,
) -> ReportFacts {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let attributions =
        |list: &[Trigger]| list.iter().filter_map(|t| t.attribution.clone()).collect();
    let mut facts = ReportFacts {
        trigger: batch.cause.clone(),
        transactions: attributions(&batch.transactions),
        tampers: attributions(&batch.tampers),
        coalesced: batch.counts.iter().map(|(k, n)| (*k, *n)).collect(),
        scanned_at: Timestamp::from_system(snapshot.finished_at),
        package_count: count(snapshot.document.packages.len()),
        changes: ChangeCounts {
            added: count(changes.added.len()),
            removed: count(changes.removed.len()),
            upgraded: count(changes.upgraded.len()),
            downgraded: count(changes.downgraded.len()),
            reinstalled: count(changes.reinstalled.len()),
        },
        agent_version: env!("CARGO_PKG_VERSION").into(),
        detector: mode.as_str().into(),
    };
    facts.fit();
    facts
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::SystemTime};

    use guestwatch_protocol::inventory::{PackageRecord, SystemFacts};

    use super::*;

    fn record(name: &str, version: &str) -> PackageRecord {
        PackageRecord {
            name: name.into(),
            version: version.into(),
            release: "1.el9".into(),
            arch: Some("x86_64".into()),
            ..PackageRecord::default()
        }
    }

    fn snapshot(records: Vec<PackageRecord>) -> Snapshot {
        let document = Document::new(records, SystemFacts::default());
        Snapshot {
            scan: rpmdb::Scan {
                backend: rpmdb::Backend::Sqlite,
                path: "/var/lib/rpm/rpmdb.sqlite".into(),
                packages: Vec::new(),
                pubkeys: Vec::new(),
                errors: Vec::new(),
                bytes_decoded: 0,
                blobs: Vec::new(),
            },
            system: report::SystemInfo::none(),
            content_hash: document.content_hash().0,
            document,
            duration: Duration::from_millis(3),
            finished_at: SystemTime::UNIX_EPOCH,
            database: "/var/lib/rpm/rpmdb.sqlite".into(),
            package_db: "sqlite:var/lib/rpm".into(),
            decoding: Default::default(),
        }
    }

    fn batch(kind: TriggerKind) -> Batch {
        Batch {
            cause: Trigger::new(kind),
            counts: BTreeMap::from([(kind, 1)]),
            transactions: Vec::new(),
            tampers: Vec::new(),
        }
    }

    fn reporter() -> Reporter {
        Reporter::new(7, DetectorMode::Ebpf, None, None)
    }

    #[test]
    fn the_first_scan_is_news_the_same_content_again_is_not() {
        let mut r = reporter();
        let s = snapshot(vec![record("bash", "5.1")]);
        assert!(r.is_news(&s, &batch(TriggerKind::Startup)));
        let out = r.report(
            s.clone(),
            &batch(TriggerKind::Startup),
            1,
            Duration::from_millis(4),
        );
        assert_eq!(
            out.report.id,
            ReportId {
                epoch: 7,
                generation: 1
            }
        );
        assert_eq!(out.report.content_hash, out.document.content_hash());
        assert!(
            out.changes.is_empty(),
            "no earlier report: nothing to compare"
        );
        assert!(!r.is_news(&s, &batch(TriggerKind::Transaction)));
        assert!(!r.is_news(&s, &batch(TriggerKind::Periodic)));
    }

    #[test]
    fn a_tamper_is_news_without_a_change() {
        let mut r = reporter();
        let s = snapshot(vec![record("bash", "5.1")]);
        r.report(s.clone(), &batch(TriggerKind::Startup), 1, Duration::ZERO);
        assert!(r.is_news(&s, &batch(TriggerKind::Tamper)));
        let out = r.report(s, &batch(TriggerKind::Tamper), 2, Duration::ZERO);
        assert!(out.changes.is_empty());
        assert_eq!(out.report.facts.trigger.kind, TriggerKind::Tamper);
    }

    #[test]
    fn an_upgrade_is_one_report_with_its_change_and_counts() {
        let mut r = reporter();
        r.report(
            snapshot(vec![record("bash", "5.1"), record("vim", "9")]),
            &batch(TriggerKind::Startup),
            1,
            Duration::ZERO,
        );
        let upgraded = snapshot(vec![record("bash", "5.2"), record("vim", "9")]);
        assert!(r.is_news(&upgraded, &batch(TriggerKind::Transaction)));
        let out = r.report(
            upgraded,
            &batch(TriggerKind::Transaction),
            2,
            Duration::ZERO,
        );
        assert_eq!(out.changes.upgraded.len(), 1);
        assert_eq!(out.report.facts.changes.upgraded, 1);
        assert_eq!(out.report.facts.package_count, 2);
        assert_eq!(out.document.system.changes, out.changes);
        // The payload is the document, whole.
        let ReportBody::Full(payload) = &out.report.body else {
            panic!("a full body");
        };
        let back = Document::from_bytes(&payload.to_document(1 << 20).unwrap()).unwrap();
        assert_eq!(back, *out.document);
    }

    #[test]
    fn after_a_restart_the_pending_report_is_the_baseline_and_the_comparison() {
        let pending = snapshot(vec![record("bash", "5.1")]);
        let mut r = Reporter::new(
            7,
            DetectorMode::Inotify,
            Some(ContentHash(pending.content_hash)),
            Some(Arc::new(pending.document.clone())),
        );
        // The startup scan finds what the pending report holds: nothing new to send.
        assert!(!r.is_news(&pending, &batch(TriggerKind::Startup)));
        let removed = snapshot(Vec::new());
        let out = r.report(removed, &batch(TriggerKind::Inotify), 5, Duration::ZERO);
        assert_eq!(out.changes.removed, ["bash-5.1-1.el9.x86_64"]);
        assert_eq!(out.report.facts.detector, "inotify");
    }

    #[test]
    fn abandoned_scans_are_told_once_in_the_next_report() {
        let mut r = reporter();
        for i in 0..10 {
            r.timed_out(format!("scan {i} abandoned"));
        }
        let s = snapshot(vec![record("bash", "5.1")]);
        let out = r.report(s.clone(), &batch(TriggerKind::Startup), 1, Duration::ZERO);
        assert_eq!(out.document.system.errors.len(), MAX_TIMEOUTS);
        assert_eq!(out.document.system.errors[0], "scan 2 abandoned");
        let again = r.report(s, &batch(TriggerKind::Tamper), 2, Duration::ZERO);
        assert!(again.document.system.errors.is_empty());
    }
}
