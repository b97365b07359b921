//! Change events: one per delivery, what a fleet's consumers read instead of whole inventories.
//! An event names the report, the VM, when, the trigger and attribution (the guest's claims, in
//! the protocol's one schema), and the package changes since the VM's previous inventory in the
//! sink — computed here, by the relay, from the two inventories, so they say exactly what
//! changed in the sink whatever the guest claims or whichever reports were superseded.
//!
//! The changes are relative to `base`, the VM's inventory before this delivery. Without one
//! (the VM's first report, or an inventory the relay could not read back) the event is a
//! baseline: `base` null, no changes listed. A report without a compact document (a protocol
//! version 1 agent) has `changes` and `counts` null: unknown. The list holds at most
//! [`MAX_EVENT_CHANGES`] entries (`changes_truncated` says so; `counts` stay exact), so an
//! event's size is bounded whatever the inventory's.

use std::time::SystemTime;

use guestwatch_protocol::{Attribution, ChangeCounts, Trigger, TriggerKind};
use report::changes::{ChangeClass, PackageChange};
use serde::Serialize;

use super::{Delivery, change_counts, kind_counts, opt_time, time};
use crate::inventory::Latest;

/// The most package changes one event lists.
pub const MAX_EVENT_CHANGES: usize = 1000;

/// The inventory a change event's changes are relative to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventBase {
    pub report_id: String,
    pub content_hash: String,
}

/// What changed, as the relay computed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// `None`: no earlier inventory (a baseline).
    pub base: Option<EventBase>,
    /// `None`: unknown (the report has no compact document).
    pub list: Option<Vec<PackageChange>>,
}

impl Changes {
    /// The changes `delivery` makes to `before` (the VM's latest inventory in the sink).
    pub fn compute(before: Option<&Latest>, delivery: &Delivery) -> Self {
        let Some(document) = &delivery.document else {
            return Self::default();
        };
        let Some(before) = before else {
            return Self {
                base: None,
                list: Some(Vec::new()),
            };
        };
        let list = match &delivery.delta {
            // A delta against this very inventory: only the groups it names can differ.
            Some(delta) if delta.base_hash == before.content_hash => {
                report::changes::classify_touched(
                    &before.document.packages,
                    &document.packages,
                    &delta.touched,
                )
            }
            _ => report::changes::classify(&before.document.packages, &document.packages),
        };
        Self {
            base: Some(EventBase {
                report_id: before.report_id.clone(),
                content_hash: before.content_hash.to_hex(),
            }),
            list: Some(list),
        }
    }

    fn counts(&self) -> Option<ChangeCounts> {
        let list = self.list.as_ref()?;
        let mut counts = ChangeCounts::default();
        for c in list {
            let n = match c.class {
                ChangeClass::Added => &mut counts.added,
                ChangeClass::Removed => &mut counts.removed,
                ChangeClass::Upgraded => &mut counts.upgraded,
                ChangeClass::Downgraded => &mut counts.downgraded,
                ChangeClass::Reinstalled => &mut counts.reinstalled,
            };
            *n = n.saturating_add(1);
        }
        Some(counts)
    }
}

/// One change event, as every sink writes it (JSON).
#[derive(Serialize)]
pub struct ChangeEvent<'a> {
    pub vm: &'a str,
    pub report_id: &'a str,
    /// `<vm>/<report id>`, as deliveries are deduplicated.
    pub idempotency_key: String,
    pub content_hash: &'a str,
    pub base: Option<&'a EventBase>,
    #[serde(serialize_with = "time")]
    pub delivered_at: SystemTime,
    #[serde(serialize_with = "time")]
    pub received_at: SystemTime,
    #[serde(serialize_with = "opt_time")]
    pub scanned_at: Option<SystemTime>,
    pub trigger: &'a Trigger,
    pub transactions: &'a [Attribution],
    pub tampers: &'a [Attribution],
    #[serde(serialize_with = "kind_counts")]
    pub coalesced: &'a [(TriggerKind, u32)],
    pub package_count: u64,
    #[serde(serialize_with = "opt_counts")]
    pub counts: Option<ChangeCounts>,
    pub changes: Option<&'a [PackageChange]>,
    pub changes_truncated: bool,
}

fn opt_counts<S: serde::Serializer>(c: &Option<ChangeCounts>, s: S) -> Result<S::Ok, S::Error> {
    match c {
        Some(c) => change_counts(c, s),
        None => s.serialize_none(),
    }
}

impl<'a> ChangeEvent<'a> {
    pub fn new(delivery: &'a Delivery, changes: &'a Changes, delivered_at: SystemTime) -> Self {
        let listed = changes
            .list
            .as_deref()
            .map(|l| &l[..l.len().min(MAX_EVENT_CHANGES)]);
        Self {
            vm: &delivery.vm,
            report_id: &delivery.report_id,
            idempotency_key: delivery.idempotency_key(),
            content_hash: &delivery.content_hash,
            base: changes.base.as_ref(),
            delivered_at,
            received_at: delivery.received_at,
            scanned_at: delivery.scanned_at,
            trigger: &delivery.trigger,
            transactions: &delivery.transactions,
            tampers: &delivery.tampers,
            coalesced: &delivery.coalesced,
            package_count: delivery.package_count,
            counts: changes.counts(),
            changes: listed,
            changes_truncated: changes
                .list
                .as_ref()
                .is_some_and(|l| l.len() > MAX_EVENT_CHANGES),
        }
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}
