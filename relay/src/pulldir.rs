//! `--pull-dir DIR`: pulled VMs as they come and go, for VMMs that give every VM a hybrid-vsock
//! socket in one directory (Firecracker's and Cloud Hypervisor's `uds_path`).
//!
//! The rule: every Unix socket `DIR/NAME.vsock` is VM NAME's socket, dialed with
//! `CONNECT <--pull-port>`. Anything else is ignored — in particular the VMM's own listener
//! sockets for guest-initiated connections, `NAME.vsock_PORT`, and files that are not
//! sockets; a NAME that is not a valid VM name (letters, digits, `.`, `_`, `-`, not starting
//! with `.`, at most 64 bytes) is skipped and named in the result.

use std::{io, path::Path};

use crate::{
    identity::valid_vm_name,
    pull::{PullAddr, PullTarget},
};

/// The file name suffix of a VM's socket.
pub const SUFFIX: &str = ".vsock";

/// What a scan of the directory found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// One target per socket, sorted by name.
    pub targets: Vec<PullTarget>,
    /// Sockets whose names cannot be VM names.
    pub skipped: Vec<String>,
}

/// Lists the VMs in `dir`, dialed on guest port `port`. A directory that does not exist (yet)
/// holds no VMs.
pub fn scan(dir: &Path, port: u32) -> io::Result<Found> {
    use std::os::unix::fs::FileTypeExt;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::default()),
        Err(e) => return Err(e),
    };
    let mut found = Found::default();
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
            continue;
        };
        let path = entry.path();
        // Following a symlink is fine: the directory is the operator's.
        let is_socket = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_socket());
        if !is_socket {
            continue;
        }
        if !valid_vm_name(name) {
            found.skipped.push(file_name.to_string_lossy().into_owned());
            continue;
        }
        found.targets.push(PullTarget {
            name: name.to_owned(),
            addr: PullAddr::Hybrid { uds: path, port },
        });
    }
    found.targets.sort();
    found.skipped.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_named_name_vsock_are_vms() {
        let dir = tempfile::tempdir().unwrap();
        let bind = |name: &str| std::os::unix::net::UnixListener::bind(dir.path().join(name));
        let _a = bind("web-1.vsock").unwrap();
        let _b = bind("db_2.vsock").unwrap();
        // The VMM's listener for guest-initiated connections, a bad name, a plain file.
        let _c = bind("web-1.vsock_919").unwrap();
        let _d = bind(".hidden.vsock").unwrap();
        std::fs::write(dir.path().join("notes.vsock"), b"not a socket").unwrap();
        let found = scan(dir.path(), 919).unwrap();
        let names: Vec<&str> = found.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["db_2", "web-1"]);
        assert_eq!(
            found.targets[1].addr,
            PullAddr::Hybrid {
                uds: dir.path().join("web-1.vsock"),
                port: 919
            }
        );
        assert_eq!(found.skipped, [".hidden.vsock"]);
        assert_eq!(
            scan(&dir.path().join("missing"), 919).unwrap(),
            Found::default()
        );
    }
}
