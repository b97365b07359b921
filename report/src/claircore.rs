//! The claircore-compatible IndexReport.
//!
//! Field names and shapes follow claircore's JSON (`packages`, `distributions`,
//! `repositories`, `environments` keyed by id), so tooling that reads claircore reports reads
//! these. Ids derive from content and every map is ordered: the same system gives the same
//! bytes. guestwatch's own facts travel under the `guestwatch` key, which claircore ignores.

use std::collections::BTreeMap;

use guestwatch_protocol::inventory::{Document, PackageRecord};
use serde::Serialize;

use crate::{Distribution, Facts, evr, id_of};

#[derive(Debug, Serialize)]
pub struct IndexReport<'a> {
    pub manifest_hash: String,
    pub state: &'static str,
    pub packages: BTreeMap<String, PackageEntry>,
    pub distributions: BTreeMap<String, DistributionEntry>,
    pub repositories: BTreeMap<String, RepositoryEntry>,
    pub environments: BTreeMap<String, Vec<Environment>>,
    pub success: bool,
    pub err: String,
    pub guestwatch: &'a Facts,
}

#[derive(Debug, Serialize)]
pub struct PackageEntry {
    pub id: String,
    pub name: String,
    pub version: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePackage>,
    pub package_db: String,
    pub repository_hint: String,
    pub normalized_version: String,
    pub arch: String,
    pub module: String,
}

#[derive(Debug, Serialize)]
pub struct SourcePackage {
    pub id: String,
    pub name: String,
    pub version: String,
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct DistributionEntry {
    pub id: String,
    #[serde(flatten)]
    pub distribution: Distribution,
    pub arch: String,
}

#[derive(Debug, Serialize)]
pub struct RepositoryEntry {
    pub id: String,
    pub name: String,
    pub key: &'static str,
    pub uri: String,
    pub cpe: String,
}

#[derive(Debug, Serialize)]
pub struct Environment {
    pub package_db: String,
    pub introduced_in: String,
    pub distribution_id: String,
    pub repository_ids: Vec<String>,
}

/// Marks repositories that come from dnf's history (claircore's repository `key`).
pub const DNF_REPOSITORY_KEY: &str = "dnf-repoid";

/// The content id of a package, used as its key in `packages` and `environments`.
pub fn package_id(p: &PackageRecord) -> String {
    id_of(&String::from_utf8_lossy(&p.canonical()))
}

/// Splits a source rpm file name (`curl-7.76.0-6.cm2.src.rpm`) into name and `version-release`.
pub fn split_sourcerpm(file: &str) -> Option<(&str, String)> {
    let stem = file
        .strip_suffix(".src.rpm")
        .or_else(|| file.strip_suffix(".nosrc.rpm"))?;
    let (rest, release) = stem.rsplit_once('-')?;
    let (name, version) = rest.rsplit_once('-')?;
    (!name.is_empty() && !version.is_empty() && !release.is_empty())
        .then(|| (name, format!("{version}-{release}")))
}

/// `name:stream` of a `name:stream:version:context` modularity label.
fn module(label: Option<&str>) -> String {
    label
        .map(|l| l.splitn(3, ':').take(2).collect::<Vec<_>>().join(":"))
        .unwrap_or_default()
}

/// Renders the IndexReport of `doc`, with guestwatch's `facts`.
pub fn render<'a>(doc: &Document, facts: &'a Facts) -> IndexReport<'a> {
    let package_db = doc.system.package_db.as_str();
    let distribution = doc.system.distribution.as_ref().map(|d| {
        let entry = DistributionEntry {
            id: id_of(&format!(
                "{}\0{}\0{}\0{}",
                d.did, d.version_id, d.name, d.cpe
            )),
            distribution: d.clone(),
            arch: String::new(),
        };
        (entry.id.clone(), entry)
    });
    let distribution_id = distribution
        .as_ref()
        .map(|(id, _)| id.clone())
        .unwrap_or_default();

    let mut repositories = BTreeMap::new();
    let mut packages = BTreeMap::new();
    let mut environments = BTreeMap::new();
    for p in &doc.packages {
        let id = package_id(p);
        let repo = p.repository.as_deref().map(|repoid| {
            let entry = RepositoryEntry {
                id: id_of(&format!("{DNF_REPOSITORY_KEY}\0{repoid}")),
                name: repoid.to_owned(),
                key: DNF_REPOSITORY_KEY,
                uri: String::new(),
                cpe: String::new(),
            };
            let repo_id = entry.id.clone();
            repositories.entry(repo_id.clone()).or_insert(entry);
            (repo_id, repoid)
        });
        let source = p
            .sourcerpm
            .as_deref()
            .and_then(split_sourcerpm)
            .map(|(name, vr)| {
                // The source shares the binary's epoch; the file name cannot carry it.
                let version = match p.epoch {
                    Some(e) => format!("{e}:{vr}"),
                    None => vr,
                };
                SourcePackage {
                    id: id_of(&format!("source\0{name}\0{version}")),
                    name: name.to_owned(),
                    version,
                    kind: "source",
                }
            });
        packages.insert(
            id.clone(),
            PackageEntry {
                id: id.clone(),
                name: p.name.clone(),
                version: evr(p),
                kind: "binary",
                source,
                package_db: package_db.to_owned(),
                repository_hint: repo
                    .as_ref()
                    .map(|(_, repoid)| format!("repoid={repoid}"))
                    .unwrap_or_default(),
                normalized_version: String::new(),
                arch: p.arch.clone().unwrap_or_default(),
                module: module(p.modularitylabel.as_deref()),
            },
        );
        environments.insert(
            id,
            vec![Environment {
                package_db: package_db.to_owned(),
                introduced_in: String::new(),
                distribution_id: distribution_id.clone(),
                repository_ids: repo.map(|(id, _)| id).into_iter().collect(),
            }],
        );
    }
    IndexReport {
        manifest_hash: format!("sha256:{}", facts.content_hash),
        state: "IndexFinished",
        packages,
        distributions: distribution.into_iter().collect(),
        repositories,
        environments,
        success: true,
        err: String::new(),
        guestwatch: facts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_rpm_names() {
        assert_eq!(
            split_sourcerpm("curl-7.76.0-6.cm2.src.rpm"),
            Some(("curl", "7.76.0-6.cm2".to_owned()))
        );
        assert_eq!(
            split_sourcerpm("python-rpm-generators-12-15.el9.src.rpm"),
            Some(("python-rpm-generators", "12-15.el9".to_owned()))
        );
        assert_eq!(split_sourcerpm("x-1.nosrc.rpm"), None);
        assert_eq!(split_sourcerpm("garbage"), None);
        assert_eq!(module(Some("nodejs:18:8080020230404:abcdef")), "nodejs:18");
        assert_eq!(module(None), "");
    }
}
