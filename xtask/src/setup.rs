//! `cargo xtask setup`: everything a fresh Debian/Ubuntu machine needs, installed idempotently.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{note, output, run, step, workspace_root};

/// Debian packages the tests, benchmarks, demo and VM test use, and why.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    ("rpm", "rpm and rpmbuild: real transactions through librpm"),
    (
        "dnf",
        "real dnf transactions into installroots (attribution tests, bench detect)",
    ),
    (
        "python3-rpm",
        "librpm's Python bindings: transactions a test can block or keep open",
    ),
    ("createrepo-c", "local repositories for dnf"),
    (
        "zypper",
        "real zypper transactions (it runs the rpm binary)",
    ),
    ("librpm-dev", "librpm headers and the unversioned librpm.so"),
    ("sqlite3", "inspecting rpmdb.sqlite in tests"),
    ("redis-server", "the Redis Streams sink's real server"),
    (
        "qemu-system-x86",
        "the nested guest for `cargo xtask vm-test`",
    ),
    ("busybox-static", "the nested guest's userland"),
    ("cpio", "packing the nested guest's initramfs"),
    ("curl", "fetching packages for the nested guest"),
    (
        "socat",
        "AF_VSOCK client/listener inside the nested guest (copied from the host)",
    ),
    (
        "procps",
        "`kill -TERM` for stopping the nested guest and the relay cleanly",
    ),
];

/// Runs every setup step.
pub fn setup() -> Result<()> {
    apt_packages()?;
    nightly()?;
    bpf_linker()?;
    vhost_device_vsock()?;
    cargo_generate_rpm()?;
    cyclonedx_validator()?;
    step("setup complete");
    Ok(())
}

fn apt_packages() -> Result<()> {
    step("checking Debian packages");
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(pkg, _)| !dpkg_installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        note("all present");
        return Ok(());
    }
    for (pkg, why) in APT_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        note(&format!("missing {pkg}: {why}"));
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "apt-get is not available; install these packages by hand: {}",
            missing.join(" ")
        );
    }
    let sudo: Vec<&str> = if crate::util::is_root() {
        vec![]
    } else {
        vec!["sudo"]
    };
    let apt = |args: &[&str]| {
        let mut all = sudo.clone();
        all.push("apt-get");
        all.extend_from_slice(args);
        let mut cmd = Command::new(all[0]);
        cmd.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    let hint = format!("run `sudo apt-get install {}` yourself", missing.join(" "));
    run(&mut apt(&["update", "-qq"]), &hint)?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install, &hint)
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn nightly() -> Result<()> {
    step("checking the nightly toolchain with rust-src (BPF programs need -Z build-std)");
    if output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_none() {
        run(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "install rustup from https://rustup.rs, then `rustup toolchain install nightly`",
        )?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        note("nightly rust-src present");
        return Ok(());
    }
    run(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "run `rustup component add rust-src --toolchain nightly`",
    )
}

/// Nightly's sysroot and LLVM major version (bpf-linker must link the same libLLVM).
pub fn nightly_llvm() -> Result<(PathBuf, String)> {
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .context("nightly rustc is not installed: run `cargo xtask setup`")?;
    let verbose = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("nightly rustc is not installed: run `cargo xtask setup`")?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc did not report its LLVM version")?
        .to_owned();
    Ok((PathBuf::from(sysroot.trim()), major))
}

/// Where `cargo install` puts binaries.
fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// The installed bpf-linker, if it runs.
pub fn bpf_linker_path() -> Option<PathBuf> {
    let path = cargo_bin_dir().join("bpf-linker");
    output(Command::new(&path).arg("--version")).map(|_| path)
}

fn bpf_linker() -> Result<()> {
    step("checking bpf-linker (links BPF programs with nightly's own LLVM)");
    if let Some(path) = bpf_linker_path() {
        note(&format!("{} runs", path.display()));
        return Ok(());
    }
    let (sysroot, major) = nightly_llvm()?;
    let libdir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    // bpf-linker's build looks for $LLVM_PREFIX/lib/libLLVM.so; nightly ships only the
    // versioned file, so point a private prefix at it.
    let prefix = workspace_root().join("target/xtask/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    note(&format!(
        "building bpf-linker 0.13 against {} (LLVM {major}); this takes a few minutes once",
        libllvm.display()
    ));
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--no-default-features",
            ])
            .arg("--features")
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            // The rpath lets the installed binary find nightly's libLLVM without LD_LIBRARY_PATH.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", libdir.display()),
            )
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
        "needs network access to crates.io and a C toolchain (gcc)",
    )?;
    bpf_linker_path()
        .map(|p| note(&format!("installed {}", p.display())))
        .context("bpf-linker was installed but does not run; check `ldd ~/.cargo/bin/bpf-linker`")
}

/// The version `cargo xtask vm-test` is written against (its CLI: --guest-cid, --socket,
/// --uds-path).
const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";

/// The installed vhost-device-vsock, if it is the expected version.
pub fn vhost_device_vsock_path() -> Option<PathBuf> {
    let path = cargo_bin_dir().join("vhost-device-vsock");
    output(Command::new(&path).arg("--version"))
        .filter(|v| v.split_whitespace().nth(1) == Some(VHOST_DEVICE_VSOCK_VERSION))
        .map(|_| path)
}

fn vhost_device_vsock() -> Result<()> {
    step("checking vhost-device-vsock (the nested guest's vsock device, over Unix sockets)");
    if let Some(path) = vhost_device_vsock_path() {
        note(&format!(
            "{} {VHOST_DEVICE_VSOCK_VERSION} runs",
            path.display()
        ));
        return Ok(());
    }
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            // --locked: the crate's own lock file, so newer dependencies cannot raise its
            // MSRV. Default features: 0.3.0 does not build without them; vm-test only ever
            // passes --uds-path, so its AF_VSOCK forwarding backend stays unused.
            .args([
                "install",
                "vhost-device-vsock",
                "--version",
                VHOST_DEVICE_VSOCK_VERSION,
                "--locked",
            ])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS"),
        "needs network access to crates.io and a C toolchain (gcc)",
    )?;
    vhost_device_vsock_path()
        .map(|p| note(&format!("installed {}", p.display())))
        .context("vhost-device-vsock was installed but does not run: try `~/.cargo/bin/vhost-device-vsock --version`")
}

/// The cargo-generate-rpm release `cargo xtask package-rpm` is written against (its
/// `[package.metadata.generate-rpm]` keys and `--package/--target/--target-dir/--output`).
pub const CARGO_GENERATE_RPM_VERSION: &str = "0.21.1";

/// The installed cargo-generate-rpm, if it is the pinned version.
pub fn cargo_generate_rpm_path() -> Option<PathBuf> {
    let path = cargo_bin_dir().join("cargo-generate-rpm");
    // As a cargo subcommand it is run as `cargo-generate-rpm generate-rpm …`.
    output(Command::new(&path).args(["generate-rpm", "--version"]))
        .filter(|v| v.split_whitespace().nth(1) == Some(CARGO_GENERATE_RPM_VERSION))
        .map(|_| path)
}

/// Installs the pinned cargo-generate-rpm unless it is there (a different version is replaced).
pub fn cargo_generate_rpm() -> Result<()> {
    step("checking cargo-generate-rpm (builds the agent's RPM: cargo xtask package-rpm)");
    if let Some(path) = cargo_generate_rpm_path() {
        note(&format!(
            "{} {CARGO_GENERATE_RPM_VERSION} runs",
            path.display()
        ));
        return Ok(());
    }
    note(&format!(
        "installing cargo-generate-rpm {CARGO_GENERATE_RPM_VERSION} from crates.io into {} \
         (about two minutes once)",
        cargo_bin_dir().display()
    ));
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            // --locked: its own lock file, so newer dependencies cannot raise its MSRV;
            // --force: replaces another installed version.
            .args([
                "install",
                "cargo-generate-rpm",
                "--version",
                CARGO_GENERATE_RPM_VERSION,
                "--locked",
                "--force",
            ])
            // Its dependency ff 0.13 ships a rust-toolchain.toml pinning Rust 1.56.0, which
            // rustup honours while rustc runs in ff's source directory (not installed: the
            // build fails; installed: too old). The toolchain rustup started xtask with
            // (RUSTUP_TOOLCHAIN, which rustup sets for what it runs) overrides such files.
            .env(
                "RUSTUP_TOOLCHAIN",
                std::env::var_os("RUSTUP_TOOLCHAIN").unwrap_or_else(|| "stable".into()),
            )
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS"),
        "needs network access to crates.io",
    )?;
    cargo_generate_rpm_path()
        .map(|p| note(&format!("installed {}", p.display())))
        .context(
            "cargo-generate-rpm was installed but does not run: try \
             `~/.cargo/bin/cargo-generate-rpm generate-rpm --version`",
        )
}

/// The CycloneDX project's own Python library validates SBOMs against the official 1.6 JSON
/// schema; the report tests run it from this venv.
const CYCLONEDX_LIB: &str = "cyclonedx-python-lib[json-validation]==11.12.0";

/// The venv's interpreter (`target/tools/cyclonedx-venv/bin/python`).
pub fn cyclonedx_python() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("tools/cyclonedx-venv/bin/python")
}

fn cyclonedx_validator() -> Result<()> {
    step("checking the CycloneDX schema validator (Python venv for the report tests)");
    let python = cyclonedx_python();
    let check = "from cyclonedx.validation.json import JsonStrictValidator";
    if output(Command::new(&python).args(["-c", check])).is_some() {
        note(&format!("{} has {CYCLONEDX_LIB}", python.display()));
        return Ok(());
    }
    let venv = python
        .parent()
        .and_then(Path::parent)
        .context("venv path has no parent")?;
    run(
        Command::new("python3").arg("-m").arg("venv").arg(venv),
        "needs python3 with the venv module (Debian: apt-get install python3-venv)",
    )?;
    run(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", CYCLONEDX_LIB]),
        "needs network access to PyPI",
    )?;
    output(Command::new(&python).args(["-c", check]))
        .map(|_| note(&format!("installed {CYCLONEDX_LIB}")))
        .context("the CycloneDX validator was installed but does not import")
}
