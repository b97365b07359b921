//! Pull mode: the relay dials each configured VM and holds one session per VM, as needed under
//! Linux VSOCK namespace isolation, where guests cannot reach a host listener.
//!
//! - A target is `NAME=vsock:CID:PORT`, `NAME=hybrid:UDS_PATH:PORT` (the VMM's socket and the
//!   `CONNECT` handshake, see `hybrid.rs`) or `NAME=unix:PATH`. The VM is the target dialed:
//!   its name is the configuration's, never what the guest says.
//! - Once connected the session is exactly a pushed one (`session::serve`): the agent says
//!   `Hello`, the relay answers `Welcome`, the agent sends reports as it makes them and pings
//!   while idle. Every per-VM limit, the cache and the end-to-end ACK are the same code.
//! - Each VM has its own task: one that is down, refuses or stalls the dial never delays
//!   another. Dials are paced by a capped, jittered backoff per VM that only a session that
//!   delivered something (or lasted a minute) resets, so a VM that is down costs a timer and a
//!   failed `connect` now and then, and a fleet of them does not wake up in lockstep.
//! - [`Puller::apply`] makes a new target set current (reloads): unchanged VMs keep their
//!   sessions, removed ones are closed and counted.

use std::{
    collections::BTreeMap,
    fmt, io,
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use guestwatch_daemon::backoff::Backoff;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    guest_log, hybrid,
    identity::{IdentitySource, VmIdentity, valid_vm_name},
    listen::{Admitter, GuestStream, Incoming},
    metrics::Metrics,
    session::{self, SessionConfig, Shared},
};

/// The first redial delay after a failure; doubled per failure up to the configured cap.
pub const DIAL_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// A session that lasted this long was healthy, even if it delivered nothing.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// Where a pulled VM is dialed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PullAddr {
    /// AF_VSOCK: the guest's CID and the port its agent listens on.
    Vsock { cid: u32, port: u32 },
    /// Hybrid vsock: the VMM's Unix socket and the guest port (`CONNECT <port>`).
    Hybrid { uds: PathBuf, port: u32 },
    /// A Unix socket the agent listens on itself (tests, agents outside the VM).
    Unix(PathBuf),
}

impl FromStr for PullAddr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.parse::<u32>()
                .map_err(|_| format!("`{text}`: bad port `{p}`"))
        };
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = text.strip_prefix("hybrid:") {
            // The path may hold colons; the port is after the last one.
            let (uds, p) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("`{text}`: expected hybrid:UDS_PATH:PORT"))?;
            if uds.is_empty() {
                return Err(format!("`{text}`: empty socket path"));
            }
            return Ok(Self::Hybrid {
                uds: PathBuf::from(uds),
                port: port(p)?,
            });
        }
        if let Some(rest) = text.strip_prefix("vsock:") {
            let (cid, p) = rest
                .split_once(':')
                .ok_or_else(|| format!("`{text}`: expected vsock:CID:PORT"))?;
            let cid: u32 = cid
                .parse()
                .map_err(|_| format!("`{text}`: bad CID `{cid}`"))?;
            if cid <= 2 {
                return Err(format!(
                    "`{text}`: CID {cid} is reserved (0-2: hypervisor, local, host), not a guest"
                ));
            }
            return Ok(Self::Vsock {
                cid,
                port: port(p)?,
            });
        }
        Err(format!(
            "`{text}`: expected vsock:CID:PORT, hybrid:UDS_PATH:PORT or unix:PATH"
        ))
    }
}

impl fmt::Display for PullAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Self::Hybrid { uds, port } => write!(f, "hybrid:{}:{port}", uds.display()),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A VM the relay dials.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PullTarget {
    pub name: String,
    pub addr: PullAddr,
}

impl FromStr for PullTarget {
    type Err = String;
    /// `NAME=ADDR`.
    fn from_str(spec: &str) -> Result<Self, String> {
        let (name, addr) = spec
            .split_once('=')
            .ok_or_else(|| format!("`{spec}`: expected NAME=ADDR"))?;
        if !valid_vm_name(name) {
            return Err(format!(
                "`{name}` is not a valid VM name (letters, digits, . _ -)"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            addr: addr.parse()?,
        })
    }
}

/// Opens a stream to a pulled VM's agent, giving up after `timeout`.
pub async fn dial(addr: &PullAddr, timeout: Duration) -> io::Result<Box<dyn GuestStream>> {
    let dialing = async {
        Ok::<Box<dyn GuestStream>, io::Error>(match addr {
            PullAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            PullAddr::Hybrid { uds, port } => {
                Box::new(hybrid::connect(uds, *port).await.map_err(|e| match e {
                    hybrid::HandshakeError::Io(e) => e,
                    other => io::Error::new(io::ErrorKind::ConnectionRefused, other),
                })?)
            }
            // Never reached in tests on hosts whose VSOCK belongs to the infrastructure.
            PullAddr::Vsock { cid, port } => Box::new(
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?,
            ),
        })
    };
    tokio::time::timeout(timeout, dialing).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection within {timeout:?}"),
        )
    })?
}

/// Dialing settings.
#[derive(Clone, Debug)]
pub struct PullConfig {
    /// A dial (connect, and the hybrid handshake) gives up after this long.
    pub connect_timeout: Duration,
    /// Cap of the per-VM redial backoff.
    pub max_backoff: Duration,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What every pulled VM's task shares.
pub struct PullContext {
    pub admitter: Arc<Admitter>,
    pub shared: Arc<Shared>,
    pub session: SessionConfig,
    pub config: PullConfig,
    pub metrics: Metrics,
}

struct Running {
    addr: PullAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// The set of VMs being dialed.
pub struct Puller {
    ctx: Arc<PullContext>,
    stop: CancellationToken,
    running: BTreeMap<String, Running>,
}

impl Puller {
    pub fn new(ctx: Arc<PullContext>, stop: CancellationToken) -> Self {
        Self {
            ctx,
            stop,
            running: BTreeMap::new(),
        }
    }

    /// Makes `targets` (unique names) the VMs dialed: new ones start, removed ones are closed
    /// and counted, one whose address changed is redialed there, the rest keep their
    /// sessions. Returns the names removed.
    pub fn apply(&mut self, targets: &[PullTarget]) -> Vec<String> {
        let wanted: BTreeMap<&str, &PullAddr> =
            targets.iter().map(|t| (t.name.as_str(), &t.addr)).collect();
        let mut removed = Vec::new();
        self.running
            .retain(|name, running| match wanted.get(name.as_str()) {
                Some(addr) if **addr == running.addr => true,
                Some(addr) => {
                    log::info!(
                        "pull target {name} moved from {} to {addr}: redialing",
                        running.addr
                    );
                    running.cancel.cancel();
                    false
                }
                None => {
                    log::info!(
                        "pull target {name} ({}) was removed: closing its session",
                        running.addr
                    );
                    running.cancel.cancel();
                    removed.push(name.clone());
                    false
                }
            });
        for _ in &removed {
            Metrics::reason(&self.ctx.metrics.vms_removed, "pull");
        }
        for target in targets {
            if self.running.contains_key(&target.name) {
                continue;
            }
            log::info!("pulling {} from {}", target.name, target.addr);
            let cancel = self.stop.child_token();
            let task = tokio::spawn(pull_vm(target.clone(), self.ctx.clone(), cancel.clone()));
            self.running.insert(
                target.name.clone(),
                Running {
                    addr: target.addr.clone(),
                    cancel,
                    task,
                },
            );
        }
        self.ctx.metrics.pull_targets.set(self.running.len() as i64);
        removed
    }

    /// The VMs being dialed, by name.
    pub fn targets(&self) -> impl Iterator<Item = (&str, &PullAddr)> {
        self.running.iter().map(|(n, r)| (n.as_str(), &r.addr))
    }

    /// Ends every VM's task (each session finishes the exchange in progress) within `grace`.
    pub async fn shutdown(self, grace: Duration) {
        for running in self.running.values() {
            running.cancel.cancel();
        }
        let tasks: Vec<_> = self.running.into_values().map(|r| r.task).collect();
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(grace, join_all(tasks)).await.is_err() {
            for abort in aborts {
                abort.abort();
            }
        }
    }
}

/// Waits for every task, in turn.
async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// Dials one VM and serves its session, again and again, until `cancel`.
async fn pull_vm(target: PullTarget, ctx: Arc<PullContext>, cancel: CancellationToken) {
    let mut backoff = Backoff::new(DIAL_BACKOFF_BASE, ctx.config.max_backoff);
    let mut failures = 0u32;
    let identity = VmIdentity {
        name: target.name.clone(),
        source: IdentitySource::Dialed {
            address: target.addr.to_string(),
        },
    };
    let vm = target.name.as_str();
    while !cancel.is_cancelled() {
        let dialed = tokio::select! {
            () = cancel.cancelled() => return,
            dialed = dial(&target.addr, ctx.config.connect_timeout) => dialed,
        };
        let stream = match dialed {
            Ok(stream) => stream,
            Err(e) => {
                Metrics::result(&ctx.metrics.pull_dials, "failed");
                failures = failures.saturating_add(1);
                let delay = backoff.next_delay();
                if failures == 1 || failures.is_multiple_of(20) {
                    log::info!(
                        "{vm}: cannot dial {} ({e}; {failures} in a row); next try in {delay:.1?}",
                        target.addr
                    );
                }
                if sleep_or_cancel(delay, &cancel).await {
                    return;
                }
                continue;
            }
        };
        let admission = match ctx.admitter.admit_dialed(vm) {
            Ok(admission) => admission,
            Err(why) => {
                // Within the VM's log budget: a guest can make this happen.
                guest_log!(
                    ctx.shared.guest_log,
                    vm,
                    log::Level::Warn,
                    "{vm}: dialed, but not admitted: {why}"
                );
                if sleep_or_cancel(backoff.next_delay(), &cancel).await {
                    return;
                }
                continue;
            }
        };
        Metrics::result(&ctx.metrics.pull_dials, "connected");
        if failures > 0 {
            log::info!(
                "{vm}: reached at {} after {failures} failed dial(s)",
                target.addr
            );
        }
        failures = 0;
        ctx.metrics.pull_sessions.inc();
        let started = Instant::now();
        let served = session::serve(
            Incoming {
                stream,
                identity: identity.clone(),
                admission,
            },
            ctx.shared.clone(),
            ctx.session.clone(),
            cancel.clone(),
        )
        .await;
        ctx.metrics.pull_sessions.dec();
        // A session that delivered (or held a minute) was healthy: redial at once-ish. One
        // that failed early counts as a failed attempt.
        if served.acked > 0 || started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        // A guest ends its sessions at will: within its log budget.
        guest_log!(
            ctx.shared.guest_log,
            vm,
            log::Level::Debug,
            "{vm}: session ended ({served:?}); redialing in {delay:.1?}"
        );
        if sleep_or_cancel(delay, &cancel).await {
            return;
        }
    }
}

/// True if cancelled first.
async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_targets() {
        assert_eq!(
            "vsock:3:919".parse(),
            Ok(PullAddr::Vsock { cid: 3, port: 919 })
        );
        assert_eq!(
            "hybrid:/run/fc/a:b.vsock:818".parse(),
            Ok(PullAddr::Hybrid {
                uds: "/run/fc/a:b.vsock".into(),
                port: 818
            })
        );
        assert_eq!(
            "unix:/run/agent.sock".parse(),
            Ok(PullAddr::Unix("/run/agent.sock".into()))
        );
        for bad in [
            "vsock:2:919",
            "vsock:1:919",
            "vsock:3",
            "hybrid:/x",
            "hybrid::919",
            "hybrid:/x:port",
            "unix:",
            "tcp:1.2.3.4:5",
        ] {
            assert!(bad.parse::<PullAddr>().is_err(), "{bad}");
        }
        let t: PullTarget = "web-1=hybrid:/run/fc/web-1.vsock:919".parse().unwrap();
        assert_eq!(t.name, "web-1");
        assert_eq!(t.addr.to_string(), "hybrid:/run/fc/web-1.vsock:919");
        assert!("../x=unix:/x".parse::<PullTarget>().is_err());
        assert!("web-1".parse::<PullTarget>().is_err());
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
        assert!(delays[9] >= Duration::from_secs(15) && delays[9] <= Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
