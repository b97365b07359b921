//! `cargo xtask bench load`: N simulated guests over hybrid-vsock Unix sockets, each sending
//! 500-package reports to a real `guestwatch-relay` process with the `dir` sink. Prints
//! reports/s, ack latency (p50/p99) and the relay's memory for N = 100 and 1,000.
//! Target: >= 500 reports/s on 2 cores, memory bounded by the cache size.
//!
//! Then, with the relay's default limits: 100 guests each delivering one report a second, once
//! alone and once beside a hostile guest that sends the largest facts it may (64 KiB encoded,
//! control characters that JSON escapes at 6 bytes each) at its rate limit. Prints the good
//! guests' ack latency, the relay's memory and the sink bytes per minute of both runs.
//!
//! Then deltas: 1,000 guests with 500-package compact inventories as bases, each sending
//! one-package changes as deltas as fast as they are acknowledged (target >= 20,000 changes/s,
//! p99 ack < 250 ms), beside the same changes sent as full compact reports, into the dir sink
//! and into a real redis-server (Redis memory per delivery, from `INFO memory`).

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use guestwatch_protocol::{
    AgentInfo, Attribution, Connection, ContentHash, Hello, Limits, Message, Payload, Report,
    ReportBody, ReportFacts, ReportId, Trigger, TriggerKind, guest,
    inventory::{Document, PackageRecord, SystemFacts},
};
use tokio::{net::UnixStream, sync::Mutex};

/// A claircore-shaped document with `n` packages; `salt` makes each report's content unique.
fn payload(n: usize, salt: u64) -> Vec<u8> {
    let mut packages = serde_json::Map::new();
    for i in 0..n {
        packages.insert(
            format!("{i:016x}"),
            serde_json::json!({
                "id": format!("{i:016x}"), "name": format!("package-{i}"), "version": format!("1.{i}.{salt}-1.el9"),
                "kind": "binary", "arch": "x86_64", "source": {"name": format!("package-{i}-src"), "kind": "source"},
                "package_db": "sqlite:usr/lib/sysimage/rpm", "repository_hint": "", "normalized_version": "",
            }),
        );
    }
    serde_json::to_vec(
        &serde_json::json!({"packages": packages, "success": true, "state": "IndexFinished"}),
    )
    .unwrap_or_default()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn guest(
    socket: std::path::PathBuf,
    vm: usize,
    reports: usize,
    latencies: Arc<Mutex<Vec<Duration>>>,
    start: Arc<tokio::sync::Barrier>,
) -> usize {
    let connected = async {
        let stream = UnixStream::connect(&socket).await.ok()?;
        let mut conn = Connection::new(stream, Limits::default());
        let hello = Hello {
            versions: vec![1, 2],
            epoch: vm as u64 + 1,
            agent: AgentInfo::default(),
            extensions: vec![],
        };
        conn.write_message(&Message::Hello(hello)).await.ok()?;
        matches!(conn.read_message().await, Ok(Some(Message::Welcome(_)))).then_some(conn)
    };
    let conn = connected.await;
    // Reports are built before the clock matters: the guests' cost must not be the relay's.
    let mut prepared = Vec::with_capacity(reports);
    for generation in 1..=reports as u64 {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&generation.to_be_bytes());
        hash[8..16].copy_from_slice(&(vm as u64).to_be_bytes());
        let report = Report {
            id: ReportId {
                epoch: vm as u64 + 1,
                generation,
            },
            content_hash: ContentHash(hash),
            facts: ReportFacts {
                trigger: Trigger::new(TriggerKind::Transaction),
                package_count: 500,
                ..Default::default()
            },
            body: ReportBody::Full(Payload::json(payload(
                500,
                generation * 100_000 + vm as u64,
            ))),
        };
        prepared.push(report);
    }
    // Everyone waits at the barrier, even a guest that failed to connect (it then sends nothing).
    start.wait().await;
    let Some(mut conn) = conn else { return 0 };
    let mut acked = 0;
    for report in prepared {
        let sent = Instant::now();
        if conn
            .write_message(&Message::Report(Box::new(report)))
            .await
            .is_err()
        {
            break;
        }
        match conn.read_message().await {
            Ok(Some(Message::Ack(_))) => {
                acked += 1;
                latencies.lock().await.push(sent.elapsed());
            }
            _ => break,
        }
    }
    acked
}

/// Starts a relay in `dir` for guests `vm-0` … `vm-{n-1}` (hybrid sockets `vm-I.sock`) with
/// `sink`, the rate limit off and `extra` configuration lines; returns once the last guest's
/// socket answers.
fn start_relay(dir: &std::path::Path, n: usize, sink: &str, extra: &str) -> std::process::Child {
    let hybrid: Vec<String> = (0..n)
        .map(|i| format!("\"vm-{i}={}\"", dir.join(format!("vm-{i}.sock")).display()))
        .collect();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "hybrid = [{}]\nsink = \"{sink}\"\nreports_per_minute = 0\n{extra}cache_slots = 100\nmax_connections = {}\n",
            hybrid.join(","),
            n + 16
        ),
    )
    .expect("config");
    let relay = Command::new(env!("CARGO_BIN_EXE_guestwatch-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("GUESTWATCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay");
    let last = dir.join(format!("vm-{}.sock_919", n - 1));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&last).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    relay
}

fn run(n: usize, per_guest: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let sink = format!("dir:{}", dir.path().join("sink").display());
    let mut relay = start_relay(dir.path(), n, &sink, "");
    let idle_rss = rss_kib(relay.id(), "VmRSS:");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let start = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut started = Instant::now();
    let acked: usize = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let socket = dir.path().join(format!("vm-{i}.sock_919"));
            tasks.spawn(guest(
                socket,
                i,
                per_guest,
                latencies.clone(),
                start.clone(),
            ));
        }
        // Every guest is connected, greeted and has its reports ready: go.
        start.wait().await;
        started = Instant::now();
        let mut total = 0;
        while let Some(Ok(n)) = tasks.join_next().await {
            total += n;
        }
        total
    });
    let elapsed = started.elapsed();
    let peak = rss_kib(relay.id(), "VmHWM:");
    let _ = relay.kill();
    let _ = relay.wait();
    let mut l = runtime.block_on(async { latencies.lock().await.clone() });
    l.sort();
    let pct = |p: f64| {
        l.get(((l.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    let rate = acked as f64 / elapsed.as_secs_f64();
    println!(
        "{n:>6} {acked:>8} {:>9.1}s {rate:>10.0} {:>9.1}ms {:>9.1}ms {:>9.1} {:>10.1}   {}",
        elapsed.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        idle_rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        if rate >= 500.0 {
            format!("{:.1}x target", rate / 500.0)
        } else {
            format!("MISSED ({:.2}x of 500/s)", rate / 500.0)
        }
    );
}

/// The largest facts a guest may send: 64 KiB encoded, all of it control characters.
fn largest_facts() -> ReportFacts {
    let mut facts = ReportFacts {
        trigger: Trigger::new(TriggerKind::Tamper)
            .with_detail("\u{1}".repeat(guest::MAX_TEXT))
            .with_attribution(Attribution {
                comm: "\u{1}".repeat(guest::MAX_NAME),
                ..Default::default()
            }),
        agent_version: "\u{1}".repeat(guest::MAX_NAME),
        detector: "\u{1}".repeat(guest::MAX_NAME),
        ..Default::default()
    };
    loop {
        let room = guest::MAX_FACTS
            .saturating_sub(guestwatch_protocol::encoded_len(&facts) + 8)
            .min(guest::MAX_TEXT);
        let Some(a) = facts.trigger.attribution.as_mut() else {
            break;
        };
        if room < 64 || a.paths.len() == guest::MAX_PATHS {
            break;
        }
        a.paths.push("\u{1}".repeat(room));
    }
    facts
}

async fn hello(socket: &std::path::Path, epoch: u64) -> Option<Connection<UnixStream>> {
    let stream = UnixStream::connect(socket).await.ok()?;
    let mut conn = Connection::new(stream, Limits::default());
    let hello = Hello {
        versions: vec![1, 2],
        epoch,
        agent: AgentInfo::default(),
        extensions: vec![],
    };
    conn.write_message(&Message::Hello(hello)).await.ok()?;
    match conn.read_message().await {
        Ok(Some(Message::Welcome(w))) => {
            conn.set_version(w.version);
            Some(conn)
        }
        _ => None,
    }
}

/// One report every `every` for `reports` reports; returns (acked, nacked) and pushes the ack
/// latencies.
async fn paced_guest(
    socket: std::path::PathBuf,
    vm: u64,
    prepared: Vec<Report>,
    every: Duration,
    latencies: Option<Arc<Mutex<Vec<Duration>>>>,
) -> (usize, usize) {
    let Some(mut conn) = hello(&socket, vm + 1).await else {
        return (0, 0);
    };
    // Spread the guests over the interval.
    tokio::time::sleep(every.mul_f64(fastrand::f64())).await;
    let mut tick = tokio::time::interval(every);
    let (mut acked, mut nacked) = (0, 0);
    for report in prepared {
        tick.tick().await;
        let sent = Instant::now();
        if conn
            .write_message(&Message::Report(Box::new(report)))
            .await
            .is_err()
        {
            break;
        }
        match conn.read_message().await {
            Ok(Some(Message::Ack(_))) => {
                acked += 1;
                if let Some(l) = &latencies {
                    l.lock().await.push(sent.elapsed());
                }
            }
            Ok(Some(Message::Nack(_))) => nacked += 1,
            _ => break,
        }
    }
    (acked, nacked)
}

fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0.0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// 100 guests at one report a second for `secs`, with the relay's default limits, beside a
/// hostile guest or not.
fn run_paced(n: usize, secs: u64, hostile: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let names: Vec<String> = (0..n)
        .map(|i| format!("vm-{i}"))
        .chain(hostile.then(|| "hostile".to_owned()))
        .collect();
    let hybrid: Vec<String> = names
        .iter()
        .map(|vm| format!("\"{vm}={}\"", dir.path().join(vm).display()))
        .collect();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "hybrid = [{}]\nsink = \"dir:{}\"\nmax_connections = {}\nmetrics = \"{metrics}\"\n",
            hybrid.join(","),
            dir.path().join("sink").display(),
            n + 16
        ),
    )
    .expect("config");
    let mut relay = Command::new(env!("CARGO_BIN_EXE_guestwatch-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("GUESTWATCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay");
    let last = dir.path().join(format!("{}_919", names[names.len() - 1]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&last).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let every = Duration::from_secs(1);
    let prepare = |vm: u64, facts: &ReportFacts, packages: usize| -> Vec<Report> {
        (1..=secs)
            .map(|generation| {
                let mut hash = [0u8; 32];
                hash[..8].copy_from_slice(&generation.to_be_bytes());
                hash[8..16].copy_from_slice(&vm.to_be_bytes());
                Report {
                    id: ReportId {
                        epoch: vm + 1,
                        generation,
                    },
                    content_hash: ContentHash(hash),
                    facts: facts.clone(),
                    body: ReportBody::Full(Payload::json(payload(
                        packages,
                        generation * 100_000 + vm,
                    ))),
                }
            })
            .collect()
    };
    let good_facts = ReportFacts {
        trigger: Trigger::new(TriggerKind::Transaction),
        package_count: 500,
        ..Default::default()
    };
    let started = Instant::now();
    let (good, evil) = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let socket = dir.path().join(format!("vm-{i}_919"));
            let prepared = prepare(i as u64, &good_facts, 500);
            tasks.spawn(paced_guest(
                socket,
                i as u64,
                prepared,
                every,
                Some(latencies.clone()),
            ));
        }
        let evil = hostile.then(|| {
            let socket = dir.path().join("hostile_919");
            let prepared = prepare(1 << 20, &largest_facts(), 1);
            // At its rate limit: the default 60 a minute.
            tokio::spawn(paced_guest(socket, 1 << 20, prepared, every, None))
        });
        let mut good = (0, 0);
        while let Some(Ok((a, n))) = tasks.join_next().await {
            good.0 += a;
            good.1 += n;
        }
        let evil = match evil {
            Some(task) => task.await.unwrap_or_default(),
            None => (0, 0),
        };
        (good, evil)
    });
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let peak = rss_kib(relay.id(), "VmHWM:");
    let sink_bytes = metric(metrics, "guestwatch_relay_sink_bytes_total");
    let _ = relay.kill();
    let _ = relay.wait();
    // The hostile guest's share: its record twice (log line, latest.json) and its report.
    let hostile_bytes: usize = std::fs::read_to_string(dir.path().join("sink/deliveries.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"vm\":\"hostile\""))
        .map(|l| 2 * l.len() + 128)
        .sum();
    let mut l = runtime.block_on(async { latencies.lock().await.clone() });
    l.sort();
    let pct = |p: f64| {
        l.get(((l.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{:>16} {:>8} {:>6} {:>9.1}ms {:>9.1}ms {:>10.1} {:>13.1}   {}",
        if hostile { "100 + hostile" } else { "100" },
        good.0,
        good.1,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        peak as f64 / 1024.0,
        sink_bytes / minutes / 1048576.0,
        if hostile {
            format!(
                "{} acked, {} nacked, {:.1} sink MiB/min",
                evil.0,
                evil.1,
                hostile_bytes as f64 / minutes / 1048576.0
            )
        } else {
            "-".to_owned()
        }
    );
}

/// A 500-package compact inventory of guest `vm`.
fn inventory(vm: usize) -> Vec<PackageRecord> {
    (0..500)
        .map(|i| PackageRecord {
            name: format!("package-{i}"),
            version: format!("1.{i}"),
            release: "1.el9".into(),
            arch: Some("x86_64".into()),
            sourcerpm: Some(format!("package-{i}-1.{i}-1.el9.src.rpm")),
            license: Some("GPL-2.0-or-later".into()),
            vendor: Some("Bench".into()),
            size: Some(100_000 + i as u64),
            installtime: Some(1_700_000_000 + i as u64),
            sigmd5: Some(format!("{:016x}{:016x}", vm * 1_000 + i, i * 7_919)),
            ..PackageRecord::default()
        })
        .collect()
}

/// Guest `vm`'s reports: its base whole, then `changes` one-package upgrades, each as a delta
/// against the one before (or whole, when `deltas` is false).
fn change_reports(vm: usize, changes: usize, deltas: bool) -> Vec<Report> {
    let epoch = vm as u64 + 1;
    let mut packages = inventory(vm);
    let mut document = Document::new(packages.clone(), SystemFacts::default());
    let facts = ReportFacts {
        trigger: Trigger::new(TriggerKind::Transaction),
        package_count: 500,
        ..Default::default()
    };
    let mut reports = vec![Report {
        id: ReportId {
            epoch,
            generation: 1,
        },
        content_hash: document.content_hash(),
        facts: facts.clone(),
        body: ReportBody::Full(Payload::of_document(&document)),
    }];
    for c in 0..changes {
        let generation = c as u64 + 2;
        let i = (vm * 31 + c * 7) % packages.len();
        packages[i].version = format!("2.{generation}");
        packages[i].installtime = Some(1_800_000_000 + generation);
        let next = Document::new(packages.clone(), SystemFacts::default());
        let body = if deltas {
            ReportBody::Delta {
                base: ReportId {
                    epoch,
                    generation: generation - 1,
                },
                base_hash: document.content_hash(),
                payload: Payload::document(next.delta_from(&document.packages).to_bytes()),
            }
        } else {
            ReportBody::Full(Payload::of_document(&next))
        };
        reports.push(Report {
            id: ReportId { epoch, generation },
            content_hash: next.content_hash(),
            facts: facts.clone(),
            body,
        });
        document = next;
    }
    reports
}

/// Sends `reports` in turn, each as soon as the one before is answered; the first (the base)
/// before the barrier. Pushes the latencies of the rest.
async fn changing_guest(
    socket: std::path::PathBuf,
    vm: u64,
    reports: Vec<Report>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    start: Arc<tokio::sync::Barrier>,
) -> (usize, usize) {
    let mut conn = hello(&socket, vm + 1).await;
    let mut reports = reports.into_iter();
    if let (Some(c), Some(base)) = (&mut conn, reports.next()) {
        let ok = c
            .write_message(&Message::Report(Box::new(base)))
            .await
            .is_ok()
            && matches!(c.read_message().await, Ok(Some(Message::Ack(_))));
        if !ok {
            conn = None;
        }
    }
    start.wait().await;
    let Some(mut conn) = conn else { return (0, 0) };
    let (mut acked, mut nacked) = (0, 0);
    let mut mine = Vec::new();
    for report in reports {
        let sent = Instant::now();
        if conn
            .write_message(&Message::Report(Box::new(report)))
            .await
            .is_err()
        {
            break;
        }
        match conn.read_message().await {
            Ok(Some(Message::Ack(_))) => {
                acked += 1;
                mine.push(sent.elapsed());
            }
            Ok(Some(Message::Nack(_))) => nacked += 1,
            _ => break,
        }
    }
    latencies.lock().await.extend(mine);
    (acked, nacked)
}

/// Redis's `used_memory`.
fn redis_memory(redis: &guestwatch_testkit::RedisServer) -> u64 {
    redis
        .command("INFO memory")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
        .unwrap_or(0)
}

/// `n` guests, `changes` one-package changes each, as deltas or whole, into `sink` (`dir` or
/// `redis`).
fn run_changes(n: usize, changes: usize, deltas: bool, sink: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let redis = match sink {
        "redis" => match guestwatch_testkit::RedisServer::start() {
            Ok(r) => Some(r),
            Err(e) => {
                println!("SKIPPED: redis-server is not available: {e}");
                return;
            }
        },
        _ => None,
    };
    let sink_spec = match &redis {
        Some(r) => format!("redis://127.0.0.1:{}/0", r.port()),
        None => format!("dir:{}", dir.path().join("sink").display()),
    };
    let mut relay = start_relay(dir.path(), n, &sink_spec, "max_sink_bytes_per_minute = 0\n");
    let prepared: Vec<Vec<Report>> = (0..n).map(|i| change_reports(i, changes, deltas)).collect();
    let wire: usize = prepared
        .iter()
        .flat_map(|r| r.iter().skip(1))
        .map(|r| r.body.payload().bytes.len())
        .sum();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let start = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut started = Instant::now();
    let mut memory_before = 0;
    let (acked, nacked) = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, reports) in prepared.into_iter().enumerate() {
            let socket = dir.path().join(format!("vm-{i}.sock_919"));
            tasks.spawn(changing_guest(
                socket,
                i as u64,
                reports,
                latencies.clone(),
                start.clone(),
            ));
        }
        // Every guest's base is delivered: go.
        start.wait().await;
        memory_before = redis.as_ref().map_or(0, redis_memory);
        started = Instant::now();
        let (mut acked, mut nacked) = (0, 0);
        while let Some(Ok((a, n))) = tasks.join_next().await {
            acked += a;
            nacked += n;
        }
        (acked, nacked)
    });
    let elapsed = started.elapsed();
    let peak = rss_kib(relay.id(), "VmHWM:");
    let memory_after = redis.as_ref().map_or(0, redis_memory);
    let _ = relay.kill();
    let _ = relay.wait();
    let mut l = runtime.block_on(async { latencies.lock().await.clone() });
    l.sort();
    let pct = |p: f64| {
        l.get(((l.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    let rate = acked as f64 / elapsed.as_secs_f64();
    let per_delivery = match &redis {
        Some(_) if acked > 0 => format!(
            "{:.0}",
            memory_after.saturating_sub(memory_before) as f64 / acked as f64
        ),
        _ => "-".into(),
    };
    println!(
        "{:>6} {:>5} {:>6} {acked:>8} {nacked:>6} {rate:>10.0} {:>9.1}ms {:>9.1}ms {:>9.1} {:>9.0} {:>12}   {}",
        if deltas { "delta" } else { "full" },
        sink,
        n,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        peak as f64 / 1024.0,
        wire as f64 / (n * changes).max(1) as f64,
        per_delivery,
        format_args!(
            "{:.2}x of 20,000/s, p99 {}",
            rate / 20_000.0,
            if pct(0.99) < Duration::from_millis(250) {
                "within 250 ms"
            } else {
                "OVER 250 ms"
            }
        )
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo bench --bench load -- changes` runs the change rows alone.
    let only_changes = std::env::args().skip(1).any(|a| a == "changes");
    if !only_changes {
        throughput_and_hostile_rows();
    }
    change_rows();
}

fn throughput_and_hostile_rows() {
    println!(
        "relay load: simulated guests over Unix sockets, 500-package reports, dir sink, rate limit off"
    );
    println!(
        "{:>6} {:>8} {:>10} {:>10} {:>11} {:>11} {:>9} {:>10}   vs 500 reports/s",
        "guests", "reports", "time", "reports/s", "ack p50", "ack p99", "RSS MiB", "peak MiB"
    );
    run(100, 20);
    run(1000, 3);
    println!();
    println!(
        "relay beside a hostile guest: 100 guests, one 500-package report a second each for 30 s, default limits (60 reports and 64 MiB of sink writes a minute per VM); the hostile guest sends the largest facts allowed at its rate limit"
    );
    println!(
        "{:>16} {:>8} {:>6} {:>11} {:>11} {:>10} {:>13}   hostile guest",
        "guests", "acked", "nacked", "ack p50", "ack p99", "peak MiB", "sink MiB/min",
    );
    run_paced(100, 30, false);
    run_paced(100, 30, true);
    println!();
}

fn change_rows() {
    println!(
        "one-package changes: 1,000 guests with 500-package compact bases, each change sent once the previous is acknowledged, rate limits off"
    );
    println!(
        "{:>6} {:>5} {:>6} {:>8} {:>6} {:>10} {:>11} {:>11} {:>9} {:>9} {:>12}   vs 20,000 changes/s",
        "form",
        "sink",
        "guests",
        "changes",
        "nacked",
        "changes/s",
        "ack p50",
        "ack p99",
        "peak MiB",
        "wire B",
        "redis B/dlv"
    );
    run_changes(1000, 5, false, "dir");
    run_changes(1000, 5, true, "dir");
    run_changes(1000, 5, true, "redis");
}
