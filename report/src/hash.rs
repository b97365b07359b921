//! The content hash of a package set.
//!
//! Each package's reported fields are joined with NUL bytes into one canonical line and
//! hashed (SHA-256); the per-package digests are sorted and hashed together. The hash changes
//! when any reported field of any package changes, never when only the order does, and costs
//! 32 bytes per package to compute.

use rpmdb::Package;
use sha2::{Digest, Sha256};

/// The canonical line of a package: every reported field, in a fixed order.
pub fn canonical(p: &Package) -> String {
    let o = |v: &Option<String>| v.clone().unwrap_or_default();
    let n = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
    [
        p.name.clone(),
        p.epoch.map(|e| e.to_string()).unwrap_or_default(),
        p.version.clone(),
        p.release.clone(),
        o(&p.arch),
        o(&p.sourcerpm),
        o(&p.license),
        o(&p.vendor),
        n(p.size),
        n(p.installtime),
        o(&p.sigmd5),
        o(&p.modularitylabel),
        o(&p.summary),
        p.provides.join("\u{1}"),
        p.requires.join("\u{1}"),
        o(&p.filedigestalgo),
        o(&p.pgp),
        o(&p.rsaheader),
    ]
    .join("\0")
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> Package {
        Package {
            name: name.into(),
            version: "1".into(),
            release: "1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn order_independent_and_field_sensitive() {
        let a = vec![p("a"), p("b"), p("c")];
        let b = vec![p("c"), p("a"), p("b")];
        assert_eq!(content_hash(&a), content_hash(&b));
        for change in [
            |p: &mut Package| p.license = Some("MIT".into()),
            |p: &mut Package| p.epoch = Some(0),
            |p: &mut Package| p.requires.push("x".into()),
            |p: &mut Package| p.installtime = Some(1),
        ] {
            let mut c = a.clone();
            change(&mut c[1]);
            assert_ne!(content_hash(&a), content_hash(&c));
        }
        assert_ne!(content_hash(&a), content_hash(&a[..2]));
    }
}
