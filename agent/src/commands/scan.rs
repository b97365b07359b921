//! `guestwatch-agent scan`: one report of the whole system to stdout.
//!
//! The output is deterministic (no durations or timestamps): scanning an unchanged system
//! twice gives the same bytes.

use std::io::Write;

use anyhow::{Context, Result};

use crate::{
    cli::{Format, ScanArgs},
    config::{FileConfig, TargetSpec},
    scan::SystemScanner,
};

pub fn scan(args: &ScanArgs) -> Result<()> {
    let target = TargetSpec::resolve(&args.target, &FileConfig::default())?;
    let mut scanner = SystemScanner::new(target);
    let mut snapshot = scanner.scan_now().context("reading the rpm database")?;
    // One-off output is deterministic: no scan time, packages in record order.
    snapshot.document.system.scan_duration_ms = None;
    snapshot.scan.packages.sort_by_cached_key(|p| {
        let record = report::inventory::record(p, None);
        (record.key(), record.canonical())
    });
    for problem in &snapshot.system.problems {
        log::warn!("{problem}");
    }
    for e in &snapshot.scan.errors {
        log::warn!("skipped {}: {}", e.entry, e.reason);
    }
    let facts = snapshot.facts();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match args.format {
        Format::Packages => {
            for p in &snapshot.scan.packages {
                serde_json::to_writer(&mut out, &**p)?;
                out.write_all(b"\n")?;
            }
        }
        Format::Claircore => {
            let doc = report::claircore::render(&snapshot.document, &facts);
            serde_json::to_writer_pretty(&mut out, &doc)?;
            out.write_all(b"\n")?;
        }
        Format::Cyclonedx => {
            let bom = report::cyclonedx::bom(&snapshot.input(&facts));
            serde_json::to_writer_pretty(&mut out, &bom)?;
            out.write_all(b"\n")?;
        }
        // What a full report carries: a compressed document when that is smaller.
        Format::Document => {
            let payload = guestwatch_protocol::Payload::of_document(&snapshot.document);
            out.write_all(&payload.bytes)?;
        }
    }
    out.flush()?;
    Ok(())
}
