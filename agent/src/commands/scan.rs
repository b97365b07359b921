//! `guestwatch-agent scan`: one report to stdout.

use anyhow::{Result, bail};

use crate::cli::ScanArgs;

pub fn scan(args: &ScanArgs) -> Result<()> {
    bail!(
        "scan is not available in this build yet ({:?})",
        args.format
    )
}
