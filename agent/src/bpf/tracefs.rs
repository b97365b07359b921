//! Making sure tracefs is mounted: syscall tracepoints are attached by reading their ids from it,
//! and minimal systems (containers, initramfs guests, fresh CI machines) often lack the mount.

use std::{ffi::CString, io, path::Path};

const MOUNT_POINT: &str = "/sys/kernel/tracing";
const DEBUG_MOUNT_POINT: &str = "/sys/kernel/debug/tracing";

fn populated(dir: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// Mounts tracefs at `/sys/kernel/tracing` unless it (or the debugfs copy) is already there.
pub fn ensure_mounted() -> io::Result<()> {
    if populated(MOUNT_POINT) || populated(DEBUG_MOUNT_POINT) {
        return Ok(());
    }
    if !Path::new(MOUNT_POINT).is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{MOUNT_POINT} does not exist (kernel without tracefs?)"),
        ));
    }
    let source = CString::new("nodev").map_err(io::Error::other)?;
    let target = CString::new(MOUNT_POINT).map_err(io::Error::other)?;
    let fstype = CString::new("tracefs").map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; a null
    // `data` is allowed for tracefs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    log::info!("mounted tracefs at {MOUNT_POINT} (needed to attach syscall tracepoints)");
    Ok(())
}
