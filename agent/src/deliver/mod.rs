//! Delivering reports to the relay: the state directory, the transport, retry pacing.

pub mod backoff;
pub mod sender;
pub mod state;
pub mod transport;
