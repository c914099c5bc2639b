//! What a link carries and reports: its errors, the frames it returns, and the typed outcomes of
//! the agent requests.

use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::message::{EventRecord, Hello, SigioSample};
use vport_common::{Frame, Message, MessageError};

/// What went wrong on a link.
#[derive(Debug, Error)]
pub enum LinkError {
    /// Reading or writing the chardev connection failed.
    #[error("i/o error on port {port}")]
    Io {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection (the VM exited or the chardev went away).
    #[error("port {port}: connection closed by qemu")]
    Closed {
        /// Port name.
        port: String,
    },
    /// Nothing awaited arrived in time.
    #[error("port {port}: no {what} within {timeout:?}")]
    Timeout {
        /// Port name.
        port: String,
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// A message could not be encoded.
    #[error("port {port}: cannot encode message")]
    Encode {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: MessageError,
    },
    /// A frame could not be encoded (payload over the protocol maximum).
    #[error("port {port}: cannot encode frame")]
    Frame {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: vport_common::FrameError,
    },
    /// The agent answered with an ERROR message.
    #[error("port {port}: agent error {code}: {text}")]
    Agent {
        /// Port name.
        port: String,
        /// Error code.
        code: u16,
        /// Error text.
        text: String,
    },
}

/// A frame received, with its parsed message and arrival time.
#[derive(Debug, Clone)]
pub struct Received {
    /// The frame.
    pub frame: Frame,
    /// The message it carries, or why it does not parse.
    pub message: Result<Message, MessageError>,
    /// Local monotonic arrival time.
    pub at: Instant,
}

/// The result of a completed handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// The agent's HELLO.
    pub hello: Hello,
    /// The session id the agent chose.
    pub session: u32,
    /// When the HELLO arrived.
    pub hello_at: Instant,
    /// HELLO_REQUESTs the host had to send before a HELLO came.
    pub requests_sent: u32,
    /// Frames received before the HELLO and not part of the handshake (for example replies of
    /// an earlier session still in flight), in arrival order.
    pub before: Vec<Received>,
}

/// The BYE the agent sent before closing its end of the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bye {
    /// Delay before the agent reopens, ms ([`vport_common::message::NO_REOPEN`]: never).
    pub reopen_after_ms: u32,
    /// Why.
    pub reason: String,
    /// The session the BYE ended.
    pub session: u32,
}

/// The raw result of a PROBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The system call's return value.
    pub ret: i64,
    /// errno when `ret == -1`.
    pub errno: i32,
    /// poll revents (Poll probes).
    pub mask: u16,
    /// Bytes read (Read probes).
    pub data: Vec<u8>,
}

/// A SIGIO report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigioOutcome {
    /// Counting.
    pub enabled: bool,
    /// Signals counted since the last enable.
    pub count: u64,
    /// The first signals' times and poll masks.
    pub samples: Vec<SigioSample>,
}

/// The life-cycle records of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsOutcome {
    /// Oldest sequence number still held by the agent.
    pub first_seq: u64,
    /// The sequence number of the next record.
    pub next_seq: u64,
    /// Records, oldest first.
    pub records: Vec<EventRecord>,
}

/// A SOURCE stream as the host received and checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOutcome {
    /// Bytes received in DATA frames.
    pub bytes: u64,
    /// The agent's digest (SOURCE_DONE).
    pub digest: u64,
    /// True when every byte matched the pattern, in order, the byte counts agree and the
    /// host's digest equals the agent's.
    pub verified: bool,
    /// First stream offset that was wrong (a wrong byte, or a gap), if any.
    pub first_mismatch: Option<u64>,
    /// DATA frames received.
    pub frames: u64,
    /// From the request to SOURCE_DONE.
    pub elapsed: Duration,
}

/// A SINK stream's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkOutcome {
    /// Bytes the agent received.
    pub bytes: u64,
    /// The agent's digest of them.
    pub digest: u64,
    /// First wrong offset as the agent saw it, if any.
    pub first_mismatch: Option<u64>,
    /// True when the agent saw every byte right and its digest equals the pattern's.
    pub verified: bool,
    /// From the request to SINK_RESULT.
    pub elapsed: Duration,
}

/// The value of STATS entry `name`, if present.
pub fn stat(stats: &[(String, u64)], name: &str) -> Option<u64> {
    stats.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// One ping round trip.
#[derive(Debug, Clone, Copy)]
pub struct PingSample {
    /// Round-trip time measured on the host's monotonic clock.
    pub rtt: Duration,
    /// The agent's monotonic clock when it answered.
    pub agent_time_ns: u64,
    /// Host send time.
    pub sent: Instant,
}

/// Counters of a link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkStats {
    /// Frames sent.
    pub frames_out: u64,
    /// Frames received and returned.
    pub frames_in: u64,
    /// Frames of another session dropped.
    pub stale_frames: u64,
    /// Agent ERRORs that answered no request this link waited for (unsolicited reports,
    /// answers to frames sent raw or to requests given up on).
    pub agent_errors: u64,
}

/// An agent ERROR this link did not hand to a waiting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    /// Error code ([`vport_common::message::error_code`]).
    pub code: u16,
    /// Type of the frame it answers (0: none, such as a decode-error report).
    pub about_kind: u8,
    /// Sequence number of the frame it answers.
    pub about_seq: u32,
    /// The agent's text.
    pub text: String,
}

/// Agent reports kept by a link (the oldest are dropped first).
pub const MAX_AGENT_REPORTS: usize = 256;

/// How long the host waits for a HELLO before it asks for one with HELLO_REQUEST.
pub const HELLO_REQUEST_INTERVAL: Duration = Duration::from_secs(1);
