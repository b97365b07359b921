//! Confirming tamper records whose process exited before its relative path could be resolved.
//!
//! A short-lived process (`cd /var/lib/rpm && mv Packages x`) is often gone before userspace
//! reads its working directory from `/proc`. The BPF record still names the file and the
//! process; the inotify safety net names the directory where a file of that name changed. A
//! record and an inotify change of the same name less than [`WINDOW`] apart make a tamper
//! trigger, whether or not a transaction runs meanwhile (the kernel side already left out
//! processes that ran one, and a transaction elsewhere must not hide tampering here). A record
//! nothing confirms is dropped: the change, if there was one in the database directory, still
//! causes an `inotify` scan.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::time::Instant;

use super::{ebpf::UnconfirmedTamper, trigger::Trigger};

/// How far apart a record and the inotify change that confirms it may be. Both come from the
/// same syscall, so they are normally microseconds apart; the slack covers a busy agent.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Bounds both queues, so that a flood of records or changes costs bounded memory.
const MAX_QUEUED: usize = 256;

/// Pairs unconfirmed tamper records with inotify changes, in either order of arrival.
#[derive(Default)]
pub struct TamperConfirmer {
    records: VecDeque<(Instant, UnconfirmedTamper)>,
    changes: VecDeque<(Instant, String, PathBuf)>,
}

impl TamperConfirmer {
    /// A record arrived: the trigger if a recent change confirms it, else it waits.
    pub fn record(&mut self, now: Instant, record: UnconfirmedTamper) -> Option<Trigger> {
        self.expire(now);
        if let Some((_, _, dir)) = self
            .changes
            .iter()
            .find(|(_, name, _)| record.names.contains(name))
        {
            return Some(record.confirm(dir));
        }
        if self.records.len() == MAX_QUEUED {
            self.records.pop_front();
        }
        self.records.push_back((now, record));
        None
    }

    /// A database file `name` changed in `dir`: the triggers of the waiting records it
    /// confirms.
    pub fn change(&mut self, now: Instant, name: &str, dir: &Path) -> Vec<Trigger> {
        self.expire(now);
        if self.changes.len() == MAX_QUEUED {
            self.changes.pop_front();
        }
        self.changes
            .push_back((now, name.to_owned(), dir.to_path_buf()));
        let mut confirmed = Vec::new();
        self.records.retain(|(_, record)| {
            let matches = record.names.iter().any(|n| n == name);
            if matches {
                confirmed.push(record.confirm(dir));
            }
            !matches
        });
        confirmed
    }

    fn expire(&mut self, now: Instant) {
        let stale = |at: &Instant| now.duration_since(*at) > WINDOW;
        while let Some((at, record)) = self.records.front() {
            if !stale(at) {
                break;
            }
            log::debug!(
                "tamper record for {} not confirmed by inotify; dropped",
                record.names.join(", ")
            );
            self.records.pop_front();
        }
        while self.changes.front().is_some_and(|(at, _, _)| stale(at)) {
            self.changes.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use guestwatch_agent_common::FileOp;

    use super::*;
    use crate::{bpf::FileRecord, detect::trigger::TriggerKind};

    /// A rename of `from` to `to` by process `pid`, neither name located.
    fn record(pid: u32, from: &str, to: &str) -> UnconfirmedTamper {
        let file = FileRecord {
            op: FileOp::Rename,
            tgid: pid,
            pid,
            uid: 0,
            gid: 0,
            fd: None,
            flags: 0,
            dirfd: None,
            dirfd2: None,
            now_ns: 0,
            tx_start_ns: None,
            tail: false,
            file: None,
            dir: None,
            dir2: None,
            comm: "mv".to_owned(),
            path: from.to_owned(),
            path2: Some(to.to_owned()),
        };
        UnconfirmedTamper::new(file, None, Vec::new(), vec![from.to_owned(), to.to_owned()])
    }

    const DB: &str = "/var/lib/rpm";

    #[test]
    fn a_later_change_of_the_same_name_confirms_the_record() {
        let mut c = TamperConfirmer::default();
        let t0 = Instant::now();
        assert!(c.record(t0, record(4_000_001, "Packages", "x")).is_none());
        assert!(c.change(t0, "Index.db", Path::new(DB)).is_empty());
        let confirmed = c.change(t0 + Duration::from_millis(5), "Packages", Path::new(DB));
        assert_eq!(confirmed.len(), 1);
        let t = &confirmed[0];
        assert_eq!(t.kind, TriggerKind::Tamper);
        let who = t.attribution.as_ref().unwrap();
        assert_eq!((who.pid, who.comm.as_str()), (4_000_001, "mv"));
        assert_eq!(who.operation.as_deref(), Some("rename"));
        assert_eq!(who.paths, ["/var/lib/rpm/Packages", "/var/lib/rpm/x"]);
        assert!(t.detail.as_deref().unwrap().contains("inotify confirmed"));
        // Consumed: the same change again confirms nothing more.
        assert!(c.change(t0, "Packages", Path::new(DB)).is_empty());
    }

    #[test]
    fn an_earlier_change_confirms_a_record_at_once() {
        let mut c = TamperConfirmer::default();
        let t0 = Instant::now();
        assert!(c.change(t0, "Packages", Path::new(DB)).is_empty());
        let t = c.record(
            t0 + Duration::from_millis(900),
            record(4_000_002, "Packages", "y"),
        );
        assert_eq!(t.unwrap().attribution.unwrap().pid, 4_000_002);
    }

    #[test]
    fn nothing_is_confirmed_across_more_than_the_window() {
        let mut c = TamperConfirmer::default();
        let t0 = Instant::now();
        let late = t0 + WINDOW + Duration::from_millis(1);
        assert!(c.change(t0, "Packages", Path::new(DB)).is_empty());
        assert!(c.record(late, record(4_000_003, "Packages", "z")).is_none());
        // The record waits from `late`; a change after its window does not confirm it.
        let later = late + WINDOW + Duration::from_millis(1);
        assert!(c.change(later, "Packages", Path::new(DB)).is_empty());
    }

    #[test]
    fn one_change_confirms_every_waiting_record_of_its_name() {
        let mut c = TamperConfirmer::default();
        let t0 = Instant::now();
        assert!(c.record(t0, record(4_000_004, "Index.db", "a")).is_none());
        assert!(c.record(t0, record(4_000_005, "b", "Index.db")).is_none());
        assert!(c.record(t0, record(4_000_006, "Packages", "c")).is_none());
        let pids: Vec<u32> = c
            .change(t0, "Index.db", Path::new(DB))
            .iter()
            .map(|t| t.attribution.as_ref().unwrap().pid)
            .collect();
        assert_eq!(pids, [4_000_004, 4_000_005]);
    }

    #[test]
    fn a_flood_of_records_is_bounded() {
        let mut c = TamperConfirmer::default();
        let t0 = Instant::now();
        for pid in 0..1000 {
            assert!(c.record(t0, record(pid, "Packages", "d")).is_none());
        }
        let confirmed = c.change(t0, "Packages", Path::new(DB));
        assert_eq!(confirmed.len(), MAX_QUEUED);
        // The newest are kept.
        assert_eq!(
            confirmed[0].attribution.as_ref().unwrap().pid,
            1000 - MAX_QUEUED as u32
        );
    }
}
