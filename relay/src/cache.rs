//! The payload cache: one slot per VM holding the newest report the sink has not confirmed, so
//! the relay can retry the sink on its own, without waiting for the guest.
//!
//! Rules (see DESIGN.md, "Delivery guarantees"):
//! - `slots` entries at most (default 100); `slots = 0` disables caching;
//! - when full, the least-recently-*updated* entry is evicted;
//! - storing a payload identical to the cached one does not refresh the entry;
//! - an entry is removed when the sink confirms it;
//! - entries older than the TTL (default 4 h) are never served, and a sweep removes them
//!   (the relay runs it every TTL/2).
//!
//! The cache has its own lock (callers wrap it in a `Mutex`; no await happens under it) and
//! takes the current time as an argument, so every rule is tested exactly.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

/// One cached report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<V> {
    pub value: V,
    /// Identifies the payload (the report's content hash): equal keys mean identical payloads.
    pub content_key: [u8; 32],
    /// When the entry was first stored.
    pub created: Instant,
    /// When its payload last changed.
    pub updated: Instant,
}

/// What [`Cache::put`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new entry (possibly evicting another VM's, named here).
    Inserted { evicted: Option<String> },
    /// The VM's entry now holds the new payload.
    Replaced,
    /// The same payload was already cached; the entry was left as it was.
    Unchanged,
    /// Caching is disabled (slots = 0).
    Disabled,
}

/// How an entry left the cache, for the residency/lifetime metrics.
#[derive(Debug, PartialEq, Eq)]
pub struct Departure {
    /// Time since the entry was created.
    pub lifetime: Duration,
    /// Time since it was last updated.
    pub residency: Duration,
}

/// The cache, keyed by VM name.
#[derive(Debug)]
pub struct Cache<V> {
    slots: usize,
    ttl: Duration,
    entries: HashMap<String, Entry<V>>,
}

impl<V> Cache<V> {
    pub fn new(slots: usize, ttl: Duration) -> Self {
        Self {
            slots,
            ttl,
            entries: HashMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often the sweep should run.
    pub fn sweep_interval(&self) -> Duration {
        (self.ttl / 2).max(Duration::from_secs(1))
    }

    fn expired(&self, entry: &Entry<V>, now: Instant) -> bool {
        now.saturating_duration_since(entry.updated) >= self.ttl
    }

    /// Stores `value` as `vm`'s newest report.
    pub fn put(&mut self, vm: &str, content_key: [u8; 32], value: V, now: Instant) -> PutOutcome {
        if self.slots == 0 {
            return PutOutcome::Disabled;
        }
        if let Some(existing) = self.entries.get(vm)
            && !self.expired(existing, now)
        {
            if existing.content_key == content_key {
                return PutOutcome::Unchanged;
            }
            if let Some(entry) = self.entries.get_mut(vm) {
                entry.value = value;
                entry.content_key = content_key;
                entry.updated = now;
            }
            return PutOutcome::Replaced;
        }
        // Either new, or expired (an expired entry is replaced as if absent).
        self.entries.remove(vm);
        let evicted = if self.entries.len() >= self.slots {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(name, e)| (e.updated, (*name).clone()))
                .map(|(name, _)| name.clone());
            if let Some(name) = &oldest {
                self.entries.remove(name);
            }
            oldest
        } else {
            None
        };
        self.entries.insert(
            vm.to_owned(),
            Entry {
                value,
                content_key,
                created: now,
                updated: now,
            },
        );
        PutOutcome::Inserted { evicted }
    }

    /// The VM's cached report, unless it expired (expired entries are never served).
    pub fn get(&self, vm: &str, now: Instant) -> Option<&Entry<V>> {
        self.entries.get(vm).filter(|e| !self.expired(e, now))
    }

    /// Removes the VM's entry if it still holds `content_key` (the sink confirmed that payload;
    /// a newer one that arrived meanwhile stays).
    pub fn confirm(&mut self, vm: &str, content_key: &[u8; 32], now: Instant) -> Option<Departure> {
        if self
            .entries
            .get(vm)
            .is_some_and(|e| &e.content_key == content_key)
        {
            return self.entries.remove(vm).map(|e| departure(&e, now));
        }
        None
    }

    /// Removes every expired entry; returns the VMs whose reports were dropped, with their ages.
    pub fn sweep(&mut self, now: Instant) -> Vec<(String, Departure)> {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| self.expired(e, now))
            .map(|(name, _)| name.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|name| {
                self.entries
                    .remove(&name)
                    .map(|e| (name, departure(&e, now)))
            })
            .collect()
    }

    /// VMs with a live entry, oldest update first (the order the retrier serves them in).
    pub fn vms(&self, now: Instant) -> Vec<String> {
        let mut live: Vec<(&String, &Entry<V>)> = self
            .entries
            .iter()
            .filter(|(_, e)| !self.expired(e, now))
            .collect();
        live.sort_by_key(|(name, e)| (e.updated, (*name).clone()));
        live.into_iter().map(|(name, _)| name.clone()).collect()
    }
}

fn departure<V>(entry: &Entry<V>, now: Instant) -> Departure {
    Departure {
        lifetime: now.saturating_duration_since(entry.created),
        residency: now.saturating_duration_since(entry.updated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(4 * 3600);

    fn key(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn least_recently_updated_is_evicted() {
        let t0 = Instant::now();
        let mut c = Cache::new(2, TTL);
        assert_eq!(
            c.put("a", key(1), "a1", t0),
            PutOutcome::Inserted { evicted: None }
        );
        assert_eq!(
            c.put("b", key(2), "b1", t0 + Duration::from_secs(1)),
            PutOutcome::Inserted { evicted: None }
        );
        // Updating a makes b the least recently updated.
        assert_eq!(
            c.put("a", key(3), "a2", t0 + Duration::from_secs(2)),
            PutOutcome::Replaced
        );
        assert_eq!(
            c.put("c", key(4), "c1", t0 + Duration::from_secs(3)),
            PutOutcome::Inserted {
                evicted: Some("b".into())
            }
        );
        assert_eq!(c.len(), 2);
        assert_eq!(
            c.get("a", t0 + Duration::from_secs(3)).map(|e| e.value),
            Some("a2")
        );
        assert!(c.get("b", t0 + Duration::from_secs(3)).is_none());
    }

    #[test]
    fn identical_payload_does_not_refresh() {
        let t0 = Instant::now();
        let mut c = Cache::new(2, TTL);
        c.put("a", key(1), "a1", t0);
        c.put("b", key(2), "b1", t0 + Duration::from_secs(1));
        // a retransmits the same payload later: still the least recently updated.
        assert_eq!(
            c.put("a", key(1), "a1", t0 + Duration::from_secs(5)),
            PutOutcome::Unchanged
        );
        assert_eq!(c.get("a", t0 + Duration::from_secs(5)).unwrap().updated, t0);
        assert_eq!(
            c.put("c", key(3), "c1", t0 + Duration::from_secs(6)),
            PutOutcome::Inserted {
                evicted: Some("a".into())
            }
        );
        // And it does not extend the TTL either.
        let mut c = Cache::new(2, TTL);
        c.put("a", key(1), "a1", t0);
        c.put("a", key(1), "a1", t0 + TTL - Duration::from_secs(1));
        assert!(c.get("a", t0 + TTL).is_none());
    }

    #[test]
    fn expired_entries_are_never_served_and_swept() {
        let t0 = Instant::now();
        let mut c = Cache::new(10, TTL);
        c.put("a", key(1), "a1", t0);
        c.put("b", key(2), "b1", t0 + Duration::from_secs(3600));
        assert!(c.get("a", t0 + TTL - Duration::from_millis(1)).is_some());
        assert!(
            c.get("a", t0 + TTL).is_none(),
            "expired entries are never served"
        );
        assert_eq!(c.vms(t0 + TTL), vec!["b".to_owned()]);
        let swept = c.sweep(t0 + TTL);
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].0, "a");
        assert_eq!(swept[0].1.lifetime, TTL);
        assert_eq!(c.len(), 1);
        assert_eq!(c.sweep_interval(), TTL / 2);
        // An expired entry is replaced as new, not "unchanged".
        assert_eq!(
            c.put("b", key(2), "b1", t0 + Duration::from_secs(3600) + TTL),
            PutOutcome::Inserted { evicted: None }
        );
    }

    #[test]
    fn confirmation_removes_only_the_confirmed_payload() {
        let t0 = Instant::now();
        let mut c = Cache::new(10, TTL);
        c.put("a", key(1), "a1", t0);
        c.put("a", key(2), "a2", t0 + Duration::from_secs(10));
        // The sink confirms the old payload: the newer one must stay for delivery.
        assert_eq!(c.confirm("a", &key(1), t0 + Duration::from_secs(11)), None);
        assert!(c.get("a", t0 + Duration::from_secs(11)).is_some());
        let gone = c
            .confirm("a", &key(2), t0 + Duration::from_secs(12))
            .unwrap();
        assert_eq!(
            gone,
            Departure {
                lifetime: Duration::from_secs(12),
                residency: Duration::from_secs(2)
            }
        );
        assert!(c.is_empty());
    }

    #[test]
    fn zero_slots_disables() {
        let mut c: Cache<&str> = Cache::new(0, TTL);
        assert_eq!(
            c.put("a", key(1), "a1", Instant::now()),
            PutOutcome::Disabled
        );
        assert!(c.is_empty());
        assert!(c.get("a", Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn works_with_the_runtime_clock() {
        let mut c = Cache::new(1, Duration::from_secs(60));
        c.put("a", key(1), 1, Instant::now());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(c.get("a", Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(c.get("a", Instant::now()).is_none());
        assert_eq!(c.sweep(Instant::now()).len(), 1);
    }
}
