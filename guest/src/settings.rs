//! What the agent allows a host to make it do, and the bounds on that work
//! (`docs/security.md`). Fixed for the agent's life; shared by every port.

/// The bounds on the work one host client can cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest SOURCE or SINK stream, in bytes; a longer request is refused with ERROR limit.
    pub max_stream_bytes: u64,
    /// Guest-operation handles one session may hold open at once.
    pub max_guest_op_handles: usize,
    /// Guest operations queued or running on one handle at once.
    pub max_guest_ops_per_handle: usize,
    /// Decode-error reports (ERROR decode) one port sends per second at most; the rest are
    /// counted and the next report says how many were suppressed.
    pub decode_reports_per_sec: u32,
    /// Bytes one port writes in one service call before the event loop serves the others and
    /// the port's own input again (a stream never starves a HELLO_REQUEST or another port).
    pub write_budget: usize,
    /// Bytes one port reads in one service call before the event loop serves the others (input
    /// that needs no answer, such as SINK data, never starves another port).
    pub read_budget: usize,
    /// Longest delay a CLOSE may ask before the agent reopens the port, in ms; longer (and
    /// "never") is refused with ERROR limit, so no host can keep a port closed.
    pub max_reopen_delay_ms: u32,
}

/// The default stream limit: 16 GiB.
pub const DEFAULT_MAX_STREAM_BYTES: u64 = 16 << 30;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stream_bytes: DEFAULT_MAX_STREAM_BYTES,
            max_guest_op_handles: 16,
            max_guest_ops_per_handle: 64,
            decode_reports_per_sec: 10,
            write_budget: 64 * 1024,
            read_budget: 256 * 1024,
            max_reopen_delay_ms: vport_common::message::MAX_REOPEN_DELAY_MS,
        }
    }
}

/// The agent's policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// GUEST_OP requests are served (`--allow-guest-ops`); off by default, when every
    /// GUEST_OP is answered with ERROR denied and nothing is opened.
    pub allow_guest_ops: bool,
    /// The directory acknowledged streams read from and write into (`--stream-dir`); `None`
    /// (the default): every STREAM_OPEN is refused with ERROR denied.
    pub stream_dir: Option<std::path::PathBuf>,
    /// Work bounds.
    pub limits: Limits,
}
