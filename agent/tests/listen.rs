//! Pull mode against a protocol-level fake relay that dials the agent: a report waits for the
//! relay's connection and goes out the moment it exists, later reports go out on the same
//! session, a newer connection replaces the old one (also while a report waits for its answer
//! there), and only the socket's owner (or root) may connect.

mod fake_relay;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use fake_relay::{FakeRelay, Reply, ack};
use guestwatch_agent::{
    config::ListenAddr,
    deliver::{
        listen::{self, Handoff},
        machine::MachineId,
        sender::{self, Outbox, SenderConfig},
        state::StateDir,
        writer::StateWriter,
    },
    metrics::{Metrics, OutcomeLabel, ReasonLabel},
};
use guestwatch_protocol::{
    AgentInfo, ContentHash, Payload, Report, ReportBody, ReportFacts, ReportId,
};
use tokio_util::sync::CancellationToken;

struct Agent {
    outbox: Outbox,
    metrics: Metrics,
    epoch: u64,
    socket: PathBuf,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// A sender that only listens (no `--relay`), on `dir/agent.sock`.
    fn start(dir: &Path, ack_timeout: Duration) -> Self {
        let state = StateDir::open(&dir.join("state"), &MachineId::Unknown("test".into())).unwrap();
        let epoch = state.epoch();
        let writer = StateWriter::start(state).unwrap();
        let (outbox, rx) = Outbox::new();
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let socket = dir.join("agent.sock");
        let config = SenderConfig {
            relay: None,
            connect_timeout: Duration::from_secs(5),
            ack_timeout,
            max_backoff: Duration::from_millis(500),
            agent: AgentInfo::default(),
            epoch,
            extensions: Vec::new(),
        };
        let handoff = Handoff::new();
        let listening = tokio::spawn(listen::run(
            ListenAddr::Unix(socket.clone()),
            sender::hello(&config),
            Duration::from_secs(5),
            handoff.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        let sending = tokio::spawn(sender::run(
            config,
            writer,
            rx,
            metrics.clone(),
            stop.clone(),
            Default::default(),
            Some(handoff),
        ));
        Self {
            outbox,
            metrics,
            epoch,
            socket,
            stop,
            tasks: vec![listening, sending],
        }
    }

    fn offer(&self, generation: u64) -> ReportId {
        let id = ReportId {
            epoch: self.epoch,
            generation,
        };
        self.outbox.offer(
            Arc::new(Report {
                id,
                content_hash: ContentHash([generation as u8; 32]),
                facts: ReportFacts::default(),
                body: ReportBody::Full(Payload::json(b"{\"x\":1}".to_vec())),
            }),
            None,
        );
        id
    }

    fn delivered(&self) -> u64 {
        self.metrics
            .reports_acked
            .get_or_create(&OutcomeLabel {
                outcome: "delivered".into(),
            })
            .get()
    }

    fn refused(&self, reason: &str) -> u64 {
        self.metrics
            .listen_refused
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .get()
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
        assert!(
            !self.socket.exists(),
            "the listening socket is removed at stop"
        );
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
async fn a_report_waits_for_the_relay_and_every_report_uses_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), Duration::from_secs(10));
    let first = agent.offer(1);
    until("the listening socket", || agent.socket.exists()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.metrics.reports_sent.get(), 0, "nobody to send to yet");

    let relay = FakeRelay::dialing(1 << 20, ack);
    assert!(relay.dial(&agent.socket).await);
    until("the first report's ack", || agent.delivered() == 1).await;
    let second = agent.offer(2);
    until("the second report's ack", || agent.delivered() == 2).await;
    // Both on the one session the relay opened; the agent never dials.
    assert_eq!(relay.reports_by_connection(), vec![(0, first), (0, second)]);
    assert_eq!(relay.connections(), 1);
    assert_eq!(agent.metrics.listen_accepted.get(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn a_newer_connection_replaces_the_old_one_mid_exchange() {
    let dir = tempfile::tempdir().unwrap();
    // A long ack timeout: the report moves to the new session because it exists, not
    // because the old one timed out.
    let agent = Agent::start(dir.path(), Duration::from_secs(60));
    until("the listening socket", || agent.socket.exists()).await;
    let relay = FakeRelay::dialing(1 << 20, |_| Reply::Silence);
    assert!(relay.dial(&agent.socket).await);
    let id = agent.offer(1);
    until("the report on the first session", || {
        relay.reports().len() == 1
    })
    .await;

    relay.set_answer(ack);
    let redialed = Instant::now();
    assert!(relay.dial(&agent.socket).await);
    until("the ack on the second session", || agent.delivered() == 1).await;
    assert!(
        redialed.elapsed() < Duration::from_secs(30),
        "{:?}",
        redialed.elapsed()
    );
    assert_eq!(relay.reports_by_connection(), vec![(0, id), (1, id)]);
    agent.stop().await;
}

#[tokio::test]
async fn only_the_sockets_owner_or_root_may_connect() {
    if !guestwatch_testkit::is_root() {
        assert!(!guestwatch_testkit::in_ci(), "CI runs as root");
        eprintln!("SKIPPED: needs root to connect as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), Duration::from_secs(10));
    until("the listening socket", || agent.socket.exists()).await;
    // Past the file mode (0600, which already keeps other users out), the peer check.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = agent.socket.clone();
    let connected = tokio::task::spawn_blocking(move || {
        // A child as user nobody connects and waits for the agent's Hello (or the close).
        use std::os::unix::process::CommandExt;
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "connect_as_child", "--nocapture"])
            .env("GW_CONNECT_TO", &socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(connected.status.success(), "{connected:?}");
    until("the refusal", || agent.refused("peer_uid") == 1).await;
    let out = String::from_utf8_lossy(&connected.stdout);
    assert!(out.contains("got 0 bytes"), "{out}");
    agent.stop().await;
}

/// Run by `only_the_sockets_owner_or_root_may_connect` as another user: connects and reports
/// how many bytes the agent sent before closing.
#[test]
fn connect_as_child() {
    let Some(socket) = std::env::var_os("GW_CONNECT_TO") else {
        return;
    };
    use std::io::Read;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    println!("got {} bytes", buf.len());
}
