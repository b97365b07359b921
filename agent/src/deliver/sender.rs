//! The sender: keeps the newest unacknowledged report and delivers it to the relay.
//!
//! - The relay session is dialed (push, `--relay`) or accepted from the relay (pull,
//!   `--listen`, handed over by `listen.rs`), or both; everything after the handshake is the
//!   same code. A newer accepted session replaces the current one (also mid-exchange: the
//!   relay only dials again when its end is gone). Without `--relay`, the sender waits for the
//!   host to connect; with a session, a report goes out the moment it is built.
//! - Reports arrive through an [`Outbox`]; a newer one supersedes an older unacknowledged one.
//!   The producer persists a report before offering it, so a crash or a reboot resends it; an
//!   acknowledgement is recorded in the state directory, which then forgets the report.
//! - Every attempt is paced by one capped, jittered backoff: a failed or unanswered connection,
//!   a `Nack`, a refusal each push the next attempt back, and only an acknowledgement resets
//!   it. A connection that succeeds but delivers nothing does not, so an undeliverable report
//!   can never make the agent reconnect in a tight loop.
//! - A report the relay can never take (a terminal `Nack`, a version-1 relay's `Error`, or
//!   beyond the limits it announced in `Welcome`, in which case it is not even sent) is given
//!   up: logged once, counted, and not sent again until something changes — a newer report, or
//!   a relay announcing other limits on a later connection.
//! - The relay being down never blocks detection or scanning: the outbox is a watch channel,
//!   the producer never waits for the sender.
//! - To a relay that takes them (version 2, `Welcome` feature `delta`), a report goes as a
//!   delta against the last acknowledged report (the base) when that is smaller. The relay
//!   answers `Nack(NeedFull)` when it lacks the base or the result does not check out: the base
//!   is dropped and the report goes whole at once, without a backoff step.

use std::{
    sync::Arc,
    time::{Duration, Instant as StdInstant},
};

use guestwatch_daemon::backoff::Backoff;
use guestwatch_protocol::{AckStatus, AgentInfo, Hello, Report, ReportId, inventory::Document};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    listen::Handoff,
    session::{Answer, RelayLimits, Session},
    state::{Acked, Rejected},
    wire::{self, Base},
    writer::StateWriter,
};
use crate::{config::RelayAddr, metrics::Metrics};

/// A report waiting for the relay.
#[derive(Clone, Debug)]
pub struct Pending {
    pub report: Arc<Report>,
    /// The document it carries (what a delta is made from); `None` for a report from before a
    /// restart whose document was not decoded.
    pub document: Option<Arc<Document>>,
    /// The payload's size decompressed, when known (checked against the relay's limit).
    pub json_len: Option<u64>,
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

    /// Offers `report` (carrying `document`), superseding any report not acknowledged yet.
    pub fn offer(&self, report: Arc<Report>, document: Option<Arc<Document>>) {
        let json_len = super::wire::payload_len(report.body.payload());
        self.tx.send_replace(Some(Pending {
            report,
            document,
            json_len,
            scanned: StdInstant::now(),
        }));
    }
}

/// Sender settings.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Dial the relay here (push); `None` when sessions only come from the relay (pull).
    pub relay: Option<RelayAddr>,
    pub connect_timeout: Duration,
    pub ack_timeout: Duration,
    pub max_backoff: Duration,
    pub agent: AgentInfo,
    /// The installation's epoch (from the state directory), announced in `Hello`.
    pub epoch: u64,
    /// `Hello.extensions` (e.g. why the epoch was chosen).
    pub extensions: Vec<(String, String)>,
}

/// A report given up on, and the relay limits it was refused under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Refusal {
    id: ReportId,
    limits: RelayLimits,
}

/// The Hello this agent says, on every session, dialed or accepted.
pub fn hello(config: &SenderConfig) -> Hello {
    Hello {
        versions: Vec::new(),
        epoch: config.epoch,
        agent: config.agent.clone(),
        extensions: config.extensions.clone(),
    }
}

/// What the previous run left the sender: the pending report's refusal, and the base of
/// deltas.
#[derive(Debug, Default)]
pub struct Carried {
    pub rejected: Option<Rejected>,
    pub base: Option<Base>,
}

/// Delivers reports until `stop`. A write in progress is finished before returning.
/// `carried` is what the previous run recorded; `accepted` brings the sessions the relay
/// opened (pull mode).
pub async fn run(
    config: SenderConfig,
    writer: StateWriter,
    mut outbox: watch::Receiver<Option<Pending>>,
    metrics: Metrics,
    stop: CancellationToken,
    carried: Carried,
    accepted: Option<Arc<Handoff>>,
) {
    let Carried { rejected, base } = carried;
    let refused = rejected.map(|r| {
        log::info!(
            "report {:016x}-{} was refused by the relay ({}); waiting for a newer report or \
             other relay limits",
            config.epoch,
            r.generation,
            r.reason
        );
        Refusal {
            id: ReportId {
                epoch: config.epoch,
                generation: r.generation,
            },
            limits: RelayLimits {
                max_frame: r.max_frame,
                max_report_payload: r.max_report_payload,
            },
        }
    });
    let mut sender = Sender {
        backoff: Backoff::new(Duration::from_millis(200), config.max_backoff),
        hello: hello(&config),
        config,
        accepted,
        writer,
        metrics,
        session: None,
        acked: None,
        base,
        delta: None,
        refused,
        not_before: Instant::now(),
        connect_failures: 0,
    };
    loop {
        if sender.current(&mut outbox).is_none() {
            if !sender.idle(&mut outbox, &stop).await {
                return;
            }
            continue;
        }
        if !sender.wait_until(sender.not_before, &stop).await {
            return;
        }
        // The newest report after the wait (a newer one may have arrived meanwhile).
        let Some(pending) = sender.current(&mut outbox) else {
            continue;
        };
        if sender.session.is_none() {
            if sender.config.relay.is_some() {
                // Connected, or paced after a failure: start over with the newest report.
                sender.connect().await;
            } else if !sender.await_session(&mut outbox, &stop).await {
                return;
            }
            continue;
        }
        if sender.gave_up_on(&pending) {
            if !sender.idle(&mut outbox, &stop).await {
                return;
            }
            continue;
        }
        sender.deliver(&pending).await;
        if stop.is_cancelled() {
            return;
        }
    }
}

struct Sender {
    config: SenderConfig,
    /// Sessions the relay opened (pull mode).
    accepted: Option<Arc<Handoff>>,
    hello: Hello,
    writer: StateWriter,
    metrics: Metrics,
    backoff: Backoff,
    session: Option<Session>,
    /// The last report the relay acknowledged: never sent again.
    acked: Option<ReportId>,
    /// The last acknowledged report's document, the base of deltas (`None` after a
    /// `NeedFull`, until the next acknowledgement).
    base: Option<Base>,
    /// The delta last made: of which report, against which base (made once, sent as often as
    /// needed).
    delta: Option<(ReportId, ReportId, Arc<Report>)>,
    refused: Option<Refusal>,
    /// No connection attempt or transmission before this.
    not_before: Instant,
    connect_failures: u32,
}

impl Sender {
    /// The newest report not acknowledged yet.
    fn current(&self, outbox: &mut watch::Receiver<Option<Pending>>) -> Option<Pending> {
        let current = outbox
            .borrow_and_update()
            .clone()
            .filter(|p| Some(p.report.id) != self.acked);
        self.metrics
            .pending_reports
            .set(i64::from(current.is_some()));
        current
    }

    /// A session the relay opened, when one arrives (never, in push-only mode).
    async fn next_accepted(handoff: Option<Arc<Handoff>>) -> Session {
        match handoff {
            Some(handoff) => handoff.take().await,
            None => std::future::pending().await,
        }
    }

    /// Makes a session the relay opened the current one.
    fn adopt(&mut self, session: Session) {
        if self.session.is_some() {
            log::info!("the relay connected again; the newer session replaces the old one");
        } else {
            log::info!(
                "the relay connected (frames up to {} bytes)",
                session.limits.max_frame
            );
        }
        self.metrics.relay_connections.inc();
        self.metrics.relay_connected.set(1);
        self.session = Some(session);
    }

    /// Waits until `at`, adopting sessions the relay opens meanwhile; false on `stop`.
    async fn wait_until(&mut self, at: Instant, stop: &CancellationToken) -> bool {
        loop {
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep_until(at) => return true,
                session = Self::next_accepted(self.accepted.clone()) => self.adopt(session),
            }
        }
    }

    /// Pull only, no session: waits for the relay to connect or for a newer report; false
    /// on `stop`.
    async fn await_session(
        &mut self,
        outbox: &mut watch::Receiver<Option<Pending>>,
        stop: &CancellationToken,
    ) -> bool {
        tokio::select! {
            () = stop.cancelled() => false,
            changed = outbox.changed() => changed.is_ok(),
            session = Self::next_accepted(self.accepted.clone()) => {
                self.adopt(session);
                true
            }
        }
    }

    /// Waits for a newer report, keeping an open connection alive and adopting sessions the
    /// relay opens; false on `stop`.
    async fn idle(
        &mut self,
        outbox: &mut watch::Receiver<Option<Pending>>,
        stop: &CancellationToken,
    ) -> bool {
        let ping_every = self.session.as_ref().map(|s| s.ping_interval);
        tokio::select! {
            () = stop.cancelled() => false,
            changed = outbox.changed() => changed.is_ok(),
            session = Self::next_accepted(self.accepted.clone()) => {
                self.adopt(session);
                true
            }
            () = sleep_opt(ping_every) => {
                if let Some(session) = &mut self.session
                    && !session.ping(self.config.ack_timeout).await
                {
                    self.lost("the relay did not answer a ping");
                }
                true
            }
        }
    }

    async fn connect(&mut self) {
        let Some(relay) = self.config.relay.clone() else {
            return;
        };
        let opened = Session::open(
            &relay,
            self.config.connect_timeout,
            self.config.ack_timeout,
            &self.hello,
        )
        .await;
        match opened {
            Ok(session) => {
                log::info!(
                    "connected to the relay at {relay} (frames up to {} bytes)",
                    session.limits.max_frame
                );
                self.connect_failures = 0;
                self.metrics.relay_connections.inc();
                self.metrics.relay_connected.set(1);
                self.session = Some(session);
            }
            Err(e) => {
                self.connect_failures = self.connect_failures.saturating_add(1);
                let delay = self.pace();
                if self.connect_failures == 1 || self.connect_failures.is_multiple_of(20) {
                    log::warn!("relay {relay} unreachable ({e}); retrying in {delay:.1?}");
                }
            }
        }
    }

    /// Whether `pending` was refused under the limits the relay announces now. Other limits
    /// (a relay restarted with another `--max-frame`) earn it one more try.
    fn gave_up_on(&mut self, pending: &Pending) -> bool {
        let (Some(refusal), Some(session)) = (&self.refused, &self.session) else {
            return false;
        };
        if refusal.id != pending.report.id {
            return false;
        }
        if refusal.limits == session.limits {
            return true;
        }
        log::info!(
            "the relay now announces other limits ({:?}, was {:?}); trying report {} again",
            session.limits,
            refusal.limits,
            refusal.id
        );
        self.refused = None;
        false
    }

    async fn deliver(&mut self, pending: &Pending) {
        let Some(session) = &self.session else {
            return;
        };
        let id = pending.report.id;
        let limits = session.limits;
        let accepts_delta = session.accepts_delta;
        let sent = match (&self.base, &pending.document) {
            (Some(base), Some(document)) if accepts_delta && base.id != id => {
                let made = self
                    .delta
                    .as_ref()
                    .filter(|(of, against, _)| *of == id && *against == base.id)
                    .map(|(_, _, delta)| delta.clone());
                let delta = made.or_else(|| {
                    let delta = Arc::new(wire::as_delta(&pending.report, document, base)?);
                    self.delta = Some((id, base.id, delta.clone()));
                    Some(delta)
                });
                delta.unwrap_or_else(|| pending.report.clone())
            }
            _ => pending.report.clone(),
        };
        let is_delta = !Arc::ptr_eq(&sent, &pending.report);
        log::debug!(
            "sending report {id} {}: payload {} bytes, facts {} bytes",
            if is_delta { "as a delta" } else { "whole" },
            sent.body.payload().bytes.len(),
            guestwatch_protocol::encoded_len(&sent.facts),
        );
        let Some(session) = &mut self.session else {
            return;
        };
        // The exchange is not cancelled by `stop`: a write in progress completes, and the
        // answer is awaited for at most the ack timeout. A newer session the relay opened
        // ends it: the relay dials again only when its end of this one is gone.
        let mut newer = None;
        let json_len = if is_delta { None } else { pending.json_len };
        let answer = tokio::select! {
            answer = session.exchange(&sent, json_len, self.config.ack_timeout) => answer,
            session = Self::next_accepted(self.accepted.clone()) => {
                newer = Some(session);
                Answer::Broken("the relay connected again".into())
            }
        };
        if !matches!(answer, Answer::Refused { sent: false, .. }) {
            self.metrics.reports_sent.inc();
        }
        match answer {
            Answer::Acked(status) => {
                self.metrics.acked(match status {
                    AckStatus::Delivered => "delivered",
                    AckStatus::Duplicate => "duplicate",
                });
                self.metrics
                    .delivery_seconds
                    .observe(pending.scanned.elapsed().as_secs_f64());
                log::info!(
                    "report {id} acknowledged ({status:?}{})",
                    if is_delta { ", sent as a delta" } else { "" }
                );
                self.metrics
                    .sent_form(if is_delta { "delta" } else { "full" });
                self.acked = Some(id);
                self.refused = None;
                self.backoff.reset();
                self.delta = None;
                self.base = pending.document.as_ref().map(|document| Base {
                    id,
                    content_hash: pending.report.content_hash,
                    document: document.clone(),
                });
                let acked = Acked {
                    generation: id.generation,
                    content_hash: pending.report.content_hash.to_hex(),
                };
                if let Err(e) = self.writer.record_ack(acked, pending.report.clone()).await {
                    log::error!("recording the acknowledgement of report {id}: {e}");
                }
            }
            Answer::NeedFull(why) if is_delta => {
                // Not a failure: the relay lacks this base. The next attempt is whole, now.
                self.metrics.reports_nacked.inc();
                log::info!("the relay needs report {id} whole ({why}); sending it whole");
                self.base = None;
                self.delta = None;
            }
            Answer::NeedFull(why) => {
                self.metrics.reports_nacked.inc();
                let delay = self.backoff.next_delay();
                self.not_before = Instant::now() + delay;
                log::warn!(
                    "the relay asked for report {id} whole, which it was ({why}); retrying in \
                     {delay:.1?}"
                );
            }
            Answer::Retry { reason, after } => {
                self.metrics.reports_nacked.inc();
                let delay = after.max(self.backoff.next_delay());
                self.not_before = Instant::now() + delay;
                log::info!("relay asked to retry report {id} ({reason}); retrying in {delay:.1?}");
            }
            Answer::Refused { reason, detail, .. } => {
                self.metrics.rejected(reason.as_str());
                log::warn!(
                    "the relay cannot take report {id} ({reason}): {detail}; not sending it \
                     again until the package set or the relay's limits change"
                );
                self.refused = Some(Refusal { id, limits });
                // A stream of refused reports is paced like any other failure.
                self.pace();
                let rejected = Rejected {
                    generation: id.generation,
                    reason: reason.as_str().to_owned(),
                    max_frame: limits.max_frame,
                    max_report_payload: limits.max_report_payload,
                };
                if let Err(e) = self.writer.save_rejected(rejected).await {
                    log::error!("recording the refusal of report {id}: {e}");
                }
            }
            Answer::Broken(why) => {
                log::warn!("lost the relay connection ({why}); will retransmit report {id}");
                self.lost(&why);
            }
        }
        // Paced like any unanswered transmission, then sent on the newer session.
        if let Some(session) = newer {
            self.adopt(session);
        }
    }

    /// The connection is gone: the next one waits for the backoff.
    fn lost(&mut self, why: &str) {
        log::debug!("relay connection closed: {why}");
        self.session = None;
        self.metrics.relay_connected.set(0);
        self.pace();
    }

    /// Pushes the next attempt back by one backoff step; returns the step.
    fn pace(&mut self) -> Duration {
        let delay = self.backoff.next_delay();
        self.not_before = Instant::now() + delay;
        delay
    }
}

async fn sleep_opt(delay: Option<Duration>) {
    match delay {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
