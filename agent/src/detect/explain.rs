//! Deciding, by evidence, whether a database change is explained by a transaction.
//!
//! A librpm transaction counts for the watched database only if it wrote it: the kernel saw
//! its process write a database file inside its `rpmtsRun` window (`Evidence::Syscall`), or,
//! for writes that are not syscalls the probes saw (`mmap`, a descriptor opened before the
//! agent started), a database file changed inside its window while no other transaction ran
//! (`Evidence::Inotify`). Every other transaction — another database, a container's
//! installroot, dnf's test transaction, a failed or read-only one, one killed before it wrote —
//! is ignored and counted.
//!
//! A transaction with evidence triggers when its process exits (rpm closes the database, and
//! SQLite checkpoints, right after `rpmtsRun` returns), or [`ExplainConfig::exit_wait`] after
//! its end if the process lives on (dnf): its scan then sees the final state. An inotify change
//! is *covered* when such a trigger comes after it (or is still to come): that scan sees it.
//! Any other change becomes an `inotify` trigger (without attribution: inotify does not say
//! who), so a change nothing explains is still scanned, never lost.
//!
//! Time is the kernel's boot clock in nanoseconds: transaction records carry it, and a change
//! is dated by the changed file's ctime (a coarse kernel clock, so with a tolerance of
//! [`ExplainConfig::clock_tick`]), not by when userspace read the inotify event. Records and
//! inotify events travel by different channels; the driver drains both without waiting and
//! tells the machine up to when each is complete ([`Explainer::drained`]): a change is decided
//! once every transaction record up to it is in, a transaction once every inotify event up to
//! its end is. This is a pure state machine, driven by `mod.rs`.

use std::{collections::BTreeMap, time::Duration};

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
    /// The resolution of file times (the kernel's coarse clock ticks at 1-10 ms): a change
    /// dated `t` happened in `[t, t + clock_tick)`.
    pub clock_tick: Duration,
    /// A change that a running transaction without evidence yet may still explain becomes a
    /// trigger after this long anyway: a transaction that never ends cannot hide a change.
    pub max_hold: Duration,
    /// How long after its end a transaction's trigger waits for its process to exit.
    pub exit_wait: Duration,
}

impl Default for ExplainConfig {
    fn default() -> Self {
        Self {
            clock_tick: Duration::from_millis(10),
            max_hold: Duration::from_secs(2),
            exit_wait: Duration::from_millis(100),
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
    /// Its process had a file of the watched database open: only such a transaction can change
    /// it without a syscall the probes see (`mmap`).
    opened: bool,
    aborted: bool,
    /// A change was seen during it and other transactions: it cannot be credited.
    ambiguous: bool,
    /// Write records seen (the end record says how many the kernel counted).
    writes_seen: u32,
    /// The transaction trigger was emitted.
    reported: bool,
    /// When its trigger went out (boot clock): its scan sees every change up to then.
    reported_ns: Option<u64>,
    /// Its process's writes of watched files after it ended (kernel time, file name): SQLite's
    /// checkpoint and `-wal` removal on close. The first few.
    tails: Vec<(u64, String)>,
}

impl Tx {
    /// Whether it may have run at some point of `[from, to + tick)`.
    fn ran_during(&self, key: &TxKey, from: u64, to: u64, tick: u64) -> bool {
        key.start_ns <= to.saturating_add(tick) && self.ended_ns.is_none_or(|e| e >= from)
    }

    /// Whether it surely ran all through `[from, to + tick)` (the change, with the clock's
    /// uncertainty, lies inside its window): only then can the change be its own.
    fn ran_throughout(&self, key: &TxKey, from: u64, to: u64, tick: u64) -> bool {
        key.start_ns <= from && self.ended_ns.is_some_and(|e| e >= to.saturating_add(tick))
    }
}

#[derive(Debug)]
struct Change {
    /// When the change happened (kernel time, `[t, t + tick)`).
    at_ns: u64,
    /// When the latest change merged into it happened.
    latest_ns: u64,
    /// When it was read.
    read_ns: u64,
    /// The distinct changes merged into it (`Packages modified`), the first few.
    what: Vec<String>,
    /// The distinct files it touched, the first few; `overflow` when there were more.
    files: Vec<String>,
    overflow: bool,
    /// Further changes merged into this one.
    more: u32,
}

/// Distinct changes named in one merged change's trigger.
const MAX_NAMED: usize = 8;
/// Tail writes remembered per transaction.
const MAX_TAILS: usize = 32;

/// The machine.
#[derive(Debug)]
pub struct Explainer {
    config: ExplainConfig,
    txs: BTreeMap<TxKey, Tx>,
    held: Vec<Change>,
    /// Every transaction record up to this time has been given.
    records_until: u64,
    /// Every inotify change up to this time has been given.
    changes_until: u64,
}

/// Bounds memory and work whatever the kernel sends: the oldest state goes first.
const MAX_TXS: usize = 4096;
const MAX_HELD: usize = 1024;

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Explainer {
    pub fn new(config: ExplainConfig) -> Self {
        Self {
            config,
            txs: BTreeMap::new(),
            held: Vec::new(),
            records_until: 0,
            changes_until: 0,
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
            opened: false,
            aborted: false,
            ambiguous: false,
            writes_seen: 0,
            reported: false,
            reported_ns: None,
            tails: Vec::new(),
        })
    }

    /// A transaction started; `who` was read while its process was alive; `opened`: its
    /// process had a file of the watched database open.
    pub fn started(&mut self, key: TxKey, who: Attribution, opened: bool) {
        let tx = self.tx(key, Attribution::default);
        tx.opened |= opened;
        // What a write record may have filled in before the start record arrived stays.
        let database = tx.who.database.take().or(who.database.clone());
        tx.who = Attribution { database, ..who };
    }

    /// The transaction's process wrote a watched path.
    pub fn wrote(&mut self, key: TxKey, who: impl FnOnce() -> Attribution, written: Written) {
        let tx = self.tx(key, who);
        tx.writes_seen = tx.writes_seen.saturating_add(1);
        match written {
            Written::Ours { database } | Written::Unverified { database } => {
                tx.evidence = Some(Evidence::Syscall);
                tx.opened = true;
                if tx.who.database.is_none() {
                    tx.who.database = Some(database);
                }
            }
            Written::Elsewhere => tx.elsewhere = true,
            Written::Shared => {}
        }
    }

    /// The transaction ended (`return_code` `None`: its thread died inside `rpmtsRun`);
    /// `writes` is what the kernel counted. A transaction with syscall evidence whose thread
    /// died triggers at once (its trigger comes out of this call); otherwise when its process
    /// exits ([`Self::exited`]) or `exit_wait` after its end ([`Self::settle`]).
    pub fn ended(
        &mut self,
        key: TxKey,
        who: impl FnOnce() -> Attribution,
        return_code: Option<i32>,
        end_ns: u64,
        writes: u32,
    ) -> Option<Decision> {
        let tx = self.tx(key, who);
        if tx.ended_ns.is_some() {
            return None;
        }
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
        if tx.evidence.is_some() && !tx.reported && tx.aborted {
            tx.reported = true;
            tx.reported_ns = Some(end_ns);
            return Some(Decision::Trigger(Box::new(transaction_trigger(tx))));
        }
        None
    }

    /// Process `tgid`, which ran transactions, exited at `exit_ns`: the triggers of its ended
    /// transactions with evidence go out now, covering every change up to its exit.
    pub fn exited(&mut self, tgid: u32, exit_ns: u64) -> Vec<Decision> {
        let mut out = Vec::new();
        for (key, tx) in self.txs.range_mut(
            TxKey { tgid, start_ns: 0 }..=TxKey {
                tgid,
                start_ns: u64::MAX,
            },
        ) {
            let _ = key;
            if tx.ended_ns.is_some() && tx.evidence.is_some() && !tx.reported {
                tx.reported = true;
                tx.reported_ns = Some(exit_ns);
                out.push(Decision::Trigger(Box::new(transaction_trigger(tx))));
            }
        }
        out
    }

    /// Process `tgid` wrote watched file `name` at `at_ns` after its transaction ended (the
    /// transaction's tail).
    pub fn tail(&mut self, tgid: u32, at_ns: u64, name: &str) {
        let last = self
            .txs
            .range_mut(
                TxKey { tgid, start_ns: 0 }..=TxKey {
                    tgid,
                    start_ns: u64::MAX,
                },
            )
            .next_back();
        if let Some((_, tx)) = last
            && tx.ended_ns.is_some()
            && tx.tails.len() < MAX_TAILS
        {
            tx.tails.push((at_ns, name.to_owned()));
        }
    }

    /// inotify saw database file `file` change (`what`: modified, deleted, …; lock and
    /// reader-written files excluded); the change happened at `at_ns` (the file's ctime on the
    /// boot clock) and was read at `read_ns`.
    pub fn changed(&mut self, at_ns: u64, read_ns: u64, file: &str, what: &str) {
        let at_ns = at_ns.min(read_ns);
        let what = format!("{file} {what}");
        let what = what.as_str();
        // A burst (a writer's many writes) is one change: one trigger is enough for it. Only
        // a later change joins an earlier one (it is then dated by the earlier, the safe side).
        let full = self.held.len() >= MAX_HELD;
        let tick = ns(self.config.clock_tick);
        if let Some(last) = self.held.last_mut()
            && (full || (at_ns >= last.at_ns && at_ns <= last.latest_ns.saturating_add(tick)))
        {
            last.at_ns = last.at_ns.min(at_ns);
            last.latest_ns = last.latest_ns.max(at_ns);
            if !last.files.iter().any(|f| f == file) {
                if last.files.len() < MAX_NAMED {
                    last.files.push(file.to_owned());
                } else {
                    last.overflow = true;
                }
            }
            if !last.what.iter().any(|w| w == what) && last.what.len() < MAX_NAMED {
                last.what.push(what.to_owned());
                return;
            }
            last.more = last.more.saturating_add(1);
            return;
        }
        self.held.push(Change {
            at_ns,
            latest_ns: at_ns,
            read_ns,
            what: vec![what.to_owned()],
            files: vec![file.to_owned()],
            overflow: false,
            more: 0,
        });
    }

    /// Every transaction record (`records`), or inotify change (`changes`), up to that time
    /// has been given.
    pub fn drained(&mut self, records: Option<u64>, changes: Option<u64>) {
        if let Some(t) = records {
            self.records_until = self.records_until.max(t);
        }
        if let Some(t) = changes {
            self.changes_until = self.changes_until.max(t);
        }
    }

    /// When [`Self::settle`] has something to decide by time alone (a held change's maximum
    /// hold).
    pub fn next_deadline(&self) -> Option<u64> {
        let exit_wait = ns(self.config.exit_wait);
        let pending = self
            .txs
            .values()
            .filter_map(|tx| match (tx.ended_ns, tx.evidence) {
                (Some(end), Some(_)) if !tx.reported => Some(end.saturating_add(exit_wait)),
                _ => None,
            });
        let tick = ns(self.config.clock_tick);
        self.held
            .iter()
            .map(|c| {
                let records = c.latest_ns.saturating_add(tick);
                if self.records_until < records {
                    // Decidable once the records up to it are in: a drain then says so.
                    records
                } else {
                    c.read_ns.saturating_add(ns(self.config.max_hold))
                }
            })
            .chain(pending)
            .min()
    }

    /// Transactions still running, for a liveness check of their processes.
    pub fn running(&self) -> impl Iterator<Item = TxKey> + '_ {
        self.txs
            .iter()
            .filter(|(_, t)| t.ended_ns.is_none())
            .map(|(k, _)| *k)
    }

    /// Decides what the records and changes given so far allow.
    pub fn settle(&mut self, now_ns: u64) -> Vec<Decision> {
        let tick = ns(self.config.clock_tick);
        let max_hold = ns(self.config.max_hold);
        let exit_wait = ns(self.config.exit_wait);
        let mut out = Vec::new();
        // Transactions whose process lives on past the wait: their trigger goes out now.
        for tx in self.txs.values_mut() {
            if let (Some(end), Some(_), false) = (tx.ended_ns, tx.evidence, tx.reported)
                && now_ns >= end.saturating_add(exit_wait)
            {
                tx.reported = true;
                tx.reported_ns = Some(now_ns);
                out.push(Decision::Trigger(Box::new(transaction_trigger(tx))));
            }
        }
        let mut held = std::mem::take(&mut self.held);
        held.retain(|change| {
            let (from, to) = (change.at_ns, change.latest_ns);
            // Not before every transaction record up to the change is in.
            if self.records_until < to.saturating_add(tick) {
                return true;
            }
            // A trigger still to come, or that went out after the change: its scan sees it.
            // Or every file it touched is a tail write of a transaction, made before that
            // transaction's trigger (the kernel's precise times need no coarse-clock margin).
            let covered = self.txs.values().any(|tx| {
                if tx.evidence != Some(Evidence::Syscall) {
                    return false;
                }
                if tx.reported_ns.is_none_or(|r| r >= to.saturating_add(tick)) {
                    return true;
                }
                !change.overflow
                    && change.files.iter().all(|f| {
                        tx.tails.iter().any(|(w, name)| {
                            name == f
                                && *w + tick >= from
                                && *w <= to.saturating_add(tick)
                                && tx.reported_ns.is_none_or(|r| *w <= r)
                        })
                    })
            });
            if covered {
                return false;
            }
            let during: Vec<TxKey> = self
                .txs
                .iter()
                // With syscall evidence it would cover the change, unless it ended within the
                // clock's tolerance of it: then the change may postdate its scan.
                .filter(|(k, tx)| {
                    tx.ran_during(k, from, to, tick)
                        && tx.opened
                        && !tx.elsewhere
                        && tx.evidence != Some(Evidence::Syscall)
                })
                .map(|(k, _)| *k)
                .collect();
            let still_running = during
                .iter()
                .any(|k| self.txs.get(k).is_some_and(|tx| tx.ended_ns.is_none()));
            let held_long = now_ns >= change.read_ns.saturating_add(max_hold);
            if still_running && !held_long {
                // It may yet show evidence and cover the change.
                return true;
            }
            if let [only] = during.as_slice()
                && !still_running
                && let Some(tx) = self.txs.get_mut(only)
                && !tx.ambiguous
                && tx.ran_throughout(only, from, to, tick)
            {
                // The one transaction that could have made a change no syscall showed.
                if tx.evidence.is_none() {
                    tx.evidence = Some(Evidence::Inotify);
                }
                if !tx.reported {
                    tx.reported = true;
                    tx.reported_ns = Some(now_ns);
                    out.push(Decision::Trigger(Box::new(transaction_trigger(tx))));
                }
                return false;
            }
            let mut names = Vec::new();
            for key in &during {
                if let Some(tx) = self.txs.get_mut(key) {
                    tx.ambiguous = true;
                    names.push(format!("{} (pid {})", tx.who.comm, tx.who.pid));
                }
            }
            let during = if names.is_empty() {
                String::new()
            } else {
                format!(" during transactions of {}", names.join(", "))
            };
            out.push(Decision::Trigger(Box::new(inotify_trigger(
                change, &during,
            ))));
            false
        });
        self.held = held;

        // Ended transactions whose every change up to their end (or their trigger, which
        // covers changes until then) has been read: decided.
        let changes_until = self.changes_until;
        let done: Vec<TxKey> = self
            .txs
            .iter()
            .filter(|(_, tx)| {
                let Some(end) = tx.ended_ns else {
                    return false;
                };
                let until = match (tx.evidence, tx.reported_ns) {
                    // Its trigger is still to come.
                    (Some(_), None) => return false,
                    (_, Some(reported)) => reported.max(end),
                    (None, None) => end,
                };
                changes_until >= until.saturating_add(tick)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            let pending = self.held.iter().any(|c| {
                self.txs
                    .get(&key)
                    .is_some_and(|tx| tx.opened && tx.ran_during(&key, c.at_ns, c.latest_ns, tick))
            });
            if pending {
                continue;
            }
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
    Trigger::new(TriggerKind::Inotify)
        .with_detail(format!("{}{more}{during}", change.what.join(", ")))
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
        let mut v: Vec<_> = d
            .iter()
            .filter_map(|d| match d {
                Decision::Ignored { who, reason } => Some((who.pid, *reason)),
                Decision::Trigger(_) => None,
            })
            .collect();
        v.sort_by_key(|(pid, _)| *pid);
        v
    }

    fn machine() -> Explainer {
        Explainer::new(ExplainConfig::default())
    }

    /// Both channels drained up to `t`, then a decision.
    fn settle_at(m: &mut Explainer, t: u64) -> Vec<Decision> {
        m.drained(Some(t), Some(t));
        m.settle(t)
    }

    fn end(m: &mut Explainer, k: TxKey, rc: Option<i32>, at: u64, writes: u32) -> Vec<Decision> {
        m.ended(k, || who(k.tgid, "rpm"), rc, at, writes)
            .into_iter()
            .collect()
    }

    /// The transaction ends and its process exits right after, as rpm does.
    fn end_exit(
        m: &mut Explainer,
        k: TxKey,
        rc: Option<i32>,
        at: u64,
        writes: u32,
    ) -> Vec<Decision> {
        let mut d = end(m, k, rc, at, writes);
        d.extend(m.exited(k.tgid, at + MS));
        d
    }

    #[test]
    fn a_transaction_that_wrote_triggers_at_once_and_covers_its_changes() {
        let mut m = machine();
        let k = key(10, 1_000 * MS);
        m.started(k, who(10, "rpm"), true);
        m.wrote(k, || who(10, "rpm"), ours());
        m.changed(1_001 * MS, 1_001 * MS, "rpmdb.sqlite-wal", "modified");
        let d = end_exit(&mut m, k, Some(0), 1_020 * MS, 1);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Transaction);
        let a = t[0].attribution.as_ref().unwrap();
        assert_eq!((a.pid, a.return_code), (10, Some(0)));
        assert_eq!(a.evidence, Some(Evidence::Syscall));
        assert_eq!(a.database.as_deref(), Some("/var/lib/rpm/rpmdb.sqlite"));
        assert!(t[0].detail.as_deref().unwrap().contains("rpm (pid 10)"));
        // Its own change, even read late, is covered: nothing else comes of it.
        m.changed(1_005 * MS, 1_500 * MS, "rpmdb.sqlite-wal", "modified");
        assert!(settle_at(&mut m, 2_000 * MS).is_empty());
        assert_eq!(m.next_deadline(), None);
        assert_eq!(m.running().count(), 0);
    }

    #[test]
    fn the_trigger_waits_for_the_process_to_exit_so_its_checkpoint_is_covered() {
        let mut m = machine();
        let k = key(12, 0);
        m.started(k, who(12, "rpm"), true);
        m.wrote(k, || who(12, "rpm"), ours());
        assert!(
            end(&mut m, k, Some(0), 10 * MS, 1).is_empty(),
            "not before it exits"
        );
        assert_eq!(m.next_deadline(), Some(110 * MS));
        // SQLite checkpoints on close, after rpmtsRun returned, before the process exits.
        m.tail(12, 12 * MS + 500_000, "rpmdb.sqlite");
        m.changed(12 * MS, 13 * MS, "rpmdb.sqlite", "modified");
        let d = m.exited(12, 15 * MS);
        assert_eq!(triggers(&d).len(), 1);
        assert!(
            settle_at(&mut m, 100 * MS).is_empty(),
            "the checkpoint is covered"
        );
        // A change after the exit is not.
        m.changed(120 * MS, 121 * MS, "Packages", "modified");
        assert_eq!(
            triggers(&settle_at(&mut m, 200 * MS))[0].kind,
            TriggerKind::Inotify
        );
    }

    #[test]
    fn only_tail_writes_before_the_trigger_and_of_the_same_files_are_covered() {
        let mut m = machine();
        let k = key(14, 0);
        m.started(k, who(14, "dnf"), true);
        m.wrote(k, || who(14, "dnf"), ours());
        end(&mut m, k, Some(0), 10 * MS, 1);
        // dnf lives on: its trigger goes out at 110 ms; it checkpoints at 300 ms.
        assert_eq!(triggers(&settle_at(&mut m, 110 * MS)).len(), 1);
        m.tail(14, 300 * MS, "rpmdb.sqlite");
        m.changed(300 * MS, 301 * MS, "rpmdb.sqlite", "modified");
        let d = settle_at(&mut m, 400 * MS);
        assert_eq!(triggers(&d).len(), 1, "after its trigger: scanned again");
        // Another file than the tail's is not covered by it either.
        let k2 = key(15, 0);
        m.started(k2, who(15, "rpm"), true);
        m.wrote(k2, || who(15, "rpm"), ours());
        end(&mut m, k2, Some(0), 500 * MS, 1);
        m.tail(15, 501 * MS, "rpmdb.sqlite");
        m.changed(500 * MS, 502 * MS, "Packages", "modified");
        m.exited(15, 503 * MS);
        let d = settle_at(&mut m, 600 * MS);
        assert_eq!(triggers(&d)[0].kind, TriggerKind::Inotify);
    }

    #[test]
    fn a_process_that_lives_on_is_not_waited_for_long() {
        // dnf keeps going after its transaction: the trigger goes out after the wait.
        let mut m = machine();
        let k = key(13, 0);
        m.started(k, who(13, "dnf"), true);
        m.wrote(k, || who(13, "dnf"), ours());
        assert!(end(&mut m, k, Some(0), 10 * MS, 1).is_empty());
        assert!(settle_at(&mut m, 109 * MS).is_empty());
        let d = settle_at(&mut m, 110 * MS);
        assert_eq!(triggers(&d).len(), 1);
        assert!(m.exited(13, 500 * MS).is_empty(), "reported once");
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
            (5, Some(0), Some(Written::Shared), IgnoreReason::NoWrite),
        ];
        let mut all = Vec::new();
        for (pid, rc, write, _) in &cases {
            let k = key(*pid, 100 * MS);
            m.started(k, who(*pid, "dnf"), true);
            if let Some(w) = write {
                m.wrote(k, || who(*pid, "dnf"), w.clone());
            }
            let writes = u32::from(write.is_some());
            all.extend(end(&mut m, k, *rc, 101 * MS, writes));
        }
        assert!(triggers(&all).is_empty(), "{all:?}");
        // Decided once every inotify change up to their end has been read, not before.
        m.drained(Some(105 * MS), Some(105 * MS));
        assert!(m.settle(105 * MS).is_empty());
        all.extend(settle_at(&mut m, 200 * MS));
        let want: Vec<_> = cases.iter().map(|(p, _, _, r)| (*p, *r)).collect();
        assert_eq!(ignored(&all), want);
    }

    #[test]
    fn a_change_nothing_explains_is_an_inotify_trigger() {
        let mut m = machine();
        m.changed(50 * MS, 51 * MS, "Packages", "modified");
        // Not before the records up to the change are in.
        m.drained(Some(55 * MS), None);
        assert!(m.settle(55 * MS).is_empty());
        let d = settle_at(&mut m, 61 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Inotify);
        assert_eq!(t[0].attribution, None);
        assert_eq!(t[0].detail.as_deref(), Some("Packages modified"));
    }

    #[test]
    fn a_change_read_before_its_transactions_records_is_still_covered() {
        let mut m = machine();
        // inotify was read first; the transaction started at 4 ms and wrote at 5 ms.
        m.changed(5 * MS, 6 * MS, "rpmdb.sqlite-wal", "modified");
        m.drained(None, Some(6 * MS));
        assert!(m.settle(6 * MS).is_empty(), "waits for the records");
        let k = key(20, 4 * MS);
        m.started(k, who(20, "rpm"), true);
        m.wrote(k, || who(20, "rpm"), ours());
        let d = end_exit(&mut m, k, Some(0), 30 * MS, 1);
        assert_eq!(triggers(&d).len(), 1);
        assert!(settle_at(&mut m, 100 * MS).is_empty(), "covered");
    }

    #[test]
    fn a_change_before_a_transaction_or_after_its_end_is_scanned_on_its_own() {
        let mut m = machine();
        m.changed(5 * MS, 5 * MS, "Packages", "modified");
        let k = key(21, 100 * MS);
        m.started(k, who(21, "rpm"), true);
        m.wrote(k, || who(21, "rpm"), ours());
        // The earlier change is before the transaction: its scan covers it all the same.
        assert_eq!(
            triggers(&end_exit(&mut m, k, Some(0), 110 * MS, 1)).len(),
            1
        );
        assert!(settle_at(&mut m, 120 * MS).is_empty());
        // A change after the end (SQLite's checkpoint, or another writer) may postdate the
        // scan: scanned again.
        m.changed(130 * MS, 131 * MS, "rpmdb.sqlite", "modified");
        let t = settle_at(&mut m, 150 * MS);
        assert_eq!(triggers(&t)[0].kind, TriggerKind::Inotify);
    }

    #[test]
    fn inotify_is_evidence_when_one_transaction_alone_ran_during_the_change() {
        let mut m = machine();
        let k = key(40, 0);
        m.started(k, who(40, "rpm"), true);
        m.changed(MS, 2 * MS, "Index.db", "modified");
        assert!(
            settle_at(&mut m, 3 * MS).is_empty(),
            "it may still show evidence"
        );
        assert!(end(&mut m, k, Some(0), 20 * MS, 0).is_empty());
        let d = settle_at(&mut m, 40 * MS);
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
    fn a_transaction_that_ended_before_a_change_is_never_credited_with_it() {
        // dnf's test transaction ends, its real one writes, SQLite checkpoints after: the
        // checkpoint is not the test transaction's.
        let mut m = machine();
        let test = key(45, 0);
        let real = key(45, 50 * MS);
        m.started(test, who(45, "dnf"), true);
        assert!(end(&mut m, test, Some(0), 10 * MS, 0).is_empty());
        m.started(real, who(45, "dnf"), true);
        m.wrote(real, || who(45, "dnf"), ours());
        m.changed(60 * MS, 61 * MS, "rpmdb.sqlite-wal", "modified");
        let d = end_exit(&mut m, real, Some(0), 80 * MS, 1);
        assert_eq!(triggers(&d).len(), 1);
        m.changed(90 * MS, 95 * MS, "rpmdb.sqlite", "modified");
        let d = settle_at(&mut m, 200 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[0].kind,
            TriggerKind::Inotify,
            "not the test transaction's"
        );
        assert_eq!(t[0].attribution, None);
        assert_eq!(ignored(&d), [(45, IgnoreReason::NoWrite)]);
    }

    #[test]
    fn a_change_within_the_clocks_tolerance_of_an_end_is_not_credited() {
        // Killed at 100 ms; a write at 103 ms carries a coarse ctime of 100 ms: it may be after.
        let mut m = machine();
        let k = key(46, 0);
        m.started(k, who(46, "python3"), true);
        assert!(end(&mut m, k, None, 100 * MS, 0).is_empty());
        m.changed(100 * MS, 104 * MS, "Packages", "modified");
        let d = settle_at(&mut m, 200 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Inotify, "{d:?}");
        assert_eq!(ignored(&d), [(46, IgnoreReason::Ambiguous)]);
    }

    #[test]
    fn with_two_transactions_running_nobody_is_credited() {
        let mut m = machine();
        let (a, b) = (key(50, 0), key(51, 0));
        m.started(a, who(50, "rpm"), true);
        m.started(b, who(51, "rpm"), true);
        m.changed(MS, MS, "Packages", "modified");
        end(&mut m, a, Some(0), 20 * MS, 0);
        end(&mut m, b, Some(0), 20 * MS, 0);
        let d = settle_at(&mut m, 100 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Inotify);
        assert_eq!(t[0].attribution, None);
        let detail = t[0].detail.as_deref().unwrap();
        assert!(
            detail.contains("pid 50") && detail.contains("pid 51"),
            "{detail}"
        );
        assert_eq!(
            ignored(&d),
            [(50, IgnoreReason::Ambiguous), (51, IgnoreReason::Ambiguous)]
        );
    }

    #[test]
    fn another_databases_transactions_never_explain_or_hide_a_change_here() {
        let mut m = machine();
        let other = key(60, 0);
        m.started(other, who(60, "rpm"), true);
        m.wrote(other, || who(60, "rpm"), Written::Elsewhere);
        m.changed(MS, MS, "Packages", "modified");
        let d = settle_at(&mut m, 20 * MS);
        let t = triggers(&d);
        assert_eq!(
            t.len(),
            1,
            "reported at once: the other transaction is no candidate"
        );
        assert_eq!(t[0].detail.as_deref(), Some("Packages modified"));
        assert!(end(&mut m, other, Some(0), 3_000 * MS, 1).is_empty());
        assert_eq!(
            ignored(&settle_at(&mut m, 4_000 * MS)),
            [(60, IgnoreReason::OtherDatabase)]
        );
    }

    #[test]
    fn a_transaction_that_never_ends_cannot_hold_a_change_back() {
        let mut m = machine();
        let k = key(61, 0);
        m.started(k, who(61, "rpm"), true);
        m.changed(MS, MS, "Packages", "modified");
        assert_eq!(
            m.next_deadline(),
            Some(11 * MS),
            "first, the records up to it"
        );
        assert!(settle_at(&mut m, 20 * MS).is_empty());
        assert_eq!(m.next_deadline(), Some(2_001 * MS), "then the longest hold");
        assert!(settle_at(&mut m, 2_000 * MS).is_empty());
        let d = settle_at(&mut m, 2_001 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TriggerKind::Inotify);
        assert!(
            t[0].detail
                .as_deref()
                .unwrap()
                .contains("during transactions of rpm (pid 61)")
        );
        assert!(end(&mut m, k, Some(0), 5_000 * MS, 0).is_empty());
        assert_eq!(
            ignored(&settle_at(&mut m, 6_000 * MS)),
            [(61, IgnoreReason::Ambiguous)]
        );
    }

    #[test]
    fn a_killed_transaction_that_wrote_triggers_and_leaves_nothing_open() {
        let mut m = machine();
        let k = key(70, 0);
        m.started(k, who(70, "rpm"), true);
        m.wrote(k, || who(70, "rpm"), ours());
        let d = end(&mut m, k, None, MS, 1);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].attribution.as_ref().unwrap().return_code, None);
        assert!(t[0].detail.as_deref().unwrap().contains("died inside"));
        assert_eq!(m.running().count(), 0);
        // A later change is not swallowed by stale state.
        settle_at(&mut m, 1_000 * MS);
        m.changed(1_000 * MS, 1_000 * MS, "Packages", "modified");
        assert_eq!(triggers(&settle_at(&mut m, 1_100 * MS)).len(), 1);
    }

    #[test]
    fn transactions_that_never_opened_the_database_are_no_candidates() {
        // Another test's rpm on another database, running while a change happens here.
        let mut m = machine();
        let foreign = key(95, 0);
        m.started(foreign, who(95, "rpm"), false);
        m.changed(MS, MS, "Packages", "modified");
        let d = settle_at(&mut m, 20 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1, "not held back by it");
        assert_eq!(t[0].kind, TriggerKind::Inotify);
        assert!(end(&mut m, foreign, Some(0), 30 * MS, 0).is_empty());
        assert_eq!(
            ignored(&settle_at(&mut m, 100 * MS)),
            [(95, IgnoreReason::NoWrite)]
        );
    }

    #[test]
    fn dropped_write_records_still_count_as_evidence() {
        let mut m = machine();
        // No start, no write record (ring buffer full): the end's count says it wrote.
        assert_eq!(
            triggers(&end_exit(&mut m, key(80, 0), Some(0), MS, 2)).len(),
            1
        );
        // Unless a seen write went elsewhere.
        let k2 = key(81, 0);
        m.wrote(k2, || who(81, "rpm"), Written::Elsewhere);
        assert!(end_exit(&mut m, k2, Some(0), MS, 2).is_empty());
    }

    #[test]
    fn a_burst_of_changes_is_one_trigger() {
        let mut m = machine();
        for i in 0..100 {
            m.changed(
                1_000 * MS + i * 50_000,
                1_000 * MS + i * 50_000,
                "Packages",
                "modified",
            );
        }
        assert_eq!(m.held.len(), 1);
        let d = settle_at(&mut m, 1_100 * MS);
        let t = triggers(&d);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[0].detail.as_deref(),
            Some("Packages modified (and 99 more changes)")
        );
    }

    #[test]
    fn state_is_bounded() {
        let mut m = machine();
        for pid in 0..(MAX_TXS as u32 + 100) {
            m.started(key(pid, 0), who(pid, "x"), true);
        }
        assert!(m.txs.len() <= MAX_TXS);
        for i in 0..(MAX_HELD as u64 + 100) {
            m.changed(i * 100 * MS, i * 100 * MS, "Packages", "modified");
        }
        assert!(m.held.len() <= MAX_HELD);
        // Deciding stays cheap: every change here is held by running transactions.
        assert!(settle_at(&mut m, 1).is_empty());
    }
}
