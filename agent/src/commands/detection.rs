//! The detection wiring `run` and `watch` share: the detector on the target's database
//! directory, its triggers into the scan pipeline, the pipeline's events out.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{DetectSettings, TargetSpec},
    detect::{
        Detector, DetectorConfig, DetectorStatus, IgnoredHook, LostHook,
        pipeline::{self, PipelineConfig, PipelineEvent},
    },
    scan::{ScanError, Snapshot, SystemScanner},
};

/// What the pipeline says: triggers, scans, abandoned scans.
pub type Event = PipelineEvent<Snapshot, ScanError>;

/// Callbacks into the caller's bookkeeping (metrics, health).
#[derive(Default)]
pub struct Hooks {
    /// A transaction was seen and deliberately not turned into a trigger.
    pub on_ignored: Option<IgnoredHook>,
    /// Detection lost its last source of events (or stopped).
    pub on_lost: Option<LostHook>,
}

/// Detection running: its status at start, its events, and the pipeline task.
pub struct Running {
    pub status: DetectorStatus,
    pub events: mpsc::Receiver<Event>,
    pub pipeline: JoinHandle<()>,
}

/// Starts the detector and the scan pipeline (startup scan first) until `stop`.
pub fn start(
    target: &TargetSpec,
    detect: &DetectSettings,
    hooks: Hooks,
    stop: &CancellationToken,
) -> Result<Running> {
    let scanner = SystemScanner::new(target.clone());
    let mut detector = Detector::start(&DetectorConfig {
        choice: detect.choice,
        dbdir: scanner.dbdir(),
        disable_bpf: detect.disable_bpf.clone(),
        rediscover: detect.periodic,
        root: target.root().map(Path::to_path_buf),
        attribution: detect.attribution,
        on_ignored: hooks.on_ignored,
    })
    .context("starting detection")?;
    let status = detector.status().clone();
    if let Some(LostHook(lost)) = &hooks.on_lost {
        let lost = lost.clone();
        detector.on_lost(LostHook(Arc::new(move |why| lost(why))));
    }
    let (trigger_tx, trigger_rx) = mpsc::channel(1024);
    let (event_tx, events) = mpsc::channel(256);
    {
        let (lost, stop) = (hooks.on_lost, stop.clone());
        tokio::spawn(async move {
            detector.run(trigger_tx, stop.clone()).await;
            if let Some(LostHook(lost)) = lost
                && !stop.is_cancelled()
            {
                lost("detection stopped");
            }
        });
    }
    let config = PipelineConfig {
        schedule: detect.schedule.clone(),
        periodic: detect.periodic,
        startup_scan: true,
        scan_timeout: detect.scan_timeout,
    };
    let pipeline = tokio::spawn(pipeline::run(
        config,
        scanner,
        trigger_rx,
        event_tx,
        stop.clone(),
    ));
    Ok(Running {
        status,
        events,
        pipeline,
    })
}
