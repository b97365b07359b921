//! The content hash of a package set: defined on the report's records by the protocol
//! (`guestwatch_protocol::inventory::content_hash`, specified in `docs/protocol.md`), so the
//! relay and any third party can verify it.

pub use guestwatch_protocol::inventory::content_hash;
