//! `scan` and `watch` are filters: when the reader of their output goes away (`… | head -1`),
//! they stop quietly with status 0 — no message, no panic — even when stderr is the same
//! closed pipe (`… 2>&1 | head -1`).

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

fn database() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/rpmdb/go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite")
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

fn agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guestwatch-agent"));
    cmd.args(args)
        .arg("--dbpath")
        .arg(database())
        .stdin(Stdio::null());
    cmd
}

/// Waits for the child, killing it (and failing) if it does not end on its own.
fn finish(mut child: std::process::Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running with its output closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `args` with stdout closed and stderr captured: status 0 and nothing on stderr.
fn quiet_with_stdout_closed(args: &[&str]) {
    let mut child = agent(args)
        .env("GUESTWATCH_LOG", "error")
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = finish(child);
    assert!(status.success(), "{args:?}: {status}, stderr: {stderr}");
    assert_eq!(stderr, "", "{args:?} said something");
}

/// Runs `args` with stdout and stderr one closed pipe: status 0 (a panic would be 101).
fn quiet_with_both_closed(args: &[&str]) {
    let pipe = closed_pipe();
    let child = agent(args)
        .env("GUESTWATCH_LOG", "info")
        .stdout(pipe.try_clone().unwrap())
        .stderr(pipe)
        .spawn()
        .unwrap();
    let status = finish(child);
    assert!(status.success(), "{args:?}: {status}");
}

#[test]
fn scan_stops_quietly_when_its_reader_is_gone() {
    for format in ["packages", "claircore", "cyclonedx"] {
        quiet_with_stdout_closed(&["scan", "--format", format]);
        quiet_with_both_closed(&["scan", "--format", format]);
    }
}

#[test]
fn watch_stops_quietly_when_its_reader_is_gone() {
    let args = ["watch", "--detector", "periodic"];
    quiet_with_stdout_closed(&args);
    quiet_with_both_closed(&args);
}

#[test]
fn real_errors_still_fail_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_guestwatch-agent"))
        .args(["scan", "--dbpath", "/nonexistent/rpmdb"])
        .env("GUESTWATCH_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("guestwatch-agent: "), "{stderr}");
}
