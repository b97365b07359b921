//! The agent's Prometheus metrics (served by `run --metrics ADDR`).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::detect::{DetectorMode, explain::IgnoreReason, trigger::TriggerKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric the agent exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Mutex<Registry>>,
    pub triggers: Family<KindLabel, Counter>,
    pub transactions_ignored: Family<ReasonLabel, Counter>,
    pub scans: Family<OutcomeLabel, Counter>,
    pub scan_seconds: Histogram,
    pub detector_mode: Family<ModeLabel, Gauge>,
    pub reports_sent: Counter,
    pub reports_acked: Family<OutcomeLabel, Counter>,
    /// Acknowledged reports by the form they went in (`full`, `delta`).
    pub reports_acked_form: Family<OutcomeLabel, Counter>,
    pub reports_nacked: Counter,
    pub reports_rejected: Family<ReasonLabel, Counter>,
    pub pending_reports: Gauge,
    pub relay_connected: Gauge,
    pub relay_connections: Counter,
    pub delivery_seconds: Histogram,
    /// Pull mode: connections accepted from the host (before the handshake).
    pub listen_accepted: Counter,
    /// Pull mode: connections refused (`not_host`: another CID; `peer_uid`: another user).
    pub listen_refused: Family<ReasonLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("guestwatch_agent");
        let triggers = Family::<KindLabel, Counter>::default();
        registry.register("triggers", "Detection triggers by kind", triggers.clone());
        let transactions_ignored = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "transactions_ignored",
            "rpm transactions that did not change the watched database, by reason (no_write, failed, other_database, killed, ambiguous)",
            transactions_ignored.clone(),
        );
        let scans = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "scans",
            "Scans by outcome (changed, unchanged, failed, timeout)",
            scans.clone(),
        );
        let scan_seconds =
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        registry.register(
            "scan_duration_seconds",
            "Scan duration",
            scan_seconds.clone(),
        );
        let detector_mode = Family::<ModeLabel, Gauge>::default();
        registry.register(
            "detector_mode",
            "1 for the detector mode in use",
            detector_mode.clone(),
        );
        let reports_sent = Counter::default();
        registry.register(
            "reports_sent",
            "Report transmissions, retransmissions included",
            reports_sent.clone(),
        );
        let reports_acked = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "reports_acked",
            "Acknowledged reports (delivered, duplicate)",
            reports_acked.clone(),
        );
        let reports_acked_form = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "reports_acked_form",
            "Acknowledged reports by the form they were sent in (full, delta)",
            reports_acked_form.clone(),
        );
        let reports_nacked = Counter::default();
        registry.register(
            "reports_nacked",
            "Reports the relay asked to retry later",
            reports_nacked.clone(),
        );
        let reports_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "reports_rejected",
            "Reports given up on: the relay can never take them (too_large, malformed, rejected)",
            reports_rejected.clone(),
        );
        let pending_reports = Gauge::default();
        registry.register(
            "pending_reports",
            "1 while a report awaits acknowledgement",
            pending_reports.clone(),
        );
        let relay_connected = Gauge::default();
        registry.register(
            "relay_connected",
            "1 while connected to the relay",
            relay_connected.clone(),
        );
        let relay_connections = Counter::default();
        registry.register(
            "relay_connections",
            "Connections to the relay that completed the handshake",
            relay_connections.clone(),
        );
        let delivery_seconds =
            Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0]);
        registry.register(
            "delivery_seconds",
            "From the end of a scan to the relay's acknowledgement",
            delivery_seconds.clone(),
        );
        let listen_accepted = Counter::default();
        registry.register(
            "listen_accepted",
            "Pull mode: connections accepted from the host",
            listen_accepted.clone(),
        );
        let listen_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "listen_refused",
            "Pull mode: connections refused (not_host: a CID other than 2; peer_uid: another user)",
            listen_refused.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            triggers,
            transactions_ignored,
            scans,
            scan_seconds,
            detector_mode,
            reports_sent,
            reports_acked,
            reports_acked_form,
            reports_nacked,
            reports_rejected,
            pending_reports,
            relay_connected,
            relay_connections,
            delivery_seconds,
            listen_accepted,
            listen_refused,
        }
    }

    pub fn listen_refused(&self, reason: &str) {
        self.listen_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn transaction_ignored(&self, reason: IgnoreReason) {
        self.transactions_ignored
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    pub fn trigger(&self, kind: TriggerKind) {
        self.triggers
            .get_or_create(&KindLabel {
                kind: kind.as_str().to_owned(),
            })
            .inc();
    }

    pub fn set_mode(&self, mode: DetectorMode) {
        for m in [
            DetectorMode::Ebpf,
            DetectorMode::Inotify,
            DetectorMode::Periodic,
        ] {
            self.detector_mode
                .get_or_create(&ModeLabel {
                    mode: m.as_str().to_owned(),
                })
                .set(i64::from(m == mode));
        }
    }

    pub fn acked(&self, outcome: &str) {
        self.reports_acked
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn sent_form(&self, form: &str) {
        self.reports_acked_form
            .get_or_create(&OutcomeLabel {
                outcome: form.to_owned(),
            })
            .inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.reports_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn scan(&self, outcome: &str, seconds: f64) {
        self.scans
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
        self.scan_seconds.observe(seconds);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn exports_named_metrics() {
        let m = Metrics::new();
        m.trigger(TriggerKind::Transaction);
        m.set_mode(DetectorMode::Ebpf);
        m.scan("changed", 0.02);
        m.rejected("too_large");
        m.listen_refused("not_host");
        let mut text = String::new();
        encode(&mut text, &m.registry.lock().unwrap()).unwrap();
        assert!(
            text.contains("guestwatch_agent_triggers_total{kind=\"transaction\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("guestwatch_agent_detector_mode{mode=\"ebpf\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("guestwatch_agent_detector_mode{mode=\"inotify\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("guestwatch_agent_scans_total{outcome=\"changed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("guestwatch_agent_scan_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("guestwatch_agent_reports_rejected_total{reason=\"too_large\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("guestwatch_agent_listen_refused_total{reason=\"not_host\"} 1"),
            "{text}"
        );
    }
}
