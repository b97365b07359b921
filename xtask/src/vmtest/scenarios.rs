//! The scenario table: what runs in the guest, what the host does alongside, and what each
//! proves.
//!
//! A scenario is a guest script (`guest/scenarios/NAME.sh`, busybox sh with the helpers of
//! `guest/lib.sh`) plus a host side ([`HostSide`]). They run in lockstep: the guest marks
//! `begin`, the host prepares (starts a listener or the relay) and answers; the guest sends
//! `gw_signal WORD` when something happened and waits with `gw_wait WORD` for the host, whose
//! [`HostSide::signal`] checks the host's end and answers with [`HostEnv::release`]; at `end`
//! the host adds its verdict and cleans up. Adding a scenario is one script, one table row,
//! and (if the host takes part) one `HostSide`.

use std::{
    io::Read,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    machine::{Control, PULL_PORT, RELAY_PORT, VM_NAME},
    relay::HostRelay,
};

pub struct Scenario {
    pub name: &'static str,
    /// One line: what passing proves.
    pub proves: &'static str,
    /// The guest script (run by `sh` with `/gw/config.sh` and `/gw/lib.sh` sourced).
    pub guest: &'static str,
    /// The guest kills the script after this long; the host allows a little more.
    pub timeout: Duration,
    pub host: fn() -> Box<dyn HostSide>,
}

/// Every scenario, in the order they run.
pub fn table() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "boot",
            proves: "the guest kernel boots with its vsock modules, BTF and bpf/tracing file systems",
            guest: include_str!("guest/scenarios/boot.sh"),
            timeout: Duration::from_secs(30),
            host: || Box::new(GuestOnly),
        },
        Scenario {
            name: "ebpf-in-guest",
            proves: "the agent's BPF object loads in the guest's 6.1 kernel and sees `rpm -i`",
            guest: include_str!("guest/scenarios/ebpf-in-guest.sh"),
            timeout: Duration::from_secs(120),
            host: || Box::new(GuestOnly),
        },
        Scenario {
            name: "vsock-path",
            proves: "guest AF_VSOCK to host CID 2 arrives on the host's <uds>_PORT; vsock_loopback works",
            guest: include_str!("guest/scenarios/vsock-path.sh"),
            timeout: Duration::from_secs(90),
            host: || Box::new(VsockPath::default()),
        },
        // The AF_VSOCK agent → relay scenarios.
        Scenario {
            name: "first-report",
            proves: "the agent's first report crosses AF_VSOCK to the host relay's sink",
            guest: include_str!("guest/scenarios/first-report.sh"),
            timeout: Duration::from_secs(120),
            host: || Box::new(FirstReport::default()),
        },
        Scenario {
            name: "rpm-delivered",
            proves: "`rpm -i` in the guest is detected by eBPF, attributed and delivered to the host sink",
            guest: include_str!("guest/scenarios/rpm-delivered.sh"),
            timeout: Duration::from_secs(180),
            host: || Box::new(RpmDelivered::default()),
        },
        Scenario {
            name: "relay-restart",
            proves: "a change made while the host relay is down is delivered after it restarts",
            guest: include_str!("guest/scenarios/relay-restart.sh"),
            timeout: Duration::from_secs(300),
            host: || Box::new(RelayRestart::default()),
        },
        Scenario {
            name: "pull-hybrid",
            proves: "pull mode: the host relay dials the guest's agent through vhost-device-vsock (CONNECT/OK), a guest change reaches the host sink, CID 1 is refused",
            guest: include_str!("guest/scenarios/pull-hybrid.sh"),
            timeout: Duration::from_secs(180),
            host: || Box::new(PullHybrid::default()),
        },
        Scenario {
            name: "bpf-refused",
            proves: "without CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN the kernel refuses the BPF programs; the agent falls back to inotify, says why once, and delivers a change",
            guest: include_str!("guest/scenarios/bpf-refused.sh"),
            timeout: Duration::from_secs(180),
            host: || Box::new(BpfRefused::default()),
        },
        Scenario {
            name: "loopback-relay",
            proves: "the relay's own AF_VSOCK listener works, agent and relay both in the guest",
            guest: include_str!("guest/scenarios/loopback-relay.sh"),
            timeout: Duration::from_secs(120),
            host: || Box::new(GuestOnly),
        },
        Scenario {
            name: "cid-map-reload",
            proves: "the relay reloads its CID map on change: the renamed CID's connection is closed and its next report arrives under the new name, no restart",
            guest: include_str!("guest/scenarios/cid-map-reload.sh"),
            timeout: Duration::from_secs(180),
            host: || Box::new(GuestOnly),
        },
    ]
}

/// Ports the guest scripts use, written to `/gw/config.sh`.
pub const PROBE_PORT: u32 = 5000;
pub const LOOPBACK_PORT: u32 = 6000;
pub const LOOPBACK_RELAY_PORT: u32 = 1919;

/// What a host side can use while its scenario runs.
pub struct HostEnv {
    /// vhost-device-vsock's `--uds-path`: a guest connection to host port P arrives on `<uds>_P`.
    pub uds: PathBuf,
    /// A fresh directory for this scenario's host files (sinks, logs).
    pub scratch: PathBuf,
    pub relay_binary: PathBuf,
    /// When the guest line being handled was read (for latency measurements).
    pub line_at: Instant,
    pub(super) scenario: String,
    pub(super) control: Control,
}

impl HostEnv {
    /// Answers the guest's `gw_wait WORD`.
    pub fn release(&mut self, word: &str) -> Result<()> {
        let line = format!("{}:{word}", self.scenario);
        self.control.send(&line)
    }

    /// The Unix socket a guest connection to host port `port` arrives on.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    /// Starts a host relay that dials the guest's agent (pull mode) through
    /// vhost-device-vsock's `--uds-path`, with a `dir:` sink in `sink`.
    pub fn start_pull_relay(&self, sink: &Path) -> Result<HostRelay> {
        HostRelay::start_pull(
            &self.relay_binary,
            &self.uds,
            PULL_PORT,
            sink,
            &self.scratch,
        )
    }

    /// Starts the host relay on the hybrid socket layout, with a `dir:` sink in `sink`.
    pub fn start_relay(&self, sink: &Path) -> Result<HostRelay> {
        HostRelay::start(
            &self.relay_binary,
            &self.uds,
            RELAY_PORT,
            sink,
            &self.scratch,
        )
    }
}

/// The host's part in a scenario. Every method is bounded in time.
pub trait HostSide {
    /// Before the guest script starts.
    fn begin(&mut self, _env: &mut HostEnv) -> Result<()> {
        Ok(())
    }

    /// The guest ran `gw_signal WORD`. An error aborts the scenario in the guest.
    fn signal(&mut self, word: &str, _env: &mut HostEnv) -> Result<()> {
        bail!("the host side expects no signal, got '{word}'")
    }

    /// After the guest script ended successfully: the host's checks, and details for the
    /// result line.
    fn verdict(&mut self, _env: &mut HostEnv) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Always called last: stop what `begin` started.
    fn end(&mut self, _env: &mut HostEnv) {}
}

/// Scenarios the guest proves on its own.
struct GuestOnly;

impl HostSide for GuestOnly {}

/// The exact bytes `seq 1 20000` writes.
fn probe_payload() -> Vec<u8> {
    (1..=20000)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// A Unix listener on `<uds>_PROBE_PORT`, reading until the expected bytes are there:
/// hybrid vsock does not pass end-of-stream through, so it never waits for EOF.
#[derive(Default)]
struct VsockPath {
    received: Option<mpsc::Receiver<Result<(usize, Duration)>>>,
    socket: Option<PathBuf>,
    details: Vec<String>,
}

impl HostSide for VsockPath {
    fn begin(&mut self, env: &mut HostEnv) -> Result<()> {
        let path = env.port_path(PROBE_PORT);
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        self.socket = Some(path);
        let (tx, rx) = mpsc::channel();
        self.received = Some(rx);
        thread::spawn(move || {
            let _ = tx.send(receive_probe(&listener, &probe_payload()));
        });
        Ok(())
    }

    fn signal(&mut self, word: &str, env: &mut HostEnv) -> Result<()> {
        if word != "sent" {
            bail!("unexpected signal '{word}'");
        }
        let rx = self.received.as_ref().context("no listener")?;
        let (bytes, took) = rx
            .recv_timeout(Duration::from_secs(20))
            .context("the host listener got nothing within 20 s of the guest's send")??;
        self.details.push(format!(
            "{bytes} bytes guest→host over AF_VSOCK in {} ms",
            took.as_millis()
        ));
        env.release("received")
    }

    fn verdict(&mut self, _env: &mut HostEnv) -> Result<Vec<String>> {
        if self.details.is_empty() {
            bail!("the host never confirmed receiving the guest's bytes");
        }
        Ok(std::mem::take(&mut self.details))
    }

    fn end(&mut self, _env: &mut HostEnv) {
        if let Some(path) = self.socket.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn receive_probe(listener: &UnixListener, expected: &[u8]) -> Result<(usize, Duration)> {
    // The listener thread is bounded: accept polls, reads time out.
    let deadline = Instant::now() + Duration::from_secs(60);
    listener.set_nonblocking(true)?;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("no guest connection arrived on the hybrid socket");
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accepting the guest's connection"),
        }
    };
    let started = Instant::now();
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut got = Vec::with_capacity(expected.len());
    let mut buf = [0u8; 16 * 1024];
    while got.len() < expected.len() {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the guest's bytes ({} so far)", got.len()))?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    if got != expected {
        bail!(
            "the host received {} bytes, not the {} the guest sent (or different ones)",
            got.len(),
            expected.len()
        );
    }
    Ok((got.len(), started.elapsed()))
}

/// Polls `<sink>/vms/vm1/latest.json` until it contains `needle`; returns the content.
fn wait_for_sink(sink: &Path, needle: &str, timeout: Duration) -> Result<String> {
    let latest = sink.join("vms").join(VM_NAME).join("latest.json");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(content) = std::fs::read_to_string(&latest)
            && content.contains(needle)
        {
            return Ok(content);
        }
        if Instant::now() > deadline {
            bail!(
                "{} does not name {needle} after {} s",
                latest.display(),
                timeout.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The report must say which process made the change. Field names are the report's
/// (issue 4); whitespace is ignored so pretty-printed JSON matches too.
fn has_rpm_attribution(report: &str) -> bool {
    let compact: String = report.chars().filter(|c| !c.is_whitespace()).collect();
    compact.contains("\"comm\":\"rpm\"")
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[derive(Default)]
struct FirstReport {
    relay: Option<HostRelay>,
    details: Vec<String>,
}

impl HostSide for FirstReport {
    fn begin(&mut self, env: &mut HostEnv) -> Result<()> {
        self.relay = Some(env.start_relay(&env.scratch.join("sink"))?);
        Ok(())
    }

    fn signal(&mut self, word: &str, env: &mut HostEnv) -> Result<()> {
        if word != "agent-starting" {
            bail!("unexpected signal '{word}'");
        }
        let started = env.line_at;
        wait_for_sink(
            &env.scratch.join("sink"),
            "gw-vmtest-base",
            Duration::from_secs(90),
        )?;
        self.details.push(format!(
            "first report at the host sink {} after the agent started",
            ms(started.elapsed())
        ));
        env.release("delivered")
    }

    fn verdict(&mut self, _env: &mut HostEnv) -> Result<Vec<String>> {
        Ok(std::mem::take(&mut self.details))
    }

    fn end(&mut self, _env: &mut HostEnv) {
        self.relay = None;
    }
}

#[derive(Default)]
struct RpmDelivered {
    relay: Option<HostRelay>,
    /// Guest change (rpm -i starting) → report naming the package at the host sink.
    latencies: Vec<Duration>,
}

impl HostSide for RpmDelivered {
    fn begin(&mut self, env: &mut HostEnv) -> Result<()> {
        self.relay = Some(env.start_relay(&env.scratch.join("sink"))?);
        Ok(())
    }

    fn signal(&mut self, word: &str, env: &mut HostEnv) -> Result<()> {
        let sink = env.scratch.join("sink");
        if word == "agent-started" {
            wait_for_sink(&sink, "gw-vmtest-base", Duration::from_secs(90))?;
            return env.release("first-delivered");
        }
        let Some(n) = word.strip_prefix("installing-") else {
            bail!("unexpected signal '{word}'");
        };
        let changed = env.line_at;
        let package = format!("gw-vmtest-new-{n}");
        let report = wait_for_sink(&sink, &package, Duration::from_secs(60))?;
        self.latencies.push(changed.elapsed());
        if !has_rpm_attribution(&report) {
            bail!(
                "the report delivered for {package} does not attribute the change to comm \"rpm\" \
                 ({}/vms/{VM_NAME}/latest.json)",
                sink.display()
            );
        }
        env.release(&format!("delivered-{n}"))
    }

    fn verdict(&mut self, _env: &mut HostEnv) -> Result<Vec<String>> {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let (Some(min), Some(max)) = (sorted.first(), sorted.last()) else {
            bail!("no change was timed");
        };
        Ok(vec![format!(
            "guest change → host sink ({} rpm -i, attributed to rpm): min {}, median {}, max {}",
            sorted.len(),
            ms(*min),
            ms(sorted[sorted.len() / 2]),
            ms(*max)
        )])
    }

    fn end(&mut self, _env: &mut HostEnv) {
        self.relay = None;
    }
}

#[derive(Default)]
struct RelayRestart {
    relay: Option<HostRelay>,
    details: Vec<String>,
}

impl HostSide for RelayRestart {
    fn begin(&mut self, env: &mut HostEnv) -> Result<()> {
        self.relay = Some(env.start_relay(&env.scratch.join("sink"))?);
        Ok(())
    }

    fn signal(&mut self, word: &str, env: &mut HostEnv) -> Result<()> {
        let sink = env.scratch.join("sink");
        match word {
            "agent-started" => {
                wait_for_sink(&sink, "gw-vmtest-base", Duration::from_secs(90))?;
                env.release("first-delivered")
            }
            "stop-relay" => {
                if let Some(mut relay) = self.relay.take() {
                    relay.stop();
                }
                env.release("relay-stopped")
            }
            "installed-while-down" => {
                // Let the agent detect the change and fail to deliver it first.
                thread::sleep(Duration::from_secs(3));
                self.relay = Some(env.start_relay(&sink)?);
                let restarted = Instant::now();
                wait_for_sink(&sink, "gw-vmtest-while-down", Duration::from_secs(120))?;
                self.details.push(format!(
                    "change made while the relay was down delivered {} after its restart",
                    ms(restarted.elapsed())
                ));
                env.release("delivered-after-restart")
            }
            _ => bail!("unexpected signal '{word}'"),
        }
    }

    fn verdict(&mut self, _env: &mut HostEnv) -> Result<Vec<String>> {
        Ok(std::mem::take(&mut self.details))
    }

    fn end(&mut self, _env: &mut HostEnv) {
        self.relay = None;
    }
}

#[derive(Default)]
struct PullHybrid {
    relay: Option<HostRelay>,
    details: Vec<String>,
}

impl HostSide for PullHybrid {
    fn signal(&mut self, word: &str, env: &mut HostEnv) -> Result<()> {
        let sink = env.scratch.join("sink");
        match word {
            "agent-listening" => {
                let started = env.line_at;
                self.relay = Some(env.start_pull_relay(&sink)?);
                wait_for_sink(&sink, "gw-vmtest-base", Duration::from_secs(90))?;
                self.details.push(format!(
                    "host dialed the guest: first report at the host sink {} after the agent listened",
                    ms(started.elapsed())
                ));
                env.release("first-delivered")
            }
            "installing" => {
                let changed = env.line_at;
                let report = wait_for_sink(&sink, "gw-vmtest-pulled", Duration::from_secs(60))?;
                let took = changed.elapsed();
                let compact: String = report.chars().filter(|c| !c.is_whitespace()).collect();
                if !compact.contains("\"source\":\"dialed\"") {
                    bail!(
                        "the delivered report's identity is not the dialed target: {}",
                        sink.display()
                    );
                }
                self.details.push(format!(
                    "guest change → host sink over the pulled session: {}",
                    ms(took)
                ));
                env.release("delivered")
            }
            _ => bail!("unexpected signal '{word}'"),
        }
    }

    fn verdict(&mut self, _env: &mut HostEnv) -> Result<Vec<String>> {
        Ok(std::mem::take(&mut self.details))
    }

    fn end(&mut self, _env: &mut HostEnv) {
        self.relay = None;
    }
}

#[derive(Default)]
struct BpfRefused {
    relay: Option<HostRelay>,
    details: Vec<String>,
}

impl HostSide for BpfRefused {
    fn begin(&mut self, env: &mut HostEnv) -> Result<()> {
        self.relay = Some(env.start_relay(&env.scratch.join("sink"))?);
        Ok(())
    }

    fn signal(&mut self, word: &str, env: &mut HostEnv) -> Result<()> {
        let sink = env.scratch.join("sink");
        match word {
            "agent-started" => {
                wait_for_sink(&sink, "gw-vmtest-base", Duration::from_secs(90))?;
                env.release("first-delivered")
            }
            "installing" => {
                let changed = env.line_at;
                let report = wait_for_sink(&sink, "gw-vmtest-nobpf", Duration::from_secs(60))?;
                let compact: String = report.chars().filter(|c| !c.is_whitespace()).collect();
                if !compact.contains("\"kind\":\"inotify\"") {
                    bail!(
                        "the change was not delivered as an inotify trigger ({}/vms/{VM_NAME}/latest.json)",
                        sink.display()
                    );
                }
                self.details.push(format!(
                    "inotify change → host sink {}",
                    ms(changed.elapsed())
                ));
                env.release("delivered")
            }
            _ => bail!("unexpected signal '{word}'"),
        }
    }

    fn verdict(&mut self, _env: &mut HostEnv) -> Result<Vec<String>> {
        Ok(std::mem::take(&mut self.details))
    }

    fn end(&mut self, _env: &mut HostEnv) {
        self.relay = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_shell_safe() {
        let table = table();
        for (i, s) in table.iter().enumerate() {
            assert!(s.name.chars().all(|c| c.is_ascii_lowercase() || c == '-'));
            assert!(table[..i].iter().all(|t| t.name != s.name));
        }
    }

    #[test]
    fn probe_payload_is_what_seq_prints() {
        let payload = probe_payload();
        assert!(payload.starts_with(b"1\n2\n"));
        assert!(payload.ends_with(b"19999\n20000\n"));
    }

    #[test]
    fn attribution_ignores_layout() {
        assert!(has_rpm_attribution("{\"trigger\": {\"comm\": \"rpm\"}}"));
        assert!(!has_rpm_attribution("{\"comm\": \"dnf\"}"));
    }
}
