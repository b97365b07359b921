//! A CycloneDX 1.6 SBOM: one `library` component per package with a `pkg:rpm` purl, the
//! operating system as the metadata component, guestwatch's facts as properties.
//!
//! No timestamp and a serial number derived from the content: the same system gives the same
//! bytes, like the claircore report.

use rpmdb::Package;
use serde::Serialize;
use uuid::Uuid;

use crate::{Distribution, ReportInput, claircore, inventory::record};

/// `[epoch:]version-release` of a package.
fn evr(p: &Package) -> String {
    match p.epoch {
        Some(e) => format!("{e}:{}-{}", p.version, p.release),
        None => format!("{}-{}", p.version, p.release),
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bom {
    pub bom_format: &'static str,
    pub spec_version: &'static str,
    pub serial_number: String,
    pub version: u32,
    pub metadata: Metadata,
    pub components: Vec<Component>,
}

#[derive(Debug, Serialize)]
pub struct Metadata {
    pub tools: Tools,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<Component>,
    pub properties: Vec<Property>,
}

#[derive(Debug, Serialize)]
pub struct Tools {
    pub components: Vec<Component>,
}

#[derive(Debug, Default, Serialize)]
pub struct Component {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(rename = "bom-ref", skip_serializing_if = "Option::is_none")]
    pub bom_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supplier: Option<Entity>,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub licenses: Vec<LicenseChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purl: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<Property>,
}

#[derive(Debug, Serialize)]
pub struct Entity {
    pub name: String,
}

/// rpm's LICENSE is free text (often not SPDX), so it is carried as a license name.
#[derive(Debug, Serialize)]
pub struct LicenseChoice {
    pub license: License,
}

#[derive(Debug, Serialize)]
pub struct License {
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct Property {
    pub name: String,
    pub value: String,
}

fn property(name: &str, value: impl Into<String>) -> Property {
    Property {
        name: name.to_owned(),
        value: value.into(),
    }
}

/// Percent-encodes a purl segment: everything but unreserved characters (`+` included, as the
/// purl specification requires for rpm versions like `2.0+git`).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `pkg:rpm/<distro id>/<name>@<version>-<release>?arch=…&distro=<id>-<version_id>&epoch=…`,
/// qualifiers in the sorted order the purl specification asks for.
pub fn purl(p: &Package, distribution: Option<&Distribution>) -> String {
    let mut out = String::from("pkg:rpm/");
    if let Some(d) = distribution {
        out.push_str(&encode(&d.did.to_lowercase()));
        out.push('/');
    }
    out.push_str(&encode(&p.name));
    out.push('@');
    out.push_str(&encode(&format!("{}-{}", p.version, p.release)));
    let mut qualifiers = Vec::new();
    if let Some(arch) = &p.arch {
        qualifiers.push(format!("arch={}", encode(arch)));
    }
    if let Some(d) = distribution.filter(|d| !d.version_id.is_empty()) {
        qualifiers.push(format!(
            "distro={}",
            encode(&format!("{}-{}", d.did.to_lowercase(), d.version_id))
        ));
    }
    if let Some(epoch) = p.epoch {
        qualifiers.push(format!("epoch={epoch}"));
    }
    if !qualifiers.is_empty() {
        out.push('?');
        out.push_str(&qualifiers.join("&"));
    }
    out
}

/// The namespace of serial numbers: `Uuid::new_v5(&Uuid::NAMESPACE_URL,
/// b"urn:guestwatch:cyclonedx:serialNumber")`, fixed here so it can never drift.
const SERIAL_NAMESPACE: Uuid = uuid::uuid!("4fccf6be-5211-5bdb-8e97-fa5a145cf0d9");

/// The BOM's serial number: a name-based UUID of `seed` (the content hash and the database
/// path), the same for the same content.
///
/// Version 5 (SHA-1 over a fixed namespace and the name), not version 8 with SHA-256 bytes:
/// CycloneDX asks for an RFC 4122 UUID, which knows versions 1–5 only, so v5 is what every
/// consumer and schema check accepts. SHA-1 is only a mixing function here: the serial names a
/// document and proves nothing (the SHA-256 content hash in the properties does that).
fn serial_number(seed: &str) -> String {
    Uuid::new_v5(&SERIAL_NAMESPACE, seed.as_bytes())
        .urn()
        .to_string()
}

/// Builds the SBOM of `input`.
pub fn bom(input: &ReportInput<'_>) -> Bom {
    let distribution = input.system.distribution.as_ref();
    let facts = input.facts;
    let mut packages: Vec<&Package> = input.packages.iter().map(|p| &**p).collect();
    packages.sort_by_cached_key(|p| {
        (
            p.name.clone(),
            evr(p),
            p.arch.clone(),
            claircore::package_id(&record(p, input.system.repository_of(p))),
        )
    });
    let components = packages
        .into_iter()
        .map(|p| {
            let mut properties = vec![property("rpm:database", input.package_db)];
            if let Some(s) = &p.sourcerpm {
                properties.push(property("rpm:sourcerpm", s.as_str()));
            }
            if let Some(m) = &p.modularitylabel {
                properties.push(property("rpm:modularitylabel", m.as_str()));
            }
            if let Some(r) = input.system.repository_of(p) {
                properties.push(property("rpm:repository", r));
            }
            if let Some(s) = p.rsaheader.as_ref().or(p.pgp.as_ref()) {
                properties.push(property("rpm:signature", s.as_str()));
            }
            Component {
                kind: "library",
                bom_ref: Some(claircore::package_id(&record(
                    p,
                    input.system.repository_of(p),
                ))),
                supplier: p.vendor.clone().map(|name| Entity { name }),
                name: p.name.clone(),
                version: Some(evr(p)),
                description: p.summary.clone(),
                licenses: p
                    .license
                    .iter()
                    .map(|name| LicenseChoice {
                        license: License { name: name.clone() },
                    })
                    .collect(),
                purl: Some(purl(p, distribution)),
                properties,
                ..Component::default()
            }
        })
        .collect();
    let os = distribution.map(|d| Component {
        kind: "operating-system",
        bom_ref: Some("operating-system".into()),
        name: d.did.clone(),
        version: (!d.version_id.is_empty()).then(|| d.version_id.clone()),
        description: (!d.pretty_name.is_empty()).then(|| d.pretty_name.clone()),
        cpe: (!d.cpe.is_empty()).then(|| d.cpe.clone()),
        ..Component::default()
    });
    let mut properties = vec![
        property("guestwatch:agent_version", facts.agent_version.as_str()),
        property("guestwatch:detector", facts.detector.as_str()),
        property("guestwatch:backend", facts.backend.as_str()),
        property("guestwatch:database", facts.database.as_str()),
        property("guestwatch:package_count", facts.package_count.to_string()),
        property("guestwatch:content_hash", facts.content_hash.as_str()),
    ];
    if let Some(ms) = facts.scan_duration_ms {
        properties.push(property("guestwatch:scan_duration_ms", ms.to_string()));
    }
    properties.extend(
        facts
            .errors
            .iter()
            .map(|e| property("guestwatch:error", e.as_str())),
    );
    properties.extend(
        facts
            .gpg_pubkeys
            .iter()
            .map(|k| property("guestwatch:gpg_pubkey", k.as_str())),
    );
    Bom {
        bom_format: "CycloneDX",
        spec_version: "1.6",
        serial_number: serial_number(&format!("{}\0{}", facts.content_hash, input.package_db)),
        version: 1,
        metadata: Metadata {
            tools: Tools {
                components: vec![Component {
                    kind: "application",
                    name: "guestwatch-agent".into(),
                    version: Some(facts.agent_version.clone()),
                    ..Component::default()
                }],
            },
            component: os,
            properties,
        },
        components,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purls_encode_and_sort_qualifiers() {
        let p = Package {
            name: "libstdc++".into(),
            epoch: Some(1),
            version: "2.0+git".into(),
            release: "3.el9".into(),
            arch: Some("x86_64".into()),
            ..Default::default()
        };
        let d = Distribution {
            did: "rhel".into(),
            version_id: "9.4".into(),
            ..Default::default()
        };
        assert_eq!(
            purl(&p, Some(&d)),
            "pkg:rpm/rhel/libstdc%2B%2B@2.0%2Bgit-3.el9?arch=x86_64&distro=rhel-9.4&epoch=1"
        );
        let q = Package {
            name: "a".into(),
            version: "1".into(),
            release: "1".into(),
            ..Default::default()
        };
        assert_eq!(purl(&q, None), "pkg:rpm/a@1-1");
    }

    #[test]
    fn serial_numbers_are_version_5_uuids() {
        let s = serial_number("x");
        let id = Uuid::parse_str(s.strip_prefix("urn:uuid:").unwrap()).unwrap();
        assert_eq!(id.get_version(), Some(uuid::Version::Sha1));
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        // The textual form too: version nibble 5, variant bits 10.
        assert_eq!(&s[23..24], "5");
        assert!("89ab".contains(&s[28..29]), "{s}");
        // The namespace is the one its comment derives.
        assert_eq!(
            SERIAL_NAMESPACE,
            Uuid::new_v5(
                &Uuid::NAMESPACE_URL,
                b"urn:guestwatch:cyclonedx:serialNumber"
            )
        );
        // Deterministic, and as an independent implementation (Python's uuid.uuid5) computes it.
        assert_eq!(s, "urn:uuid:42819f11-a25b-59fd-917c-4fefbaf7a24f");
        assert_eq!(s, serial_number("x"));
        assert_ne!(s, serial_number("y"));
    }
}
