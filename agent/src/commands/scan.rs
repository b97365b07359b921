//! `guestwatch-agent scan`: one report to stdout.

use std::io::Write;

use anyhow::{Result, bail};

use crate::{
    cli::{Format, ScanArgs},
    config::{FileConfig, TargetSpec},
    inventory::{self, ChangeSummary, Facts},
    scan::{SystemScanner, shown_path},
};

pub fn scan(args: &ScanArgs) -> Result<()> {
    let target = TargetSpec::resolve(&args.target, &FileConfig::default())?;
    let scanner = SystemScanner::new(target.clone());
    let mut snapshot = scanner.scan_now()?;
    let mut packages = std::mem::take(&mut snapshot.scan.packages);
    packages.sort_by(|a, b| {
        (&a.name, inventory::evr(a), &a.arch).cmp(&(&b.name, inventory::evr(b), &b.arch))
    });
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match args.format {
        Format::Packages => {
            for p in &packages {
                serde_json::to_writer(&mut out, p)?;
                out.write_all(b"\n")?;
            }
        }
        Format::Claircore => {
            let database = shown_path(&target, &snapshot.scan.path);
            let facts = Facts {
                agent_version: env!("CARGO_PKG_VERSION").into(),
                detector: "none".into(),
                trigger: serde_json::json!({"kind": "manual"}),
                backend: snapshot.scan.backend.as_str().into(),
                database: database.clone(),
                package_count: packages.len(),
                scan_duration_ms: 0,
                content_hash: hex::encode(snapshot.content_hash),
                errors: snapshot
                    .scan
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", e.entry, e.reason))
                    .collect(),
                generation: None,
                changes: ChangeSummary::default(),
            };
            serde_json::to_writer_pretty(
                &mut out,
                &inventory::document(&packages, &database, &facts),
            )?;
            out.write_all(b"\n")?;
        }
        Format::Cyclonedx => bail!("--format cyclonedx is not available in this build yet"),
    }
    out.flush()?;
    Ok(())
}
