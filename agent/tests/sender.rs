//! The sender against a protocol-level fake relay: reports the relay can never take are given
//! up (not resent until something changes), reports beyond the announced limits are never
//! sent, and connections that deliver nothing do not reset the backoff.

mod fake_relay;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fake_relay::{FakeRelay, Reply, ack, error, nack};
use guestwatch_agent::{
    config::RelayAddr,
    deliver::{
        machine::MachineId,
        sender::{self, Outbox, SenderConfig},
        state::StateDir,
        writer::StateWriter,
    },
    metrics::{Metrics, OutcomeLabel, ReasonLabel},
};
use guestwatch_protocol::{
    AgentInfo, ContentHash, ErrorCode, NackReason, Payload, Report, ReportBody, ReportFacts,
    ReportId,
};
use tokio_util::sync::CancellationToken;

struct Agent {
    outbox: Outbox,
    metrics: Metrics,
    epoch: u64,
    state: std::path::PathBuf,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn start(dir: &std::path::Path, relay: &FakeRelay, max_backoff: Duration) -> Self {
        let state_dir = dir.join("state");
        let state = StateDir::open(&state_dir, &MachineId::Unknown("test".into())).unwrap();
        let epoch = state.epoch();
        let writer = StateWriter::start(state).unwrap();
        let (outbox, rx) = Outbox::new();
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let config = SenderConfig {
            relay: Some(RelayAddr::Unix(relay.path.clone())),
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(5),
            max_backoff,
            agent: AgentInfo::default(),
            epoch,
            extensions: Vec::new(),
        };
        let task = tokio::spawn(sender::run(
            config,
            writer,
            rx,
            metrics.clone(),
            stop.clone(),
            Default::default(),
            None,
        ));
        Self {
            outbox,
            metrics,
            epoch,
            state: state_dir,
            stop,
            task,
        }
    }

    /// Offers report `generation` with a JSON payload of about `size` bytes.
    fn offer(&self, generation: u64, size: usize) -> ReportId {
        let id = ReportId {
            epoch: self.epoch,
            generation,
        };
        let json = format!("{{\"x\":\"{}\"}}", "a".repeat(size));
        self.outbox.offer(
            Arc::new(Report {
                id,
                content_hash: ContentHash([generation as u8; 32]),
                facts: ReportFacts::default(),
                body: ReportBody::Full(Payload::json(json.into_bytes())),
            }),
            None,
        );
        id
    }

    fn rejected(&self, reason: &str) -> u64 {
        self.metrics
            .reports_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .get()
    }

    fn delivered(&self) -> u64 {
        self.metrics
            .reports_acked
            .get_or_create(&OutcomeLabel {
                outcome: "delivered".into(),
            })
            .get()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_terminal_nack_is_final_for_that_report_only() {
    let dir = tempfile::tempdir().unwrap();
    let relay = FakeRelay::start(dir.path(), 1 << 20, |r| {
        if r.id.generation == 1 {
            nack(r, NackReason::Rejected)
        } else {
            ack(r)
        }
    });
    let agent = Agent::start(dir.path(), &relay, Duration::from_millis(200));
    let first = agent.offer(1, 100);
    until("the refusal", || agent.rejected("rejected") == 1).await;
    // Pings go on (every second) but the report is not sent again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(relay.reports(), vec![first]);
    assert_eq!(relay.connections(), 1);
    assert_eq!(agent.rejected("rejected"), 1);
    let recorded = std::fs::read_to_string(agent.state.join("rejected")).unwrap();
    assert!(recorded.starts_with("1 rejected "), "{recorded}");
    // A newer report is delivered.
    let second = agent.offer(2, 100);
    until("the newer report's ack", || agent.delivered() == 1).await;
    assert_eq!(relay.reports(), vec![first, second]);
    agent.stop().await;
}

#[tokio::test]
async fn a_version_1_error_in_answer_to_a_report_is_final_too() {
    let dir = tempfile::tempdir().unwrap();
    let relay = FakeRelay::start(dir.path(), 1 << 20, |_| error(ErrorCode::Malformed));
    let agent = Agent::start(dir.path(), &relay, Duration::from_millis(200));
    let first = agent.offer(1, 100);
    until("the refusal", || agent.rejected("malformed") == 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(relay.reports(), vec![first]);
    agent.stop().await;
}

#[tokio::test]
async fn a_report_beyond_the_announced_limits_waits_for_other_limits() {
    let dir = tempfile::tempdir().unwrap();
    let relay = FakeRelay::start(dir.path(), 1000, ack);
    let agent = Agent::start(dir.path(), &relay, Duration::from_millis(200));
    let report = agent.offer(1, 5000);
    until("the refusal of the frame", || {
        agent.rejected("too_large") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        relay.reports().is_empty(),
        "a frame over the limit was sent"
    );
    assert_eq!(relay.connections(), 1);
    assert_eq!(agent.metrics.reports_sent.get(), 0);

    // A relay with other limits (the frame fits, the decompressed payload does not): one more
    // try, refused again without sending.
    relay.set_limits(1 << 20, 1000);
    relay.hang_up();
    until("the refusal of the payload", || {
        agent.rejected("too_large") == 2
    })
    .await;
    assert_eq!(relay.connections(), 2);
    assert!(relay.reports().is_empty());

    // Limits it fits: delivered.
    relay.set_limits(1 << 20, 1 << 20);
    relay.hang_up();
    until("the delivery", || agent.delivered() == 1).await;
    assert_eq!(relay.reports(), vec![report]);
    agent.stop().await;
}

#[tokio::test]
async fn connections_that_deliver_nothing_do_not_reset_the_backoff() {
    let dir = tempfile::tempdir().unwrap();
    // Every connection is accepted and welcomed, then closed when the report arrives.
    let relay = FakeRelay::start(dir.path(), 1 << 20, |_| Reply::Close);
    let agent = Agent::start(dir.path(), &relay, Duration::from_secs(1));
    agent.offer(1, 100);
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    // With the backoff growing 0.1-0.2 s, 0.2-0.4 s, 0.4-0.8 s, then 0.5-1 s, at most 10
    // connections fit in the window; reset by every connection it would be 20 or more.
    let connections = relay.connections();
    assert!(
        (2..=11).contains(&connections),
        "{connections} connections in {window:?}"
    );
    // Once the relay acknowledges, the report is delivered.
    relay.set_answer(ack);
    until("the delivery", || agent.delivered() == 1).await;
    agent.stop().await;
}
