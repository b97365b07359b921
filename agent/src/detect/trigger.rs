//! What made the agent scan, and who was behind it: the one schema of the `protocol` crate,
//! which the relay and every sink use too.

pub use guestwatch_protocol::{Ancestor, Attribution, Evidence, Timestamp, Trigger, TriggerKind};
