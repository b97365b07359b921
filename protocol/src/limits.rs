//! Limits, checked before allocation.

/// Default largest frame (header excluded): 16 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;
/// Default largest report payload after decompression: 64 MiB (a zstd bomb stops here).
pub const DEFAULT_MAX_REPORT_PAYLOAD: u32 = 64 * 1024 * 1024;

/// The limits a [`crate::Connection`] enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted or sent.
    pub max_frame: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}
