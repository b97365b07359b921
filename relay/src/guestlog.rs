//! Per-VM log budgets. Lines a guest's behaviour causes (its `Hello`, its `Error` frames, its
//! protocol errors, refused connections, rejected reports) are rate-limited per VM, so a guest
//! cannot fill the host's disk through the relay's log; what is suppressed is counted and
//! summarised ("N more suppressed"). Lines the relay writes for its own work (deliveries, sink
//! failures) are bounded by the rate limits and the retry backoff instead.
//!
//! Use [`guest_log!`](crate::guest_log) with the shared [`GuestLog`]; every guest string in the
//! line goes through [`crate::escape::for_log`].

use std::{collections::HashMap, sync::Mutex};

use tokio::time::Instant;

/// Lines per minute per VM, on average.
pub const LINES_PER_MINUTE: u32 = 30;
/// Lines a VM may cause at once.
pub const BURST: u32 = 10;

#[derive(Debug)]
struct Budget {
    tokens: f64,
    at: Instant,
    /// Lines suppressed since the last one written or summarised.
    suppressed: u64,
}

/// The budgets of every VM (keyed by the VM's name, which comes from configuration or the
/// kernel, so the map is as large as the fleet, not as large as a guest wants).
#[derive(Debug)]
pub struct GuestLog {
    per_sec: f64,
    burst: f64,
    vms: Mutex<HashMap<String, Budget>>,
}

impl Default for GuestLog {
    fn default() -> Self {
        Self::new(LINES_PER_MINUTE, BURST)
    }
}

impl GuestLog {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            vms: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line about `vm` may be written now. `Some(n)`: yes, and `n` lines about it were
    /// suppressed before (say so); `None`: suppress it (it is counted).
    pub fn admit(&self, vm: &str) -> Option<u64> {
        self.admit_at(vm, Instant::now())
    }

    fn admit_at(&self, vm: &str, now: Instant) -> Option<u64> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let budget = vms.entry(vm.to_owned()).or_insert(Budget {
            tokens: self.burst,
            at: now,
            suppressed: 0,
        });
        let elapsed = now.saturating_duration_since(budget.at).as_secs_f64();
        budget.tokens = (budget.tokens + elapsed * self.per_sec).min(self.burst);
        budget.at = now;
        if budget.tokens >= 1.0 {
            budget.tokens -= 1.0;
            Some(std::mem::take(&mut budget.suppressed))
        } else {
            budget.suppressed = budget.suppressed.saturating_add(1);
            None
        }
    }

    /// Takes the counts of suppressed lines (VMs with none are left out), for a periodic
    /// summary.
    pub fn take_suppressed(&self) -> Vec<(String, u64)> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, u64)> = vms
            .iter_mut()
            .filter(|(_, b)| b.suppressed > 0)
            .map(|(vm, b)| (vm.clone(), std::mem::take(&mut b.suppressed)))
            .collect();
        out.sort();
        out
    }

    /// Writes one summary line per VM whose lines were suppressed since the last summary.
    pub fn summarise(&self) {
        for (vm, n) in self.take_suppressed() {
            log::warn!("{vm}: {n} more messages about this guest suppressed (log budget)");
        }
    }
}

/// `guest_log!(budget, vm, Level, "format", args…)`: logs the line if the VM's budget allows
/// (a level that is off costs no budget), preceded by how many lines were suppressed before it.
#[macro_export]
macro_rules! guest_log {
    ($budget:expr, $vm:expr, $level:expr, $($arg:tt)+) => {{
        let level = $level;
        if log::log_enabled!(level) {
            let vm: &str = $vm;
            if let Some(suppressed) = $budget.admit(vm) {
                if suppressed > 0 {
                    log::warn!("{vm}: {suppressed} more messages about this guest suppressed (log budget)");
                }
                log::log!(level, $($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_the_suppressed_are_counted() {
        let log = GuestLog::new(60, 3);
        let t0 = Instant::now();
        assert_eq!(log.admit_at("evil", t0), Some(0));
        assert_eq!(log.admit_at("evil", t0), Some(0));
        assert_eq!(log.admit_at("evil", t0), Some(0));
        assert_eq!(log.admit_at("evil", t0), None);
        assert_eq!(log.admit_at("evil", t0), None);
        // Another VM has its own budget.
        assert_eq!(log.admit_at("good", t0), Some(0));
        // One line a second comes back; the next admitted line reports the two suppressed.
        assert_eq!(log.admit_at("evil", t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(log.admit_at("evil", t0 + Duration::from_secs(1)), None);
        assert_eq!(log.take_suppressed(), vec![("evil".to_owned(), 1)]);
        assert!(log.take_suppressed().is_empty());
    }

    #[test]
    fn lines_over_a_minute_stay_within_burst_plus_rate() {
        let log = GuestLog::default();
        let t0 = Instant::now();
        let admitted = (0..60_000u64)
            .filter(|i| {
                log.admit_at("evil", t0 + Duration::from_millis(*i))
                    .is_some()
            })
            .count();
        assert!(
            admitted <= (BURST + LINES_PER_MINUTE) as usize,
            "{admitted}"
        );
        assert!(admitted >= LINES_PER_MINUTE as usize, "{admitted}");
    }
}
