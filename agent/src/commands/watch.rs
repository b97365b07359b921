//! `guestwatch-agent watch`: detection and scanning locally, one JSON line per event on stdout:
//! a `detector` line first (mode and, if eBPF is not used, why), then `trigger`, `scan`,
//! `scan_error` and `scan_timeout` lines. When stdout is closed (`watch … | head -1`), it
//! stops quietly like any Unix filter.

use std::io::Write;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::detection::{self, Event, Hooks};
use crate::{
    cli::WatchArgs,
    config::WatchSettings,
    scan::{Snapshot, millis},
};

pub async fn watch(args: &WatchArgs) -> Result<()> {
    let settings = WatchSettings::resolve(args)?;
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone());
    // Stop detection whenever this returns, a closed stdout included.
    let _stop_on_return = stop.clone().drop_guard();
    let running = detection::start(&settings.target, &settings.detect, Hooks::default(), &stop)?;
    let mut status = serde_json::to_value(&running.status)?;
    status["event"] = json!("detector");
    emit(&status)?;
    let (mut events, pipeline) = (running.events, running.pipeline);

    let mut previous: Option<Snapshot> = None;
    while let Some(event) = events.recv().await {
        match event {
            Event::Trigger(trigger) => {
                let mut line = serde_json::to_value(&trigger)?;
                line["event"] = json!("trigger");
                emit(&line)?;
            }
            Event::TimedOut { batch, after } => {
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
            Event::Scan {
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
