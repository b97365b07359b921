//! What changed between two scans, in rpm's version order.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
};

use guestwatch_protocol::inventory::PackageRecord;
pub use guestwatch_protocol::inventory::{Change, ChangeSummary};

use crate::{evr, key_order};

/// rpm's order of two installed versions (a missing epoch counts as 0).
pub fn compare_evr(a: &PackageRecord, b: &PackageRecord) -> Ordering {
    let e = |p: &PackageRecord| p.epoch.map(|e| e.to_string()).unwrap_or_default();
    let (ea, eb) = (e(a), e(b));
    rpm_version::Evr::new(ea.as_str(), a.version.as_str(), a.release.as_str()).cmp(
        &rpm_version::Evr::new(eb.as_str(), b.version.as_str(), b.release.as_str()),
    )
}

/// A change's class, in rpm's version order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeClass {
    Added,
    Removed,
    Upgraded,
    Downgraded,
    Reinstalled,
}

impl ChangeClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Removed => "removed",
            Self::Upgraded => "upgraded",
            Self::Downgraded => "downgraded",
            Self::Reinstalled => "reinstalled",
        }
    }
}

/// One package's change: `from` and `to` are `[epoch:]version-release` (none for an addition's
/// `from` and a removal's `to`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PackageChange {
    pub class: ChangeClass,
    pub name: String,
    pub arch: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// Compares two package sets. Packages are matched by name and arch (the same name can be
/// installed for several arches); a name with several versions installed at once (kernels)
/// is compared as a set of versions: one out and one in is an upgrade, a downgrade or (same
/// version by rpm's order) a reinstall; anything else is additions and removals. A version
/// present before and after whose record differs is a reinstall.
pub fn between(old: &[PackageRecord], new: &[PackageRecord]) -> ChangeSummary {
    summarize(&classify(old, new))
}

/// [`between`] as one entry per package change, in name and arch order.
pub fn classify(old: &[PackageRecord], new: &[PackageRecord]) -> Vec<PackageChange> {
    match differing_groups(old, new) {
        // A group whose records are the same before and after has no change: only the groups
        // that differ are compared (after a one-package transaction, one group of thousands).
        Some(differ) => {
            let within = |p: &&PackageRecord| differ.contains(&group(p));
            classify_groups(old.iter().filter(within), new.iter().filter(within))
        }
        None => classify_groups(old.iter(), new.iter()),
    }
}

/// The group of a record: its name and arch.
fn group(p: &PackageRecord) -> (&str, &str) {
    (p.name.as_str(), p.arch.as_deref().unwrap_or(NO_ARCH))
}

/// The groups with a record in only one of `old` and `new` (or different in the two), found
/// in one merge when both are in a document's order (sorted by key, unique); `None` when one
/// is not.
fn differing_groups<'a>(
    old: &'a [PackageRecord],
    new: &'a [PackageRecord],
) -> Option<BTreeSet<(&'a str, &'a str)>> {
    let in_order =
        |list: &[PackageRecord]| list.windows(2).all(|w| key_order(&w[0], &w[1]).is_lt());
    if !in_order(old) || !in_order(new) {
        return None;
    }
    let mut differ = BTreeSet::new();
    let (mut i, mut j) = (0, 0);
    while let (Some(was), Some(is)) = (old.get(i), new.get(j)) {
        match key_order(was, is) {
            Ordering::Less => {
                differ.insert(group(was));
                i += 1;
            }
            Ordering::Greater => {
                differ.insert(group(is));
                j += 1;
            }
            Ordering::Equal => {
                // Equal keys: the same name and arch, so one group.
                if was != is {
                    differ.insert(group(was));
                }
                i += 1;
                j += 1;
            }
        }
    }
    differ.extend(old[i..].iter().chain(&new[j..]).map(group));
    Some(differ)
}

/// [`classify`] of only the packages whose name and arch are in `touched` (what a delta
/// names): the same answer for those groups, at the cost of the groups alone.
pub fn classify_touched(
    old: &[PackageRecord],
    new: &[PackageRecord],
    touched: &BTreeSet<(String, String)>,
) -> Vec<PackageChange> {
    let within = |p: &&PackageRecord| {
        touched.contains(&(
            p.name.clone(),
            p.arch.clone().unwrap_or_else(|| NO_ARCH.to_owned()),
        ))
    };
    classify_groups(old.iter().filter(within), new.iter().filter(within))
}

/// How a record without an arch is grouped and named.
pub const NO_ARCH: &str = "(none)";

fn classify_groups<'a>(
    old: impl Iterator<Item = &'a PackageRecord>,
    new: impl Iterator<Item = &'a PackageRecord>,
) -> Vec<PackageChange> {
    type Index<'a> = BTreeMap<(&'a str, &'a str), BTreeMap<String, &'a PackageRecord>>;
    fn index<'a>(packages: impl Iterator<Item = &'a PackageRecord>) -> Index<'a> {
        let mut map: Index<'a> = BTreeMap::new();
        for p in packages {
            map.entry((p.name.as_str(), p.arch.as_deref().unwrap_or(NO_ARCH)))
                .or_default()
                .insert(evr(p), p);
        }
        map
    }
    let (old, new) = (index(old), index(new));
    let mut out = Vec::new();
    let empty = BTreeMap::new();
    let keys: BTreeSet<&(&str, &str)> = old.keys().chain(new.keys()).collect();
    for key in keys {
        let (before, after) = (
            old.get(key).unwrap_or(&empty),
            new.get(key).unwrap_or(&empty),
        );
        let mut change = |class, from: Option<&String>, to: Option<&String>| {
            out.push(PackageChange {
                class,
                name: key.0.to_owned(),
                arch: key.1.to_owned(),
                from: from.cloned(),
                to: to.cloned(),
            });
        };
        for (version, was) in before {
            if let Some(is) = after.get(version)
                && was != is
            {
                change(ChangeClass::Reinstalled, Some(version), Some(version));
            }
        }
        let gone: Vec<(&String, &&PackageRecord)> = before
            .iter()
            .filter(|(v, _)| !after.contains_key(*v))
            .collect();
        let came: Vec<(&String, &&PackageRecord)> = after
            .iter()
            .filter(|(v, _)| !before.contains_key(*v))
            .collect();
        if let ([(from, was)], [(to, is)]) = (gone.as_slice(), came.as_slice()) {
            let class = match compare_evr(is, was) {
                Ordering::Greater => ChangeClass::Upgraded,
                Ordering::Less => ChangeClass::Downgraded,
                Ordering::Equal => ChangeClass::Reinstalled,
            };
            change(class, Some(from), Some(to));
            continue;
        }
        for (version, _) in gone {
            change(ChangeClass::Removed, Some(version), None);
        }
        for (version, _) in came {
            change(ChangeClass::Added, None, Some(version));
        }
    }
    out
}

/// The summary of `changes` (reports' `changes`).
pub fn summarize(changes: &[PackageChange]) -> ChangeSummary {
    let mut summary = ChangeSummary::default();
    for c in changes {
        let nevra = |v: &Option<String>| {
            format!("{}-{}.{}", c.name, v.as_deref().unwrap_or_default(), c.arch)
        };
        let change = || Change {
            name: c.name.clone(),
            arch: c.arch.clone(),
            from: c.from.clone().unwrap_or_default(),
            to: c.to.clone().unwrap_or_default(),
        };
        match c.class {
            ChangeClass::Added => summary.added.push(nevra(&c.to)),
            ChangeClass::Removed => summary.removed.push(nevra(&c.from)),
            ChangeClass::Upgraded => summary.upgraded.push(change()),
            ChangeClass::Downgraded => summary.downgraded.push(change()),
            ChangeClass::Reinstalled => summary.reinstalled.push(change()),
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, v: &str, arch: &str) -> PackageRecord {
        PackageRecord {
            name: name.into(),
            version: v.into(),
            release: "1".into(),
            arch: Some(arch.into()),
            ..Default::default()
        }
    }

    #[test]
    fn one_change_is_one_entry_and_arches_are_distinct() {
        let old = vec![
            p("bash", "5.1", "x86_64"),
            p("glibc", "2.34", "x86_64"),
            p("glibc", "2.34", "i686"),
        ];
        let mut new = old.clone();
        new[0].version = "5.2".into();
        let s = between(&old, &new);
        assert_eq!(
            s.upgraded,
            vec![Change {
                name: "bash".into(),
                arch: "x86_64".into(),
                from: "5.1-1".into(),
                to: "5.2-1".into()
            }]
        );
        assert!(s.added.is_empty() && s.removed.is_empty());
        new.pop();
        new.push(p("vim", "9", "x86_64"));
        let s = between(&old, &new);
        assert_eq!(s.removed, vec!["glibc-2.34-1.i686"]);
        assert_eq!(s.added, vec!["vim-9-1.x86_64"]);
        assert_eq!(s.short(), "+1 -1 ^1 v0 =0");
        assert!(between(&old, &old).is_empty());
    }

    #[test]
    fn the_touched_groups_alone_give_the_same_changes() {
        let old = vec![
            p("bash", "5.1", "x86_64"),
            p("glibc", "2.34", "x86_64"),
            p("glibc", "2.34", "i686"),
            p("kernel", "6.1", "x86_64"),
            p("vim", "9", "x86_64"),
        ];
        let mut new = old.clone();
        new[0].version = "5.0".into();
        new[3].version = "6.2".into();
        new.push(p("kernel", "6.3", "x86_64"));
        new.retain(|r| r.name != "vim");
        new.push(p("zsh", "5.9", "noarch"));
        let all = classify(&old, &new);
        let touched = ["bash", "kernel", "vim", "zsh"]
            .iter()
            .map(|n| {
                let arch = if *n == "zsh" { "noarch" } else { "x86_64" };
                (n.to_string(), arch.to_string())
            })
            .collect();
        assert_eq!(classify_touched(&old, &new, &touched), all);
        let classes: Vec<ChangeClass> = all.iter().map(|c| c.class).collect();
        assert_eq!(
            classes,
            [
                ChangeClass::Downgraded,
                ChangeClass::Removed,
                ChangeClass::Added,
                ChangeClass::Added,
                ChangeClass::Removed,
                ChangeClass::Added
            ]
        );
        assert_eq!(all[0].from.as_deref(), Some("5.1-1"));
        assert_eq!(all[4].to, None);
        assert_eq!(summarize(&all), between(&old, &new));
    }

    #[test]
    fn several_versions_of_one_name_are_a_set() {
        let old = vec![p("kernel", "6.1", "x86_64"), p("kernel", "6.2", "x86_64")];
        let new = vec![p("kernel", "6.2", "x86_64"), p("kernel", "6.3", "x86_64")];
        assert_eq!(between(&old, &new).upgraded.len(), 1);
        let new = vec![
            p("kernel", "6.1", "x86_64"),
            p("kernel", "6.2", "x86_64"),
            p("kernel", "6.3", "x86_64"),
        ];
        assert_eq!(between(&old, &new).added, vec!["kernel-6.3-1.x86_64"]);
    }

    #[test]
    fn rpm_order_tells_upgrades_downgrades_and_reinstalls_apart() {
        let old = vec![p("bash", "5.10", "x86_64"), p("vim", "9.1", "x86_64")];
        // 5.9 < 5.10 in rpm's order, though not as strings.
        let new = vec![p("bash", "5.9", "x86_64"), p("vim", "9.1", "x86_64")];
        let s = between(&old, &new);
        assert_eq!(s.downgraded.len(), 1, "{s:?}");
        assert!(s.upgraded.is_empty());
        let s = between(&new, &old);
        assert_eq!(s.upgraded[0].to, "5.10-1");
        // The same version with another install time is a reinstall.
        let mut again = old.clone();
        again[1].installtime = Some(1_700_000_000);
        let s = between(&old, &again);
        assert_eq!(
            s.reinstalled,
            vec![Change {
                name: "vim".into(),
                arch: "x86_64".into(),
                from: "9.1-1".into(),
                to: "9.1-1".into()
            }]
        );
        // An epoch of 0 where there was none: equal in rpm's order, a different record.
        let mut epoch = old.clone();
        epoch[0].epoch = Some(0);
        let s = between(&old, &epoch);
        assert_eq!((s.reinstalled.len(), s.upgraded.len()), (1, 0), "{s:?}");
        // An epoch outranks any version.
        let mut higher = old.clone();
        higher[0].epoch = Some(1);
        higher[0].version = "1.0".into();
        assert_eq!(between(&old, &higher).upgraded.len(), 1);
    }

    /// The merge's shortcut gives what comparing every group gives, on documents (sorted,
    /// unique) and on lists in any order.
    #[test]
    fn comparing_only_the_groups_that_differ_gives_the_same_changes() {
        let mut state = 16u64;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let record = |next: &mut dyn FnMut(u64) -> u64| PackageRecord {
            name: format!("n{}", next(12)),
            epoch: [None, Some(0), Some(1)][next(3) as usize],
            version: format!("1.{}", next(4)),
            release: "1".into(),
            arch: [None, Some("x86_64".to_owned()), Some("i686".to_owned())][next(3) as usize]
                .clone(),
            installtime: Some(next(2)),
            ..Default::default()
        };
        for round in 0..300 {
            let old: Vec<PackageRecord> = (0..next(30)).map(|_| record(&mut next)).collect();
            let mut new = old.clone();
            for _ in 0..next(4) {
                match next(3) {
                    0 if !new.is_empty() => {
                        new.remove(next(new.len() as u64) as usize);
                    }
                    1 if !new.is_empty() => {
                        let at = next(new.len() as u64) as usize;
                        new[at].installtime = Some(7);
                    }
                    _ => new.push(record(&mut next)),
                }
            }
            let slow = classify_groups(old.iter(), new.iter());
            assert_eq!(classify(&old, &new), slow, "round {round}, any order");
            let doc = |list: Vec<PackageRecord>| {
                guestwatch_protocol::inventory::Document::new(list, Default::default()).packages
            };
            let (old, new) = (doc(old), doc(new));
            assert!(differing_groups(&old, &new).is_some());
            let slow = classify_groups(old.iter(), new.iter());
            assert_eq!(classify(&old, &new), slow, "round {round}, documents");
        }
    }
}
