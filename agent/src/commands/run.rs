//! `guestwatch-agent run`: the daemon. Detects changes, scans, and delivers each new report to
//! the relay until it is acknowledged — surviving relay outages, restarts and reboots.

use std::sync::Arc;

use anyhow::{Context, Result};
use guestwatch_protocol::AgentInfo;

use tokio_util::sync::CancellationToken;

use super::detection::{self, Event, Hooks};
use crate::{
    cli::RunArgs,
    config::{RunSettings, TargetSpec},
    deliver::{
        listen::{self, Handoff},
        sender::{self, Outbox, SenderConfig},
        state::StateDir,
        writer::StateWriter,
    },
    detect::{DetectorMode, IgnoredHook, LostHook, trigger::TriggerKind},
    health::Health,
    metrics::Metrics,
    reporter::Reporter,
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

    // Detection reports to /healthz through this, set once the health state exists.
    let health_slot: Arc<std::sync::OnceLock<Health>> = Arc::new(std::sync::OnceLock::new());
    let counted = metrics.clone();
    let lost_to = health_slot.clone();
    let running = detection::start(
        &settings.target,
        &settings.detect,
        Hooks {
            on_ignored: Some(IgnoredHook(Arc::new(move |_, reason| {
                counted.transaction_ignored(reason)
            }))),
            on_lost: Some(LostHook(Arc::new(move |why: &str| {
                if let Some(health) = lost_to.get() {
                    health.detection_lost(why);
                }
            }))),
        },
        &stop,
    )?;
    let mode = running.status.mode;
    metrics.set_mode(mode);
    let health = Health::new(settings.detect.choice, &running.status, writer.clone());
    let _ = health_slot.set(health.clone());

    if let Some(addr) = settings.metrics {
        let health = health.clone();
        let server = guestwatch_telemetry::MetricsServer::start(
            addr,
            metrics.registry.clone(),
            Arc::new(move || health.check()),
            module_path!(),
        )
        .await?;
        tokio::spawn(server.serve(stop.clone()));
    }

    let (outbox, outbox_rx) = Outbox::new();
    // A report that was not acknowledged before the last stop is what is delivered first, and
    // its content is the baseline: a startup scan finding the same is no new report.
    let resumed = writer
        .resume()
        .await
        .context("reading the state directory")?;
    let mut reporter = Reporter::new(epoch, mode, resumed.baseline, resumed.previous());
    if let Some(report) = resumed.pending {
        outbox.offer(Arc::new(report), resumed.pending_document.clone());
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
        sender::Carried {
            rejected: resumed.rejected,
            base: resumed.base,
        },
        accepted,
    ));

    let mut events = running.events;
    while let Some(event) = events.recv().await {
        handle(event, &mut reporter, &writer, &outbox, &metrics).await;
    }
    running
        .pipeline
        .await
        .context("the scan pipeline crashed")?;
    stop.cancel();
    sending.await.context("the sender crashed")?;
    if let Some(listening) = listening {
        // It removes its Unix socket on the way out.
        listening.await.context("the listener crashed")?;
    }
    log::info!("stopped");
    Ok(())
}

/// One pipeline event: counted, and a scan that is news becomes the next report, persisted
/// before it is offered to the sender.
async fn handle(
    event: Event,
    reporter: &mut Reporter,
    writer: &StateWriter,
    outbox: &Outbox,
    metrics: &Metrics,
) {
    match event {
        Event::Trigger(trigger) => {
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
        Event::TimedOut { batch, after } => {
            metrics.scan("timeout", after.as_secs_f64());
            let what = format!(
                "the scan after {} trigger was abandoned after {after:.1?} (--scan-timeout)",
                batch.cause.kind.as_str()
            );
            log::error!("{what}; detection goes on");
            reporter.timed_out(what);
        }
        Event::Scan {
            batch,
            result: Err(e),
            duration,
        } => {
            metrics.scan("failed", duration.as_secs_f64());
            log::error!(
                "scan after {} trigger failed: {e}",
                batch.cause.kind.as_str()
            );
        }
        Event::Scan {
            batch,
            result: Ok(snapshot),
            duration,
        } => {
            if !reporter.is_news(&snapshot, &batch) {
                metrics.scan("unchanged", duration.as_secs_f64());
                log::info!(
                    "scan after {} trigger: package set unchanged",
                    batch.cause.kind.as_str()
                );
                return;
            }
            // Without a persisted generation there is no report: the next scan tries again,
            // and /healthz says why meanwhile.
            let generation = match writer.next_generation().await {
                Ok(generation) => generation,
                Err(e) => {
                    metrics.scan("failed", duration.as_secs_f64());
                    log::error!("persisting the report generation: {e}");
                    return;
                }
            };
            metrics.scan("changed", duration.as_secs_f64());
            let out = reporter.report(snapshot, &batch, generation, duration);
            if let Err(e) = writer.save_pending(out.report.clone()).await {
                log::error!("persisting report {}: {e}", out.report.id);
            }
            log::info!(
                "report {} ({} packages, {}) after {} trigger",
                out.report.id,
                out.document.packages.len(),
                out.changes.short(),
                batch.cause.kind.as_str()
            );
            outbox.offer(out.report, Some(out.document));
        }
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
