//! Who runs a transaction: the facts the kernel recorded at its start, completed from `/proc`
//! while the process is alive (when its start record arrives), never when a report is built.
//!
//! The kernel gives ids, comm, the audit login uid and session, the parents' pids and comms
//! and the command line; `/proc` gives executables, the controlling terminal and the systemd
//! unit, and stands in for whatever the kernel could not read.

use guestwatch_protocol::guest;

use super::trigger::{Ancestor, Attribution};
use crate::bpf::TxRecord;

/// How much of a transaction's context is recorded (`--attribution`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttributionMode {
    /// Everything, command lines included.
    #[default]
    Full,
    /// No command lines (they can carry secrets an operator must not record).
    Minimal,
}

/// The `/proc` filesystem to read (a test can point it elsewhere).
#[derive(Clone, Debug)]
pub struct Procfs {
    root: std::path::PathBuf,
}

impl Default for Procfs {
    fn default() -> Self {
        Self {
            root: "/proc".into(),
        }
    }
}

impl Procfs {
    fn read(&self, pid: u32, file: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(pid.to_string()).join(file)).ok()
    }

    fn bytes(&self, pid: u32, file: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(pid.to_string()).join(file)).ok()
    }

    /// `/proc/<pid>/exe`.
    pub fn exe(&self, pid: u32) -> Option<String> {
        std::fs::read_link(self.root.join(pid.to_string()).join("exe"))
            .ok()
            .map(|p| p.display().to_string())
    }

    /// `/proc/<pid>/exe`, only while the process still has command name `comm` (as a record
    /// of it gave it): after an `execve` (a shell runs its last command in its own place) or
    /// once the pid is someone else's, the executable would name another program.
    pub fn exe_of(&self, pid: u32, comm: &str) -> Option<String> {
        let exe = self.exe(pid)?;
        let now = self.read(pid, "comm")?;
        (now.trim_end_matches('\n') == comm).then_some(exe)
    }

    /// Fields of `/proc/<pid>/stat` after the command name (which may hold spaces and
    /// parentheses, so it is skipped from its last `)`): index 0 is the state.
    fn stat_fields(&self, pid: u32) -> Option<Vec<String>> {
        let stat = self.read(pid, "stat")?;
        let rest = &stat[stat.rfind(')')? + 1..];
        Some(rest.split_whitespace().map(str::to_owned).collect())
    }

    fn ppid(&self, pid: u32) -> Option<u32> {
        self.stat_fields(pid)?.get(1)?.parse().ok()
    }

    /// The controlling terminal's name, from `tty_nr` in `/proc/<pid>/stat`.
    pub fn tty(&self, pid: u32) -> Option<String> {
        let nr: u32 = self.stat_fields(pid)?.get(4)?.parse().ok()?;
        tty_name(nr)
    }

    /// The systemd unit or scope the process belongs to.
    pub fn unit(&self, pid: u32) -> Option<String> {
        unit_of_cgroup(&self.read(pid, "cgroup")?)
    }

    fn audit_id(&self, pid: u32, file: &str) -> Option<u32> {
        let value: u32 = self.read(pid, file)?.trim().parse().ok()?;
        (value != u32::MAX).then_some(value)
    }

    fn comm(&self, pid: u32) -> Option<String> {
        Some(self.read(pid, "comm")?.trim_end_matches('\n').to_owned())
    }
}

/// `pts/3`, `tty1`, `ttyS0` from a `tty_nr` (`major << 8 | minor`, with the minor's high
/// bits above bit 20); `None` for no terminal.
pub fn tty_name(nr: u32) -> Option<String> {
    if nr == 0 {
        return None;
    }
    let major = (nr >> 8) & 0xfff;
    let minor = (nr & 0xff) | ((nr >> 12) & 0xfff00);
    Some(match major {
        136..=143 => format!("pts/{}", (major - 136) * 256 + minor),
        4 if minor < 64 => format!("tty{minor}"),
        4 => format!("ttyS{}", minor - 64),
        5 if minor == 1 => "console".to_owned(),
        _ => format!("{major}:{minor}"),
    })
}

/// The innermost systemd unit (`*.service`, `*.scope`) in a `/proc/<pid>/cgroup` text
/// (cgroup v2's `0::/path`, else v1's `name=systemd` hierarchy).
pub fn unit_of_cgroup(text: &str) -> Option<String> {
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| {
            text.lines()
                .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
        })?;
    path.rsplit('/')
        .find(|part| part.ends_with(".service") || part.ends_with(".scope"))
        .map(str::to_owned)
}

/// Splits a NUL-separated `argv` into at most 64 arguments and 4 KiB, with the userinfo of
/// URLs (`https://user:secret@host/…`) redacted.
pub fn command_line(argv: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut budget = guest::MAX_CMDLINE_BYTES;
    let trimmed = argv.strip_suffix(&[0]).unwrap_or(argv);
    if trimmed.is_empty() {
        return out;
    }
    for raw in trimmed.split(|&b| b == 0) {
        if out.len() == guest::MAX_CMDLINE_ARGS || budget == 0 {
            break;
        }
        let mut arg = redact_urls(&String::from_utf8_lossy(raw));
        if arg.len() > budget {
            let mut end = budget;
            while !arg.is_char_boundary(end) {
                end -= 1;
            }
            arg.truncate(end);
        }
        budget -= arg.len();
        out.push(arg);
    }
    out
}

/// Replaces the userinfo of every `scheme://userinfo@host` in `arg` with `REDACTED`.
pub fn redact_urls(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?' or '#'; userinfo is what precedes its last '@'.
        let end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("REDACTED");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The attribution of a transaction whose start record is `tx`, completed from `procfs`.
pub fn attribution(tx: &TxRecord, procfs: &Procfs, mode: AttributionMode) -> Attribution {
    let pid = tx.tgid;
    let mut ancestors: Vec<Ancestor> = tx
        .ancestors
        .iter()
        .take(guest::MAX_ANCESTORS)
        .map(|(pid, comm)| Ancestor {
            pid: *pid,
            comm: comm.clone(),
            exe: procfs.exe(*pid),
        })
        .collect();
    if ancestors.is_empty() {
        // The kernel could not walk the parents (no BTF offsets): /proc can, while they live.
        let mut at = pid;
        while ancestors.len() < guest::MAX_ANCESTORS {
            let Some(parent) = procfs.ppid(at).filter(|p| *p != 0 && *p != at) else {
                break;
            };
            ancestors.push(Ancestor {
                pid: parent,
                comm: procfs.comm(parent).unwrap_or_default(),
                exe: procfs.exe(parent),
            });
            at = parent;
        }
    }
    let cmdline = match mode {
        AttributionMode::Minimal => Vec::new(),
        AttributionMode::Full if !tx.cmdline.is_empty() => command_line(&tx.cmdline),
        AttributionMode::Full => command_line(&procfs.bytes(pid, "cmdline").unwrap_or_default()),
    };
    // A process gone before we looked still shares its terminal and unit with its parent.
    let alive_relative = std::iter::once(pid)
        .chain(ancestors.iter().map(|a| a.pid))
        .find(|p| procfs.root.join(p.to_string()).join("stat").exists());
    let tty = alive_relative.and_then(|p| procfs.tty(p));
    let unit = alive_relative.and_then(|p| procfs.unit(p));
    Attribution {
        pid,
        tid: tx.pid,
        uid: tx.uid,
        gid: tx.gid,
        comm: tx.comm.clone(),
        exe: procfs.exe(pid),
        loginuid: tx.loginuid.or_else(|| procfs.audit_id(pid, "loginuid")),
        sessionid: tx.sessionid.or_else(|| procfs.audit_id(pid, "sessionid")),
        tty,
        cmdline,
        ancestors,
        unit,
        ..Default::default()
    }
}

/// Whether `pid` still runs the process that started at boot time `start_ns` (a pid can be
/// reused once its process exits).
pub fn still_running(procfs: &Procfs, pid: u32, start_ns: u64) -> bool {
    let Some(fields) = procfs.stat_fields(pid) else {
        return false;
    };
    // Field 22 of stat (index 19 after the comm) is the start time in clock ticks.
    let Some(ticks) = fields.get(19).and_then(|t| t.parse::<u64>().ok()) else {
        return true;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).unwrap_or(100).max(1);
    let started_ns = ticks.saturating_mul(1_000_000_000 / hz);
    // The process must have started before its transaction (allow a tick of rounding).
    started_ns <= start_ns.saturating_add(1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_is_given_only_while_the_command_name_is_the_records() {
        let procfs = Procfs::default();
        let me = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let comm = comm.trim_end();
        assert_eq!(procfs.exe_of(me, comm), procfs.exe(me));
        assert!(procfs.exe(me).is_some());
        assert_eq!(procfs.exe_of(me, "another-prog"), None);
    }

    #[test]
    fn urls_lose_their_userinfo_and_nothing_else() {
        assert_eq!(
            redact_urls("--setopt=baseurl=https://bob:s3cret@repo.example/el9?x=1"),
            "--setopt=baseurl=https://REDACTED@repo.example/el9?x=1"
        );
        assert_eq!(
            redact_urls("ftp://a@b@host/x and http://plain/y"),
            "ftp://REDACTED@host/x and http://plain/y"
        );
        assert_eq!(redact_urls("install vim"), "install vim");
        assert_eq!(redact_urls("mailto:me@x"), "mailto:me@x");
    }

    #[test]
    fn command_lines_are_split_bounded_and_redacted() {
        assert_eq!(
            command_line(b"dnf\0install\0https://u:p@h/x.rpm\0"),
            ["dnf", "install", "https://REDACTED@h/x.rpm"]
        );
        assert!(command_line(b"").is_empty());
        let many: Vec<u8> = (0..100).flat_map(|_| b"x\0".to_vec()).collect();
        assert_eq!(command_line(&many).len(), guest::MAX_CMDLINE_ARGS);
        let long = vec![b'y'; 10_000];
        let cut = command_line(&long);
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].len(), guest::MAX_CMDLINE_BYTES);
    }

    #[test]
    fn terminals_and_units() {
        assert_eq!(tty_name(0), None);
        assert_eq!(tty_name((136 << 8) | 3).as_deref(), Some("pts/3"));
        assert_eq!(tty_name((4 << 8) | 1).as_deref(), Some("tty1"));
        assert_eq!(tty_name((4 << 8) | 64).as_deref(), Some("ttyS0"));
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(
            unit_of_cgroup("0::/system.slice/packagekit.service\n").as_deref(),
            Some("packagekit.service")
        );
        assert_eq!(
            unit_of_cgroup("12:cpu:/x\n1:name=systemd:/system.slice/dnf-makecache.service\n")
                .as_deref(),
            Some("dnf-makecache.service")
        );
        assert_eq!(unit_of_cgroup("0::/\n"), None);
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let me = std::process::id();
        let procfs = Procfs::default();
        let tx = TxRecord {
            kind: guestwatch_agent_common::EventKind::TxStart,
            tgid: me,
            pid: me,
            uid: 0,
            gid: 0,
            ret: 0,
            loginuid: None,
            sessionid: None,
            writes: 0,
            cookie: 0,
            start_ns: crate::clock::boot_ns(),
            now_ns: 0,
            comm: "test".into(),
            ancestors: Vec::new(),
            cmdline: Vec::new(),
        };
        let a = attribution(&tx, &procfs, AttributionMode::Full);
        assert_eq!(a.exe, procfs.exe(me));
        assert!(!a.cmdline.is_empty(), "from /proc/self/cmdline");
        assert!(!a.ancestors.is_empty(), "the test runner's parent");
        assert!(a.ancestors.iter().all(|p| p.pid != me));
        let minimal = attribution(&tx, &procfs, AttributionMode::Minimal);
        assert!(minimal.cmdline.is_empty());
        assert!(still_running(&procfs, me, crate::clock::boot_ns()));
        // A process that started after the "transaction" is a reused pid.
        assert!(!still_running(&procfs, me, 0));
        assert!(!still_running(&procfs, u32::MAX - 1, 0));
    }
}
