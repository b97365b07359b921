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

use std::collections::BTreeMap;

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

/// A relay with a `dir:` (or other) sink and hybrid sockets for the named VMs, and VMs it
/// dials (pull mode).
pub struct Relay {
    pub dir: PathBuf,
    pub sink: String,
    vms: Vec<String>,
    /// `NAME=ADDR` of every pulled VM.
    pulls: Vec<String>,
    extra: Vec<String>,
    pub process: Process,
}

impl Relay {
    /// Starts a relay in `dir` for `vms`, with the dir sink at `dir/sink` unless `sink` is given.
    pub fn start(dir: &Path, vms: &[&str], sink: Option<&str>, extra: &[&str]) -> Self {
        Self::start_with(dir, vms, &[], sink, extra)
    }

    /// Starts a relay that dials `pulls` (`(NAME, ADDR)`, e.g. `("vm1", "unix:/…")`), with hybrid
    /// listeners for `vms`.
    pub fn start_with(
        dir: &Path,
        vms: &[&str],
        pulls: &[(&str, String)],
        sink: Option<&str>,
        extra: &[&str],
    ) -> Self {
        let sink = sink
            .map(str::to_owned)
            .unwrap_or_else(|| format!("dir:{}", dir.join("sink").display()));
        let vms: Vec<String> = vms.iter().map(|s| (*s).to_owned()).collect();
        let pulls: Vec<String> = pulls
            .iter()
            .map(|(name, addr)| format!("{name}={addr}"))
            .collect();
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        // A relay started in this directory before wrote the same log.
        let ready_before = std::fs::read_to_string(dir.join("relay.log"))
            .unwrap_or_default()
            .matches("relay ready")
            .count();
        let process = Self::spawn(dir, &vms, &pulls, &sink, &extra);
        let relay = Self {
            dir: dir.to_path_buf(),
            sink,
            vms,
            pulls,
            extra,
            process,
        };
        relay.wait_listening(ready_before);
        relay
    }

    fn spawn(
        dir: &Path,
        vms: &[String],
        pulls: &[String],
        sink: &str,
        extra: &[String],
    ) -> Process {
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
        for pull in pulls {
            cmd.arg("--pull").arg(pull);
        }
        cmd.args(extra);
        Process::spawn(&mut cmd, dir.join("relay.log"))
    }

    /// How many times the relay said it is ready (its log is kept across restarts).
    fn times_ready(&self) -> usize {
        self.process.log().matches("relay ready").count()
    }

    fn wait_listening(&self, ready_before: usize) {
        wait_for("the relay to be ready", Duration::from_secs(20), || {
            (self.times_ready() > ready_before).then_some(())
        });
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
        let ready_before = self.times_ready();
        self.process = Self::spawn(&self.dir, &self.vms, &self.pulls, &self.sink, &self.extra);
        self.wait_listening(ready_before);
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

/// How an agent reaches its relay.
#[derive(Clone, Debug)]
enum Endpoint {
    /// `--relay unix:PATH` (push).
    Relay(PathBuf),
    /// `--listen unix:PATH` (pull: the relay dials it).
    Listen(PathBuf),
}

/// An agent process on a database, delivering to a relay socket or waiting for the relay on
/// its own.
pub struct Agent {
    pub state: PathBuf,
    /// `--dbpath DIR` or `--root DIR`.
    target: [std::ffi::OsString; 2],
    endpoint: Endpoint,
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
            Endpoint::Relay(relay_socket.to_path_buf()),
            extra,
        )
    }

    /// A pull-mode agent on a database: listens on `socket` for the relay (`--listen`).
    pub fn start_listening(
        work: &Path,
        name: &str,
        dbpath: &Path,
        socket: &Path,
        extra: &[&str],
    ) -> Self {
        Self::start_on(
            work,
            name,
            ["--dbpath".into(), dbpath.into()],
            Endpoint::Listen(socket.to_path_buf()),
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
            Endpoint::Relay(relay_socket.to_path_buf()),
            extra,
        )
    }

    fn start_on(
        work: &Path,
        name: &str,
        target: [std::ffi::OsString; 2],
        endpoint: Endpoint,
        extra: &[&str],
    ) -> Self {
        let state = work.join(format!("{name}-state"));
        let log = work.join(format!("{name}.log"));
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let process = Self::spawn(&state, &target, &endpoint, &extra, &log);
        Self {
            state,
            target,
            endpoint,
            extra,
            log,
            process,
        }
    }

    fn spawn(
        state: &Path,
        target: &[std::ffi::OsString; 2],
        endpoint: &Endpoint,
        extra: &[String],
        log: &Path,
    ) -> Process {
        let mut cmd = Command::new(binary("guestwatch-agent"));
        cmd.arg("run").args(target);
        match endpoint {
            Endpoint::Relay(path) => cmd.arg("--relay").arg(format!("unix:{}", path.display())),
            Endpoint::Listen(path) => cmd.arg("--listen").arg(format!("unix:{}", path.display())),
        };
        cmd.arg("--state").arg(state).args(extra);
        Process::spawn(&mut cmd, log.to_path_buf())
    }

    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(
            &self.state,
            &self.target,
            &self.endpoint,
            &self.extra,
            &self.log,
        );
    }
}

// Steps and checks the end-to-end tests share.

/// How long a delivery may take in the end-to-end tests.
pub const DELIVERY: Duration = Duration::from_secs(30);

/// Skips (saying why) when rpm is missing, except in CI where it must be there.
pub fn prerequisites() -> bool {
    if testkit::have_rpm_tools() {
        return true;
    }
    assert!(!testkit::in_ci(), "CI must have rpm and rpmbuild");
    eprintln!("SKIPPED: rpm/rpmbuild are not installed");
    false
}

/// A database with `n` generated packages.
pub fn base_db(work: &Path, n: usize) -> RpmDb {
    let db = RpmDb::at(work.join("rpmdb")).unwrap();
    let rpms = build_packages(&testkit::generated_specs("base", n), &work.join("rpms")).unwrap();
    db.install(&rpms).unwrap();
    db
}

pub fn pkg(work: &Path, name: &str, version: &str) -> Vec<PathBuf> {
    build_packages(&[PackageSpec::new(name, version, "1")], &work.join("rpms")).unwrap()
}

/// `name -> version-release` of the database, as rpm sees it.
pub fn db_state(db: &RpmDb) -> BTreeMap<String, String> {
    db.query("%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n")
        .unwrap()
        .into_iter()
        .filter_map(|l| l.split_once(' ').map(|(n, v)| (n.to_owned(), v.to_owned())))
        .collect()
}

/// Waits until the VM's latest report equals the database and its delivery is logged: both,
/// since the dir sink appends to `deliveries.jsonl` before it replaces `latest.json` and a
/// reader may see one without the other.
pub fn wait_synced(relay: &Relay, vm: &str, db: &RpmDb, what: &str) -> serde_json::Value {
    let want = db_state(db);
    wait_for(what, DELIVERY, || {
        let latest = relay.latest(vm)?;
        let id = latest["delivery"]["report_id"].as_str()?.to_owned();
        (package_versions(&latest["report"]) == want
            && relay
                .deliveries()
                .iter()
                .any(|d| d["report_id"] == id.as_str()))
        .then_some(latest)
    })
}

/// A file of the agent's state directory, trimmed.
pub fn state_file(agent: &Agent, name: &str) -> Option<String> {
    std::fs::read_to_string(agent.state.join(name))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// No report was delivered twice as new: report ids are unique and consecutive deliveries of
/// a VM differ in content.
pub fn assert_no_double_delivery(relay: &Relay) {
    let deliveries = relay.deliveries();
    let mut ids = std::collections::HashSet::new();
    let mut last: BTreeMap<String, (String, String)> = BTreeMap::new();
    for d in &deliveries {
        let vm = d["vm"].as_str().unwrap().to_owned();
        let id = d["report_id"].as_str().unwrap().to_owned();
        let hash = d["content_hash"].as_str().unwrap().to_owned();
        // The dir sink appends its logs before it replaces the latest files, so a relay killed
        // in between logs that delivery again when the guest retransmits: the same line right
        // after itself, which consumers drop by its idempotency key (docs/operations.md).
        if last.get(&vm) == Some(&(id.clone(), hash.clone())) {
            continue;
        }
        assert!(
            ids.insert((vm.clone(), id.clone())),
            "report {id} of {vm} delivered twice"
        );
        let before = last.insert(vm.clone(), (id, hash.clone()));
        assert_ne!(
            before.map(|(_, h)| h),
            Some(hash),
            "{vm}: same content delivered twice as new"
        );
    }
}

/// A loopback address nothing listens on yet.
pub fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

/// The value of one series (`name` with its labels, as exposed) on a `/metrics` endpoint.
pub fn metric(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A Unix-socket proxy between an agent and a relay that counts the bytes the agent sends.
pub struct CountingProxy {
    pub path: PathBuf,
    upstream: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingProxy {
    /// Listens on `path` and forwards every connection to `target`.
    pub fn start(path: &Path, target: &Path) -> Self {
        use std::{
            os::unix::net::{UnixListener, UnixStream},
            sync::{Arc, atomic::AtomicU64},
        };
        let listener = UnixListener::bind(path).unwrap();
        let upstream = Arc::new(AtomicU64::new(0));
        let (counter, target) = (upstream.clone(), target.to_path_buf());
        std::thread::spawn(move || {
            for agent in listener.incoming() {
                let Ok(agent) = agent else { return };
                let Ok(relay) = UnixStream::connect(&target) else {
                    continue;
                };
                let (Ok(agent_w), Ok(relay_r)) = (agent.try_clone(), relay.try_clone()) else {
                    continue;
                };
                let counter = counter.clone();
                std::thread::spawn(move || copy(agent, relay, Some(&counter)));
                std::thread::spawn(move || copy(relay_r, agent_w, None));
            }
        });
        Self {
            path: path.to_path_buf(),
            upstream,
        }
    }

    /// Bytes the agent has sent so far.
    pub fn upstream(&self) -> u64 {
        self.upstream.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn copy(
    mut from: std::os::unix::net::UnixStream,
    mut to: std::os::unix::net::UnixStream,
    count: Option<&std::sync::atomic::AtomicU64>,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(count) = count {
            count.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
