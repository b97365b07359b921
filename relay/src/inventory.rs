//! The latest inventory of each VM the relay delivered: the base a delta report is applied to,
//! and the "before" of each change event. It lives in memory within a byte budget (the least
//! recently used VM's goes first) and, beyond that, in the sink (`Sink::latest_inventory`), from
//! which a restarted relay or an evicted VM reloads it.
//!
//! Like the payload cache, it takes no locks itself and does no I/O; the deliverer wraps it.

use std::{collections::HashMap, sync::Arc};

use guestwatch_protocol::{ContentHash, inventory::Document};

/// A VM's latest delivered inventory.
#[derive(Clone, Debug)]
pub struct Latest {
    pub report_id: String,
    pub content_hash: ContentHash,
    pub document: Arc<Document>,
}

/// The in-memory inventories, within `budget` bytes (estimated).
#[derive(Debug)]
pub struct Inventories {
    budget: usize,
    used: usize,
    tick: u64,
    entries: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    latest: Latest,
    cost: usize,
    used_at: u64,
}

/// The memory a document takes, roughly: the records' fixed size and their strings.
pub fn cost(document: &Document) -> usize {
    let strings: usize = document
        .packages
        .iter()
        .map(|p| {
            let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
            p.name.len()
                + p.version.len()
                + p.release.len()
                + opt(&p.arch)
                + opt(&p.sourcerpm)
                + opt(&p.license)
                + opt(&p.vendor)
                + opt(&p.sigmd5)
                + opt(&p.modularitylabel)
                + opt(&p.repository)
        })
        .sum();
    strings
        + document.packages.len()
            * std::mem::size_of::<guestwatch_protocol::inventory::PackageRecord>()
        + 1024
}

impl Inventories {
    /// `budget = 0` keeps nothing in memory (every lookup goes to the sink).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes in use (estimated).
    pub fn used(&self) -> usize {
        self.used
    }

    /// The VM's latest inventory, if held.
    pub fn get(&mut self, vm: &str) -> Option<Latest> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(vm).map(|e| {
            e.used_at = tick;
            e.latest.clone()
        })
    }

    /// Holds `latest` as the VM's; returns the VMs evicted to make room. An inventory larger
    /// than the whole budget is not held (the sink has it).
    pub fn put(&mut self, vm: &str, latest: Latest) -> Vec<String> {
        self.forget(vm);
        let cost = cost(&latest.document);
        if cost > self.budget {
            return Vec::new();
        }
        let mut evicted = Vec::new();
        while self.used + cost > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used_at)
                .map(|(name, _)| name.clone())
            else {
                break;
            };
            self.forget(&oldest);
            evicted.push(oldest);
        }
        self.tick += 1;
        self.used += cost;
        self.entries.insert(
            vm.to_owned(),
            Entry {
                latest,
                cost,
                used_at: self.tick,
            },
        );
        evicted
    }

    /// Drops the VM's inventory (its latest delivery had none, or the VM is gone).
    pub fn forget(&mut self, vm: &str) {
        if let Some(e) = self.entries.remove(vm) {
            self.used -= e.cost;
        }
    }
}

#[cfg(test)]
mod tests {
    use guestwatch_protocol::inventory::{PackageRecord, SystemFacts};

    use super::*;

    fn latest(packages: usize, hash: u8) -> Latest {
        let records = (0..packages)
            .map(|i| PackageRecord {
                name: format!("p{i}"),
                version: "1".into(),
                release: "1".into(),
                ..PackageRecord::default()
            })
            .collect();
        Latest {
            report_id: format!("id-{hash}"),
            content_hash: ContentHash([hash; 32]),
            document: Arc::new(Document::new(records, SystemFacts::default())),
        }
    }

    #[test]
    fn the_least_recently_used_goes_first_and_the_budget_holds() {
        let one = cost(&latest(10, 0).document);
        let mut inv = Inventories::new(one * 2 + one / 2);
        assert!(inv.put("a", latest(10, 1)).is_empty());
        assert!(inv.put("b", latest(10, 2)).is_empty());
        // a is used: b is the least recently used when c comes.
        assert_eq!(inv.get("a").unwrap().content_hash, ContentHash([1; 32]));
        assert_eq!(inv.put("c", latest(10, 3)), ["b"]);
        assert!(inv.get("b").is_none());
        assert_eq!(inv.len(), 2);
        assert!(inv.used() <= one * 2 + one / 2);
        // Replacing a VM's inventory frees its old cost first.
        assert!(inv.put("a", latest(10, 4)).is_empty());
        assert_eq!(inv.get("a").unwrap().report_id, "id-4");
        inv.forget("a");
        inv.forget("c");
        assert_eq!((inv.len(), inv.used()), (0, 0));
    }

    #[test]
    fn an_inventory_beyond_the_budget_is_not_held() {
        let mut inv = Inventories::new(cost(&latest(10, 0).document));
        assert!(inv.put("small", latest(10, 1)).is_empty());
        assert!(inv.put("big", latest(1000, 2)).is_empty());
        assert!(inv.get("big").is_none());
        assert!(inv.get("small").is_some(), "not evicted for nothing");
        let mut none = Inventories::new(0);
        none.put("a", latest(1, 1));
        assert!(none.is_empty());
    }
}
