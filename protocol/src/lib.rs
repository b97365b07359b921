//! guestwatch protocol (being built; see docs/architecture.md).
