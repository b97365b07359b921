//! Real package managers for tests: Debian's `dnf` (4, over librpm) and `zypper` (which runs
//! the `rpm` binary), installing into RHEL-like installroots from local repositories built
//! with `createrepo_c`.
//!
//! Debian's rpm keeps its database at `~/.rpmdb`; every command here runs with `HOME` pointing
//! at a directory whose `.rpmmacros` says `%_dbpath /var/lib/rpm`, so the database is the
//! root's own `/var/lib/rpm`, as on RHEL.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use tempfile::TempDir;

use crate::{Error, Result, run, which};

/// Whether dnf and createrepo_c are installed.
pub fn have_dnf() -> bool {
    which("dnf").is_some() && which("createrepo_c").is_some()
}

/// Whether zypper is installed.
pub fn have_zypper() -> bool {
    which("zypper").is_some()
}

/// A `HOME` whose `.rpmmacros` puts rpm databases at `/var/lib/rpm` under a root.
struct RpmHome {
    dir: TempDir,
}

impl RpmHome {
    fn new() -> Result<Self> {
        let dir = TempDir::new()?;
        std::fs::write(dir.path().join(".rpmmacros"), "%_dbpath /var/lib/rpm\n")?;
        Ok(Self { dir })
    }
}

/// A RHEL-like system root: `etc/os-release` and an initialised rpm database at
/// `var/lib/rpm`.
pub struct InstallRoot {
    dir: TempDir,
    home: RpmHome,
}

impl InstallRoot {
    /// A fresh root whose os-release says `os_release`.
    pub fn new(os_release: &str) -> Result<Self> {
        if which("rpm").is_none() {
            return Err(Error::Missing { program: "rpm" });
        }
        let dir = TempDir::new()?;
        std::fs::create_dir_all(dir.path().join("etc/products.d"))?;
        std::fs::write(dir.path().join("etc/os-release"), os_release)?;
        let root = Self {
            dir,
            home: RpmHome::new()?,
        };
        run(&mut root.rpm(&["--initdb"]))?;
        Ok(root)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The database directory.
    pub fn dbdir(&self) -> PathBuf {
        self.dir.path().join("var/lib/rpm")
    }

    /// `rpm --root ROOT <args>` on the root's database.
    pub fn rpm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("rpm");
        cmd.env("HOME", self.home.dir.path())
            .arg("--root")
            .arg(self.path())
            .args(args);
        cmd
    }

    /// `name-version-release` of every installed package, sorted.
    pub fn installed(&self) -> Result<Vec<String>> {
        let out = run(&mut self.rpm(&["-qa", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}\\n"]))?;
        let mut list: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        list.sort();
        Ok(list)
    }
}

/// A local repository (`baseurl=file:///…`) of built packages.
pub struct LocalRepo {
    dir: TempDir,
    pub id: String,
}

impl LocalRepo {
    /// A repository `id` holding `rpms`.
    pub fn new(id: &str, rpms: &[PathBuf]) -> Result<Self> {
        if which("createrepo_c").is_none() {
            return Err(Error::Missing {
                program: "createrepo_c",
            });
        }
        let repo = Self {
            dir: TempDir::new()?,
            id: id.to_owned(),
        };
        for rpm in rpms {
            let name = rpm
                .file_name()
                .ok_or_else(|| Error::InvalidSpec(format!("{} has no name", rpm.display())))?;
            std::fs::copy(rpm, repo.dir.path().join(name))?;
        }
        run(Command::new("createrepo_c")
            .arg("--quiet")
            .arg(repo.dir.path()))?;
        Ok(repo)
    }

    fn definition(&self) -> String {
        format!(
            "[{id}]\nname={id}\nbaseurl=file://{path}\nenabled=1\ngpgcheck=0\n",
            id = self.id,
            path = self.dir.path().display()
        )
    }
}

/// dnf with a set of local repositories, installing into roots.
pub struct Dnf {
    home: RpmHome,
    reposdir: TempDir,
}

impl Dnf {
    pub fn new(repos: &[&LocalRepo]) -> Result<Self> {
        if which("dnf").is_none() {
            return Err(Error::Missing { program: "dnf" });
        }
        let reposdir = TempDir::new()?;
        for repo in repos {
            std::fs::write(
                reposdir.path().join(format!("{}.repo", repo.id)),
                repo.definition(),
            )?;
        }
        Ok(Self {
            home: RpmHome::new()?,
            reposdir,
        })
    }

    /// `dnf -y --installroot=ROOT --releasever=9 … <args>`, quiet.
    pub fn command(&self, root: &InstallRoot, args: &[&str]) -> Command {
        let mut cmd = Command::new("dnf");
        cmd.env("HOME", self.home.dir.path())
            .arg("-y")
            .arg("-q")
            .arg(format!("--installroot={}", root.path().display()))
            .arg("--releasever=9")
            .arg(format!(
                "--setopt=reposdir={}",
                self.reposdir.path().display()
            ))
            .arg("--nogpgcheck")
            .arg("--disableplugin=*")
            .args(args);
        cmd
    }
}

/// zypper installing package files into roots (it runs the `rpm` binary for each).
pub struct Zypper {
    home: RpmHome,
}

impl Zypper {
    pub fn new() -> Result<Self> {
        if which("zypper").is_none() {
            return Err(Error::Missing { program: "zypper" });
        }
        Ok(Self {
            home: RpmHome::new()?,
        })
    }

    /// `zypper --non-interactive --root ROOT --no-gpg-checks <args>`.
    pub fn command(&self, root: &InstallRoot, args: &[&str]) -> Command {
        let mut cmd = Command::new("zypper");
        cmd.env("HOME", self.home.dir.path())
            .arg("--non-interactive")
            .arg("--root")
            .arg(root.path())
            .arg("--no-gpg-checks")
            .args(args);
        cmd
    }
}

/// Makes `cmd` run as a logged-in user would: its audit login uid becomes `loginuid` (and the
/// kernel gives it a fresh audit session), as `login`/`sshd` do before `sudo`. Needs root.
pub fn as_login_user(cmd: &mut Command, loginuid: u32) -> &mut Command {
    let text = loginuid.to_string().into_bytes();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (open, write, close) on data prepared before the fork: no allocation, no
    // lock, as required after fork in a multi-threaded test process.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(c"/proc/self/loginuid".as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, text.as_ptr().cast(), text.len());
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written != text.len() as isize {
                return Err(error);
            }
            Ok(())
        })
    }
}
