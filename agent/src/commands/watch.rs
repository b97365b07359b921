//! `guestwatch-agent watch`: detection and scanning locally, one JSON line per event.

use anyhow::{Context, Result};

use crate::{
    bpf::{ProbeOptions, TxProbes},
    cli::WatchArgs,
};

pub async fn watch(_args: &WatchArgs) -> Result<()> {
    let mut probes = TxProbes::load(&ProbeOptions {
        ignore_tgid: Some(std::process::id()),
        ..Default::default()
    })
    .context("loading the rpmtsRun probes")?;
    for library in probes.libraries() {
        log::info!("attached to rpmtsRun in {}", library.path.display());
    }
    loop {
        let record = probes.next().await.context("reading BPF events")?;
        println!(
            "{}",
            serde_json::json!({
                "event": "transaction",
                "phase": format!("{:?}", record.kind),
                "pid": record.tgid,
                "tid": record.pid,
                "uid": record.uid,
                "comm": record.comm,
                "ret": record.ret,
            })
        );
    }
}
