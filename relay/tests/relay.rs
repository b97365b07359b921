//! The relay end to end over real Unix sockets (hybrid vsock): delivery, duplicates, and
//! hostile guests that must not affect a well-behaved one.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use guestwatch_protocol::{
    AckStatus, AgentInfo, Attribution, ContentHash, ErrorCode, Hello, Limits, Message, Payload,
    Report, ReportBody, ReportFacts, ReportId, Timestamp, Trigger, TriggerKind, frame,
};
use guestwatch_relay::{
    config::{HybridVm, Settings},
    deliver::DeliveryConfig,
    listen::ConnectionLimits,
    server,
    sink::SinkOptions,
};
use tokio::{io::AsyncWriteExt, net::UnixStream};
use tokio_util::sync::CancellationToken;

type Conn = guestwatch_protocol::Connection<UnixStream>;

struct Relay {
    dir: tempfile::TempDir,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Relay {
    fn socket(&self, vm: &str) -> PathBuf {
        self.dir.path().join(format!("{vm}.vsock_919"))
    }
    fn sink(&self) -> PathBuf {
        self.dir.path().join("sink")
    }
    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn settings(dir: &Path, vms: &[&str], tweak: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = Settings {
        vsock_port: None,
        hybrid: vms
            .iter()
            .map(|vm| HybridVm {
                name: (*vm).to_owned(),
                uds_path: dir.join(format!("{vm}.vsock")),
            })
            .collect(),
        port: 919,
        sink: format!("dir:{}", dir.join("sink").display()),
        sink_options: SinkOptions::defaults(),
        metrics: None,
        cid_map: None,
        allow_loopback_cid: false,
        delivery: DeliveryConfig::default(),
        limits: ConnectionLimits::default(),
        max_frame: 16 * 1024 * 1024,
        read_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(3),
    };
    tweak(&mut s);
    s
}

async fn start(vms: &[&str], tweak: impl FnOnce(&mut Settings)) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), vms, tweak);
    let stop = CancellationToken::new();
    let task = tokio::spawn(server::serve(settings, stop.clone()));
    let relay = Relay { dir, stop, task };
    for vm in vms {
        let path = relay.socket(vm);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "relay did not bind {}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    relay
}

async fn connect(relay: &Relay, vm: &str) -> Conn {
    connect_speaking(relay, vm, &[1, 2]).await
}

/// Connects as an agent that speaks `versions`; the connection then speaks the highest.
async fn connect_speaking(relay: &Relay, vm: &str, versions: &[u16]) -> Conn {
    let mut conn = Conn::new(
        UnixStream::connect(relay.socket(vm)).await.unwrap(),
        Limits::default(),
    );
    conn.write_message(&Message::Hello(Hello {
        versions: versions.to_vec(),
        epoch: 0xabc,
        agent: AgentInfo {
            agent_version: "test".into(),
            hostname: "liar".into(),
            ..Default::default()
        },
        extensions: vec![],
    }))
    .await
    .unwrap();
    match conn.read_message().await.unwrap() {
        Some(Message::Welcome(w)) => {
            assert_eq!(Some(&w.version), versions.iter().max());
            conn.set_version(w.version);
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    conn
}

fn report(generation: u64, packages: u32) -> Report {
    let json = format!(r#"{{"packages":{{}},"success":true,"n":{packages}}}"#).into_bytes();
    let mut hash = [0u8; 32];
    hash[..4].copy_from_slice(&packages.to_be_bytes());
    Report {
        id: ReportId {
            epoch: 0xabc,
            generation,
        },
        content_hash: ContentHash(hash),
        facts: ReportFacts {
            trigger: Trigger::new(TriggerKind::Transaction).with_attribution(Attribution {
                pid: 7,
                comm: "rpm".into(),
                ..Default::default()
            }),
            scanned_at: Timestamp(1),
            package_count: packages,
            ..Default::default()
        },
        body: ReportBody::Full(Payload::json(json)),
    }
}

async fn send_report(conn: &mut Conn, r: Report) -> Message {
    conn.write_message(&Message::Report(Box::new(r)))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), conn.read_message())
        .await
        .expect("no answer")
        .unwrap()
        .unwrap()
}

fn deliveries(relay: &Relay) -> Vec<serde_json::Value> {
    std::fs::read_to_string(relay.sink().join("deliveries.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_acknowledges_and_recognises_retransmissions() {
    let relay = start(&["vm1"], |_| {}).await;
    let mut conn = connect(&relay, "vm1").await;
    match send_report(&mut conn, report(1, 10)).await {
        Message::Ack(a) => assert_eq!((a.id.generation, a.status), (1, AckStatus::Delivered)),
        other => panic!("{other:?}"),
    }
    // The sink has it before the Ack arrived.
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(relay.sink().join("vms/vm1/latest.json")).unwrap())
            .unwrap();
    assert_eq!(
        latest["delivery"]["vm"], "vm1",
        "named by the socket, not by the guest's claim"
    );
    assert_eq!(latest["delivery"]["claims"]["hostname"], "liar");
    assert_eq!(latest["delivery"]["identity"]["source"], "hybrid");
    assert_eq!(latest["delivery"]["trigger"]["attribution"]["comm"], "rpm");
    assert_eq!(latest["report"]["n"], 10);
    // A retransmission (lost Ack) is a duplicate: acknowledged, not written again.
    match send_report(&mut conn, report(1, 10)).await {
        Message::Ack(a) => assert_eq!(a.status, AckStatus::Duplicate),
        other => panic!("{other:?}"),
    }
    conn.write_message(&Message::Ping(5)).await.unwrap();
    assert_eq!(conn.read_message().await.unwrap(), Some(Message::Pong(5)));
    assert_eq!(deliveries(&relay).len(), 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_messages_get_an_error_not_a_disconnect() {
    let relay = start(&["vm1"], |_| {}).await;
    let conn = connect(&relay, "vm1").await;
    let mut raw = frame::MAGIC.to_vec();
    raw.extend_from_slice(&1u16.to_be_bytes());
    raw.extend_from_slice(&99u16.to_be_bytes());
    raw.extend_from_slice(&2u32.to_be_bytes());
    raw.extend_from_slice(&[1, 2]);
    // Write the raw frame through the connection's stream.
    let mut stream = conn.into_inner();
    stream.write_all(&raw).await.unwrap();
    let mut conn = Conn::new(stream, Limits::default());
    match conn.read_message().await.unwrap() {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::UnknownMessageType),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        send_report(&mut conn, report(2, 3)).await,
        Message::Ack(_)
    ));
    relay.shutdown().await;
}

/// A well-behaved guest's report must be delivered promptly whatever vm2 does.
async fn well_behaved_guest_is_served(relay: &Relay, generation: u64) -> Duration {
    let started = Instant::now();
    let mut conn = connect(relay, "good").await;
    match send_report(&mut conn, report(generation, 1000 + generation as u32)).await {
        Message::Ack(a) => assert_eq!(a.status, AckStatus::Delivered),
        other => panic!("{other:?}"),
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_do_not_starve_a_good_one() {
    let relay = start(&["good", "evil"], |s| {
        s.delivery.reports_per_minute = 60;
    })
    .await;
    let evil = relay.socket("evil");

    // 1. Garbage: an Error and a closed connection.
    let mut garbage = UnixStream::connect(&evil).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut conn = Conn::new(garbage, Limits::default());
    match conn.read_message().await {
        Ok(Some(Message::Error(e))) => assert_eq!(e.code, ErrorCode::Malformed),
        other => panic!("{other:?}"),
    }
    assert!(
        conn.read_message().await.unwrap().is_none(),
        "closed after garbage"
    );

    // 2. A frame claiming 1 GiB: refused from its header.
    let mut huge = UnixStream::connect(&evil).await.unwrap();
    let mut header = frame::MAGIC.to_vec();
    header.extend_from_slice(&1u16.to_be_bytes());
    header.extend_from_slice(&1u16.to_be_bytes());
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    huge.write_all(&header).await.unwrap();
    let mut conn = Conn::new(huge, Limits::default());
    match conn.read_message().await {
        Ok(Some(Message::Error(e))) => assert_eq!(e.code, ErrorCode::TooLarge),
        other => panic!("{other:?}"),
    }

    // 3. 300 idle connections: at most 4 are admitted, the rest are refused at once.
    let mut idle = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = UnixStream::connect(&evil).await {
            idle.push(s);
        }
    }
    // 4. A slow writer trickling a frame.
    let trickler = tokio::spawn({
        let evil = evil.clone();
        async move {
            let Ok(mut s) = UnixStream::connect(&evil).await else {
                return;
            };
            let hello = frame::encode(1, &Message::Ping(1), 1 << 20).unwrap();
            for b in hello {
                if s.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        }
    });

    let latency = well_behaved_guest_is_served(&relay, 1).await;
    assert!(
        latency < Duration::from_secs(2),
        "good guest waited {latency:?}"
    );
    // evil's extra connections were refused, not queued: a new one is refused too.
    let mut extra = Conn::new(UnixStream::connect(&evil).await.unwrap(), Limits::default());
    let refused = extra.read_message().await;
    assert!(matches!(refused, Ok(None) | Err(_)), "{refused:?}");
    trickler.abort();
    drop(idle);
    // The admitted idle connections are closed by the idle timeout (3 s here).
    tokio::time::sleep(Duration::from_secs(4)).await;

    // 5. A flood of valid reports from evil (over its rate limit): never dropped silently —
    //    answered Nack with retry-after, the newest delivered later.
    let mut flood = connect(&relay, "evil").await;
    let mut acked = 0;
    let mut nacked = 0;
    for g in 1..=200u64 {
        match send_report(&mut flood, report(g, g as u32)).await {
            Message::Ack(_) => acked += 1,
            Message::Nack(n) => {
                assert!(n.retry_after_ms > 0);
                nacked += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        acked <= 15 && nacked >= 185,
        "acked {acked}, nacked {nacked}"
    );
    let latency = well_behaved_guest_is_served(&relay, 2).await;
    assert!(
        latency < Duration::from_secs(2),
        "good guest waited {latency:?} during the flood"
    );
    // The newest of the flood reaches the sink on the relay's own schedule.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let latest = std::fs::read(relay.sink().join("vms/evil/latest.json")).ok();
        if latest.is_some_and(|l| {
            serde_json::from_slice::<serde_json::Value>(&l).unwrap()["report"]["n"] == 200
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the newest flooded report was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loses_nothing_the_guest_retransmits() {
    let relay = start(&["vm1"], |_| {}).await;
    let dir_path = relay.dir.path().to_path_buf();
    let mut first = connect(&relay, "vm1").await;
    assert!(matches!(
        send_report(&mut first, report(1, 1)).await,
        Message::Ack(_)
    ));
    // Stop the relay (its directory stays) and start a new one over the same sink.
    relay.stop.cancel();
    relay.task.await.unwrap().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server::serve(
        settings(&dir_path, &["vm1"], |_| {}),
        stop.clone(),
    ));
    let relay = Relay {
        dir: relay.dir,
        stop,
        task,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while UnixStream::connect(relay.socket("vm1")).await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = connect(&relay, "vm1").await;
    match send_report(&mut conn, report(1, 1)).await {
        Message::Ack(a) => assert_eq!(
            a.status,
            AckStatus::Duplicate,
            "the new relay knows the sink has it"
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        send_report(&mut conn, report(2, 2)).await,
        Message::Ack(_)
    ));
    assert_eq!(deliveries(&relay).len(), 2);
    relay.shutdown().await;
}
