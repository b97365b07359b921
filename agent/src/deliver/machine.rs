//! The machine the state directory belongs to: a hash of `/etc/machine-id`.
//!
//! VMs cloned from one image carry the image's state directory, and with it its epoch; their
//! report ids would collide. Binding the epoch to the machine-id (which systemd gives every
//! clone at first boot) makes each clone start its own epoch. Only a hash is kept: the
//! machine-id is meant to stay on the machine.

use std::{
    fs::File,
    io::{self, Read},
    path::Path,
};

use sha2::{Digest, Sha256};

/// What this machine's id is, as far as the agent can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineId {
    /// The hash (hex) of a valid machine-id.
    Known(String),
    /// No usable machine-id (missing, `uninitialized`, unreadable); why, for the log.
    Unknown(String),
}

impl MachineId {
    /// The machine-id of `name` inside `root` (`/` for the agent's own machine), resolved inside
    /// the root: a symlink in a scanned image cannot make the agent read the host's file.
    pub fn read_in_root(root: &Path, name: &Path) -> Self {
        Self::from_read(
            open_in_root(root, name),
            &root.join(name.strip_prefix("/").unwrap_or(name)),
        )
    }

    /// The machine-id in the file `path` (a test or operator override), read as it is.
    pub fn read_file(path: &Path) -> Self {
        Self::from_read(File::open(path), path)
    }

    fn from_read(file: io::Result<File>, shown: &Path) -> Self {
        let mut text = String::new();
        // A machine-id file is 33 bytes; more is not a machine-id.
        let read = file.and_then(|f| f.take(128).read_to_string(&mut text));
        match read {
            Ok(_) => Self::parse(&text)
                .unwrap_or_else(|why| Self::Unknown(format!("{}: {why}", shown.display()))),
            Err(e) => Self::Unknown(format!("{}: {e}", shown.display())),
        }
    }

    /// A machine-id is 32 hexadecimal digits (systemd writes them lower-case).
    fn parse(text: &str) -> Result<Self, &'static str> {
        let id = text.trim();
        if id.is_empty() || id == "uninitialized" {
            return Err("not initialised yet");
        }
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("not a machine-id");
        }
        let mut hasher = Sha256::new();
        // Domain-separated, so the stored value is useless as the machine-id elsewhere.
        hasher.update(b"guestwatch-agent machine-id\n");
        hasher.update(id.to_ascii_lowercase().as_bytes());
        Ok(Self::Known(hex::encode(hasher.finalize())))
    }

    pub fn hash(&self) -> Option<&str> {
        match self {
            Self::Known(hash) => Some(hash),
            Self::Unknown(_) => None,
        }
    }
}

/// Opens `name` with every component resolved inside `root` (`openat2` with
/// `RESOLVE_IN_ROOT`; where the kernel lacks it, a final symlink is refused with `O_NOFOLLOW`).
fn open_in_root(root: &Path, name: &Path) -> io::Result<File> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let root_dir = File::open(root)?;
    let relative = name.strip_prefix("/").unwrap_or(name);
    let c_name = std::ffi::CString::new(relative.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: `open_how` is plain data; all zeroes is its "no flags" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    use std::os::fd::AsRawFd;
    // SAFETY: openat2(2) with a valid directory descriptor, a NUL-terminated path and an
    // `open_how` of the size passed; the returned descriptor is owned by the File below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_dir.as_raw_fd(),
            c_name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor openat2 just returned, owned by nobody else.
        return Ok(unsafe { File::from_raw_fd(fd as i32) });
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::ENOSYS) {
        return Err(error);
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(root.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn valid_ids_hash_and_others_are_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine-id");
        std::fs::write(&path, format!("{ID}\n")).unwrap();
        let known = MachineId::read_file(&path);
        let hash = known.hash().unwrap().to_owned();
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(ID));
        std::fs::write(&path, ID.to_ascii_uppercase()).unwrap();
        assert_eq!(MachineId::read_file(&path).hash(), Some(hash.as_str()));
        for bad in ["", "uninitialized\n", "xyz", &"a".repeat(200)] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                matches!(MachineId::read_file(&path), MachineId::Unknown(_)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            MachineId::read_file(&dir.path().join("missing")),
            MachineId::Unknown(_)
        ));
    }

    #[test]
    fn a_symlink_in_a_root_resolves_inside_it() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("run")).unwrap();
        std::fs::write(outside.path().join("machine-id"), ID).unwrap();
        // An absolute link to a file outside the root does not reach it...
        std::os::unix::fs::symlink(
            outside.path().join("machine-id"),
            root.path().join("etc/machine-id"),
        )
        .unwrap();
        let id = MachineId::read_in_root(root.path(), Path::new("/etc/machine-id"));
        assert!(matches!(id, MachineId::Unknown(_)), "{id:?}");
        // ...while the usual /etc/machine-id -> /run/machine-id link works within the root.
        std::fs::remove_file(root.path().join("etc/machine-id")).unwrap();
        std::fs::write(root.path().join("run/machine-id"), ID).unwrap();
        std::os::unix::fs::symlink("/run/machine-id", root.path().join("etc/machine-id")).unwrap();
        let id = MachineId::read_in_root(root.path(), Path::new("/etc/machine-id"));
        assert!(id.hash().is_some(), "{id:?}");
    }
}
