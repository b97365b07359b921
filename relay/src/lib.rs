//! guestwatch relay (being built; see docs/architecture.md).
