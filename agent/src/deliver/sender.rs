//! The sender: keeps the newest unacknowledged report and delivers it to the relay.
//!
//! - Reports arrive through a [`Outbox`]; a newer one supersedes an older unacknowledged one.
//! - The producer persists every report before offering it, so a crash or a reboot resends
//!   it; an acknowledgement is recorded in the state directory, which then forgets the report.
//! - Reconnection and retransmission use capped exponential backoff with jitter; a `Nack`'s
//!   retry-after is honoured; an unanswered report is retransmitted after the ack timeout.
//! - The relay being down never blocks detection or scanning: the outbox is a watch channel,
//!   the producer never waits for the sender.

use std::{
    sync::Arc,
    time::{Duration, Instant as StdInstant},
};

use guestwatch_protocol::{
    AckStatus, AgentInfo, Connection, ErrorCode, Hello, Limits, Message, Report, SUPPORTED_VERSIONS,
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    backoff::Backoff,
    state::Acked,
    transport::{self, RelayStream},
    writer::StateWriter,
};
use crate::{config::RelayAddr, metrics::Metrics};

/// A report waiting for the relay.
#[derive(Clone, Debug)]
pub struct Pending {
    pub report: Arc<Report>,
    /// When the scan that produced it finished (for the delivery-latency metric).
    pub scanned: StdInstant,
}

/// The producer's side: offer the newest report.
#[derive(Clone)]
pub struct Outbox {
    tx: watch::Sender<Option<Pending>>,
}

impl Outbox {
    pub fn new() -> (Self, watch::Receiver<Option<Pending>>) {
        let (tx, rx) = watch::channel(None);
        (Self { tx }, rx)
    }

    /// Offers `report`, superseding any report not acknowledged yet.
    pub fn offer(&self, report: Arc<Report>) {
        self.tx.send_replace(Some(Pending {
            report,
            scanned: StdInstant::now(),
        }));
    }
}

/// Sender settings.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    pub relay: RelayAddr,
    pub connect_timeout: Duration,
    pub ack_timeout: Duration,
    pub max_backoff: Duration,
    pub agent: AgentInfo,
    /// The installation's epoch (from the state directory), announced in `Hello`.
    pub epoch: u64,
    /// `Hello.extensions` (e.g. why the epoch was chosen).
    pub extensions: Vec<(String, String)>,
}

enum Exchange {
    /// The relay acknowledged the report.
    Acked(AckStatus),
    /// Retry after this long (Nack).
    RetryAfter(Duration),
    /// The connection is unusable; reconnect.
    Broken(String),
}

/// Delivers reports until `stop`. A write in progress is finished before returning.
pub async fn run(
    config: SenderConfig,
    writer: StateWriter,
    mut outbox: watch::Receiver<Option<Pending>>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut reconnect = Backoff::new(Duration::from_millis(200), config.max_backoff);
    let mut conn: Option<Connection<Box<dyn RelayStream>>> = None;
    let mut ping_interval = Duration::from_secs(30);
    // The last report the relay acknowledged: never sent again.
    let mut acked: Option<guestwatch_protocol::ReportId> = None;
    loop {
        // Wait for something (not yet acknowledged) to send.
        let pending = loop {
            if let Some(p) = outbox.borrow_and_update().clone()
                && Some(p.report.id) != acked
            {
                break p;
            }
            metrics.pending_reports.set(0);
            let connected = conn.is_some();
            let idle = async move {
                match connected {
                    true => tokio::time::sleep(ping_interval).await,
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                changed = outbox.changed() => if changed.is_err() { return },
                () = idle => {
                    // Keep the connection alive (and find out early if it died).
                    if let Some(c) = &mut conn
                        && !ping(c, config.ack_timeout).await
                    {
                        conn = None;
                        metrics.relay_connected.set(0);
                    }
                }
            }
        };
        metrics.pending_reports.set(1);

        let Some(c) = conn.as_mut() else {
            match connect(&config).await {
                Ok((c, interval)) => {
                    log::info!("connected to the relay at {}", config.relay);
                    ping_interval = interval;
                    reconnect.reset();
                    conn = Some(c);
                    metrics.relay_connected.set(1);
                }
                Err(e) => {
                    let delay = reconnect.next_delay();
                    if reconnect.attempts() <= 1 || reconnect.attempts().is_multiple_of(20) {
                        log::warn!(
                            "relay {} unreachable ({e}); retrying in {delay:.1?}",
                            config.relay
                        );
                    }
                    if sleep_or_stop(delay, &stop).await {
                        return;
                    }
                }
            }
            continue;
        };

        metrics.reports_sent.inc();
        // The exchange is not cancelled by `stop`: a write in progress completes, and the
        // answer is awaited for at most the ack timeout.
        let outcome = exchange(c, &pending.report, config.ack_timeout).await;
        match outcome {
            Exchange::Acked(status) => {
                let id = pending.report.id;
                metrics
                    .reports_acked
                    .get_or_create(&crate::metrics::OutcomeLabel {
                        outcome: match status {
                            AckStatus::Delivered => "delivered",
                            AckStatus::Duplicate => "duplicate",
                        }
                        .to_owned(),
                    })
                    .inc();
                metrics
                    .delivery_seconds
                    .observe(pending.scanned.elapsed().as_secs_f64());
                log::info!("report {id} acknowledged ({status:?})");
                let record = Acked {
                    generation: id.generation,
                    content_hash: pending.report.content_hash.to_hex(),
                };
                if let Err(e) = writer.record_ack(record).await {
                    log::error!("recording the acknowledgement of report {id}: {e}");
                }
                acked = Some(id);
            }
            Exchange::RetryAfter(delay) => {
                metrics.reports_nacked.inc();
                log::info!(
                    "relay asked to retry report {} in {delay:.1?}",
                    pending.report.id
                );
                if sleep_or_stop(delay, &stop).await {
                    return;
                }
            }
            Exchange::Broken(why) => {
                log::warn!(
                    "lost the relay connection ({why}); will retransmit report {}",
                    pending.report.id
                );
                conn = None;
                metrics.relay_connected.set(0);
                let delay = reconnect.next_delay();
                if sleep_or_stop(delay, &stop).await {
                    return;
                }
            }
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

async fn connect(
    config: &SenderConfig,
) -> Result<(Connection<Box<dyn RelayStream>>, Duration), String> {
    let stream = transport::connect(&config.relay, config.connect_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = Connection::new(stream, Limits::default());
    let hello = Message::Hello(Hello {
        versions: SUPPORTED_VERSIONS.to_vec(),
        epoch: config.epoch,
        agent: config.agent.clone(),
        extensions: config.extensions.clone(),
    });
    let answer = tokio::time::timeout(config.ack_timeout, async {
        conn.write_message(&hello).await?;
        conn.read_message().await
    })
    .await
    .map_err(|_| "the relay did not answer Hello".to_owned())?
    .map_err(|e| e.to_string())?;
    match answer {
        Some(Message::Welcome(welcome)) => {
            conn.set_version(welcome.version);
            conn.set_max_frame(welcome.max_frame);
            Ok((
                conn,
                Duration::from_secs(u64::from(welcome.ping_interval_secs.max(1))),
            ))
        }
        Some(Message::Error(e)) => {
            Err(format!("the relay refused us: {:?}: {}", e.code, e.message))
        }
        Some(other) => Err(format!("expected Welcome, got {:?}", other.kind())),
        None => Err("the relay closed the connection".into()),
    }
}

async fn ping(conn: &mut Connection<Box<dyn RelayStream>>, timeout: Duration) -> bool {
    let nonce = fastrand::u64(..);
    let answered = tokio::time::timeout(timeout, async {
        conn.write_message(&Message::Ping(nonce)).await?;
        loop {
            match conn.read_message().await? {
                Some(Message::Pong(n)) if n == nonce => return Ok(true),
                Some(_) => continue,
                None => return Ok::<bool, guestwatch_protocol::ProtocolError>(false),
            }
        }
    })
    .await;
    matches!(answered, Ok(Ok(true)))
}

/// Sends `report` and waits for its answer.
async fn exchange(
    conn: &mut Connection<Box<dyn RelayStream>>,
    report: &Report,
    ack_timeout: Duration,
) -> Exchange {
    if let Err(e) = conn
        .write_message(&Message::Report(Box::new(report.clone())))
        .await
    {
        return Exchange::Broken(format!("sending: {e}"));
    }
    let deadline = Instant::now() + ack_timeout;
    loop {
        let answer = match tokio::time::timeout_at(deadline, conn.read_message()).await {
            Err(_) => return Exchange::Broken(format!("no answer within {ack_timeout:?}")),
            Ok(Err(e)) => return Exchange::Broken(e.to_string()),
            Ok(Ok(None)) => return Exchange::Broken("the relay closed the connection".into()),
            Ok(Ok(Some(message))) => message,
        };
        match answer {
            Message::Ack(ack) if ack.id == report.id => return Exchange::Acked(ack.status),
            Message::Nack(nack) if nack.id == report.id => {
                return Exchange::RetryAfter(
                    Duration::from_millis(u64::from(nack.retry_after_ms))
                        .max(Duration::from_millis(100)),
                );
            }
            // Answers to an earlier transmission on this connection, or keep-alives: skip.
            Message::Ack(_) | Message::Nack(_) | Message::Pong(_) => continue,
            Message::Ping(n) => {
                if conn.write_message(&Message::Pong(n)).await.is_err() {
                    return Exchange::Broken("answering a ping".into());
                }
            }
            Message::Error(e) if e.code == ErrorCode::Busy => {
                return Exchange::RetryAfter(Duration::from_secs(1));
            }
            Message::Error(e) => {
                return Exchange::Broken(format!("relay error {:?}: {}", e.code, e.message));
            }
            other => return Exchange::Broken(format!("unexpected {:?}", other.kind())),
        }
    }
}
