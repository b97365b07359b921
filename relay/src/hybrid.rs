//! The host side of hybrid vsock's connect handshake (Firecracker, Cloud Hypervisor,
//! vhost-device-vsock): to reach a guest's AF_VSOCK listener on port P, a host process
//! connects to the VMM's Unix socket, writes `CONNECT P\n` and reads `OK <port>\n`; from then on
//! the stream is connected to the guest. A VMM whose guest does not listen on P closes the
//! stream instead.

use std::{io, path::Path};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

/// The longest answer read (`OK 4294967295\n` is 14 bytes).
pub const MAX_ANSWER: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(
        "the VMM closed the connection instead of answering (nothing listens on guest port {port}?)"
    )]
    Closed { port: u32 },
    #[error("the VMM answered {answer:?} instead of `OK <port>`")]
    Refused { answer: String },
    #[error("the VMM's answer is longer than {MAX_ANSWER} bytes")]
    TooLong,
}

/// Connects to guest port `port` through the VMM's socket `uds`. The caller bounds the time.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, HandshakeError> {
    let mut stream = UnixStream::connect(uds).await?;
    // Nothing else may be written before the answer: some VMMs read the command through a
    // buffer and would swallow what follows it.
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    read_answer(&mut stream, port).await?;
    Ok(stream)
}

/// Reads `OK <port>\n` one byte at a time: the guest's first bytes may follow the answer at
/// once, and they belong to the session. Returns the port the VMM names (informational: some
/// name the guest's port, some the host side's).
pub async fn read_answer<S: AsyncRead + Unpin>(
    stream: &mut S,
    port: u32,
) -> Result<u32, HandshakeError> {
    let mut answer = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(HandshakeError::Closed { port });
        }
        if byte[0] == b'\n' {
            break;
        }
        if answer.len() == MAX_ANSWER {
            return Err(HandshakeError::TooLong);
        }
        answer.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&answer);
    let text = text.trim_end_matches('\r');
    let refused = || HandshakeError::Refused {
        answer: text.chars().filter(|c| !c.is_control()).collect(),
    };
    let number = text.strip_prefix("OK ").ok_or_else(refused)?;
    number.trim().parse().map_err(|_| refused())
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn answer_of(bytes: &[u8]) -> (Result<u32, HandshakeError>, Vec<u8>) {
        let (mut host, mut vmm) = tokio::io::duplex(1024);
        vmm.write_all(bytes).await.unwrap();
        drop(vmm);
        let result = read_answer(&mut host, 919).await;
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).await.unwrap();
        (result, rest)
    }

    #[tokio::test]
    async fn reads_exactly_the_answer_and_leaves_the_guests_bytes() {
        let (result, rest) = answer_of(b"OK 1073741824\nGWAT\x00\x01").await;
        assert_eq!(result.unwrap(), 1 << 30);
        assert_eq!(rest, b"GWAT\x00\x01");
        assert_eq!(answer_of(b"OK 919\r\n").await.0.unwrap(), 919);
    }

    #[tokio::test]
    async fn refusals_closes_and_garbage_are_errors() {
        assert!(matches!(
            answer_of(b"").await.0,
            Err(HandshakeError::Closed { port: 919 })
        ));
        assert!(matches!(
            answer_of(b"OK 9").await.0,
            Err(HandshakeError::Closed { .. })
        ));
        for bad in [
            &b"NO\n"[..],
            b"OK\n",
            b"OK x\n",
            b"ok 5\n",
            b"OK 99999999999\n",
        ] {
            assert!(
                matches!(answer_of(bad).await.0, Err(HandshakeError::Refused { .. })),
                "{bad:?}"
            );
        }
        let long = [b'O'; 200];
        assert!(matches!(
            answer_of(&long).await.0,
            Err(HandshakeError::TooLong)
        ));
    }

    #[tokio::test]
    async fn connect_speaks_the_command_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let vmm = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut command = [0u8; 12];
            s.read_exact(&mut command).await.unwrap();
            s.write_all(b"OK 77\nhello").await.unwrap();
            command
        });
        let mut stream = connect(&path, 919).await.unwrap();
        assert_eq!(&vmm.await.unwrap(), b"CONNECT 919\n");
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
    }
}
