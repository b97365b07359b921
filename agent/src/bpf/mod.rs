//! eBPF probes: the embedded object, librpm discovery, loading and event decoding.

pub mod btf;
pub mod event;
pub mod librpm;
pub mod object;
pub mod probes;
mod tracefs;

pub use event::{BpfRecord, FileId, FileRecord, TxRecord};
pub use object::built_with_bpf;
pub use probes::{BpfError, ProbeOptions, Probes, TamperStatus, TamperWatch};
