//! One module per subcommand; each takes its parsed arguments and runs to completion.

pub mod detection;
pub mod run;
pub mod scan;
pub mod watch;
