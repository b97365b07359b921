//! Reports of complete test roots built here: a real rpm database from another project's test
//! suite (CBL-Mariner 2.0), real packages added with `rpm`, dnf4/dnf5 history databases from
//! claircore's test suite, and os-release files written by the test.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use guestwatch_testkit::{PackageSpec, RpmDb, build_packages, have_rpm_tools, in_ci};
use report::{Document, Facts, ReportInput, SystemInfo, SystemReader, claircore, cyclonedx};
use serde_json::Value;
use tempfile::TempDir;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/rpmdb")
}

const RHEL_OS_RELEASE: &str = r#"NAME="Red Hat Enterprise Linux"
VERSION="9.4 (Plow)"
ID="rhel"
ID_LIKE="fedora"
VERSION_ID="9.4"
PRETTY_NAME="Red Hat Enterprise Linux 9.4 (Plow)"
CPE_NAME="cpe:/o:redhat:enterprise_linux:9::baseos"
"#;

/// rpm and rpmbuild are installed by `cargo xtask setup`; outside CI a bare machine skips.
fn rpm_tools(test: &str) -> bool {
    if have_rpm_tools() {
        return true;
    }
    assert!(!in_ci(), "{test}: rpm/rpmbuild missing in CI");
    println!("SKIPPED: {test}: rpm and rpmbuild are not installed (run `cargo xtask setup`)");
    false
}

/// A RHEL-like root: the Mariner database at `usr/lib/sysimage/rpm` (with `var/lib/rpm`
/// linking to it), `/etc/os-release` linking to `/usr/lib/os-release`, and optionally a dnf
/// history database.
struct Root {
    dir: TempDir,
}

impl Root {
    fn new(os_release: &str) -> Self {
        let dir = TempDir::new().unwrap();
        let r = dir.path();
        for d in ["usr/lib/sysimage/rpm", "var/lib", "etc"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::copy(
            fixtures().join("go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite"),
            r.join("usr/lib/sysimage/rpm/rpmdb.sqlite"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../usr/lib/sysimage/rpm", r.join("var/lib/rpm")).unwrap();
        std::fs::write(r.join("usr/lib/os-release"), os_release).unwrap();
        // Absolute, as distributions ship it: must resolve inside the root, not on the host.
        std::os::unix::fs::symlink("/usr/lib/os-release", r.join("etc/os-release")).unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn with_history(self, fixture: &str, file: &str, rel: &str) -> Self {
        let dest = self.path().join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(fixtures().join(fixture).join(file), dest).unwrap();
        self
    }

    fn rpmdb(&self) -> RpmDb {
        RpmDb::at(self.path().join("usr/lib/sysimage/rpm")).unwrap()
    }

    /// Every file under the root with its size, to prove scanning creates nothing.
    fn listing(&self) -> BTreeMap<PathBuf, u64> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, u64>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let meta = std::fs::symlink_metadata(e.path()).unwrap();
                if meta.is_dir() {
                    walk(&e.path(), out);
                }
                out.insert(e.path(), meta.len());
            }
        }
        let mut out = BTreeMap::new();
        walk(self.path(), &mut out);
        out
    }
}

/// What `guestwatch-agent scan --root` does, through the library.
struct Scanned {
    scan: rpmdb::Scan,
    system: SystemInfo,
    document: Document,
    facts: Facts,
    package_db: String,
}

fn scan(root: &Path) -> Scanned {
    let dir = rpmdb::locate(root).unwrap();
    let scan = rpmdb::read_with(rpmdb::Source::Root(root), &rpmdb::ReadOptions::default()).unwrap();
    assert_eq!(scan.path.parent(), Some(dir.as_path()));
    let system = SystemInfo::read(root);
    let shown = format!("/{}", scan.path.strip_prefix(root).unwrap().display());
    let package_db = report::package_db(scan.backend, &dir, Some(root));
    let document = report::inventory::document(
        &report::inventory::Scanned {
            scan: &scan,
            system: &system,
            package_db: package_db.clone(),
            database: shown,
            scan_duration_ms: None,
        },
        Default::default(),
    );
    let facts = Facts::of_document("test", &document);
    Scanned {
        scan,
        system,
        document,
        facts,
        package_db,
    }
}

impl Scanned {
    fn input(&self) -> ReportInput<'_> {
        ReportInput {
            packages: &self.scan.packages,
            package_db: &self.package_db,
            system: &self.system,
            facts: &self.facts,
        }
    }

    fn claircore(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&claircore::render(&self.document, &self.facts)).unwrap()
    }

    fn claircore_json(&self) -> Value {
        serde_json::from_slice(&self.claircore()).unwrap()
    }
}

/// `rpm -qa` of a private copy of the root's database: the independent list every report is
/// checked against (name, evr, arch, source rpm).
fn rpm_qa(root: &Path) -> BTreeSet<(String, String, String, String)> {
    let copy = TempDir::new().unwrap();
    for f in std::fs::read_dir(root.join("usr/lib/sysimage/rpm")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
    }
    let out = Command::new("rpm")
        .arg("--dbpath")
        .arg(copy.path())
        .args([
            "-qa",
            "--qf",
            "%{NAME}|%|EPOCH?{%{EPOCH}:}|%{VERSION}-%{RELEASE}|%{ARCH}|%{SOURCERPM}\n",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("gpg-pubkey|"))
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (
                f[0].to_owned(),
                f[1].to_owned(),
                f[2].to_owned(),
                f[3].to_owned(),
            )
        })
        .collect()
}

/// Builds each package on its own (one spec file cannot hold two versions of one name).
fn build_each(specs: &[PackageSpec], out: &Path) -> Vec<PathBuf> {
    specs
        .iter()
        .map(|s| {
            build_packages(std::slice::from_ref(s), out)
                .unwrap()
                .remove(0)
        })
        .collect()
}

fn repository_of<'a>(doc: &'a Value, name: &str, version: &str) -> Option<&'a str> {
    let (id, _) = doc["packages"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, p)| p["name"] == name && p["version"] == version)
        .unwrap_or_else(|| panic!("{name} {version} not in the report"));
    let env = &doc["environments"][id][0];
    let repos = env["repository_ids"].as_array().unwrap();
    assert!(repos.len() <= 1);
    repos.first().map(|r| {
        doc["repositories"][r.as_str().unwrap()]["name"]
            .as_str()
            .unwrap()
    })
}

fn rhel_root_with_dnf4_history() -> Root {
    Root::new(RHEL_OS_RELEASE).with_history(
        "claircore_dnf4-history",
        "history.sqlite",
        "var/lib/dnf/history.sqlite",
    )
}

/// Two builds of apr-util-bdb: the one dnf's history says came from appstream, and one it
/// never installed.
fn apr_util_bdb_builds(out: &Path) -> Vec<PathBuf> {
    build_each(
        &[
            PackageSpec::new("apr-util-bdb", "1.6.1", "23.el9").host_arch(),
            PackageSpec::new("apr-util-bdb", "1.7.1", "23.el9").host_arch(),
        ],
        out,
    )
}

#[test]
fn rhel_like_root_with_dnf4_history_reports_everything() {
    if !rpm_tools("rhel_like_root_with_dnf4_history_reports_everything") {
        return;
    }
    let root = rhel_root_with_dnf4_history();
    let rpms = TempDir::new().unwrap();
    let built = apr_util_bdb_builds(rpms.path());
    root.rpmdb().install(&built).unwrap();

    let before = root.listing();
    let scanned = scan(root.path());
    let doc = scanned.claircore_json();
    assert_eq!(
        root.listing(),
        before,
        "scanning created or changed files in the root"
    );

    // Every package rpm lists, with its version, arch and source package.
    let expected = rpm_qa(root.path());
    assert_eq!(
        expected.len(),
        131,
        "129 Mariner packages and the two added"
    );
    let got: BTreeSet<(String, String, String, String)> = doc["packages"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| {
            assert_eq!(p["kind"], "binary");
            assert_eq!(p["package_db"], "sqlite:usr/lib/sysimage/rpm");
            let source = &p["source"];
            assert_eq!(source["kind"], "source");
            let (name, version) = (p["name"].as_str().unwrap(), p["version"].as_str().unwrap());
            // The source rpm's file name, rebuilt from the report's source package.
            let vr = source["version"].as_str().unwrap();
            let vr = vr.split_once(':').map_or(vr, |(_, vr)| vr);
            (
                name.to_owned(),
                version.to_owned(),
                p["arch"].as_str().unwrap().to_owned(),
                format!("{}-{vr}.src.rpm", source["name"].as_str().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, expected);
    let curl = doc["packages"]
        .as_object()
        .unwrap()
        .values()
        .find(|p| p["name"] == "curl")
        .unwrap();
    assert_eq!(
        (
            curl["version"].as_str(),
            curl["source"]["name"].as_str(),
            curl["source"]["version"].as_str()
        ),
        (Some("7.76.0-6.cm2"), Some("curl"), Some("7.76.0-6.cm2"))
    );

    // The distribution, with its CPE, linked from every environment.
    let dists = doc["distributions"].as_object().unwrap();
    assert_eq!(dists.len(), 1);
    let (dist_id, dist) = dists.iter().next().unwrap();
    assert_eq!(dist["did"], "rhel");
    assert_eq!(dist["version_id"], "9.4");
    assert_eq!(dist["pretty_name"], "Red Hat Enterprise Linux 9.4 (Plow)");
    assert_eq!(dist["cpe"], "cpe:/o:redhat:enterprise_linux:9::baseos");
    for envs in doc["environments"].as_object().unwrap().values() {
        assert_eq!(envs[0]["distribution_id"], dist_id.as_str());
    }

    // Repository links from dnf4's history: claircore's expectations for this database.
    assert_eq!(
        repository_of(&doc, "apr-util-bdb", "1.6.1-23.el9"),
        Some("rhel-9-for-x86_64-appstream-rpms")
    );
    assert_eq!(repository_of(&doc, "apr-util-bdb", "1.7.1-23.el9"), None);
    assert_eq!(repository_of(&doc, "curl", "7.76.0-6.cm2"), None);
    assert_eq!(doc["repositories"].as_object().unwrap().len(), 1);
    let apr = doc["packages"]
        .as_object()
        .unwrap()
        .values()
        .find(|p| p["version"] == "1.6.1-23.el9")
        .unwrap();
    assert_eq!(
        apr["repository_hint"],
        "repoid=rhel-9-for-x86_64-appstream-rpms"
    );

    // The facts.
    let facts = &doc["guestwatch"];
    assert_eq!(facts["backend"], "sqlite");
    assert_eq!(facts["database"], "/usr/lib/sysimage/rpm/rpmdb.sqlite");
    assert_eq!(facts["package_count"], 131);
    assert_eq!(
        facts["errors"],
        serde_json::json!([]),
        "no problems in a complete root"
    );
    assert_eq!(
        doc["manifest_hash"],
        format!("sha256:{}", facts["content_hash"].as_str().unwrap())
    );
    assert!(facts.get("scan_duration_ms").is_none());
    assert_eq!(doc["success"], true);
}

#[test]
fn same_root_twice_is_byte_identical_and_one_upgrade_is_one_change() {
    if !rpm_tools("same_root_twice_is_byte_identical_and_one_upgrade_is_one_change") {
        return;
    }
    let root = rhel_root_with_dnf4_history();
    let rpms = TempDir::new().unwrap();
    let built = apr_util_bdb_builds(rpms.path());
    root.rpmdb().install(&built[..1]).unwrap();
    let first = scan(root.path());
    let again = scan(root.path());
    assert_eq!(
        first.claircore(),
        again.claircore(),
        "the same root must give the same bytes"
    );
    let bom = |s: &Scanned| serde_json::to_vec(&cyclonedx::bom(&s.input())).unwrap();
    assert_eq!(bom(&first), bom(&again));

    root.rpmdb().upgrade(&built[1..]).unwrap();
    let upgraded = scan(root.path());
    assert_ne!(first.claircore(), upgraded.claircore());
    let changes = report::changes::between(&first.document.packages, &upgraded.document.packages);
    assert_eq!(changes.upgraded.len(), 1, "{changes:?}");
    assert!(
        changes.added.is_empty() && changes.removed.is_empty(),
        "{changes:?}"
    );
    let c = &changes.upgraded[0];
    assert_eq!(
        (c.name.as_str(), c.from.as_str(), c.to.as_str()),
        ("apr-util-bdb", "1.6.1-23.el9", "1.7.1-23.el9")
    );
}

#[test]
fn dnf5_history_links_repositories() {
    if !rpm_tools("dnf5_history_links_repositories") {
        return;
    }
    let root = Root::new("ID=fedora\nVERSION_ID=42\nNAME=Fedora Linux\n").with_history(
        "claircore_dnf5-history",
        "transaction_history.sqlite",
        "usr/lib/sysimage/libdnf5/transaction_history.sqlite",
    );
    let rpms = TempDir::new().unwrap();
    let specs = [
        PackageSpec::new("dnf5", "5.2.12.0", "1.fc42").host_arch(),
        PackageSpec::new("dnf5", "5.2.12.0", "1.fc42.local1").host_arch(),
    ];
    root.rpmdb()
        .install(&build_each(&specs, rpms.path()))
        .unwrap();
    let scanned = scan(root.path());
    assert_eq!(
        scanned.system.history.as_deref(),
        Some("/usr/lib/sysimage/libdnf5/transaction_history.sqlite")
    );
    let doc = scanned.claircore_json();
    assert_eq!(
        repository_of(&doc, "dnf5", "5.2.12.0-1.fc42"),
        Some("aea2214b263845539cc9b774ac8dd4c7")
    );
    assert_eq!(repository_of(&doc, "dnf5", "5.2.12.0-1.fc42.local1"), None);
    // NAME is unquoted but has a space: recorded, and the rest still read.
    assert_eq!(
        doc["distributions"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()["did"],
        "fedora"
    );
    let errors = doc["guestwatch"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .contains("/etc/os-release line 3"),
        "{errors:?}"
    );
}

#[test]
fn problems_with_the_rest_of_the_system_are_recorded_not_fatal() {
    // Malformed os-release (no ID, a bad line), an unreadable history database, and the CPE
    // from etc/system-release-cpe.
    let root = Root::new("NAME='unterminated\nVERSION_ID=2.0\n");
    std::fs::write(
        root.path().join("etc/system-release-cpe"),
        "cpe:/o:microsoft:mariner:2.0\n",
    )
    .unwrap();
    let hist = root.path().join("var/lib/dnf/history.sqlite");
    std::fs::create_dir_all(hist.parent().unwrap()).unwrap();
    std::fs::write(&hist, "this is not a database").unwrap();
    let scanned = scan(root.path());
    let doc = scanned.claircore_json();
    assert_eq!(doc["success"], true);
    assert_eq!(doc["packages"].as_object().unwrap().len(), 129);
    assert!(doc["distributions"].as_object().unwrap().is_empty());
    assert!(doc["repositories"].as_object().unwrap().is_empty());
    let errors: Vec<&str> = doc["guestwatch"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with("/etc/os-release line 1: bad quoting"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("/etc/os-release: no ID"),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with("/var/lib/dnf/history.sqlite: dnf history unreadable"),
        "{errors:?}"
    );

    // A valid os-release without CPE_NAME takes the CPE from system-release-cpe.
    std::fs::write(
        root.path().join("usr/lib/os-release"),
        "ID=mariner\nVERSION_ID=\"2.0\"\n",
    )
    .unwrap();
    std::fs::remove_file(&hist).unwrap();
    let info = SystemInfo::read(root.path());
    assert_eq!(
        info.distribution.as_ref().unwrap().cpe,
        "cpe:/o:microsoft:mariner:2.0"
    );
    assert_eq!(info.problems.len(), 1, "{:?}", info.problems);
    assert!(
        info.problems[0].starts_with("dnf history: not found"),
        "{:?}",
        info.problems
    );

    // No os-release at all.
    std::fs::remove_file(root.path().join("usr/lib/os-release")).unwrap();
    let info = SystemInfo::read(root.path());
    assert!(info.distribution.is_none());
    assert!(
        info.problems[0].starts_with("os-release: not found"),
        "{:?}",
        info.problems
    );
}

#[test]
fn symlinks_never_leave_the_root() {
    // /etc/os-release pointing far above the root resolves inside it (to nothing here), not to
    // the host's /etc/os-release.
    let root = Root::new("ID=inside\n");
    std::fs::remove_file(root.path().join("etc/os-release")).unwrap();
    std::fs::remove_file(root.path().join("usr/lib/os-release")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../../../../../etc/os-release",
        root.path().join("etc/os-release"),
    )
    .unwrap();
    let info = SystemInfo::read(root.path());
    assert!(
        info.distribution.is_none(),
        "read the host's os-release: {:?}",
        info.distribution
    );
}

#[test]
fn os_release_and_histories_outside_the_root_are_never_read() {
    let root = Root::new("ID=inside\n");
    let r = root.path();
    let host = TempDir::new_in(r.parent().unwrap()).unwrap();
    let h = host.path();
    std::fs::write(h.join("os-release"), "ID=outside\nCPE_NAME=outside\n").unwrap();
    std::fs::write(h.join("cpe"), "cpe:/o:outside\n").unwrap();
    std::fs::copy(
        fixtures().join("claircore_dnf4-history/history.sqlite"),
        h.join("history.sqlite"),
    )
    .unwrap();
    let no_outside = |info: &SystemInfo| {
        assert!(
            info.distribution
                .as_ref()
                .is_none_or(|d| d.did != "outside" && !d.cpe.contains("outside")),
            "read the host's os-release: {:?}",
            info.distribution
        );
        assert_eq!(info.repository_ids().count(), 0, "read the host's history");
    };

    // os-release: an absolute link out (resolves inside the root, to nothing), then a hard link.
    std::fs::remove_file(r.join("etc/os-release")).unwrap();
    std::fs::remove_file(r.join("usr/lib/os-release")).unwrap();
    std::os::unix::fs::symlink(h.join("os-release"), r.join("etc/os-release")).unwrap();
    let info = SystemInfo::read(r);
    no_outside(&info);
    assert!(
        info.problems[0].starts_with("os-release: not found"),
        "{:?}",
        info.problems
    );
    std::fs::remove_file(r.join("etc/os-release")).unwrap();
    std::fs::hard_link(h.join("os-release"), r.join("etc/os-release")).unwrap();
    let info = SystemInfo::read(r);
    no_outside(&info);
    assert!(
        info.problems[0].starts_with("/etc/os-release: refused: 2 hard links"),
        "{:?}",
        info.problems
    );
    // system-release-cpe linked out.
    std::fs::remove_file(r.join("etc/os-release")).unwrap();
    std::fs::write(r.join("etc/os-release"), "ID=inside\n").unwrap();
    std::os::unix::fs::symlink(h.join("cpe"), r.join("etc/system-release-cpe")).unwrap();
    let info = SystemInfo::read(r);
    no_outside(&info);
    assert_eq!(info.distribution.as_ref().unwrap().cpe, "");

    // dnf history: the file linked out (refused), hard-linked out (refused), its directory
    // linked out (resolved inside the root: not found).
    std::fs::create_dir_all(r.join("var/lib/dnf")).unwrap();
    std::os::unix::fs::symlink(
        h.join("history.sqlite"),
        r.join("var/lib/dnf/history.sqlite"),
    )
    .unwrap();
    let info = SystemInfo::read(r);
    no_outside(&info);
    assert!(
        info.problems.iter().any(|p| p.starts_with(
            "/var/lib/dnf/history.sqlite: dnf history unreadable: refused: a symbolic link"
        )),
        "{:?}",
        info.problems
    );
    std::fs::remove_file(r.join("var/lib/dnf/history.sqlite")).unwrap();
    std::fs::hard_link(
        h.join("history.sqlite"),
        r.join("var/lib/dnf/history.sqlite"),
    )
    .unwrap();
    let info = SystemInfo::read(r);
    no_outside(&info);
    assert!(
        info.problems
            .iter()
            .any(|p| p.contains("refused: 2 hard links")),
        "{:?}",
        info.problems
    );
    std::fs::remove_file(r.join("var/lib/dnf/history.sqlite")).unwrap();
    std::fs::remove_dir(r.join("var/lib/dnf")).unwrap();
    std::os::unix::fs::symlink(h, r.join("var/lib/dnf")).unwrap();
    let info = SystemInfo::read(r);
    no_outside(&info);
    assert!(
        info.problems
            .iter()
            .any(|p| p.starts_with("dnf history: not found")),
        "{:?}",
        info.problems
    );
    // The same history inside the root is read (the checks above are not just failing).
    std::fs::remove_file(r.join("var/lib/dnf")).unwrap();
    std::fs::create_dir_all(r.join("var/lib/dnf")).unwrap();
    std::fs::copy(
        h.join("history.sqlite"),
        r.join("var/lib/dnf/history.sqlite"),
    )
    .unwrap();
    assert!(SystemInfo::read(r).repository_ids().count() > 0);
}

#[test]
fn hostile_history_schemas_are_refused() {
    // dnf4's trans_item replaced by a view over a query that never ends, then by a virtual
    // table: refused by the schema check, quickly, as a problem.
    for (what, sql) in [
        (
            "is a view",
            "ALTER TABLE trans_item RENAME TO t0;
             CREATE VIEW trans_item AS WITH RECURSIVE c(id, trans_id, item_id, repo_id, action) AS
               (SELECT 1, 1, 1, 1, 1 UNION ALL SELECT id + 1, 1, 1, 1, 1 FROM c) SELECT * FROM c;",
        ),
        (
            "virtual table",
            "ALTER TABLE trans_item RENAME TO t0;
             CREATE VIRTUAL TABLE trans_item USING fts5(id, trans_id, item_id, repo_id, action);",
        ),
        (
            "generated",
            "ALTER TABLE repo RENAME TO r0;
             CREATE TABLE repo (id INTEGER PRIMARY KEY, repoid TEXT AS (zeroblob(100000000)));",
        ),
    ] {
        let root = Root::new("ID=rhel\n");
        let hist = root.path().join("var/lib/dnf/history.sqlite");
        std::fs::create_dir_all(hist.parent().unwrap()).unwrap();
        std::fs::copy(
            fixtures().join("claircore_dnf4-history/history.sqlite"),
            &hist,
        )
        .unwrap();
        {
            let c = rusqlite::Connection::open(&hist).unwrap();
            c.pragma_update(None, "journal_mode", "delete").unwrap();
            c.execute_batch(sql).unwrap();
        }
        let started = std::time::Instant::now();
        let info = SystemInfo::read(root.path());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{what}: slow"
        );
        assert_eq!(info.repository_ids().count(), 0, "{what}");
        assert!(
            info.problems
                .iter()
                .any(|p| p.contains("dnf history unreadable") && p.contains(what)),
            "{what}: {:?}",
            info.problems
        );
    }
}

#[test]
fn system_reader_rereads_only_after_a_change() {
    let root = Root::new("ID=rhel\nVERSION_ID=9.3\n");
    let mut reader = SystemReader::new(root.path());
    assert_eq!(reader.read().distribution.unwrap().version_id, "9.3");
    // Same size, so only the mtime/inode tell the change apart: write a new file and rename.
    let tmp = root.path().join("usr/lib/os-release.new");
    std::fs::write(&tmp, "ID=rhel\nVERSION_ID=9.4\n").unwrap();
    std::fs::rename(&tmp, root.path().join("usr/lib/os-release")).unwrap();
    assert_eq!(reader.read().distribution.unwrap().version_id, "9.4");
}

/// The Python interpreter of the CycloneDX validator venv that `cargo xtask setup` makes.
fn cyclonedx_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GUESTWATCH_CYCLONEDX_PYTHON") {
        return Some(p.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    Some(target.join("tools/cyclonedx-venv/bin/python")).filter(|p| p.is_file())
}

#[test]
fn cyclonedx_validates_against_the_1_6_schema() {
    let root = Root::new(RHEL_OS_RELEASE);
    let scanned = scan(root.path());
    let bom = serde_json::to_vec_pretty(&cyclonedx::bom(&scanned.input())).unwrap();
    let doc: Value = serde_json::from_slice(&bom).unwrap();
    let components = doc["components"].as_array().unwrap();
    assert_eq!(components.len(), 129);
    let curl = components.iter().find(|c| c["name"] == "curl").unwrap();
    assert_eq!(
        curl["purl"],
        "pkg:rpm/rhel/curl@7.76.0-6.cm2?arch=x86_64&distro=rhel-9.4"
    );
    assert_eq!(curl["licenses"][0]["license"]["name"], "MIT");
    assert_eq!(curl["supplier"]["name"], "Microsoft Corporation");
    assert_eq!(doc["metadata"]["component"]["type"], "operating-system");
    assert_eq!(
        doc["metadata"]["component"]["cpe"],
        "cpe:/o:redhat:enterprise_linux:9::baseos"
    );

    let Some(python) = cyclonedx_python() else {
        assert!(
            !in_ci(),
            "the CycloneDX validator venv is missing in CI (cargo xtask setup makes it)"
        );
        println!(
            "SKIPPED: CycloneDX schema validation: no validator venv (run `cargo xtask setup`)"
        );
        return;
    };
    let validate = |bytes: &[u8]| {
        let mut child = Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/validate_cyclonedx.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = validate(&bom);
    assert!(
        out.status.success(),
        "invalid CycloneDX 1.6: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The validator itself must reject a document that breaks the schema.
    let mut broken = doc.clone();
    broken["components"][0]["bogus"] = Value::Bool(true);
    assert!(
        !validate(&serde_json::to_vec(&broken).unwrap())
            .status
            .success(),
        "the validator accepted an invalid BOM"
    );
}

/// The dictionary shipped in `protocol` earns its place on a real database it was not trained
/// on (CBL-Mariner 2.0): smaller than zstd 19 alone, within 40 bytes a package.
#[test]
fn the_shipped_dictionary_shrinks_a_real_inventory() {
    let dir = fixtures().join("go-rpmdb_cbl-mariner-2.0");
    let scan = rpmdb::read_with(rpmdb::Source::Path(&dir), &rpmdb::ReadOptions::default()).unwrap();
    let system = SystemInfo::none();
    let doc = report::inventory::document(
        &report::inventory::Scanned {
            scan: &scan,
            system: &system,
            package_db: "sqlite:var/lib/rpm".into(),
            database: "/var/lib/rpm/rpmdb.sqlite".into(),
            scan_duration_ms: None,
        },
        Default::default(),
    );
    let bytes = doc.to_bytes();
    let sent = guestwatch_protocol::Payload::document(bytes.clone());
    let plain = zstd::bulk::compress(&bytes, 19).unwrap();
    let per_package = sent.bytes.len() as f64 / doc.packages.len() as f64;
    assert!(
        sent.bytes.len() < plain.len() && per_package <= 40.0,
        "{} bytes with the dictionary ({per_package:.1} a package), {} without",
        sent.bytes.len(),
        plain.len()
    );
    assert_eq!(sent.to_document(1 << 24).unwrap().as_ref(), bytes);
}
