//! The relay's Prometheus metrics. No per-VM labels: a fleet's size must not become the
//! metrics' cardinality.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupResult {
    pub result: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Mutex<Registry>>,
    pub cache_slots_used: Gauge,
    pub cache_slots_capacity: Gauge,
    pub cache_residency_seconds: Histogram,
    pub cache_lifetime_seconds: Histogram,
    pub cache_lookups: Family<LookupResult, Counter>,
    pub cache_evictions: Family<Reason, Counter>,
    pub inventories_held: Gauge,
    pub inventory_bytes: Gauge,
    pub inventory_reads: Family<LookupResult, Counter>,
    pub reports_delta: Family<LookupResult, Counter>,
    pub reports_received: Counter,
    pub reports_delivered: Counter,
    pub reports_duplicate: Counter,
    pub reports_deferred: Family<Reason, Counter>,
    pub reports_rejected: Family<Reason, Counter>,
    pub sink_latency_seconds: Histogram,
    pub sink_errors: Family<Reason, Counter>,
    pub connections: Gauge,
    pub connections_rejected: Family<Reason, Counter>,
    pub e2e_latency_seconds: Histogram,
    pub reports_validating: Gauge,
    pub sink_bytes: Counter,
    pub pull_targets: Gauge,
    pub pull_sessions: Gauge,
    pub pull_dials: Family<LookupResult, Counter>,
    pub vms_removed: Family<Reason, Counter>,
    pub reloads: Family<LookupResult, Counter>,
}

/// Counts a report as being validated while it lives (see [`Metrics::validating`]).
pub struct Validating(Gauge);

impl Drop for Validating {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

fn age_buckets() -> impl Iterator<Item = f64> {
    [
        0.1,
        1.0,
        10.0,
        60.0,
        300.0,
        900.0,
        3600.0,
        4.0 * 3600.0,
        24.0 * 3600.0,
    ]
    .into_iter()
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("guestwatch_relay");
        let cache_slots_used = Gauge::default();
        r.register(
            "cache_slots_used",
            "Cache slots holding a report",
            cache_slots_used.clone(),
        );
        let cache_slots_capacity = Gauge::default();
        r.register(
            "cache_slots_capacity",
            "Cache slots configured",
            cache_slots_capacity.clone(),
        );
        let cache_residency_seconds = Histogram::new(age_buckets());
        r.register(
            "cache_residency_seconds",
            "Time an entry held its last payload when it left the cache",
            cache_residency_seconds.clone(),
        );
        let cache_lifetime_seconds = Histogram::new(age_buckets());
        r.register(
            "cache_lifetime_seconds",
            "Time from an entry's creation to its removal (confirmed, evicted or expired)",
            cache_lifetime_seconds.clone(),
        );
        let cache_lookups = Family::<LookupResult, Counter>::default();
        r.register(
            "cache_lookups",
            "Cache lookups on report arrival by result",
            cache_lookups.clone(),
        );
        let inventories_held = Gauge::default();
        r.register(
            "inventories_held",
            "VMs whose latest inventory is held in memory (delta bases, change-event befores)",
            inventories_held.clone(),
        );
        let inventory_bytes = Gauge::default();
        r.register(
            "inventory_bytes",
            "Estimated memory of the inventories held (--inventory-cache-bytes bounds it)",
            inventory_bytes.clone(),
        );
        let inventory_reads = Family::<LookupResult, Counter>::default();
        r.register(
            "inventory_reads",
            "Latest inventories read back from the sink by result (read, unusable)",
            inventory_reads.clone(),
        );
        let reports_delta = Family::<LookupResult, Counter>::default();
        r.register(
            "reports_delta",
            "Delta reports by result (applied, need_full)",
            reports_delta.clone(),
        );
        let cache_evictions = Family::<Reason, Counter>::default();
        r.register(
            "cache_evictions",
            "Entries removed without delivery (evicted, expired)",
            cache_evictions.clone(),
        );
        let reports_received = Counter::default();
        r.register(
            "reports_received",
            "Reports received from guests",
            reports_received.clone(),
        );
        let reports_delivered = Counter::default();
        r.register(
            "reports_delivered",
            "Reports the sink accepted",
            reports_delivered.clone(),
        );
        let reports_duplicate = Counter::default();
        r.register(
            "reports_duplicate",
            "Retransmissions the sink already had",
            reports_duplicate.clone(),
        );
        let reports_deferred = Family::<Reason, Counter>::default();
        r.register(
            "reports_deferred",
            "Reports answered with Nack/retry-after by reason",
            reports_deferred.clone(),
        );
        let reports_rejected = Family::<Reason, Counter>::default();
        r.register(
            "reports_rejected",
            "Frames or reports refused by reason",
            reports_rejected.clone(),
        );
        let sink_latency_seconds = Histogram::new(latency_buckets());
        r.register(
            "sink_latency_seconds",
            "Time the sink took to accept a report",
            sink_latency_seconds.clone(),
        );
        let sink_errors = Family::<Reason, Counter>::default();
        r.register("sink_errors", "Sink failures by kind", sink_errors.clone());
        let connections = Gauge::default();
        r.register("connections", "Open guest connections", connections.clone());
        let connections_rejected = Family::<Reason, Counter>::default();
        r.register(
            "connections_rejected",
            "Guest connections refused by reason",
            connections_rejected.clone(),
        );
        let e2e_latency_seconds = Histogram::new(latency_buckets());
        r.register(
            "e2e_latency_seconds",
            "From the guest's scan time to the sink's acceptance",
            e2e_latency_seconds.clone(),
        );
        let reports_validating = Gauge::default();
        r.register(
            "reports_validating",
            "Reports being decompressed and checked (on the blocking pool)",
            reports_validating.clone(),
        );
        let sink_bytes = Counter::default();
        r.register(
            "sink_bytes",
            "Bytes written to the sink (documents, delivery records, stream entries)",
            sink_bytes.clone(),
        );
        let pull_targets = Gauge::default();
        r.register(
            "pull_targets",
            "VMs the relay dials (pull mode: --pull, the TOML file's pull list, --pull-dir)",
            pull_targets.clone(),
        );
        let pull_sessions = Gauge::default();
        r.register(
            "pull_sessions",
            "Sessions the relay dialed that are open",
            pull_sessions.clone(),
        );
        let pull_dials = Family::<LookupResult, Counter>::default();
        r.register(
            "pull_dials",
            "Dials to pulled VMs by result (connected, failed)",
            pull_dials.clone(),
        );
        let vms_removed = Family::<Reason, Counter>::default();
        r.register(
            "vms_removed",
            "VMs removed from the configuration while the relay ran, their connections closed (cid_map, pull)",
            vms_removed.clone(),
        );
        let reloads = Family::<LookupResult, Counter>::default();
        r.register(
            "reloads",
            "Reloads of the CID map and pull targets by result (applied, unchanged, failed)",
            reloads.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(r)),
            cache_slots_used,
            cache_slots_capacity,
            cache_residency_seconds,
            cache_lifetime_seconds,
            cache_lookups,
            cache_evictions,
            inventories_held,
            inventory_bytes,
            inventory_reads,
            reports_delta,
            reports_received,
            reports_delivered,
            reports_duplicate,
            reports_deferred,
            reports_rejected,
            sink_latency_seconds,
            sink_errors,
            connections,
            connections_rejected,
            e2e_latency_seconds,
            reports_validating,
            sink_bytes,
            pull_targets,
            pull_sessions,
            pull_dials,
            vms_removed,
            reloads,
        }
    }

    pub fn result(family: &Family<LookupResult, Counter>, result: &str) {
        family
            .get_or_create(&LookupResult {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Marks one report as being validated until the guard is dropped.
    pub fn validating(&self) -> Validating {
        self.reports_validating.inc();
        Validating(self.reports_validating.clone())
    }

    pub fn reason(family: &Family<Reason, Counter>, reason: &str) {
        family
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn lookup(family: &Family<LookupResult, Counter>, result: &str) {
        family
            .get_or_create(&LookupResult {
                result: result.to_owned(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
