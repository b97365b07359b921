//! Detection on the real kernel with real rpm transactions: eBPF transaction triggers with
//! attribution, the tamper signal, inotify, and the fallback.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{bpf_prerequisites, rpm_prerequisites};
use guestwatch_agent::bpf::TamperStatus;
use guestwatch_agent::detect::{
    Detector, DetectorChoice, DetectorConfig, DetectorMode,
    trigger::{Trigger, TriggerKind},
};
use guestwatch_testkit::{PackageSpec, RpmDb, build_packages};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Running {
    triggers: mpsc::Receiver<Trigger>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn start(
    choice: DetectorChoice,
    dbdir: &Path,
    disable_bpf: Option<&str>,
) -> (Running, guestwatch_agent::detect::DetectorStatus) {
    let detector = Detector::start(&DetectorConfig {
        choice,
        dbdir: dbdir.to_path_buf(),
        disable_bpf: disable_bpf.map(str::to_owned),
        rediscover: None,
        root: None,
        attribution: Default::default(),
        on_ignored: None,
    })
    .expect("detector starts");
    let status = detector.status().clone();
    let (tx, rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    tokio::spawn(detector.run(tx, stop.clone()));
    (Running { triggers: rx, stop }, status)
}

/// Waits for a trigger matching `want`, ignoring others (named in the failure message).
async fn wait_for(running: &mut Running, what: &str, want: impl Fn(&Trigger) -> bool) -> Trigger {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut others = Vec::new();
    loop {
        let Ok(trigger) = tokio::time::timeout_at(deadline, running.triggers.recv()).await else {
            panic!("no {what} trigger within 10 s; saw {others:#?}");
        };
        let trigger = trigger.expect("detector stopped");
        if want(&trigger) {
            return trigger;
        }
        others.push((trigger.kind, trigger.detail));
    }
}

async fn no_trigger(running: &mut Running, within: Duration, want: impl Fn(&Trigger) -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(trigger)) = tokio::time::timeout_at(deadline, running.triggers.recv()).await {
        assert!(!want(&trigger), "unexpected trigger {trigger:#?}");
    }
}

fn package(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    build_packages(&[PackageSpec::new(name, "1.0", "1")], dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_attributes_transactions_and_flags_tampering() {
    if !bpf_prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = RpmDb::temp().unwrap();
    let (mut running, status) = start(DetectorChoice::Ebpf, db.path(), None);
    assert_eq!(status.mode, DetectorMode::Ebpf);
    assert!(!status.libraries.is_empty());
    let tamper_works = matches!(status.tamper, TamperStatus::Tracepoints { .. });
    if !tamper_works {
        // The one allowed skip: the kernel refused the tracepoint programs.
        eprintln!("SKIPPED (tamper part): {}", status.tamper);
    }
    if let TamperStatus::Tracepoints { fentry: Err(why) } = &status.tamper {
        // These machines refuse fentry; the agent must say so and carry on with tracepoints.
        assert!(why.contains("fentry"), "{why}");
        println!("fentry variant refused as expected here: {why}");
    }

    // A real install: one transaction trigger attributed to this rpm process.
    let rpms = package(work.path(), "gw-detect-ebpf");
    let mut child = db.spawn_transaction("-i", &rpms).unwrap();
    let pid = child.id();
    assert!(child.wait().unwrap().success());
    let trigger = wait_for(&mut running, "transaction", |t| {
        t.kind == TriggerKind::Transaction && t.attribution.as_ref().is_some_and(|a| a.pid == pid)
    })
    .await;
    let who = trigger.attribution.unwrap();
    assert_eq!(who.comm, "rpm");
    assert_eq!(who.return_code, Some(0));
    assert_eq!(who.uid, 0);
    assert!(
        who.exe.as_deref().is_some_and(|e| e.ends_with("/rpm")),
        "{who:?}"
    );
    assert!(who.started_at.is_some() && who.ended_at >= who.started_at);
    assert!(who.library.as_deref().is_some_and(|l| l.contains("librpm")));

    // A read-only query is not a transaction and no tampering. (Other tests and other rpm
    // users on the machine may run transactions meanwhile: only this process counts.)
    let query = db
        .command(&["-qa"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let query_pid = query.id();
    assert!(query.wait_with_output().unwrap().status.success());
    no_trigger(&mut running, Duration::from_millis(500), |t| {
        t.attribution.as_ref().is_some_and(|a| a.pid == query_pid)
    })
    .await;

    if !tamper_works {
        return;
    }
    // A shell appending to a database file by absolute path.
    let target = db.path().join("Packages");
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!("echo tampered >> '{}'", target.display()))
        .spawn()
        .unwrap();
    let sh_pid = sh.id();
    assert!(sh.wait_with_output().unwrap().status.success());
    let tamper = wait_for(&mut running, "tamper (write)", |t| {
        t.kind == TriggerKind::Tamper && t.attribution.as_ref().is_some_and(|a| a.pid == sh_pid)
    })
    .await;
    let who = tamper.attribution.unwrap();
    assert_eq!(who.comm, "sh");
    assert_eq!(who.operation.as_deref(), Some("write"));
    assert_eq!(who.paths, vec![target.display().to_string()]);

    // A relative path from inside the directory, and a rename.
    let sh = Command::new("sh")
        .arg("-c")
        .arg("echo x > Index.db && mv Index.db Index.db.moved")
        .current_dir(db.path())
        .spawn()
        .unwrap();
    let sh_pid = sh.id();
    assert!(sh.wait_with_output().unwrap().status.success());
    let tamper = wait_for(&mut running, "tamper (relative write)", |t| {
        t.kind == TriggerKind::Tamper && t.attribution.as_ref().is_some_and(|a| a.pid == sh_pid)
    })
    .await;
    assert_eq!(
        tamper.attribution.unwrap().paths,
        vec![db.path().join("Index.db").display().to_string()]
    );
    let renamed = wait_for(&mut running, "tamper (rename)", |t| {
        t.kind == TriggerKind::Tamper
            && t.attribution
                .as_ref()
                .is_some_and(|a| a.comm == "mv" && a.operation.as_deref() == Some("rename"))
    })
    .await;
    assert!(renamed.detail.unwrap().contains("Index.db"));

    // Short-lived processes are often gone before /proc can say which directory their
    // relative paths were in: the kernel identified it when the call was made (without BTF,
    // inotify confirms it). Every one must still be attributed.
    let mut waiting = std::collections::HashMap::new();
    for i in 0..20 {
        let (from, to) = if i % 2 == 0 {
            ("Index.db.moved", "Index.db")
        } else {
            ("Index.db", "Index.db.moved")
        };
        let mut mv = Command::new("mv")
            .args([from, to])
            .current_dir(db.path())
            .spawn()
            .unwrap();
        waiting.insert(mv.id(), db.path().join(to).display().to_string());
        assert!(mv.wait().unwrap().success());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut through_inotify = 0;
    while !waiting.is_empty() {
        let t = tokio::time::timeout_at(deadline, running.triggers.recv())
            .await
            .unwrap_or_else(|_| panic!("renames by {:?} never attributed", waiting.keys()))
            .expect("detector stopped");
        let Some(who) = t.attribution.filter(|_| t.kind == TriggerKind::Tamper) else {
            continue;
        };
        if let Some(to) = waiting.remove(&who.pid) {
            assert_eq!(who.operation.as_deref(), Some("rename"));
            assert!(who.paths.contains(&to), "{:?} lacks {to}", who.paths);
            if t.detail.is_some_and(|d| d.contains("inotify confirmed")) {
                through_inotify += 1;
            }
        }
    }
    println!(
        "20 short-lived relative renames attributed, {through_inotify} located through inotify"
    );
    if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        // With the kernel's BTF the programs read each call's directory: no guessing needed.
        assert_eq!(
            through_inotify, 0,
            "located by the directory the kernel identified"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inotify_detects_transactions_and_survives_directory_replacement() {
    if !rpm_prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = RpmDb::temp().unwrap();
    let (mut running, status) = start(DetectorChoice::Inotify, db.path(), None);
    assert_eq!(status.mode, DetectorMode::Inotify);

    db.install(&package(work.path(), "gw-detect-inotify"))
        .unwrap();
    let trigger = wait_for(&mut running, "inotify", |t| t.kind == TriggerKind::Inotify).await;
    assert!(trigger.detail.is_some());

    // Delete the whole database directory and create a new one in its place.
    std::fs::remove_dir_all(db.path()).unwrap();
    wait_for(&mut running, "directory gone", |t| {
        t.detail.as_deref() == Some("database directory disappeared")
    })
    .await;
    let again = RpmDb::at(db.path()).unwrap();
    again
        .install(&package(work.path(), "gw-detect-inotify-2"))
        .unwrap();
    wait_for(&mut running, "change in the new directory", |t| {
        t.kind == TriggerKind::Inotify
            && t.detail
                .as_deref()
                .is_some_and(|d| d.contains("rpmdb.sqlite") || d.contains(".rpm.lock"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_inotify_and_says_why() {
    if !rpm_prerequisites() {
        return;
    }
    let db = RpmDb::temp().unwrap();
    let (_running, status) = start(DetectorChoice::Auto, db.path(), Some("test switch"));
    assert_eq!(status.mode, DetectorMode::Inotify);
    let why = status.bpf_unavailable.expect("a reason");
    assert!(why.contains("test switch"), "{why}");
}

/// A scratch directory, a database and the eBPF detector with its tamper programs on it;
/// `None` (having said why) where BPF cannot run or the kernel refused the tamper programs.
fn start_tamper_detection() -> Option<(tempfile::TempDir, RpmDb, Running)> {
    if !bpf_prerequisites() {
        return None;
    }
    let work = tempfile::tempdir().unwrap();
    let db = RpmDb::temp().unwrap();
    let (running, status) = start(DetectorChoice::Ebpf, db.path(), None);
    if !matches!(status.tamper, TamperStatus::Tracepoints { .. }) {
        eprintln!(
            "SKIPPED: the kernel refused the tamper programs: {}",
            status.tamper
        );
        return None;
    }
    Some((work, db, running))
}

/// `/usr/bin/python3` with librpm's bindings (python3-rpm, which dnf depends on).
fn python_rpm() -> Command {
    Command::new("/usr/bin/python3")
}

/// A short-lived process that tampers through a directory descriptor only (its working
/// directory is elsewhere), with two files, and exits at once.
const DIRFD_TAMPER: &str = r#"
import os, sys
d = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
os.chdir("/")
fd = os.open("Packages", os.O_WRONLY | os.O_APPEND, dir_fd=d)
os.write(fd, b"tampered\n")
os.close(fd)
os.rename("Index.db", "Index.db.gone", src_dir_fd=d, dst_dir_fd=d)
os.close(d)
"#;

/// Runs a transaction whose callback blocks inside `rpmtsRun` until the test kills it.
const BLOCKED_TRANSACTION: &str = r#"
import os, sys, time, rpm
rpm.addMacro("_dbpath", sys.argv[1])
ts = rpm.TransactionSet()
ts.setVSFlags(rpm._RPMVSF_NOSIGNATURES | rpm._RPMVSF_NODIGESTS)
ts.setFlags(rpm.RPMTRANS_FLAG_JUSTDB)
fd = os.open(sys.argv[2], os.O_RDONLY)
ts.addInstall(ts.hdrFromFdno(fd), sys.argv[2], "i")
os.close(fd)
ts.check(); ts.order()
def callback(what, amount, total, key, data):
    if what == rpm.RPMCALLBACK_INST_OPEN_FILE:
        print("inside", flush=True)
        time.sleep(600)
ts.run(callback, "")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_relative_tampering_and_a_killed_transaction_leave_detection_whole() {
    let Some((work, db, mut running)) = start_tamper_detection() else {
        return;
    };
    std::fs::write(db.path().join("Packages"), b"").unwrap();
    std::fs::write(db.path().join("Index.db"), b"").unwrap();
    let dir = db.path().canonicalize().unwrap();

    // Through a directory descriptor, by a process gone before userspace looks: located by the
    // directory the kernel identified, both files in the one process's records.
    let py = Command::new("python3")
        .args(["-c", DIRFD_TAMPER])
        .arg(db.path())
        .status()
        .unwrap();
    assert!(py.success());
    let mut seen: Vec<(String, Vec<String>)> = Vec::new();
    while seen.len() < 2 {
        let t = wait_for(&mut running, "dirfd tampering", |t| {
            t.kind == TriggerKind::Tamper
                && t.attribution
                    .as_ref()
                    .is_some_and(|a| a.comm.starts_with("python"))
        })
        .await;
        assert!(
            !t.detail
                .as_deref()
                .unwrap_or("")
                .contains("inotify confirmed"),
            "located by the kernel, not by guessing: {t:?}"
        );
        let who = t.attribution.unwrap();
        seen.push((who.operation.unwrap_or_default(), who.paths));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "rename".to_owned(),
                vec![
                    dir.join("Index.db").display().to_string(),
                    dir.join("Index.db.gone").display().to_string()
                ]
            ),
            (
                "write".to_owned(),
                vec![dir.join("Packages").display().to_string()]
            ),
        ]
    );

    // A transaction killed inside rpmtsRun.
    let rpms = package(work.path(), "gw-killed");
    let mut blocked = python_rpm()
        .args(["-c", BLOCKED_TRANSACTION])
        .arg(db.path())
        .arg(&rpms[0])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(blocked.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "inside", "the transaction is running");
    blocked.kill().unwrap();
    blocked.wait().unwrap();

    // Nothing stale is left: tampering is still recorded...
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo x >> '{}'",
            db.path().join("Packages").display()
        ))
        .spawn()
        .unwrap();
    let sh_pid = sh.id();
    assert!(sh.wait_with_output().unwrap().status.success());
    wait_for(&mut running, "tamper after the killed transaction", |t| {
        t.kind == TriggerKind::Tamper && t.attribution.as_ref().is_some_and(|a| a.pid == sh_pid)
    })
    .await;
    // ...and the inotify safety net still reports a change no probe explains: a write through
    // a descriptor the writing process inherited (the probes follow descriptors per process).
    let sh = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3>>"$1"; (echo inherited >&3)"#)
        .arg("sh")
        .arg(db.path().join("Packages"))
        .status()
        .unwrap();
    assert!(sh.success());
    wait_for(&mut running, "the inotify safety net", |t| {
        t.kind == TriggerKind::Inotify
            && t.detail.as_deref().is_some_and(|d| d.contains("Packages"))
    })
    .await;
}

/// A tamperer that writes, then points the descriptor it wrote through at another file and
/// stays alive: `/proc/<pid>/fd/<n>` names the other file by the time userspace reads the
/// record, so the written file is known only by the identity the kernel recorded at the write.
const REUSED_DESCRIPTOR: &str = r#"
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(fd, b"tampered\n")
os.close(fd)
other = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT)
assert other == fd, (other, fd)
time.sleep(1)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_attributed_after_the_descriptor_is_reused() {
    let Some((work, db, mut running)) = start_tamper_detection() else {
        return;
    };
    let target = db.path().join("Packages");
    std::fs::write(&target, b"").unwrap();
    let shown = vec![target.display().to_string()];
    let mut tamperers = vec![
        // dash restores its stdout from the saved copy after the builtin's redirection.
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo tampered >> "$1"; sleep 1"#)
            .arg("sh")
            .arg(&target)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        Command::new("sh")
            .arg("-c")
            .arg(r#"exec 3>>"$1"; echo tampered >&3; exec 3>/dev/null; sleep 1"#)
            .arg("sh")
            .arg(&target)
            .spawn()
            .unwrap(),
        Command::new("python3")
            .args(["-c", REUSED_DESCRIPTOR])
            .arg(&target)
            .arg(work.path().join("other"))
            .spawn()
            .unwrap(),
    ];
    let mut waiting: std::collections::HashSet<u32> = tamperers.iter().map(|c| c.id()).collect();
    while !waiting.is_empty() {
        let t = wait_for(&mut running, "tamper through a reused descriptor", |t| {
            t.kind == TriggerKind::Tamper
                && t.attribution
                    .as_ref()
                    .is_some_and(|a| waiting.contains(&a.pid))
        })
        .await;
        let who = t.attribution.unwrap();
        assert_eq!(who.paths, shown, "{who:?}");
        assert_eq!(who.operation.as_deref(), Some("write"));
        waiting.remove(&who.pid);
    }
    for mut child in tamperers.drain(..) {
        assert!(child.wait().unwrap().success());
    }

    // An open for appending that writes nothing, then a write to the restored stdout: the
    // descriptor number was the database's a moment ago, but the write went elsewhere, and
    // that is no tampering (nor is it when the shell is gone before the record is read).
    let sh = Command::new("sh")
        .arg("-c")
        .arg(r#": >> "$1"; echo not-the-database"#)
        .arg("sh")
        .arg(&target)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(sh.success());
    no_trigger(&mut running, Duration::from_millis(1500), |t| {
        t.kind == TriggerKind::Tamper
    })
    .await;
}
