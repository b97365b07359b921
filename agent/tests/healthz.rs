//! The daemon's `/healthz` tells the truth about its state directory: 503 with the reason
//! while it cannot be written, 200 again once it can.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn database() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/rpmdb/go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite")
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Sets or clears the immutable attribute; false where the file system or tool cannot.
fn immutable(path: &Path, on: bool) -> bool {
    Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .arg(path)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn healthz_reports_an_unwritable_state_directory() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let log = work.path().join("agent.log");
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_guestwatch-agent"))
            .arg("run")
            .arg("--dbpath")
            .arg(database())
            .args(["--detector", "periodic", "--metrics", "127.0.0.1:0"])
            .arg("--relay")
            .arg(format!(
                "unix:{}",
                work.path().join("no-relay.sock").display()
            ))
            .arg("--state")
            .arg(&state)
            .env("GUESTWATCH_MACHINE_ID_FILE", work.path().join("machine-id"))
            .env("GUESTWATCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = wait_for("the metrics address in the log", || {
        let text = std::fs::read_to_string(&log).ok()?;
        let rest = text.split("metrics on http://").nth(1)?;
        Some(rest.split('/').next()?.to_owned())
    });
    // The startup report is on disk (no relay takes it): no state write comes after it.
    wait_for("the startup report on disk", || {
        state.join("pending").exists().then_some(())
    });
    // The periodic detector was asked for: healthy.
    let ok = get(&addr, "/healthz");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    if !immutable(&state, true) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to chattr +i its temporary directories"
        );
        eprintln!("SKIPPED: chattr +i is not available here");
        return;
    }
    let down = get(&addr, "/healthz");
    let up_again = immutable(&state, false);
    assert!(up_again, "chattr -i failed");
    assert!(down.starts_with("HTTP/1.1 503"), "{down}");
    assert!(down.contains("not writable"), "{down}");
    let ok = get(&addr, "/healthz");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    drop(daemon);
}
