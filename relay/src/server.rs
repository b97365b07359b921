//! The relay's top level: sink, delivery engine, listeners, pulled VMs and the reloading of
//! their configuration, metrics endpoint, retrier and sweeper, sessions, and a clean shutdown
//! on SIGTERM/SIGINT.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    deliver::Deliverer,
    guestlog::GuestLog,
    listen::{self, Admitter, Incoming},
    metrics::Metrics,
    pull::{PullContext, Puller},
    reload::{Reloader, Sources},
    session::{self, SessionConfig, Shared},
    sink::Sink,
};

/// How long sessions get to finish their current exchange at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often the log says how many guest-caused lines its budgets suppressed.
const SUPPRESSED_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Runs the relay until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> Result<()> {
    let stop = CancellationToken::new();
    let signals = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        log::info!("shutting down");
        signals.cancel();
    });
    serve(settings, stop).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Runs the relay until `stop` is cancelled (tests drive this directly).
pub async fn serve(settings: Settings, stop: CancellationToken) -> Result<()> {
    let metrics = Metrics::new();
    let sink = Sink::open(&settings.sink, &settings.sink_options)
        .await
        .with_context(|| format!("opening the sink {}", settings.sink))?;
    log::info!("sink: {}", sink.describe());
    let deliverer = Arc::new(Deliverer::new(
        sink,
        settings.delivery.clone(),
        metrics.clone(),
    ));
    let guest_log = Arc::new(GuestLog::default());
    let admitter = Admitter::new(settings.limits.clone(), metrics.clone(), guest_log.clone());
    // The CID map and the pull targets, read again when they change (reload.rs).
    let sources = Sources {
        config_file: settings.config_file.clone(),
        pull_from_file: settings.pull_from_file,
        fixed_pull: settings.pull.clone(),
        pull_dir: settings.pull_dir.clone(),
        pull_port: settings.pull_port,
        cid_map: settings.cid_map.clone(),
        allow_loopback_cid: settings.allow_loopback_cid,
        hybrid: settings.hybrid.clone(),
    };
    let loaded = sources.load().map_err(anyhow::Error::msg)?;
    for skipped in &loaded.skipped {
        log::warn!("pull directory: skipping {skipped}");
    }
    let (cids_tx, cids) = watch::channel(Arc::new(loaded.cids.clone()));
    let (incoming_tx, mut incoming) = mpsc::channel::<Incoming>(64);
    let mut tasks = JoinSet::new();
    let mut sockets = Vec::new();

    for vm in &settings.hybrid {
        let path = listen::hybrid_socket_path(&vm.uds_path, settings.port);
        let listener =
            listen::bind_unix(&path).with_context(|| format!("listening on {}", path.display()))?;
        log::info!("listening for VM {} on {}", vm.name, path.display());
        sockets.push(path.clone());
        tasks.spawn(listen::serve_hybrid(
            vm.name.clone(),
            listener,
            path,
            admitter.clone(),
            incoming_tx.clone(),
            stop.clone(),
        ));
    }
    if let Some(port) = settings.vsock_port {
        if settings.allow_loopback_cid {
            log::warn!("accepting vsock peers from CID 1 (vsock_loopback): for tests only");
        }
        let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
            tokio_vsock::VMADDR_CID_ANY,
            port,
        ))
        .with_context(|| format!("listening on vsock port {port}"))?;
        log::info!("listening on vsock port {port}");
        tasks.spawn(listen::serve_vsock(
            listener,
            cids.clone(),
            admitter.clone(),
            incoming_tx.clone(),
            stop.clone(),
        ));
    }
    drop(incoming_tx);

    if let Some(addr) = settings.metrics {
        let health = deliverer.clone();
        let server = guestwatch_telemetry::MetricsServer::start(
            addr,
            metrics.registry.clone(),
            Arc::new(move || health.health()),
            module_path!(),
        )
        .await?;
        tasks.spawn(server.serve(stop.clone()));
    }
    tasks.spawn({
        let d = deliverer.clone();
        let stop = stop.clone();
        async move { d.run_retrier(stop).await }
    });
    tasks.spawn({
        let d = deliverer.clone();
        let stop = stop.clone();
        async move { d.run_sweeper(stop).await }
    });
    tasks.spawn({
        let guest_log = guest_log.clone();
        let stop = stop.clone();
        async move {
            let mut every = tokio::time::interval(SUPPRESSED_SUMMARY_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => guest_log.summarise(),
                }
            }
        }
    });

    let session_config = SessionConfig {
        max_frame: settings.max_frame,
        read_timeout: settings.read_timeout,
        idle_timeout: settings.idle_timeout,
    };
    let shared = Arc::new(Shared {
        deliverer: deliverer.clone(),
        metrics: metrics.clone(),
        guest_log: guest_log.clone(),
    });

    // Pulled VMs: one task per VM dials it and serves its session with the same code.
    let mut puller = Puller::new(
        Arc::new(PullContext {
            admitter: admitter.clone(),
            shared: shared.clone(),
            session: session_config.clone(),
            config: settings.pull_config.clone(),
            metrics: metrics.clone(),
        }),
        stop.clone(),
    );
    puller.apply(&loaded.targets);
    let pulled = loaded.targets.len();
    tasks.spawn(
        Reloader {
            sources,
            current: loaded,
            cids: cids_tx,
            admitter: admitter.clone(),
            puller,
            metrics: metrics.clone(),
        }
        .run(stop.clone(), SHUTDOWN_GRACE),
    );
    log::info!(
        "relay ready: {} hybrid VM(s){}, {pulled} pull target(s){}",
        settings.hybrid.len(),
        settings
            .vsock_port
            .map(|p| format!(", vsock port {p}"))
            .unwrap_or_default(),
        settings
            .pull_dir
            .as_ref()
            .map(|d| format!(" (watching {})", d.display()))
            .unwrap_or_default()
    );

    let mut sessions = JoinSet::new();
    // With no listener (pull only) the channel closes at once; the relay runs until `stop`.
    let mut accepting = true;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            next = incoming.recv(), if accepting => match next {
                Some(conn) => {
                    sessions.spawn(session::serve(conn, shared.clone(), session_config.clone(), stop.clone()));
                }
                None => accepting = false,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    stop.cancel();
    // Sessions finish the exchange in progress (a report being delivered gets its answer).
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    sessions.abort_all();
    while tasks.join_next().await.is_some() {}
    guest_log.summarise();
    for path in sockets {
        let _ = std::fs::remove_file(path);
    }
    let undelivered = deliverer.undelivered();
    if undelivered > 0 {
        log::warn!("{undelivered} report(s) were not delivered; their guests will retransmit them");
    }
    Ok(())
}
