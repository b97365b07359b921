//! The claircore-compatible IndexReport.
//!
//! Field names and shapes follow claircore's JSON (`packages`, `distributions`,
//! `repositories`, `environments` keyed by id), so tooling that reads claircore reports reads
//! these. Ids derive from content and every map is ordered: the same system gives the same
//! bytes. guestwatch's own facts travel under the `guestwatch` key, which claircore ignores.

use guestwatch_protocol::inventory::{Document, PackageRecord};
use serde::{Serialize, Serializer, ser::SerializeMap};

use crate::{Distribution, Facts, evr, id_of, id_of_parts};

/// The report, borrowing from the document it renders: a large inventory costs a few
/// allocations per package, not one per field.
#[derive(Debug, Serialize)]
pub struct IndexReport<'a> {
    pub manifest_hash: String,
    pub state: &'static str,
    pub packages: ById<PackageEntry<'a>>,
    pub distributions: ById<DistributionEntry<'a>>,
    pub repositories: ById<RepositoryEntry<'a>>,
    pub environments: ById<[Environment<'a>; 1]>,
    pub success: bool,
    pub err: String,
    pub guestwatch: &'a Facts,
}

/// A JSON object keyed by id, in ascending key order (claircore's maps; the same bytes for
/// the same system): sorted once, rather than built up as a tree of owned keys.
#[derive(Debug)]
pub struct ById<T>(Vec<(String, T)>);

impl<T> ById<T> {
    /// Sorted by id; of entries with the same id the last is kept, as a map insert would.
    fn new(mut entries: Vec<(String, T)>) -> Self {
        entries.reverse();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|a, b| a.0 == b.0);
        Self(entries)
    }
}

impl<T: Serialize> Serialize for ById<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[derive(Debug, Serialize)]
pub struct PackageEntry<'a> {
    pub id: String,
    pub name: &'a str,
    pub version: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePackage<'a>>,
    pub package_db: &'a str,
    pub repository_hint: String,
    pub normalized_version: &'static str,
    pub arch: &'a str,
    pub module: String,
}

#[derive(Debug, Serialize)]
pub struct SourcePackage<'a> {
    pub id: String,
    pub name: &'a str,
    pub version: String,
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct DistributionEntry<'a> {
    pub id: String,
    #[serde(flatten)]
    pub distribution: &'a Distribution,
    pub arch: &'static str,
}

#[derive(Debug, Serialize)]
pub struct RepositoryEntry<'a> {
    pub id: String,
    pub name: &'a str,
    pub key: &'static str,
    pub uri: &'static str,
    pub cpe: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Environment<'a> {
    pub package_db: &'a str,
    pub introduced_in: &'static str,
    pub distribution_id: String,
    /// The package's repository, if dnf's history named one (a list of one or none).
    #[serde(serialize_with = "list_of_one")]
    pub repository_ids: Option<String>,
}

fn list_of_one<S: Serializer>(value: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(value)
}

/// Marks repositories that come from dnf's history (claircore's repository `key`).
pub const DNF_REPOSITORY_KEY: &str = "dnf-repoid";

/// The content id of a package, used as its key in `packages` and `environments`.
pub fn package_id(p: &PackageRecord) -> String {
    // The id of the canonical form read as UTF-8 with each invalid sequence replaced (as
    // `String::from_utf8_lossy` would), hashed as it is read rather than copied first.
    let replacement = char::REPLACEMENT_CHARACTER.to_string();
    let canonical = p.canonical();
    id_of_parts(canonical.utf8_chunks().flat_map(|chunk| {
        let invalid = (!chunk.invalid().is_empty()).then_some(replacement.as_str());
        [Some(chunk.valid()), invalid].into_iter().flatten()
    }))
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
pub fn render<'a>(doc: &'a Document, facts: &'a Facts) -> IndexReport<'a> {
    let package_db = doc.system.package_db.as_str();
    let distribution = doc.system.distribution.as_ref().map(|d| DistributionEntry {
        id: id_of(&format!(
            "{}\0{}\0{}\0{}",
            d.did, d.version_id, d.name, d.cpe
        )),
        distribution: d,
        arch: "",
    });
    let distribution_id = distribution
        .as_ref()
        .map(|d| d.id.clone())
        .unwrap_or_default();

    let mut repositories = Vec::new();
    let mut packages = Vec::with_capacity(doc.packages.len());
    let mut environments = Vec::with_capacity(doc.packages.len());
    for p in &doc.packages {
        let id = package_id(p);
        let repo = p.repository.as_deref().map(|repoid| {
            let repo_id = id_of(&format!("{DNF_REPOSITORY_KEY}\0{repoid}"));
            repositories.push((
                repo_id.clone(),
                RepositoryEntry {
                    id: repo_id.clone(),
                    name: repoid,
                    key: DNF_REPOSITORY_KEY,
                    uri: "",
                    cpe: "",
                },
            ));
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
                    name,
                    version,
                    kind: "source",
                }
            });
        packages.push((
            id.clone(),
            PackageEntry {
                id: id.clone(),
                name: &p.name,
                version: evr(p),
                kind: "binary",
                source,
                package_db,
                repository_hint: repo
                    .as_ref()
                    .map(|(_, repoid)| format!("repoid={repoid}"))
                    .unwrap_or_default(),
                normalized_version: "",
                arch: p.arch.as_deref().unwrap_or_default(),
                module: module(p.modularitylabel.as_deref()),
            },
        ));
        environments.push((
            id,
            [Environment {
                package_db,
                introduced_in: "",
                distribution_id: distribution_id.clone(),
                repository_ids: repo.map(|(id, _)| id),
            }],
        ));
    }
    IndexReport {
        manifest_hash: format!("sha256:{}", facts.content_hash),
        state: "IndexFinished",
        packages: ById::new(packages),
        distributions: ById::new(
            distribution
                .into_iter()
                .map(|d| (d.id.clone(), d))
                .collect(),
        ),
        repositories: ById::new(repositories),
        environments: ById::new(environments),
        success: true,
        err: String::new(),
        guestwatch: facts,
    }
}

#[cfg(test)]
mod tests {
    use guestwatch_protocol::inventory::SystemFacts;
    use serde_json::json;

    use super::*;

    /// Every shape the report has, against the JSON written out by hand: maps keyed by id in
    /// key order, the last of two same-id entries, a repository list of one or none.
    #[test]
    fn the_report_has_claircores_shape() {
        let curl = PackageRecord {
            name: "curl".into(),
            epoch: Some(1),
            version: "7.76.1".into(),
            release: "29.el9".into(),
            arch: Some("x86_64".into()),
            sourcerpm: Some("curl-7.76.1-29.el9.src.rpm".into()),
            modularitylabel: Some("curl:1:2:abc".into()),
            repository: Some("baseos".into()),
            ..PackageRecord::default()
        };
        let bare = PackageRecord {
            name: "bare".into(),
            version: "1".into(),
            release: "1".into(),
            ..PackageRecord::default()
        };
        let distribution = Distribution {
            did: "rhel".into(),
            name: "Red Hat Enterprise Linux".into(),
            version_id: "9.4".into(),
            ..Distribution::default()
        };
        let doc = Document::new(
            vec![curl.clone(), bare.clone()],
            SystemFacts {
                distribution: Some(distribution.clone()),
                package_db: "sqlite:var/lib/rpm".into(),
                ..SystemFacts::default()
            },
        );
        let facts = Facts::of_document("0.1.0", &doc);
        let report: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&render(&doc, &facts)).unwrap()).unwrap();
        let dist = id_of("rhel\x009.4\0Red Hat Enterprise Linux\0");
        let repo = id_of("dnf-repoid\0baseos");
        let (curl_id, bare_id) = (package_id(&curl), package_id(&bare));
        let package = |id: &str, p: &PackageRecord, source, hint: &str, module: &str| {
            json!({
                "id": id, "name": p.name, "version": evr(p), "kind": "binary",
                "source": source, "package_db": "sqlite:var/lib/rpm",
                "repository_hint": hint, "normalized_version": "",
                "arch": p.arch.clone().unwrap_or_default(), "module": module,
            })
        };
        let mut bare_entry = package(&bare_id, &bare, json!(null), "", "");
        bare_entry.as_object_mut().unwrap().remove("source");
        let expected = json!({
            "manifest_hash": format!("sha256:{}", facts.content_hash),
            "state": "IndexFinished",
            "packages": {
                curl_id.clone(): package(&curl_id, &curl, json!({
                    "id": id_of("source\0curl\x001:7.76.1-29.el9"), "name": "curl",
                    "version": "1:7.76.1-29.el9", "kind": "source",
                }), "repoid=baseos", "curl:1"),
                bare_id.clone(): bare_entry,
            },
            "distributions": {
                dist.clone(): {
                    "id": dist, "did": "rhel", "name": "Red Hat Enterprise Linux",
                    "version": "", "version_id": "9.4", "version_code_name": "",
                    "pretty_name": "", "cpe": "", "arch": "",
                },
            },
            "repositories": {
                repo.clone(): {"id": repo, "name": "baseos", "key": "dnf-repoid", "uri": "", "cpe": ""},
            },
            "environments": {
                curl_id: [{"package_db": "sqlite:var/lib/rpm", "introduced_in": "",
                           "distribution_id": dist, "repository_ids": [repo]}],
                bare_id: [{"package_db": "sqlite:var/lib/rpm", "introduced_in": "",
                           "distribution_id": dist, "repository_ids": []}],
            },
            "success": true,
            "err": "",
            "guestwatch": serde_json::to_value(&facts).unwrap(),
        });
        assert_eq!(report, expected);
        // Keys in ascending order in the bytes too.
        let by_id = ById::new(vec![
            ("b".to_owned(), 1),
            ("a".to_owned(), 2),
            ("b".to_owned(), 3),
        ]);
        assert_eq!(serde_json::to_string(&by_id).unwrap(), r#"{"a":2,"b":3}"#);
    }

    #[test]
    fn package_ids_are_the_lossy_canonical_forms_id() {
        let mut p = PackageRecord {
            name: "bash".into(),
            version: "5.1".into(),
            release: "1".into(),
            ..PackageRecord::default()
        };
        p.size = Some(200);
        // Length 0x82e2: its prefix starts with an incomplete UTF-8 sequence (e2 82).
        p.license = Some("x".repeat(0x82e2));
        assert_eq!(
            package_id(&p),
            id_of(&String::from_utf8_lossy(&p.canonical()))
        );
        assert_eq!(package_id(&p).len(), 16);
    }

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
