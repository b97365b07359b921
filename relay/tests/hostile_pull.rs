//! The hostile guest in pull mode: the relay dials every VM (`--pull`), and the hostile one
//! answers each dial with its worst — 16 MiB `Hello` strings, the largest facts at ten times
//! its rate limit, `Error` floods, `Hello`s over the bounds, garbage, a report before `Hello`,
//! unknown message types, a connection that says nothing, one closed at once — with a newline,
//! `\r`, U+0085 and U+2028 in every string, while well-behaved pulled VMs deliver. The checks
//! are push's (`hostile.rs`, [`hostilekit::assess`]): the hostile VM's sink writes within its
//! byte budget and its log lines within its log budget, no forged log line, the relay's memory
//! within the bound of docs/security.md, the others acknowledged with p99 < 1 s. Half a
//! minute proves the same bounds (the relay holds one session per pulled VM, so the attack is
//! a sequence of sessions, each dialed by the relay).

mod hostilekit;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use guestwatch_protocol::{
    AgentInfo, ErrorCode, Limits, Message, NackReason, ReportFacts, Timestamp, Trigger,
    TriggerKind, frame, guest,
};
use hostilekit::*;
use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream},
};

const ATTACK: Duration = Duration::from_secs(30);
const GOOD_VMS: usize = 4;

/// Says `hello` on a connection the relay opened and reads `Welcome`.
async fn greet_on(stream: UnixStream, hello: &Message) -> Option<Conn> {
    let mut conn = Conn::new(stream, Limits::default());
    conn.write_message(hello).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(10), conn.read_message()).await {
        Ok(Ok(Some(Message::Welcome(w)))) => {
            conn.set_version(w.version);
            conn.set_max_frame(w.max_frame);
            Some(conn)
        }
        _ => None,
    }
}

/// The attack, one behaviour per session the relay opens; every other session is the largest
/// facts at ten times the rate limit (which the relay acknowledges, so it redials soon).
#[derive(Clone, Copy, Debug)]
enum Move {
    Facts,
    HugeHello,
    ErrorFlood,
    HelloOverBounds,
    Garbage,
    ReportBeforeHello,
    UnknownTypes,
    Silence,
    Drop,
}

const OTHER_MOVES: [Move; 8] = [
    Move::HugeHello,
    Move::ErrorFlood,
    Move::HelloOverBounds,
    Move::Garbage,
    Move::ReportBeforeHello,
    Move::UnknownTypes,
    Move::Silence,
    Move::Drop,
];

struct Evil {
    facts: ReportFacts,
    payload: Vec<u8>,
    huge: Vec<u8>,
    generation: AtomicU64,
    seen: Arc<Seen>,
    moves: Mutex<Vec<Move>>,
}

impl Evil {
    fn new(seen: Arc<Seen>) -> Self {
        let big = Message::Hello(guestwatch_protocol::Hello {
            versions: vec![1, 2],
            epoch: 0xe,
            agent: AgentInfo {
                hostname: hostile(16 << 20),
                ..Default::default()
            },
            extensions: vec![],
        });
        Self {
            facts: hostile_facts(),
            payload: hostile_payload(),
            huge: frame::encode(1, &big, u32::MAX).unwrap(),
            generation: AtomicU64::new(0),
            seen,
            moves: Mutex::new(Vec::new()),
        }
    }

    async fn play(&self, stream: UnixStream, session: usize, stop: &AtomicBool) {
        let which = if session.is_multiple_of(2) {
            Move::Facts
        } else {
            OTHER_MOVES[(session / 2) % OTHER_MOVES.len()]
        };
        self.moves.lock().unwrap().push(which);
        match which {
            Move::Facts => {
                let Some(mut conn) = greet_on(stream, &hostile_hello()).await else {
                    return;
                };
                for _ in 0..12 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    if conn
                        .write_message(&report(0xe, g, self.facts.clone(), &self.payload))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let seen = &self.seen;
                    match conn.read_message().await {
                        Ok(Some(Message::Ack(_))) => seen.delivered.fetch_add(1, Ordering::Relaxed),
                        Ok(Some(Message::Nack(n)))
                            if n.reason == NackReason::RateLimited
                                && n.detail.contains("bytes") =>
                        {
                            seen.byte_limited.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok(Some(Message::Nack(n))) if n.reason == NackReason::RateLimited => {
                            seen.rate_limited.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok(Some(Message::Nack(_))) => {
                            seen.other_nacks.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => return,
                    };
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Move::HugeHello => {
                let mut stream = stream;
                // The relay refuses it from the header and closes: this write fails.
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&self.huge))
                    .await;
            }
            Move::ErrorFlood => {
                let error = Message::error(ErrorCode::Internal, hostile(256 << 10));
                if let Some(mut conn) = greet_on(stream, &hostile_hello()).await {
                    while conn.write_message(&error).await.is_ok() && !stop.load(Ordering::Relaxed)
                    {
                    }
                }
            }
            Move::HelloOverBounds => {
                let over = hello_with(
                    AgentInfo {
                        hostname: hostile(4 * guest::MAX_NAME),
                        ..Default::default()
                    },
                    vec![],
                );
                let mut conn = Conn::new(stream, Limits::default());
                let _ = conn.write_message(&over).await;
                let _ = tokio::time::timeout(Duration::from_millis(500), conn.read_message()).await;
            }
            Move::Garbage => {
                let mut stream = stream;
                let _ = stream.write_all(hostile(300).as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Move::ReportBeforeHello => {
                let mut conn = Conn::new(stream, Limits::default());
                let _ = conn
                    .write_message(&report(0xe, 1, ReportFacts::default(), b"{}"))
                    .await;
                let _ = tokio::time::timeout(Duration::from_millis(500), conn.read_message()).await;
            }
            Move::UnknownTypes => {
                if let Some(conn) = greet_on(stream, &hostile_hello()).await {
                    let mut raw = frame::MAGIC.to_vec();
                    raw.extend_from_slice(&2u16.to_be_bytes());
                    raw.extend_from_slice(&99u16.to_be_bytes());
                    raw.extend_from_slice(&0u32.to_be_bytes());
                    let mut stream = conn.into_inner();
                    for _ in 0..12 {
                        if stream.write_all(&raw).await.is_err() {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            // The relay's read timeout (2 s here) ends it.
            Move::Silence => tokio::time::sleep(Duration::from_secs(5)).await,
            Move::Drop => drop(stream),
        }
    }
}

/// Accepts every session the relay opens to the hostile VM and plays the next move on it.
async fn hostile_guest(listener: UnixListener, evil: Arc<Evil>, stop: Arc<AtomicBool>) {
    let mut session = 0;
    let mut playing = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        let Ok(Ok((stream, _))) = accepted else {
            continue;
        };
        let (evil, stop) = (evil.clone(), stop.clone());
        playing.spawn(async move { evil.play(stream, session, &stop).await });
        session += 1;
    }
    playing.abort_all();
}

/// A well-behaved pulled VM: on the session the relay opens, a small report every 1.5 s, each
/// acknowledged as delivered. Returns the ack latencies.
async fn well_behaved(vm: usize, listener: UnixListener, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let hello = hello_with(
        AgentInfo {
            agent_version: "0.1.0".into(),
            hostname: format!("good{vm}"),
            detector: "ebpf".into(),
            ..Default::default()
        },
        vec![],
    );
    let payload = format!(
        "{{\"packages\":{{\"1\":{{\"name\":\"bash\",\"pad\":\"{}\"}}}}}}",
        "x".repeat(10 << 10)
    );
    let mut latencies = Vec::new();
    let mut generation = 0;
    'sessions: while !stop.load(Ordering::Relaxed) {
        let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
        else {
            continue;
        };
        let Some(mut conn) = greet_on(stream, &hello).await else {
            panic!("good{vm}: the relay's session failed its handshake");
        };
        while !stop.load(Ordering::Relaxed) {
            generation += 1;
            let facts = ReportFacts {
                trigger: Trigger::new(TriggerKind::Transaction),
                scanned_at: Timestamp::now(),
                package_count: 1,
                ..Default::default()
            };
            let sent = Instant::now();
            let r = report(vm as u64 + 1, generation, facts, payload.as_bytes());
            if conn.write_message(&r).await.is_err() {
                continue 'sessions;
            }
            match tokio::time::timeout(Duration::from_secs(30), conn.read_message()).await {
                Ok(Ok(Some(Message::Ack(a)))) if a.id.generation == generation => {
                    latencies.push(sent.elapsed())
                }
                other => panic!("good{vm} report {generation}: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    latencies
}

#[test]
fn a_hostile_pulled_guest_stays_within_its_budgets() {
    let vms: Vec<String> = std::iter::once("evil".to_owned())
        .chain((0..GOOD_VMS).map(|i| format!("good{i}")))
        .collect();
    let relay = RelayProcess::start_pulling(
        &vms,
        &[
            "--max-sink-bytes-per-minute",
            &SINK_BYTES_PER_MINUTE.to_string(),
            // Redial soon after every hostile session: more sessions, more attack.
            "--pull-max-backoff",
            "1s",
        ],
    );
    let idle_kib = relay.status_kib("VmRSS:");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let evil = Arc::new(Evil::new(seen.clone()));
    let latencies = runtime.block_on(async {
        let listener = UnixListener::bind(relay.guest_socket("evil")).unwrap();
        let hostile = tokio::spawn(hostile_guest(listener, evil.clone(), stop.clone()));
        let mut good = tokio::task::JoinSet::new();
        for i in 0..GOOD_VMS {
            let listener = UnixListener::bind(relay.guest_socket(&format!("good{i}"))).unwrap();
            good.spawn(well_behaved(i, listener, stop.clone()));
        }
        tokio::time::sleep(ATTACK).await;
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        while let Some(done) = good.join_next().await {
            latencies.extend(done.unwrap());
        }
        hostile.await.unwrap();
        latencies
    });
    let moves = evil.moves.lock().unwrap().clone();
    println!(
        "the relay opened {} hostile sessions: {moves:?}",
        moves.len()
    );
    assert!(
        moves.len() >= 10,
        "the relay dialed the hostile VM only {} times",
        moves.len()
    );
    assess(
        "hostile pulled guest",
        &relay,
        idle_kib,
        &vms,
        &seen,
        latencies,
        GOOD_VMS * 10,
    );
}
