//! Delivery: the path from a received report to the sink, and the end-to-end acknowledgement.
//!
//! - A report whose content the sink already holds for that VM is a duplicate: acknowledged at
//!   once, nothing written.
//! - Otherwise it becomes the VM's entry in the payload cache (the newest report supersedes an
//!   older one) and is written to the sink; the guest is acknowledged only when the sink has it.
//! - Per-VM rate limits, in reports and in bytes written to the sink per minute: over either,
//!   the report stays cached and the guest is told to retry later (`Nack(RateLimited)` with
//!   retry-after); the relay delivers it itself when the limits allow. Nothing is dropped
//!   silently: without a cache, the guest keeps it and retransmits.
//! - A sink failure leaves the report cached; a retrier delivers it with capped exponential
//!   backoff, without waiting for the guest, whose retransmission is then a duplicate.
//! - Writes for one VM are serialised; different VMs never wait for each other. A VM has at
//!   most one report being decompressed and checked at a time (and `max_inflight` in all).
//! - The sink's health: failing for longer than `sink_unhealthy_after` makes `/healthz` say so.
//! - Each VM's latest inventory (`inventory.rs`): the base of its next delta report, and the
//!   "before" of the change event every write computes — under the VM's lock, against what
//!   the sink holds at that moment, so events chain exactly however reports were superseded.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use guestwatch_daemon::{backoff::Backoff, token_bucket::TokenBucket};
use guestwatch_protocol::{DEFAULT_MAX_REPORT_PAYLOAD, inventory::Document};

use crate::{
    cache::{Cache, Departure, PutOutcome},
    inventory::{Inventories, Latest},
    metrics::Metrics,
    sink::{Delivery, Sink, SinkError, event::Changes},
};

/// Tuning of delivery.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// Reports per minute per VM (0 = unlimited).
    pub reports_per_minute: u32,
    /// A sink write slower than this counts as failed.
    pub sink_timeout: Duration,
    /// First retry delay after a sink failure.
    pub retry_base: Duration,
    /// Cap of the retry delay.
    pub retry_max: Duration,
    /// Payload cache slots (0 disables the cache).
    pub cache_slots: usize,
    /// Payload cache TTL.
    pub cache_ttl: Duration,
    /// Reports decompressed, checked and delivered at once, over all VMs. Beyond it, sessions
    /// wait holding only the compressed frame: memory stays bounded however many guests send.
    pub max_inflight: usize,
    /// Bytes a VM may have written to the sink per minute (0 = unlimited).
    pub max_sink_bytes_per_minute: u64,
    /// The relay reports itself unhealthy once sink writes have been failing this long.
    pub sink_unhealthy_after: Duration,
    /// Memory for VMs' latest inventories (estimated bytes; beyond it they are read back from
    /// the sink when needed).
    pub inventory_cache_bytes: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            reports_per_minute: 60,
            sink_timeout: Duration::from_secs(15),
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            cache_slots: 100,
            cache_ttl: Duration::from_secs(4 * 3600),
            max_inflight: 32,
            max_sink_bytes_per_minute: 64 * 1024 * 1024,
            sink_unhealthy_after: Duration::from_secs(60),
            inventory_cache_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What the guest is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sink accepted the report.
    Delivered,
    /// The sink already had this content.
    Duplicate,
    /// Not delivered yet; retry after this long.
    Deferred {
        reason: Deferral,
        retry_after: Duration,
    },
}

/// Why a report was not delivered yet, with a detail for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deferral {
    RateLimited(String),
    SinkUnavailable(String),
}

impl Deferral {
    pub fn label(&self) -> &'static str {
        match self {
            Self::RateLimited(_) => "rate_limited",
            Self::SinkUnavailable(_) => "sink_unavailable",
        }
    }
}

/// Since when sink writes have been failing (none succeeded since), and the last error.
#[derive(Debug, Default)]
struct SinkHealth {
    failing_since: Option<Instant>,
    last_error: String,
}

#[derive(Debug)]
struct VmState {
    /// Content hash the sink holds for this VM (`None`: unknown yet or nothing).
    in_sink: Option<String>,
    /// Whether the sink was asked for its latest hash since the relay started.
    asked_sink: bool,
    /// The id of the last report written for this VM.
    last_report_id: Option<String>,
    /// Reports per minute: `None` when unlimited.
    bucket: Option<TokenBucket<Instant>>,
    /// Bytes per minute written to the sink: a write is allowed while the budget is not in
    /// debt and is charged what it wrote, so a report larger than the burst still goes through
    /// (the VM then waits the debt off); `None` when unlimited.
    bytes: Option<TokenBucket<Instant>>,
    /// One report of this VM is decompressed and checked at a time.
    validating: Arc<tokio::sync::Semaphore>,
    /// Sink failures in a row (its attempts) pacing the retries, and when the next is due.
    retries: Backoff,
    retry_at: Option<Instant>,
    /// Serialises writes for this VM.
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// The delivery engine shared by every connection.
pub struct Deliverer {
    sink: Sink,
    config: DeliveryConfig,
    cache: Mutex<Cache<Arc<Delivery>>>,
    vms: Mutex<HashMap<String, VmState>>,
    metrics: Metrics,
    wake: Notify,
    inflight: tokio::sync::Semaphore,
    health: Mutex<SinkHealth>,
    inventories: Mutex<Inventories>,
}

/// Permission to decompress, check and deliver one report (see [`Deliverer::slot`]).
pub struct Slot<'a> {
    _vm: Option<tokio::sync::OwnedSemaphorePermit>,
    _all: Option<tokio::sync::SemaphorePermit<'a>>,
}

fn content_key(hash_hex: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    if hex::decode_to_slice(hash_hex, &mut key).is_err() {
        // Not a SHA-256 (the guest's claim is malformed): key by the text itself.
        for (i, b) in hash_hex.bytes().enumerate() {
            key[i % 32] ^= b.rotate_left((i / 32) as u32);
        }
    }
    key
}

impl Deliverer {
    pub fn new(sink: Sink, config: DeliveryConfig, metrics: Metrics) -> Self {
        let inflight = tokio::sync::Semaphore::new(config.max_inflight.max(1));
        metrics.cache_slots_capacity.set(config.cache_slots as i64);
        Self {
            sink,
            cache: Mutex::new(Cache::new(config.cache_slots, config.cache_ttl)),
            vms: Mutex::new(HashMap::new()),
            metrics,
            wake: Notify::new(),
            inflight,
            health: Mutex::new(SinkHealth::default()),
            inventories: Mutex::new(Inventories::new(config.inventory_cache_bytes)),
            config,
        }
    }

    /// Waits for a delivery slot of `vm` (one at a time per VM, `max_inflight` in all); hold
    /// it while the report is decompressed, checked and submitted. The VM's own turn comes
    /// first, so a VM waiting for itself holds none of the shared slots.
    pub async fn slot(&self, vm: &str) -> Slot<'_> {
        let own = self.with_vm(vm, |s| s.validating.clone());
        let vm_permit = own.acquire_owned().await.ok();
        Slot {
            _vm: vm_permit,
            _all: self.inflight.acquire().await.ok(),
        }
    }

    /// `Err(reason)` once sink writes have been failing for longer than
    /// `sink_unhealthy_after` (for `/healthz`).
    pub fn health(&self) -> Result<(), String> {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match health.failing_since {
            Some(since) if since.elapsed() >= self.config.sink_unhealthy_after => Err(format!(
                "sink {} failing for {}s: {}",
                self.sink.describe(),
                since.elapsed().as_secs(),
                health.last_error
            )),
            _ => Ok(()),
        }
    }

    fn sink_result(&self, error: Option<&SinkError>) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match error {
            None => health.failing_since = None,
            Some(e) => {
                health.failing_since.get_or_insert_with(Instant::now);
                health.last_error = e.to_string();
            }
        }
    }

    pub fn sink(&self) -> &Sink {
        &self.sink
    }

    fn with_vm<R>(&self, vm: &str, f: impl FnOnce(&mut VmState) -> R) -> R {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let state = vms.entry(vm.to_owned()).or_insert_with(|| VmState {
            in_sink: None,
            asked_sink: false,
            last_report_id: None,
            bucket: TokenBucket::per_minute(self.config.reports_per_minute, Instant::now()),
            bytes: TokenBucket::budget_per_minute(
                self.config.max_sink_bytes_per_minute,
                Instant::now(),
            ),
            validating: Arc::new(tokio::sync::Semaphore::new(1)),
            retries: Backoff::new(self.config.retry_base, self.config.retry_max),
            retry_at: None,
            lock: Arc::new(tokio::sync::Mutex::new(())),
        });
        f(state)
    }

    fn inventories<R>(&self, f: impl FnOnce(&mut Inventories) -> R) -> R {
        let mut inventories = self.inventories.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut inventories);
        self.metrics.inventories_held.set(inventories.len() as i64);
        self.metrics.inventory_bytes.set(inventories.used() as i64);
        r
    }

    /// The VM's latest inventory in the sink: from memory, else read back from the sink (once
    /// per VM after a start, or after it was evicted). `None`: the sink has none (or cannot
    /// give it back: an HTTP sink, a report from a version-1 agent, a damaged copy).
    pub async fn latest_inventory(&self, vm: &str) -> Option<Latest> {
        if let Some(latest) = self.inventories(|i| i.get(vm)) {
            return Some(latest);
        }
        let stored = match self.sink.latest_inventory(vm).await {
            Ok(stored) => stored?,
            Err(e) => {
                log::warn!("reading the latest inventory of {vm} from the sink: {e}");
                return None;
            }
        };
        let decoded = tokio::task::spawn_blocking(move || {
            let bytes = stored
                .payload
                .to_document(DEFAULT_MAX_REPORT_PAYLOAD)
                .ok()?;
            let document = Document::from_bytes(&bytes).ok()?;
            // The copy must be what its label says, or it is no base at all.
            (document.content_hash() == stored.content_hash).then(|| Latest {
                report_id: stored.report_id,
                content_hash: stored.content_hash,
                document: Arc::new(document),
            })
        })
        .await
        .ok()
        .flatten();
        self.metrics
            .inventory_reads
            .get_or_create(&crate::metrics::LookupResult {
                result: if decoded.is_some() {
                    "read"
                } else {
                    "unusable"
                }
                .to_owned(),
            })
            .inc();
        let latest = decoded?;
        self.inventories(|i| i.put(vm, latest.clone()));
        Some(latest)
    }

    fn cache<R>(&self, f: impl FnOnce(&mut Cache<Arc<Delivery>>) -> R) -> R {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut cache);
        self.metrics.cache_slots_used.set(cache.len() as i64);
        r
    }

    fn departed(&self, departure: &Departure) {
        self.metrics
            .cache_residency_seconds
            .observe(departure.residency.as_secs_f64());
        self.metrics
            .cache_lifetime_seconds
            .observe(departure.lifetime.as_secs_f64());
    }

    /// Whether the sink already holds `hash` for `vm` (asks the sink once per VM, then
    /// remembers what it wrote).
    async fn sink_has(&self, vm: &str, hash: &str) -> bool {
        let (known, asked) = self.with_vm(vm, |s| (s.in_sink.clone(), s.asked_sink));
        if known.as_deref() == Some(hash) {
            return true;
        }
        if asked {
            return false;
        }
        match self.sink.latest_hash(vm).await {
            Ok(latest) => {
                self.with_vm(vm, |s| {
                    s.asked_sink = true;
                    if s.in_sink.is_none() {
                        s.in_sink = latest.clone();
                    }
                });
                latest.as_deref() == Some(hash)
            }
            // Unknown: deliver again; the sink's own idempotency (report id) makes it harmless.
            Err(_) => false,
        }
    }

    /// Whether the sink already has this report: the same content for the VM — except for tamper
    /// reports, which are delivered even when the package set is unchanged (the event is the
    /// news), and are duplicates only as retransmissions of the same report id.
    async fn already_delivered(&self, delivery: &Delivery) -> bool {
        if delivery.trigger.kind == guestwatch_protocol::TriggerKind::Tamper {
            return self.with_vm(&delivery.vm, |s| {
                s.last_report_id.as_deref() == Some(delivery.report_id.as_str())
            });
        }
        self.sink_has(&delivery.vm, &delivery.content_hash).await
    }

    /// Handles one report from a guest; returns what to answer.
    pub async fn submit(&self, delivery: Delivery) -> Outcome {
        self.metrics.reports_received.inc();
        let vm = delivery.vm.clone();
        let lock = self.with_vm(&vm, |s| s.lock.clone());
        let _serial = lock.lock().await;
        let now = Instant::now();
        let key = content_key(&delivery.content_hash);

        if self.already_delivered(&delivery).await {
            if let Some(d) = self.cache(|c| c.confirm(&vm, &key, now)) {
                self.departed(&d);
            }
            self.metrics.reports_duplicate.inc();
            return Outcome::Duplicate;
        }
        let delivery = Arc::new(delivery);
        let put = self.cache(|c| c.put(&vm, key, delivery.clone(), now));
        let result = if put == PutOutcome::Unchanged {
            "hit"
        } else {
            "miss"
        };
        self.metrics
            .cache_lookups
            .get_or_create(&crate::metrics::LookupResult {
                result: result.to_owned(),
            })
            .inc();
        if let PutOutcome::Inserted {
            evicted: Some(other),
        } = &put
        {
            log::warn!(
                "payload cache full: dropped the undelivered report of {other} (its guest will retransmit)"
            );
            Metrics::reason(&self.metrics.cache_evictions, "evicted");
        }

        // A VM whose sink writes are failing waits for its retry slot (the retrier has it).
        if let Some(at) = self.with_vm(&vm, |s| s.retry_at).filter(|at| *at > now) {
            return self.defer(Deferral::SinkUnavailable("retrying".into()), at - now);
        }
        let limited = self.with_vm(&vm, |s| {
            // Bytes first: a report held back by its bytes does not use up a report token.
            if let Some(b) = s.bytes.as_mut() {
                let wait = b.wait(now);
                if !wait.is_zero() {
                    return Some((wait, self.bytes_detail()));
                }
            }
            let b = s.bucket.as_mut()?;
            if b.take(now) {
                None
            } else {
                Some((b.wait(now), self.reports_detail()))
            }
        });
        if let Some((wait, why)) = limited {
            self.wake.notify_one();
            return self.defer(Deferral::RateLimited(why), wait);
        }
        match self.write(&delivery).await {
            Ok(()) => Outcome::Delivered,
            Err(e) => {
                let retry_after = self.failed(&vm, &e);
                self.defer(Deferral::SinkUnavailable(e.to_string()), retry_after)
            }
        }
    }

    fn bytes_detail(&self) -> String {
        format!(
            "over {} sink bytes per minute; {}",
            self.config.max_sink_bytes_per_minute,
            self.kept()
        )
    }

    fn reports_detail(&self) -> String {
        format!(
            "over {} reports per minute; {}",
            self.config.reports_per_minute,
            self.kept()
        )
    }

    fn kept(&self) -> &'static str {
        if self.config.cache_slots == 0 {
            "send it again later"
        } else {
            "the relay keeps the newest report and delivers it"
        }
    }

    fn defer(&self, reason: Deferral, retry_after: Duration) -> Outcome {
        Metrics::reason(&self.metrics.reports_deferred, reason.label());
        Outcome::Deferred {
            reason,
            retry_after: retry_after.max(Duration::from_millis(100)),
        }
    }

    /// Records a sink failure and schedules the retrier; returns the retry delay.
    fn failed(&self, vm: &str, error: &SinkError) -> Duration {
        Metrics::reason(&self.metrics.sink_errors, error.kind());
        self.sink_result(Some(error));
        log::warn!("sink refused the report of {vm}: {error}");
        let delay = self.with_vm(vm, |s| {
            let jittered = s.retries.next_delay();
            let delay = error
                .retry_after()
                .map_or(jittered, |hint| hint.max(jittered));
            s.retry_at = Some(Instant::now() + delay);
            delay
        });
        self.wake.notify_one();
        delay
    }

    /// What `delivery` changes in the VM's inventory (caller holds the VM's lock).
    async fn changes_of(&self, delivery: &Delivery) -> Changes {
        if delivery.document.is_none() {
            return Changes::default();
        }
        let before = self.latest_inventory(&delivery.vm).await;
        let for_task = delivery.clone();
        // Proportional to the inventories when the report came whole: off the async workers.
        tokio::task::spawn_blocking(move || Changes::compute(before.as_ref(), &for_task))
            .await
            .unwrap_or_default()
    }

    /// Writes to the sink (caller holds the VM's lock).
    async fn write(&self, delivery: &Delivery) -> Result<(), SinkError> {
        let started = Instant::now();
        let changes = self.changes_of(delivery).await;
        let written = tokio::time::timeout(
            self.config.sink_timeout,
            self.sink.deliver(delivery, &changes),
        )
        .await
        .unwrap_or_else(|_| {
            Err(SinkError::Http(format!(
                "sink timed out after {:?}",
                self.config.sink_timeout
            )))
        });
        let bytes = written?;
        self.sink_result(None);
        self.metrics.sink_bytes.inc_by(bytes);
        self.metrics
            .sink_latency_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.reports_delivered.inc();
        if let Some(scanned) = delivery.scanned_at
            && let Ok(age) = SystemTime::now().duration_since(scanned)
        {
            self.metrics.e2e_latency_seconds.observe(age.as_secs_f64());
        }
        let key = content_key(&delivery.content_hash);
        if let Some(d) = self.cache(|c| c.confirm(&delivery.vm, &key, Instant::now())) {
            self.departed(&d);
        }
        match (
            &delivery.document,
            guestwatch_protocol::ContentHash::from_hex(&delivery.content_hash),
        ) {
            (Some(document), Some(content_hash)) => {
                let latest = Latest {
                    report_id: delivery.report_id.clone(),
                    content_hash,
                    document: document.clone(),
                };
                self.inventories(|i| i.put(&delivery.vm, latest));
            }
            _ => self.inventories(|i| i.forget(&delivery.vm)),
        }
        self.with_vm(&delivery.vm, |s| {
            s.in_sink = Some(delivery.content_hash.clone());
            s.last_report_id = Some(delivery.report_id.clone());
            s.retries.reset();
            s.retry_at = None;
            if let Some(b) = s.bytes.as_mut() {
                b.charge(bytes, Instant::now());
            }
        });
        log::info!(
            "delivered {} report {} ({} packages) to {}",
            delivery.vm,
            delivery.report_id,
            delivery.package_count,
            self.sink.describe()
        );
        Ok(())
    }

    /// When the cached report of `vm` may be attempted next.
    fn due_at(&self, vm: &str, now: Instant) -> Instant {
        self.with_vm(vm, |s| {
            let retry = s.retry_at.unwrap_or(now);
            // A retry after a sink failure is paced by backoff alone; the rate limit applies to
            // first attempts.
            let rate = if s.retries.attempts() > 0 {
                now
            } else {
                s.bucket.as_mut().map_or(now, |b| now + b.wait(now))
            };
            let bytes = s.bytes.as_mut().map_or(now, |b| now + b.wait(now));
            retry.max(rate).max(bytes)
        })
    }

    /// Delivers cached reports on the relay's own schedule, until `stop`.
    pub async fn run_retrier(&self, stop: CancellationToken) {
        loop {
            let now = Instant::now();
            let vms = self.cache(|c| c.vms(now));
            let mut next: Option<Instant> = None;
            for vm in vms {
                let due = self.due_at(&vm, now);
                if due > now {
                    next = Some(next.map_or(due, |n: Instant| n.min(due)));
                    continue;
                }
                self.retry(&vm).await;
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = sleep => {}
            }
        }
    }

    async fn retry(&self, vm: &str) {
        let lock = self.with_vm(vm, |s| s.lock.clone());
        let _serial = lock.lock().await;
        let now = Instant::now();
        let Some(delivery) = self.cache(|c| c.get(vm, now).map(|e| e.value.clone())) else {
            return;
        };
        if self.already_delivered(&delivery).await {
            let key = content_key(&delivery.content_hash);
            if let Some(d) = self.cache(|c| c.confirm(vm, &key, now)) {
                self.departed(&d);
            }
            return;
        }
        if self.with_vm(vm, |s| {
            s.bytes.as_mut().is_some_and(|b| !b.wait(now).is_zero())
        }) {
            return;
        }
        let first_attempt = self.with_vm(vm, |s| s.retries.attempts() == 0);
        if first_attempt && !self.with_vm(vm, |s| s.bucket.as_mut().is_none_or(|b| b.take(now))) {
            return;
        }
        if let Err(e) = self.write(&delivery).await {
            self.failed(vm, &e);
        }
    }

    /// Removes expired cache entries every TTL/2, until `stop`.
    pub async fn run_sweeper(&self, stop: CancellationToken) {
        let every = self.cache(|c| c.sweep_interval());
        let mut interval = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = interval.tick() => {
                    for (vm, d) in self.cache(|c| c.sweep(Instant::now())) {
                        log::warn!("report of {vm} expired undelivered after {:?} (its guest will retransmit)", d.lifetime);
                        Metrics::reason(&self.metrics.cache_evictions, "expired");
                        self.departed(&d);
                    }
                }
            }
        }
    }

    /// Cached reports not yet delivered (for shutdown logging and tests).
    pub fn undelivered(&self) -> usize {
        self.cache(|c| c.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{dir::DirSink, tests::delivery};

    async fn deliverer(dir: &std::path::Path, config: DeliveryConfig) -> Arc<Deliverer> {
        let sink = Sink::Dir(DirSink::open(dir.to_path_buf()).await.unwrap());
        Arc::new(Deliverer::new(sink, config, Metrics::new()))
    }

    fn hash(n: u32) -> String {
        format!("{n:064x}")
    }

    fn deliveries(dir: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("deliveries.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn delivered_then_duplicate_and_known_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let d = deliverer(dir.path(), DeliveryConfig::default()).await;
        assert_eq!(
            d.submit(delivery("vm1", 1, &hash(1))).await,
            Outcome::Delivered
        );
        assert_eq!(
            d.submit(delivery("vm1", 1, &hash(1))).await,
            Outcome::Duplicate
        );
        assert_eq!(deliveries(dir.path()).len(), 1);
        assert_eq!(d.undelivered(), 0);
        // A new relay over the same sink recognises the retransmission.
        let d2 = deliverer(dir.path(), DeliveryConfig::default()).await;
        assert_eq!(
            d2.submit(delivery("vm1", 1, &hash(1))).await,
            Outcome::Duplicate
        );
        assert_eq!(
            d2.submit(delivery("vm1", 2, &hash(2))).await,
            Outcome::Delivered
        );
        assert_eq!(deliveries(dir.path()).len(), 2);
    }

    #[tokio::test]
    async fn rate_limited_reports_are_kept_and_the_newest_delivered_later() {
        let dir = tempfile::tempdir().unwrap();
        let config = DeliveryConfig {
            reports_per_minute: 120,
            ..DeliveryConfig::default()
        };
        let d = deliverer(dir.path(), config).await;
        let stop = CancellationToken::new();
        let retrier = tokio::spawn({
            let d = d.clone();
            let stop = stop.clone();
            async move { d.run_retrier(stop).await }
        });
        let mut deferred = 0;
        for n in 1..=25 {
            match d.submit(delivery("vm1", u64::from(n), &hash(n))).await {
                Outcome::Delivered => {}
                Outcome::Deferred {
                    reason: Deferral::RateLimited(_),
                    retry_after,
                } => {
                    assert!(retry_after <= Duration::from_secs(1));
                    deferred += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(deferred >= 4, "the burst is 20: {deferred} deferred");
        // The newest report is delivered by the relay itself.
        eventually("the newest report in the sink", || {
            deliveries(dir.path())
                .last()
                .is_some_and(|l| l["content_hash"] == hash(25))
        })
        .await;
        // ...and the guest's retransmission of it is a duplicate.
        assert_eq!(
            d.submit(delivery("vm1", 25, &hash(25))).await,
            Outcome::Duplicate
        );
        stop.cancel();
        retrier.await.unwrap();
    }

    #[tokio::test]
    async fn sink_failure_is_retried_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let config = DeliveryConfig {
            retry_base: Duration::from_millis(50),
            ..DeliveryConfig::default()
        };
        let d = deliverer(dir.path(), config).await;
        let stop = CancellationToken::new();
        tokio::spawn({
            let d = d.clone();
            let stop = stop.clone();
            async move { d.run_retrier(stop).await }
        });
        // A real I/O failure: the VM's directory is a file.
        let blocker = dir.path().join("vms/vm1");
        std::fs::write(&blocker, b"in the way").unwrap();
        match d.submit(delivery("vm1", 1, &hash(1))).await {
            Outcome::Deferred {
                reason: Deferral::SinkUnavailable(_),
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(d.undelivered(), 1);
        // Another VM is not held up.
        assert_eq!(
            d.submit(delivery("vm2", 1, &hash(7))).await,
            Outcome::Delivered
        );
        std::fs::remove_file(&blocker).unwrap();
        eventually("the retrier to deliver", || d.undelivered() == 0).await;
        assert_eq!(
            d.submit(delivery("vm1", 1, &hash(1))).await,
            Outcome::Duplicate
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn without_cache_deferred_reports_stay_with_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let config = DeliveryConfig {
            cache_slots: 0,
            ..DeliveryConfig::default()
        };
        let d = deliverer(dir.path(), config).await;
        std::fs::write(dir.path().join("vms/vm1"), b"x").unwrap();
        assert!(matches!(
            d.submit(delivery("vm1", 1, &hash(1))).await,
            Outcome::Deferred { .. }
        ));
        assert_eq!(d.undelivered(), 0);
    }

    /// Bytes one delivery of `delivery(vm, n, hash)` writes to the dir sink.
    async fn bytes_of_one(vm: &str) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let sink = DirSink::open(dir.path().to_path_buf()).await.unwrap();
        sink.deliver(&delivery(vm, 1, &hash(1)), &Default::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn over_its_sink_bytes_a_vm_is_deferred_and_its_newest_report_delivered_later() {
        let one = bytes_of_one("vm1").await;
        let dir = tempfile::tempdir().unwrap();
        // A burst of 1.5 reports' bytes, refilled at 0.15 reports' bytes a second: the second
        // delivery puts the budget 0.5 reports in debt, which takes over 3 s to pay off.
        let per_minute = one * 9;
        let config = DeliveryConfig {
            reports_per_minute: 0,
            max_sink_bytes_per_minute: per_minute,
            ..DeliveryConfig::default()
        };
        let d = deliverer(dir.path(), config).await;
        let mut outcomes = Vec::new();
        for n in 1..=5 {
            outcomes.push(d.submit(delivery("vm1", u64::from(n), &hash(n))).await);
        }
        // The budget is not in debt for the first two (the second goes into debt).
        assert!(
            outcomes[..2].iter().all(|o| *o == Outcome::Delivered),
            "{outcomes:?}"
        );
        for deferred in &outcomes[2..] {
            match deferred {
                Outcome::Deferred {
                    reason: Deferral::RateLimited(why),
                    retry_after,
                } => {
                    assert!(why.contains("sink bytes per minute"), "{why}");
                    assert!(*retry_after > Duration::ZERO);
                }
                other => panic!("{other:?}"),
            }
        }
        // Another VM has its own budget.
        assert_eq!(
            d.submit(delivery("vm2", 1, &hash(9))).await,
            Outcome::Delivered
        );
        // The newest of vm1's is kept and delivered by the relay itself once the budget allows.
        assert_eq!(d.undelivered(), 1);
        let stop = CancellationToken::new();
        tokio::spawn({
            let d = d.clone();
            let stop = stop.clone();
            async move { d.run_retrier(stop).await }
        });
        eventually("the newest report in the sink", || {
            deliveries(dir.path())
                .last()
                .is_some_and(|l| l["content_hash"] == hash(5))
        })
        .await;
        assert_eq!(
            deliveries(dir.path()).len(),
            4,
            "reports 3 and 4 were superseded"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn health_turns_bad_after_failing_for_the_threshold_and_good_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let config = DeliveryConfig {
            retry_base: Duration::from_millis(20),
            retry_max: Duration::from_millis(50),
            sink_unhealthy_after: Duration::from_millis(200),
            ..DeliveryConfig::default()
        };
        let d = deliverer(dir.path(), config).await;
        assert_eq!(d.health(), Ok(()));
        let blocker = dir.path().join("vms/vm1");
        std::fs::write(&blocker, b"in the way").unwrap();
        assert!(matches!(
            d.submit(delivery("vm1", 1, &hash(1))).await,
            Outcome::Deferred { .. }
        ));
        assert_eq!(d.health(), Ok(()), "one failure is not yet unhealthy");
        let stop = CancellationToken::new();
        tokio::spawn({
            let d = d.clone();
            let stop = stop.clone();
            async move { d.run_retrier(stop).await }
        });
        eventually("unhealthy", || d.health().is_err()).await;
        let why = d.health().unwrap_err();
        assert!(
            why.contains("failing for") && why.contains("vms/vm1"),
            "{why}"
        );
        std::fs::remove_file(&blocker).unwrap();
        eventually("the retrier to deliver", || d.undelivered() == 0).await;
        assert_eq!(d.health(), Ok(()));
        stop.cancel();
    }
}
