//! Real rpm packages and databases for guestwatch's tests, benchmarks and demo.
//!
//! Packages are built with Debian's `rpmbuild` from one generated spec file (every requested
//! package is a subpackage, so a thousand packages cost one `rpmbuild` run) and installed with
//! `rpm --dbpath DIR -i --justdb --nodeps`, which makes real transactions through librpm's
//! `rpmtsRun` without touching the host's files.

use std::{
    fmt::Write as _,
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use tempfile::TempDir;

pub mod pkgmgr;
mod redis;
pub use redis::RedisServer;

/// What can go wrong while making fixtures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "`{program}` is not installed (install it with `cargo xtask setup` or `apt-get install rpm`)"
    )]
    Missing { program: &'static str },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("`{command}` failed with {status}: {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("invalid package spec: {0}")]
    InvalidSpec(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// True when the process runs as root (BPF tests need it).
pub fn is_root() -> bool {
    // /proc/self/status is the only dependency-free way to ask without libc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// True when running under CI (`CI=true`), where tests must not skip for missing tools.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether `rpm` and `rpmbuild` are on PATH.
pub fn have_rpm_tools() -> bool {
    which("rpm").is_some() && which("rpmbuild").is_some()
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// One package to build. Only `name` is required; the rest have sensible defaults.
#[derive(Clone, Debug)]
pub struct PackageSpec {
    pub name: String,
    /// `None` leaves the EPOCH tag out (which rpm distinguishes from epoch 0).
    pub epoch: Option<u32>,
    pub version: String,
    pub release: String,
    /// `noarch`, or `None` for the build host's architecture.
    pub arch: Option<String>,
    pub license: String,
    pub summary: String,
    pub vendor: Option<String>,
    /// Files (absolute paths) the package owns, each created with a little content.
    pub files: Vec<String>,
}

impl PackageSpec {
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        release: impl Into<String>,
    ) -> Self {
        let name = name.into();
        Self {
            summary: format!("guestwatch test package {name}"),
            name,
            epoch: None,
            version: version.into(),
            release: release.into(),
            arch: Some("noarch".into()),
            license: "MIT".into(),
            vendor: None,
            files: Vec::new(),
        }
    }

    pub fn epoch(mut self, epoch: u32) -> Self {
        self.epoch = Some(epoch);
        self
    }

    pub fn license(mut self, license: impl Into<String>) -> Self {
        self.license = license.into();
        self
    }

    pub fn vendor(mut self, vendor: impl Into<String>) -> Self {
        self.vendor = Some(vendor.into());
        self
    }

    pub fn host_arch(mut self) -> Self {
        self.arch = None;
        self
    }

    pub fn file(mut self, path: impl Into<String>) -> Self {
        self.files.push(path.into());
        self
    }

    /// `name-[epoch:]version-release`, as `rpm -q` prints it without the arch.
    pub fn nevr(&self) -> String {
        match self.epoch {
            Some(e) => format!("{}-{}:{}-{}", self.name, e, self.version, self.release),
            None => format!("{}-{}-{}", self.name, self.version, self.release),
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = |s: &str, extra: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._+".contains(c) || extra.contains(c))
        };
        if !ok(&self.name, "-") || !ok(&self.version, "~^") || !ok(&self.release, "~^") {
            return Err(Error::InvalidSpec(format!("{self:?}")));
        }
        if self
            .files
            .iter()
            .any(|f| !f.starts_with('/') || f.contains(char::is_whitespace))
        {
            return Err(Error::InvalidSpec(format!(
                "files must be absolute paths: {self:?}"
            )));
        }
        Ok(())
    }
}

/// Builds `specs` with one `rpmbuild` run and returns the `.rpm` paths in the same order.
/// The packages live in `out_dir`.
pub fn build_packages(specs: &[PackageSpec], out_dir: &Path) -> Result<Vec<PathBuf>> {
    if which("rpmbuild").is_none() {
        return Err(Error::Missing {
            program: "rpmbuild",
        });
    }
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    for spec in specs {
        spec.validate()?;
    }
    let top = TempDir::new()?;
    let spec_path = top.path().join("guestwatch-test.spec");
    std::fs::write(&spec_path, spec_file(specs))?;
    let rpms = top.path().join("RPMS");
    run(Command::new("rpmbuild")
        .arg("--define")
        .arg(format!("_topdir {}", top.path().display()))
        .arg("--define")
        .arg(format!("_rpmdir {}", rpms.display()))
        // Flat output: RPMS/<name>-<v>-<r>.<arch>.rpm. `%%` keeps the tags for rpm to expand
        // per package (a single `%` would expand the main package's macros for all of them).
        .arg("--define")
        .arg("_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm")
        .arg("--quiet")
        .arg("-bb")
        .arg(&spec_path))?;
    std::fs::create_dir_all(out_dir)?;
    let mut built = Vec::with_capacity(specs.len());
    let mut found = std::collections::HashMap::new();
    for entry in std::fs::read_dir(&rpms)? {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        found.insert(file_name, entry.path());
    }
    for spec in specs {
        let prefix = format!("{}-{}-{}.", spec.name, spec.version, spec.release);
        let (file_name, path) = found
            .iter()
            .find(|(f, _)| f.starts_with(&prefix) && f.ends_with(".rpm"))
            .ok_or_else(|| {
                Error::InvalidSpec(format!("rpmbuild produced no package for {}", spec.nevr()))
            })?;
        let dest = out_dir.join(file_name);
        std::fs::copy(path, &dest)?;
        built.push(dest);
    }
    Ok(built)
}

fn spec_file(specs: &[PackageSpec]) -> String {
    let main = &specs[0];
    let mut s = String::new();
    let _ = writeln!(s, "Name: {}", main.name);
    preamble(&mut s, main);
    let _ = writeln!(s, "%description\n{}\n", main.summary);
    for spec in &specs[1..] {
        let _ = writeln!(s, "%package -n {}", spec.name);
        preamble(&mut s, spec);
        let _ = writeln!(s, "%description -n {}\n{}\n", spec.name, spec.summary);
    }
    let _ = writeln!(s, "%install");
    for spec in specs {
        for file in &spec.files {
            let _ = writeln!(
                s,
                "mkdir -p \"%{{buildroot}}$(dirname {file})\" && echo '{} {file}' > \"%{{buildroot}}{file}\"",
                spec.nevr()
            );
        }
    }
    for (i, spec) in specs.iter().enumerate() {
        if i == 0 {
            let _ = writeln!(s, "%files");
        } else {
            let _ = writeln!(s, "%files -n {}", spec.name);
        }
        for file in &spec.files {
            let _ = writeln!(s, "{file}");
        }
    }
    s
}

fn preamble(s: &mut String, spec: &PackageSpec) {
    if let Some(epoch) = spec.epoch {
        let _ = writeln!(s, "Epoch: {epoch}");
    }
    let _ = writeln!(s, "Version: {}", spec.version);
    let _ = writeln!(s, "Release: {}", spec.release);
    let _ = writeln!(s, "Summary: {}", spec.summary);
    let _ = writeln!(s, "License: {}", spec.license);
    if let Some(vendor) = &spec.vendor {
        let _ = writeln!(s, "Vendor: {vendor}");
    }
    if let Some(arch) = &spec.arch {
        let _ = writeln!(s, "BuildArch: {arch}");
    }
}

/// Runs a command to completion, turning a non-zero exit into [`Error::Failed`].
pub fn run(cmd: &mut Command) -> Result<Output> {
    let output = cmd.stdin(Stdio::null()).output()?;
    if !output.status.success() {
        return Err(Error::Failed {
            command: format!("{cmd:?}"),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// An rpm database directory driven by the real `rpm` binary.
pub struct RpmDb {
    dir: PathBuf,
    _temp: Option<TempDir>,
}

impl RpmDb {
    /// A fresh, initialised (empty) database in a temporary directory.
    pub fn temp() -> Result<Self> {
        let temp = TempDir::new()?;
        let db = Self::at(temp.path().join("rpm"))?;
        Ok(Self {
            _temp: Some(temp),
            ..db
        })
    }

    /// A database at `dir`, created with `rpm --initdb` if it does not exist yet.
    pub fn at(dir: impl Into<PathBuf>) -> Result<Self> {
        if which("rpm").is_none() {
            return Err(Error::Missing { program: "rpm" });
        }
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let db = Self { dir, _temp: None };
        run(&mut db.command(&["--initdb"]))?;
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// An `rpm --dbpath DIR <args>` command, for callers that need the child (its pid).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("rpm");
        cmd.arg("--dbpath").arg(&self.dir).args(args);
        cmd
    }

    /// Spawns `rpm <verb> --justdb --nodeps <rpms>` (verb `-i` or `-U`), returning the child.
    pub fn spawn_transaction(&self, verb: &str, rpms: &[PathBuf]) -> Result<Child> {
        let mut cmd = self.command(&[verb, "--justdb", "--nodeps", "--nosignature"]);
        cmd.args(rpms)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Ok(cmd.spawn()?)
    }

    /// Installs packages (`rpm -i --justdb --nodeps`).
    pub fn install(&self, rpms: &[PathBuf]) -> Result<()> {
        self.transaction("-i", rpms)
    }

    /// Upgrades packages (`rpm -U --justdb --nodeps`).
    pub fn upgrade(&self, rpms: &[PathBuf]) -> Result<()> {
        self.transaction("-U", rpms)
    }

    fn transaction(&self, verb: &str, rpms: &[PathBuf]) -> Result<()> {
        let mut cmd = self.command(&[verb, "--justdb", "--nodeps", "--nosignature"]);
        cmd.args(rpms);
        run(&mut cmd).map(drop)
    }

    /// Removes packages by name (`rpm -e --justdb --nodeps`).
    pub fn erase(&self, names: &[&str]) -> Result<()> {
        let mut cmd = self.command(&["-e", "--justdb", "--nodeps"]);
        cmd.args(names);
        run(&mut cmd).map(drop)
    }

    /// `rpm -qa --qf FORMAT`, sorted lines.
    pub fn query(&self, format: &str) -> Result<Vec<String>> {
        let out = run(&mut self.command(&["-qa", "--qf", format]))?;
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        Ok(lines)
    }
}

/// Generates `count` distinct packages named `{prefix}-{i}`, every seventh with an epoch,
/// with varied versions and licenses, for databases of realistic size.
pub fn generated_specs(prefix: &str, count: usize) -> Vec<PackageSpec> {
    (0..count)
        .map(|i| {
            let spec = PackageSpec::new(
                format!("{prefix}-{i:04}"),
                format!("{}.{}.{}", 1 + i % 5, i % 13, i % 7),
                format!("{}.gw", 1 + i % 3),
            )
            .license(["MIT", "GPL-2.0-or-later", "Apache-2.0", "BSD-3-Clause"][i % 4]);
            if i % 7 == 0 {
                spec.epoch((i % 4) as u32)
            } else {
                spec
            }
        })
        .collect()
}

/// Where generated databases are kept between runs: `target/generated-rpmdb` of the workspace
/// (or of `CARGO_TARGET_DIR` as it was when this crate was built).
fn generated_cache() -> PathBuf {
    match option_env!("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
    .join("generated-rpmdb")
}

/// A database at `dest` holding the `count` packages of [`generated_specs`]`(prefix, count)`,
/// installed by the real rpm. Building them takes rpmbuild and rpm a while (about 25 s for
/// 10,000 packages), so the database is built once, kept under the target directory, and
/// copied to `dest` (which must not hold a database yet) on every call.
pub fn generated_db(prefix: &str, count: usize, dest: &Path) -> Result<RpmDb> {
    let cache = generated_cache().join(format!("{prefix}-{count}-v1"));
    let db_dir = cache.join("rpmdb");
    if !db_dir.join("rpmdb.sqlite").is_file() {
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::create_dir_all(&cache)?;
        let work = TempDir::new_in(&cache)?;
        let rpms = build_packages(&generated_specs(prefix, count), &work.path().join("rpms"))?;
        let db = RpmDb::at(work.path().join("rpmdb"))?;
        // In batches: one command line of 10,000 paths is long, and rpm's memory grows with it.
        for batch in rpms.chunks(2500) {
            db.install(batch)?;
        }
        // Complete only now: an interrupted build leaves no database to be taken as whole.
        std::fs::rename(db.path(), &db_dir)?;
    }
    std::fs::create_dir_all(dest)?;
    for entry in std::fs::read_dir(&db_dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dest.join(entry.file_name()))?;
        }
    }
    RpmDb::at(dest)
}
