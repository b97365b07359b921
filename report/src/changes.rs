//! What changed between two scans.

use std::collections::{BTreeMap, BTreeSet};

use rpmdb::Package;
use serde::Serialize;

use crate::evr;

/// One package (same name and arch) whose version changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub name: String,
    pub arch: String,
    pub from: String,
    pub to: String,
}

/// Packages added, removed and changed between two scans.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChangeSummary {
    /// `name-[epoch:]version-release.arch` of packages that appeared.
    pub added: Vec<String>,
    /// The same for packages that disappeared.
    pub removed: Vec<String>,
    pub changed: Vec<Change>,
}

impl ChangeSummary {
    /// Compares two package sets. Packages are matched by name and arch (the same name can be
    /// installed for several arches); a name with several versions installed at once (kernels)
    /// is compared as a set of versions: one out and one in is a change, anything else is
    /// additions and removals.
    pub fn between(old: &[Package], new: &[Package]) -> Self {
        fn index(packages: &[Package]) -> BTreeMap<(String, String), BTreeSet<String>> {
            let mut map: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
            for p in packages {
                map.entry((
                    p.name.clone(),
                    p.arch.clone().unwrap_or_else(|| "(none)".into()),
                ))
                .or_default()
                .insert(evr(p));
            }
            map
        }
        let (old, new) = (index(old), index(new));
        let mut summary = Self::default();
        let empty = BTreeSet::new();
        let keys: BTreeSet<&(String, String)> = old.keys().chain(new.keys()).collect();
        for key in keys {
            let (before, after) = (
                old.get(key).unwrap_or(&empty),
                new.get(key).unwrap_or(&empty),
            );
            if before == after {
                continue;
            }
            let gone: Vec<&String> = before.difference(after).collect();
            let came: Vec<&String> = after.difference(before).collect();
            if let ([from], [to]) = (gone.as_slice(), came.as_slice()) {
                summary.changed.push(Change {
                    name: key.0.clone(),
                    arch: key.1.clone(),
                    from: (*from).clone(),
                    to: (*to).clone(),
                });
                continue;
            }
            summary
                .removed
                .extend(gone.iter().map(|e| format!("{}-{e}.{}", key.0, key.1)));
            summary
                .added
                .extend(came.iter().map(|e| format!("{}-{e}.{}", key.0, key.1)));
        }
        summary
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// `+2 -1 ~1`, for logs.
    pub fn short(&self) -> String {
        format!(
            "+{} -{} ~{}",
            self.added.len(),
            self.removed.len(),
            self.changed.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, v: &str, arch: &str) -> Package {
        Package {
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
        let s = ChangeSummary::between(&old, &new);
        assert_eq!(
            s.changed,
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
        let s = ChangeSummary::between(&old, &new);
        assert_eq!(s.removed, vec!["glibc-2.34-1.i686"]);
        assert_eq!(s.added, vec!["vim-9-1.x86_64"]);
        assert_eq!(s.short(), "+1 -1 ~1");
        assert!(ChangeSummary::between(&old, &old).is_empty());
    }

    #[test]
    fn several_versions_of_one_name_are_a_set() {
        let old = vec![p("kernel", "6.1", "x86_64"), p("kernel", "6.2", "x86_64")];
        let new = vec![p("kernel", "6.2", "x86_64"), p("kernel", "6.3", "x86_64")];
        assert_eq!(ChangeSummary::between(&old, &new).changed.len(), 1);
        let new = vec![
            p("kernel", "6.1", "x86_64"),
            p("kernel", "6.2", "x86_64"),
            p("kernel", "6.3", "x86_64"),
        ];
        assert_eq!(
            ChangeSummary::between(&old, &new).added,
            vec!["kernel-6.3-1.x86_64"]
        );
    }
}
