//! The relay end to end over real Unix sockets (hybrid vsock): delivery, duplicates, and
//! hostile guests that must not affect a well-behaved one.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use guestwatch_protocol::{
    AckStatus, AgentInfo, Attribution, ContentHash, ErrorCode, Hello, Limits, Message, Nack,
    NackReason, Payload, PayloadEncoding, Report, ReportBody, ReportFacts, ReportId, Timestamp,
    Trigger, TriggerKind, frame, guest,
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
        pull: Vec::new(),
        pull_from_file: false,
        pull_dir: None,
        pull_port: 919,
        pull_config: Default::default(),
        config_file: None,
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

fn expect_nack(answer: Message, reason: NackReason) -> Nack {
    match answer {
        Message::Nack(n) if n.reason == reason => n,
        other => panic!("expected Nack({reason}), got {other:?}"),
    }
}

/// A connection the relay closed: the next read ends (or fails), it never answers.
async fn assert_closed(conn: &mut Conn) {
    let next = tokio::time::timeout(Duration::from_secs(10), conn.read_message())
        .await
        .expect("the relay neither answered nor closed");
    assert!(matches!(next, Ok(None) | Err(_)), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_the_relay_cannot_take_get_one_typed_nack_each() {
    let relay = start(&["vm1"], |_| {}).await;
    let mut conn = connect(&relay, "vm1").await;
    let with_payload = |generation, payload: Payload| Report {
        body: ReportBody::Full(payload),
        ..report(generation, generation as u32)
    };
    // Not a JSON object: malformed, and terminal (no retry-after for a version-2 agent).
    let n = expect_nack(
        send_report(
            &mut conn,
            with_payload(1, Payload::json(b"[1, 2]".to_vec())),
        )
        .await,
        NackReason::Malformed,
    );
    assert_eq!((n.id.generation, n.retry_after_ms), (1, 0));
    // Not zstd.
    let corrupt = Payload {
        encoding: PayloadEncoding::JsonZstd,
        bytes: b"\x28\xb5\x2f\xfd garbage".to_vec(),
    };
    expect_nack(
        send_report(&mut conn, with_payload(2, corrupt)).await,
        NackReason::Malformed,
    );
    // A zstd bomb: decompresses past max_report_payload (64 MiB).
    let mut bomb = vec![b' '; 65 << 20];
    bomb[0] = b'{';
    let bomb = Payload::json(bomb);
    assert_eq!(bomb.encoding, PayloadEncoding::JsonZstd);
    expect_nack(
        send_report(&mut conn, with_payload(3, bomb)).await,
        NackReason::TooLarge,
    );
    // Facts over the guest bounds: rejected, never truncated.
    let mut over = report(4, 4);
    over.facts.trigger.detail = Some("x".repeat(guest::MAX_TEXT + 1));
    let n = expect_nack(send_report(&mut conn, over).await, NackReason::Rejected);
    assert!(n.detail.contains("detail"), "{}", n.detail);
    // A delta: this relay wants the full report.
    let delta = Report {
        body: ReportBody::Delta {
            base: ReportId {
                epoch: 0xabc,
                generation: 1,
            },
            base_hash: ContentHash([0; 32]),
            payload: Payload::json(b"{}".to_vec()),
        },
        ..report(5, 5)
    };
    expect_nack(send_report(&mut conn, delta).await, NackReason::NeedFull);
    // The connection is still good, and none of it reached the sink.
    assert!(matches!(
        send_report(&mut conn, report(6, 6)).await,
        Message::Ack(_)
    ));
    let delivered: Vec<_> = deliveries(&relay)
        .iter()
        .map(|d| d["report_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ["0000000000000abc-6"]);

    // A version-1 agent retries every Nack: a terminal one tells it to wait long.
    let mut old = connect_speaking(&relay, "vm1", &[1]).await;
    let n = expect_nack(
        send_report(&mut old, with_payload(7, Payload::json(b"nope".to_vec()))).await,
        NackReason::Malformed,
    );
    assert_eq!(u64::from(n.retry_after_ms), 60_000);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reports_and_the_guests_error_frames_count_toward_the_error_limit() {
    let relay = start(&["vm1"], |_| {}).await;
    let mut conn = connect(&relay, "vm1").await;
    for _ in 0..4 {
        conn.write_message(&Message::error(
            ErrorCode::Internal,
            "line one\n[2026-01-01T00:00:00Z ERROR guestwatch_relay] forged",
        ))
        .await
        .unwrap();
    }
    for g in 1..=4 {
        let bad = Report {
            body: ReportBody::Full(Payload::json(b"[]".to_vec())),
            ..report(g, 1)
        };
        expect_nack(send_report(&mut conn, bad).await, NackReason::Malformed);
    }
    // Eight errors: still served.
    conn.write_message(&Message::Ping(9)).await.unwrap();
    assert_eq!(conn.read_message().await.unwrap(), Some(Message::Pong(9)));
    // The ninth closes the connection.
    conn.write_message(&Message::error(ErrorCode::Internal, "again"))
        .await
        .unwrap();
    assert_closed(&mut conn).await;
    relay.shutdown().await;
}

/// Reads one frame off a raw stream (for peers that cannot use a `Connection`).
async fn read_frame(read: &mut tokio::net::unix::OwnedReadHalf) -> Option<Message> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some(decoded)) = frame::decode(&buf, 1 << 20) {
            return decoded.message.ok();
        }
        match tokio::time::timeout(Duration::from_secs(10), read.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer from the relay"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_over_the_guest_bounds_is_refused_and_closed() {
    let relay = start(&["vm1"], |_| {}).await;
    let hello = |hostname: String| {
        Message::Hello(Hello {
            versions: vec![1, 2],
            epoch: 1,
            agent: AgentInfo {
                hostname,
                ..Default::default()
            },
            extensions: vec![],
        })
    };
    // Within the handshake frame, over the name bound.
    let mut conn = Conn::new(
        UnixStream::connect(relay.socket("vm1")).await.unwrap(),
        Limits::default(),
    );
    conn.write_message(&hello("h\n".repeat(200))).await.unwrap();
    match conn.read_message().await.unwrap() {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::TooLarge);
            assert!(e.message.contains("hostname"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert_closed(&mut conn).await;

    // 16 MiB of hostname: refused from the frame header, before the relay reads (or
    // allocates) the rest; the guest's write then fails.
    let big = frame::encode(1, &hello("\u{2028}\n".repeat(4 << 20)), u32::MAX).unwrap();
    assert!(big.len() > 16 << 20);
    let (mut read, mut write) = UnixStream::connect(relay.socket("vm1"))
        .await
        .unwrap()
        .into_split();
    let writer = tokio::spawn(async move { write.write_all(&big).await });
    match read_frame(&mut read).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::TooLarge),
        other => panic!("{other:?}"),
    }
    assert!(
        read_frame(&mut read).await.is_none(),
        "closed after the Error"
    );
    assert!(writer.await.unwrap().is_err(), "the relay stopped reading");
    // The VM itself is still served.
    let mut good = connect(&relay, "vm1").await;
    assert!(matches!(
        send_report(&mut good, report(1, 1)).await,
        Message::Ack(_)
    ));
    relay.shutdown().await;
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `GET path` on the relay's metrics endpoint: (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Decompression and JSON validation run on the blocking pool: with four large reports being
/// validated at once on a runtime of two workers, another VM's Ping and report are still
/// answered — before any of the large ones — and the metrics endpoint still serves. (Were
/// the work on the workers, at most two reports could be in validation at once and nothing
/// else would run meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validating_large_reports_never_stalls_other_guests() {
    let metrics = free_port();
    let vms = ["big1", "big2", "big3", "big4", "small"];
    let relay = start(&vms, |s| {
        s.metrics = Some(metrics);
        s.delivery.max_inflight = 8;
    })
    .await;
    // 48 MiB of JSON each, a small frame once compressed.
    let mut json = b"{\"a\":[".to_vec();
    json.extend(b"0,".repeat(24 << 20));
    json.extend_from_slice(b"0]}");
    let payload = Payload::json(json);
    assert_eq!(payload.encoding, PayloadEncoding::JsonZstd);
    let mut big = Vec::new();
    for vm in &vms[..4] {
        let mut conn = connect(&relay, vm).await;
        let r = Report {
            body: ReportBody::Full(payload.clone()),
            ..report(1, 77)
        };
        conn.write_message(&Message::Report(Box::new(r)))
            .await
            .unwrap();
        big.push(conn);
    }
    let validating = "guestwatch_relay_reports_validating";
    eventually("all four large reports in validation at once", async || {
        metric(metrics, validating).await == Some(4.0)
    })
    .await;
    let mut small = connect(&relay, "small").await;
    small.write_message(&Message::Ping(1)).await.unwrap();
    assert_eq!(small.read_message().await.unwrap(), Some(Message::Pong(1)));
    assert!(matches!(
        send_report(&mut small, report(1, 1)).await,
        Message::Ack(_)
    ));
    let still = metric(metrics, validating).await;
    assert!(
        still.is_some_and(|n| n >= 1.0),
        "the large reports were still being validated: {still:?}"
    );
    assert_eq!(
        deliveries(&relay).len(),
        1,
        "the small report was delivered first"
    );
    for mut conn in big {
        let answer = tokio::time::timeout(Duration::from_secs(120), conn.read_message())
            .await
            .expect("a large report was never answered");
        assert!(matches!(answer, Ok(Some(Message::Ack(_)))), "{answer:?}");
    }
    assert_eq!(metric(metrics, validating).await, Some(0.0));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_unhealthy_while_the_sink_keeps_failing() {
    let metrics = free_port();
    let dir = tempfile::tempdir().unwrap();
    // A real I/O failure: the VM's sink directory is a file.
    let blocker = dir.path().join("sink/vms/vm1");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let settings = settings(dir.path(), &["vm1"], |s| {
        s.metrics = Some(metrics);
        s.delivery.sink_unhealthy_after = Duration::from_millis(500);
        s.delivery.retry_base = Duration::from_millis(50);
        s.delivery.retry_max = Duration::from_millis(200);
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn(server::serve(settings, stop.clone()));
    let relay = Relay { dir, stop, task };
    eventually("the relay to listen", async || {
        UnixStream::connect(relay.socket("vm1")).await.is_ok()
    })
    .await;
    assert_eq!(http_get(metrics, "/healthz").await.0, "HTTP/1.1 200 OK");
    let mut conn = connect(&relay, "vm1").await;
    expect_nack(
        send_report(&mut conn, report(1, 1)).await,
        NackReason::SinkUnavailable,
    );
    eventually("/healthz to report the failing sink", async || {
        let (status, body) = http_get(metrics, "/healthz").await;
        status.contains("503") && body.contains("failing for") && body.contains("vms/vm1")
    })
    .await;
    std::fs::remove_file(&blocker).unwrap();
    eventually(
        "/healthz to recover once the sink takes the report",
        async || http_get(metrics, "/healthz").await.0 == "HTTP/1.1 200 OK",
    )
    .await;
    assert_eq!(deliveries(&relay).len(), 1);
    relay.shutdown().await;
}
