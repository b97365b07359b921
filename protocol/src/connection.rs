//! [`Connection`]: framing over any async byte stream, with limits and timeouts.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

use crate::{ProtocolError, SUPPORTED_VERSIONS, frame, limits::Limits, message::Message};

/// Read granularity: the buffer grows with what actually arrives, never by what a header claims.
const READ_CHUNK: usize = 64 * 1024;
/// Smallest read.
const MIN_READ: usize = 4 * 1024;

/// Why [`Connection::read_message_within`] gave up waiting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Timeout {
    #[error("no message for {0:?}")]
    Idle(Duration),
    #[error("a frame did not complete within {0:?}")]
    Frame(Duration),
}

/// One end of a guestwatch connection. Reads are cancel-safe (bytes already received stay
/// buffered); a cancelled write may have sent part of a frame, so drop the connection then.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    buffer: BytesMut,
    limits: Limits,
    version: u16,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// A connection that writes frames in the oldest version (in which `Hello` must go, so
    /// that every peer can read it) until [`Self::set_version`] is called with the one the
    /// handshake chose.
    pub fn new(stream: S, limits: Limits) -> Self {
        Self {
            stream,
            buffer: BytesMut::with_capacity(MIN_READ),
            limits,
            version: SUPPORTED_VERSIONS[0],
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes the frame limit (the agent adopts the relay's from `Welcome`).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.limits.max_frame = max_frame;
    }

    /// The protocol version used for frames written from now on.
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    pub fn version(&self) -> u16 {
        self.version
    }

    /// True when part of a frame has been received.
    pub fn mid_frame(&self) -> bool {
        !self.buffer.is_empty()
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// The next message; `Ok(None)` when the peer closed cleanly between frames.
    ///
    /// Recoverable errors ([`ProtocolError::is_recoverable`]) leave the connection usable: answer
    /// the peer with an `Error` and read on. Any other error means the connection must be closed.
    pub async fn read_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        loop {
            if let Some(message) = self.parse()? {
                return message.map(Some);
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Like [`Self::read_message`], but gives up after `idle` without a frame starting, or
    /// `frame` after a frame started without completing (a slow writer cannot hold the peer).
    pub async fn read_message_within(
        &mut self,
        idle: Duration,
        frame: Duration,
    ) -> Result<Result<Option<Message>, Timeout>, ProtocolError> {
        let mut frame_deadline = self.mid_frame().then(|| Instant::now() + frame);
        let idle_deadline = Instant::now() + idle;
        loop {
            if let Some(message) = self.parse()? {
                return message.map(|m| Ok(Some(m)));
            }
            let (deadline, timeout) = match frame_deadline {
                Some(at) => (at, Timeout::Frame(frame)),
                None => (idle_deadline, Timeout::Idle(idle)),
            };
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return Ok(Err(timeout)),
                Ok(filled) => {
                    if !filled? {
                        return Ok(Ok(None));
                    }
                }
            }
            if frame_deadline.is_none() && self.mid_frame() {
                frame_deadline = Some(Instant::now() + frame);
            }
        }
    }

    /// Takes one frame off the buffer if a whole one is there.
    fn parse(&mut self) -> Result<Option<Result<Message, ProtocolError>>, ProtocolError> {
        match frame::decode(&self.buffer, self.limits.max_frame)? {
            Some(decoded) => {
                self.buffer.advance(decoded.consumed);
                // An idle connection should not keep a large frame's buffer.
                if self.buffer.is_empty() && self.buffer.capacity() > READ_CHUNK {
                    self.buffer = BytesMut::with_capacity(MIN_READ);
                }
                Ok(Some(decoded.message))
            }
            None => Ok(None),
        }
    }

    /// Reads more bytes; `false` when the peer closed cleanly between frames.
    async fn fill(&mut self) -> Result<bool, ProtocolError> {
        // Room for what the current frame still needs (from its header, unverified, so capped),
        // at least a small chunk: memory follows the bytes that arrive.
        let needed = match self.buffer.first_chunk::<{ frame::HEADER_LEN }>() {
            Some(head) => {
                let len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]) as usize;
                (frame::HEADER_LEN + len).saturating_sub(self.buffer.len())
            }
            None => frame::HEADER_LEN - self.buffer.len(),
        };
        let want = needed.clamp(MIN_READ, READ_CHUNK);
        if self.buffer.capacity() - self.buffer.len() < want {
            self.buffer.reserve(want);
        }
        if self.stream.read_buf(&mut self.buffer).await? == 0 {
            if self.buffer.is_empty() {
                return Ok(false);
            }
            return Err(ProtocolError::ClosedMidFrame {
                buffered: self.buffer.len(),
            });
        }
        Ok(true)
    }

    /// Writes one message and flushes it.
    pub async fn write_message(&mut self, message: &Message) -> Result<(), ProtocolError> {
        let frame = frame::encode(self.version, message, self.limits.max_frame)?;
        self.stream.write_all(&frame).await?;
        self.stream.flush().await?;
        Ok(())
    }
}
