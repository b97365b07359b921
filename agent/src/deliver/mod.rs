//! Delivering reports to the relay: the state directory and its writer thread, resuming after
//! a restart, the relay session (dialed, or accepted in pull mode), the sender's policy, retry
//! pacing (`guestwatch_daemon::backoff`).

pub mod listen;
pub mod machine;
pub mod resume;
pub mod sender;
pub mod session;
pub mod state;
pub mod stored;
pub mod transport;
pub mod wire;
pub mod writer;
