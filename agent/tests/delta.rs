//! Deltas from the agent's side, against a protocol-level fake relay: a delta goes only to a
//! version-2 relay that announced `delta`, always against the report that relay acknowledged
//! last; `NeedFull` brings the same generation whole, at once; and a delta that would not be
//! smaller is not sent.

mod fake_relay;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fake_relay::{FakeRelay, Reply, ack, nack};
use guestwatch_agent::{
    config::RelayAddr,
    deliver::{
        machine::MachineId,
        sender::{self, Outbox, SenderConfig},
        state::StateDir,
        writer::StateWriter,
    },
    metrics::Metrics,
};
use guestwatch_protocol::{
    AgentInfo, NackReason, Payload, Report, ReportBody, ReportFacts, ReportId,
    inventory::{DeltaDocument, Document, PackageRecord, SystemFacts},
};
use tokio_util::sync::CancellationToken;

struct Agent {
    outbox: Outbox,
    epoch: u64,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn start(dir: &std::path::Path, relay: &FakeRelay) -> Self {
        let state = StateDir::open(&dir.join("state"), &MachineId::Unknown("test".into())).unwrap();
        let epoch = state.epoch();
        let writer = StateWriter::start(state).unwrap();
        let (outbox, rx) = Outbox::new();
        let stop = CancellationToken::new();
        let config = SenderConfig {
            relay: Some(RelayAddr::Unix(relay.path.clone())),
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(5),
            // Long: a resend that comes at once did not wait for the backoff.
            max_backoff: Duration::from_secs(30),
            agent: AgentInfo::default(),
            epoch,
            extensions: Vec::new(),
        };
        let task = tokio::spawn(sender::run(
            config,
            writer,
            rx,
            Metrics::new(),
            stop.clone(),
            Default::default(),
            None,
        ));
        Self {
            outbox,
            epoch,
            stop,
            task,
        }
    }

    /// Offers generation `generation` of an inventory of `packages`.
    fn offer(&self, generation: u64, packages: &[PackageRecord]) -> ReportId {
        let id = ReportId {
            epoch: self.epoch,
            generation,
        };
        let document = Document::new(packages.to_vec(), SystemFacts::default());
        let report = Report {
            id,
            content_hash: document.content_hash(),
            facts: ReportFacts::default(),
            body: ReportBody::Full(Payload::of_document(&document)),
        };
        self.outbox
            .offer(Arc::new(report), Some(Arc::new(document)));
        id
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

fn record(name: &str, version: &str) -> PackageRecord {
    PackageRecord {
        name: name.into(),
        version: version.into(),
        release: "1.el9".into(),
        arch: Some("x86_64".into()),
        sourcerpm: Some(format!("{name}-{version}-1.el9.src.rpm")),
        license: Some("MIT".into()),
        vendor: Some("guestwatch tests".into()),
        size: Some(12_345),
        installtime: Some(1_700_000_000),
        // Digests look random, as real ones do (a compressor cannot shrink them).
        sigmd5: Some(format!(
            "{:016x}{:016x}",
            mix(name, version, 1),
            mix(name, version, 2)
        )),
        ..PackageRecord::default()
    }
}

/// splitmix64 over the bytes of a name and version.
fn mix(name: &str, version: &str, salt: u64) -> u64 {
    let mut x = salt;
    for b in name.bytes().chain(version.bytes()) {
        x = (x ^ u64::from(b)).wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
    }
    x
}

fn inventory(n: usize) -> Vec<PackageRecord> {
    (0..n)
        .map(|i| record(&format!("pkg{i:04}"), "1.0"))
        .collect()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The delta's base, or `None` for a full report.
fn base_of(report: &Report) -> Option<ReportId> {
    match &report.body {
        ReportBody::Full(_) => None,
        ReportBody::Delta { base, .. } => Some(*base),
    }
}

#[tokio::test]
async fn a_delta_goes_to_a_relay_that_takes_it_against_the_acknowledged_report() {
    let dir = tempfile::tempdir().unwrap();
    let relay = FakeRelay::start(dir.path(), 16 << 20, ack);
    let agent = Agent::start(dir.path(), &relay);
    let mut packages = inventory(300);
    let first = agent.offer(1, &packages);
    until("the first report", || relay.bodies().len() == 1).await;
    packages.push(record("newcomer", "2.0"));
    let second = agent.offer(2, &packages);
    until("the second report", || relay.bodies().len() == 2).await;
    let bodies = relay.bodies();
    assert_eq!(base_of(&bodies[0]), None, "nothing to build a delta on yet");
    assert_eq!(bodies[1].id, second);
    assert_eq!(base_of(&bodies[1]), Some(first));
    // It is the one change, it applies to the base and gives the report's content.
    let ReportBody::Delta {
        base_hash, payload, ..
    } = &bodies[1].body
    else {
        unreachable!()
    };
    assert_eq!(*base_hash, bodies[0].content_hash);
    let delta = DeltaDocument::from_bytes(&payload.to_document(16 << 20).unwrap()).unwrap();
    assert_eq!(delta.added.len(), 1);
    assert!(delta.removed.is_empty() && delta.changed.is_empty());
    let base = Document::new(inventory(300), SystemFacts::default());
    let rebuilt = delta.apply(&base.packages).unwrap();
    assert_eq!(rebuilt.content_hash(), bodies[1].content_hash);
    assert!(
        payload.bytes.len() * 10 < bodies[0].body.payload().bytes.len(),
        "a one-package delta of {} bytes beside a full report of {}",
        payload.bytes.len(),
        bodies[0].body.payload().bytes.len()
    );
    agent.stop().await;
}

#[tokio::test]
async fn relays_without_deltas_get_full_reports() {
    for (version, features) in [(1u16, &["zstd"][..]), (2, &["zstd"][..])] {
        let dir = tempfile::tempdir().unwrap();
        let relay = FakeRelay::start(dir.path(), 16 << 20, ack);
        relay.set_protocol(version, features);
        let agent = Agent::start(dir.path(), &relay);
        let mut packages = inventory(100);
        agent.offer(1, &packages);
        until("the first report", || relay.bodies().len() == 1).await;
        packages[7].version = "1.1".into();
        agent.offer(2, &packages);
        until("the second report", || relay.bodies().len() == 2).await;
        for body in relay.bodies() {
            assert_eq!(base_of(&body), None, "version {version}, {features:?}");
        }
        agent.stop().await;
    }
}

#[tokio::test]
async fn need_full_brings_the_same_generation_whole_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let relay = FakeRelay::start(dir.path(), 16 << 20, |r: &Report| match &r.body {
        ReportBody::Delta { .. } => nack(r, NackReason::NeedFull),
        ReportBody::Full(_) => ack(r),
    });
    let agent = Agent::start(dir.path(), &relay);
    let mut packages = inventory(200);
    agent.offer(1, &packages);
    until("the first report", || relay.bodies().len() == 1).await;
    packages.retain(|p| p.name != "pkg0100");
    let asked = Instant::now();
    let second = agent.offer(2, &packages);
    until("the whole resend", || relay.bodies().len() == 3).await;
    let bodies = relay.bodies();
    assert_eq!((bodies[1].id, bodies[2].id), (second, second));
    assert!(base_of(&bodies[1]).is_some(), "the delta first");
    assert_eq!(base_of(&bodies[2]), None, "then whole");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the whole report waited {:?} (a backoff step?)",
        asked.elapsed()
    );
    // The whole report was acknowledged: it is the next delta's base.
    relay.set_answer(ack);
    packages.push(record("later", "1.0"));
    agent.offer(3, &packages);
    until("the third report", || relay.bodies().len() == 4).await;
    assert_eq!(base_of(&relay.bodies()[3]), Some(second));
    agent.stop().await;
}

#[tokio::test]
async fn a_delta_that_is_not_smaller_is_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let relay = FakeRelay::start(dir.path(), 16 << 20, ack);
    let agent = Agent::start(dir.path(), &relay);
    agent.offer(1, &inventory(50));
    until("the first report", || relay.bodies().len() == 1).await;
    // Every record changes: the delta carries the whole inventory and a list of keys.
    let replaced: Vec<PackageRecord> = (0..50)
        .map(|i| record(&format!("other{i:04}"), "9.0"))
        .collect();
    agent.offer(2, &replaced);
    until("the second report", || relay.bodies().len() == 2).await;
    assert_eq!(base_of(&relay.bodies()[1]), None);
    agent.stop().await;
}

#[tokio::test]
async fn unanswered_reports_are_no_base() {
    let dir = tempfile::tempdir().unwrap();
    // The first report is never answered; the connection closes.
    let relay = FakeRelay::start(dir.path(), 16 << 20, |_: &Report| Reply::Close);
    let agent = Agent::start(dir.path(), &relay);
    let mut packages = inventory(100);
    agent.offer(1, &packages);
    until("the first report", || !relay.bodies().is_empty()).await;
    relay.set_answer(ack);
    packages.push(record("newcomer", "1.0"));
    agent.offer(2, &packages);
    until("the second report", || {
        relay.bodies().iter().any(|b| b.id.generation == 2)
    })
    .await;
    for body in relay.bodies() {
        assert_eq!(base_of(&body), None, "generation 1 was never acknowledged");
    }
    agent.stop().await;
}
