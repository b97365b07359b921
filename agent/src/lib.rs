//! The guestwatch guest agent as a library: the binary in `main.rs` is a thin CLI over it.

pub mod bpf;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod deliver;
pub mod detect;
pub mod health;
pub mod metrics;
pub mod reporter;
pub mod scan;
