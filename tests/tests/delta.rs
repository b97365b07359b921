//! Delta reports end to end: the real agent and relay, real rpm transactions, real sinks. A
//! one-package change travels as a delta of a few hundred bytes and the sink gets the whole,
//! reconstructed report and a change event; a relay restarted with an empty cache takes the
//! base from its sink (dir and Redis); a stale or missing base is answered `NeedFull` and the
//! report goes whole, losing nothing.

use std::{path::Path, time::Duration};

use guestwatch_tests::{
    Agent, CountingProxy, DELIVERY, RedisServer, Relay, assert_no_double_delivery, base_db,
    free_port, metric, pkg, prerequisites, state_file, testkit, wait_for, wait_synced,
};

fn relay_metric(addr: std::net::SocketAddr, series: &str) -> f64 {
    metric(addr, &format!("guestwatch_relay_{series}")).unwrap_or(0.0)
}

/// Every change event of the dir sink.
fn change_events(relay: &Relay) -> Vec<serde_json::Value> {
    std::fs::read_to_string(relay.sink_dir().join("changes.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The event of report `id`.
fn event_of(relay: &Relay, id: &serde_json::Value) -> serde_json::Value {
    change_events(relay)
        .into_iter()
        .find(|e| e["report_id"] == *id)
        .unwrap_or_else(|| panic!("no change event for {id}"))
}

/// `(class, name)` of an event's changes, sorted.
fn changes(event: &serde_json::Value) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = event["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes listed: {event}"))
        .iter()
        .map(|c| {
            (
                c["class"].as_str().unwrap().to_owned(),
                c["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    list.sort();
    list
}

fn pair(class: &str, name: &str) -> (String, String) {
    (class.to_owned(), name.to_owned())
}

#[test]
fn a_one_package_change_costs_bytes_not_the_inventory() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 300);
    let metrics = free_port();
    let relay = Relay::start(
        work.path(),
        &["vm1"],
        None,
        &["--metrics", &metrics.to_string()],
    );
    let proxy = CountingProxy::start(&work.path().join("proxy.sock"), &relay.socket("vm1"));
    // Minimal attribution: the bytes measured are the report's, not the test runner's
    // command lines.
    let agent = Agent::start(
        work.path(),
        "vm1",
        db.path(),
        &proxy.path,
        &["--attribution", "minimal"],
    );
    let first = wait_synced(&relay, "vm1", &db, "the first report");
    let first_bytes = proxy.upstream();

    db.install(&pkg(work.path(), "delta-app", "1.0")).unwrap();
    let installed = wait_synced(&relay, "vm1", &db, "the install");
    let install_bytes = proxy.upstream() - first_bytes;
    db.upgrade(&pkg(work.path(), "delta-app", "2.0")).unwrap();
    let upgraded = wait_synced(&relay, "vm1", &db, "the upgrade");
    eprintln!(
        "agent → relay: connection and first report {first_bytes} B, \
         one-package install {install_bytes} B (300 packages)"
    );
    assert!(
        install_bytes <= 1024,
        "a one-package change cost {install_bytes} bytes (first report: {first_bytes})\n{}",
        agent.process.log()
    );
    assert_eq!(
        relay_metric(metrics, "reports_delta_total{result=\"applied\"}"),
        2.0
    );

    // The sink has the whole report, and an event per delivery computed from the inventories.
    assert_eq!(
        installed["report"]["packages"].as_object().unwrap().len(),
        301
    );
    let baseline = event_of(&relay, &first["delivery"]["report_id"]);
    assert!(baseline["base"].is_null(), "{baseline}");
    assert_eq!(baseline["changes"], serde_json::json!([]));
    let install = event_of(&relay, &installed["delivery"]["report_id"]);
    assert_eq!(install["base"]["report_id"], first["delivery"]["report_id"]);
    assert_eq!(changes(&install), vec![pair("added", "delta-app")]);
    assert_eq!(install["package_count"], 301);
    let upgrade = event_of(&relay, &upgraded["delivery"]["report_id"]);
    assert_eq!(changes(&upgrade), vec![pair("upgraded", "delta-app")]);
    assert_eq!(upgrade["changes"][0]["from"], "1.0-1");
    assert_eq!(upgrade["changes"][0]["to"], "2.0-1");
    assert_eq!(upgrade["counts"]["upgraded"], 1);
    assert_eq!(change_events(&relay).len(), 3);
    assert_no_double_delivery(&relay);
}

#[test]
fn a_relay_restarted_with_an_empty_cache_takes_the_base_from_its_dir_sink() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 50);
    let metrics = free_port();
    let mut relay = Relay::start(
        work.path(),
        &["vm1"],
        None,
        &["--metrics", &metrics.to_string()],
    );
    let agent = Agent::start(work.path(), "vm1", db.path(), &relay.socket("vm1"), &[]);
    let first = wait_synced(&relay, "vm1", &db, "the first report");
    wait_acked(&agent, &first);
    relay.restart();
    db.install(&pkg(work.path(), "after-restart", "1.0"))
        .unwrap();
    let installed = wait_synced(&relay, "vm1", &db, "the install");
    assert_eq!(
        relay_metric(metrics, "reports_delta_total{result=\"applied\"}"),
        1.0
    );
    assert_eq!(
        relay_metric(metrics, "inventory_reads_total{result=\"read\"}"),
        1.0
    );
    let event = event_of(&relay, &installed["delivery"]["report_id"]);
    assert_eq!(changes(&event), vec![pair("added", "after-restart")]);
    assert_no_double_delivery(&relay);
}

fn redis_or_skip() -> Option<RedisServer> {
    match RedisServer::start() {
        Ok(redis) => Some(redis),
        Err(e) => {
            assert!(!testkit::in_ci(), "CI must have redis-server: {e}");
            eprintln!("SKIPPED: redis-server is not available: {e}");
            None
        }
    }
}

#[test]
fn a_relay_restarted_with_an_empty_cache_takes_the_base_from_redis() {
    if !prerequisites() {
        return;
    }
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 50);
    let metrics = free_port();
    let sink = format!("redis://127.0.0.1:{}/0", redis.port());
    let mut relay = Relay::start(
        work.path(),
        &["vm1"],
        Some(&sink),
        &["--redis-stream", "delta", "--metrics", &metrics.to_string()],
    );
    let agent = Agent::start(work.path(), "vm1", db.path(), &relay.socket("vm1"), &[]);
    let xlen = || {
        redis
            .command("XLEN delta")
            .ok()?
            .trim()
            .strip_prefix(':')?
            .parse::<u64>()
            .ok()
    };
    wait_for("the first report in Redis", DELIVERY, || {
        (xlen()? == 1).then_some(())
    });
    wait_for("the agent to record the acknowledgement", DELIVERY, || {
        state_file(&agent, "acked")?.starts_with("1 ").then_some(())
    });
    relay.restart();
    db.install(&pkg(work.path(), "after-restart", "1.0"))
        .unwrap();
    wait_for("the install in Redis", DELIVERY, || {
        (xlen()? == 2).then_some(())
    });
    assert_eq!(
        relay_metric(metrics, "reports_delta_total{result=\"applied\"}"),
        1.0
    );
    // The stream entry is the change event, not the inventory.
    let entry = redis.command("XREVRANGE delta + - COUNT 1").unwrap();
    assert!(
        entry.contains(r#""class":"added","name":"after-restart""#),
        "{entry}"
    );
    assert!(
        !entry.contains("\"packages\""),
        "an inventory in the stream: {entry}"
    );
    assert!(
        entry.len() < 8 * 1024,
        "a {}-byte stream entry",
        entry.len()
    );
    // The latest hash holds the whole report, compressed, for the event's content.
    let latest = redis.command("HGETALL guestwatch:latest:vm1").unwrap();
    for field in [
        "report_id",
        "content_hash",
        "report",
        "document",
        "document_encoding",
    ] {
        assert!(
            latest.contains(field),
            "{field} missing from the latest hash"
        );
    }
}

/// Waits until the agent has recorded the acknowledgement of the report the sink delivered as
/// `latest` (killing the relay before would leave the agent an older base, and the report
/// to retransmit).
fn wait_acked(agent: &Agent, latest: &serde_json::Value) {
    let id = latest["delivery"]["report_id"].as_str().unwrap().to_owned();
    let generation = id.rsplit('-').next().unwrap().to_owned();
    wait_for("the agent to record the acknowledgement", DELIVERY, || {
        let acked = state_file(agent, "acked")?;
        acked.starts_with(&format!("{generation} ")).then_some(())
    });
}

/// Copies the VM's latest files of the dir sink from `from` to `to`.
fn copy_latest(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["latest.json", "latest.id", "latest.document"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn a_stale_or_missing_base_is_answered_need_full_and_nothing_is_lost() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let db = base_db(work.path(), 50);
    let metrics = free_port();
    let extra = ["--metrics".to_owned(), metrics.to_string()];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut relay = Relay::start(work.path(), &["vm1"], None, &extra);
    let agent = Agent::start(work.path(), "vm1", db.path(), &relay.socket("vm1"), &[]);
    let vm_dir = relay.sink_dir().join("vms").join("vm1");
    let saved = work.path().join("saved");
    wait_synced(&relay, "vm1", &db, "the first report");
    db.install(&pkg(work.path(), "one", "1.0")).unwrap();
    let one = wait_synced(&relay, "vm1", &db, "the first install");
    copy_latest(&vm_dir, &saved);
    db.install(&pkg(work.path(), "two", "1.0")).unwrap();
    let two = wait_synced(&relay, "vm1", &db, "the second install");
    wait_acked(&agent, &two);

    // Stale: the sink's latest is rolled back to "one", the agent's base is "two".
    relay.process.kill();
    copy_latest(&saved, &vm_dir);
    relay = Relay::start(work.path(), &["vm1"], None, &extra);
    db.install(&pkg(work.path(), "three", "1.0")).unwrap();
    let three = wait_synced(&relay, "vm1", &db, "the third install, whole");
    assert_eq!(
        relay_metric(metrics, "reports_delta_total{result=\"need_full\"}"),
        1.0,
        "{}",
        agent.process.log()
    );
    // The event is computed against what the sink had: "two" and "three" are new to it.
    let event = event_of(&relay, &three["delivery"]["report_id"]);
    assert_eq!(event["base"]["report_id"], one["delivery"]["report_id"]);
    assert_eq!(
        changes(&event),
        vec![pair("added", "three"), pair("added", "two")]
    );
    wait_acked(&agent, &three);

    // Missing: the sink lost the VM's compact inventory.
    relay.process.kill();
    std::fs::remove_file(vm_dir.join("latest.document")).unwrap();
    relay = Relay::start(work.path(), &["vm1"], None, &extra);
    db.erase(&["one"]).unwrap();
    let erased = wait_synced(&relay, "vm1", &db, "the removal, whole");
    assert_eq!(
        relay_metric(metrics, "reports_delta_total{result=\"need_full\"}"),
        1.0
    );
    assert_eq!(
        relay_metric(metrics, "reports_delta_total{result=\"applied\"}"),
        0.0
    );
    let event = event_of(&relay, &erased["delivery"]["report_id"]);
    assert!(
        event["base"].is_null(),
        "no inventory to compare with: {event}"
    );
    // The next change is a delta again, against the report delivered whole.
    db.install(&pkg(work.path(), "four", "1.0")).unwrap();
    wait_synced(&relay, "vm1", &db, "the fourth install");
    assert_eq!(
        relay_metric(metrics, "reports_delta_total{result=\"applied\"}"),
        1.0
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_no_double_delivery(&relay);
}
