//! Harness for guestwatch's end-to-end tests (in `tests/tests/`): the real `guestwatch-agent`
//! and `guestwatch-relay` binaries as processes (so they can be killed with SIGKILL), a real
//! rpm database, real transactions, and the relay's sink read back for assertions.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub use guestwatch_testkit::{self as testkit, PackageSpec, RedisServer, RpmDb, build_packages};

/// The workspace's target directory, where the binaries are.
fn bin_dir() -> PathBuf {
    // tests/<exe> lives in target/<profile>/deps.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// Path of a workspace binary, building the binaries once if needed.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Benchmarks run from target/release: measure release binaries there.
        let release = bin_dir().ends_with("release");
        let status = Command::new(cargo)
            .args([
                "build",
                "--bins",
                "-p",
                "guestwatch-agent",
                "-p",
                "guestwatch-relay",
            ])
            .args(release.then_some("--release"))
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    bin_dir().join(name)
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed (SIGKILL) when dropped.
pub struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env("GUESTWATCH_LOG", "debug")
            .spawn()
            .expect("spawning");
        Self {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: a crash, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A relay with a `dir:` (or other) sink and hybrid sockets for the named VMs.
pub struct Relay {
    pub dir: PathBuf,
    pub sink: String,
    vms: Vec<String>,
    extra: Vec<String>,
    pub process: Process,
}

impl Relay {
    /// Starts a relay in `dir` for `vms`, with the dir sink at `dir/sink` unless `sink` is given.
    pub fn start(dir: &Path, vms: &[&str], sink: Option<&str>, extra: &[&str]) -> Self {
        let sink = sink
            .map(str::to_owned)
            .unwrap_or_else(|| format!("dir:{}", dir.join("sink").display()));
        let vms: Vec<String> = vms.iter().map(|s| (*s).to_owned()).collect();
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let process = Self::spawn(dir, &vms, &sink, &extra);
        let relay = Self {
            dir: dir.to_path_buf(),
            sink,
            vms,
            extra,
            process,
        };
        relay.wait_listening();
        relay
    }

    fn spawn(dir: &Path, vms: &[String], sink: &str, extra: &[String]) -> Process {
        let mut cmd = Command::new(binary("guestwatch-relay"));
        cmd.arg("run")
            .arg("--sink")
            .arg(sink)
            .args(["--idle-timeout", "20s"]);
        for vm in vms {
            cmd.arg("--hybrid").arg(format!(
                "{vm}={}",
                dir.join(format!("{vm}.vsock")).display()
            ));
        }
        cmd.args(extra);
        Process::spawn(&mut cmd, dir.join("relay.log"))
    }

    fn wait_listening(&self) {
        for vm in &self.vms {
            let socket = self.socket(vm);
            wait_for(
                &format!("the relay to listen on {}", socket.display()),
                Duration::from_secs(20),
                || std::os::unix::net::UnixStream::connect(&socket).ok(),
            );
        }
    }

    /// The socket an agent of `vm` connects to (`unix:` relay address).
    pub fn socket(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.vsock_919"))
    }

    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(&self.dir, &self.vms, &self.sink, &self.extra);
        self.wait_listening();
    }

    pub fn sink_dir(&self) -> PathBuf {
        self.dir.join("sink")
    }

    /// Every line of `deliveries.jsonl` (dir sink).
    pub fn deliveries(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.sink_dir().join("deliveries.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The VM's `latest.json` (dir sink).
    pub fn latest(&self, vm: &str) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.sink_dir().join("vms").join(vm).join("latest.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Package names in a delivered report document.
pub fn package_names(report: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = report["packages"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `name -> version` in a delivered report document.
pub fn package_versions(report: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    report["packages"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|p| {
                    Some((
                        p["name"].as_str()?.to_owned(),
                        p["version"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// An agent process on a database, delivering to a relay socket.
pub struct Agent {
    pub state: PathBuf,
    /// `--dbpath DIR` or `--root DIR`.
    target: [std::ffi::OsString; 2],
    relay: PathBuf,
    extra: Vec<String>,
    log: PathBuf,
    pub process: Process,
}

impl Agent {
    pub fn start(
        work: &Path,
        name: &str,
        dbpath: &Path,
        relay_socket: &Path,
        extra: &[&str],
    ) -> Self {
        Self::start_on(
            work,
            name,
            ["--dbpath".into(), dbpath.into()],
            relay_socket,
            extra,
        )
    }

    /// An agent on the system at `root` (`--root`): database located under it, distribution
    /// and dnf history read from it.
    pub fn start_root(
        work: &Path,
        name: &str,
        root: &Path,
        relay_socket: &Path,
        extra: &[&str],
    ) -> Self {
        Self::start_on(
            work,
            name,
            ["--root".into(), root.into()],
            relay_socket,
            extra,
        )
    }

    fn start_on(
        work: &Path,
        name: &str,
        target: [std::ffi::OsString; 2],
        relay_socket: &Path,
        extra: &[&str],
    ) -> Self {
        let state = work.join(format!("{name}-state"));
        let log = work.join(format!("{name}.log"));
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let process = Self::spawn(&state, &target, relay_socket, &extra, &log);
        Self {
            state,
            target,
            relay: relay_socket.to_path_buf(),
            extra,
            log,
            process,
        }
    }

    fn spawn(
        state: &Path,
        target: &[std::ffi::OsString; 2],
        relay: &Path,
        extra: &[String],
        log: &Path,
    ) -> Process {
        let mut cmd = Command::new(binary("guestwatch-agent"));
        cmd.arg("run")
            .args(target)
            .arg("--relay")
            .arg(format!("unix:{}", relay.display()))
            .arg("--state")
            .arg(state)
            .args(extra);
        Process::spawn(&mut cmd, log.to_path_buf())
    }

    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(
            &self.state,
            &self.target,
            &self.relay,
            &self.extra,
            &self.log,
        );
    }
}
