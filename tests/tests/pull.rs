//! Pull mode end to end: the real relay dials the real agent (`--pull vm1=unix:…` against
//! `--listen unix:…`), over real rpm transactions. The same guarantees as push: the first
//! report and every change arrive, a relay killed and restarted loses nothing, an agent
//! restarted with a pending report resends it, a guest that stalls or is down does not hold
//! up the others, and push and pull work side by side in one relay, through a SIGHUP.

use std::{path::Path, time::Duration};

use guestwatch_tests::{
    Agent, DELIVERY, Relay, assert_no_double_delivery, base_db, package_versions, pkg,
    prerequisites, state_file, wait_for, wait_synced,
};

fn listen_socket(work: &Path, vm: &str) -> std::path::PathBuf {
    work.join(format!("{vm}-agent.sock"))
}

fn pull_of(work: &Path, vm: &'static str) -> (&'static str, String) {
    (vm, format!("unix:{}", listen_socket(work, vm).display()))
}

/// How many sessions the relay opened to a listening agent (its log says so once each).
fn sessions(agent: &Agent) -> usize {
    let log = agent.process.log();
    log.matches("the relay connected (").count() + log.matches("the relay connected again").count()
}

#[test]
fn pulled_first_report_and_every_change() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 20);
    let agent = Agent::start_listening(
        work.path(),
        "vm1",
        db.path(),
        &listen_socket(work.path(), "vm1"),
        &[],
    );
    let relay = Relay::start_with(work.path(), &[], &[pull_of(work.path(), "vm1")], None, &[]);

    let first = wait_synced(&relay, "vm1", &db, "the first report");
    assert_eq!(first["report"]["packages"].as_object().unwrap().len(), 20);
    assert_eq!(first["delivery"]["trigger"]["kind"], "startup");
    assert_eq!(first["delivery"]["identity"]["source"], "dialed");
    assert_eq!(
        first["delivery"]["identity"]["address"],
        pull_of(work.path(), "vm1").1
    );

    db.install(&pkg(work.path(), "pull-app", "1.0")).unwrap();
    wait_synced(&relay, "vm1", &db, "the install");
    db.upgrade(&pkg(work.path(), "pull-app", "2.0")).unwrap();
    let upgraded = wait_synced(&relay, "vm1", &db, "the upgrade");
    assert_eq!(package_versions(&upgraded["report"])["pull-app"], "2.0-1");
    db.erase(&["pull-app"]).unwrap();
    wait_synced(&relay, "vm1", &db, "the removal");

    assert_eq!(relay.deliveries().len(), 4, "{:#?}", relay.deliveries());
    assert_no_double_delivery(&relay);
    // Every report went out on the one session the relay opened and holds.
    assert_eq!(sessions(&agent), 1, "{}", agent.process.log());
}

#[test]
fn pulled_relay_crash_and_restart_loses_nothing() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 10);
    let agent = Agent::start_listening(
        work.path(),
        "vm1",
        db.path(),
        &listen_socket(work.path(), "vm1"),
        &[],
    );
    let mut relay = Relay::start_with(work.path(), &[], &[pull_of(work.path(), "vm1")], None, &[]);
    wait_synced(&relay, "vm1", &db, "the first report");

    relay.process.kill();
    db.install(&pkg(work.path(), "during-outage-1", "1.0"))
        .unwrap();
    db.install(&pkg(work.path(), "during-outage-2", "1.0"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    relay.restart();
    wait_synced(
        &relay,
        "vm1",
        &db,
        "the changes made while the relay was down",
    );
    assert_no_double_delivery(&relay);
    assert_eq!(sessions(&agent), 2, "{}", agent.process.log());
}

#[test]
fn pulled_agent_crash_with_a_pending_report_resends_it() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 10);
    let socket = listen_socket(work.path(), "vm1");
    let mut relay = Relay::start_with(work.path(), &[], &[pull_of(work.path(), "vm1")], None, &[]);
    // The relay dials before the agent listens: it keeps trying, paced.
    let mut agent = Agent::start_listening(work.path(), "vm1", db.path(), &socket, &[]);
    wait_synced(&relay, "vm1", &db, "the first report");
    wait_for("the acknowledgement of report 1", DELIVERY, || {
        let acked = state_file(&agent, "acked")?;
        (acked.starts_with("1 ") && state_file(&agent, "pending").is_none()).then_some(())
    });

    relay.process.kill();
    db.install(&pkg(work.path(), "pending-app", "1.0")).unwrap();
    wait_for("report 2 pending on disk", DELIVERY, || {
        (state_file(&agent, "generation")? == "2" && agent.state.join("pending").exists())
            .then_some(())
    });
    agent.process.kill();
    relay.restart();
    agent.restart();
    let latest = wait_synced(
        &relay,
        "vm1",
        &db,
        "the pending report after the agent restarted",
    );
    assert!(
        latest["delivery"]["report_id"]
            .as_str()
            .unwrap()
            .ends_with("-2"),
        "{}",
        latest["delivery"]
    );
    wait_for("the restarted agent's startup scan", DELIVERY, || {
        agent
            .process
            .log()
            .contains("scan after startup trigger: package set unchanged")
            .then_some(())
    });
    assert_eq!(state_file(&agent, "generation").as_deref(), Some("2"));
    assert_eq!(relay.deliveries().len(), 2, "{:#?}", relay.deliveries());
    assert_no_double_delivery(&relay);
}

#[test]
fn a_pulled_guest_that_stalls_or_is_down_does_not_hold_up_the_others() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 5);
    // A guest that takes the relay's connection and says nothing, ever.
    let stall_socket = work.path().join("staller.sock");
    let staller = std::os::unix::net::UnixListener::bind(&stall_socket).unwrap();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in staller.incoming().take(3) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let _agent = Agent::start_listening(
        work.path(),
        "vm1",
        db.path(),
        &listen_socket(work.path(), "vm1"),
        &[],
    );
    let relay = Relay::start_with(
        work.path(),
        &[],
        &[
            ("staller", format!("unix:{}", stall_socket.display())),
            (
                "down",
                format!("unix:{}", work.path().join("nothing.sock").display()),
            ),
            pull_of(work.path(), "vm1"),
        ],
        None,
        &["--read-timeout", "3s"],
    );
    wait_synced(&relay, "vm1", &db, "vm1's first report");
    db.install(&pkg(work.path(), "served-anyway", "1.0"))
        .unwrap();
    wait_synced(&relay, "vm1", &db, "vm1's change");
    assert!(relay.latest("staller").is_none() && relay.latest("down").is_none());
    let log = relay.process.log();
    assert!(log.contains("down: cannot dial"), "{log}");
    drop(held);
}

#[test]
fn push_and_pull_side_by_side_through_a_reload() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let pushed_dir = work.path().join("pushed");
    let pulled_dir = work.path().join("pulled");
    std::fs::create_dir_all(&pushed_dir).unwrap();
    std::fs::create_dir_all(&pulled_dir).unwrap();
    let db_push = base_db(&pushed_dir, 3);
    let db_pull = base_db(&pulled_dir, 4);
    let config = work.path().join("relay.toml");
    let (name, addr) = pull_of(work.path(), "pulled");
    std::fs::write(&config, format!("pull = [\"{name}={addr}\"]\n")).unwrap();
    let relay = Relay::start_with(
        work.path(),
        &["pushed"],
        &[],
        None,
        &["--config", &config.display().to_string()],
    );
    let pushed = Agent::start(
        work.path(),
        "pushed",
        db_push.path(),
        &relay.socket("pushed"),
        &[],
    );
    let pulled = Agent::start_listening(
        work.path(),
        "pulled",
        db_pull.path(),
        &listen_socket(work.path(), "pulled"),
        &[],
    );
    wait_synced(&relay, "pushed", &db_push, "the pushed VM's first report");
    wait_synced(&relay, "pulled", &db_pull, "the pulled VM's first report");

    // SIGHUP with nothing changed: a reload that keeps every session.
    let pid = relay.process.pid().unwrap();
    // SAFETY: kill(2) on the relay process this test started and has not reaped.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    wait_for("the SIGHUP reload", DELIVERY, || {
        relay
            .process
            .log()
            .contains("reload (SIGHUP): nothing changed")
            .then_some(())
    });
    db_push
        .install(&pkg(&pushed_dir, "push-only", "1.0"))
        .unwrap();
    db_pull
        .install(&pkg(&pulled_dir, "pull-only", "1.0"))
        .unwrap();
    let l_push = wait_synced(&relay, "pushed", &db_push, "the pushed VM's change");
    let l_pull = wait_synced(&relay, "pulled", &db_pull, "the pulled VM's change");
    assert!(!package_versions(&l_push["report"]).contains_key("pull-only"));
    assert!(!package_versions(&l_pull["report"]).contains_key("push-only"));
    assert_eq!(l_push["delivery"]["identity"]["source"], "hybrid");
    assert_eq!(l_pull["delivery"]["identity"]["source"], "dialed");
    assert_eq!(sessions(&pulled), 1, "{}", pulled.process.log());
    assert_eq!(
        pushed
            .process
            .log()
            .matches("connected to the relay")
            .count(),
        1,
        "{}",
        pushed.process.log()
    );
    assert_no_double_delivery(&relay);
}
