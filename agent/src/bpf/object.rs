//! The BPF object embedded at build time (see `agent/build.rs`).

/// The compiled `agent-ebpf` object, or `None` when this agent was built without it.
#[cfg(guestwatch_bpf)]
pub static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!(
    "GUESTWATCH_BPF_OBJECT_PATH"
)));

/// The compiled `agent-ebpf` object, or `None` when this agent was built without it.
#[cfg(not(guestwatch_bpf))]
pub static OBJECT: Option<&[u8]> = None;

/// Whether this build carries BPF programs.
pub fn built_with_bpf() -> bool {
    OBJECT.is_some()
}
