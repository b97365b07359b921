//! The hostile guest's tools and the checks of its acceptance tests (`hostile.rs` for push,
//! `hostile_pull.rs` for pull): hostile text, the largest `Hello` and facts a guest may send,
//! a relay process whose memory and log are measured, and [`assess`].
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use guestwatch_protocol::{
    AgentInfo, Ancestor, Attribution, ContentHash, DEFAULT_MAX_REPORT_PAYLOAD, Hello, Limits,
    Message, Payload, Report, ReportBody, ReportFacts, ReportId, Trigger, TriggerKind, guest,
};
use guestwatch_relay::{guestlog, sink::MAX_RECORD};
use tokio::net::UnixStream;

pub type Conn = guestwatch_protocol::Connection<UnixStream>;

/// The hostile VM's budget of sink bytes (lower than the default so the minute shows it).
pub const SINK_BYTES_PER_MINUTE: u64 = 8 << 20;
pub const MAX_FRAME: u32 = 2 << 20;
/// docs/security.md: the relay's memory is at most its idle size plus, per VM,
/// connections × 2 × max_frame (a frame being read and its decoded message) + 2 × (payload
/// limit + largest delivery record) (one report in validation, one in the cache slot; the dir
/// sink writes without copying). 4 connections per VM by default.
pub fn memory_bound_kib(idle_kib: u64, vms: u64) -> u64 {
    let report = u64::from(DEFAULT_MAX_REPORT_PAYLOAD) + MAX_RECORD as u64;
    let per_vm = 4 * 2 * u64::from(MAX_FRAME) + 2 * report;
    idle_kib + vms * per_vm / 1024
}

/// A line that would look like the relay's own if a newline in a guest string survived.
/// (The control characters at the end cost 6 bytes each in JSON.)
pub const FORGED: &str = "\n[2026-01-01T00:00:00Z ERROR guestwatch_relay::session] FORGED\r\u{85}\u{2028}\u{2029}\u{1b}[2K\u{1}\u{2}\u{3}\u{4}\u{5}\u{6}\u{7}\u{8}\u{e}\u{f}\u{10}\u{11}\u{12}\u{13}\u{14}\u{15}\u{16}\u{17}\u{18}\u{19}\u{1a}\u{1c}\u{1d}\u{1e}\u{1f}";

/// `len` bytes (or a little less) of hostile text: the forged line over and over.
pub fn hostile(len: usize) -> String {
    let mut s = String::new();
    while s.len() + FORGED.len() <= len {
        s.push_str(FORGED);
    }
    s
}

pub struct RelayProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub started: Instant,
}

impl RelayProcess {
    pub fn start(vms: &[String], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("relay.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_guestwatch-relay"));
        cmd.arg("run")
            .arg("--sink")
            .arg(format!("dir:{}", dir.path().join("sink").display()))
            .args(["--max-frame", &MAX_FRAME.to_string()])
            .args(["--read-timeout", "2s", "--idle-timeout", "8s"])
            .args(extra);
        for vm in vms {
            cmd.arg("--hybrid")
                .arg(format!("{vm}={}", dir.path().join(vm).display()));
        }
        let child = cmd
            // Debug: every line the relay can write is part of what is checked.
            .env("GUESTWATCH_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut relay = Self {
            child,
            dir,
            started: Instant::now(),
        };
        for vm in vms {
            let socket = relay.socket(vm);
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::os::unix::net::UnixStream::connect(&socket).is_err() {
                let exited = relay.child.try_wait().ok().flatten();
                assert!(
                    exited.is_none(),
                    "the relay exited ({exited:?}): {}",
                    String::from_utf8_lossy(&relay.log())
                );
                assert!(
                    Instant::now() < deadline,
                    "the relay never listened: {}",
                    String::from_utf8_lossy(&relay.log())
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        relay
    }

    /// A relay that dials every VM of `vms` at [`RelayProcess::guest_socket`] (pull mode),
    /// started before the guests listen (it keeps dialing, paced).
    pub fn start_pulling(vms: &[String], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("relay.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_guestwatch-relay"));
        cmd.arg("run")
            .arg("--sink")
            .arg(format!("dir:{}", dir.path().join("sink").display()))
            .args(["--max-frame", &MAX_FRAME.to_string()])
            .args(["--read-timeout", "2s", "--idle-timeout", "8s"])
            .args(extra);
        for vm in vms {
            cmd.arg("--pull").arg(format!(
                "{vm}=unix:{}",
                dir.path().join(format!("{vm}.agent")).display()
            ));
        }
        let child = cmd
            .env("GUESTWATCH_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let relay = Self {
            child,
            dir,
            started: Instant::now(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&relay.log()).contains("relay ready") {
            assert!(
                Instant::now() < deadline,
                "the relay never got ready: {}",
                String::from_utf8_lossy(&relay.log())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        relay
    }

    /// Where the pulled VM `vm` listens for the relay.
    pub fn guest_socket(&self, vm: &str) -> PathBuf {
        self.dir.path().join(format!("{vm}.agent"))
    }

    pub fn socket(&self, vm: &str) -> PathBuf {
        self.dir.path().join(format!("{vm}_919"))
    }

    pub fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn sink(&self) -> PathBuf {
        self.dir.path().join("sink")
    }

    pub fn log(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("relay.log")).unwrap()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn hello_with(agent: AgentInfo, extensions: Vec<(String, String)>) -> Message {
    Message::Hello(Hello {
        versions: vec![1, 2],
        epoch: 0xe,
        agent,
        extensions,
    })
}

/// The most hostile `Hello` within the guest bounds.
pub fn hostile_hello() -> Message {
    let name = hostile(guest::MAX_NAME);
    hello_with(
        AgentInfo {
            agent_version: name.clone(),
            hostname: name.clone(),
            os: name.clone(),
            kernel: name.clone(),
            detector: name.clone(),
        },
        vec![(name, hostile(guest::MAX_TEXT)); guest::MAX_SMALL_LIST],
    )
}

pub async fn greet(socket: &Path, hello: &Message) -> Option<Conn> {
    let stream = UnixStream::connect(socket).await.ok()?;
    let mut conn = Conn::new(stream, Limits::default());
    conn.write_message(hello).await.ok()?;
    match conn.read_message().await {
        Ok(Some(Message::Welcome(w))) => {
            conn.set_version(w.version);
            conn.set_max_frame(w.max_frame);
            Some(conn)
        }
        _ => None,
    }
}

/// The largest facts a guest may send (64 KiB encoded, every string hostile).
pub fn hostile_facts() -> ReportFacts {
    let name = hostile(guest::MAX_NAME);
    let text = hostile(guest::MAX_TEXT);
    let attribution = Attribution {
        pid: u32::MAX,
        comm: name.clone(),
        exe: Some(text.clone()),
        tty: Some(name.clone()),
        cmdline: vec![hostile(60); guest::MAX_CMDLINE_ARGS],
        ancestors: vec![
            Ancestor {
                pid: 1,
                comm: name.clone(),
                exe: Some(name.clone()),
            };
            guest::MAX_ANCESTORS
        ],
        unit: Some(name.clone()),
        database: Some(name.clone()),
        library: Some(name.clone()),
        operation: Some(name.clone()),
        paths: Vec::new(),
        ..Default::default()
    };
    let mut facts = ReportFacts {
        trigger: Trigger::new(TriggerKind::Tamper)
            .with_detail(text.clone())
            .with_attribution(attribution),
        coalesced: vec![(TriggerKind::Tamper, u32::MAX); guest::MAX_SMALL_LIST],
        agent_version: name.clone(),
        detector: name,
        ..Default::default()
    };
    // Hostile paths until the facts are as large as they may be.
    let size = |f: &ReportFacts| guestwatch_protocol::encoded_len(f);
    loop {
        let room = guest::MAX_FACTS.saturating_sub(size(&facts) + 8);
        let Some(a) = facts.trigger.attribution.as_mut() else {
            unreachable!()
        };
        if room < 64 || a.paths.len() == guest::MAX_PATHS {
            break;
        }
        a.paths.push(hostile(room.min(guest::MAX_TEXT)));
    }
    facts.check_limits().unwrap();
    assert!(size(&facts) > guest::MAX_FACTS - 256, "{}", size(&facts));
    facts
}

pub fn report(epoch: u64, generation: u64, facts: ReportFacts, payload: &[u8]) -> Message {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&epoch.to_be_bytes());
    hash[8..16].copy_from_slice(&generation.to_be_bytes());
    Message::Report(Box::new(Report {
        id: ReportId { epoch, generation },
        content_hash: ContentHash(hash),
        facts,
        body: ReportBody::Full(Payload::json(payload.to_vec())),
    }))
}

/// 256 KiB of JSON whose strings carry the hostile characters, escaped as JSON needs.
pub fn hostile_payload() -> Vec<u8> {
    let text = serde_json::to_string(&hostile(1024)).unwrap();
    let mut payload = b"{\"packages\":{".to_vec();
    let mut i = 0;
    while payload.len() < 256 << 10 {
        payload.extend_from_slice(format!("\"{i}\":{text},").as_bytes());
        i += 1;
    }
    payload.extend_from_slice(b"\"end\":1}}");
    payload
}

/// What the hostile VM saw.
#[derive(Default)]
pub struct Seen {
    pub delivered: AtomicU64,
    pub byte_limited: AtomicU64,
    pub rate_limited: AtomicU64,
    pub other_nacks: AtomicU64,
}

/// `[2026-12-01T20:40:30Z INFO  guestwatch_relay::server] …`: env_logger's prefix.
pub fn has_logger_prefix(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let (stamp, rest) = rest.split_at_checked(20).unwrap_or(("", ""));
    let stamp_ok = stamp.len() == 20
        && stamp.ends_with('Z')
        && stamp.as_bytes()[10] == b'T'
        && stamp
            .bytes()
            .enumerate()
            .all(|(i, b)| matches!(i, 4 | 7 | 10 | 13 | 16 | 19) || b.is_ascii_digit());
    let Some(rest) = rest.strip_prefix(' ') else {
        return false;
    };
    let level_ok = ["ERROR ", "WARN  ", "INFO  ", "DEBUG ", "TRACE "]
        .iter()
        .any(|l| rest.starts_with(l));
    let module = rest
        .get(6..)
        .and_then(|r| r.split_once("] "))
        .map(|(m, _)| m);
    stamp_ok
        && level_ok
        && module.is_some_and(|m| {
            !m.is_empty()
                && m.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_:".contains(&b))
        })
}

/// Bytes in the files under `dir`.
pub fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => du(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The checks of a hostile run, push or pull: the hostile VM `evil` stayed within its sink
/// byte budget and its log budget, no log line was forged, the relay's memory stayed within
/// the bound of docs/security.md, and the well-behaved VMs were acknowledged (at least
/// `min_good_acks` times, p99 < 1 s). Prints what it measured.
pub fn assess(
    label: &str,
    relay: &RelayProcess,
    idle_kib: u64,
    vms: &[String],
    seen: &Seen,
    latencies: Vec<Duration>,
    min_good_acks: usize,
) {
    let elapsed = relay.started.elapsed();
    let hwm_kib = relay.status_kib("VmHWM:");
    let rss_kib = relay.status_kib("VmRSS:");

    // The sink: what the hostile VM made the relay write (latest.json, latest.id, its log
    // lines), against its budget: burst + rate × time + its largest single write.
    let log = std::fs::read_to_string(relay.sink().join("deliveries.jsonl")).unwrap();
    let mut written = 0u64;
    let mut largest = 0u64;
    let mut evil_deliveries = 0u64;
    let payload = hostile_payload().len() as u64;
    for line in log.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        if record["vm"] == "evil" {
            evil_deliveries += 1;
            let id = record["report_id"].as_str().unwrap();
            // The log line; latest.json: the same record with the report around it; latest.id.
            let cost = (line.len() as u64 + 1)
                + (line.len() as u64 + 24 + payload)
                + (id.len() as u64 + 66);
            written += cost;
            largest = largest.max(cost);
        }
    }
    let budget = SINK_BYTES_PER_MINUTE as f64 / 6.0
        + SINK_BYTES_PER_MINUTE as f64 / 60.0 * elapsed.as_secs_f64()
        + largest as f64;
    let sink_du = du(&relay.sink());

    // The relay's log: never forged, the hostile VM's lines within its budget.
    let raw = relay.log();
    if let Ok(keep) = std::env::var("GUESTWATCH_TEST_KEEP_LOG") {
        std::fs::write(keep, &raw).unwrap();
    }
    let text = String::from_utf8(raw.clone()).expect("the log is UTF-8");
    for c in ['\r', '\u{85}', '\u{2028}', '\u{2029}', '\u{1b}'] {
        assert!(!text.contains(c), "{c:?} reached the log");
    }
    let mut evil_lines = 0u64;
    let mut evil_bytes = 0u64;
    for line in text.lines() {
        assert!(has_logger_prefix(line), "a forged or broken line: {line:?}");
        assert!(!line.contains("\n["), "{line}");
        if line.contains("evil") {
            evil_lines += 1;
            evil_bytes += line.len() as u64 + 1;
        }
    }
    let minutes = elapsed.as_secs_f64() / 60.0;
    // Admitted lines, each possibly preceded by a "suppressed" summary, the periodic and the
    // final summaries, and one line per delivery.
    let admitted = f64::from(guestlog::BURST) + f64::from(guestlog::LINES_PER_MINUTE) * minutes;
    let line_budget = 2.0 * admitted + minutes.ceil() + 1.0 + evil_deliveries as f64;
    let suppressed: u64 = text
        .lines()
        .filter(|l| l.contains("evil: ") && l.contains("more messages about this guest"))
        .filter_map(|l| {
            l.split("evil: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();

    let mut l = latencies;
    l.sort();
    let p99 = l[(l.len() - 1) * 99 / 100];
    let max = l[l.len() - 1];
    let bound_kib = memory_bound_kib(idle_kib, vms.len() as u64);
    println!(
        "{label} ({elapsed:.1?}): evil acked {}, in the sink {evil_deliveries} (byte-limited {}, rate-limited {}, other nacks {}); \
         evil sink writes {:.2} MiB (budget {:.2} MiB), sink on disk {:.2} MiB; \
         evil log {} lines / {} KiB (budget {:.0} lines), {} suppressed, whole log {} KiB; \
         relay RSS idle {} MiB, peak {} MiB, after {} MiB (bound {} MiB); \
         good acks {} p99 {:?} max {:?}",
        seen.delivered.load(Ordering::Relaxed),
        seen.byte_limited.load(Ordering::Relaxed),
        seen.rate_limited.load(Ordering::Relaxed),
        seen.other_nacks.load(Ordering::Relaxed),
        written as f64 / 1048576.0,
        budget / 1048576.0,
        sink_du as f64 / 1048576.0,
        evil_lines,
        evil_bytes / 1024,
        line_budget,
        suppressed,
        raw.len() / 1024,
        idle_kib / 1024,
        hwm_kib / 1024,
        rss_kib / 1024,
        bound_kib / 1024,
        l.len(),
        p99,
        max,
    );
    assert!(
        written as f64 <= budget,
        "evil wrote {written} bytes, over its budget {budget:.0}"
    );
    assert!(
        seen.byte_limited.load(Ordering::Relaxed) > 0,
        "the byte budget never held the hostile VM back"
    );
    assert_eq!(seen.other_nacks.load(Ordering::Relaxed), 0);
    assert!(
        evil_lines as f64 <= line_budget,
        "evil caused {evil_lines} log lines, over its budget {line_budget:.0}"
    );
    assert!(suppressed > 0, "the log budget never suppressed anything");
    // Each line: the prefix and at most three guest strings of escaped text.
    assert!(evil_bytes <= evil_lines * 4096, "{evil_bytes} bytes");
    assert!(
        hwm_kib <= bound_kib,
        "relay peak RSS {hwm_kib} KiB over the bound {bound_kib} KiB"
    );
    assert!(
        l.len() >= min_good_acks,
        "the good VMs delivered only {}",
        l.len()
    );
    assert!(p99 < Duration::from_secs(1), "good VMs' p99 ack {p99:?}");
}
