//! Capped exponential backoff with jitter: retries never busy-loop, and a fleet of agents that
//! lost their relay at the same moment does not come back in lockstep. The agent paces
//! reconnects, retransmissions and listener rebinds with it; the relay its redials of pulled
//! VMs and its retries of a failing sink.

use std::time::Duration;

/// Backoff state for one kind of retry (reconnect, retransmit, redial, sink write).
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays start at `base` and grow to `cap` (a cap below `base` is raised to it).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The next delay: base·2ⁿ capped, then a uniformly random point in its upper half.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exp.min(self.cap);
        let half = ceiling / 2;
        half + Duration::from_nanos(fastrand::u64(
            0..=half.as_nanos().min(u128::from(u64::MAX)) as u64,
        ))
    }

    /// Success: start again from the base delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delays handed out since the last reset: the failures in a row.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last_ceiling = Duration::ZERO;
        for n in 0..30 {
            let d = b.next_delay();
            let ceiling = (Duration::from_millis(100) * 2u32.saturating_pow(n.min(20)))
                .min(Duration::from_secs(5));
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "attempt {n}: {d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            assert!(ceiling >= last_ceiling);
            last_ceiling = ceiling;
        }
        assert_eq!(last_ceiling, Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn counts_attempts_and_never_goes_below_the_base() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.attempts(), 0);
        for _ in 0..3 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        assert_eq!(b.attempts(), 3);
        b.reset();
        assert_eq!(b.attempts(), 0);
        // Long past the last doubling (and past what a shift could hold), the delay stays at
        // the cap: no overflow, no shrinking.
        let cap = Duration::from_secs(1000);
        let mut b = Backoff::new(Duration::from_millis(1), cap);
        for _ in 0..100 {
            b.next_delay();
        }
        let d = b.next_delay();
        assert!(d >= cap / 2 && d <= cap, "{d:?}");
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            b.next_delay();
            seen.insert(b.next_delay().as_millis());
        }
        assert!(seen.len() > 10, "delays should differ between agents");
    }
}
