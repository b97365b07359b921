//! The async loop that turns the trigger stream into scans: one scan at a time on a blocking
//! thread, triggers coalesced by the [`Scheduler`], a periodic trigger, a deadline on every
//! scan, and a clean stop.
//!
//! A scan still running at its deadline (`--scan-timeout`) is abandoned: the pipeline reports
//! it, stops waiting, and scans the next batch with a fresh scanner. The abandoned thread ends
//! on its own (the scanner is handed the deadline so it can stop there) and its result is
//! dropped. At most [`MAX_SCAN_THREADS`] scans exist at once: while that many are stuck, the
//! next scan waits for one of them to end.
//!
//! A scan that fails (or whose scanner panics) is not the end of its triggers: they are
//! scanned again after a backoff ([`RETRY_FIRST`] doubling to [`RETRY_MAX`], jittered as every
//! retry of the daemons is), with any that arrived meanwhile, so an unreadable moment of the
//! database never loses a change or who made it. An abandoned scan is not retried on its own (it would burn the deadline again);
//! the next trigger scans again.

use std::{future::Future, pin::Pin, task::Poll, time::Duration};

use guestwatch_daemon::backoff::Backoff;
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    schedule::{Batch, ScheduleConfig, Scheduler},
    trigger::{Trigger, TriggerKind},
};

/// Scans running at once, abandoned ones included.
pub const MAX_SCAN_THREADS: usize = 2;

/// A failed scan is retried after up to this (at least half of it), doubling with each
/// failure in a row up to [`RETRY_MAX`]: a database caught mid-rewrite is read soon, a broken
/// one costs little.
pub const RETRY_FIRST: Duration = Duration::from_millis(250);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// Something that scans the system; it runs on a blocking thread.
pub trait Scanner: Send + Sized + 'static {
    type Output: Send + 'static;
    type Error: Send + 'static;
    /// Scans for `batch`. The pipeline stops waiting at `deadline`: a scanner that can stop
    /// early should give up by then (the rpm database reader takes this deadline).
    fn scan(
        &mut self,
        batch: &Batch,
        deadline: std::time::Instant,
    ) -> Result<Self::Output, Self::Error>;
    /// A scanner in its initial state, to go on with while this one is stuck in an abandoned
    /// scan.
    fn fresh(&self) -> Self;
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
    /// A scan was still running at its deadline and was abandoned; the next trigger scans
    /// again.
    TimedOut { batch: Batch, after: Duration },
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
    /// How long a scan may run before it is abandoned.
    pub scan_timeout: Duration,
}

/// The scan in progress.
struct Running<S: Scanner> {
    batch: Batch,
    started: Instant,
    deadline: Instant,
    done: JoinHandle<ScanDone<S>>,
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
    // Only ever used to make fresh scanners.
    let template = scanner.fresh();
    let mut running: Option<Running<S>> = None;
    // Dropping a handle would detach its scan; they are kept to count and log them.
    let mut abandoned: Vec<JoinHandle<ScanDone<S>>> = Vec::new();
    let mut scanner = Some(scanner);
    let mut sources_open = true;
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    // A failed scan's triggers are scanned again after a backoff.
    let retry = |scheduler: &mut Scheduler, batch: Batch, backoff: &mut Backoff| {
        let delay = backoff.next_delay();
        log::warn!(
            "scanning again in {delay:.1?} for the {} trigger(s) of the failed scan",
            batch.total()
        );
        scheduler.retry(batch, Instant::now() + delay);
    };

    loop {
        if running.is_none() && abandoned.len() < MAX_SCAN_THREADS {
            let now = Instant::now();
            if let Some(batch) = scheduler.take(now) {
                let s = scanner.take().unwrap_or_else(|| template.fresh());
                running = Some(start(s, batch, now, config.scan_timeout));
            }
        }
        if !sources_open && running.is_none() && scheduler.ready_at().is_none() {
            return;
        }
        let wake = scheduler.ready_at().unwrap_or(far_future);
        let deadline = running.as_ref().map_or(far_future, |r| r.deadline);
        tokio::select! {
            () = stop.cancelled() => {
                // Let a scan in progress finish (until its deadline) so its result is not lost.
                if let Some(r) = running.take()
                    && let Ok(Ok((_, result))) = tokio::time::timeout_at(r.deadline, r.done).await
                {
                    let duration = r.started.elapsed();
                    let _ = events.send(PipelineEvent::Scan { batch: r.batch, result, duration }).await;
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
            // While too many abandoned scans are stuck, a ready batch waits for one to end, and
            // its wake-up stays off (it would fire at once, again and again).
            () = tokio::time::sleep_until(wake),
                if running.is_none() && abandoned.len() < MAX_SCAN_THREADS && wake < far_future => {}
            joined = done(&mut running), if running.is_some() => {
                let Some(r) = running.take() else { continue };
                scheduler.finished();
                match joined {
                    Ok((s, result)) => {
                        scanner = Some(s);
                        let duration = r.started.elapsed();
                        if result.is_err() {
                            retry(&mut scheduler, r.batch.clone(), &mut backoff);
                        } else {
                            backoff.reset();
                        }
                        if events.send(PipelineEvent::Scan { batch: r.batch, result, duration }).await.is_err() {
                            return;
                        }
                    }
                    // The scanner panicked: go on with a fresh one, and scan again.
                    Err(e) => {
                        log::error!(
                            "the scan after {} trigger crashed: {e}",
                            r.batch.cause.kind.as_str()
                        );
                        retry(&mut scheduler, r.batch, &mut backoff);
                    }
                }
            }
            () = tokio::time::sleep_until(deadline), if running.is_some() => {
                let Some(r) = running.take() else { continue };
                scheduler.finished();
                let after = r.started.elapsed();
                abandoned.push(r.done);
                if abandoned.len() >= MAX_SCAN_THREADS {
                    log::warn!(
                        "{} abandoned scans are still running; the next scan waits for one to end",
                        abandoned.len()
                    );
                }
                if events.send(PipelineEvent::TimedOut { batch: r.batch, after }).await.is_err() {
                    return;
                }
            }
            ended = any_done(&mut abandoned), if !abandoned.is_empty() => {
                abandoned.swap_remove(ended);
                log::info!("an abandoned scan ended; its result was dropped");
            }
            () = tick(&mut periodic) => {
                scheduler.add(Trigger::new(TriggerKind::Periodic), Instant::now());
            }
        }
    }
}

/// Starts scanning `batch` on a blocking thread. (An abandoned scan there must not hold up
/// the runtime's shutdown: `main.rs` shuts the runtime down in the background.)
fn start<S: Scanner>(mut s: S, batch: Batch, now: Instant, timeout: Duration) -> Running<S> {
    let deadline = now + timeout;
    let scan_deadline = std::time::Instant::now() + timeout;
    let for_scan = batch.clone();
    let done = tokio::task::spawn_blocking(move || {
        let result = s.scan(&for_scan, scan_deadline);
        (s, result)
    });
    Running {
        batch,
        started: now,
        deadline,
        done,
    }
}

async fn done<S: Scanner>(
    running: &mut Option<Running<S>>,
) -> Result<ScanDone<S>, tokio::task::JoinError> {
    match running {
        Some(r) => (&mut r.done).await,
        None => std::future::pending().await,
    }
}

/// The index of an abandoned scan that ended.
async fn any_done<T>(list: &mut [JoinHandle<T>]) -> usize {
    std::future::poll_fn(|cx| {
        for (i, handle) in list.iter_mut().enumerate() {
            if Pin::new(handle).poll(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    })
    .await
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
        fn scan(&mut self, _batch: &Batch, _deadline: std::time::Instant) -> Result<u32, String> {
            Ok(self.scans.fetch_add(1, Ordering::SeqCst) + 1)
        }
        fn fresh(&self) -> Self {
            Self {
                scans: self.scans.clone(),
            }
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
            scan_timeout: Duration::from_secs(30),
        }
    }

    async fn next_scan(events: &mut mpsc::Receiver<PipelineEvent<u32, String>>) -> (Batch, u32) {
        loop {
            match events.recv().await.expect("pipeline ended") {
                PipelineEvent::Scan { batch, result, .. } => return (batch, result.unwrap()),
                PipelineEvent::Trigger(_) => {}
                PipelineEvent::TimedOut { batch, .. } => panic!("{batch:?} timed out"),
            }
        }
    }

    /// A scanner whose scans hang while the gate is closed (a hostile database, as far as
    /// the pipeline can tell), and that counts how many run at once.
    #[derive(Default)]
    struct Gate {
        state: std::sync::Mutex<GateState>,
        changed: std::sync::Condvar,
    }

    #[derive(Default)]
    struct GateState {
        open: bool,
        started: u32,
        running: u32,
        most_running: u32,
        deadlines: Vec<std::time::Instant>,
    }

    struct Hanging {
        gate: Arc<Gate>,
        /// Set on scanners made by `fresh`.
        fresh: bool,
    }

    impl Scanner for Hanging {
        type Output = bool;
        type Error = String;
        fn scan(&mut self, _batch: &Batch, deadline: std::time::Instant) -> Result<bool, String> {
            let mut state = self.gate.state.lock().unwrap();
            state.started += 1;
            state.running += 1;
            state.most_running = state.most_running.max(state.running);
            state.deadlines.push(deadline);
            self.gate.changed.notify_all();
            while !state.open {
                state = self.gate.changed.wait(state).unwrap();
            }
            state.running -= 1;
            self.gate.changed.notify_all();
            Ok(self.fresh)
        }
        fn fresh(&self) -> Self {
            Self {
                gate: self.gate.clone(),
                fresh: true,
            }
        }
    }

    impl Gate {
        fn open(&self) {
            self.state.lock().unwrap().open = true;
            self.changed.notify_all();
        }

        /// Waits (on a blocking thread) until `f` holds.
        async fn until(self: &Arc<Self>, f: fn(&GateState) -> bool) {
            let gate = self.clone();
            tokio::task::spawn_blocking(move || {
                let mut state = gate.state.lock().unwrap();
                while !f(&state) {
                    state = gate.changed.wait(state).unwrap();
                }
            })
            .await
            .unwrap();
        }
    }

    type HangingEvents = mpsc::Receiver<PipelineEvent<bool, String>>;

    async fn next_outcome(events: &mut HangingEvents) -> Result<(TriggerKind, bool), TriggerKind> {
        loop {
            match events.recv().await.expect("pipeline ended") {
                PipelineEvent::Scan { batch, result, .. } => {
                    return Ok((batch.cause.kind, result.unwrap()));
                }
                PipelineEvent::TimedOut { batch, .. } => return Err(batch.cause.kind),
                PipelineEvent::Trigger(_) => {}
            }
        }
    }

    /// CPU time this thread (the test runtime's, which runs the pipeline) has used.
    fn cpu_time() -> Duration {
        // SAFETY: `rusage` is plain data; all zeroes is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage(2) with a valid `who` fills the struct it is given.
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        let time = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        time(usage.ru_utime) + time(usage.ru_stime)
    }

    fn hanging(timeout: Duration) -> (PipelineConfig, Arc<Gate>, Hanging) {
        let gate = Arc::new(Gate::default());
        let config = PipelineConfig {
            scan_timeout: timeout,
            ..config(None)
        };
        let scanner = Hanging {
            gate: gate.clone(),
            fresh: false,
        };
        (config, gate, scanner)
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
    async fn a_scan_past_its_deadline_is_abandoned_and_detection_goes_on() {
        let timeout = Duration::from_millis(300);
        let (config, gate, scanner) = hanging(timeout);
        let (tx, rx) = mpsc::channel(64);
        let (etx, mut erx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let started = std::time::Instant::now();
        let task = tokio::spawn(run(config, scanner, rx, etx, stop.clone()));

        // The startup scan hangs: it is abandoned at its deadline, which the scanner was given.
        assert_eq!(next_outcome(&mut erx).await, Err(TriggerKind::Startup));
        let deadline = gate.state.lock().unwrap().deadlines[0];
        assert!(deadline >= started + timeout && deadline < started + timeout * 30);
        // Triggers still flow while it hangs, and the next one is scanned by a fresh scanner.
        tx.send(Trigger::new(TriggerKind::Transaction))
            .await
            .unwrap();
        gate.until(|s| s.started == 2).await;
        gate.open();
        assert_eq!(
            next_outcome(&mut erx).await,
            Ok((TriggerKind::Transaction, true))
        );
        // The abandoned scan's result, when it comes, is dropped: nothing else is reported.
        gate.until(|s| s.running == 0).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(400), next_outcome(&mut erx))
                .await
                .is_err()
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn stuck_scans_never_pile_up() {
        let (config, gate, scanner) = hanging(Duration::from_millis(200));
        let (tx, rx) = mpsc::channel(64);
        let (etx, mut erx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(config, scanner, rx, etx, stop.clone()));
        assert_eq!(next_outcome(&mut erx).await, Err(TriggerKind::Startup));
        tx.send(Trigger::new(TriggerKind::Transaction))
            .await
            .unwrap();
        assert_eq!(next_outcome(&mut erx).await, Err(TriggerKind::Transaction));
        // Two scans are stuck: a third trigger waits for one of them instead of adding a
        // third, and waits idle.
        tx.send(Trigger::new(TriggerKind::Periodic)).await.unwrap();
        let cpu_before = cpu_time();
        assert!(
            tokio::time::timeout(Duration::from_millis(600), next_outcome(&mut erx))
                .await
                .is_err()
        );
        let spent = cpu_time() - cpu_before;
        assert!(
            spent < Duration::from_millis(300),
            "busy while waiting: {spent:?}"
        );
        assert_eq!(gate.state.lock().unwrap().started, 2);
        gate.open();
        assert_eq!(
            next_outcome(&mut erx).await,
            Ok((TriggerKind::Periodic, true))
        );
        assert_eq!(gate.state.lock().unwrap().most_running, 2);
        stop.cancel();
        task.await.unwrap();
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

    /// Fails its first `failures` scans; records when each one started.
    struct Flaky {
        scans: Arc<AtomicU32>,
        failures: u32,
        started: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    }

    impl Scanner for Flaky {
        type Output = u32;
        type Error = String;
        fn scan(&mut self, _batch: &Batch, _deadline: std::time::Instant) -> Result<u32, String> {
            if let Ok(mut started) = self.started.lock() {
                started.push(std::time::Instant::now());
            }
            let n = self.scans.fetch_add(1, Ordering::SeqCst) + 1;
            if n <= self.failures {
                Err(format!("database busy ({n})"))
            } else {
                Ok(n)
            }
        }
        fn fresh(&self) -> Self {
            Self {
                scans: self.scans.clone(),
                failures: self.failures,
                started: self.started.clone(),
            }
        }
    }

    #[tokio::test]
    async fn a_failed_scan_is_retried_with_its_triggers_and_backoff() {
        let scans = Arc::new(AtomicU32::new(0));
        let started_at = Arc::new(std::sync::Mutex::new(Vec::new()));
        let scanner = Flaky {
            scans: scans.clone(),
            failures: 3,
            started: started_at.clone(),
        };
        let mut config = config(None);
        config.startup_scan = false;
        let (ttx, trx) = mpsc::channel(16);
        let (etx, mut erx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(config, scanner, trx, etx, stop.clone()));
        let started = std::time::Instant::now();
        let mut tx = Trigger::new(TriggerKind::Transaction);
        tx.detail = Some("rpm -i x.rpm".into());
        ttx.send(tx.clone()).await.unwrap();
        let mut failed_at = Vec::new();
        let (batch, n) = loop {
            match erx.recv().await.expect("pipeline ended") {
                PipelineEvent::Scan {
                    result: Err(_),
                    batch,
                    ..
                } => {
                    assert_eq!(batch.cause.detail, tx.detail);
                    failed_at.push(started.elapsed());
                }
                PipelineEvent::Scan {
                    result: Ok(n),
                    batch,
                    ..
                } => break (batch, n),
                PipelineEvent::Trigger(_) => {}
                PipelineEvent::TimedOut { .. } => panic!("timed out"),
            }
        };
        // Three failures, then the fourth scan answers the same transaction, once.
        assert_eq!((n, failed_at.len()), (4, 3));
        assert_eq!(batch.cause.detail, tx.detail);
        assert_eq!(batch.transactions.len(), 1);
        assert_eq!(batch.counts.get(&TriggerKind::Transaction), Some(&1));
        // Between the starts of the attempts (each retry is timed from the end of the failed
        // scan, so a gap is never shorter than its delay): at least half of 250 ms, 500 ms and
        // 1 s, the backoff growing.
        let starts = started_at.lock().unwrap().clone();
        assert_eq!(starts.len(), 4);
        for (i, gap) in starts.windows(2).map(|w| w[1] - w[0]).enumerate() {
            assert!(gap >= RETRY_FIRST * (1 << i) / 2, "gap {i}: {gap:?}");
        }
        // Nothing more: a success ends the retries.
        assert!(
            tokio::time::timeout(Duration::from_millis(600), erx.recv())
                .await
                .is_err()
        );
        assert_eq!(scans.load(Ordering::SeqCst), 4);
        stop.cancel();
        task.await.unwrap();
    }
}
