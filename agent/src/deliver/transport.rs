//! Connecting to the relay: AF_VSOCK in a VM, or a Unix socket (what a hybrid-vsock VMM exposes
//! on the host, and how tests run without a hypervisor).

use std::{io, time::Duration};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::RelayAddr;

/// A byte stream to the relay.
pub trait RelayStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RelayStream for T {}

/// Opens a stream to the relay, giving up after `timeout`.
pub async fn connect(addr: &RelayAddr, timeout: Duration) -> io::Result<Box<dyn RelayStream>> {
    let connecting = async {
        Ok::<Box<dyn RelayStream>, io::Error>(match addr {
            RelayAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            RelayAddr::Vsock { cid, port } => Box::new(
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?,
            ),
        })
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })?
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn unix_round_trip_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        let addr = RelayAddr::Unix(path.clone());
        let refused = connect(&addr, Duration::from_secs(1)).await;
        assert!(refused.is_err());
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let mut stream = connect(&addr, Duration::from_secs(1)).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    }
}
