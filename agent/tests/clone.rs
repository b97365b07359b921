//! A state directory copied to another machine (a VM cloned from an image) starts a new epoch
//! there: the daemon binds its epoch to the machine-id, says why in `Hello`, and never sends
//! the other machine's pending report.

mod fake_relay;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fake_relay::{FakeRelay, ack, nack};
use guestwatch_protocol::NackReason;

fn database() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/rpmdb/go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite")
}

struct Daemon(Child);

impl Daemon {
    fn start(work: &Path, name: &str, state: &Path, machine_id: &Path, relay: &Path) -> Self {
        let log = std::fs::File::create(work.join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_guestwatch-agent"))
            .arg("run")
            .arg("--dbpath")
            .arg(database())
            .arg("--detector")
            .arg("periodic")
            .arg("--relay")
            .arg(format!("unix:{}", relay.display()))
            .arg("--state")
            .arg(state)
            .env("GUESTWATCH_MACHINE_ID_FILE", machine_id)
            .env("GUESTWATCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn extension<'a>(hello: &'a guestwatch_protocol::Hello, key: &str) -> Option<&'a str> {
    hello
        .extensions
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloned_state_directory_starts_a_new_epoch() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // The image's relay never takes the report: it stays pending in the state directory.
    let relay = FakeRelay::start(w, 1 << 20, |r| nack(r, NackReason::SinkUnavailable));
    let (id_a, id_b) = (w.join("machine-id-a"), w.join("machine-id-b"));
    std::fs::write(&id_a, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&id_b, "fedcba9876543210fedcba9876543210\n").unwrap();
    let (state_a, state_b) = (w.join("state-a"), w.join("state-b"));

    let image = Daemon::start(w, "a", &state_a, &id_a, &relay.path);
    until("the image's report", || !relay.reports().is_empty()).await;
    until("its pending report on disk", || {
        state_a.join("pending").exists()
    })
    .await;
    drop(image);
    let (epoch_a, reason_a) = {
        let seen = relay.seen.lock().unwrap();
        let hello = &seen.hellos[0];
        (
            hello.epoch,
            extension(hello, "epoch_reason").map(str::to_owned),
        )
    };
    assert_eq!(reason_a.as_deref(), Some("new installation"));

    // The clone: the same state directory, another machine-id.
    copy_dir(&state_a, &state_b);
    relay.set_answer(ack);
    let hellos_before = relay.connections();
    let reports_before = relay.reports().len();
    let clone = Daemon::start(w, "b", &state_b, &id_b, &relay.path);
    until("the clone's report", || {
        relay.reports().len() > reports_before
    })
    .await;
    until("the clone's acknowledgement", || {
        state_b.join("acked").exists()
    })
    .await;
    drop(clone);
    let (clone_hello, clone_reports) = {
        let seen = relay.seen.lock().unwrap();
        let hello = seen.hellos[hellos_before].clone();
        let reports: Vec<_> = seen.reports[reports_before..]
            .iter()
            .map(|(_, id)| *id)
            .collect();
        (hello, reports)
    };
    assert_ne!(
        clone_hello.epoch, epoch_a,
        "the clone kept the image's epoch"
    );
    assert_eq!(
        extension(&clone_hello, "epoch_reason"),
        Some("machine-id changed")
    );
    // Only the clone's own report, generations from 1: the image's pending one is discarded.
    assert!(
        clone_reports.iter().all(|id| id.epoch == clone_hello.epoch),
        "{clone_reports:?}"
    );
    assert_eq!(clone_reports[0].generation, 1);
    let log = std::fs::read_to_string(w.join("b.log")).unwrap();
    assert!(log.contains("belongs to another machine"), "{log}");

    // Both keep their epochs across restarts, and the clone still says why it has its own.
    // (Without the acknowledgement the clone has a report to send, so it connects.)
    std::fs::remove_file(state_b.join("acked")).unwrap();
    let hellos_before = relay.connections();
    let clone = Daemon::start(w, "b2", &state_b, &id_b, &relay.path);
    until("the clone's second connection", || {
        relay.connections() > hellos_before
    })
    .await;
    drop(clone);
    let hellos_before = relay.connections();
    let image = Daemon::start(w, "a2", &state_a, &id_a, &relay.path);
    until("the image's second connection", || {
        relay.connections() > hellos_before
    })
    .await;
    drop(image);
    let seen = relay.seen.lock().unwrap();
    let n = seen.hellos.len();
    let (restarted_clone, restarted_image) = (&seen.hellos[n - 2], &seen.hellos[n - 1]);
    assert_eq!(restarted_clone.epoch, clone_hello.epoch);
    assert_eq!(
        extension(restarted_clone, "epoch_reason"),
        Some("machine-id changed")
    );
    assert_eq!(restarted_image.epoch, epoch_a);
}
