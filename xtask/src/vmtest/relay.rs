//! `guestwatch-relay` on the host, on the hybrid-vsock socket layout vhost-device-vsock
//! gives: `--hybrid vm1=<uds>` listens on `<uds>_PORT`, where the guest's connections to host
//! CID 2 port PORT arrive. Never `--vsock-port` here: AF_VSOCK on this host reaches the
//! infrastructure's VSOCK host, not the nested guest.

use std::{
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::machine::{VM_NAME, stop_child};

pub struct HostRelay {
    child: Option<Child>,
}

impl HostRelay {
    pub fn start(binary: &Path, uds: &Path, port: u32, sink: &Path, logs: &Path) -> Result<Self> {
        fs::create_dir_all(sink).with_context(|| format!("creating {}", sink.display()))?;
        let log_path = logs.join("relay.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(binary)
            .arg("run")
            .arg("--hybrid")
            .arg(format!("{VM_NAME}={}", uds.display()))
            .arg("--port")
            .arg(port.to_string())
            .arg("--sink")
            .arg(format!("dir:{}", sink.display()))
            .env("GUESTWATCH_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut relay = Self { child: Some(child) };
        let socket = socket_path(uds, port);
        let deadline = Instant::now() + Duration::from_secs(15);
        // Listening means a connection succeeds; a leftover socket file is not enough.
        while UnixStream::connect(&socket).is_err() {
            if let Some(child) = relay.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "guestwatch-relay exited with {status}; see {}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                relay.stop();
                bail!(
                    "guestwatch-relay is not listening on {} after 15 s; see {}",
                    socket.display(),
                    log_path.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(relay)
    }

    /// Stops the relay (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, "guestwatch-relay", Duration::from_secs(5));
        }
    }
}

impl Drop for HostRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn socket_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}
