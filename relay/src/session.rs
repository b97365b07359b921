//! One guest connection: `Hello`/`Welcome`, then reports answered with exactly one `Ack` (the
//! sink has it) or `Nack` (typed: terminal for a report that can never be taken, retryable
//! otherwise), pings, and every limit: frame size (small until the handshake is done), read
//! and idle timeouts, the guest bounds on `Hello` and facts, and a cap on errors — the guest's
//! own `Error` frames included — so garbage cannot keep a connection alive.
//!
//! Everything the guest says reaches the log only through the VM's log budget
//! ([`GuestLog`]) and [`for_log`].

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use guestwatch_protocol::{
    Ack, AckStatus, Connection, ContentHash, DEFAULT_MAX_REPORT_PAYLOAD, ErrorCode, Hello, Limits,
    Message, Nack, NackReason, Payload, ProtocolError, Report, ReportBody, ReportFacts, ReportId,
    SUPPORTED_VERSIONS, Timeout, Welcome, guest, inventory::Document,
};
use log::Level;
use tokio_util::sync::CancellationToken;

use crate::{
    deliver::{Deferral, Deliverer, Outcome},
    escape::for_log,
    guest_log,
    guestlog::GuestLog,
    identity::VmIdentity,
    inventory::Latest,
    listen::{GuestStream, Incoming},
    metrics::Metrics,
    sink::{Claims, Delivery, DeltaInfo},
    validate::{self, Refusal},
};

/// Per-connection limits.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub max_frame: u32,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// What every session shares.
pub struct Shared {
    pub deliverer: Arc<Deliverer>,
    pub metrics: Metrics,
    pub guest_log: Arc<GuestLog>,
}

/// How a session went (the pull dialer paces its next dial by it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// The handshake completed.
    pub welcomed: bool,
    /// Reports acknowledged (delivered or duplicate).
    pub acked: u64,
}

/// Errors tolerated on one connection before it is closed: protocol errors, the guest's own
/// `Error` frames, messages out of place and reports refused for good.
pub const MAX_ERRORS: u32 = 8;
/// The largest frame read before the handshake is done. Every `Hello` within the guest bounds
/// encodes in less (about 141 KiB at most, see the test); a larger one is refused from its
/// header, so a 16 MiB `Hello` allocates nothing.
pub const HANDSHAKE_MAX_FRAME: u32 = 256 * 1024;
/// `retry_after_ms` of a terminal `Nack` to a version-1 agent, which retries every `Nack`.
pub const V1_TERMINAL_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The `Welcome` feature saying this relay applies delta reports.
pub const FEATURE_DELTA: &str = "delta";
/// Writing an answer to a guest that does not read gives up after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Conn = Connection<Box<dyn GuestStream>>;

async fn send(conn: &mut Conn, message: &Message) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, conn.write_message(message)).await,
        Ok(Ok(()))
    )
}

/// An `Error` for the guest; its text is cut to the guest bound on text (an error can quote
/// what the guest sent).
fn error_message(code: ErrorCode, text: impl Into<String>) -> Message {
    let mut text = text.into();
    if text.len() > guest::MAX_TEXT {
        let mut end = guest::MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    Message::error(code, text)
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

/// Serves one connection until the guest leaves, a limit is hit, `stop`, or its VM is removed
/// from the configuration; says how it went.
pub async fn serve(
    conn: Incoming,
    shared: Arc<Shared>,
    config: SessionConfig,
    stop: CancellationToken,
) -> Served {
    let Incoming {
        stream,
        identity,
        admission,
    } = conn;
    let mut served = Served::default();
    let mut conn = Connection::new(
        stream,
        Limits {
            max_frame: HANDSHAKE_MAX_FRAME.min(config.max_frame),
        },
    );
    let Some(hello) = handshake(&mut conn, &identity, &shared, &config).await else {
        return served;
    };
    served.welcomed = true;
    conn.set_max_frame(config.max_frame);
    let claims = claims_of(&hello);
    let vm = identity.name.as_str();
    guest_log!(
        shared.guest_log,
        vm,
        Level::Info,
        "{vm} connected ({:?}, protocol {}); claims: agent {} on {}, detector {}",
        identity.source,
        conn.version(),
        for_log(&hello.agent.agent_version),
        for_log(&hello.agent.hostname),
        for_log(&hello.agent.detector)
    );
    let mut errors = 0u32;
    loop {
        let read = tokio::select! {
            () = stop.cancelled() => return served,
            () = admission.closed() => {
                guest_log!(
                    shared.guest_log,
                    vm,
                    Level::Info,
                    "{vm}: closing: the VM was removed from the configuration"
                );
                return served;
            }
            read = conn.read_message_within(config.idle_timeout, config.read_timeout) => read,
        };
        let message = match read {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => return served,
            Ok(Err(timeout)) => {
                let reason = match timeout {
                    Timeout::Idle(_) => "idle_timeout",
                    Timeout::Frame(_) => "frame_timeout",
                };
                reject(&shared.metrics, reason);
                guest_log!(
                    shared.guest_log,
                    vm,
                    Level::Debug,
                    "{vm}: closing: {timeout}"
                );
                return served;
            }
            Err(e) => {
                reject(&shared.metrics, error_reason(&e));
                errors += 1;
                let fatal = !e.is_recoverable() || errors > MAX_ERRORS;
                if !matches!(
                    e,
                    ProtocolError::ClosedMidFrame { .. } | ProtocolError::Io(_)
                ) {
                    let _ = send(&mut conn, &error_message(e.code(), e.to_string())).await;
                }
                if fatal {
                    guest_log!(
                        shared.guest_log,
                        vm,
                        Level::Warn,
                        "{vm}: closing after protocol error {errors}: {}",
                        for_log(&e.to_string())
                    );
                    return served;
                }
                guest_log!(
                    shared.guest_log,
                    vm,
                    Level::Debug,
                    "{vm}: protocol error {errors}: {}",
                    for_log(&e.to_string())
                );
                continue;
            }
        };
        let answer = match message {
            Message::Report(report) => {
                let (answer, refused) =
                    answer_report(*report, &identity, &claims, conn.version(), &shared).await;
                if refused {
                    errors += 1;
                }
                if matches!(answer, Message::Ack(_)) {
                    served.acked += 1;
                }
                answer
            }
            Message::Ping(nonce) => Message::Pong(nonce),
            Message::Pong(_) => continue,
            Message::Error(e) => {
                // The guest's errors are its own business, but they cost the relay a log line
                // each: they count like protocol errors.
                errors += 1;
                reject(&shared.metrics, "guest_error");
                guest_log!(
                    shared.guest_log,
                    vm,
                    Level::Warn,
                    "{vm} reported an error ({errors} on this connection): {:?}: {}",
                    e.code,
                    for_log(&e.message)
                );
                if errors > MAX_ERRORS {
                    return served;
                }
                continue;
            }
            other => {
                errors += 1;
                reject(&shared.metrics, "out_of_place");
                error_message(
                    ErrorCode::ProtocolViolation,
                    format!("unexpected {:?} after the handshake", other.kind()),
                )
            }
        };
        if !send(&mut conn, &answer).await || errors > MAX_ERRORS {
            if errors > MAX_ERRORS {
                guest_log!(
                    shared.guest_log,
                    vm,
                    Level::Warn,
                    "{vm}: closing after {errors} errors"
                );
            }
            return served;
        }
    }
}

/// Waits for `Hello`, checks it, negotiates the version, sends `Welcome`.
async fn handshake(
    conn: &mut Conn,
    identity: &VmIdentity,
    shared: &Shared,
    config: &SessionConfig,
) -> Option<Hello> {
    let vm = identity.name.as_str();
    let metrics = &shared.metrics;
    let first = conn
        .read_message_within(config.read_timeout, config.read_timeout)
        .await;
    let hello = match first {
        Ok(Ok(Some(Message::Hello(hello)))) => hello,
        Ok(Ok(None)) => return None,
        Ok(Err(_)) => {
            reject(metrics, "handshake_timeout");
            guest_log!(shared.guest_log, vm, Level::Debug, "{vm}: no Hello in time");
            return None;
        }
        Ok(Ok(Some(other))) => {
            reject(metrics, "no_hello");
            let _ = send(
                conn,
                &error_message(
                    ErrorCode::ProtocolViolation,
                    format!("expected Hello, got {:?}", other.kind()),
                ),
            )
            .await;
            guest_log!(
                shared.guest_log,
                vm,
                Level::Warn,
                "{vm}: refused: the first message was {:?}, not Hello",
                other.kind()
            );
            return None;
        }
        Err(e) => {
            let reason = match e {
                ProtocolError::TooLarge { .. } => "hello_too_large",
                _ => error_reason(&e),
            };
            reject(metrics, reason);
            if !matches!(
                e,
                ProtocolError::ClosedMidFrame { .. } | ProtocolError::Io(_)
            ) {
                let _ = send(conn, &error_message(e.code(), e.to_string())).await;
            }
            guest_log!(
                shared.guest_log,
                vm,
                Level::Warn,
                "{vm}: refused before the handshake: {}",
                for_log(&e.to_string())
            );
            return None;
        }
    };
    if let Err(e) = hello.check_limits() {
        reject(metrics, "hello_over_limits");
        let _ = send(
            conn,
            &error_message(ErrorCode::TooLarge, format!("Hello: {e}")),
        )
        .await;
        guest_log!(
            shared.guest_log,
            vm,
            Level::Warn,
            "{vm}: refused a Hello over the guest bounds: {}",
            for_log(&e.to_string())
        );
        return None;
    }
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
            &error_message(
                ErrorCode::UnsupportedVersion,
                format!(
                    "relay speaks protocol versions {SUPPORTED_VERSIONS:?}, agent offers {:?}",
                    hello.versions
                ),
            ),
        )
        .await;
        guest_log!(
            shared.guest_log,
            vm,
            Level::Warn,
            "{vm}: refused: no common protocol version in {:?}",
            hello.versions
        );
        return None;
    };
    conn.set_version(version);
    let welcome = Welcome {
        version,
        max_frame: config.max_frame,
        max_report_payload: DEFAULT_MAX_REPORT_PAYLOAD,
        // `delta`: delta reports are applied here (version 2).
        features: if version >= 2 {
            vec!["zstd".into(), FEATURE_DELTA.into()]
        } else {
            vec!["zstd".into()]
        },
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

/// The one answer to a report, and whether it was refused for good (which counts as an error).
async fn answer_report(
    report: Report,
    identity: &VmIdentity,
    claims: &Claims,
    version: u16,
    shared: &Shared,
) -> (Message, bool) {
    let id = report.id;
    match check_and_deliver(report, identity, claims, shared).await {
        Ok(answer) => (answer, false),
        Err(refusal) => {
            reject(&shared.metrics, refusal.label);
            let vm = identity.name.as_str();
            guest_log!(
                shared.guest_log,
                vm,
                Level::Warn,
                "{vm}: refused report {id}: {}: {}",
                refusal.reason,
                for_log(&refusal.detail)
            );
            let terminal = refusal.reason.is_terminal();
            // Version-1 agents retry every Nack: make them wait long for one that cannot
            // succeed. Version-2 agents do not retry terminal reasons at all.
            let retry_after = if terminal && version == 1 {
                V1_TERMINAL_RETRY_AFTER
            } else {
                Duration::ZERO
            };
            (
                nack(id, refusal.reason, &refusal.detail, retry_after),
                terminal,
            )
        }
    }
}

/// Checks a report (facts, then the payload on the blocking pool) and hands it to delivery.
async fn check_and_deliver(
    report: Report,
    identity: &VmIdentity,
    claims: &Claims,
    shared: &Shared,
) -> Result<Message, Refusal> {
    let Report {
        id,
        content_hash,
        facts,
        body,
    } = report;
    validate::check_facts(&facts)?;
    let deliverer = &shared.deliverer;
    let vm = identity.name.as_str();
    // One report per VM and `max_inflight` in all are decompressed and delivered at once.
    let _slot = deliverer.slot(vm).await;
    let base = match &body {
        ReportBody::Full(_) => None,
        ReportBody::Delta { base_hash, .. } => {
            let need_full = |detail: String| {
                Metrics::lookup(&shared.metrics.reports_delta, "need_full");
                Refusal {
                    reason: NackReason::NeedFull,
                    detail,
                    label: "delta_base",
                }
            };
            match deliverer.latest_inventory(vm).await {
                Some(latest) if latest.content_hash == *base_hash => Some(latest),
                Some(latest) => {
                    return Err(need_full(format!(
                        "the delta's base is not this VM's latest inventory here (report {})",
                        latest.report_id
                    )));
                }
                None => return Err(need_full("this relay holds no inventory of this VM".into())),
            }
        }
    };
    let validated = {
        let _validating = shared.metrics.validating();
        let checked_facts = facts.clone();
        tokio::task::spawn_blocking(move || {
            validated(body, base, &content_hash, &checked_facts, id)
        })
        .await
        .unwrap_or_else(|e| {
            Err(Refusal {
                reason: NackReason::Malformed,
                detail: format!("validation failed: {e}"),
                label: "bad_payload",
            })
        })
    };
    if let Err(refusal) = &validated
        && refusal.reason == NackReason::NeedFull
    {
        Metrics::lookup(&shared.metrics.reports_delta, "need_full");
    }
    let Validated {
        json,
        document,
        inventory,
        delta,
    } = validated?;
    if delta.is_some() {
        Metrics::lookup(&shared.metrics.reports_delta, "applied");
    }
    let delivery = Delivery {
        vm: identity.name.clone(),
        identity: identity.source.clone(),
        report_id: id.to_string(),
        content_hash: content_hash.to_hex(),
        trigger: facts.trigger,
        transactions: facts.transactions,
        tampers: facts.tampers,
        coalesced: facts.coalesced,
        changes: facts.changes,
        claims: claims.clone(),
        scanned_at: (facts.scanned_at.0 > 0).then(|| millis(facts.scanned_at.0)),
        received_at: SystemTime::now(),
        package_count: u64::from(facts.package_count),
        report: bytes::Bytes::from(json),
        document,
        inventory,
        delta,
    };
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
        } => match reason {
            Deferral::RateLimited(why) => nack(id, NackReason::RateLimited, &why, retry_after),
            Deferral::SinkUnavailable(why) => {
                nack(id, NackReason::SinkUnavailable, &why, retry_after)
            }
        },
    })
}

/// A report's payload once checked: the JSON for the sink, and for a compact report its
/// document, the document as the sink stores it, and what a delta touched.
struct Validated {
    json: Vec<u8>,
    document: Option<Arc<Document>>,
    inventory: Option<Payload>,
    delta: Option<DeltaInfo>,
}

/// Decompresses, decodes, applies (a delta, to `base`), checks and renders. Blocking.
fn validated(
    body: ReportBody,
    base: Option<Latest>,
    content_hash: &ContentHash,
    facts: &ReportFacts,
    id: ReportId,
) -> Result<Validated, Refusal> {
    let max = DEFAULT_MAX_REPORT_PAYLOAD;
    match (body, base) {
        (ReportBody::Full(payload), _) if payload.is_document() => {
            let (json, doc) =
                validate::payload_document(&payload, content_hash, facts, id.generation, max)?;
            Ok(Validated {
                json,
                document: Some(Arc::new(doc)),
                // Stored as it came: already compressed.
                inventory: Some(payload),
                delta: None,
            })
        }
        (ReportBody::Full(payload), _) => Ok(Validated {
            json: validate::payload_json(payload, max)?,
            document: None,
            inventory: None,
            delta: None,
        }),
        (ReportBody::Delta { payload, .. }, Some(base)) => {
            let (json, doc, touched) = validate::payload_delta(
                &payload,
                &base.document,
                content_hash,
                facts,
                id.generation,
                max,
            )?;
            Ok(Validated {
                json,
                inventory: Some(Payload::document_fast(doc.to_bytes())),
                document: Some(Arc::new(doc)),
                delta: Some(DeltaInfo {
                    base_hash: base.content_hash,
                    touched: Arc::new(touched),
                }),
            })
        }
        (ReportBody::Delta { .. }, None) => Err(Refusal {
            reason: NackReason::NeedFull,
            detail: "no base".into(),
            label: "delta_base",
        }),
    }
}

fn nack(id: ReportId, reason: NackReason, detail: &str, retry_after: Duration) -> Message {
    let mut detail = detail.to_owned();
    if detail.len() > guest::MAX_TEXT {
        let mut end = guest::MAX_TEXT;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
    }
    Message::Nack(Nack {
        id,
        reason,
        detail,
        retry_after_ms: retry_after.as_millis().min(u128::from(u32::MAX)) as u32,
    })
}

#[cfg(test)]
mod tests {
    use guestwatch_protocol::{AgentInfo, encoded_len};

    use super::*;

    #[test]
    fn every_hello_within_the_guest_bounds_fits_the_handshake_frame() {
        let name = "\u{1}".repeat(guest::MAX_NAME);
        let text = "\u{1}".repeat(guest::MAX_TEXT);
        let hello = Hello {
            versions: vec![u16::MAX; guest::MAX_SMALL_LIST],
            epoch: u64::MAX,
            agent: AgentInfo {
                agent_version: name.clone(),
                hostname: name.clone(),
                os: name.clone(),
                kernel: name.clone(),
                detector: name.clone(),
            },
            extensions: vec![(name, text); guest::MAX_SMALL_LIST],
        };
        hello.check_limits().unwrap();
        let len = encoded_len(&hello);
        assert!(len < HANDSHAKE_MAX_FRAME as usize, "{len}");
    }
}
