//! End to end: the real agent and relay binaries, real rpm transactions, real sinks. Each test
//! asserts the exact final state at the sink and that nothing was lost or delivered twice.

use std::time::Duration;

use guestwatch_tests::{
    Agent, DELIVERY, RedisServer, Relay, assert_no_double_delivery, base_db, package_versions, pkg,
    prerequisites, state_file, testkit, wait_for, wait_synced,
};

#[test]
fn first_report_install_upgrade_remove() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 20);
    let relay = Relay::start(work.path(), &["vm1"], None, &[]);
    let agent = Agent::start(work.path(), "vm1", db.path(), &relay.socket("vm1"), &[]);

    let first = wait_synced(&relay, "vm1", &db, "the first report");
    assert_eq!(first["report"]["packages"].as_object().unwrap().len(), 20);
    assert_eq!(first["delivery"]["trigger"]["kind"], "startup");

    db.install(&pkg(work.path(), "e2e-app", "1.0")).unwrap();
    let installed = wait_synced(&relay, "vm1", &db, "the install");
    let trigger = &installed["delivery"]["trigger"];
    if trigger["kind"] == "transaction" {
        assert_eq!(trigger["attribution"]["comm"], "rpm");
        assert_eq!(trigger["attribution"]["return_code"], 0);
    } else {
        assert_eq!(trigger["kind"], "inotify", "{trigger}");
    }
    db.upgrade(&pkg(work.path(), "e2e-app", "2.0")).unwrap();
    let upgraded = wait_synced(&relay, "vm1", &db, "the upgrade");
    assert_eq!(package_versions(&upgraded["report"])["e2e-app"], "2.0-1");
    db.erase(&["e2e-app"]).unwrap();
    let removed = wait_synced(&relay, "vm1", &db, "the removal");
    assert!(!package_versions(&removed["report"]).contains_key("e2e-app"));

    let deliveries = relay.deliveries();
    assert_eq!(
        deliveries.len(),
        4,
        "one delivery per state: {deliveries:#?}\n{}",
        agent.process.log()
    );
    assert_no_double_delivery(&relay);
}

#[test]
fn relay_crash_and_restart_mid_stream_loses_nothing() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 10);
    let mut relay = Relay::start(work.path(), &["vm1"], None, &[]);
    let _agent = Agent::start(work.path(), "vm1", db.path(), &relay.socket("vm1"), &[]);
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
}

#[test]
fn agent_crash_with_a_pending_report_resends_it() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 10);
    let mut relay = Relay::start(work.path(), &["vm1"], None, &[]);
    let mut agent = Agent::start(work.path(), "vm1", db.path(), &relay.socket("vm1"), &[]);
    wait_synced(&relay, "vm1", &db, "the first report");
    // The agent has the relay's acknowledgement too, not only the sink the report: a relay
    // killed between the two leaves report 1 pending, and then *it* is what is resent.
    wait_for("the acknowledgement of report 1", DELIVERY, || {
        let acked = state_file(&agent, "acked")?;
        (acked.starts_with("1 ") && state_file(&agent, "pending").is_none()).then_some(())
    });

    relay.process.kill();
    db.install(&pkg(work.path(), "pending-app", "1.0")).unwrap();
    // The agent persisted the report of the install (generation 2) that it could not deliver.
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
    // It is the report made before the crash (generation 2), not a rescan after it.
    assert!(
        latest["delivery"]["report_id"]
            .as_str()
            .unwrap()
            .ends_with("-2"),
        "{}",
        latest["delivery"]
    );
    // The restarted agent's startup scan found that content: no new generation.
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
fn redis_sink_down_then_back() {
    if !prerequisites() {
        return;
    }
    let mut redis = match RedisServer::start() {
        Ok(r) => r,
        Err(e) => {
            assert!(!testkit::in_ci(), "CI must have redis-server: {e}");
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 10);
    let relay = Relay::start(
        work.path(),
        &["vm1"],
        Some(&redis.url()),
        &["--redis-stream", "e2e"],
    );
    let agent = Agent::start(work.path(), "vm1", db.path(), &relay.socket("vm1"), &[]);
    let logs = || {
        format!(
            "relay:\n{}\nagent:\n{}",
            relay.process.log(),
            agent.process.log()
        )
    };
    let stream_len = |r: &RedisServer| -> Option<usize> {
        r.command("XLEN e2e")
            .ok()?
            .trim()
            .trim_start_matches(':')
            .parse()
            .ok()
    };
    wait_for("the first report in Redis", DELIVERY, || {
        (stream_len(&redis)? == 1).then_some(())
    });

    redis.stop();
    db.install(&pkg(work.path(), "while-redis-down", "1.0"))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    redis.restart().unwrap();
    let deadline = std::time::Instant::now() + DELIVERY;
    while stream_len(&redis) != Some(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the change never reached Redis (XLEN {:?}, {:?})\n{}",
            stream_len(&redis),
            redis.command("XLEN e2e"),
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The newest stream entry is the change event naming the package; the latest
    // inventory key holds the report with the same content hash.
    let event = redis.command("XREVRANGE e2e + - COUNT 1").unwrap();
    assert!(event.contains("while-redis-down"), "{event}");
    let hash = redis
        .command("HGET guestwatch:latest:vm1 content_hash")
        .unwrap();
    let hash = hash.lines().nth(1).unwrap_or_default().to_string();
    assert_eq!(
        hash.len(),
        64,
        "latest hash holds no content hash: {hash:?}"
    );
    assert!(
        event.contains(&hash),
        "event {event} is not for latest {hash}"
    );
    // Nothing more arrives: the guest's retransmission was recognised as a duplicate.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(stream_len(&redis), Some(2));
}

#[test]
fn two_vms_and_a_hostile_third() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let vm1_dir = work.path().join("vm1");
    let vm2_dir = work.path().join("vm2");
    std::fs::create_dir_all(&vm1_dir).unwrap();
    std::fs::create_dir_all(&vm2_dir).unwrap();
    let db1 = base_db(&vm1_dir, 5);
    let db2 = base_db(&vm2_dir, 8);
    let relay = Relay::start(
        work.path(),
        &["vm1", "vm2", "evil"],
        None,
        &["--reports-per-minute", "30"],
    );
    let _a1 = Agent::start(work.path(), "vm1", db1.path(), &relay.socket("vm1"), &[]);
    let _a2 = Agent::start(work.path(), "vm2", db2.path(), &relay.socket("vm2"), &[]);
    wait_synced(&relay, "vm1", &db1, "vm1's first report");
    wait_synced(&relay, "vm2", &db2, "vm2's first report");

    // The hostile guest: garbage, a 1 GiB frame claim, and a pile of idle connections.
    let evil = relay.socket("evil");
    let hostile = std::thread::spawn(move || {
        use std::io::Write;
        let mut held = Vec::new();
        for i in 0..300 {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&evil) {
                let _ = match i % 3 {
                    0 => s.write_all(b"\x00garbage\xff"),
                    1 => s.write_all(b"GWAT\x00\x01\x00\x03\x40\x00\x00\x00"),
                    _ => Ok(()),
                };
                held.push(s);
            }
        }
        std::thread::sleep(Duration::from_secs(5));
        drop(held);
    });
    db1.install(&pkg(&vm1_dir, "vm1-only", "1.0")).unwrap();
    db2.install(&pkg(&vm2_dir, "vm2-only", "1.0")).unwrap();
    let l1 = wait_synced(&relay, "vm1", &db1, "vm1's change during the attack");
    let l2 = wait_synced(&relay, "vm2", &db2, "vm2's change during the attack");
    hostile.join().unwrap();
    assert!(!package_versions(&l1["report"]).contains_key("vm2-only"));
    assert!(!package_versions(&l2["report"]).contains_key("vm1-only"));
    assert_eq!(
        l1["delivery"]["identity"]["socket"],
        relay.socket("vm1").display().to_string()
    );
    assert!(
        relay.latest("evil").is_none(),
        "the hostile guest delivered nothing"
    );
    assert_no_double_delivery(&relay);
}
