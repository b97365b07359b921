//! Deciding, by evidence, whether a database change is explained by a transaction.
//!
//! A librpm transaction counts for the watched database only if it wrote it: the kernel saw
//! its process write a database file inside its `rpmtsRun` window (`Evidence::Syscall`), or,
//! for writes that are not syscalls (`mmap`), inotify saw a database file change while it was
//! the only transaction that could have made it (`Evidence::Inotify`). Every other transaction
//! — another database, a container's installroot, dnf's test transaction, a failed or
//! read-only one, one killed before it wrote — is ignored and counted, whenever it ran.
//!
//! An inotify change is *covered* when a transaction with syscall evidence was running when it
//! arrived: that transaction's scan starts after its end, so it sees the change. Any other
//! change becomes an `inotify` trigger (without attribution: inotify does not say who), so a
//! change nothing explains is still scanned, never lost. Changes are held briefly first: a
//! transaction's records and inotify events travel by different channels, and a change may
//! arrive before the record of the transaction that made it.
//!
//! This is a pure state machine over boot-clock nanoseconds (the kernel's clock for
//! transaction records, `clock::boot_ns()` for inotify arrivals), driven by `mod.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use super::trigger::{Attribution, Evidence, Timestamp, Trigger, TriggerKind};

/// A transaction: its process and when its first thread entered `rpmtsRun`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxKey {
    pub tgid: u32,
    pub start_ns: u64,
}

/// What userspace could establish about a file a transaction's process wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// A file of the watched database (same inode as the entry in its directory).
    Ours { database: String },
    /// The watched path matched but the file could not be checked (the process was gone): taken
    /// as the watched database.
    Unverified { database: String },
    /// Another file (another root, a container's copy of the same path).
    Elsewhere,
    /// A file readers write too (SQLite's `-shm`, Berkeley DB's `__db.*`): no evidence of a
    /// change, whoever writes it.
    Shared,
}

/// Why a transaction was not taken as a change of the watched database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IgnoreReason {
    /// It wrote nothing of the watched database (another database, a test or read-only
    /// transaction).
    NoWrite,
    /// It failed without writing the watched database.
    Failed,
    /// It wrote a file of the same path that is not the watched database (another root or
    /// mount namespace).
    OtherDatabase,
    /// Its process died inside `rpmtsRun` before writing the watched database.
    Killed,
    /// inotify saw a change during it and other transactions at once: nobody is credited.
    Ambiguous,
}

impl IgnoreReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoWrite => "no_write",
            Self::Failed => "failed",
            Self::OtherDatabase => "other_database",
            Self::Killed => "killed",
            Self::Ambiguous => "ambiguous",
        }
    }
}

/// What the machine decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Scan for this trigger.
    Trigger(Box<Trigger>),
    /// A transaction that does not count for the watched database.
    Ignored {
        who: Box<Attribution>,
        reason: IgnoreReason,
    },
}

/// Tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExplainConfig {
    /// How long after a change arrives, or a transaction without evidence ends, the other
    /// channel's late records may still explain it.
    pub grace: Duration,
    /// A held change becomes a trigger after this long whatever is still running: a
    /// transaction that never ends cannot hide a change.
    pub max_hold: Duration,
}

impl Default for ExplainConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_millis(500),
            max_hold: Duration::from_secs(2),
        }
    }
}

#[derive(Debug)]
struct Tx {
    who: Attribution,
    ended_ns: Option<u64>,
    evidence: Option<Evidence>,
    /// It wrote a file of the watched path that is not the watched database.
    elsewhere: bool,
    aborted: bool,
    /// A change was seen during it and other transactions: it cannot be credited.
    ambiguous: bool,
    /// Write records seen (the end record says how many the kernel counted).
    writes_seen: u32,
    /// The transaction trigger was emitted.
    reported: bool,
}

#[derive(Debug)]
struct Change {
    at_ns: u64,
    what: String,
    /// Further changes merged into this one (same candidates).
    more: u32,
    candidates: BTreeSet<TxKey>,
}

/// The machine.
#[derive(Debug)]
pub struct Explainer {
    config: ExplainConfig,
    txs: BTreeMap<TxKey, Tx>,
    held: Vec<Change>,
}

/// Bounds memory and work whatever the kernel sends: the oldest state goes first.
const MAX_TXS: usize = 4096;
const MAX_HELD: usize = 1024;
/// Transactions remembered as possible authors of one change; with more running at once the
/// change can only be reported without attribution anyway.
const MAX_CANDIDATES: usize = 32;

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Explainer {
    pub fn new(config: ExplainConfig) -> Self {
        Self {
            config,
            txs: BTreeMap::new(),
            held: Vec::new(),
        }
    }

    fn tx(&mut self, key: TxKey, who: impl FnOnce() -> Attribution) -> &mut Tx {
        if self.txs.len() >= MAX_TXS && !self.txs.contains_key(&key) {
            // Ended ones first; an active one only if nothing else is left.
            let victim = self
                .txs
                .iter()
                .find(|(_, t)| t.ended_ns.is_some())
                .or_else(|| self.txs.iter().next())
                .map(|(k, _)| *k);
            if let Some(victim) = victim {
                self.txs.remove(&victim);
            }
        }
        self.txs.entry(key).or_insert_with(|| Tx {
            who: who(),
            ended_ns: None,
            evidence: None,
            elsewhere: false,
            aborted: false,
            ambiguous: false,
            writes_seen: 0,
            reported: false,
        })
    }

    /// A transaction started; `who` was read while its process was alive.
    pub fn started(&mut self, key: TxKey, who: Attribution) {
        let tx = self.tx(key, Attribution::default);
        // What a write record may have filled in before the start record arrived stays.
        let database = tx.who.database.take().or(who.database.clone());
        tx.who = Attribution { database, ..who };
        // A change that arrived before this record, but after the transaction began, may be
        // its own.
        for change in &mut self.held {
            if change.at_ns >= key.start_ns && change.candidates.len() < MAX_CANDIDATES {
                change.candidates.insert(key);
            }
        }
    }

    /// The transaction's process wrote a watched path.
    pub fn wrote(&mut self, key: TxKey, who: impl FnOnce() -> Attribution, written: Written) {
        let tx = self.tx(key, who);
        tx.writes_seen = tx.writes_seen.saturating_add(1);
        match written {
            Written::Ours { database } | Written::Unverified { database } => {
                tx.evidence = Some(Evidence::Syscall);
                if tx.who.database.is_none() {
                    tx.who.database = Some(database);
                }
            }
            Written::Elsewhere => tx.elsewhere = true,
            Written::Shared => {}
        }
    }

    /// The transaction ended (`return_code` `None`: its thread died inside `rpmtsRun`);
    /// `writes` is what the kernel counted.
    pub fn ended(
        &mut self,
        now_ns: u64,
        key: TxKey,
        who: impl FnOnce() -> Attribution,
        return_code: Option<i32>,
        end_ns: u64,
        writes: u32,
    ) -> Vec<Decision> {
        let tx = self.tx(key, who);
        tx.ended_ns = Some(end_ns.max(key.start_ns));
        tx.aborted = return_code.is_none();
        tx.who.return_code = return_code;
        tx.who.started_at =
            (key.start_ns > 0).then(|| crate::clock::boot_ns_to_timestamp(key.start_ns));
        tx.who.ended_at = Some(crate::clock::boot_ns_to_timestamp(end_ns));
        // Write records the ring buffer dropped still count, unless a seen one went
        // elsewhere (then the unseen ones may have too).
        if tx.evidence.is_none() && writes > tx.writes_seen && !tx.elsewhere {
            tx.evidence = Some(Evidence::Syscall);
        }
        let mut out = Vec::new();
        if tx.evidence.is_some() {
            out.push(Decision::Trigger(Box::new(transaction_trigger(tx))));
            tx.reported = true;
        }
        out.extend(self.settle(now_ns));
        out
    }

    /// inotify saw database file `what` change (lock and reader-written files excluded).
    pub fn changed(&mut self, now_ns: u64, what: &str) -> Vec<Decision> {
        let candidates: BTreeSet<TxKey> = self
            .txs
            .iter()
            .filter(|(k, t)| {
                k.start_ns <= now_ns
                    && match t.ended_ns {
                        // Running with evidence: covers the change. Running without: may
                        // have made it, unless it is known to write another database.
                        None => t.evidence.is_some() || !t.elsewhere,
                        Some(_) if t.evidence.is_some() || t.elsewhere => false,
                        Some(end) => now_ns <= end.saturating_add(ns(self.config.grace)),
                    }
            })
            .map(|(k, _)| *k)
            .take(MAX_CANDIDATES)
            .collect();
        // A burst (a writer's many writes) is one change: one trigger is enough for it.
        let full = self.held.len() >= MAX_HELD;
        match self.held.last_mut() {
            Some(last) if last.candidates == candidates || full => {
                last.more = last.more.saturating_add(1);
                if last.candidates.len() < MAX_CANDIDATES {
                    last.candidates.extend(candidates);
                }
            }
            _ => self.held.push(Change {
                at_ns: now_ns,
                what: what.to_owned(),
                more: 0,
                candidates,
            }),
        }
        self.settle(now_ns)
    }

    /// Time passed.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Decision> {
        self.settle(now_ns)
    }

    /// When [`Self::tick`] has something to decide next.
    pub fn next_deadline(&self) -> Option<u64> {
        let grace = ns(self.config.grace);
        let held = self.held.iter().map(|c| {
            let waiting_for_start = c.candidates.is_empty();
            if waiting_for_start {
                c.at_ns.saturating_add(grace)
            } else {
                c.at_ns.saturating_add(ns(self.config.max_hold))
            }
        });
        let txs = self
            .txs
            .values()
            .filter_map(|t| t.ended_ns.map(|e| e.saturating_add(grace)));
        held.chain(txs).min()
    }

    /// Transactions still running, for a liveness check of their processes.
    pub fn running(&self) -> impl Iterator<Item = TxKey> + '_ {
        self.txs
            .iter()
            .filter(|(_, t)| t.ended_ns.is_none())
            .map(|(k, _)| *k)
    }

    fn resolved_without_evidence(&self, key: &TxKey, now_ns: u64) -> bool {
        self.txs.get(key).is_none_or(|t| {
            t.evidence.is_none()
                && t.ended_ns
                    .is_some_and(|e| now_ns >= e.saturating_add(ns(self.config.grace)))
        })
    }

    /// Decides what time and records allow.
    fn settle(&mut self, now_ns: u64) -> Vec<Decision> {
        let grace = ns(self.config.grace);
        let max_hold = ns(self.config.max_hold);
        let mut out = Vec::new();
        let mut held = std::mem::take(&mut self.held);
        held.retain(|change| {
            let covered = change.candidates.iter().any(|k| {
                self.txs
                    .get(k)
                    .is_some_and(|t| t.evidence == Some(Evidence::Syscall))
            });
            if covered {
                return false;
            }
            let age = now_ns.saturating_sub(change.at_ns);
            if change.candidates.is_empty() {
                if age < grace {
                    return true;
                }
                out.push(Decision::Trigger(Box::new(inotify_trigger(change, ""))));
                return false;
            }
            let all_resolved = change
                .candidates
                .iter()
                .all(|k| self.resolved_without_evidence(k, now_ns));
            if !all_resolved && age < max_hold {
                return true;
            }
            let only = (change.candidates.len() == 1)
                .then(|| change.candidates.first().copied())
                .flatten();
            if let Some(key) = only
                && all_resolved
                && let Some(tx) = self.txs.get_mut(&key)
            {
                // The one transaction that could have made a change no syscall showed.
                tx.evidence = Some(Evidence::Inotify);
                out.push(Decision::Trigger(Box::new(transaction_trigger(tx))));
                tx.reported = true;
                return false;
            }
            let who: Vec<String> = change
                .candidates
                .iter()
                .filter_map(|k| self.txs.get(k))
                .map(|t| format!("{} (pid {})", t.who.comm, t.who.pid))
                .collect();
            let during = format!(" during transactions of {}", who.join(", "));
            out.push(Decision::Trigger(Box::new(inotify_trigger(
                change, &during,
            ))));
            for key in &change.candidates {
                if let Some(tx) = self.txs.get_mut(key)
                    && tx.evidence.is_none()
                {
                    tx.ambiguous = true;
                }
            }
            false
        });
        self.held = held;

        // Transactions past their grace with nothing more to learn.
        let referenced: BTreeSet<TxKey> = self
            .held
            .iter()
            .flat_map(|c| c.candidates.iter().copied())
            .collect();
        let done: Vec<TxKey> = self
            .txs
            .iter()
            .filter(|(k, t)| {
                !referenced.contains(k)
                    && t.ended_ns
                        .is_some_and(|e| now_ns >= e.saturating_add(grace))
            })
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            let Some(tx) = self.txs.remove(&key) else {
                continue;
            };
            if tx.reported {
                continue;
            }
            let reason = if tx.elsewhere {
                IgnoreReason::OtherDatabase
            } else if tx.ambiguous {
                IgnoreReason::Ambiguous
            } else if tx.aborted {
                IgnoreReason::Killed
            } else if tx.who.return_code.is_some_and(|r| r != 0) {
                IgnoreReason::Failed
            } else {
                IgnoreReason::NoWrite
            };
            out.push(Decision::Ignored {
                who: Box::new(tx.who),
                reason,
            });
        }
        out
    }
}

fn transaction_trigger(tx: &Tx) -> Trigger {
    let mut who = tx.who.clone();
    who.evidence = tx.evidence;
    let at = who.ended_at.unwrap_or_else(Timestamp::now);
    let how = match (tx.aborted, who.return_code) {
        (true, _) => "died inside an rpm transaction that wrote".to_owned(),
        (false, Some(0)) => "finished an rpm transaction that wrote".to_owned(),
        (false, Some(code)) => format!("ended with code {code} an rpm transaction that wrote"),
        (false, None) => "ended an rpm transaction that wrote".to_owned(),
    };
    let database = who
        .database
        .clone()
        .unwrap_or_else(|| "the database".into());
    let evidence = match tx.evidence {
        Some(Evidence::Inotify) => " (seen by inotify)",
        _ => "",
    };
    Trigger {
        kind: TriggerKind::Transaction,
        detail: Some(format!(
            "{} (pid {}) {how} {database}{evidence}",
            who.comm, who.pid
        )),
        at,
        attribution: Some(who),
    }
}

fn inotify_trigger(change: &Change, during: &str) -> Trigger {
    let more = match change.more {
        0 => String::new(),
        n => format!(" (and {n} more changes)"),
    };
    Trigger::new(TriggerKind::Inotify).with_detail(format!("{}{more}{during}", change.what))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn who(pid: u32, comm: &str) -> Attribution {
        Attribution {
            pid,
            tid: pid,
            comm: comm.into(),
            ..Default::default()
        }
    }

    fn key(pid: u32, start: u64) -> TxKey {
        TxKey {
            tgid: pid,
            start_ns: start,
        }
    }

    fn ours() -> Written {
        Written::Ours {
            database: "/var/lib/rpm/rpmdb.sqlite".into(),
        }
    }

    fn triggers(d: &[Decision]) -> Vec<&Trigger> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Trigger(t) => Some(t.as_ref()),
                Decision::Ignored { .. } => None,
            })
            .collect()
    }

    fn ignored(d: &[Decision]) -> Vec<(u32, IgnoreReason)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Ignored { who, reason } => Some((who.pid, *reason)),
                Decision::Trigger(_) => None,
            })
            .collect()
    }

    fn machine() -> Explainer {
        Explainer::new(ExplainConfig::default())
    }

    #[test]
    fn a_transaction_that_wrote_triggers_at_once_with_its_attribution() {
        let mut m = machine();
        let k = key(10, 1_000 * MS);
        m.started(k, who(10, "rpm"));
        m.wrote(k, || who(10, "rpm"), ours());
        // Its own writes, seen by inotify during the transaction, are covered.
        assert!(
            m.changed(1_001 * MS, "rpmdb.sqlite-wal modified")
                .is_empty()
        );
        let d = m.ended(1_002 * MS, k, || who(10, "rpm"), Some(0), 1_002 * MS, 1);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Transaction);
        let a = t[0].attribution.as_ref().unwrap();
        assert_eq!((a.pid, a.return_code), (10, Some(0)));
        assert_eq!(a.evidence, Some(Evidence::Syscall));
        assert_eq!(a.database.as_deref(), Some("/var/lib/rpm/rpmdb.sqlite"));
        assert!(t[0].detail.as_deref().unwrap().contains("rpm (pid 10)"));
        // Nothing else comes of it.
        assert!(m.tick(10_000 * MS).is_empty());
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn transactions_that_wrote_nothing_here_are_ignored_with_a_reason() {
        let mut m = machine();
        let cases = [
            (1, Some(0), None, IgnoreReason::NoWrite),
            (2, Some(-1), None, IgnoreReason::Failed),
            (
                3,
                Some(0),
                Some(Written::Elsewhere),
                IgnoreReason::OtherDatabase,
            ),
            (4, None, None, IgnoreReason::Killed),
        ];
        let mut all = Vec::new();
        for (pid, rc, write, _) in &cases {
            let k = key(*pid, 100 * MS);
            m.started(k, who(*pid, "dnf"));
            if let Some(w) = write {
                m.wrote(k, || who(*pid, "dnf"), w.clone());
            }
            let writes = u32::from(write.is_some());
            all.extend(m.ended(101 * MS, k, || who(*pid, "dnf"), *rc, 101 * MS, writes));
        }
        assert!(triggers(&all).is_empty(), "{all:?}");
        // They are decided once the grace for late inotify evidence passed.
        all.extend(m.tick(700 * MS));
        let mut got = ignored(&all);
        got.sort_by_key(|(pid, _)| *pid);
        let want: Vec<_> = cases.iter().map(|(p, _, _, r)| (*p, *r)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_change_nothing_explains_is_an_inotify_trigger_after_the_grace() {
        let mut m = machine();
        assert!(m.changed(0, "Packages modified").is_empty());
        assert_eq!(m.next_deadline(), Some(500 * MS));
        assert!(m.tick(499 * MS).is_empty());
        let d = m.tick(500 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Inotify);
        assert_eq!(t[0].attribution, None);
        assert_eq!(t[0].detail.as_deref(), Some("Packages modified"));
    }

    #[test]
    fn a_change_arriving_before_the_start_record_is_still_the_transactions() {
        let mut m = machine();
        // inotify is read first; the transaction had started 1 ms before the change.
        assert!(m.changed(5 * MS, "rpmdb.sqlite-wal modified").is_empty());
        let k = key(20, 4 * MS);
        m.started(k, who(20, "rpm"));
        m.wrote(k, || who(20, "rpm"), ours());
        let d = m.ended(6 * MS, k, || who(20, "rpm"), Some(0), 6 * MS, 1);
        assert_eq!(triggers(&d).len(), 1);
        // The change was covered: no unattributed trigger later.
        assert!(m.tick(10_000 * MS).is_empty());
    }

    #[test]
    fn a_change_before_a_transaction_started_is_not_its_own() {
        let mut m = machine();
        assert!(m.changed(5 * MS, "Packages modified").is_empty());
        let k = key(21, 6 * MS);
        m.started(k, who(21, "rpm"));
        m.wrote(k, || who(21, "rpm"), ours());
        let d = m.ended(7 * MS, k, || who(21, "rpm"), Some(0), 7 * MS, 1);
        assert_eq!(triggers(&d).len(), 1);
        let later = m.tick(600 * MS);
        let t = triggers(&later);
        assert_eq!(t.len(), 1, "the earlier change is reported on its own");
        assert_eq!(t[0].kind, TriggerKind::Inotify);
    }

    #[test]
    fn a_change_after_the_transactions_trigger_is_scanned_again() {
        // Its scan may have started before this change (SQLite's checkpoint on close, or
        // another writer): a second scan finds out.
        let mut m = machine();
        let k = key(30, 0);
        m.started(k, who(30, "rpm"));
        m.wrote(k, || who(30, "rpm"), ours());
        assert_eq!(
            triggers(&m.ended(MS, k, || who(30, "rpm"), Some(0), MS, 1)).len(),
            1
        );
        assert!(m.changed(2 * MS, "rpmdb.sqlite modified").is_empty());
        let t = m.tick(502 * MS);
        assert_eq!(triggers(&t)[0].kind, TriggerKind::Inotify);
    }

    #[test]
    fn inotify_is_evidence_when_one_transaction_alone_could_have_made_the_change() {
        let mut m = machine();
        let k = key(40, 0);
        m.started(k, who(40, "rpm"));
        assert!(m.changed(MS, "Index.db modified").is_empty());
        assert!(triggers(&m.ended(2 * MS, k, || who(40, "rpm"), Some(0), 2 * MS, 0)).is_empty());
        let d = m.tick(502 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1, "{d:?}");
        assert_eq!(t[0].kind, TriggerKind::Transaction);
        assert_eq!(
            t[0].attribution.as_ref().unwrap().evidence,
            Some(Evidence::Inotify)
        );
        assert!(ignored(&d).is_empty());
    }

    #[test]
    fn with_two_candidates_nobody_is_credited() {
        let mut m = machine();
        let (a, b) = (key(50, 0), key(51, 0));
        m.started(a, who(50, "rpm"));
        m.started(b, who(51, "rpm"));
        assert!(m.changed(MS, "Packages modified").is_empty());
        m.ended(2 * MS, a, || who(50, "rpm"), Some(0), 2 * MS, 0);
        m.ended(2 * MS, b, || who(51, "rpm"), Some(0), 2 * MS, 0);
        let d = m.tick(502 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Inotify);
        assert_eq!(t[0].attribution, None);
        let detail = t[0].detail.as_deref().unwrap();
        assert!(
            detail.contains("pid 50") && detail.contains("pid 51"),
            "{detail}"
        );
        let mut got = ignored(&d);
        got.sort_by_key(|(pid, _)| *pid);
        assert_eq!(
            got,
            [(50, IgnoreReason::Ambiguous), (51, IgnoreReason::Ambiguous)]
        );
    }

    #[test]
    fn another_databases_transactions_never_explain_or_hide_a_change_here() {
        // A transaction elsewhere runs throughout; a tamper-like change here is reported.
        let mut m = machine();
        let other = key(60, 0);
        m.started(other, who(60, "rpm"));
        m.wrote(other, || who(60, "rpm"), Written::Elsewhere);
        assert!(m.changed(MS, "Packages modified").is_empty());
        // It is no candidate: the change goes out after the grace, unattributed.
        let d = m.tick(501 * MS);
        let t = triggers(&d);
        assert_eq!(t[0].kind, TriggerKind::Inotify);
        assert_eq!(t[0].detail.as_deref(), Some("Packages modified"));
        // And the other transaction, when it ends, is ignored.
        let end = m.ended(3_000 * MS, other, || who(60, "rpm"), Some(0), 3_000 * MS, 1);
        assert!(triggers(&end).is_empty());
        assert_eq!(
            ignored(&m.tick(4_000 * MS)),
            [(60, IgnoreReason::OtherDatabase)]
        );
    }

    #[test]
    fn a_transaction_that_never_ends_cannot_hold_a_change_back() {
        let mut m = machine();
        let k = key(61, 0);
        m.started(k, who(61, "rpm"));
        assert!(m.changed(MS, "Packages modified").is_empty());
        assert!(m.tick(2_000 * MS).is_empty());
        let d = m.tick(2_001 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Inotify);
        assert!(
            t[0].detail
                .as_deref()
                .unwrap()
                .contains("during transactions of rpm (pid 61)")
        );
        let end = m.ended(5_000 * MS, k, || who(61, "rpm"), Some(0), 5_000 * MS, 0);
        assert!(triggers(&end).is_empty());
        assert_eq!(
            ignored(&m.tick(6_000 * MS)),
            [(61, IgnoreReason::Ambiguous)]
        );
    }

    #[test]
    fn a_killed_transaction_that_wrote_triggers_and_leaves_nothing_open() {
        let mut m = machine();
        let k = key(70, 0);
        m.started(k, who(70, "rpm"));
        m.wrote(k, || who(70, "rpm"), ours());
        let d = m.ended(MS, k, || who(70, "rpm"), None, MS, 1);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].attribution.as_ref().unwrap().return_code, None);
        assert!(t[0].detail.as_deref().unwrap().contains("died inside"));
        assert_eq!(m.running().count(), 0);
        // A later change is not swallowed by stale state.
        m.tick(1_000 * MS);
        m.changed(1_000 * MS, "Packages modified");
        assert_eq!(triggers(&m.tick(1_500 * MS)).len(), 1);
    }

    #[test]
    fn writes_readers_make_too_are_no_evidence() {
        // A read-only transaction (dnf's test transaction) maps SQLite's -shm.
        let mut m = machine();
        let k = key(90, 0);
        m.started(k, who(90, "dnf"));
        m.wrote(k, || who(90, "dnf"), Written::Shared);
        assert!(triggers(&m.ended(MS, k, || who(90, "dnf"), Some(0), MS, 1)).is_empty());
        assert_eq!(ignored(&m.tick(600 * MS)), [(90, IgnoreReason::NoWrite)]);
    }

    #[test]
    fn dropped_write_records_still_count_as_evidence() {
        let mut m = machine();
        let k = key(80, 0);
        // No start, no write record (ring buffer full): the end's count says it wrote.
        let d = m.ended(MS, k, || who(80, "rpm"), Some(0), MS, 2);
        assert_eq!(triggers(&d).len(), 1);
        // Unless a seen write went elsewhere.
        let k2 = key(81, 0);
        m.wrote(k2, || who(81, "rpm"), Written::Elsewhere);
        assert!(triggers(&m.ended(MS, k2, || who(81, "rpm"), Some(0), MS, 2)).is_empty());
    }

    #[test]
    fn state_is_bounded() {
        let mut m = machine();
        for pid in 0..(MAX_TXS as u32 + 100) {
            m.started(key(pid, 0), who(pid, "x"));
        }
        assert!(m.txs.len() <= MAX_TXS);
        for i in 0..(MAX_HELD as u64 + 100) {
            m.changed(i, "Packages modified");
        }
        assert!(m.held.len() <= MAX_HELD);
        assert!(m.held.iter().all(|c| c.candidates.len() <= MAX_CANDIDATES));
    }

    #[test]
    fn a_burst_of_changes_is_one_held_change_and_one_trigger() {
        let mut m = machine();
        for i in 0..100 {
            assert!(m.changed(i * MS, "Packages modified").is_empty());
        }
        assert_eq!(m.held.len(), 1);
        let d = m.tick(600 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[0].detail.as_deref(),
            Some("Packages modified (and 99 more changes)")
        );
    }
}
