//! Runs the scenarios against a booted guest: follows the console, drives each scenario's
//! host side in lockstep with the guest, enforces every deadline, and reports one result per
//! scenario.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use super::{
    console::{Event, Tail, parse},
    machine::{Control, Machine},
    scenarios::{HostEnv, HostSide, Scenario},
};
use crate::util::note;

/// From QEMU's start to `/init` running (TCG on a loaded 2-core machine included).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Between one scenario's end and the next one's begin.
const BETWEEN_TIMEOUT: Duration = Duration::from_secs(60);
/// What the host allows beyond a scenario's own (guest-enforced) timeout.
const SCENARIO_SLACK: Duration = Duration::from_secs(30);

pub enum Status {
    Pass,
    Fail(String),
}

pub struct Outcome {
    pub name: String,
    pub status: Status,
    pub took: Option<Duration>,
    pub details: Vec<String>,
}

impl Outcome {
    pub fn line(&self) -> String {
        let (word, reason) = match &self.status {
            Status::Pass => ("PASS", None),
            Status::Fail(r) => ("FAIL", Some(r.as_str())),
        };
        let took = self
            .took
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let mut text: Vec<&str> = reason.into_iter().collect();
        text.extend(self.details.iter().map(String::as_str));
        format!("{word} {:<15} {took:>7}  {}", self.name, text.join("; "))
    }

    pub fn failed(&self) -> bool {
        matches!(self.status, Status::Fail(_))
    }
}

pub struct RunOptions<'a> {
    pub relay_binary: PathBuf,
    /// Per-scenario host directories go under here.
    pub scratch: &'a Path,
    /// Print every guest console line.
    pub verbose: bool,
    /// The guest stays up after the scenarios until its shell exits.
    pub keep: bool,
}

pub struct RunResult {
    pub outcomes: Vec<Outcome>,
    pub boot: Option<Duration>,
}

/// The scenario currently running.
struct Active<'a> {
    scenario: &'a Scenario,
    host: Box<dyn HostSide>,
    env: HostEnv,
    started: Instant,
    /// Why the host side failed, if it did (the guest was told to abort).
    host_error: Option<String>,
    guest_failure: Option<String>,
    details: Vec<String>,
}

pub fn run(
    machine: &mut Machine,
    control: Control,
    scenarios: &[&Scenario],
    options: &RunOptions,
) -> RunResult {
    let mut tail = Tail::new(&machine.serial_log);
    let mut control = Some(control);
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut active: Option<Active> = None;
    let mut next = 0;
    let mut boot = None;
    let mut deadline = Instant::now() + BOOT_TIMEOUT;
    let mut waiting_for = String::from("the guest to boot");
    let mut done = false;

    'run: while !done {
        let lines = match tail.lines() {
            Ok(lines) => lines,
            Err(e) => {
                abandon(
                    &mut outcomes,
                    active.take(),
                    &scenarios[next..],
                    &format!("reading the serial log: {e}"),
                );
                break;
            }
        };
        for line in lines {
            let Some(event) = parse(&line) else {
                if options.verbose {
                    println!("    guest| {line}");
                }
                continue;
            };
            match event {
                Event::Init(uptime) => {
                    let took = machine.started.elapsed();
                    boot = Some(took);
                    note(&format!(
                        "guest /init running {:.1}s after QEMU started (guest uptime {uptime}s)",
                        took.as_secs_f64()
                    ));
                    deadline = Instant::now() + BETWEEN_TIMEOUT;
                    waiting_for = "the first scenario to begin".into();
                }
                Event::Begin(name) => {
                    let expected = scenarios.get(next).filter(|s| s.name == name);
                    let (Some(scenario), Some(control_channel)) = (expected, control.take()) else {
                        abandon(
                            &mut outcomes,
                            active.take(),
                            &scenarios[next..],
                            &format!("the guest began scenario '{name}' out of order"),
                        );
                        break 'run;
                    };
                    let scratch = options.scratch.join(scenario.name);
                    let _ = fs::remove_dir_all(&scratch);
                    let _ = fs::create_dir_all(&scratch);
                    let mut env = HostEnv {
                        uds: machine.uds.clone(),
                        scratch,
                        relay_binary: options.relay_binary.clone(),
                        line_at: Instant::now(),
                        scenario: scenario.name.to_owned(),
                        control: control_channel,
                    };
                    let mut host = (scenario.host)();
                    let host_error = host.begin(&mut env).err().map(|e| format!("host: {e:#}"));
                    let word = if host_error.is_some() {
                        "abort"
                    } else {
                        "begin"
                    };
                    let sent = env.release(word);
                    let mut current = Active {
                        scenario,
                        host,
                        env,
                        started: Instant::now(),
                        host_error,
                        guest_failure: None,
                        details: Vec::new(),
                    };
                    if let Err(e) = sent {
                        current.host_error.get_or_insert(format!("host: {e:#}"));
                    }
                    deadline = Instant::now() + scenario.timeout + SCENARIO_SLACK;
                    waiting_for = format!("scenario {name} to end");
                    active = Some(current);
                }
                Event::Note { scenario, text } => {
                    if let Some(a) = active.as_mut().filter(|a| a.scenario.name == scenario) {
                        match text.strip_prefix("FAIL: ") {
                            Some(reason) => a.guest_failure = Some(reason.to_owned()),
                            None => a.details.push(text),
                        }
                    }
                }
                Event::Signal { scenario, word } => {
                    if let Some(a) = active.as_mut().filter(|a| a.scenario.name == scenario) {
                        if a.host_error.is_some() {
                            continue;
                        }
                        a.env.line_at = Instant::now();
                        if let Err(e) = a.host.signal(&word, &mut a.env) {
                            a.host_error = Some(format!("host: {e:#}"));
                            let _ = a.env.release("abort");
                        }
                    }
                }
                Event::End { scenario, rc } => {
                    let Some(mut a) = active.take().filter(|a| a.scenario.name == scenario) else {
                        abandon(
                            &mut outcomes,
                            None,
                            &scenarios[next..],
                            &format!("the guest ended unexpected scenario '{scenario}'"),
                        );
                        break 'run;
                    };
                    let status = if let Some(error) = a.host_error.take() {
                        Status::Fail(error)
                    } else if rc != 0 {
                        Status::Fail(guest_failure(&a, rc))
                    } else {
                        match a.host.verdict(&mut a.env) {
                            Ok(details) => {
                                a.details.extend(details);
                                Status::Pass
                            }
                            Err(e) => Status::Fail(format!("host: {e:#}")),
                        }
                    };
                    a.host.end(&mut a.env);
                    let _ = a.env.release("end");
                    let outcome = Outcome {
                        name: scenario,
                        status,
                        took: Some(a.started.elapsed()),
                        details: a.details,
                    };
                    println!("{}", outcome.line());
                    outcomes.push(outcome);
                    control = Some(a.env.control);
                    next += 1;
                    deadline = Instant::now() + BETWEEN_TIMEOUT;
                    waiting_for = match scenarios.get(next) {
                        Some(s) => format!("scenario {} to begin", s.name),
                        None => "the guest to finish".into(),
                    };
                }
                Event::Done => {
                    done = true;
                    break;
                }
            }
        }
        if done {
            break;
        }
        if let Some(status) = machine.exited() {
            let reason = format!("the guest stopped ({status}) while waiting for {waiting_for}");
            abandon(&mut outcomes, active.take(), &scenarios[next..], &reason);
            break;
        }
        if Instant::now() > deadline {
            let reason = format!("timed out waiting for {waiting_for}");
            abandon(&mut outcomes, active.take(), &scenarios[next..], &reason);
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }

    if done && next < scenarios.len() {
        abandon(
            &mut outcomes,
            active.take(),
            &scenarios[next..],
            "the guest finished without running it",
        );
    }
    if options.keep && done {
        note("the guest keeps running: its shell is on this terminal; `exit` there stops it");
        machine.wait_exit(None);
    } else if done && machine.wait_exit(Some(Duration::from_secs(20))).is_none() {
        note("the guest did not power off within 20 s; stopping QEMU");
    }
    RunResult { outcomes, boot }
}

/// Why the guest script failed, in the words the guest gave if it gave any.
fn guest_failure(a: &Active, rc: i32) -> String {
    if let Some(reason) = &a.guest_failure {
        return reason.clone();
    }
    match rc {
        // busybox `timeout -s KILL` → 137; 124 is lib.sh's own "no begin from the host".
        137 => format!(
            "timed out in the guest after {} s",
            a.scenario.timeout.as_secs()
        ),
        124 => "the host never acknowledged the scenario's begin".into(),
        125 => "the host could not prepare its side".into(),
        _ => format!("the guest script exited with {rc}"),
    }
}

/// Fails the running scenario and every one not yet run, with `reason`.
fn abandon(
    outcomes: &mut Vec<Outcome>,
    active: Option<Active>,
    remaining: &[&Scenario],
    reason: &str,
) {
    let mut skip_first = false;
    if let Some(mut a) = active {
        a.host.end(&mut a.env);
        let outcome = Outcome {
            name: a.scenario.name.to_owned(),
            status: Status::Fail(a.host_error.unwrap_or_else(|| reason.to_owned())),
            took: Some(a.started.elapsed()),
            details: a.details,
        };
        println!("{}", outcome.line());
        outcomes.push(outcome);
        skip_first = true;
    }
    for scenario in remaining.iter().skip(usize::from(skip_first)) {
        let outcome = Outcome {
            name: scenario.name.to_owned(),
            status: Status::Fail(format!("not run: {reason}")),
            took: None,
            details: Vec::new(),
        };
        println!("{}", outcome.line());
        outcomes.push(outcome);
    }
}
