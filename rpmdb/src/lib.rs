//! Reading installed-package databases the way `rpm -qa` sees them.
//!
//! This crate is the ground truth of every guestwatch report and reads files an attacker inside
//! the VM may have crafted: it never panics, never allocates more than its input, opens
//! everything strictly read-only and never creates or deletes anything next to a database.
#![forbid(unsafe_code)]

mod package;

pub use package::Package;
