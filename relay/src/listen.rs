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
pub struct Admitter {
    limits: ConnectionLimits,
    total: Arc<Semaphore>,
    per_vm: Mutex<HashMap<String, usize>>,
    metrics: Metrics,
    /// Refused connections are logged within the VM's log budget.
    guest_log: Arc<GuestLog>,
}

/// Proof of admission; releases the slots when dropped.
pub struct Admission {
    _total: OwnedSemaphorePermit,
    vm: String,
    admitter: Arc<Admitter>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut per_vm = self
            .admitter
            .per_vm
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_vm.get_mut(&self.vm) {
            *n = n.saturating_sub(1);
            if *n == 0 {
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

    /// Admits a connection from `vm`, or says why not. Never waits: a guest over its limit is
    /// refused at once so it cannot hold the relay's attention.
    pub fn admit(self: &Arc<Self>, vm: &str) -> Result<Admission, &'static str> {
        let mut per_vm = self.per_vm.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_vm.get(vm).copied().unwrap_or(0);
        if count >= self.limits.per_vm {
            Metrics::reason(&self.metrics.connections_rejected, "per_vm_limit");
            return Err("too many connections from this VM");
        }
        let Ok(permit) = self.total.clone().try_acquire_owned() else {
            Metrics::reason(&self.metrics.connections_rejected, "total_limit");
            return Err("too many connections in total");
        };
        per_vm.insert(vm.to_owned(), count + 1);
        self.metrics.connections.inc();
        Ok(Admission {
            _total: permit,
            vm: vm.to_owned(),
            admitter: self.clone(),
        })
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
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
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

/// Accepts AF_VSOCK connections on `port` until `stop`. Never used in tests on hosts whose
/// VSOCK belongs to the infrastructure.
pub async fn serve_vsock(
    listener: tokio_vsock::VsockListener,
    cids: Arc<CidMap>,
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
        match cids.identify(peer.cid()) {
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
