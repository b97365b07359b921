//! `cargo xtask fuzz`: run the cargo-fuzz targets in `fuzz/` and summarise what they found.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{note, output, run, step, workspace_root};

/// Target names: the `[[bin]]` names in `fuzz/Cargo.toml`.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let manifest =
        std::fs::read_to_string(fuzz_dir.join("Cargo.toml")).context("reading fuzz/Cargo.toml")?;
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(value) = line.strip_prefix("name") {
            let name = value
                .trim_start_matches([' ', '='])
                .trim()
                .trim_matches('"');
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Every directory of `../shared/fixtures/rpmdb` (databases, damaged databases, header blobs).
fn fixture_seed_dirs() -> Vec<std::path::PathBuf> {
    let root = workspace_root().join("../shared/fixtures/rpmdb");
    let mut dirs = Vec::new();
    let mut todo = vec![root];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut has_files = false;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                has_files = true;
            }
        }
        if has_files {
            dirs.push(dir);
        }
    }
    dirs.sort();
    dirs
}

fn ensure_cargo_fuzz() -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    note("installing cargo-fuzz from crates.io");
    run(
        Command::new("cargo")
            .args(["install", "cargo-fuzz"])
            .env_remove("RUSTUP_TOOLCHAIN"),
        "needs network access to crates.io",
    )
}

pub fn fuzz(seconds: u64, only: &[String]) -> Result<()> {
    crate::setup::setup()?;
    step("fuzzing (cargo fuzz, nightly, address sanitizer)");
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("fuzz");
    let all = targets(&fuzz_dir)?;
    let chosen: Vec<&String> = if only.is_empty() {
        all.iter().collect()
    } else {
        for name in only {
            if !all.contains(name) {
                bail!("no fuzz target `{name}`; targets: {}", all.join(", "));
            }
        }
        all.iter().filter(|t| only.contains(t)).collect()
    };
    let mut summary = Vec::new();
    for target in chosen {
        step(&format!("fuzz target {target} for {seconds} s"));
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "fuzz", "run", target])
            .current_dir(&fuzz_dir)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR")
            .arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        // rpm database targets start from the real databases (and damaged ones) in the shared
        // fixtures, read in place.
        if target.starts_with("rpmdb_") {
            for dir in fixture_seed_dirs() {
                cmd.arg(dir);
            }
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048");
        let out = cmd
            .output()
            .with_context(|| format!("running cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log
            .lines()
            .rev()
            .find_map(|l| {
                l.strip_prefix("Done ")
                    .and_then(|r| r.split_whitespace().next())
            })
            .unwrap_or("?")
            .to_owned();
        let crashed = !out.status.success();
        if crashed {
            eprintln!(
                "{}",
                log.lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        note(&format!(
            "{target}: {runs} executions, {}",
            if crashed {
                "CRASH (see above and fuzz/artifacts)"
            } else {
                "no crash"
            }
        ));
        summary.push((target.clone(), runs, crashed));
    }
    step("fuzz summary");
    for (target, runs, crashed) in &summary {
        note(&format!(
            "{target:<24} {runs:>12} runs   {}",
            if *crashed { "CRASH" } else { "ok" }
        ));
    }
    if summary.iter().any(|(_, _, crashed)| *crashed) {
        bail!("a fuzz target crashed");
    }
    Ok(())
}
