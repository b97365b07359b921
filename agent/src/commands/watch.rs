//! `guestwatch-agent watch`: detection and scanning locally, one JSON line per event on stdout:
//! a `detector` line first (mode and, if eBPF is not used, why), then `trigger`, `scan`,
//! `scan_error` and `scan_timeout` lines. When stdout is closed (`watch … | head -1`), it
//! stops quietly like any Unix filter.

use std::io::Write;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    cli::WatchArgs,
    config::WatchSettings,
    detect::{
        Detector, DetectorConfig,
        pipeline::{self, PipelineConfig, PipelineEvent},
    },
    scan::{Snapshot, SystemScanner, millis},
};

pub async fn watch(args: &WatchArgs) -> Result<()> {
    let settings = WatchSettings::resolve(args)?;
    let scanner = SystemScanner::new(settings.target.clone());
    let detector = Detector::start(&DetectorConfig {
        choice: settings.detect.choice,
        dbdir: scanner.dbdir(),
        disable_bpf: settings.detect.disable_bpf.clone(),
        rediscover: settings.detect.periodic,
        root: settings.target.root().map(std::path::Path::to_path_buf),
        attribution: settings.detect.attribution,
        on_ignored: None,
    })
    .context("starting detection")?;
    let mut status = serde_json::to_value(detector.status())?;
    status["event"] = json!("detector");
    emit(&status)?;

    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone());
    let (trigger_tx, trigger_rx) = mpsc::channel(1024);
    let (event_tx, mut events) = mpsc::channel(256);
    tokio::spawn(detector.run(trigger_tx, stop.clone()));
    let config = PipelineConfig {
        schedule: settings.detect.schedule.clone(),
        periodic: settings.detect.periodic,
        startup_scan: true,
        scan_timeout: settings.detect.scan_timeout,
    };
    let pipeline = tokio::spawn(pipeline::run(
        config,
        scanner,
        trigger_rx,
        event_tx,
        stop.clone(),
    ));
    // Stop detection whenever this returns, a closed stdout included.
    let _stop_on_return = stop.clone().drop_guard();

    let mut previous: Option<Snapshot> = None;
    while let Some(event) = events.recv().await {
        match event {
            PipelineEvent::Trigger(trigger) => {
                let mut line = serde_json::to_value(&trigger)?;
                line["event"] = json!("trigger");
                emit(&line)?;
            }
            PipelineEvent::TimedOut { batch, after } => {
                log::error!(
                    "the scan after {} trigger was abandoned after {after:.1?} (--scan-timeout)",
                    batch.cause.kind.as_str()
                );
                emit(&json!({
                    "event": "scan_timeout",
                    "after_ms": millis(after),
                    "trigger": batch.cause,
                }))?;
            }
            PipelineEvent::Scan {
                batch,
                result,
                duration,
            } => match result {
                Ok(snapshot) => {
                    let changes = previous
                        .as_ref()
                        .map(|p| {
                            report::changes::between(
                                &p.document.packages,
                                &snapshot.document.packages,
                            )
                        })
                        .unwrap_or_default();
                    let changed = previous
                        .as_ref()
                        .is_none_or(|p| p.content_hash != snapshot.content_hash);
                    if !changed {
                        log::info!(
                            "scan after {} trigger: package set unchanged",
                            batch.cause.kind.as_str()
                        );
                    }
                    emit(&json!({
                        "event": "scan",
                        "changed": changed,
                        "packages": snapshot.scan.packages.len(),
                        "content_hash": hex::encode(snapshot.content_hash),
                        "backend": snapshot.scan.backend.as_str(),
                        "database": snapshot.scan.path,
                        "errors": snapshot.scan.errors,
                        "trigger": batch.cause,
                        "transactions": batch.transactions.iter().filter_map(|t| t.attribution.as_ref()).collect::<Vec<_>>(),
                        "tampers": batch.tampers.iter().filter_map(|t| t.attribution.as_ref()).collect::<Vec<_>>(),
                        "coalesced": batch.counts,
                        "duration_ms": millis(duration),
                        "decoding": snapshot.decoding,
                        "changes": changes,
                    }))?;
                    previous = Some(snapshot);
                }
                Err(e) => {
                    log::error!("scan failed: {e}");
                    emit(
                        &json!({"event": "scan_error", "error": e.to_string(), "trigger": batch.cause}),
                    )?;
                }
            },
        }
    }
    pipeline.await.context("the scan pipeline crashed")?;
    Ok(())
}

/// Writes one line to stdout. A closed stdout is an `io::Error` of kind `BrokenPipe`, which
/// `main.rs` turns into a quiet exit (never the panic `println!` would raise).
fn emit(line: &Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Cancels `stop` on SIGTERM or SIGINT.
pub fn spawn_signal_handler(stop: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        log::info!("shutting down");
        stop.cancel();
    });
}
