//! The guestwatch host relay as a library; `main.rs` is a thin CLI over it.

pub mod cache;
pub mod config;
pub mod deliver;
pub mod escape;
pub mod guestlog;
pub mod hybrid;
pub mod identity;
pub mod inventory;
pub mod listen;
pub mod metrics;
pub mod pull;
pub mod pulldir;
pub mod reload;
pub mod server;
pub mod session;
pub mod sink;
pub mod validate;
