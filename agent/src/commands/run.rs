//! `guestwatch-agent run`: the daemon. Detects changes, scans, and delivers each new report to
//! the relay until it is acknowledged — surviving relay outages, restarts and reboots.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use guestwatch_protocol::{
    AgentInfo, ChangeCounts, ContentHash, Payload, Report, ReportBody, ReportFacts, ReportId,
    Timestamp,
};
use report::ChangeSummary;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    cli::RunArgs,
    config::{RunSettings, TargetSpec},
    deliver::{
        listen::{self, Handoff},
        sender::{self, Outbox, SenderConfig},
        state::StateDir,
        writer::StateWriter,
    },
    detect::{
        Detector, DetectorConfig, DetectorMode, IgnoredHook, LostHook,
        pipeline::{self, PipelineConfig, PipelineEvent},
        schedule::Batch,
        trigger::{Trigger, TriggerKind},
    },
    health::Health,
    metrics::Metrics,
    scan::{Snapshot, SystemScanner, millis},
};

pub async fn run(args: &RunArgs) -> Result<()> {
    let settings = RunSettings::resolve(args)?;
    // File reads and fsyncs: off the runtime's thread, like every later state write.
    let lookup = settings.clone();
    let state =
        tokio::task::spawn_blocking(move || StateDir::open(&lookup.state, &lookup.machine_id()))
            .await
            .context("opening the state directory")?
            .context("opening the state directory")?;
    let epoch = state.epoch();
    let epoch_reason = state.epoch_reason();
    let writer = StateWriter::start(state).context("starting the state writer")?;
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    super::watch::spawn_signal_handler(stop.clone());

    let scanner = SystemScanner::new(settings.target.clone());
    let counted = metrics.clone();
    let detector = Detector::start(&DetectorConfig {
        choice: settings.detect.choice,
        dbdir: scanner.dbdir(),
        disable_bpf: settings.detect.disable_bpf.clone(),
        rediscover: settings.detect.periodic,
        root: settings.target.root().map(Path::to_path_buf),
        attribution: settings.detect.attribution,
        on_ignored: Some(IgnoredHook(Arc::new(move |_, reason| {
            counted.transaction_ignored(reason)
        }))),
    })
    .context("starting detection")?;
    let mode = detector.status().mode;
    metrics.set_mode(mode);
    let health = Health::new(settings.detect.choice, detector.status(), writer.clone());

    if let Some(addr) = settings.metrics {
        let health = health.clone();
        let server = guestwatch_telemetry::MetricsServer::bind(
            addr,
            metrics.registry.clone(),
            Arc::new(move || health.check()),
        )
        .await
        .with_context(|| format!("metrics endpoint on {addr}"))?;
        log::info!(
            "metrics on http://{}/metrics",
            server.local_addr().unwrap_or(addr)
        );
        tokio::spawn(server.serve(stop.clone()));
    }

    let (outbox, outbox_rx) = Outbox::new();
    // A report that was not acknowledged before the last stop is what is delivered first, and
    // its content is the baseline: a startup scan finding the same is no new report.
    let resumed = writer
        .resume()
        .await
        .context("reading the state directory")?;
    let mut baseline = resumed.baseline;
    if let Some(report) = resumed.pending {
        outbox.offer(Arc::new(report));
    }

    let sender_config = SenderConfig {
        relay: settings.relay.clone(),
        connect_timeout: settings.connect_timeout,
        ack_timeout: settings.ack_timeout,
        max_backoff: settings.max_backoff,
        agent: agent_info(&settings.target, mode),
        epoch,
        extensions: epoch_reason
            .map(|r| vec![("epoch_reason".to_owned(), r.as_str().to_owned())])
            .unwrap_or_default(),
    };
    let ways: Vec<String> = settings
        .relay
        .iter()
        .map(|relay| format!("to {relay}"))
        .chain(
            settings
                .listen
                .iter()
                .map(|listen| format!("to the relay connecting on {listen}")),
        )
        .collect();
    log::info!(
        "delivering {} (state in {}, epoch {epoch:016x})",
        ways.join(" and "),
        settings.state.display()
    );
    // Pull mode: the relay's connections are accepted here and handed to the sender.
    let (accepted, listening) = match settings.listen.clone() {
        Some(addr) => {
            let handoff = Handoff::new();
            let task = tokio::spawn(listen::run(
                addr,
                sender::hello(&sender_config),
                settings.ack_timeout,
                handoff.clone(),
                metrics.clone(),
                stop.clone(),
            ));
            (Some(handoff), Some(task))
        }
        None => (None, None),
    };
    let sending = tokio::spawn(sender::run(
        sender_config,
        writer.clone(),
        outbox_rx,
        metrics.clone(),
        stop.clone(),
        resumed.rejected,
        accepted,
    ));

    let (trigger_tx, trigger_rx) = mpsc::channel(1024);
    let (event_tx, mut events) = mpsc::channel(256);
    let mut detector = detector;
    {
        let health = health.clone();
        detector.on_lost(LostHook(Arc::new(move |why| health.detection_lost(why))));
    }
    {
        let (health, stop) = (health.clone(), stop.clone());
        tokio::spawn(async move {
            detector.run(trigger_tx, stop.clone()).await;
            if !stop.is_cancelled() {
                health.detection_lost("detection stopped");
            }
        });
    }
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

    let mut previous: Option<Snapshot> = None;
    // Scans abandoned since the last report, told in the next report's errors.
    let mut timeouts: Vec<String> = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            PipelineEvent::Trigger(trigger) => {
                metrics.trigger(trigger.kind);
                if trigger.kind == TriggerKind::Tamper {
                    log::warn!(
                        "tamper: {}",
                        trigger
                            .detail
                            .as_deref()
                            .unwrap_or("database files changed outside rpm")
                    );
                }
            }
            PipelineEvent::TimedOut { batch, after } => {
                metrics.scan("timeout", after.as_secs_f64());
                let what = format!(
                    "the scan after {} trigger was abandoned after {after:.1?} (--scan-timeout)",
                    batch.cause.kind.as_str()
                );
                log::error!("{what}; detection goes on");
                // Bounded: one line per abandoned scan, the oldest dropped first.
                if timeouts.len() == 8 {
                    timeouts.remove(0);
                }
                timeouts.push(what);
            }
            PipelineEvent::Scan {
                batch,
                result,
                duration,
            } => match result {
                Ok(mut snapshot) => {
                    let hash = ContentHash(snapshot.content_hash);
                    let changes = previous
                        .as_ref()
                        .map(|p| {
                            report::changes::between(
                                &p.document.packages,
                                &snapshot.document.packages,
                            )
                        })
                        .unwrap_or_default();
                    // A tamper signal is reported even when the package set did not change:
                    // the write itself is what security teams need to see.
                    let tampered = batch.counts.contains_key(&TriggerKind::Tamper);
                    if baseline == Some(hash) && !tampered {
                        metrics.scan("unchanged", duration.as_secs_f64());
                        log::info!(
                            "scan after {} trigger: package set unchanged",
                            batch.cause.kind.as_str()
                        );
                    } else {
                        // Without a persisted generation there is no report: the next scan
                        // tries again, and /healthz says why meanwhile.
                        let generation = match writer.next_generation().await {
                            Ok(generation) => generation,
                            Err(e) => {
                                metrics.scan("failed", duration.as_secs_f64());
                                log::error!("persisting the report generation: {e}");
                                continue;
                            }
                        };
                        metrics.scan("changed", duration.as_secs_f64());
                        snapshot.document.system.errors.append(&mut timeouts);
                        let report = Arc::new(build_report(
                            &snapshot,
                            &batch,
                            &changes,
                            mode,
                            ReportId { epoch, generation },
                            duration,
                        ));
                        if let Err(e) = writer.save_pending(report.clone()).await {
                            log::error!("persisting report {}: {e}", report.id);
                        }
                        log::info!(
                            "report {} ({} packages, {}) after {} trigger",
                            report.id,
                            snapshot.scan.packages.len(),
                            changes.short(),
                            batch.cause.kind.as_str()
                        );
                        outbox.offer(report);
                        baseline = Some(hash);
                    }
                    previous = Some(snapshot);
                }
                Err(e) => {
                    metrics.scan("failed", duration.as_secs_f64());
                    log::error!("scan failed: {e}");
                }
            },
        }
    }
    pipeline.await.context("the scan pipeline crashed")?;
    stop.cancel();
    sending.await.context("the sender crashed")?;
    if let Some(listening) = listening {
        // It removes its Unix socket on the way out.
        listening.await.context("the listener crashed")?;
    }
    log::info!("stopped");
    Ok(())
}

/// The report's facts: the cause, every transaction and tamper record, counts, fitted to the
/// protocol's bounds.
fn report_facts(
    snapshot: &Snapshot,
    batch: &Batch,
    changes: &ChangeSummary,
    mode: DetectorMode,
) -> ReportFacts {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let attributions =
        |list: &[Trigger]| list.iter().filter_map(|t| t.attribution.clone()).collect();
    let mut facts = ReportFacts {
        trigger: batch.cause.clone(),
        transactions: attributions(&batch.transactions),
        tampers: attributions(&batch.tampers),
        coalesced: batch.counts.iter().map(|(k, n)| (*k, *n)).collect(),
        scanned_at: Timestamp::from_system(snapshot.finished_at),
        package_count: count(snapshot.scan.packages.len()),
        changes: ChangeCounts {
            added: count(changes.added.len()),
            removed: count(changes.removed.len()),
            upgraded: count(changes.upgraded.len()),
            downgraded: count(changes.downgraded.len()),
            reinstalled: count(changes.reinstalled.len()),
        },
        agent_version: env!("CARGO_PKG_VERSION").into(),
        detector: mode.as_str().into(),
    };
    facts.fit();
    facts
}

fn build_report(
    snapshot: &Snapshot,
    batch: &Batch,
    changes: &ChangeSummary,
    mode: DetectorMode,
    id: ReportId,
    duration: Duration,
) -> Report {
    let facts = report_facts(snapshot, batch, changes, mode);
    let mut document = snapshot.document.clone();
    document.system.changes = changes.clone();
    document.system.scan_duration_ms = Some(millis(duration));
    Report {
        id,
        content_hash: document.content_hash(),
        facts,
        body: ReportBody::Full(Payload::document(document.to_bytes())),
    }
}

/// What the agent tells the relay about itself (recorded there as claims).
fn agent_info(target: &TargetSpec, mode: DetectorMode) -> AgentInfo {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    // Resolved inside the root: an absolute os-release symlink must not reach the host's.
    let root = match target {
        TargetSpec::Root(root) => root.as_path(),
        TargetSpec::DbPath(_) => std::path::Path::new("/"),
    };
    let os = report::SystemInfo::read(root)
        .distribution
        .map(|d| d.pretty_name)
        .unwrap_or_default();
    AgentInfo {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        hostname: read("/proc/sys/kernel/hostname"),
        os,
        kernel: read("/proc/sys/kernel/osrelease"),
        detector: mode.as_str().into(),
    }
}
