//! Token buckets for rate limits given per minute, with bursts of a sixth of the minute's
//! allowance: the agent's storm limit on scans, the relay's per-VM limits on reports and on
//! bytes written to the sink.
//!
//! The two kinds differ on purpose, and are one type with two constructors:
//! - [`TokenBucket::per_minute`] counts whole events: one is allowed when a whole token is
//!   there, and takes it;
//! - [`TokenBucket::budget_per_minute`] meters amounts (bytes): a use is allowed while the
//!   budget is not in debt and is charged what it used, so one use larger than the burst still
//!   goes through and the next waits the debt off. Over any window T at most
//!   burst + T × rate + the largest single use passes.
//!
//! Time is passed in, as any instant type that adds durations and subtracts to one: `std`'s,
//! or tokio's (whose clock tests can pause and advance).

use std::{
    ops::{Add, Sub},
    time::{Duration, Instant},
};

/// What the bucket needs of an instant; `std::time::Instant` and `tokio::time::Instant` have it.
pub trait Moment:
    Copy + PartialOrd + Add<Duration, Output = Self> + Sub<Output = Duration>
{
}

impl<T> Moment for T where T: Copy + PartialOrd + Add<Duration, Output = T> + Sub<Output = Duration> {}

/// A token bucket over instants of type `I`.
#[derive(Clone, Debug)]
pub struct TokenBucket<I = Instant> {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    at: I,
    /// Tokens there must be for a use to be allowed: 1 (whole events) or 0 (a budget).
    needed: f64,
}

impl<I: Moment> TokenBucket<I> {
    /// `per_minute` events on average, bursts of up to a sixth of that (at least 1); `None`
    /// for 0, which means no limit. Starts full.
    pub fn per_minute(per_minute: u32, now: I) -> Option<Self> {
        (per_minute > 0).then(|| Self {
            capacity: f64::from((per_minute / 6).max(1)),
            per_sec: f64::from(per_minute) / 60.0,
            tokens: f64::from((per_minute / 6).max(1)),
            at: now,
            needed: 1.0,
        })
    }

    /// A budget of `per_minute` units (bytes) on average, bursts of a sixth of that (at least
    /// 1); `None` for 0, which means no limit. Starts full.
    pub fn budget_per_minute(per_minute: u64, now: I) -> Option<Self> {
        (per_minute > 0).then(|| {
            let capacity = (per_minute as f64 / 6.0).max(1.0);
            Self {
                capacity,
                per_sec: per_minute as f64 / 60.0,
                tokens: capacity,
                at: now,
                needed: 0.0,
            }
        })
    }

    /// Adds the tokens earned since the last refill, up to the burst.
    pub fn refill(&mut self, now: I) {
        let elapsed = if now > self.at {
            (now - self.at).as_secs_f64()
        } else {
            0.0
        };
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.at = now;
    }

    /// When a use will be allowed, as of the last refill (no later than that refill when it is
    /// allowed already).
    pub fn ready_at(&self) -> I {
        if self.tokens >= self.needed {
            self.at
        } else {
            self.at + Duration::from_secs_f64((self.needed - self.tokens) / self.per_sec)
        }
    }

    /// Refills, then tells how long until a use is allowed (zero: now).
    pub fn wait(&mut self, now: I) -> Duration {
        self.refill(now);
        if self.tokens >= self.needed {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((self.needed - self.tokens) / self.per_sec)
        }
    }

    /// Takes one token if a use is allowed now.
    pub fn take(&mut self, now: I) -> bool {
        if self.wait(now).is_zero() {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Refills, then charges `amount` whether or not it is covered (a budget goes into debt).
    pub fn charge(&mut self, amount: u64, now: I) {
        self.refill(now);
        self.tokens -= amount as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn zero_is_no_limit() {
        let now = Instant::now();
        assert!(TokenBucket::per_minute(0, now).is_none());
        assert!(TokenBucket::budget_per_minute(0, now).is_none());
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let now = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::per_minute(6, now).unwrap();
        assert!(b.take(now));
        assert!(!b.take(now - Duration::from_secs(5)));
        assert_eq!(
            b.wait(now - Duration::from_secs(5)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn events_burst_a_sixth_then_follow_the_rate() {
        let now = Instant::now();
        let mut b = TokenBucket::per_minute(60, now).unwrap();
        for n in 0..10 {
            assert!(b.take(now), "burst token {n}");
        }
        assert!(!b.take(now));
        assert_eq!(b.wait(now), SEC);
        assert_eq!(b.ready_at(), now + SEC);
        assert!(!b.take(now + SEC / 2));
        assert!(b.take(now + SEC));
        // A long pause refills the burst, not more.
        let later = now + Duration::from_secs(3600);
        let taken = (0..100).filter(|_| b.take(later)).count();
        assert_eq!(taken, 10);
    }

    #[test]
    fn small_rates_still_allow_one_and_ready_at_does_not_refill() {
        let now = Instant::now();
        let mut b = TokenBucket::per_minute(3, now).unwrap();
        assert_eq!(b.ready_at(), now);
        assert!(b.take(now));
        assert!(!b.take(now));
        assert_eq!(b.wait(now), Duration::from_secs(20));
        // Charging one token is what `take` does once it is allowed.
        let then = now + Duration::from_secs(20);
        b.refill(then);
        assert_eq!(b.ready_at(), then);
        b.charge(1, then);
        assert_eq!(b.ready_at(), then + Duration::from_secs(20));
    }

    #[test]
    fn a_budget_lets_a_large_use_through_and_waits_its_debt_off() {
        let now = Instant::now();
        // 600 per minute: 10 per second, a burst of 100.
        let mut b = TokenBucket::budget_per_minute(600, now).unwrap();
        assert!(b.wait(now).is_zero());
        b.charge(300, now);
        // 200 in debt at 10/s.
        assert_eq!(b.wait(now), Duration::from_secs(20));
        assert_eq!(
            b.wait(now + Duration::from_secs(10)),
            Duration::from_secs(10)
        );
        assert!(b.wait(now + Duration::from_secs(20)).is_zero());
        // Exactly out of tokens is still allowed: only debt holds a use back.
        let mut b = TokenBucket::budget_per_minute(600, now).unwrap();
        b.charge(100, now);
        assert!(b.wait(now).is_zero());
        // A tiny budget still has a burst of one unit.
        let mut b = TokenBucket::budget_per_minute(1, now).unwrap();
        b.charge(2, now);
        assert_eq!(b.wait(now), Duration::from_secs(60));
    }
}
