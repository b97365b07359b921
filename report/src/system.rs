//! What a root says about itself besides its rpm database: the distribution (`os-release`,
//! `system-release-cpe`) and the repository each package was installed from (dnf history).
//!
//! Everything here is best effort: a missing or malformed file becomes a problem recorded in
//! [`SystemInfo::problems`], never an error, because only an unreadable rpm database makes a
//! report worthless. These are the guest's files and as hostile as its rpm database: each is
//! resolved inside the root ([`rpmdb::confine`]: symlinks followed as if the root were `/`,
//! never out of it), must be a regular file (single-linked under a root that is not `/`), is
//! read through the descriptor that was checked, and the dnf histories are opened with the
//! same SQLite defences and deadline as the rpm database, with their own schema checks.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use rpmdb::{
    DbError, Package, ReadOptions,
    confine::{Root, Stamp},
};
use rusqlite::Connection;

/// Where a root's `os-release` lives, in the order systemd reads them.
const OS_RELEASE: &[&str] = &["etc/os-release", "usr/lib/os-release"];
const SYSTEM_RELEASE_CPE: &str = "etc/system-release-cpe";
const DNF4_HISTORY: &str = "var/lib/dnf/history.sqlite";
const DNF5_HISTORY: &str = "usr/lib/sysimage/libdnf5/transaction_history.sqlite";
/// `os-release` is a few hundred bytes; anything far larger is not one.
const MAX_OS_RELEASE: u64 = 64 * 1024;

pub use guestwatch_protocol::inventory::Distribution;

/// A package's identity in dnf's history: rpm stores "no epoch" where dnf stores 0.
type HistoryKey = (String, u32, String, String, String);

/// The facts a root gives about itself.
#[derive(Clone, Debug, Default)]
pub struct SystemInfo {
    pub distribution: Option<Distribution>,
    /// Which history database the repositories came from, relative to the root.
    pub history: Option<String>,
    repos: BTreeMap<HistoryKey, String>,
    /// What could not be read, for the report's facts.
    pub problems: Vec<String>,
}

impl SystemInfo {
    /// Facts of nothing: a database scanned directly (`--dbpath`) has no root to read.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads the distribution and dnf history of the system at `root`, within
    /// [`rpmdb::DEFAULT_TIMEOUT`].
    pub fn read(root: &Path) -> Self {
        Self::read_with(root, &ReadOptions::timeout(rpmdb::DEFAULT_TIMEOUT))
    }

    /// Reads the distribution and dnf history of the system at `root`; the history read is
    /// abandoned (a problem) at the options' deadline.
    pub fn read_with(root: &Path, options: &ReadOptions) -> Self {
        let mut info = Self::default();
        let root = match Root::open(root) {
            Ok(root) => root,
            Err(e) => {
                info.problems.push(format!("root unreadable: {e}"));
                return info;
            }
        };
        info.distribution = read_distribution(&root, &mut info.problems);
        read_history(&root, &mut info, options);
        info
    }

    /// The repository id dnf recorded for this installed package, if any.
    pub fn repository_of(&self, p: &Package) -> Option<&str> {
        if self.repos.is_empty() {
            return None;
        }
        let key = (
            p.name.clone(),
            p.epoch.unwrap_or(0),
            p.version.clone(),
            p.release.clone(),
            p.arch.clone().unwrap_or_default(),
        );
        self.repos.get(&key).map(String::as_str)
    }

    /// Every repository id the history knows an installed-from for.
    pub fn repository_ids(&self) -> impl Iterator<Item = &str> {
        let mut ids: Vec<&str> = self.repos.values().map(String::as_str).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
    }
}

/// Reads a root's [`SystemInfo`] again only when one of its files changed: the agent scans
/// after every transaction, and a dnf history can be megabytes.
#[derive(Debug)]
pub struct SystemReader {
    root: PathBuf,
    last: Option<(Vec<Option<Stamp>>, SystemInfo)>,
}

impl SystemReader {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            last: None,
        }
    }

    /// The system's facts, read now or reused if no file they come from changed.
    pub fn read(&mut self) -> SystemInfo {
        self.read_with(&ReadOptions::timeout(rpmdb::DEFAULT_TIMEOUT))
    }

    /// [`SystemReader::read`] with the scan's options (its deadline).
    pub fn read_with(&mut self, options: &ReadOptions) -> SystemInfo {
        let stamps = self.stamps();
        if let Some((seen, info)) = &self.last
            && *seen == stamps
        {
            return info.clone();
        }
        let info = SystemInfo::read_with(&self.root, options);
        // A read cut short by the deadline is not remembered: the next scan reads again.
        if !info.problems.iter().any(|p| p.contains("deadline")) {
            self.last = Some((stamps, info.clone()));
        }
        info
    }

    /// The state of every file the facts come from, resolved inside the root like the reads.
    fn stamps(&self) -> Vec<Option<Stamp>> {
        let Ok(root) = Root::open(&self.root) else {
            return Vec::new();
        };
        let histories = [DNF5_HISTORY, DNF4_HISTORY]
            .into_iter()
            .flat_map(|h| [h.to_owned(), format!("{h}-wal")]);
        OS_RELEASE
            .iter()
            .map(|s| (*s).to_owned())
            .chain([SYSTEM_RELEASE_CPE.to_owned()])
            .chain(histories)
            .map(|rel| root.stamp(Path::new(&rel)))
            .collect()
    }
}

/// Whether an error only says the file is not there (then the next candidate is tried).
fn absent(e: &DbError) -> bool {
    matches!(e, DbError::Io { source, .. }
        if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory))
}

fn read_distribution(root: &Root, problems: &mut Vec<String>) -> Option<Distribution> {
    let mut found = None;
    for rel in OS_RELEASE {
        match root.open_file(Path::new(rel)) {
            Ok(file) => {
                found = Some((*rel, file));
                break;
            }
            Err(e) if absent(&e) => continue,
            // There but refused (a fifo, a hard link, …): systemd would not look further.
            Err(e) => {
                problems.push(format!("/{rel}: {}", reason(&e)));
                return None;
            }
        }
    }
    let Some((shown, file)) = found else {
        problems
            .push("os-release: not found (looked for /etc/os-release, /usr/lib/os-release)".into());
        return None;
    };
    let text = match read_small(&file, MAX_OS_RELEASE) {
        Ok(text) => text,
        Err(e) => {
            problems.push(format!("/{shown}: {e}"));
            return None;
        }
    };
    let fields = parse_os_release(&text, &format!("/{shown}"), problems);
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let mut distribution = Distribution {
        did: get("ID"),
        name: get("NAME"),
        version: get("VERSION"),
        version_id: get("VERSION_ID"),
        version_code_name: get("VERSION_CODENAME"),
        pretty_name: get("PRETTY_NAME"),
        cpe: get("CPE_NAME"),
    };
    if distribution.cpe.is_empty() {
        match root
            .open_file(Path::new(SYSTEM_RELEASE_CPE))
            .map_err(|e| reason(&e))
            .and_then(|f| read_small(&f, MAX_OS_RELEASE))
        {
            Ok(text) => distribution.cpe = text.trim().to_owned(),
            Err(e) if e.contains("No such file") || e.contains("Not a directory") => {}
            Err(e) => problems.push(format!("/{SYSTEM_RELEASE_CPE}: {e}")),
        }
    }
    if distribution.did.is_empty() {
        problems.push(format!("/{shown}: no ID; the distribution is unknown"));
        return None;
    }
    Some(distribution)
}

/// An error's text without the host path it starts with (problems name the file in-root).
fn reason(e: &DbError) -> String {
    match e {
        DbError::Io { source, .. } => source.to_string(),
        DbError::NotRegular { kind, .. } => format!("refused: {kind}, not a regular file"),
        DbError::HardLinked { links, .. } => {
            format!("refused: {links} hard links (another one may be outside the root)")
        }
        other => other.to_string(),
    }
}

fn read_small(file: &rpmdb::confine::Opened, limit: u64) -> Result<String, String> {
    let bytes = file.read_all(limit).map_err(|e| match e {
        DbError::Limit { .. } => format!("larger than {limit} bytes"),
        other => reason(&other),
    })?;
    String::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())
}

/// Parses `os-release(5)`: `KEY=value` lines, values optionally in single or double quotes with
/// shell-style backslash escapes inside double quotes. Bad lines are recorded and skipped.
pub fn parse_os_release(
    text: &str,
    shown: &str,
    problems: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("{shown} line {}: {why}", n + 1);
        let Some((key, raw)) = line.split_once('=') else {
            problems.push(bad("not KEY=value"));
            continue;
        };
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            problems.push(bad("bad key"));
            continue;
        }
        match unquote(raw) {
            Some(value) => {
                fields.insert(key.to_owned(), value);
            }
            None => problems.push(bad("bad quoting")),
        }
    }
    fields
}

fn unquote(raw: &str) -> Option<String> {
    let Some(quote) = raw.chars().next().filter(|c| *c == '"' || *c == '\'') else {
        // Unquoted values may not contain shell specials.
        return (!raw.contains(|c: char| c.is_whitespace() || "\"'`$\\".contains(c)))
            .then(|| raw.to_owned());
    };
    let inner = raw.strip_prefix(quote)?.strip_suffix(quote)?;
    if quote == '\'' {
        return (!inner.contains('\'')).then(|| inner.to_owned());
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' | '`' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Which history schema a file has.
#[derive(Clone, Copy)]
enum Dnf {
    V4,
    V5,
}

fn read_history(root: &Root, info: &mut SystemInfo, options: &ReadOptions) {
    // dnf5 is newer: a system upgraded from dnf4 keeps the old file around, stale.
    for (rel, dnf) in [(DNF5_HISTORY, Dnf::V5), (DNF4_HISTORY, Dnf::V4)] {
        let rel_path = Path::new(rel);
        let (Some(parent), Some(name)) = (
            rel_path.parent(),
            rel_path.file_name().and_then(|n| n.to_str()),
        ) else {
            continue;
        };
        // The directory is resolved inside the root; the file in it is never a link.
        let dir = match root.open_dir(parent) {
            Ok(dir) => dir,
            Err(e) if absent(&e) => continue,
            Err(e) => {
                info.problems
                    .push(format!("/{rel}: dnf history unreadable: {}", reason(&e)));
                return;
            }
        };
        match dir.entry(name) {
            Ok(Some(_)) => {}
            Ok(None) => continue,
            Err(e) => {
                info.problems
                    .push(format!("/{rel}: dnf history unreadable: {}", reason(&e)));
                return;
            }
        }
        match read_repos(&dir, name, dnf, options) {
            Ok(repos) => {
                info.repos = repos;
                info.history = Some(format!("/{rel}"));
            }
            Err(e) => info
                .problems
                .push(format!("/{rel}: dnf history unreadable: {}", reason(&e))),
        }
        return;
    }
    info.problems.push(format!(
        "dnf history: not found (looked for /{DNF5_HISTORY}, /{DNF4_HISTORY}); repositories unknown"
    ));
}

/// dnf4 keeps the action as a number: 8 is "Removed".
const DNF4_QUERY: &str = "SELECT r.name, r.epoch, r.version, r.release, r.arch, repo.repoid
    FROM trans_item ti
    JOIN rpm r ON r.item_id = ti.item_id
    JOIN repo ON repo.id = ti.repo_id
    WHERE ti.action <> 8
    ORDER BY ti.trans_id, ti.id";
const DNF5_QUERY: &str = "SELECT n.name, r.epoch, r.version, r.release, a.name, repo.repoid
    FROM trans_item ti
    JOIN rpm r ON r.item_id = ti.item_id
    JOIN pkg_name n ON n.id = r.name_id
    JOIN arch a ON a.id = r.arch_id
    JOIN repo ON repo.id = ti.repo_id
    JOIN trans_item_action act ON act.id = ti.action_id
    WHERE act.name <> 'Remove'
    ORDER BY ti.trans_id, ti.id";

/// The tables and columns each query reads: each must be an ordinary table (not a view or a
/// virtual table) with those columns stored, not generated.
const DNF4_TABLES: &[(&str, &[&str])] = &[
    (
        "trans_item",
        &["id", "trans_id", "item_id", "repo_id", "action"],
    ),
    (
        "rpm",
        &["item_id", "name", "epoch", "version", "release", "arch"],
    ),
    ("repo", &["id", "repoid"]),
];
const DNF5_TABLES: &[(&str, &[&str])] = &[
    (
        "trans_item",
        &["id", "trans_id", "item_id", "repo_id", "action_id"],
    ),
    (
        "rpm",
        &[
            "item_id", "name_id", "epoch", "version", "release", "arch_id",
        ],
    ),
    ("pkg_name", &["id", "name"]),
    ("arch", &["id", "name"]),
    ("repo", &["id", "repoid"]),
    ("trans_item_action", &["id", "name"]),
];

/// Maps every package dnf installed to its repository; later transactions win (a reinstall
/// from another repository).
fn read_repos(
    dir: &rpmdb::confine::Dir,
    name: &str,
    dnf: Dnf,
    options: &ReadOptions,
) -> Result<BTreeMap<HistoryKey, String>, DbError> {
    let (query, tables) = match dnf {
        Dnf::V4 => (DNF4_QUERY, DNF4_TABLES),
        Dnf::V5 => (DNF5_QUERY, DNF5_TABLES),
    };
    rpmdb::sqlite::with_snapshot(dir, name, options, |path: &Path, conn: &Connection| {
        for (table, columns) in tables {
            rpmdb::sqlite::require_table(conn, path, table, columns, options)?;
        }
        let err = |e: rusqlite::Error| rpmdb::sqlite::classify(path, e, options);
        let mut statement = conn.prepare(query).map_err(err)?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    (
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                    ),
                    row.get::<_, String>(5)?,
                ))
            })
            .map_err(err)?;
        let mut repos = BTreeMap::new();
        for row in rows {
            let ((name, epoch, version, release, arch), repoid) = row.map_err(err)?;
            // A history with an epoch outside rpm's range names no installable package.
            let Ok(epoch) = u32::try_from(epoch) else {
                continue;
            };
            repos.insert((name, epoch, version, release, arch), repoid);
        }
        Ok(repos)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quoting() {
        let mut problems = Vec::new();
        let text = "# comment\nID=rhel\nNAME=\"Red Hat \\\"Enterprise\\\" Linux\"\nVERSION_ID='9.4'\n\nPRETTY_NAME=\"unterminated\nlower=x\nnonsense\nCPE_NAME=\"cpe:/o:redhat:enterprise_linux:9::baseos\"\n";
        let f = parse_os_release(text, "/etc/os-release", &mut problems);
        assert_eq!(f["ID"], "rhel");
        assert_eq!(f["NAME"], "Red Hat \"Enterprise\" Linux");
        assert_eq!(f["VERSION_ID"], "9.4");
        assert_eq!(f["CPE_NAME"], "cpe:/o:redhat:enterprise_linux:9::baseos");
        assert!(!f.contains_key("PRETTY_NAME"));
        assert_eq!(
            problems,
            vec![
                "/etc/os-release line 6: bad quoting",
                "/etc/os-release line 7: bad key",
                "/etc/os-release line 8: not KEY=value"
            ]
        );
    }

    #[test]
    fn unquoted_values_with_shell_specials_are_rejected() {
        assert_eq!(unquote("fedora"), Some("fedora".into()));
        assert_eq!(unquote("a b"), None);
        assert_eq!(unquote("$(id)"), None);
        assert_eq!(unquote("\"a`b\""), None);
        assert_eq!(unquote("''"), Some(String::new()));
    }
}
