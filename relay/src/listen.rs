//! Listeners: AF_VSOCK (QEMU/KVM vhost-vsock hosts: libvirt, KubeVirt) and hybrid vsock
//! (Firecracker, Cloud Hypervisor: a guest's connection to host port P arrives on the Unix
//! socket `<uds_path>_P`). Each accepted connection is identified by the kernel — the peer CID,
//! or the socket it arrived on — and admitted under the connection limits before its session
//! starts.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::UnixListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;

use crate::{
    guest_log,
    guestlog::GuestLog,
    identity::{CidMap, IdentitySource, VmIdentity},
    metrics::Metrics,
};

/// A guest's byte stream.
pub trait GuestStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> GuestStream for T {}

/// Connection limits, global and per VM.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    pub total: usize,
    pub per_vm: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            total: 1024,
            per_vm: 4,
        }
    }
}

/// Admission control: a connection holds a [`Admission`] for its lifetime.
///
/// Per-VM limits are keyed by the VM's name, whichever way its connections come (pushed or
/// pulled), so one VM never gets two allowances and two VMs never share one. The total is a
/// bound on what guests can open: connections the relay dials itself (pull mode) are bounded
/// by its configuration instead and do not take from it, so pushing guests cannot starve
/// pulled VMs of their sessions, nor pulled VMs the pushing guests.
pub struct Admitter {
    limits: ConnectionLimits,
    total: Arc<Semaphore>,
    per_vm: Mutex<HashMap<String, VmSlot>>,
    metrics: Metrics,
    /// Refused connections are logged within the VM's log budget.
    guest_log: Arc<GuestLog>,
}

/// A VM's open connections, and the token that closes them all (the VM was removed from the
/// configuration).
struct VmSlot {
    count: usize,
    closing: CancellationToken,
}

/// Proof of admission; releases the slots when dropped.
pub struct Admission {
    _total: Option<OwnedSemaphorePermit>,
    vm: String,
    closing: CancellationToken,
    admitter: Arc<Admitter>,
}

impl Admission {
    /// Resolves when the VM's connections are to close (see [`Admitter::close_vm`]).
    pub async fn closed(&self) {
        self.closing.cancelled().await;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut per_vm = self
            .admitter
            .per_vm
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A VM closed meanwhile has a new slot (or none): this connection is no longer in it.
        if let Some(slot) = per_vm.get_mut(&self.vm)
            && !self.closing.is_cancelled()
        {
            slot.count = slot.count.saturating_sub(1);
            if slot.count == 0 {
                per_vm.remove(&self.vm);
            }
        }
        self.admitter.metrics.connections.dec();
    }
}

impl Admitter {
    pub fn new(limits: ConnectionLimits, metrics: Metrics, guest_log: Arc<GuestLog>) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(limits.total)),
            limits,
            per_vm: Mutex::new(HashMap::new()),
            metrics,
            guest_log,
        })
    }

    /// Admits a connection a guest opened from `vm`, or says why not. Never waits: a guest
    /// over its limit is refused at once so it cannot hold the relay's attention.
    pub fn admit(self: &Arc<Self>, vm: &str) -> Result<Admission, &'static str> {
        self.admit_counted(vm, true)
    }

    /// Admits a connection the relay dialed to `vm` (pull mode): the VM's own limit holds,
    /// the total of guest-opened connections is not touched.
    pub fn admit_dialed(self: &Arc<Self>, vm: &str) -> Result<Admission, &'static str> {
        self.admit_counted(vm, false)
    }

    fn admit_counted(
        self: &Arc<Self>,
        vm: &str,
        counts_in_total: bool,
    ) -> Result<Admission, &'static str> {
        let mut per_vm = self.per_vm.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_vm.get(vm).map_or(0, |slot| slot.count);
        if count >= self.limits.per_vm {
            Metrics::reason(&self.metrics.connections_rejected, "per_vm_limit");
            return Err("too many connections from this VM");
        }
        let permit = if counts_in_total {
            let Ok(permit) = self.total.clone().try_acquire_owned() else {
                Metrics::reason(&self.metrics.connections_rejected, "total_limit");
                return Err("too many connections in total");
            };
            Some(permit)
        } else {
            None
        };
        let slot = per_vm.entry(vm.to_owned()).or_insert_with(|| VmSlot {
            count: 0,
            closing: CancellationToken::new(),
        });
        slot.count += 1;
        self.metrics.connections.inc();
        Ok(Admission {
            _total: permit,
            vm: vm.to_owned(),
            closing: slot.closing.clone(),
            admitter: self.clone(),
        })
    }

    /// Closes every connection of `vm` (each finishes the exchange in progress); returns how
    /// many were open. Later connections of that name start afresh.
    pub fn close_vm(&self, vm: &str) -> usize {
        let mut per_vm = self.per_vm.lock().unwrap_or_else(|p| p.into_inner());
        match per_vm.remove(vm) {
            Some(slot) => {
                slot.closing.cancel();
                slot.count
            }
            None => 0,
        }
    }

    /// Open connections of `vm`.
    pub fn open_connections(&self, vm: &str) -> usize {
        let per_vm = self.per_vm.lock().unwrap_or_else(|p| p.into_inner());
        per_vm.get(vm).map_or(0, |slot| slot.count)
    }
}

/// An accepted, identified, admitted connection.
pub struct Incoming {
    pub stream: Box<dyn GuestStream>,
    pub identity: VmIdentity,
    pub admission: Admission,
}

/// `UDS_PATH_PORT`: where a hybrid-vsock VMM forwards a guest's connection to host port `port`.
pub fn hybrid_socket_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut name = uds_path.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Binds a Unix socket, replacing a stale socket file left by a previous run (never anything
/// that is not a socket).
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    guestwatch_daemon::unix_socket::remove_stale(path)?;
    UnixListener::bind(path)
}

/// Accepts hybrid-vsock connections for the VM `name` until `stop`.
pub async fn serve_hybrid(
    name: String,
    listener: UnixListener,
    socket: PathBuf,
    admitter: Arc<Admitter>,
    incoming: tokio::sync::mpsc::Sender<Incoming>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("accepting on {}: {e}", socket.display());
                // EMFILE and friends: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let identity = VmIdentity {
            name: name.clone(),
            source: IdentitySource::Hybrid {
                socket: socket.clone(),
            },
        };
        admit_and_forward(identity, Box::new(stream), &admitter, &incoming).await;
    }
}

/// Accepts AF_VSOCK connections on `port` until `stop`, naming peers through the current CID
/// map (reloaded while the relay runs). Never used in tests on hosts whose VSOCK belongs to
/// the infrastructure.
pub async fn serve_vsock(
    listener: tokio_vsock::VsockListener,
    cids: tokio::sync::watch::Receiver<Arc<CidMap>>,
    admitter: Arc<Admitter>,
    incoming: tokio::sync::mpsc::Sender<Incoming>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                log::warn!("accepting on vsock: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let identified = cids.borrow().identify(peer.cid());
        match identified {
            Ok(identity) => {
                admit_and_forward(identity, Box::new(stream), &admitter, &incoming).await
            }
            Err(e) => {
                Metrics::reason(&admitter.metrics.connections_rejected, "reserved_cid");
                let peer = format!("cid-{}", peer.cid());
                guest_log!(
                    admitter.guest_log,
                    &peer,
                    log::Level::Warn,
                    "refused a vsock connection: {e}"
                );
            }
        }
    }
}

async fn admit_and_forward(
    identity: VmIdentity,
    stream: Box<dyn GuestStream>,
    admitter: &Arc<Admitter>,
    incoming: &tokio::sync::mpsc::Sender<Incoming>,
) {
    match admitter.admit(&identity.name) {
        Ok(admission) => {
            let _ = incoming
                .send(Incoming {
                    stream,
                    identity,
                    admission,
                })
                .await;
        }
        Err(why) => {
            let vm = identity.name.as_str();
            guest_log!(
                admitter.guest_log,
                vm,
                log::Level::Debug,
                "refused a connection from {vm}: {why}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_paths() {
        assert_eq!(
            hybrid_socket_path(Path::new("/run/fc/vm1.vsock"), 919),
            PathBuf::from("/run/fc/vm1.vsock_919")
        );
    }

    #[test]
    fn limits_per_vm_and_total() {
        let a = Admitter::new(
            ConnectionLimits {
                total: 3,
                per_vm: 2,
            },
            Metrics::new(),
            Arc::new(GuestLog::default()),
        );
        let x1 = a.admit("x").unwrap();
        let _x2 = a.admit("x").unwrap();
        assert!(a.admit("x").is_err(), "per-VM limit");
        let _y1 = a.admit("y").unwrap();
        assert!(a.admit("z").is_err(), "total limit");
        drop(x1);
        assert!(a.admit("z").is_ok(), "a slot freed on drop");
    }

    #[test]
    fn dialed_connections_count_per_vm_but_not_in_the_total() {
        let a = Admitter::new(
            ConnectionLimits {
                total: 1,
                per_vm: 2,
            },
            Metrics::new(),
            Arc::new(GuestLog::default()),
        );
        let _pushed = a.admit("x").unwrap();
        assert!(a.admit("y").is_err(), "the total is taken");
        let _pulled_y = a.admit_dialed("y").expect("not bounded by the total");
        let _pulled_x = a.admit_dialed("x").unwrap();
        assert!(a.admit_dialed("x").is_err(), "x is at its own limit");
        assert_eq!(a.open_connections("x"), 2);
    }

    #[tokio::test]
    async fn closing_a_vm_closes_its_connections_only() {
        let a = Admitter::new(
            ConnectionLimits::default(),
            Metrics::new(),
            Arc::new(GuestLog::default()),
        );
        let x1 = a.admit("x").unwrap();
        let x2 = a.admit_dialed("x").unwrap();
        let y = a.admit("y").unwrap();
        assert_eq!(a.close_vm("x"), 2);
        tokio::time::timeout(Duration::from_secs(1), x1.closed())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), x2.closed())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), y.closed())
                .await
                .is_err()
        );
        // A connection of the same name afterwards is a fresh one, not closed.
        let x3 = a.admit("x").unwrap();
        drop((x1, x2));
        assert_eq!(a.open_connections("x"), 1);
        assert!(!x3.closing.is_cancelled());
    }

    #[test]
    fn binding_replaces_stale_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock_919");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            drop(bind_unix(&path).unwrap());
            // The old socket file is still there; binding again replaces it.
            bind_unix(&path).unwrap();
        });
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"precious").unwrap();
        assert!(rt.block_on(async { bind_unix(&file) }).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }
}
