//! Shared by the detection benchmarks: `guestwatch-agent watch` as a process with
//! timestamped JSON lines, and another database seeing transactions all along.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use guestwatch_testkit::{PackageSpec, RpmDb, build_packages};
use serde_json::Value;

/// A running `watch`, its lines with the instant each arrived.
pub struct Watch {
    child: Child,
    pub lines: mpsc::Receiver<(Instant, Value)>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Watch {
    /// `watch --dbpath DB --detector D <extra>`, after its first scan.
    pub fn start(db: &Path, detector: &str, extra: &[&str]) -> Option<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_guestwatch-agent"))
            .args(["watch", "--detector", detector, "--dbpath"])
            .arg(db)
            .args(extra)
            .env(
                "GUESTWATCH_LOG",
                std::env::var("GUESTWATCH_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let started = Instant::now();
            let debug = std::env::var_os("GUESTWATCH_BENCH_DEBUG").is_some();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if debug {
                    eprintln!("RAW {:?} {line}", started.elapsed());
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send((Instant::now(), v));
                }
            }
        });
        let w = Self { child, lines };
        w.until(Duration::from_secs(30), |v| v["event"] == "scan")?;
        Some(w)
    }

    /// The first line matching `want` within `timeout`.
    pub fn until(
        &self,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Option<(Instant, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let (at, v) = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            if want(&v) {
                return Some((at, v));
            }
        }
    }

    /// Every line that arrives within `window`.
    pub fn drain(&self, window: Duration) -> Vec<(Instant, Value)> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(line);
        }
        out
    }
}

/// Whether a `scan` line's changes name package `name` as added (`install`) or removed.
pub fn scan_changes(v: &Value, name: &str, install: bool) -> bool {
    let key = if install { "added" } else { "removed" };
    v["event"] == "scan"
        && v["changes"][key].as_array().is_some_and(|a| {
            a.iter().any(|p| {
                p.as_str()
                    .is_some_and(|p| p.strip_prefix(name).is_some_and(|r| r.starts_with('-')))
            })
        })
}

/// Every attribution a `scan` or `trigger` line carries.
pub fn attributions(v: &Value) -> Vec<&Value> {
    let mut all: Vec<&Value> = v["transactions"].as_array().into_iter().flatten().collect();
    all.extend(v["tampers"].as_array().into_iter().flatten());
    for a in [&v["trigger"]["attribution"], &v["attribution"]] {
        if a.is_object() {
            all.push(a);
        }
    }
    all
}

/// Install/erase of one package on another database, in a loop.
pub struct Noise {
    stop: Arc<AtomicBool>,
    pub pids: Arc<Mutex<Vec<u32>>>,
    /// The other database: an attribution naming it (in its command line) is cross-talk.
    pub db: std::path::PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl Noise {
    pub fn start(work: &Path, pause: Duration) -> Option<Self> {
        let rpms = build_packages(
            &[PackageSpec::new("noise-elsewhere", "1.0", "1")],
            &work.join("noise-rpms"),
        )
        .ok()?;
        let db = RpmDb::at(work.join("noise-db")).ok()?;
        let path = db.path().to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let pids = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, pids) = (stop.clone(), pids.clone());
            move || {
                let mut install = true;
                while !stop.load(Ordering::SeqCst) {
                    let child = if install {
                        db.spawn_transaction("-i", &rpms)
                    } else {
                        db.command(&["-e", "noise-elsewhere"])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .map_err(Into::into)
                    };
                    if let Ok(mut child) = child {
                        if let Ok(mut p) = pids.lock() {
                            p.push(child.id());
                        }
                        let _ = child.wait();
                    }
                    install = !install;
                    std::thread::sleep(pause);
                }
            }
        });
        Some(Self {
            stop,
            pids,
            db: path,
            thread: Some(thread),
        })
    }

    pub fn count(&self) -> usize {
        self.pids.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Whether `attribution` is one of this database's transactions (pids are reused, so by
    /// its command line, which names the database).
    pub fn owns(&self, attribution: &Value) -> bool {
        let db = self.db.display().to_string();
        attribution["cmdline"]
            .as_array()
            .is_some_and(|args| args.iter().any(|a| a.as_str() == Some(db.as_str())))
            || attribution["database"]
                .as_str()
                .is_some_and(|d| d.starts_with(&db))
    }
}

impl Drop for Noise {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One transaction of a series: install or erase `name`, with its rpm's pid and exit instant.
pub struct Done {
    pub name: String,
    pub install: bool,
    pub pid: u32,
    pub exited: Instant,
}

/// What a series of transactions on the watched database came to.
#[derive(Default)]
pub struct Outcome {
    pub performed: usize,
    /// A scan reported the change within the window.
    pub detected: usize,
    /// ... and listed the right process among its transactions.
    pub attributed: usize,
    /// Scans or triggers attributed to a process of the other database.
    pub crosstalk: usize,
    /// rpm's exit to the scan reporting the change (zero when the scan came first).
    pub latencies: Vec<Duration>,
}

/// Matches each transaction in `done` with the scan lines in `lines` that report its change.
pub fn judge(
    done: &[Done],
    lines: &[(Instant, Value)],
    noise: &Noise,
    window: Duration,
    expect_attribution: bool,
) -> Outcome {
    let mut out = Outcome {
        performed: done.len(),
        ..Outcome::default()
    };
    for d in done {
        if std::env::var_os("GUESTWATCH_BENCH_DEBUG").is_some() {
            for (at, v) in lines {
                if at.saturating_duration_since(d.exited) < Duration::from_secs(1)
                    && *at + Duration::from_millis(50) >= d.exited
                {
                    eprintln!(
                        "    {:?} {} {} changed={} dur={} {:?}/{:?}",
                        at.saturating_duration_since(d.exited),
                        v["event"],
                        if v["event"] == "trigger" {
                            &v["detail"]
                        } else {
                            &v["trigger"]["detail"]
                        },
                        v["changed"],
                        v["duration_ms"],
                        v["changes"]["added"],
                        v["changes"]["removed"]
                    );
                }
            }
        }
        let Some((at, scan)) = lines
            .iter()
            .find(|(_, v)| scan_changes(v, &d.name, d.install))
        else {
            continue;
        };
        let latency = at.saturating_duration_since(d.exited);
        if std::env::var_os("GUESTWATCH_BENCH_DEBUG").is_some() {
            eprintln!(
                "{} {} pid {}: {:?} {}",
                if d.install { "install" } else { "erase" },
                d.name,
                d.pid,
                latency,
                scan["trigger"]["detail"]
            );
        }
        if latency > window {
            continue;
        }
        out.detected += 1;
        out.latencies.push(latency);
        let listed = attributions(scan)
            .iter()
            .any(|a| a["pid"].as_u64() == Some(u64::from(d.pid)));
        if listed || !expect_attribution {
            out.attributed += 1;
        }
    }
    out.crosstalk = lines
        .iter()
        .filter(|(_, v)| attributions(v).into_iter().any(|a| noise.owns(a)))
        .count();
    out.latencies.sort();
    out
}
