//! The nested guest: `vhost-device-vsock` (the host side of the guest's virtio-vsock device,
//! hybrid vsock over Unix sockets) and QEMU under TCG.
//!
//! Only Unix sockets are used on the host: never `-accel kvm` and never the kernel's
//! vhost-vsock (`vhost-vsock-pci`), because this host is itself a VM whose VSOCK belongs to
//! the infrastructure. Every process started here is stopped by its PID on drop.

use std::{
    fs,
    io::Write,
    os::unix::{fs::FileTypeExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{setup, util::note};

/// The guest's CID on its virtio-vsock device.
pub const GUEST_CID: u32 = 3;
/// The host port the guest's agent connects to (the relay's default hybrid port).
pub const RELAY_PORT: u32 = 919;
/// The guest port the agent listens on in pull mode (the host relay dials it).
pub const PULL_PORT: u32 = 919;
/// What the host relay calls the guest.
pub const VM_NAME: &str = "vm1";

pub struct MachineConfig<'a> {
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    /// Logs: `serial.log`, `qemu.log`, `vhost-device-vsock.log`.
    pub logs: &'a Path,
    /// Where the Unix sockets go (short: socket paths are limited to 107 bytes).
    pub sockets: &'a Path,
    pub memory_mib: u32,
    /// The guest console on this terminal (and still in `serial.log`).
    pub interactive: bool,
}

pub struct Machine {
    vhost: Option<Child>,
    qemu: Option<Child>,
    sockets: PathBuf,
    pub serial_log: PathBuf,
    /// vhost-device-vsock's `--uds-path`.
    pub uds: PathBuf,
    pub started: Instant,
}

impl Machine {
    pub fn start(config: &MachineConfig) -> Result<(Self, Control)> {
        let vhost_binary = setup::vhost_device_vsock_path()
            .context("vhost-device-vsock is not installed: run `cargo xtask setup`")?;
        let qemu_binary = "qemu-system-x86_64";
        fs::create_dir_all(config.logs)?;
        let _ = fs::remove_dir_all(config.sockets);
        fs::create_dir_all(config.sockets)
            .with_context(|| format!("creating {}", config.sockets.display()))?;
        let vhost_socket = config.sockets.join("vhost-user-vsock.sock");
        let uds = config.sockets.join("vsock.uds");
        let control_socket = config.sockets.join("control.sock");
        let serial_log = config.logs.join("serial.log");
        let _ = fs::remove_file(&serial_log);

        let mut machine = Machine {
            vhost: None,
            qemu: None,
            sockets: config.sockets.to_path_buf(),
            serial_log: serial_log.clone(),
            uds: uds.clone(),
            started: Instant::now(),
        };

        let mut vhost = Command::new(&vhost_binary);
        // --uds-path selects the Unix-socket backend; the AF_VSOCK forwarding backend
        // (--forward-cid/--forward-listen) must never be used on this host.
        vhost
            .arg(format!("--guest-cid={GUEST_CID}"))
            .arg(format!("--socket={}", vhost_socket.display()))
            .arg(format!("--uds-path={}", uds.display()))
            .env("RUST_LOG", "info");
        machine.vhost = Some(spawn_logged(
            &mut vhost,
            &config.logs.join("vhost-device-vsock.log"),
        )?);
        wait_for_socket(&vhost_socket, Duration::from_secs(10), || {
            machine
                .vhost
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
        })
        .context("vhost-device-vsock did not create its vhost-user socket")?;

        let memory = format!("{}M", config.memory_mib);
        let console = if config.interactive {
            format!(
                "stdio,id=console,signal=on,logfile={}",
                serial_log.display()
            )
        } else {
            format!("file,id=console,path={}", serial_log.display())
        };
        let mut qemu = Command::new(qemu_binary);
        qemu.args(["-accel", "tcg", "-machine", "q35,memory-backend=mem"])
            .args(["-cpu", "max", "-smp", "1", "-m", &memory])
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={memory},share=on"
            ))
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(config.kernel)
            .arg("-initrd")
            .arg(config.initramfs)
            .arg("-append")
            .arg("console=ttyS0 quiet panic=-1 rdinit=/init")
            // ttyS0: the console, parsed by the runner. ttyS1: host → guest control words.
            .args(["-chardev", &console, "-serial", "chardev:console"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=control,path={},server=on,wait=off",
                control_socket.display()
            ))
            .args(["-serial", "chardev:control"])
            .arg("-chardev")
            .arg(format!("socket,id=vsock,path={}", vhost_socket.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock"]);
        note(&format!("$ {}", crate::util::display(&qemu)));
        machine.started = Instant::now();
        let qemu_log = config.logs.join("qemu.log");
        let child = if config.interactive {
            let log = fs::File::create(&qemu_log)?;
            qemu.stdin(Stdio::inherit())
                .stdout(Stdio::inherit())
                .stderr(log)
                .spawn()
                .context("starting qemu-system-x86_64: run `cargo xtask setup`")?
        } else {
            spawn_logged(&mut qemu, &qemu_log)?
        };
        machine.qemu = Some(child);
        wait_for_socket(&control_socket, Duration::from_secs(20), || {
            machine
                .qemu
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
        })
        .with_context(|| format!("QEMU did not start; see {}", qemu_log.display()))?;
        let control = Control {
            stream: UnixStream::connect(&control_socket)
                .with_context(|| format!("connecting {}", control_socket.display()))?,
        };
        Ok((machine, control))
    }

    /// QEMU's exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.qemu.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for QEMU to exit by itself (the guest powers off).
    pub fn wait_exit(&mut self, timeout: Option<Duration>) -> Option<ExitStatus> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            stop_child(qemu, "qemu-system-x86_64", Duration::from_secs(3));
        }
        if let Some(vhost) = self.vhost.take() {
            stop_child(vhost, "vhost-device-vsock", Duration::from_secs(3));
        }
        let _ = fs::remove_dir_all(&self.sockets);
    }
}

/// Host → guest words over the guest's second serial port.
pub struct Control {
    stream: UnixStream,
}

impl Control {
    pub fn send(&mut self, line: &str) -> Result<()> {
        self.stream
            .set_write_timeout(Some(Duration::from_secs(5)))?;
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("sending '{line}' to the guest"))
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| {
            format!(
                "starting {}: run `cargo xtask setup`",
                cmd.get_program().to_string_lossy()
            )
        })
}

/// Waits until `path` is a socket; fails early when the process that should create it died.
fn wait_for_socket(
    path: &Path,
    timeout: Duration,
    mut died: impl FnMut() -> Option<ExitStatus>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return Ok(());
        }
        if let Some(status) = died() {
            bail!(
                "the process exited with {status} before creating {}",
                path.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not appear within {} s",
                path.display(),
                timeout.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a child this runner started: SIGTERM by its PID, SIGKILL after `grace`, then reaps it.
pub fn stop_child(mut child: Child, name: &str, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // std can only SIGKILL; `kill -TERM PID` lets QEMU and the relay exit cleanly first.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    note(&format!(
        "{name} (pid {}) ignored SIGTERM; killing it",
        child.id()
    ));
    let _ = child.kill();
    let _ = child.wait();
}
