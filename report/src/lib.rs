//! guestwatch index reports (being built; see docs/architecture.md).
