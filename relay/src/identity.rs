//! Who a guest is: decided by the kernel, never by the guest.
//!
//! On AF_VSOCK the VM is the peer CID from `accept()` (CIDs 0–2 are the hypervisor, local and
//! host addresses, never a guest, and are rejected), named through an optional CID map file.
//! On hybrid vsock (Firecracker, Cloud Hypervisor) the VM is the Unix socket the connection
//! arrived on, named on the command line (`--hybrid NAME=UDS_PATH`). In pull mode the VM is
//! the target the relay dialed, named by its configuration (`--pull NAME=ADDR`, or the socket's
//! name in `--pull-dir`). What the guest says about itself in `Hello` is recorded as a claim
//! and cross-checked, never used as the key.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// How a VM was identified.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum IdentitySource {
    /// AF_VSOCK peer address.
    Vsock { cid: u32 },
    /// The hybrid-vsock Unix socket the connection arrived on.
    Hybrid { socket: PathBuf },
    /// Pull mode: the relay dialed this address (`vsock:CID:PORT`, `hybrid:UDS_PATH:PORT`
    /// or `unix:PATH`).
    Dialed { address: String },
}

/// A guest's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct VmIdentity {
    /// The VM's name: the key of everything the relay keeps and delivers.
    pub name: String,
    pub source: IdentitySource,
}

/// Why a peer is not accepted as a guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("CID {0} is reserved (0-2: hypervisor, local, host), not a guest")]
    ReservedCid(u32),
}

/// Why a CID map or a VM name is unusable.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// VM names become directory names and Redis keys: letters, digits, `.`, `_`, `-`, not
/// starting with `.`, at most 64 bytes.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// CID → VM name, from a file of `CID NAME` lines (`#` starts a comment).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidMap {
    names: HashMap<u32, String>,
    allow_loopback: bool,
}

impl CidMap {
    pub fn load(path: &Path) -> Result<Self, MapError> {
        Self::load_allowing_loopback(path, false)
    }

    /// Like [`CidMap::load`]; with `allow_loopback` (tests only, see
    /// [`CidMap::allow_loopback`]) the map may name CID 1 too.
    pub fn load_allowing_loopback(path: &Path, allow_loopback: bool) -> Result<Self, MapError> {
        let text = std::fs::read_to_string(path).map_err(|source| MapError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_allowing(&text, allow_loopback)
            .map(|map| map.allow_loopback(allow_loopback))
            .map_err(|(line, message)| MapError::Syntax {
                path: path.to_path_buf(),
                line,
                message,
            })
    }

    #[cfg(test)]
    fn parse(text: &str) -> Result<Self, (usize, String)> {
        Self::parse_allowing(text, false)
    }

    fn parse_allowing(text: &str, allow_loopback: bool) -> Result<Self, (usize, String)> {
        let mut names = HashMap::new();
        let mut seen_names = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(cid), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err((i + 1, "expected `CID NAME`".into()));
            };
            let cid: u32 = cid
                .parse()
                .map_err(|_| (i + 1, format!("`{cid}` is not a CID")))?;
            if cid <= 2 && !(cid == 1 && allow_loopback) {
                return Err((i + 1, format!("CID {cid} is reserved, not a guest")));
            }
            if !valid_vm_name(name) {
                return Err((
                    i + 1,
                    format!("`{name}` is not a valid VM name (letters, digits, . _ -)"),
                ));
            }
            if let Some(other) = seen_names.insert(name.to_owned(), cid) {
                return Err((i + 1, format!("`{name}` is already CID {other}")));
            }
            if names.insert(cid, name.to_owned()).is_some() {
                return Err((i + 1, format!("CID {cid} appears twice")));
            }
        }
        Ok(Self {
            names,
            allow_loopback: false,
        })
    }

    /// Accepts peers from CID 1 (`VMADDR_CID_LOCAL`): with the `vsock_loopback` transport every
    /// local connection arrives from CID 1, which is how a relay and an agent in the same
    /// machine are tested. Never for production: all local processes would share one identity.
    pub fn allow_loopback(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// The name a CID is configured with, if any.
    pub fn name_of(&self, cid: u32) -> Option<&str> {
        self.names.get(&cid).map(String::as_str)
    }

    /// The CID configured with `name`, if any.
    pub fn cid_of(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .find_map(|(cid, n)| (n == name).then_some(*cid))
    }

    /// The VM names whose connections must close when `self` is replaced by `next`: a CID that
    /// lost or changed its name (its guest comes back under the new one), and the `cid-N` of
    /// a CID that is named now.
    pub fn names_dropped_by(&self, next: &CidMap) -> Vec<String> {
        let mut dropped: Vec<String> = self
            .names
            .iter()
            .filter(|(cid, name)| next.names.get(cid) != Some(name))
            .map(|(_, name)| name.clone())
            .collect();
        dropped.extend(
            next.names
                .keys()
                .filter(|cid| !self.names.contains_key(cid))
                .map(|cid| format!("cid-{cid}")),
        );
        dropped.sort();
        dropped
    }

    /// The identity of an AF_VSOCK peer.
    pub fn identify(&self, cid: u32) -> Result<VmIdentity, IdentityError> {
        if cid <= 2 && !(cid == 1 && self.allow_loopback) {
            return Err(IdentityError::ReservedCid(cid));
        }
        let name = self
            .names
            .get(&cid)
            .cloned()
            .unwrap_or_else(|| format!("cid-{cid}"));
        Ok(VmIdentity {
            name,
            source: IdentitySource::Vsock { cid },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_vm_name("web-1.prod_eu"));
        assert!(!valid_vm_name(""));
        assert!(!valid_vm_name(".hidden"));
        assert!(!valid_vm_name("../etc"));
        assert!(!valid_vm_name("a/b"));
        assert!(!valid_vm_name(&"x".repeat(65)));
    }

    #[test]
    fn cid_map_and_reserved_cids() {
        let map = CidMap::parse("# fleet\n3 web-1\n4   db-1  # primary\n\n").unwrap();
        assert_eq!(map.identify(3).unwrap().name, "web-1");
        assert_eq!(map.identify(4).unwrap().name, "db-1");
        assert_eq!(map.identify(77).unwrap().name, "cid-77");
        assert_eq!(
            map.identify(77).unwrap().source,
            IdentitySource::Vsock { cid: 77 }
        );
        for cid in 0..=2 {
            assert_eq!(map.identify(cid), Err(IdentityError::ReservedCid(cid)));
        }
        let loopback = map.clone().allow_loopback(true);
        assert_eq!(loopback.identify(1).unwrap().name, "cid-1");
        assert!(loopback.identify(0).is_err() && loopback.identify(2).is_err());
        assert_eq!(CidMap::parse("2 host").unwrap_err().0, 1);
        assert!(CidMap::parse("3 a\n3 b").is_err());
        assert!(CidMap::parse("3 a\n4 a").is_err());
        assert!(CidMap::parse("3 ../x").is_err());
        assert!(CidMap::parse("three a").is_err());
        // Naming CID 1 only with --allow-loopback-cid (in-guest tests).
        assert!(CidMap::parse("1 local").is_err());
        let local = CidMap::parse_allowing("1 local", true).unwrap();
        assert_eq!(
            local.allow_loopback(true).identify(1).unwrap().name,
            "local"
        );
    }

    #[test]
    fn names_a_new_map_drops() {
        let old = CidMap::parse("3 web-1\n4 db-1\n5 cache-1\n").unwrap();
        let new = CidMap::parse("3 web-1\n4 db-2\n6 queue-1\n").unwrap();
        assert_eq!(old.names_dropped_by(&new), ["cache-1", "cid-6", "db-1"]);
        assert!(old.names_dropped_by(&old.clone()).is_empty());
        assert_eq!(new.cid_of("queue-1"), Some(6));
        assert_eq!(new.name_of(4), Some("db-2"));
        assert_eq!(new.name_of(5), None);
    }
}
