//! Stand-ins for the guest side of pull mode, over Unix sockets: an agent that listens and
//! delivers, a VMM's hybrid-vsock socket that speaks `CONNECT <port>` / `OK <port>`, guests
//! that refuse or stall the dial, and a reader of the relay's metrics.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use guestwatch_protocol::{
    AgentInfo, ContentHash, Hello, Limits, Message, Payload, Report, ReportBody, ReportFacts,
    ReportId, Timestamp, Trigger, TriggerKind,
};
use guestwatch_relay::{
    config::Settings, deliver::DeliveryConfig, listen::ConnectionLimits, pull::PullTarget,
    sink::SinkOptions,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;

pub type Conn = guestwatch_protocol::Connection<UnixStream>;

/// Relay settings with a dir sink in `dir/sink`, dialing `pull`, short timeouts.
pub fn settings(dir: &Path, pull: Vec<PullTarget>) -> Settings {
    Settings {
        vsock_port: None,
        hybrid: Vec::new(),
        port: 919,
        pull,
        pull_from_file: false,
        pull_dir: None,
        pull_port: 919,
        pull_config: guestwatch_relay::pull::PullConfig {
            connect_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(4),
        },
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
        idle_timeout: Duration::from_secs(10),
    }
}

pub fn target(name: &str, addr: &str) -> PullTarget {
    format!("{name}={addr}").parse().unwrap()
}

/// A report of `generation` whose content is `generation` too.
pub fn report(epoch: u64, generation: u64) -> Report {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&epoch.to_be_bytes());
    hash[8..16].copy_from_slice(&generation.to_be_bytes());
    Report {
        id: ReportId { epoch, generation },
        content_hash: ContentHash(hash),
        facts: ReportFacts {
            trigger: Trigger::new(TriggerKind::Transaction),
            scanned_at: Timestamp::now(),
            package_count: 1,
            ..Default::default()
        },
        body: ReportBody::Full(Payload::json(
            format!("{{\"packages\":{{}},\"generation\":{generation}}}").into_bytes(),
        )),
    }
}

pub fn hello(epoch: u64, hostname: &str) -> Message {
    Message::Hello(Hello {
        versions: vec![1, 2],
        epoch,
        agent: AgentInfo {
            agent_version: "fake".into(),
            hostname: hostname.into(),
            detector: "ebpf".into(),
            ..Default::default()
        },
        extensions: vec![],
    })
}

/// Says `hello` on a stream the relay opened and reads `Welcome`.
pub async fn greet(stream: UnixStream, hello: &Message) -> Option<Conn> {
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

/// What a fake agent saw.
#[derive(Default)]
pub struct Stats {
    /// Sessions the relay opened (welcomed).
    pub sessions: AtomicU64,
    pub acked: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Sessions the relay closed.
    pub closed: AtomicU64,
    pub latencies: Mutex<Vec<Duration>>,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// A well-behaved agent listening on a Unix socket (`--listen unix:PATH`): on every session
/// the relay opens it sends a new report every `every`, each acknowledged or counted.
pub struct FakeAgent {
    pub socket: PathBuf,
    pub stats: Arc<Stats>,
    stop: CancellationToken,
}

impl FakeAgent {
    pub fn start(socket: PathBuf, epoch: u64, every: Duration) -> Self {
        let listener = UnixListener::bind(&socket).unwrap();
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let (s, st) = (stats.clone(), stop.clone());
        let generation = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = st.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => return,
                    },
                };
                let (s, st, generation) = (s.clone(), st.clone(), generation.clone());
                tokio::spawn(async move {
                    let Some(mut conn) = greet(stream, &hello(epoch, "fake")).await else {
                        return;
                    };
                    s.sessions.fetch_add(1, Ordering::SeqCst);
                    loop {
                        let g = generation.fetch_add(1, Ordering::SeqCst) + 1;
                        let sent = Instant::now();
                        if conn
                            .write_message(&Message::Report(Box::new(report(epoch, g))))
                            .await
                            .is_err()
                        {
                            s.closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        match tokio::time::timeout(Duration::from_secs(20), conn.read_message())
                            .await
                        {
                            Ok(Ok(Some(Message::Ack(_)))) => {
                                s.acked.fetch_add(1, Ordering::SeqCst);
                                s.latencies.lock().unwrap().push(sent.elapsed());
                            }
                            Ok(Ok(Some(Message::Nack(_)))) => {
                                s.rate_limited.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {
                                s.closed.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                        // Between reports, notice the relay closing the session.
                        tokio::select! {
                            () = st.cancelled() => return,
                            () = tokio::time::sleep(every) => {}
                            read = conn.read_message() => {
                                if !matches!(read, Ok(Some(_))) {
                                    s.closed.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            socket,
            stats,
            stop,
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A VMM's hybrid-vsock socket: reads `CONNECT <port>\n`, connects to the guest's listener
/// (`guest(port)`), answers `OK <port>\n` and joins the two; closes at once when nothing
/// listens there, as a VMM whose guest refuses the port does.
pub struct HybridPeer {
    pub connects: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl HybridPeer {
    pub fn start(uds: &Path, guest: impl Fn(u32) -> PathBuf + Send + Sync + 'static) -> Self {
        let listener = UnixListener::bind(uds).unwrap();
        let connects = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let guest = Arc::new(guest);
        let (c, st) = (connects.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let mut host = tokio::select! {
                    () = st.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(_) => return,
                    },
                };
                c.fetch_add(1, Ordering::SeqCst);
                let guest = guest.clone();
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while line.len() < 64 {
                        if host.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if byte[0] == b'\n' {
                            break;
                        }
                        line.push(byte[0]);
                    }
                    let text = String::from_utf8_lossy(&line).into_owned();
                    let Some(port) = text
                        .strip_prefix("CONNECT ")
                        .and_then(|p| p.parse::<u32>().ok())
                    else {
                        return;
                    };
                    let Ok(mut guest) = UnixStream::connect(guest(port)).await else {
                        return;
                    };
                    if host
                        .write_all(format!("OK {port}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
                });
            }
        });
        Self { connects, stop }
    }

    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::SeqCst)
    }
}

impl Drop for HybridPeer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A guest that accepts the relay's connection and closes it at once (`stall: false`) or
/// holds it without a word (`stall: true`); counts the dials.
pub struct BadGuest {
    pub dials: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl BadGuest {
    pub fn start(socket: &Path, stall: bool) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        let dials = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (d, st) = (dials.clone(), stop.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    () = st.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => {
                            d.fetch_add(1, Ordering::SeqCst);
                            if stall {
                                held.push(s);
                            }
                        }
                        Err(_) => return,
                    },
                }
            }
        });
        Self { dials, stop }
    }

    pub fn dials(&self) -> u64 {
        self.dials.load(Ordering::SeqCst)
    }
}

impl Drop for BadGuest {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A free loopback port for `--metrics` (bound and released; the relay binds it next).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The value of a metric line starting with `prefix` on the relay's `/metrics`, 0 if absent.
pub fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `f` until true, or panics naming `what` after `timeout`.
pub async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every line of the dir sink's `deliveries.jsonl`.
pub fn deliveries(sink: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(sink.join("deliveries.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
