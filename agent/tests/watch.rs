//! `guestwatch-agent watch` as a process: the JSON-lines interface, with real transactions.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{bpf_prerequisites, rpm_prerequisites};
use guestwatch_testkit::{PackageSpec, RpmDb, build_packages};
use serde_json::Value;

struct Watch {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn watch(dbpath: &Path, extra: &[&str]) -> Watch {
    let mut child = Command::new(env!("CARGO_BIN_EXE_guestwatch-agent"))
        .arg("watch")
        .arg("--dbpath")
        .arg(dbpath)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    Watch { child, lines }
}

impl Watch {
    fn next_matching(&self, what: &str, timeout: Duration, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if want(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("no {what} within {timeout:?}"),
            }
        }
    }

    fn drain(&self, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while let Ok(v) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(v);
        }
        out
    }
}

fn is_scan(v: &Value) -> bool {
    v["event"] == "scan"
}

fn added(v: &Value, name: &str) -> bool {
    v["changes"]["added"].as_array().is_some_and(|a| {
        a.iter()
            .any(|p| p.as_str().is_some_and(|p| p.starts_with(name)))
    })
}

#[test]
fn ebpf_scan_event_lists_the_install_with_attribution_and_queries_cause_nothing() {
    if !bpf_prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = RpmDb::temp().unwrap();
    let w = watch(db.path(), &["--detector", "ebpf"]);
    let detector = w.next_matching("detector line", Duration::from_secs(20), |v| {
        v["event"] == "detector"
    });
    assert_eq!(detector["mode"], "ebpf", "{detector}");
    w.next_matching("startup scan", Duration::from_secs(20), |v| {
        is_scan(v) && v["trigger"]["kind"] == "startup"
    });

    let rpms = build_packages(&[PackageSpec::new("watch-ebpf", "1.0", "1")], work.path()).unwrap();
    let mut child = db.spawn_transaction("-i", &rpms).unwrap();
    let pid = child.id();
    assert!(child.wait().unwrap().success());
    let scan = w.next_matching("scan of the install", Duration::from_secs(10), |v| {
        is_scan(v) && added(v, "watch-ebpf")
    });
    assert_eq!(scan["trigger"]["kind"], "transaction", "{scan}");
    assert_eq!(scan["trigger"]["attribution"]["comm"], "rpm");
    assert_eq!(scan["trigger"]["attribution"]["pid"], pid);
    assert_eq!(scan["packages"], 1);

    let query = db.command(&["-qa"]).stdout(Stdio::null()).spawn().unwrap();
    let query_pid = query.id();
    assert!(query.wait_with_output().unwrap().status.success());
    // Other rpm processes on the machine (parallel tests) may cause scans; this one must not.
    let after = w.drain(Duration::from_secs(3));
    let caused = |v: &&Value| {
        v["trigger"]["attribution"]["pid"] == query_pid || v["attribution"]["pid"] == query_pid
    };
    assert!(
        after.iter().filter(caused).count() == 0,
        "rpm -qa must cause no trigger or scan: {after:#?}"
    );
    assert!(
        after
            .iter()
            .filter(|v| is_scan(v))
            .all(|v| v["changed"] == false),
        "nothing changed, so no scan may report a change: {after:#?}"
    );

    // Another install: its scan is incremental and decodes only the new header.
    let rpms = build_packages(
        &[PackageSpec::new("watch-ebpf-two", "1.0", "1")],
        &work.path().join("two"),
    )
    .unwrap();
    assert!(
        db.spawn_transaction("-i", &rpms)
            .unwrap()
            .wait()
            .unwrap()
            .success()
    );
    let scan = w.next_matching("scan of the second install", Duration::from_secs(10), |v| {
        is_scan(v) && added(v, "watch-ebpf-two")
    });
    assert_eq!(scan["packages"], 2, "{scan}");
    assert_eq!(
        scan["decoding"],
        serde_json::json!({"incremental": true, "decoded": 1, "reused": 1}),
        "{scan}"
    );
}

#[test]
fn inotify_mode_detects_changes_and_survives_the_directory_being_recreated() {
    if !rpm_prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = RpmDb::temp().unwrap();
    let w = watch(db.path(), &["--detector", "inotify"]);
    let detector = w.next_matching("detector line", Duration::from_secs(20), |v| {
        v["event"] == "detector"
    });
    assert_eq!(detector["mode"], "inotify");
    w.next_matching("startup scan", Duration::from_secs(20), is_scan);

    db.install(
        &build_packages(
            &[PackageSpec::new("watch-inotify", "1.0", "1")],
            work.path(),
        )
        .unwrap(),
    )
    .unwrap();
    let scan = w.next_matching("scan of the install", Duration::from_secs(10), |v| {
        is_scan(v) && added(v, "watch-inotify")
    });
    assert_eq!(scan["trigger"]["kind"], "inotify");

    std::fs::remove_dir_all(db.path()).unwrap();
    let again = RpmDb::at(db.path()).unwrap();
    again
        .install(
            &build_packages(&[PackageSpec::new("watch-reborn", "1.0", "1")], work.path()).unwrap(),
        )
        .unwrap();
    w.next_matching(
        "scan in the recreated directory",
        Duration::from_secs(10),
        |v| {
            is_scan(v)
                && v["packages"] == 1
                && v["changes"]["added"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|p| p.as_str().is_some_and(|p| p.starts_with("watch-reborn")))
                })
        },
    );
}

#[test]
fn two_hundred_back_to_back_transactions_give_few_scans_and_the_right_final_state() {
    if !rpm_prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = RpmDb::temp().unwrap();
    let specs: Vec<PackageSpec> = (0..200)
        .map(|i| PackageSpec::new(format!("storm-{i:03}"), "1.0", "1"))
        .collect();
    let rpms = build_packages(&specs, work.path()).unwrap();
    let w = watch(db.path(), &[]);
    w.next_matching("startup scan", Duration::from_secs(20), is_scan);
    let started = Instant::now();
    for rpm in &rpms {
        db.install(std::slice::from_ref(rpm)).unwrap();
    }
    let storm = started.elapsed();
    let seen = std::cell::RefCell::new(0usize);
    let last = w.next_matching(
        "a scan with all 200 packages",
        Duration::from_secs(30),
        |v| {
            if is_scan(v) {
                *seen.borrow_mut() += 1;
            }
            is_scan(v) && v["packages"] == 200
        },
    );
    let scans = seen.into_inner()
        + w.drain(Duration::from_secs(3))
            .iter()
            .filter(|v| is_scan(v))
            .count();
    println!(
        "200 transactions in {storm:.1?}: {scans} scans; final scan: {}",
        last["trigger"]
    );
    assert_eq!(last["changed"], true);
    // The storm limit (60/min, bursts of 10) bounds the scans whatever the detector.
    let bound = 10 + (storm.as_secs_f64() + 5.0).ceil() as usize;
    assert!(
        scans <= bound,
        "{scans} scans after the storm (bound {bound})"
    );
}
