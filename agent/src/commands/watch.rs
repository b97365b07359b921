//! `guestwatch-agent watch`: detection and scanning locally, one JSON line per event.

use anyhow::Result;

use crate::cli::WatchArgs;

pub async fn watch(_args: &WatchArgs) -> Result<()> {
    anyhow::bail!("watch is being rebuilt")
}
