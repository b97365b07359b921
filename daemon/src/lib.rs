//! What the guest agent and the host relay share as daemons, written once: retry pacing
//! ([`backoff`]), rate limits ([`token_bucket`]), duration parsing ([`duration`]), the
//! flag/environment/file layering of settings ([`config`]), the logger ([`logging`]) and
//! Unix socket files ([`unix_socket`]). Synchronous and runtime-free.

pub mod backoff;
pub mod config;
pub mod duration;
pub mod logging;
pub mod token_bucket;
pub mod unix_socket;
