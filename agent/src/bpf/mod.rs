//! eBPF transaction probes: the embedded object, librpm discovery, loading and event decoding.

pub mod event;
pub mod librpm;
pub mod object;
pub mod probes;

pub use event::TxRecord;
pub use object::built_with_bpf;
pub use probes::{BpfError, ProbeOptions, TxProbes};
