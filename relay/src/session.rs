//! One guest connection: handshake, reports, acknowledgements, limits. (Built on `protocol`.)

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{deliver::Deliverer, listen::Incoming, metrics::Metrics};

/// Per-connection limits.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub max_frame: u32,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Serves one connection until the guest leaves, a limit is hit, or `stop`.
pub async fn serve(
    conn: Incoming,
    _deliverer: Arc<Deliverer>,
    _metrics: Metrics,
    _config: SessionConfig,
    _stop: CancellationToken,
) {
    log::info!(
        "connection from {} closed: the wire protocol is not in this build yet",
        conn.identity.name
    );
}
