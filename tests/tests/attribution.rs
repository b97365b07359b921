//! Attribution by evidence, end to end, with real package managers: dnf (install, upgrade,
//! downgrade, remove, history undo), zypper (install, remove) and rpm into RHEL-like roots,
//! each delivered as exactly one report naming the process, the person (audit login uid) and
//! the command — while another database on the machine sees transactions all along, and
//! read-only commands deliver nothing.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use guestwatch_testkit::{
    PackageSpec, RpmDb, build_packages, in_ci, is_root,
    pkgmgr::{Dnf, InstallRoot, LocalRepo, Zypper, as_login_user, have_dnf, have_zypper},
};
use guestwatch_tests::{Agent, Relay, package_versions, wait_for};
use serde_json::Value;

/// The person the tests play: a login uid no real account here has.
const LOGINUID: u32 = 4242;
const OS_RELEASE: &str = "ID=rhel\nVERSION_ID=9.4\nNAME=\"Red Hat Enterprise Linux\"\n\
    PRETTY_NAME=\"Red Hat Enterprise Linux 9.4 (Plow)\"\n";

fn prerequisites(what: &str, tools: bool) -> bool {
    let missing = if !is_root() {
        Some("these tests need root (eBPF, audit login uids)")
    } else if !guestwatch_testkit::have_rpm_tools() || !tools {
        Some("rpm, rpmbuild, dnf, createrepo_c or zypper is missing (cargo xtask setup)")
    } else {
        None
    };
    match missing {
        Some(why) if in_ci() => panic!("CI must run {what}, but {why}"),
        Some(why) => {
            eprintln!("SKIPPED: {what}: {why}");
            false
        }
        None => true,
    }
}

/// Transactions on another database, all along: none of them may show up here.
struct Noise {
    stop: Arc<AtomicBool>,
    transactions: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
    _db: Arc<RpmDb>,
}

impl Noise {
    fn start(work: &Path) -> Self {
        let rpms = build_packages(&[PackageSpec::new("gw-noise", "1.0", "1")], work).unwrap();
        let db = Arc::new(RpmDb::temp().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let transactions = Arc::new(AtomicU32::new(0));
        let thread = std::thread::spawn({
            let (db, stop, transactions) = (db.clone(), stop.clone(), transactions.clone());
            move || {
                while !stop.load(Ordering::SeqCst) {
                    if db.install(&rpms).is_ok() {
                        transactions.fetch_add(1, Ordering::SeqCst);
                    }
                    if db.erase(&["gw-noise"]).is_ok() {
                        transactions.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        Self {
            stop,
            transactions,
            thread: Some(thread),
            _db: db,
        }
    }

    fn stop(mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.transactions.load(Ordering::SeqCst)
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

/// The relay and the agent watching `root`, with its first report delivered.
struct Watched {
    relay: Relay,
    agent: Agent,
}

impl Watched {
    fn start(work: &Path, root: &Path) -> Self {
        let relay = Relay::start(work, &["vm1"], None, &[]);
        let agent = Agent::start_root(
            work,
            "vm1",
            root,
            &relay.socket("vm1"),
            &["--detector", "ebpf"],
        );
        let watched = Self { relay, agent };
        wait_for("the first report", Duration::from_secs(30), || {
            (!watched.relay.deliveries().is_empty()).then_some(())
        });
        watched
    }

    /// Runs `cmd` to success and returns its pid and the one delivery it caused, checking that
    /// no second one follows.
    fn delivery_of(&self, what: &str, cmd: &mut Command) -> (u32, Value) {
        let before = self.relay.deliveries().len();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let delivery = wait_for(what, Duration::from_secs(15), || {
            self.relay.deliveries().get(before).cloned()
        });
        // Exactly one: nothing else arrives (follow-up scans find the same content).
        std::thread::sleep(Duration::from_secs(2));
        let after = self.relay.deliveries();
        assert_eq!(
            after.len(),
            before + 1,
            "{what} must be one report: {:#?}\n{}",
            &after[before..],
            self.agent.process.log()
        );
        (pid, delivery)
    }

    fn nothing_from(&self, what: &str, cmd: &mut Command) {
        let before = self.relay.deliveries().len();
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(2));
        let after = self.relay.deliveries();
        assert_eq!(
            after.len(),
            before,
            "{what} must deliver nothing: {:#?}",
            &after[before..]
        );
    }

    fn report(&self) -> Value {
        self.relay.latest("vm1").unwrap()["report"].clone()
    }
}

/// Checks the delivery's cause: a transaction of `comm` (pid `pid`, or a child of it when
/// `pid` is `None`) by the test's person, with `args` in its command line.
fn assert_transaction(delivery: &Value, comm: &str, pid: Option<u32>, args: &[&str]) -> Value {
    let trigger = &delivery["trigger"];
    assert_eq!(trigger["kind"], "transaction", "{delivery:#}");
    let who = trigger["attribution"].clone();
    assert_eq!(who["comm"], comm, "{who:#}");
    if let Some(pid) = pid {
        assert_eq!(who["pid"], pid, "{who:#}");
    }
    assert_eq!(who["loginuid"], LOGINUID, "{who:#}");
    assert!(who["sessionid"].as_u64().is_some(), "{who:#}");
    assert_eq!(who["evidence"], "syscall", "{who:#}");
    assert_eq!(who["database"], "/var/lib/rpm/rpmdb.sqlite", "{who:#}");
    assert_eq!(who["return_code"], 0, "{who:#}");
    let cmdline: Vec<&str> = who["cmdline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for arg in args {
        assert!(cmdline.contains(arg), "{arg} in {cmdline:?}");
    }
    assert!(!who["ancestors"].as_array().unwrap().is_empty(), "{who:#}");
    // The report lists every transaction it answers: this one, nobody else's.
    let listed = delivery["transactions"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{delivery:#}");
    assert_eq!(listed[0]["pid"], who["pid"]);
    who
}

/// Builds each package on its own (one spec cannot hold two versions of a name).
fn packages(work: &Path, specs: &[PackageSpec]) -> Vec<PathBuf> {
    specs
        .iter()
        .flat_map(|spec| build_packages(std::slice::from_ref(spec), &work.join("rpms")).unwrap())
        .collect()
}

#[test]
fn dnf_install_upgrade_downgrade_remove_and_undo_are_one_attributed_report_each() {
    if !prerequisites("the dnf attribution test", have_dnf()) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let rpms = packages(
        work.path(),
        &[
            PackageSpec::new("gw-base", "1.0", "1"),
            PackageSpec::new("gw-app", "1.0", "1"),
            PackageSpec::new("gw-app", "2.0", "1"),
        ],
    );
    let repo = LocalRepo::new("gw-local", &rpms).unwrap();
    let dnf = Dnf::new(&[&repo]).unwrap();
    let root = InstallRoot::new(OS_RELEASE).unwrap();
    let status = dnf
        .command(&root, &["install", "gw-base"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let noise = Noise::start(work.path());
    let w = Watched::start(work.path(), root.path());
    let dnf_as_person = |args: &[&str]| {
        let mut cmd = dnf.command(&root, args);
        as_login_user(&mut cmd, LOGINUID);
        cmd
    };

    let (pid, d) = w.delivery_of(
        "dnf install",
        &mut dnf_as_person(&["install", "gw-app-1.0-1"]),
    );
    assert_transaction(&d, "dnf", Some(pid), &["install", "gw-app-1.0-1"]);
    assert_eq!(d["changes"]["added"], 1, "{d:#}");
    let report = w.report();
    assert_eq!(package_versions(&report)["gw-app"], "1.0-1");
    // Repositories come from the history dnf itself wrote.
    let repos: Vec<&str> = report["repositories"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(repos, ["gw-local"], "{report:#}");
    assert_eq!(report["guestwatch"]["transactions"][0]["comm"], "dnf");

    let (pid, d) = w.delivery_of("dnf upgrade", &mut dnf_as_person(&["upgrade", "gw-app"]));
    assert_transaction(&d, "dnf", Some(pid), &["upgrade"]);
    assert_eq!(d["changes"]["upgraded"], 1, "{d:#}");

    let (pid, d) = w.delivery_of(
        "dnf downgrade",
        &mut dnf_as_person(&["downgrade", "gw-app-1.0-1"]),
    );
    assert_transaction(&d, "dnf", Some(pid), &["downgrade"]);
    assert_eq!(d["changes"]["downgraded"], 1, "{d:#}");

    let (pid, d) = w.delivery_of("dnf remove", &mut dnf_as_person(&["remove", "gw-app"]));
    assert_transaction(&d, "dnf", Some(pid), &["remove"]);
    assert_eq!(d["changes"]["removed"], 1, "{d:#}");

    let (pid, d) = w.delivery_of(
        "dnf history undo",
        &mut dnf_as_person(&["history", "undo", "last"]),
    );
    assert_transaction(&d, "dnf", Some(pid), &["history", "undo"]);
    assert_eq!(d["changes"]["added"], 1, "{d:#}");
    assert_eq!(package_versions(&w.report())["gw-app"], "1.0-1");

    // Read-only commands deliver nothing.
    w.nothing_from("rpm -q", &mut root.rpm(&["-q", "gw-app"]));
    w.nothing_from("rpm -V", &mut root.rpm(&["-V", "gw-base"]));
    w.nothing_from("dnf list", &mut dnf.command(&root, &["list", "installed"]));
    w.nothing_from(
        "dnf repoquery",
        &mut dnf.command(&root, &["repoquery", "gw-app"]),
    );
    w.nothing_from("dnf makecache", &mut dnf.command(&root, &["makecache"]));

    let noisy = noise.stop();
    assert!(noisy > 10, "the other database saw {noisy} transactions");
    for d in w.relay.deliveries() {
        for t in d["transactions"].as_array().unwrap() {
            assert_eq!(t["comm"], "dnf", "only dnf's transactions here: {d:#}");
        }
    }
}

#[test]
fn zypper_install_and_remove_name_the_rpm_it_runs() {
    if !prerequisites("the zypper attribution test", have_zypper()) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let rpms = packages(
        work.path(),
        &[
            PackageSpec::new("gw-zbase", "1.0", "1"),
            PackageSpec::new("gw-ztool", "1.0", "1"),
        ],
    );
    let zypper = Zypper::new().unwrap();
    let root = InstallRoot::new(OS_RELEASE).unwrap();
    // zypper caches the database after each change, which fails on an empty one.
    let base = rpms[0].to_str().unwrap();
    let out = zypper
        .command(&root, &["in", "--allow-unsigned-rpm", base])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let noise = Noise::start(work.path());
    let w = Watched::start(work.path(), root.path());

    let tool = rpms[1].to_str().unwrap();
    let mut cmd = zypper.command(&root, &["in", "--allow-unsigned-rpm", tool]);
    as_login_user(&mut cmd, LOGINUID);
    let (zypper_pid, d) = w.delivery_of("zypper install", &mut cmd);
    let who = assert_transaction(&d, "rpm", None, &[]);
    let ancestors: Vec<(u64, &str)> = who["ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["pid"].as_u64().unwrap(), a["comm"].as_str().unwrap()))
        .collect();
    assert!(
        ancestors.contains(&(u64::from(zypper_pid), "zypper")),
        "zypper among {ancestors:?}"
    );
    assert_eq!(d["changes"]["added"], 1, "{d:#}");

    let mut cmd = zypper.command(&root, &["rm", "gw-ztool"]);
    as_login_user(&mut cmd, LOGINUID);
    let (_, d) = w.delivery_of("zypper remove", &mut cmd);
    assert_transaction(&d, "rpm", None, &["-e"]);
    assert_eq!(d["changes"]["removed"], 1, "{d:#}");
    assert_eq!(root.installed().unwrap(), ["gw-zbase-1.0-1"]);
    noise.stop();
}

#[test]
fn rpm_upgrade_in_a_root_is_one_attributed_report() {
    if !prerequisites("the rpm -U attribution test", true) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let rpms = packages(
        work.path(),
        &[
            PackageSpec::new("gw-rbase", "1.0", "1"),
            PackageSpec::new("gw-rbase", "1.1", "1"),
        ],
    );
    let root = InstallRoot::new(OS_RELEASE).unwrap();
    let first = rpms[0].to_str().unwrap();
    let out = root
        .rpm(&["-i", "--justdb", "--nodeps", "--nosignature", first])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let noise = Noise::start(work.path());
    let w = Watched::start(work.path(), root.path());
    let newer = rpms[1].to_str().unwrap();
    let mut cmd = root.rpm(&["-U", "--justdb", "--nodeps", "--nosignature", newer]);
    as_login_user(&mut cmd, LOGINUID);
    let (pid, d) = w.delivery_of("rpm -U", &mut cmd);
    assert_transaction(&d, "rpm", Some(pid), &["-U", newer]);
    assert_eq!(d["changes"]["upgraded"], 1, "{d:#}");
    noise.stop();
}
