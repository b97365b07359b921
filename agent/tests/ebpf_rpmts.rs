//! The `rpmtsRun` probes on the real kernel with real rpm transactions (needs root and the
//! embedded BPF object; CI has both).

use std::time::Duration;

mod common;

use common::bpf_prerequisites;
use guestwatch_agent::bpf::{BpfError, BpfRecord, ProbeOptions, Probes, TxRecord};
use guestwatch_agent_common::EventKind;
use guestwatch_testkit::{PackageSpec, RpmDb, build_packages};

fn load_or_skip() -> Option<Probes> {
    match Probes::load(&ProbeOptions::default()) {
        Ok(probes) => Some(probes),
        // The one acceptable skip: the kernel refuses the program type.
        Err(e @ BpfError::Program { .. }) => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("loading the rpmtsRun probes failed: {e}"),
    }
}

async fn collect_until(
    probes: &mut Probes,
    done: impl Fn(&TxRecord) -> bool,
    grace: Duration,
) -> Vec<TxRecord> {
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let record = tokio::time::timeout_at(deadline, probes.next())
            .await
            .expect("no transaction-end event within 20 s")
            .expect("reading the ring buffer");
        let BpfRecord::Tx(record) = record else {
            continue;
        };
        let finished = done(&record);
        records.push(record);
        if finished {
            break;
        }
    }
    // Anything else these processes emitted has been submitted by now; give it a moment to land.
    while let Ok(Ok(record)) = tokio::time::timeout(grace, probes.next()).await {
        if let BpfRecord::Tx(record) = record {
            records.push(record);
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_install_gives_exactly_one_transaction_end_and_a_query_gives_none() {
    if !bpf_prerequisites() {
        return;
    }
    let Some(mut probes) = load_or_skip() else {
        return;
    };
    assert!(!probes.libraries().is_empty());

    let work = tempfile::tempdir().unwrap();
    let rpms = build_packages(
        &[PackageSpec::new("gw-probe-test", "1.0", "1")],
        work.path(),
    )
    .unwrap();
    let db = RpmDb::temp().unwrap();

    // A read-only query first: it must not look like a transaction.
    let query = db.command(&["-qa"]).output().unwrap();
    assert!(query.status.success());
    let mut query_child = db.command(&["-qa"]).spawn().unwrap();
    let query_pid = query_child.id();
    assert!(query_child.wait().unwrap().success());

    let mut install = db.spawn_transaction("-i", &rpms).unwrap();
    let install_pid = install.id();
    let status = install.wait().unwrap();
    assert!(status.success(), "rpm -i failed");

    let records = collect_until(
        &mut probes,
        |r| r.kind == EventKind::TxEnd && r.tgid == install_pid,
        Duration::from_millis(300),
    )
    .await;

    let ends: Vec<&TxRecord> = records
        .iter()
        .filter(|r| r.tgid == install_pid && r.kind == EventKind::TxEnd)
        .collect();
    assert_eq!(
        ends.len(),
        1,
        "expected exactly one transaction end: {records:#?}"
    );
    let end = ends[0];
    assert_eq!(end.comm, "rpm");
    assert_eq!(end.ret, 0);
    assert!(end.start_ns > 0 && end.now_ns >= end.start_ns, "{end:?}");
    let starts = records
        .iter()
        .filter(|r| r.tgid == install_pid && r.kind == EventKind::TxStart)
        .count();
    assert_eq!(starts, 1, "{records:#?}");
    assert!(
        records.iter().all(|r| r.tgid != query_pid),
        "rpm -qa must not produce transaction events: {records:#?}"
    );
    println!(
        "rpmtsRun probe: pid {install_pid} comm {} ret {} took {} µs",
        end.comm,
        end.ret,
        (end.now_ns - end.start_ns) / 1000
    );
}
