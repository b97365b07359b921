//! Socket files the daemons listen on: the agent's pull-mode socket, the relay's hybrid-vsock
//! sockets.

use std::{io, path::Path};

/// Makes way for binding a Unix socket at `path`: a socket file left there by an earlier run
/// is removed; any other kind of file is refused (`AlreadyExists`) and left alone, so a
/// mistyped path cannot delete data. Nothing there is fine.
pub fn remove_stale(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn stale_sockets_go_and_other_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vm.sock");
        remove_stale(&socket).unwrap();
        drop(UnixListener::bind(&socket).unwrap());
        assert!(
            UnixListener::bind(&socket).is_err(),
            "the old file is in the way"
        );
        remove_stale(&socket).unwrap();
        assert!(!socket.exists());
        UnixListener::bind(&socket).unwrap();

        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        let err = remove_stale(&file).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");

        // A symlink is judged itself, not by what it points to.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&socket, &link).unwrap();
        assert!(remove_stale(&link).is_err());
        assert!(socket.exists());
    }
}
