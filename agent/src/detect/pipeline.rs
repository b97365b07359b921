//! The async loop that turns the trigger stream into scans: one scan at a time on a blocking
//! thread, triggers coalesced by the [`Scheduler`], a periodic trigger, and a clean stop.

use std::time::Duration;

use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    schedule::{Batch, ScheduleConfig, Scheduler},
    trigger::{Trigger, TriggerKind},
};

/// Something that scans the system; it runs on a blocking thread.
pub trait Scanner: Send + 'static {
    type Output: Send + 'static;
    type Error: Send + 'static;
    fn scan(&mut self, batch: &Batch) -> Result<Self::Output, Self::Error>;
}

/// What the pipeline reports to its consumer.
#[derive(Debug)]
pub enum PipelineEvent<O, E> {
    /// A trigger arrived (before coalescing).
    Trigger(Trigger),
    /// A scan finished.
    Scan {
        batch: Batch,
        result: Result<O, E>,
        duration: Duration,
    },
}

/// A scan's result with the scanner handed back for the next one.
type ScanDone<S> = (S, Result<<S as Scanner>::Output, <S as Scanner>::Error>);

/// Pipeline settings.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub schedule: ScheduleConfig,
    /// Periodic rescan interval; `None` disables it.
    pub periodic: Option<Duration>,
    /// Whether to scan once at start.
    pub startup_scan: bool,
}

/// Runs until `stop` is cancelled or every trigger sender is gone (then it finishes the scan
/// in progress and any pending one first).
pub async fn run<S: Scanner>(
    config: PipelineConfig,
    scanner: S,
    mut triggers: mpsc::Receiver<Trigger>,
    events: mpsc::Sender<PipelineEvent<S::Output, S::Error>>,
    stop: CancellationToken,
) {
    let mut scheduler = Scheduler::new(config.schedule.clone(), Instant::now());
    if config.startup_scan {
        scheduler.add(Trigger::new(TriggerKind::Startup), Instant::now());
    }
    let far_future = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    let mut periodic = config
        .periodic
        .filter(|p| !p.is_zero())
        .map(|p| tokio::time::interval_at(Instant::now() + p, p));
    if let Some(interval) = &mut periodic {
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut running: Option<JoinHandle<ScanDone<S>>> = None;
    let mut running_batch: Option<(Batch, Instant)> = None;
    let mut scanner = Some(scanner);
    let mut sources_open = true;

    loop {
        if running.is_none()
            && let Some(mut s) = scanner.take()
        {
            match scheduler.take(Instant::now()) {
                Some(batch) => {
                    let for_scan = batch.clone();
                    running = Some(tokio::task::spawn_blocking(move || {
                        let result = s.scan(&for_scan);
                        (s, result)
                    }));
                    running_batch = Some((batch, Instant::now()));
                }
                None => scanner = Some(s),
            }
        }
        if !sources_open && running.is_none() && scheduler.ready_at().is_none() {
            return;
        }
        let wake = scheduler.ready_at().unwrap_or(far_future);
        tokio::select! {
            () = stop.cancelled() => {
                // Let a scan in progress finish so its result is not lost.
                if let (Some(handle), Some((batch, started))) = (running.take(), running_batch.take())
                    && let Ok((_, result)) = handle.await
                {
                    let duration = started.elapsed();
                    let _ = events.send(PipelineEvent::Scan { batch, result, duration }).await;
                }
                return;
            }
            trigger = triggers.recv(), if sources_open => match trigger {
                Some(trigger) => {
                    scheduler.add(trigger.clone(), Instant::now());
                    if events.send(PipelineEvent::Trigger(trigger)).await.is_err() {
                        return;
                    }
                }
                None => sources_open = false,
            },
            () = tokio::time::sleep_until(wake), if running.is_none() && wake < far_future => {}
            joined = join(&mut running), if running.is_some() => {
                running = None;
                scheduler.finished();
                let Some((batch, started)) = running_batch.take() else { continue };
                match joined {
                    Ok((s, result)) => {
                        scanner = Some(s);
                        let duration = started.elapsed();
                        if events.send(PipelineEvent::Scan { batch, result, duration }).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // The scanner panicked: it is gone, and so is scanning.
                        log::error!("the scanner crashed: {e}; no further scans");
                        return;
                    }
                }
            }
            () = tick(&mut periodic) => {
                scheduler.add(Trigger::new(TriggerKind::Periodic), Instant::now());
            }
        }
    }
}

async fn join<T>(handle: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match handle {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    /// Counts scans; each takes `cost` of (paused) time... on a blocking thread, so real time.
    struct Counting {
        scans: Arc<AtomicU32>,
    }

    impl Scanner for Counting {
        type Output = u32;
        type Error = String;
        fn scan(&mut self, _batch: &Batch) -> Result<u32, String> {
            Ok(self.scans.fetch_add(1, Ordering::SeqCst) + 1)
        }
    }

    fn config(periodic: Option<Duration>) -> PipelineConfig {
        PipelineConfig {
            schedule: ScheduleConfig {
                max_scans_per_minute: 0,
                ..ScheduleConfig::default()
            },
            periodic,
            startup_scan: true,
        }
    }

    async fn next_scan(events: &mut mpsc::Receiver<PipelineEvent<u32, String>>) -> (Batch, u32) {
        loop {
            match events.recv().await.expect("pipeline ended") {
                PipelineEvent::Scan { batch, result, .. } => return (batch, result.unwrap()),
                PipelineEvent::Trigger(_) => {}
            }
        }
    }

    #[tokio::test]
    async fn startup_scan_then_one_scan_per_burst() {
        let scans = Arc::new(AtomicU32::new(0));
        let (tx, rx) = mpsc::channel(64);
        let (etx, mut erx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            config(None),
            Counting {
                scans: scans.clone(),
            },
            rx,
            etx,
            stop.clone(),
        ));

        let (batch, n) = next_scan(&mut erx).await;
        assert_eq!((batch.cause.kind, n), (TriggerKind::Startup, 1));

        // A burst of inotify events becomes one scan after the quiet period.
        for _ in 0..20 {
            tx.send(Trigger::new(TriggerKind::Inotify)).await.unwrap();
        }
        let (batch, n) = next_scan(&mut erx).await;
        assert_eq!(batch.cause.kind, TriggerKind::Inotify);
        assert!(n == 2 && batch.total() >= 1);
        // Nothing else is pending: no third scan shows up.
        assert!(
            tokio::time::timeout(Duration::from_millis(400), next_scan(&mut erx))
                .await
                .is_err()
        );
        stop.cancel();
        task.await.unwrap();
        assert_eq!(scans.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_trigger_fires_on_schedule_and_not_before() {
        let scans = Arc::new(AtomicU32::new(0));
        let (_tx, rx) = mpsc::channel(64);
        let (etx, mut erx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let period = Duration::from_secs(4 * 3600);
        tokio::spawn(run(
            config(Some(period)),
            Counting {
                scans: scans.clone(),
            },
            rx,
            etx,
            stop.clone(),
        ));
        let (batch, _) = next_scan(&mut erx).await;
        assert_eq!(batch.cause.kind, TriggerKind::Startup);
        let started = Instant::now();
        let (batch, _) = next_scan(&mut erx).await;
        assert_eq!(batch.cause.kind, TriggerKind::Periodic);
        let waited = started.elapsed();
        assert!(
            waited >= period - Duration::from_secs(1) && waited <= period + Duration::from_secs(1),
            "{waited:?}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn ends_after_sources_close_with_pending_work_done() {
        let scans = Arc::new(AtomicU32::new(0));
        let (tx, rx) = mpsc::channel(64);
        let (etx, mut erx) = mpsc::channel(64);
        let task = tokio::spawn(run(
            config(None),
            Counting {
                scans: scans.clone(),
            },
            rx,
            etx,
            CancellationToken::new(),
        ));
        tx.send(Trigger::new(TriggerKind::Transaction))
            .await
            .unwrap();
        drop(tx);
        task.await.unwrap();
        let mut scan_events = 0;
        while let Some(event) = erx.recv().await {
            if matches!(event, PipelineEvent::Scan { .. }) {
                scan_events += 1;
            }
        }
        assert!((1..=2).contains(&scan_events), "{scan_events}");
        assert_eq!(scans.load(Ordering::SeqCst), scan_events);
    }
}
