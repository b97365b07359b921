//! guestwatch rpmdb (being built; see docs/architecture.md).
