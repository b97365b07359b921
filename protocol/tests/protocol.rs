//! The wire protocol: round trips, limits, hostile input, and `Connection` over in-memory
//! streams with partial reads, cancellation and timeouts.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    io::Write,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use guestwatch_protocol::{
    Ack, AckStatus, AgentInfo, Attribution, ChangeCounts, Connection, ContentHash, ErrorCode,
    ErrorMessage, Evidence, HEADER_LEN, Hello, Limits, MAGIC, Message, Nack, NackReason, Payload,
    PayloadEncoding, ProtocolError, Report, ReportBody, ReportFacts, ReportId, Timeout, Timestamp,
    Trigger, TriggerKind, Welcome, frame, v1,
};
use tokio::io::AsyncWriteExt;

/// Tracks the largest single allocation, to prove limits hold before allocation.
struct PeakAlloc;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// Tests of this binary run one at a time, so an allocation measured belongs to its test.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` and returns the largest allocation it made.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::SeqCst);
    f();
    LARGEST.load(Ordering::SeqCst)
}

fn rpm_transaction() -> Attribution {
    Attribution {
        pid: 42,
        tid: 42,
        uid: 0,
        gid: 0,
        comm: "rpm".into(),
        exe: Some("/usr/bin/rpm".into()),
        return_code: Some(0),
        started_at: Some(Timestamp(1_700_000_000_000)),
        ended_at: Some(Timestamp(1_700_000_000_100)),
        loginuid: Some(4242),
        sessionid: Some(7),
        tty: Some("pts/1".into()),
        cmdline: vec!["rpm".into(), "-i".into(), "x.rpm".into()],
        ancestors: vec![guestwatch_protocol::Ancestor {
            pid: 40,
            comm: "bash".into(),
            exe: Some("/usr/bin/bash".into()),
        }],
        unit: Some("session-3.scope".into()),
        database: Some("/var/lib/rpm/rpmdb.sqlite".into()),
        library: Some("/usr/lib64/librpm.so.9".into()),
        evidence: Some(Evidence::Syscall),
        operation: None,
        paths: vec![],
    }
}

fn facts() -> ReportFacts {
    ReportFacts {
        trigger: Trigger {
            kind: TriggerKind::Transaction,
            detail: Some("rpm finished".into()),
            at: Timestamp(1_700_000_000_100),
            attribution: Some(rpm_transaction()),
        },
        transactions: vec![rpm_transaction()],
        tampers: vec![],
        coalesced: vec![(TriggerKind::Transaction, 1)],
        scanned_at: Timestamp(1_700_000_000_200),
        package_count: 3,
        changes: ChangeCounts {
            added: 1,
            ..Default::default()
        },
        agent_version: "0.1.0".into(),
        detector: "ebpf".into(),
    }
}

fn report(generation: u64, payload: Vec<u8>) -> Report {
    Report {
        id: ReportId {
            epoch: 0xfeed,
            generation,
        },
        content_hash: ContentHash([7; 32]),
        facts: facts(),
        body: ReportBody::Full(Payload::json(payload)),
    }
}

fn payload_of(r: &Report) -> &Payload {
    r.body.payload()
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            versions: vec![1],
            epoch: 0xfeed,
            agent: AgentInfo {
                agent_version: "0.1.0".into(),
                hostname: "vm".into(),
                ..Default::default()
            },
            extensions: vec![("k".into(), "v".into())],
        }),
        Message::Welcome(Welcome {
            version: 1,
            max_frame: 1 << 20,
            max_report_payload: 1 << 22,
            features: vec!["zstd".into()],
            ping_interval_secs: 30,
            relay_version: "0.1.0".into(),
        }),
        Message::Report(Box::new(report(5, br#"{"packages":{}}"#.to_vec()))),
        Message::Ack(Ack {
            id: ReportId {
                epoch: 1,
                generation: 2,
            },
            status: AckStatus::Duplicate,
        }),
        Message::Nack(Nack {
            id: ReportId {
                epoch: 1,
                generation: 2,
            },
            reason: NackReason::SinkUnavailable,
            detail: "sink down".into(),
            retry_after_ms: 500,
        }),
        Message::Ping(9),
        Message::Pong(9),
        Message::Error(ErrorMessage {
            code: ErrorCode::Busy,
            message: "later".into(),
        }),
    ]
}

#[test]
fn every_message_round_trips_and_every_prefix_is_incomplete() {
    let _serial = serial();
    for message in all_messages() {
        let bytes = frame::encode(2, &message, 1 << 20).unwrap();
        assert_eq!(&bytes[..4], &MAGIC);
        for cut in 0..bytes.len() {
            assert!(
                frame::decode(&bytes[..cut], 1 << 20).unwrap().is_none(),
                "{message:?} cut at {cut}"
            );
        }
        let decoded = frame::decode(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(decoded.consumed, bytes.len());
        assert_eq!(decoded.message.unwrap(), message);
    }
}

#[test]
fn report_ids_and_hashes_have_stable_text_forms() {
    let _serial = serial();
    let id = ReportId {
        epoch: 0xfeed,
        generation: 12,
    };
    assert_eq!(id.to_string(), "000000000000feed-12");
    assert!(
        ReportId {
            epoch: 1,
            generation: 3
        } > ReportId {
            epoch: 1,
            generation: 2
        }
    );
    let hash = ContentHash([0xab; 32]);
    assert_eq!(ContentHash::from_hex(&hash.to_hex()), Some(hash));
    assert_eq!(ContentHash::from_hex("xyz"), None);
}

#[test]
fn header_checks_come_before_the_payload() {
    let _serial = serial();
    // A 1 GiB claim is refused from the 12 header bytes alone.
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&1u16.to_be_bytes());
    header.extend_from_slice(&3u16.to_be_bytes());
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let peak = largest_allocation(|| {
        assert!(matches!(
            frame::decode(&header, 16 << 20),
            Err(ProtocolError::TooLarge { len, max }) if len == 1 << 30 && max == 16 << 20
        ));
    });
    assert!(peak < 1 << 20, "allocated {peak} bytes");

    let mut bad = header.clone();
    bad[..4].copy_from_slice(b"HTTP");
    assert!(matches!(
        frame::decode(&bad, 16 << 20),
        Err(ProtocolError::BadMagic(_))
    ));
    let mut future = header.clone();
    future[4..6].copy_from_slice(&99u16.to_be_bytes());
    assert!(matches!(
        frame::decode(&future, 16 << 20),
        Err(ProtocolError::UnsupportedVersion(99))
    ));
}

#[test]
fn unknown_types_and_malformed_payloads_keep_the_stream_in_step() {
    let _serial = serial();
    let mut stream = Vec::new();
    // Type 77 with a 3-byte payload, then garbage for a Hello, then trailing bytes on a Ping,
    // then a good Ping.
    for (kind, payload) in [(77u16, vec![1, 2, 3]), (1, vec![0xff; 9]), (6, vec![5, 0])] {
        stream.extend_from_slice(&MAGIC);
        stream.extend_from_slice(&1u16.to_be_bytes());
        stream.extend_from_slice(&kind.to_be_bytes());
        stream.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        stream.extend_from_slice(&payload);
    }
    stream.extend(frame::encode(1, &Message::Ping(4), 1 << 20).unwrap());
    let mut at = 0;
    let mut results = Vec::new();
    while let Some(decoded) = frame::decode(&stream[at..], 1 << 20).unwrap() {
        at += decoded.consumed;
        results.push(decoded.message);
    }
    assert_eq!(at, stream.len());
    assert!(matches!(results[0], Err(ProtocolError::UnknownType(77))));
    assert!(matches!(results[1], Err(ProtocolError::Malformed { .. })));
    assert!(
        matches!(&results[2], Err(ProtocolError::Malformed { reason, .. }) if reason.contains("trailing"))
    );
    assert_eq!(results[3].as_ref().unwrap(), &Message::Ping(4));
    assert!(
        results[..3]
            .iter()
            .all(|r| r.as_ref().unwrap_err().is_recoverable())
    );
}

#[test]
fn a_small_frame_claiming_a_huge_string_allocates_nothing_like_it() {
    let _serial = serial();
    // Hello { versions: [], epoch: 0, agent.agent_version: <claims 1 GiB> }.
    let mut payload = vec![0u8, 0u8];
    payload.push(253); // bincode varint: u64 follows
    payload.extend_from_slice(&(1u64 << 30).to_le_bytes());
    payload.extend_from_slice(b"short");
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&1u16.to_be_bytes());
    bytes.extend_from_slice(&1u16.to_be_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&payload);
    let peak = largest_allocation(|| {
        let decoded = frame::decode(&bytes, 16 << 20).unwrap().unwrap();
        assert!(matches!(
            decoded.message,
            Err(ProtocolError::Malformed { .. })
        ));
    });
    assert!(
        peak < 64 * 1024,
        "allocated {peak} bytes for a {}-byte frame",
        bytes.len()
    );
}

#[test]
fn large_payloads_are_compressed_and_a_zstd_bomb_is_bounded() {
    let _serial = serial();
    let big = br#"{"name":"package","version":"1.0"},"#.repeat(10_000);
    let r = report(1, big.clone());
    assert_eq!(payload_of(&r).encoding, PayloadEncoding::JsonZstd);
    assert!(payload_of(&r).bytes.len() < big.len() / 10);
    assert_eq!(
        payload_of(&r).to_json(1 << 24).unwrap().as_ref(),
        big.as_slice()
    );
    let small = report(2, b"{}".to_vec());
    assert_eq!(payload_of(&small).encoding, PayloadEncoding::Json);

    // 256 MiB of zeros compresses to a few KiB; decompression must stop at the limit.
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..256 {
        encoder.write_all(&chunk).unwrap();
    }
    let bomb = encoder.finish().unwrap();
    drop(chunk);
    let r = Payload {
        encoding: PayloadEncoding::JsonZstd,
        bytes: bomb,
    };
    let peak = largest_allocation(|| {
        assert!(r.to_json(4 << 20).is_err());
    });
    assert!(peak <= 16 << 20, "allocated {peak} bytes for a 4 MiB limit");
}

#[tokio::test]
async fn connection_over_a_one_byte_pipe() {
    let (a, b) = tokio::io::duplex(1);
    let mut left = Connection::new(a, Limits::default());
    let right = Connection::new(b, Limits::default());
    // Reports and Nacks are exact only in version 2 (version 1 is lossy: tested above).
    left.set_version(2);
    let mut right = right;
    let sent = all_messages();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        for m in &to_send {
            left.write_message(m).await.unwrap();
        }
        left
    });
    for expected in &sent {
        assert_eq!(&right.read_message().await.unwrap().unwrap(), expected);
    }
    let left = writer.await.unwrap();
    drop(left);
    assert!(
        right.read_message().await.unwrap().is_none(),
        "clean close between frames"
    );
}

#[tokio::test]
async fn a_cancelled_read_loses_nothing() {
    let (mut raw, b) = tokio::io::duplex(1024);
    let mut conn = Connection::new(b, Limits::default());
    let bytes = frame::encode(1, &Message::Ping(77), 1 << 20).unwrap();
    raw.write_all(&bytes[..5]).await.unwrap();
    // The read is cancelled with half a frame buffered...
    let cancelled = tokio::time::timeout(Duration::from_millis(50), conn.read_message()).await;
    assert!(cancelled.is_err());
    assert!(conn.mid_frame());
    // ...and resumes where it was.
    raw.write_all(&bytes[5..]).await.unwrap();
    assert_eq!(conn.read_message().await.unwrap(), Some(Message::Ping(77)));
}

#[tokio::test]
async fn closing_mid_frame_is_reported_as_such() {
    let (mut raw, b) = tokio::io::duplex(1024);
    let mut conn = Connection::new(b, Limits::default());
    let bytes = frame::encode(1, &Message::Ping(1), 1 << 20).unwrap();
    raw.write_all(&bytes[..HEADER_LEN]).await.unwrap();
    drop(raw);
    assert!(matches!(
        conn.read_message().await,
        Err(ProtocolError::ClosedMidFrame { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn idle_and_slow_writer_timeouts() {
    let (mut raw, b) = tokio::io::duplex(1024);
    let mut conn = Connection::new(b, Limits::default());
    let idle = conn
        .read_message_within(Duration::from_secs(120), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(idle, Err(Timeout::Idle(Duration::from_secs(120))));
    // A slow writer trickling a frame is cut off after the frame timeout, not the idle one.
    let bytes = frame::encode(1, &Message::Ping(1), 1 << 20).unwrap();
    let trickle = tokio::spawn(async move {
        for b in &bytes[..bytes.len() - 1] {
            raw.write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        raw
    });
    let started = tokio::time::Instant::now();
    let slow = conn
        .read_message_within(Duration::from_secs(120), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(slow, Err(Timeout::Frame(Duration::from_secs(30))));
    assert!(started.elapsed() <= Duration::from_secs(41));
    trickle.abort();
}

#[tokio::test]
async fn the_frame_limit_applies_to_writes_and_can_change() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut left = Connection::new(a, Limits { max_frame: 64 });
    let mut right = Connection::new(b, Limits::default());
    let big = Message::Report(Box::new(report(1, vec![b'x'; 100])));
    assert!(matches!(
        left.write_message(&big).await,
        Err(ProtocolError::TooLarge { .. })
    ));
    left.set_max_frame(1 << 20);
    left.write_message(&big).await.unwrap();
    right.set_max_frame(64);
    assert!(matches!(
        right.read_message().await,
        Err(ProtocolError::TooLarge { .. })
    ));
}

/// The fuzz target's seeds: one frame of each kind in both versions, and a stream of several.
fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let one = |version, m: &Message| frame::encode(version, m, 1 << 20).unwrap();
    let messages = all_messages();
    let mut stream = Vec::new();
    for m in &messages {
        stream.extend(one(2, m));
    }
    vec![
        ("ping", one(2, &Message::Ping(1))),
        ("hello", one(1, &messages[0])),
        ("report", one(2, &messages[2])),
        ("report-v1", one(1, &messages[2])),
        ("nack", one(2, &messages[4])),
        ("stream", stream),
    ]
}

/// `GUESTWATCH_WRITE_FUZZ_SEEDS=1 cargo test -p guestwatch-protocol fuzz_seeds` rewrites them
/// after a change of the messages.
#[test]
fn fuzz_seeds_are_valid_frames() {
    let _serial = serial();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/protocol_frame");
    for (name, bytes) in fuzz_seeds() {
        if std::env::var_os("GUESTWATCH_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::write(dir.join(name), &bytes).unwrap();
        }
        let stored = std::fs::read(dir.join(name)).unwrap();
        let decoded = frame::decode(&stored, 1 << 20).unwrap().unwrap();
        assert!(decoded.message.is_ok(), "{name}: {:?}", decoded.message);
        assert_eq!(stored, bytes, "{name} is stale: rewrite the seeds");
    }
}

#[test]
fn version_1_frames_still_decode_and_encode() {
    let _serial = serial();
    for message in all_messages() {
        let bytes = frame::encode(1, &message, 1 << 20).unwrap();
        assert_eq!(u16::from_be_bytes([bytes[4], bytes[5]]), 1);
        let back = frame::decode(&bytes, 1 << 20)
            .unwrap()
            .unwrap()
            .message
            .unwrap();
        match (&message, &back) {
            (Message::Report(sent), Message::Report(got)) => {
                // Version 1 carries the cause and its process, not the person or the command.
                assert_eq!(got.id, sent.id);
                assert_eq!(got.content_hash, sent.content_hash);
                assert_eq!(got.body, sent.body);
                assert_eq!(got.facts.trigger.kind, TriggerKind::Transaction);
                let a = got.facts.trigger.attribution.as_ref().unwrap();
                assert_eq!((a.pid, a.comm.as_str()), (42, "rpm"));
                assert_eq!(a.exe.as_deref(), Some("/usr/bin/rpm"));
                assert_eq!(a.loginuid, None);
                assert!(a.cmdline.is_empty());
                assert_eq!(got.facts.transactions.len(), 1);
                assert_eq!(got.facts.coalesced_total(), 1);
                assert_eq!(got.facts.changes.added, 1);
            }
            (Message::Nack(sent), Message::Nack(got)) => {
                assert_eq!(got.reason, sent.reason);
                assert_eq!(got.detail, sent.detail);
                assert_eq!(got.retry_after_ms, sent.retry_after_ms);
            }
            _ => assert_eq!(back, message),
        }
    }
}

#[test]
fn a_version_1_agents_report_is_read_as_version_2() {
    let _serial = serial();
    // Exactly what a version-1 agent puts on the wire.
    let old = v1::Report {
        id: ReportId {
            epoch: 3,
            generation: 4,
        },
        content_hash: ContentHash([1; 32]),
        facts: v1::ReportFacts {
            trigger: v1::TriggerFacts {
                kind: "tamper".into(),
                pid: Some(77),
                comm: Some("sh".into()),
                operation: Some("write".into()),
                paths: vec!["/var/lib/rpm/Packages".into()],
                ended_at_ms: Some(5_000),
                coalesced: 3,
                ..Default::default()
            },
            scanned_at_ms: 6_000,
            package_count: 2,
            changes: v1::ChangeCountsV1 {
                added: 0,
                removed: 1,
                changed: 2,
            },
            agent_version: "0.0.9".into(),
            detector: "ebpf".into(),
        },
        encoding: PayloadEncoding::Json,
        payload: b"{}".to_vec(),
    };
    let payload = bincode::encode_to_vec(&old, bincode::config::standard()).unwrap();
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&1u16.to_be_bytes());
    bytes.extend_from_slice(&3u16.to_be_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&payload);
    let Message::Report(r) = frame::decode(&bytes, 1 << 20)
        .unwrap()
        .unwrap()
        .message
        .unwrap()
    else {
        panic!("not a report")
    };
    assert_eq!(r.facts.trigger.kind, TriggerKind::Tamper);
    assert_eq!(r.facts.trigger.at, Timestamp(5_000));
    assert_eq!(r.facts.tampers.len(), 1);
    assert_eq!(r.facts.tampers[0].paths, ["/var/lib/rpm/Packages"]);
    assert_eq!(r.facts.coalesced, vec![(TriggerKind::Tamper, 3)]);
    assert_eq!((r.facts.changes.removed, r.facts.changes.changed()), (1, 2));
    // An unknown kind is malformed, not a panic or a guess.
    let mut odd = old.clone();
    odd.facts.trigger.kind = "bogus".into();
    let payload = bincode::encode_to_vec(&odd, bincode::config::standard()).unwrap();
    bytes.truncate(8);
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&payload);
    assert!(matches!(
        frame::decode(&bytes, 1 << 20).unwrap().unwrap().message,
        Err(ProtocolError::Malformed { .. })
    ));
}

#[test]
fn deltas_have_no_version_1_form_and_round_trip_in_version_2() {
    let _serial = serial();
    let delta = Message::Report(Box::new(Report {
        body: ReportBody::Delta {
            base: ReportId {
                epoch: 0xfeed,
                generation: 4,
            },
            base_hash: ContentHash([9; 32]),
            payload: Payload::json(b"{}".to_vec()),
        },
        ..report(5, vec![])
    }));
    assert!(matches!(
        frame::encode(1, &delta, 1 << 20),
        Err(ProtocolError::Encode(_))
    ));
    let bytes = frame::encode(2, &delta, 1 << 20).unwrap();
    assert_eq!(
        frame::decode(&bytes, 1 << 20)
            .unwrap()
            .unwrap()
            .message
            .unwrap(),
        delta
    );
}

#[test]
fn version_1_nack_texts_map_to_typed_reasons() {
    let _serial = serial();
    let id = ReportId {
        epoch: 1,
        generation: 1,
    };
    let v1 = |reason: &str| {
        v1::Nack {
            id,
            reason: reason.into(),
            retry_after_ms: 1,
        }
        .into_model()
    };
    assert_eq!(v1("rate limited").reason, NackReason::RateLimited);
    let sink = v1("sink unavailable: connection refused");
    assert_eq!(sink.reason, NackReason::SinkUnavailable);
    assert_eq!(sink.detail, "connection refused");
    assert_eq!(v1("too_large: 20 MiB").reason, NackReason::TooLarge);
    // Unknown texts stay retryable, as version-1 agents treated every Nack.
    assert_eq!(v1("whatever").reason, NackReason::SinkUnavailable);
    for reason in NackReason::ALL {
        let nack = Nack {
            id,
            reason,
            detail: "d".into(),
            retry_after_ms: 9,
        };
        assert_eq!(v1::Nack::from_model(&nack).into_model(), nack);
    }
    assert!(NackReason::TooLarge.is_terminal() && !NackReason::NeedFull.is_terminal());
}

#[test]
fn hello_and_facts_limits_refuse_oversized_guest_strings() {
    let _serial = serial();
    let mut hello = Hello {
        versions: vec![1, 2],
        epoch: 1,
        agent: AgentInfo {
            hostname: "\u{7}".repeat(300),
            ..Default::default()
        },
        extensions: vec![],
    };
    let err = hello.check_limits().unwrap_err();
    assert_eq!((err.field, err.max), ("hostname", 256));
    hello.agent.hostname = "vm1".into();
    hello.check_limits().unwrap();

    let mut f = facts();
    f.check_limits().unwrap();
    f.transactions[0].cmdline = vec!["a".into(); 65];
    assert_eq!(f.check_limits().unwrap_err().field, "cmdline");
    f.fit();
    f.check_limits().unwrap();
    assert_eq!(f.transactions[0].cmdline.len(), 64);
}

#[test]
fn documents_are_compressed_with_the_shipped_dictionary_and_name_it() {
    use guestwatch_protocol::{
        dictionary,
        inventory::{Document, PackageRecord, SystemFacts},
    };
    let records = (0..40)
        .map(|i| PackageRecord {
            name: format!("lib{i}"),
            version: "1.0".into(),
            release: "1.el9".into(),
            arch: Some("x86_64".into()),
            license: Some("GPL-2.0-or-later".into()),
            sigmd5: Some(format!("{i:032x}")),
            ..PackageRecord::default()
        })
        .collect();
    let bytes = Document::new(records, SystemFacts::default()).to_bytes();
    let payload = Payload::document(bytes.clone());
    assert_eq!(payload.encoding, PayloadEncoding::DocumentZstd);
    assert_eq!(
        zstd::zstd_safe::get_dict_id_from_frame(&payload.bytes).map(|id| id.get()),
        Some(dictionary::ID),
        "the frame names the dictionary"
    );
    assert_eq!(payload.to_document(1 << 20).unwrap().as_ref(), bytes);
    // What it saves on real inventories: report's tests and `cargo xtask bench wire`.
    let plain = zstd::bulk::compress(&bytes, 19).unwrap();

    // Without a dictionary a frame still decodes; one naming a dictionary this build does
    // not have is refused by name, not read as garbage.
    let without = Payload {
        encoding: PayloadEncoding::DocumentZstd,
        bytes: plain,
    };
    assert_eq!(without.to_document(1 << 20).unwrap().as_ref(), bytes);
    let mut other = dictionary::BYTES.to_vec();
    dictionary::set_id(&mut other, dictionary::ID + 1).unwrap();
    let foreign = Payload {
        encoding: PayloadEncoding::DocumentZstd,
        bytes: zstd::bulk::Compressor::with_dictionary(3, &other)
            .unwrap()
            .compress(&bytes)
            .unwrap(),
    };
    assert!(matches!(
        foreign.to_document(1 << 20),
        Err(guestwatch_protocol::PayloadError::UnknownDictionary(id)) if id == dictionary::ID + 1
    ));
    assert!(dictionary::set_id(&mut [0u8; 16], 1).is_err());
}

/// Seeds for the `protocol_document` fuzz target: a first byte choosing the encoding, then a
/// real document or delta, plain and compressed. `GUESTWATCH_WRITE_FUZZ_SEEDS=1` rewrites them.
#[test]
fn document_fuzz_seeds_decode() {
    use guestwatch_protocol::inventory::{DeltaDocument, Document, PackageRecord, SystemFacts};
    let record = |name: &str, version: &str| PackageRecord {
        name: name.into(),
        version: version.into(),
        release: "1.el9".into(),
        arch: Some("x86_64".into()),
        sourcerpm: Some(format!("{name}-{version}-1.el9.src.rpm")),
        license: Some("GPL-2.0-or-later".into()),
        vendor: Some("Red Hat, Inc.".into()),
        size: Some(1234),
        installtime: Some(1_700_000_000),
        sigmd5: Some("00112233445566778899aabbccddeeff".into()),
        ..PackageRecord::default()
    };
    let base = Document::new(
        vec![
            record("bash", "5.1"),
            record("curl", "7.76"),
            record("vim", "9"),
        ],
        SystemFacts::default(),
    );
    let next = Document::new(
        vec![
            record("bash", "5.2"),
            record("curl", "7.76"),
            record("zsh", "5.9"),
        ],
        SystemFacts::default(),
    );
    let delta = next.delta_from(&base.packages);
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/protocol_document");
    let seeds = [
        ("document", 0u8, base.to_bytes()),
        ("document_zstd", 1, Payload::of_document(&base).bytes),
        ("delta", 0, delta.to_bytes()),
        ("delta_zstd", 1, Payload::document(delta.to_bytes()).bytes),
    ];
    for (name, pick, bytes) in seeds {
        let mut seed = vec![pick];
        seed.extend_from_slice(&bytes);
        if std::env::var_os("GUESTWATCH_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::write(dir.join(name), &seed).unwrap();
        }
        let stored = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(stored, seed, "{name} is stale: rewrite the seeds");
        let payload = Payload {
            encoding: if pick == 0 {
                PayloadEncoding::Document
            } else {
                PayloadEncoding::DocumentZstd
            },
            bytes: stored[1..].to_vec(),
        };
        let plain = payload.to_document(1 << 20).unwrap();
        if name.starts_with("delta") {
            let applied = DeltaDocument::from_bytes(&plain)
                .unwrap()
                .apply(&base.packages);
            assert_eq!(applied.unwrap().content_hash(), next.content_hash());
        } else {
            assert_eq!(Document::from_bytes(&plain).unwrap(), base);
        }
    }
}

/// The cause's attribution travels once: as a reference to the listed record it is, inline
/// when it is not listed, and a reference to nothing is malformed.
#[test]
fn the_causes_attribution_is_sent_once() {
    let _serial = serial();
    let len = |f: &ReportFacts| guestwatch_protocol::encoded_len(f);
    let copy = guestwatch_protocol::encoded_len(&rpm_transaction());
    let listed = facts();
    let mut without = facts();
    without.trigger.attribution = None;
    assert!(len(&listed) <= len(&without) + 5, "a reference, not a copy");
    let mut unlisted = facts();
    unlisted.transactions.clear();
    let mut unlisted_without = unlisted.clone();
    unlisted_without.trigger.attribution = None;
    assert_eq!(
        len(&unlisted),
        len(&unlisted_without) + copy,
        "inline when not listed"
    );
    let mut tamper = facts();
    tamper.trigger.kind = TriggerKind::Tamper;
    tamper.transactions.clear();
    tamper.tampers = vec![rpm_transaction(), rpm_transaction()];
    tamper.tampers[0].pid = 7;
    for f in [listed, unlisted, without, tamper] {
        let mut r = report(1, b"{}".to_vec());
        r.facts = f;
        let message = Message::Report(Box::new(r));
        let bytes = frame::encode(2, &message, 1 << 20).unwrap();
        let decoded = frame::decode(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(decoded.message.unwrap(), message);
    }
    // A reference to a record that is not there.
    let mut r = report(1, b"{}".to_vec());
    r.facts.trigger.attribution = Some(rpm_transaction());
    let good = frame::encode(2, &Message::Report(Box::new(r.clone())), 1 << 20).unwrap();
    r.facts.transactions.clear();
    r.facts.trigger.attribution = None;
    let reference_to_nothing = {
        // Same report, the cause's attribution replaced by "transaction 0" of an empty list.
        let with_none = frame::encode(2, &Message::Report(Box::new(r)), 1 << 20).unwrap();
        let at = HEADER_LEN
            + with_none[HEADER_LEN..]
                .iter()
                .zip(&good[HEADER_LEN..])
                .position(|(a, b)| a != b)
                .unwrap();
        let mut bytes = with_none.clone();
        bytes[at] = 2; // WireAttribution::Transaction
        bytes.insert(at + 1, 0); // index 0
        let len = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) + 1;
        bytes[8..12].copy_from_slice(&len.to_be_bytes());
        bytes
    };
    let decoded = frame::decode(&reference_to_nothing, 1 << 20)
        .unwrap()
        .unwrap();
    assert!(
        decoded.message.is_err(),
        "a dangling reference must be malformed"
    );
}
