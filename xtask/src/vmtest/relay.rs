//! `guestwatch-relay` on the host, on the hybrid-vsock socket layout vhost-device-vsock
//! gives: `--hybrid vm1=<uds>` listens on `<uds>_PORT`, where the guest's connections to host
//! CID 2 port PORT arrive; in pull mode `--pull vm1=hybrid:<uds>:PORT` dials the guest's port
//! PORT through `<uds>` itself (`CONNECT PORT`). Never `--vsock-port` or a `vsock:` pull target
//! here: AF_VSOCK on this host reaches the infrastructure's VSOCK host, not the nested guest.

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
        let hybrid = format!("{VM_NAME}={}", uds.display());
        let port_arg = port.to_string();
        let mut relay = Self::spawn(
            binary,
            &["--hybrid", &hybrid, "--port", &port_arg],
            sink,
            logs,
        )?;
        let log_path = logs.join("relay.log");
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

    /// A relay that dials the guest's `guest_port` through vhost-device-vsock's `uds` (pull
    /// mode), ready once it says so.
    pub fn start_pull(
        binary: &Path,
        uds: &Path,
        guest_port: u32,
        sink: &Path,
        logs: &Path,
    ) -> Result<Self> {
        let pull = format!("{VM_NAME}=hybrid:{}:{guest_port}", uds.display());
        let log_path = logs.join("relay.log");
        let ready_before = ready_lines(&log_path);
        let mut relay = Self::spawn(binary, &["--pull", &pull], sink, logs)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while ready_lines(&log_path) <= ready_before {
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
                    "guestwatch-relay is not ready after 15 s; see {}",
                    log_path.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(relay)
    }

    fn spawn(binary: &Path, args: &[&str], sink: &Path, logs: &Path) -> Result<Self> {
        fs::create_dir_all(sink).with_context(|| format!("creating {}", sink.display()))?;
        let log_path = logs.join("relay.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(binary)
            .arg("run")
            .args(args)
            .arg("--sink")
            .arg(format!("dir:{}", sink.display()))
            .env("GUESTWATCH_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child: Some(child) })
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

/// How often the relay's log (appended across restarts) says it is ready.
fn ready_lines(log: &Path) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .matches("relay ready")
        .count()
}

fn socket_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}
