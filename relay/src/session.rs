//! One guest connection: `Hello`/`Welcome`, then reports answered with `Ack` (the sink has
//! it) or `Nack` (retry later), pings, and every limit: frame size, read and idle timeouts,
//! and a cap on protocol errors so garbage cannot keep a connection alive.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use guestwatch_protocol::{
    Ack, AckStatus, Connection, DEFAULT_MAX_REPORT_PAYLOAD, ErrorCode, Hello, Limits, Message,
    Nack, NackReason, ProtocolError, Report, ReportBody, ReportId, SUPPORTED_VERSIONS, Timeout,
    Welcome,
};
use tokio_util::sync::CancellationToken;

use crate::{
    deliver::{Deliverer, Outcome},
    identity::VmIdentity,
    listen::{GuestStream, Incoming},
    metrics::Metrics,
    sink::{Claims, Delivery},
};

/// Per-connection limits.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub max_frame: u32,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Protocol errors tolerated on one connection before it is closed.
const MAX_ERRORS: u32 = 8;
/// Writing an answer to a guest that does not read gives up after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Conn = Connection<Box<dyn GuestStream>>;

async fn send(conn: &mut Conn, message: &Message) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, conn.write_message(message)).await,
        Ok(Ok(()))
    )
}

fn reject(metrics: &Metrics, reason: &str) {
    Metrics::reason(&metrics.reports_rejected, reason);
}

fn error_reason(e: &ProtocolError) -> &'static str {
    match e {
        ProtocolError::ClosedMidFrame { .. } => "closed_mid_frame",
        ProtocolError::BadMagic(_) => "garbage",
        ProtocolError::UnsupportedVersion(_) => "unsupported_version",
        ProtocolError::TooLarge { .. } => "frame_too_large",
        ProtocolError::UnknownType(_) => "unknown_type",
        ProtocolError::Malformed { .. } => "malformed",
        ProtocolError::Encode(_) | ProtocolError::Io(_) => "io",
    }
}

/// Serves one connection until the guest leaves, a limit is hit, or `stop`.
pub async fn serve(
    conn: Incoming,
    deliverer: Arc<Deliverer>,
    metrics: Metrics,
    config: SessionConfig,
    stop: CancellationToken,
) {
    let Incoming {
        stream,
        identity,
        admission: _admission,
    } = conn;
    let mut conn = Connection::new(
        stream,
        Limits {
            max_frame: config.max_frame,
        },
    );
    let Some(hello) = handshake(&mut conn, &identity, &metrics, &config).await else {
        return;
    };
    let claims = claims_of(&hello);
    log::info!(
        "{} connected ({:?}); claims: agent {} on {:?}, detector {}",
        identity.name,
        identity.source,
        hello.agent.agent_version,
        hello.agent.hostname,
        hello.agent.detector
    );
    let mut errors = 0u32;
    loop {
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = conn.read_message_within(config.idle_timeout, config.read_timeout) => read,
        };
        let message = match read {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => return,
            Ok(Err(timeout)) => {
                let reason = match timeout {
                    Timeout::Idle(_) => "idle_timeout",
                    Timeout::Frame(_) => "frame_timeout",
                };
                reject(&metrics, reason);
                log::debug!("{}: closing: {timeout}", identity.name);
                return;
            }
            Err(e) => {
                reject(&metrics, error_reason(&e));
                errors += 1;
                let fatal = !e.is_recoverable() || errors > MAX_ERRORS;
                if !matches!(
                    e,
                    ProtocolError::ClosedMidFrame { .. } | ProtocolError::Io(_)
                ) {
                    let _ = send(&mut conn, &Message::error(e.code(), e.to_string())).await;
                }
                if fatal {
                    log::warn!("{}: closing after protocol error: {e}", identity.name);
                    return;
                }
                continue;
            }
        };
        let answer = match message {
            Message::Report(report) => {
                match handle_report(*report, &identity, &claims, &deliverer, &metrics).await {
                    Ok(answer) => answer,
                    Err(answer) => {
                        errors += 1;
                        answer
                    }
                }
            }
            Message::Ping(nonce) => Message::Pong(nonce),
            Message::Pong(_) => continue,
            Message::Error(e) => {
                log::warn!(
                    "{} reported an error: {:?}: {}",
                    identity.name,
                    e.code,
                    e.message
                );
                continue;
            }
            other => {
                errors += 1;
                Message::error(
                    ErrorCode::ProtocolViolation,
                    format!("unexpected {:?} after the handshake", other.kind()),
                )
            }
        };
        if !send(&mut conn, &answer).await || errors > MAX_ERRORS {
            return;
        }
    }
}

/// Waits for `Hello`, negotiates the version, sends `Welcome`.
async fn handshake(
    conn: &mut Conn,
    identity: &VmIdentity,
    metrics: &Metrics,
    config: &SessionConfig,
) -> Option<Hello> {
    let first = conn
        .read_message_within(config.read_timeout, config.read_timeout)
        .await;
    let hello = match first {
        Ok(Ok(Some(Message::Hello(hello)))) => hello,
        Ok(Ok(None)) => return None,
        Ok(Err(_)) => {
            reject(metrics, "handshake_timeout");
            return None;
        }
        Ok(Ok(Some(other))) => {
            reject(metrics, "no_hello");
            let _ = send(
                conn,
                &Message::error(
                    ErrorCode::ProtocolViolation,
                    format!("expected Hello, got {:?}", other.kind()),
                ),
            )
            .await;
            return None;
        }
        Err(e) => {
            reject(metrics, error_reason(&e));
            let _ = send(conn, &Message::error(e.code(), e.to_string())).await;
            log::warn!("{}: refused before the handshake: {e}", identity.name);
            return None;
        }
    };
    let Some(version) = hello
        .versions
        .iter()
        .copied()
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .max()
    else {
        reject(metrics, "unsupported_version");
        let _ = send(
            conn,
            &Message::error(
                ErrorCode::UnsupportedVersion,
                format!(
                    "relay speaks protocol versions {SUPPORTED_VERSIONS:?}, agent offers {:?}",
                    hello.versions
                ),
            ),
        )
        .await;
        return None;
    };
    conn.set_version(version);
    let welcome = Welcome {
        version,
        max_frame: config.max_frame,
        max_report_payload: DEFAULT_MAX_REPORT_PAYLOAD,
        features: vec!["zstd".into()],
        ping_interval_secs: (config.idle_timeout.as_secs() / 4).clamp(1, u64::from(u32::MAX))
            as u32,
        relay_version: env!("CARGO_PKG_VERSION").into(),
    };
    send(conn, &Message::Welcome(welcome))
        .await
        .then_some(hello)
}

fn claims_of(hello: &Hello) -> Claims {
    Claims {
        epoch: format!("{:016x}", hello.epoch),
        agent_version: hello.agent.agent_version.clone(),
        hostname: hello.agent.hostname.clone(),
        os: hello.agent.os.clone(),
        kernel: hello.agent.kernel.clone(),
        detector: hello.agent.detector.clone(),
    }
}

fn millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Checks a report and hands it to delivery; `Err` carries an answer for a broken report.
async fn handle_report(
    report: Report,
    identity: &VmIdentity,
    claims: &Claims,
    deliverer: &Deliverer,
    metrics: &Metrics,
) -> Result<Message, Message> {
    let _slot = deliverer.slot(&identity.name).await;
    let payload = match &report.body {
        ReportBody::Full(payload) => payload,
        ReportBody::Delta { .. } => {
            reject(metrics, "delta_unsupported");
            return Ok(nack(
                &report,
                NackReason::NeedFull,
                "this relay takes full reports only",
                0,
            ));
        }
    };
    let json = payload.to_json(DEFAULT_MAX_REPORT_PAYLOAD).map_err(|e| {
        reject(metrics, "bad_payload");
        Message::error(ErrorCode::Malformed, format!("report {}: {e}", report.id))
    })?;
    // The sinks splice these bytes into JSON documents: they must be one JSON object.
    let is_object = json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !is_object || serde_json::from_slice::<serde::de::IgnoredAny>(&json).is_err() {
        reject(metrics, "bad_payload");
        return Err(Message::error(
            ErrorCode::Malformed,
            format!("report {}: payload is not a JSON object", report.id),
        ));
    }
    let facts = report.facts;
    let delivery = Delivery {
        vm: identity.name.clone(),
        identity: identity.source.clone(),
        report_id: report.id.to_string(),
        content_hash: report.content_hash.to_hex(),
        trigger: facts.trigger,
        transactions: facts.transactions,
        tampers: facts.tampers,
        coalesced: facts.coalesced,
        changes: facts.changes,
        claims: claims.clone(),
        scanned_at: (facts.scanned_at.0 > 0).then(|| millis(facts.scanned_at.0)),
        received_at: SystemTime::now(),
        package_count: u64::from(facts.package_count),
        report: bytes::Bytes::from(json.into_owned()),
    };
    let id = report.id;
    Ok(match deliverer.submit(delivery).await {
        Outcome::Delivered => Message::Ack(Ack {
            id,
            status: AckStatus::Delivered,
        }),
        Outcome::Duplicate => Message::Ack(Ack {
            id,
            status: AckStatus::Duplicate,
        }),
        Outcome::Deferred {
            reason,
            retry_after,
        } => {
            let retry_after_ms = retry_after.as_millis().min(u128::from(u32::MAX)) as u32;
            match reason {
                crate::deliver::Deferral::RateLimited(why) => {
                    nack_id(id, NackReason::RateLimited, &why, retry_after_ms)
                }
                crate::deliver::Deferral::SinkUnavailable(why) => {
                    nack_id(id, NackReason::SinkUnavailable, &why, retry_after_ms)
                }
            }
        }
    })
}

fn nack(report: &Report, reason: NackReason, detail: &str, retry_after_ms: u32) -> Message {
    nack_id(report.id, reason, detail, retry_after_ms)
}

fn nack_id(id: ReportId, reason: NackReason, detail: &str, retry_after_ms: u32) -> Message {
    Message::Nack(Nack {
        id,
        reason,
        detail: detail.to_owned(),
        retry_after_ms,
    })
}
