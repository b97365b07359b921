//! Pull mode, the relay in process against guest stand-ins over Unix sockets: VMs dialed
//! directly and through a VMM's hybrid socket (`CONNECT`/`OK`) are served while others refuse,
//! stall or are down (and are not hammered); push and pull in one relay keep their own
//! limits; reloads add and remove targets — from the TOML file and from the pull directory —
//! without touching the other VMs' sessions, and removed VMs are closed and counted.

mod pullkit;

use std::{sync::atomic::Ordering, time::Duration};

use guestwatch_protocol::{Message, NackReason};
use guestwatch_relay::{
    config::{HybridVm, Settings},
    listen::ConnectionLimits,
    server,
};
use pullkit::{
    BadGuest, Conn, FakeAgent, HybridPeer, Stats, deliveries, free_port, greet, hello, metric,
    report, settings, target, until,
};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

struct Relay {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Relay {
    fn start(settings: Settings) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(settings, stop.clone()));
        Self { stop, task }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_refuses_stalls_or_is_down_does_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let direct = FakeAgent::start(d.join("direct.sock"), 1, Duration::from_millis(300));
    // vm "hybrid": its agent listens on guest port 919 behind a VMM socket.
    let behind = FakeAgent::start(d.join("guest-919.sock"), 2, Duration::from_millis(300));
    let guest_dir = d.to_path_buf();
    let vmm = HybridPeer::start(&d.join("hybrid.vsock"), move |port| {
        guest_dir.join(format!("guest-{port}.sock"))
    });
    let refuser = BadGuest::start(&d.join("refuser.sock"), false);
    let staller = BadGuest::start(&d.join("staller.sock"), true);
    let mut s = settings(
        d,
        vec![
            target(
                "direct",
                &format!("unix:{}", d.join("direct.sock").display()),
            ),
            target(
                "hybrid",
                &format!("hybrid:{}:919", d.join("hybrid.vsock").display()),
            ),
            // The VMM has no guest listening on 5000: it closes instead of answering OK.
            target(
                "wrong-port",
                &format!("hybrid:{}:5000", d.join("hybrid.vsock").display()),
            ),
            target(
                "refuser",
                &format!("unix:{}", d.join("refuser.sock").display()),
            ),
            target(
                "staller",
                &format!("unix:{}", d.join("staller.sock").display()),
            ),
            target("down", &format!("unix:{}", d.join("down.sock").display())),
        ],
    );
    s.delivery.reports_per_minute = 0;
    let relay = Relay::start(s);
    until("deliveries from both good VMs", WAIT, || {
        Stats::get(&direct.stats.acked) >= 10 && Stats::get(&behind.stats.acked) >= 10
    })
    .await;
    let window = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let elapsed = window.elapsed();
    // Each good VM held one session the whole time and kept delivering.
    assert_eq!(Stats::get(&direct.stats.sessions), 1);
    assert_eq!(Stats::get(&behind.stats.sessions), 1);
    assert!(Stats::get(&direct.stats.acked) >= 20);
    let sink = d.join("sink");
    let all = deliveries(&sink);
    for vm in ["direct", "hybrid"] {
        let mine: Vec<_> = all.iter().filter(|r| r["vm"] == vm).collect();
        assert!(mine.len() >= 10, "{vm}: {}", mine.len());
        assert_eq!(mine[0]["identity"]["source"], "dialed");
    }
    assert_eq!(
        all.iter().find(|r| r["vm"] == "hybrid").unwrap()["identity"]["address"],
        format!("hybrid:{}:919", d.join("hybrid.vsock").display())
    );
    // The bad ones were dialed again and again, but paced: backoff from 1 s doubling to the
    // 4 s cap is at most ~8 dials in the first 15 s or so (a tight loop would be thousands).
    let (refused, stalled) = (refuser.dials(), staller.dials());
    println!(
        "over {elapsed:.1?} and the warm-up: refuser dialed {refused}x, staller {stalled}x, \
         wrong port {}x (hybrid socket connects in all)",
        vmm.connects()
    );
    assert!(
        (2..=12).contains(&refused),
        "refuser dialed {refused} times"
    );
    assert!(
        (1..=12).contains(&stalled),
        "staller dialed {stalled} times"
    );
    assert!(
        all.iter()
            .all(|r| ["direct", "hybrid"].contains(&r["vm"].as_str().unwrap())),
        "only the good VMs delivered"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_pull_in_one_relay_keep_their_own_limits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pulled = FakeAgent::start(d.join("pulled.sock"), 7, Duration::from_millis(100));
    let mut s = settings(
        d,
        vec![target(
            "pulled",
            &format!("unix:{}", d.join("pulled.sock").display()),
        )],
    );
    s.hybrid = ["pushed", "other"]
        .iter()
        .map(|vm| HybridVm {
            name: (*vm).into(),
            uds_path: d.join(format!("{vm}.vsock")),
        })
        .collect();
    // Two guest-opened connections in all, two per VM, bursts of one report per VM (six a
    // minute: the next one ten seconds later).
    s.limits = ConnectionLimits {
        total: 2,
        per_vm: 2,
    };
    s.delivery.reports_per_minute = 6;
    let relay = Relay::start(s);
    let pushed_socket = d.join("pushed.vsock_919");
    until("the push listener", WAIT, || pushed_socket.exists()).await;
    // The pushing VM takes every guest-opened slot there is.
    let mut c1 = greet(
        UnixStream::connect(&pushed_socket).await.unwrap(),
        &hello(9, "pushed"),
    )
    .await
    .expect("welcomed");
    let _c2: Conn = greet(
        UnixStream::connect(&pushed_socket).await.unwrap(),
        &hello(9, "pushed"),
    )
    .await
    .expect("welcomed");
    let other = UnixStream::connect(d.join("other.vsock_919"))
        .await
        .unwrap();
    assert!(
        greet(other, &hello(10, "other")).await.is_none(),
        "the total of guest-opened connections is taken"
    );
    // The pulled VM is not bounded by that total: it has its session and its own budget.
    until("the pulled VM's report and its rate limit", WAIT, || {
        Stats::get(&pulled.stats.acked) >= 1 && Stats::get(&pulled.stats.rate_limited) >= 1
    })
    .await;
    // The pulled VM spent its own budget, not the pushing VM's: that one's report goes.
    c1.write_message(&Message::Report(Box::new(report(9, 1))))
        .await
        .unwrap();
    let answer = c1.read_message().await.unwrap();
    assert!(matches!(answer, Some(Message::Ack(_))), "{answer:?}");
    c1.write_message(&Message::Report(Box::new(report(9, 2))))
        .await
        .unwrap();
    match c1.read_message().await.unwrap() {
        Some(Message::Nack(n)) => assert_eq!(n.reason, NackReason::RateLimited),
        other => panic!("{other:?}"),
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_and_remove_vms_without_touching_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = FakeAgent::start(d.join("a.sock"), 1, Duration::from_millis(200));
    let b = FakeAgent::start(d.join("b.sock"), 2, Duration::from_millis(200));
    let config = d.join("relay.toml");
    let write_config = |names: &[&str]| {
        let list: Vec<String> = names
            .iter()
            .map(|n| format!("\"{n}=unix:{}\"", d.join(format!("{n}.sock")).display()))
            .collect();
        // Written beside and renamed into place, as editors and configuration tools do.
        let tmp = d.join(".relay.toml.tmp");
        std::fs::write(&tmp, format!("pull = [{}]\n", list.join(", "))).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
    };
    write_config(&["a"]);
    let pull_dir = d.join("vms");
    std::fs::create_dir(&pull_dir).unwrap();
    let metrics = free_port();
    let mut s = settings(d, Vec::new());
    s.config_file = Some(config.clone());
    s.pull_from_file = true;
    s.pull = guestwatch_relay::config::FileConfig::load(&config)
        .unwrap()
        .pull_targets()
        .unwrap();
    s.pull_dir = Some(pull_dir.clone());
    s.metrics = Some(metrics);
    let relay = Relay::start(s);
    until("a's deliveries", WAIT, || Stats::get(&a.stats.acked) >= 3).await;

    // b is added to the file: dialed, a untouched.
    write_config(&["a", "b"]);
    until("b's deliveries", WAIT, || Stats::get(&b.stats.acked) >= 3).await;
    assert_eq!(Stats::get(&a.stats.sessions), 1);
    assert_eq!(Stats::get(&a.stats.closed), 0);

    // c appears in the pull directory (its VMM's socket; its agent behind it on port 919).
    let c = FakeAgent::start(d.join("c-guest.sock"), 3, Duration::from_millis(200));
    let c_guest = d.join("c-guest.sock");
    let vmm = HybridPeer::start(&pull_dir.join("c.vsock"), move |_| c_guest.clone());
    until("c's deliveries", WAIT, || Stats::get(&c.stats.acked) >= 3).await;
    assert!(vmm.connects() >= 1);

    // a leaves the file, c's socket leaves the directory: both closed and counted, b kept.
    write_config(&["b"]);
    until("a's session closed", WAIT, || {
        Stats::get(&a.stats.closed) == 1
    })
    .await;
    std::fs::remove_file(pull_dir.join("c.vsock")).unwrap();
    until("c's session closed", WAIT, || {
        Stats::get(&c.stats.closed) == 1
    })
    .await;
    let removed = tokio::task::spawn_blocking(move || {
        metric(
            metrics,
            "guestwatch_relay_vms_removed_total{reason=\"pull\"}",
        )
    })
    .await
    .unwrap();
    assert_eq!(removed, 2.0);
    let acked_b = Stats::get(&b.stats.acked);
    until("b still delivering", WAIT, || {
        Stats::get(&b.stats.acked) >= acked_b + 3
    })
    .await;
    assert_eq!(Stats::get(&b.stats.sessions), 1, "b was never redialed");
    assert_eq!(Stats::get(&a.stats.sessions), 1, "a is not dialed any more");

    // A broken file is refused and changes nothing.
    std::fs::write(&config, "pull = [\"x=nonsense\"]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed = tokio::task::spawn_blocking(move || {
        metric(metrics, "guestwatch_relay_reloads_total{result=\"failed\"}")
    })
    .await
    .unwrap();
    assert!(failed >= 1.0);
    assert_eq!(Stats::get(&b.stats.closed), 0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_answering_garbage_is_a_failed_dial() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let uds = d.join("vm.vsock");
    let listener = tokio::net::UnixListener::bind(&uds).unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(&[b'x'; 4096]).await;
        }
    });
    let metrics = free_port();
    let mut s = settings(
        d,
        vec![target("vm", &format!("hybrid:{}:919", uds.display()))],
    );
    s.metrics = Some(metrics);
    let relay = Relay::start(s);
    until("two dials", WAIT, || answered.load(Ordering::SeqCst) >= 2).await;
    let failed = tokio::task::spawn_blocking(move || {
        metric(
            metrics,
            "guestwatch_relay_pull_dials_total{result=\"failed\"}",
        )
    })
    .await
    .unwrap();
    assert!(failed >= 1.0);
    assert!(deliveries(&d.join("sink")).is_empty());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cid_map_reload_closes_the_names_it_drops_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let map = d.join("cids");
    std::fs::write(&map, "3 web-1\n4 db-1\n").unwrap();
    // A pulled VM beside the map: a reload of the map must not touch it.
    let other = FakeAgent::start(d.join("other.sock"), 5, Duration::from_millis(200));
    let metrics = free_port();
    let mut s = settings(
        d,
        vec![target(
            "other",
            &format!("unix:{}", d.join("other.sock").display()),
        )],
    );
    s.cid_map = Some(map.clone());
    s.metrics = Some(metrics);
    let relay = Relay::start(s);
    until("the pulled VM's deliveries", WAIT, || {
        Stats::get(&other.stats.acked) >= 2
    })
    .await;
    // db-1 renamed, web-1 removed, CID 5 named: three names whose connections close.
    let tmp = d.join(".cids.tmp");
    std::fs::write(&tmp, "4 db-2\n5 cache-1\n").unwrap();
    std::fs::rename(&tmp, &map).unwrap();
    let removed = move || {
        metric(
            metrics,
            "guestwatch_relay_vms_removed_total{reason=\"cid_map\"}",
        )
    };
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let n = tokio::task::spawn_blocking(removed).await.unwrap();
        if n == 3.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n} removals counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A map that does not parse changes nothing.
    std::fs::write(&map, "2 host\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tokio::task::spawn_blocking(removed).await.unwrap(), 3.0);
    assert_eq!(Stats::get(&other.stats.sessions), 1);
    assert_eq!(Stats::get(&other.stats.closed), 0);
    relay.shutdown().await;
}
