//! The daemons' logger: env_logger on stderr, filtered by `GUESTWATCH_LOG`
//! (`error|warn|info|debug|trace`, or env_logger's per-module directives), `info` by default.
//! Lines look like `[2026-12-01T20:40:30Z INFO  guestwatch_relay::server] …`.
//!
//! env_logger ignores failed writes: logging to a closed stderr is silent, never a panic.

/// The environment variable that sets the log filter.
pub const LOG_ENV: &str = "GUESTWATCH_LOG";

/// The filter when [`LOG_ENV`] is not set.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the logger; call once, first thing in `main`.
pub fn init() {
    builder(LOG_ENV).init();
}

/// The logger's configuration, filtered by the variable `var`.
fn builder(var: &str) -> env_logger::Builder {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::new().filter_or(var, DEFAULT_FILTER));
    builder.target(env_logger::Target::Stderr);
    builder
}

#[cfg(test)]
mod tests {
    use log::LevelFilter;

    use super::*;

    #[test]
    fn info_by_default() {
        // A variable nobody sets: the default filter applies.
        let logger = builder("GUESTWATCH_LOG_TEST_NEVER_SET").build();
        assert_eq!(logger.filter(), LevelFilter::Info);
    }

    #[test]
    fn the_variable_sets_the_filter() {
        const VAR: &str = "GUESTWATCH_LOG_TEST_DEBUG";
        // SAFETY: only std reads the environment in these tests, and std serializes its own
        // reads and writes; no other test uses this variable.
        unsafe { std::env::set_var(VAR, "debug") };
        assert_eq!(builder(VAR).build().filter(), LevelFilter::Debug);
        unsafe { std::env::set_var(VAR, "warn,guestwatch_relay=trace") };
        assert_eq!(builder(VAR).build().filter(), LevelFilter::Trace);
        unsafe { std::env::remove_var(VAR) };
        assert_eq!(builder(VAR).build().filter(), LevelFilter::Info);
    }
}
