//! Shared harness for guestwatch's end-to-end tests (in `tests/tests/`).
