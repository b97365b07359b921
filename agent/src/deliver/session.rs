//! One connection to the relay, dialed (push) or accepted (pull): the handshake, keep-alive
//! pings, and one report's exchange, each answer classified for the sender's policy
//! (`sender.rs`).

use std::time::Duration;

use guestwatch_protocol::{
    AckStatus, Connection, ErrorCode, Hello, Limits, Message, NackReason, ProtocolError, Report,
    SUPPORTED_VERSIONS,
};
use tokio::time::Instant;

use super::transport::{self, RelayStream};
use crate::config::RelayAddr;

/// The limits a relay announced in `Welcome`: a report beyond them is never sent to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    pub max_frame: u32,
    pub max_report_payload: u32,
}

/// A connected relay.
pub struct Session {
    conn: Connection<Box<dyn RelayStream>>,
    pub limits: RelayLimits,
    /// How often to ping while idle.
    pub ping_interval: Duration,
    /// The relay applies delta reports (version 2 with the `delta` feature).
    pub accepts_delta: bool,
}

/// How the relay answered a report.
#[derive(Debug)]
pub enum Answer {
    /// The sink has it.
    Acked(AckStatus),
    /// Not delivered yet: send it again, not before `after`.
    Retry {
        reason: &'static str,
        after: Duration,
    },
    /// It can never be accepted as it is (terminal `Nack`, a version-1 relay's `Error`, or
    /// beyond the announced limits, in which case it was not `sent`).
    Refused {
        reason: NackReason,
        detail: String,
        sent: bool,
    },
    /// The relay cannot apply it as a delta (`Nack(NeedFull)`): send it whole.
    NeedFull(String),
    /// The connection is unusable.
    Broken(String),
}

/// The `Welcome` feature of a relay that applies delta reports.
pub const FEATURE_DELTA: &str = "delta";

impl Session {
    /// Connects (push), says `hello`, and reads the relay's `Welcome`.
    pub async fn open(
        relay: &RelayAddr,
        connect_timeout: Duration,
        answer_timeout: Duration,
        hello: &Hello,
    ) -> Result<Self, String> {
        let stream = transport::connect(relay, connect_timeout)
            .await
            .map_err(|e| e.to_string())?;
        Self::handshake(stream, answer_timeout, hello).await
    }

    /// Says `hello` on a stream to the relay — dialed by the agent, or accepted from the relay
    /// in pull mode (the roles in the protocol are the same either way) — and reads `Welcome`.
    pub async fn handshake(
        stream: Box<dyn RelayStream>,
        answer_timeout: Duration,
        hello: &Hello,
    ) -> Result<Self, String> {
        let mut conn = Connection::new(stream, Limits::default());
        let hello = Message::Hello(Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            ..hello.clone()
        });
        let answer = tokio::time::timeout(answer_timeout, async {
            conn.write_message(&hello).await?;
            conn.read_message().await
        })
        .await
        .map_err(|_| "the relay did not answer Hello".to_owned())?
        .map_err(|e| e.to_string())?;
        match answer {
            Some(Message::Welcome(welcome)) => {
                conn.set_version(welcome.version);
                let accepts_delta =
                    welcome.version >= 2 && welcome.features.iter().any(|f| f == FEATURE_DELTA);
                conn.set_max_frame(welcome.max_frame);
                Ok(Self {
                    conn,
                    limits: RelayLimits {
                        max_frame: welcome.max_frame,
                        max_report_payload: welcome.max_report_payload,
                    },
                    ping_interval: Duration::from_secs(u64::from(
                        welcome.ping_interval_secs.max(1),
                    )),
                    accepts_delta,
                })
            }
            Some(Message::Error(e)) => {
                Err(format!("the relay refused us: {:?}: {}", e.code, e.message))
            }
            Some(other) => Err(format!("expected Welcome, got {:?}", other.kind())),
            None => Err("the relay closed the connection".into()),
        }
    }

    /// Pings; false if the relay did not answer within `timeout`.
    pub async fn ping(&mut self, timeout: Duration) -> bool {
        let nonce = fastrand::u64(..);
        let conn = &mut self.conn;
        let answered = tokio::time::timeout(timeout, async {
            conn.write_message(&Message::Ping(nonce)).await?;
            loop {
                match conn.read_message().await? {
                    Some(Message::Pong(n)) if n == nonce => return Ok(true),
                    Some(_) => continue,
                    None => return Ok::<bool, ProtocolError>(false),
                }
            }
        })
        .await;
        matches!(answered, Ok(Ok(true)))
    }

    /// Sends `report` (whose payload is `json_len` bytes decompressed, when known) and waits
    /// for its answer. A report beyond the relay's limits is refused here, without sending it.
    pub async fn exchange(
        &mut self,
        report: &Report,
        json_len: Option<u64>,
        ack_timeout: Duration,
    ) -> Answer {
        let Some(sent) = super::wire::for_version(report, self.conn.version()) else {
            return Answer::Refused {
                reason: NackReason::Rejected,
                detail: "it has no form this relay's protocol version takes".into(),
                sent: false,
            };
        };
        let json_len = match &sent {
            std::borrow::Cow::Borrowed(_) => json_len,
            std::borrow::Cow::Owned(rendered) => super::wire::payload_len(rendered.body.payload()),
        };
        if let Some(len) = json_len
            && len > u64::from(self.limits.max_report_payload)
        {
            return Answer::Refused {
                reason: NackReason::TooLarge,
                detail: format!(
                    "its payload is {len} bytes, over the relay's limit of {} bytes",
                    self.limits.max_report_payload
                ),
                sent: false,
            };
        }
        match self
            .conn
            .write_message(&Message::Report(Box::new(sent.into_owned())))
            .await
        {
            Ok(()) => {}
            // Both fail before a byte is written: the connection is still in step.
            Err(ProtocolError::TooLarge { len, max }) => {
                return Answer::Refused {
                    reason: NackReason::TooLarge,
                    detail: format!(
                        "it is a frame of {len} bytes, over the relay's limit of {max} bytes"
                    ),
                    sent: false,
                };
            }
            Err(ProtocolError::Encode(e)) => {
                return Answer::Refused {
                    reason: NackReason::Malformed,
                    detail: format!("it cannot be encoded: {e}"),
                    sent: false,
                };
            }
            Err(e) => return Answer::Broken(format!("sending: {e}")),
        }
        let deadline = Instant::now() + ack_timeout;
        loop {
            let answer = match tokio::time::timeout_at(deadline, self.conn.read_message()).await {
                Err(_) => return Answer::Broken(format!("no answer within {ack_timeout:?}")),
                Ok(Err(e)) => return Answer::Broken(e.to_string()),
                Ok(Ok(None)) => return Answer::Broken("the relay closed the connection".into()),
                Ok(Ok(Some(message))) => message,
            };
            match answer {
                Message::Ack(ack) if ack.id == report.id => return Answer::Acked(ack.status),
                Message::Nack(nack) if nack.id == report.id => return classify_nack(nack),
                // Answers to an earlier transmission on this connection, or keep-alives: skip.
                Message::Ack(_) | Message::Nack(_) | Message::Pong(_) => continue,
                Message::Ping(n) => {
                    if self.conn.write_message(&Message::Pong(n)).await.is_err() {
                        return Answer::Broken("answering a ping".into());
                    }
                }
                Message::Error(e) => return classify_error(e.code, e.message),
                other => return Answer::Broken(format!("unexpected {:?}", other.kind())),
            }
        }
    }
}

fn classify_nack(nack: guestwatch_protocol::Nack) -> Answer {
    if nack.reason == NackReason::NeedFull {
        return Answer::NeedFull(nack.detail);
    }
    if nack.reason.is_terminal() {
        return Answer::Refused {
            reason: nack.reason,
            detail: nack.detail,
            sent: true,
        };
    }
    Answer::Retry {
        reason: nack.reason.as_str(),
        after: Duration::from_millis(u64::from(nack.retry_after_ms)),
    }
}

/// An `Error` in answer to a report. A version-1 relay answers a report it cannot take with
/// `Malformed` or `TooLarge`: as final as a terminal `Nack`.
fn classify_error(code: ErrorCode, message: String) -> Answer {
    match code {
        ErrorCode::Malformed => Answer::Refused {
            reason: NackReason::Malformed,
            detail: message,
            sent: true,
        },
        ErrorCode::TooLarge => Answer::Refused {
            reason: NackReason::TooLarge,
            detail: message,
            sent: true,
        },
        ErrorCode::Busy => Answer::Retry {
            reason: "busy",
            after: Duration::from_secs(1),
        },
        _ => Answer::Broken(format!("relay error {code:?}: {message}")),
    }
}
