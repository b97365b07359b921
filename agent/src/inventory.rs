//! What a scan found, in the forms the agent needs: a content hash of the package set, the
//! change summary between two scans, and the report document sent to the relay.
//!
//! The content hash is order-independent: each package's reported fields are joined with NUL
//! bytes into one canonical line and hashed (SHA-256); the per-package digests are sorted and
//! hashed together. It changes when any reported field of any package changes, never when only
//! the order does, and costs 32 bytes per package of memory.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use rpmdb::Package;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// SHA-256 of the package set (see the module documentation).
pub fn content_hash(packages: &[Package]) -> [u8; 32] {
    let mut digests: Vec<[u8; 32]> = packages
        .iter()
        .map(|p| Sha256::digest(canonical(p).as_bytes()).into())
        .collect();
    digests.sort_unstable();
    let mut hasher = Sha256::new();
    for digest in &digests {
        hasher.update(digest);
    }
    hasher.finalize().into()
}

fn canonical(p: &Package) -> String {
    let o = |v: &Option<String>| v.clone().unwrap_or_default();
    [
        p.name.clone(),
        p.epoch.map(|e| e.to_string()).unwrap_or_default(),
        p.version.clone(),
        p.release.clone(),
        o(&p.arch),
        o(&p.sourcerpm),
        o(&p.license),
        o(&p.vendor),
        p.size.map(|s| s.to_string()).unwrap_or_default(),
        p.installtime.map(|s| s.to_string()).unwrap_or_default(),
        o(&p.sigmd5),
        o(&p.modularitylabel),
    ]
    .join("\0")
}

/// `[epoch:]version-release`.
pub fn evr(p: &Package) -> String {
    match p.epoch {
        Some(e) => format!("{e}:{}-{}", p.version, p.release),
        None => format!("{}-{}", p.version, p.release),
    }
}

/// `name-[epoch:]version-release.arch`.
pub fn nevra(p: &Package) -> String {
    format!(
        "{}-{}.{}",
        p.name,
        evr(p),
        p.arch.as_deref().unwrap_or("(none)")
    )
}

/// One package whose version changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub name: String,
    pub arch: String,
    pub from: String,
    pub to: String,
}

/// How the package set changed between two scans.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChangeSummary {
    /// `name-evr.arch` of packages that appeared.
    pub added: Vec<String>,
    /// `name-evr.arch` of packages that disappeared.
    pub removed: Vec<String>,
    /// Packages (same name and arch) whose EVR changed.
    pub changed: Vec<Change>,
}

impl ChangeSummary {
    /// Compares two package sets, arch-aware; a name with several versions installed (kernels)
    /// is compared as a set of EVRs.
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
        let keys: BTreeSet<&(String, String)> = old.keys().chain(new.keys()).collect();
        let empty = BTreeSet::new();
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
            if gone.len() == 1 && came.len() == 1 {
                summary.changed.push(Change {
                    name: key.0.clone(),
                    arch: key.1.clone(),
                    from: gone[0].clone(),
                    to: came[0].clone(),
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

    /// `+2 -1 ~1` style summary for logs.
    pub fn short(&self) -> String {
        format!(
            "+{} -{} ~{}",
            self.added.len(),
            self.removed.len(),
            self.changed.len()
        )
    }
}

/// Facts carried with every report (under the `guestwatch` key of the document).
#[derive(Clone, Debug, Serialize)]
pub struct Facts {
    pub agent_version: String,
    pub detector: String,
    pub trigger: serde_json::Value,
    pub backend: String,
    pub database: String,
    pub package_count: usize,
    pub scan_duration_ms: u64,
    pub content_hash: String,
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    pub changes: ChangeSummary,
}

/// The report document: claircore IndexReport field names for packages and environments,
/// plus the `guestwatch` facts.
pub fn document(packages: &[Package], database: &str, facts: &Facts) -> serde_json::Value {
    let mut sorted: Vec<&Package> = packages.iter().collect();
    sorted.sort_by_key(|p| canonical(p));
    let mut pkgs = serde_json::Map::new();
    let mut envs = serde_json::Map::new();
    for p in sorted {
        let id = hex::encode(&Sha256::digest(canonical(p).as_bytes())[..8]);
        let source = p.sourcerpm.as_deref().map(|s| {
            serde_json::json!({"name": s.trim_end_matches(".src.rpm"), "kind": "source", "version": ""})
        });
        pkgs.insert(
            id.clone(),
            serde_json::json!({
                "id": id,
                "name": p.name,
                "version": evr(p),
                "kind": "binary",
                "source": source,
                "arch": p.arch,
                "module": p.modularitylabel.as_deref().map(|m| m.split(':').take(2).collect::<Vec<_>>().join(":")),
                "package_db": database,
                "repository_hint": "",
                "normalized_version": "",
            }),
        );
        envs.insert(id, serde_json::json!([{ "package_db": database, "introduced_in": "", "distribution_id": "", "repository_ids": [] }]));
    }
    serde_json::json!({
        "manifest_hash": facts.content_hash,
        "state": "IndexFinished",
        "success": true,
        "err": "",
        "packages": pkgs,
        "distributions": {},
        "repositories": {},
        "environments": envs,
        "guestwatch": facts,
    })
}

/// Milliseconds of a duration, saturating.
pub fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
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
    fn hash_ignores_order_but_not_fields() {
        let a = vec![p("a", "1", "x86_64"), p("b", "2", "noarch")];
        let b = vec![a[1].clone(), a[0].clone()];
        assert_eq!(content_hash(&a), content_hash(&b));
        let mut c = a.clone();
        c[0].license = Some("MIT".into());
        assert_ne!(content_hash(&a), content_hash(&c));
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
        assert_eq!(s.changed.len(), 1);
        assert_eq!(
            (s.changed[0].from.as_str(), s.changed[0].to.as_str()),
            ("5.1-1", "5.2-1")
        );
        assert!(s.added.is_empty() && s.removed.is_empty());
        new.pop();
        new.push(p("vim", "9", "x86_64"));
        let s = ChangeSummary::between(&old, &new);
        assert_eq!(s.removed, vec!["glibc-2.34-1.i686"]);
        assert_eq!(s.added, vec!["vim-9-1.x86_64"]);
        assert_eq!(s.short(), "+1 -1 ~1");
    }

    #[test]
    fn several_versions_of_one_name_are_a_set() {
        let old = vec![p("kernel", "6.1", "x86_64"), p("kernel", "6.2", "x86_64")];
        let new = vec![p("kernel", "6.2", "x86_64"), p("kernel", "6.3", "x86_64")];
        let s = ChangeSummary::between(&old, &new);
        assert_eq!(s.changed.len(), 1, "{s:?}");
        let new = vec![
            p("kernel", "6.1", "x86_64"),
            p("kernel", "6.2", "x86_64"),
            p("kernel", "6.3", "x86_64"),
        ];
        let s = ChangeSummary::between(&old, &new);
        assert_eq!(s.added, vec!["kernel-6.3-1.x86_64"]);
    }
}
