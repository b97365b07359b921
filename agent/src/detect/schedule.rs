//! Coalescing triggers into scans: at most one scan running and one pending, a quiet period
//! for bursty file-level signals, and a storm limit on scans per minute.
//!
//! This is a pure state machine over `Instant`s so it can be tested exactly; the async loop in
//! `pipeline.rs` drives it.

use std::{collections::BTreeMap, time::Duration};

use guestwatch_daemon::token_bucket::TokenBucket;
use tokio::time::Instant;

use super::trigger::{Trigger, TriggerKind};

/// Tuning of the coalescer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// A debounced trigger (inotify, tamper) is scanned once no other arrived for this long.
    pub quiet_period: Duration,
    /// ...but never later than this after the first one, so a steady writer is still scanned.
    pub max_delay: Duration,
    /// Storm limit: scans per minute on average (0 = unlimited). Bursts of up to a sixth of a
    /// minute's allowance run at once; beyond that scans are spaced out, and the last trigger
    /// of a storm is always scanned.
    pub max_scans_per_minute: u32,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            quiet_period: Duration::from_millis(150),
            max_delay: Duration::from_secs(2),
            max_scans_per_minute: 60,
        }
    }
}

/// The triggers one scan answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The most significant trigger (by kind; the latest of that kind).
    pub cause: Trigger,
    /// How many triggers were coalesced into this scan, by kind.
    pub counts: BTreeMap<TriggerKind, u32>,
    /// Every transaction this scan answers, oldest first (the newest
    /// [`guest::MAX_LISTED`](guestwatch_protocol::guest::MAX_LISTED) when there were more).
    pub transactions: Vec<Trigger>,
    /// Every tamper record this scan answers, bounded likewise.
    pub tampers: Vec<Trigger>,
}

impl Batch {
    pub fn total(&self) -> u32 {
        self.counts.values().sum()
    }

    /// One record per tampering process: a later record of the same process adds its files
    /// and operations to the earlier one. Returns whether it was merged.
    fn merge_tamper(&mut self, trigger: &Trigger) -> bool {
        let Some(new) = &trigger.attribution else {
            return false;
        };
        let Some(old) = self
            .tampers
            .iter_mut()
            .filter_map(|t| t.attribution.as_mut())
            .find(|a| a.pid == new.pid && a.comm == new.comm)
        else {
            return false;
        };
        for path in &new.paths {
            if !old.paths.contains(path) && old.paths.len() < guestwatch_protocol::guest::MAX_PATHS
            {
                old.paths.push(path.clone());
            }
        }
        if let Some(op) = &new.operation {
            let ops = old.operation.get_or_insert_with(String::new);
            if !ops.split(',').any(|o| o == op) {
                if !ops.is_empty() {
                    ops.push(',');
                }
                ops.push_str(op);
            }
        }
        old.ended_at = old.ended_at.max(new.ended_at);
        true
    }

    /// Takes in an earlier batch's triggers (theirs come first: they are older).
    fn absorb(&mut self, older: Batch) {
        for (kind, n) in older.counts {
            *self.counts.entry(kind).or_default() += n;
        }
        for (mine, theirs) in [
            (&mut self.transactions, older.transactions),
            (&mut self.tampers, older.tampers),
        ] {
            let mut list = theirs;
            list.append(mine);
            let excess = list
                .len()
                .saturating_sub(guestwatch_protocol::guest::MAX_LISTED);
            list.drain(..excess);
            *mine = list;
        }
        if older.cause.kind > self.cause.kind {
            self.cause = older.cause;
        }
    }

    fn add(&mut self, trigger: Trigger) {
        *self.counts.entry(trigger.kind).or_default() += 1;
        if trigger.kind == TriggerKind::Tamper && self.merge_tamper(&trigger) {
            if trigger.kind >= self.cause.kind {
                self.cause = trigger;
            }
            return;
        }
        let list = match trigger.kind {
            TriggerKind::Transaction => Some(&mut self.transactions),
            TriggerKind::Tamper => Some(&mut self.tampers),
            _ => None,
        };
        if let Some(list) = list {
            if list.len() == guestwatch_protocol::guest::MAX_LISTED {
                list.remove(0);
            }
            list.push(trigger.clone());
        }
        if trigger.kind >= self.cause.kind {
            self.cause = trigger;
        }
    }
}

struct Pending {
    batch: Batch,
    first_at: Instant,
    /// A failed scan's batch waits for its retry until then.
    not_before: Option<Instant>,
    /// Set when any trigger that needs no quiet period is pending.
    immediate: bool,
    last_debounced_at: Option<Instant>,
}

/// The coalescer.
pub struct Scheduler {
    config: ScheduleConfig,
    pending: Option<Pending>,
    running: bool,
    /// The storm limit; `None` when unlimited.
    bucket: Option<TokenBucket<Instant>>,
}

impl Scheduler {
    pub fn new(config: ScheduleConfig, now: Instant) -> Self {
        let bucket = TokenBucket::per_minute(config.max_scans_per_minute, now);
        Self {
            config,
            pending: None,
            running: false,
            bucket,
        }
    }

    /// Adds a trigger to the pending scan (creating it if needed).
    pub fn add(&mut self, trigger: Trigger, now: Instant) {
        let debounced = trigger.kind.debounced();
        let pending = self.pending.get_or_insert_with(|| Pending {
            batch: Batch {
                cause: trigger.clone(),
                counts: BTreeMap::new(),
                transactions: Vec::new(),
                tampers: Vec::new(),
            },
            first_at: now,
            not_before: None,
            immediate: false,
            last_debounced_at: None,
        });
        pending.batch.add(trigger);
        if debounced {
            pending.last_debounced_at = Some(now);
        } else {
            pending.immediate = true;
        }
    }

    /// When the pending scan may start, or `None` if nothing is pending or a scan is running.
    pub fn ready_at(&self) -> Option<Instant> {
        if self.running {
            return None;
        }
        let pending = self.pending.as_ref()?;
        let due = match (pending.immediate, pending.last_debounced_at) {
            (true, _) | (false, None) => pending.first_at,
            (false, Some(last)) => {
                (last + self.config.quiet_period).min(pending.first_at + self.config.max_delay)
            }
        };
        let due = due.max(pending.not_before.unwrap_or(due));
        Some(match &self.bucket {
            Some(bucket) => due.max(bucket.ready_at()),
            None => due,
        })
    }

    /// A scan of `batch` failed: its triggers are scanned again, not before `at`, together
    /// with whatever arrived meanwhile (so a failed scan never loses a change or its
    /// attribution). Call after [`Scheduler::finished`].
    pub fn retry(&mut self, batch: Batch, at: Instant) {
        match &mut self.pending {
            Some(pending) => {
                pending.batch.absorb(batch);
                pending.not_before = Some(at);
            }
            None => {
                self.pending = Some(Pending {
                    batch,
                    first_at: at,
                    not_before: Some(at),
                    immediate: true,
                    last_debounced_at: None,
                });
            }
        }
    }

    /// Starts the pending scan if it is due: returns its batch and marks a scan as running.
    pub fn take(&mut self, now: Instant) -> Option<Batch> {
        if let Some(bucket) = &mut self.bucket {
            bucket.refill(now);
        }
        if self.ready_at()? > now {
            return None;
        }
        let pending = self.pending.take()?;
        if let Some(bucket) = &mut self.bucket {
            bucket.charge(1, now);
        }
        self.running = true;
        Some(pending.batch)
    }

    /// The running scan finished.
    pub fn finished(&mut self) {
        self.running = false;
    }

    pub fn is_running(&self) -> bool {
        self.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_minute: u32) -> ScheduleConfig {
        ScheduleConfig {
            quiet_period: Duration::from_millis(150),
            max_delay: Duration::from_secs(2),
            max_scans_per_minute: per_minute,
        }
    }

    fn t(kind: TriggerKind) -> Trigger {
        Trigger::new(kind)
    }

    #[test]
    fn immediate_triggers_run_at_once_and_only_one_scan_runs() {
        let now = Instant::now();
        let mut s = Scheduler::new(config(0), now);
        assert_eq!(s.ready_at(), None);
        s.add(t(TriggerKind::Transaction), now);
        let batch = s.take(now).expect("due now");
        assert_eq!(batch.cause.kind, TriggerKind::Transaction);
        // While it runs, new triggers pile up into one pending scan.
        for _ in 0..5 {
            s.add(t(TriggerKind::Transaction), now);
        }
        assert_eq!(s.take(now), None);
        s.finished();
        let batch = s.take(now).expect("pending scan");
        assert_eq!(batch.total(), 5);
        assert_eq!(s.take(now), None);
    }

    #[test]
    fn debounced_triggers_wait_for_quiet_but_not_forever() {
        let start = Instant::now();
        let mut s = Scheduler::new(config(0), start);
        s.add(t(TriggerKind::Inotify), start);
        assert_eq!(s.ready_at(), Some(start + Duration::from_millis(150)));
        assert_eq!(s.take(start + Duration::from_millis(100)), None);
        // Each new event restarts the quiet period...
        let mut now = start;
        for _ in 0..30 {
            now += Duration::from_millis(100);
            s.add(t(TriggerKind::Inotify), now);
        }
        // ...up to max_delay after the first.
        assert_eq!(s.ready_at(), Some(start + Duration::from_secs(2)));
        assert!(s.take(start + Duration::from_secs(2)).is_some());
    }

    #[test]
    fn the_most_significant_trigger_is_the_cause() {
        let now = Instant::now();
        let mut s = Scheduler::new(config(0), now);
        s.add(t(TriggerKind::Inotify), now);
        s.add(t(TriggerKind::Transaction).with_detail("first"), now);
        s.add(t(TriggerKind::Inotify), now);
        s.add(t(TriggerKind::Transaction).with_detail("second"), now);
        s.add(t(TriggerKind::Periodic), now);
        let batch = s.take(now).unwrap();
        assert_eq!(batch.cause.kind, TriggerKind::Transaction);
        assert_eq!(batch.cause.detail.as_deref(), Some("second"));
        assert_eq!(batch.counts[&TriggerKind::Inotify], 2);
        assert_eq!(batch.counts[&TriggerKind::Transaction], 2);
        assert_eq!(batch.total(), 5);
        // Every transaction is listed, not only the cause.
        let details: Vec<_> = batch
            .transactions
            .iter()
            .map(|t| t.detail.as_deref())
            .collect();
        assert_eq!(details, [Some("first"), Some("second")]);
        assert!(batch.tampers.is_empty());
    }

    #[test]
    fn one_record_per_tampering_process_with_every_file() {
        use guestwatch_protocol::Attribution;
        let tamper = |pid: u32, op: &str, path: &str| {
            t(TriggerKind::Tamper).with_attribution(Attribution {
                pid,
                comm: "sh".into(),
                operation: Some(op.into()),
                paths: vec![path.into()],
                ..Default::default()
            })
        };
        let now = Instant::now();
        let mut s = Scheduler::new(config(0), now);
        s.add(tamper(7, "write", "/var/lib/rpm/Packages"), now);
        s.add(tamper(7, "rename", "/var/lib/rpm/Index.db"), now);
        s.add(tamper(7, "write", "/var/lib/rpm/Packages"), now);
        s.add(tamper(8, "unlink", "/var/lib/rpm/Packages"), now);
        let batch = s.take(now + Duration::from_secs(3)).unwrap();
        assert_eq!(batch.counts[&TriggerKind::Tamper], 4);
        assert_eq!(batch.tampers.len(), 2);
        let first = batch.tampers[0].attribution.as_ref().unwrap();
        assert_eq!(
            first.paths,
            ["/var/lib/rpm/Packages", "/var/lib/rpm/Index.db"]
        );
        assert_eq!(first.operation.as_deref(), Some("write,rename"));
        assert_eq!(batch.tampers[1].attribution.as_ref().unwrap().pid, 8);
    }

    #[test]
    fn immediate_trigger_overrides_a_pending_quiet_period() {
        let now = Instant::now();
        let mut s = Scheduler::new(config(0), now);
        s.add(t(TriggerKind::Inotify), now);
        s.add(t(TriggerKind::Transaction), now);
        assert!(s.take(now).is_some());
    }

    #[test]
    fn storm_limit_bounds_scans_and_still_scans_after_the_last_trigger() {
        // 1,000 transactions, one every 10 ms, each scan taking 5 ms.
        let start = Instant::now();
        let mut s = Scheduler::new(config(60), start);
        let mut scans = 0;
        let mut now = start;
        let mut scan_ends: Option<Instant> = None;
        let mut last_scan_started = start;
        for i in 0..1000 {
            now = start + Duration::from_millis(10 * i);
            if scan_ends.is_some_and(|e| e <= now) {
                s.finished();
                scan_ends = None;
            }
            s.add(t(TriggerKind::Transaction), now);
            if s.take(now).is_some() {
                scans += 1;
                last_scan_started = now;
                scan_ends = Some(now + Duration::from_millis(5));
            }
        }
        let last_trigger = now;
        // Drain: keep time moving until nothing is pending.
        loop {
            if scan_ends.is_some_and(|e| e <= now) || scan_ends.is_none() {
                s.finished();
                scan_ends = None;
            }
            match s.ready_at() {
                None if !s.is_running() => break,
                Some(at) => {
                    now = now.max(at);
                    if s.take(now).is_some() {
                        scans += 1;
                        last_scan_started = now;
                        scan_ends = Some(now + Duration::from_millis(5));
                    }
                }
                None => now += Duration::from_millis(5),
            }
        }
        // 10 s of storm at 60/min: the burst of 10 plus about one per second.
        assert!((15..=25).contains(&scans), "{scans} scans");
        assert!(
            last_scan_started >= last_trigger,
            "the last trigger must be scanned"
        );
    }

    #[test]
    fn unlimited_means_no_bucket() {
        let now = Instant::now();
        let mut s = Scheduler::new(config(0), now);
        for _ in 0..100 {
            s.add(t(TriggerKind::Transaction), now);
            assert!(s.take(now).is_some());
            s.finished();
        }
    }

    #[test]
    fn a_retried_batch_keeps_its_triggers_and_joins_newer_ones() {
        let now = Instant::now();
        let mut s = Scheduler::new(config(0), now);
        let mut first = t(TriggerKind::Transaction);
        first.detail = Some("first".into());
        s.add(first.clone(), now);
        let batch = s.take(now).unwrap();
        s.add(t(TriggerKind::Inotify), now);
        s.finished();
        let later = now + Duration::from_secs(1);
        s.retry(batch, later);
        assert_eq!(s.ready_at(), Some(later), "not before the retry time");
        assert!(s.take(now + Duration::from_millis(500)).is_none());
        let retried = s.take(later).unwrap();
        assert_eq!(retried.cause.detail.as_deref(), Some("first"));
        assert_eq!(retried.transactions.len(), 1);
        assert_eq!(retried.counts[&TriggerKind::Transaction], 1);
        assert_eq!(retried.counts[&TriggerKind::Inotify], 1);
        // Alone, a retried batch is due at its time.
        s.finished();
        s.retry(retried, later + Duration::from_secs(2));
        assert_eq!(s.ready_at(), Some(later + Duration::from_secs(2)));
    }
}
