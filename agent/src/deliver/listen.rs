//! Pull mode: the host dials the guest. The agent listens (`--listen`), accepts only the host
//! — peer CID 2 on AF_VSOCK, its own user or root on a Unix socket — says `Hello` exactly as it
//! does on a connection it dialed, and hands the welcomed session to the sender. One session
//! at a time: a newer one replaces the old (the relay dials again when it lost its end, and
//! over hybrid vsock the old end may never see the close).

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use guestwatch_daemon::backoff::Backoff;
use guestwatch_protocol::Hello;
use tokio::{net::UnixListener, sync::Notify, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{session::Session, transport::RelayStream};
use crate::{config::ListenAddr, metrics::Metrics};

/// The host's CID on AF_VSOCK: the only peer a listening agent accepts there.
pub const HOST_CID: u32 = 2;

/// The newest welcomed session, waiting for the sender to take it.
#[derive(Default)]
pub struct Handoff {
    slot: Mutex<Option<Session>>,
    ready: Notify,
}

impl Handoff {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Offers a session, replacing one not taken yet.
    pub fn put(&self, session: Session) {
        let replaced = self
            .slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(session);
        if replaced.is_some() {
            log::debug!("a newer relay connection replaced one not used yet");
        }
        self.ready.notify_one();
    }

    /// Waits for the next session. Cancel-safe: a session is only removed when returned.
    pub async fn take(&self) -> Session {
        loop {
            if let Some(session) = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return session;
            }
            // A `put` between the check and here leaves a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }
}

/// Why an accepted connection was turned away.
#[derive(Debug)]
struct Refusal {
    /// The metric label.
    reason: &'static str,
    peer: String,
}

enum Bound {
    Vsock(tokio_vsock::VsockListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl Bound {
    fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Vsock { port } => Ok(Self::Vsock(tokio_vsock::VsockListener::bind(
                tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port),
            )?)),
            ListenAddr::Unix(path) => Ok(Self::Unix {
                listener: bind_unix(path)?,
                path: path.clone(),
            }),
        }
    }

    /// The next connection, or why it is refused.
    async fn accept(&self) -> io::Result<Result<Box<dyn RelayStream>, Refusal>> {
        match self {
            Self::Vsock(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok(if peer.cid() == HOST_CID {
                    Ok(Box::new(stream))
                } else {
                    Err(Refusal {
                        reason: "not_host",
                        peer: format!("CID {}", peer.cid()),
                    })
                })
            }
            Self::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let uid = stream.peer_cred()?.uid();
                Ok(if uid == 0 || uid == effective_uid() {
                    Ok(Box::new(stream))
                } else {
                    Err(Refusal {
                        reason: "peer_uid",
                        peer: format!("uid {uid}"),
                    })
                })
            }
        }
    }

    fn remove(&self) {
        if let Self::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Binds a Unix socket readable and writable by its owner only, replacing a stale socket left
/// by a previous run (never anything that is not a socket).
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    guestwatch_daemon::unix_socket::remove_stale(path)?;
    let listener = UnixListener::bind(path)?;
    // Between bind and chmod another user could connect: the peer check turns it away.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts the host's connections on `addr` until `stop`, handing each welcomed session to
/// `handoff`. A failure to bind (no vsock transport yet, the port taken) is retried with
/// backoff: detection and the pending report do not depend on it.
pub async fn run(
    addr: ListenAddr,
    hello: Hello,
    answer_timeout: Duration,
    handoff: Arc<Handoff>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let Some(bound) = bind_with_retry(&addr, &stop).await else {
        return;
    };
    log::info!("listening for the relay on {addr}");
    let hello = Arc::new(hello);
    let mut handshaking: Option<JoinHandle<()>> = None;
    let mut refused = 0u64;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = bound.accept() => accepted,
        };
        let stream = match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(refusal)) => {
                metrics.listen_refused(refusal.reason);
                refused += 1;
                if refused == 1 || refused.is_multiple_of(100) {
                    log::warn!(
                        "refused a connection on {addr} from {} ({}; {refused} so far): only \
                         the host may connect",
                        refusal.peer,
                        refusal.reason
                    );
                }
                continue;
            }
            Err(e) => {
                log::warn!("accepting on {addr}: {e}");
                // EMFILE and friends: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        metrics.listen_accepted.inc();
        // The newest connection wins, also over one still saying Hello.
        if let Some(previous) = handshaking.take() {
            previous.abort();
        }
        let (hello, handoff) = (hello.clone(), handoff.clone());
        handshaking = Some(tokio::spawn(async move {
            match Session::handshake(stream, answer_timeout, &hello).await {
                Ok(session) => handoff.put(session),
                Err(e) => log::warn!("the relay's connection failed its handshake: {e}"),
            }
        }));
    }
    if let Some(task) = handshaking {
        task.abort();
    }
    bound.remove();
}

async fn bind_with_retry(addr: &ListenAddr, stop: &CancellationToken) -> Option<Bound> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut failures = 0u32;
    loop {
        match Bound::bind(addr) {
            Ok(bound) => return Some(bound),
            Err(e) => {
                failures += 1;
                let delay = backoff.next_delay();
                if failures == 1 || failures.is_multiple_of(20) {
                    log::warn!("cannot listen on {addr} ({e}); retrying in {delay:.1?}");
                }
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_sockets_are_private_and_only_stale_sockets_are_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            drop(bind_unix(&path).unwrap());
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            bind_unix(&path).unwrap();
        });
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        assert!(rt.block_on(async { bind_unix(&file) }).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
