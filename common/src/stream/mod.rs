//! Acknowledged streams: the pure machines of both ends (`docs/protocol.md`, "Acknowledged
//! streams").
//!
//! A stream is a byte sequence of known length with an id the host chooses, carried over as
//! many sessions as it takes. The receiver stores bytes in order and acknowledges, cumulatively,
//! the offset up to which every byte is stored ([`Receiver`]); the sender keeps at most a
//! window of unacknowledged bytes in flight and, on every new session, starts again where the
//! *receiver* says it stands ([`Sender`]). So a receiver that was rewound (a loadvm, a restored
//! snapshot, an agent restarted with its file) is sent what it lacks, and nothing it already
//! stored is stored twice. When every byte is acknowledged the sender sends the stream's
//! digest (xxh3-64) and the receiver answers with its verdict on the whole stored stream.
//!
//! Nothing here does I/O: the callers store and read the bytes and compute the digests; these
//! machines decide what may be sent, what is stored, what is acknowledged, and refuse illegal
//! inputs with a [`StreamError`].

mod receiver;
mod sender;
#[cfg(test)]
mod tests;

pub use receiver::{DataVerdict, Receiver, ReceiverStats};
pub use sender::{Sender, SenderInput, SenderState, SenderStats};
use thiserror::Error;

/// Window a host asks for when it has no reason to choose another: 512 KiB, below the agent's
/// read pause (1 MiB of queued output), so two streams either way on one port never stall.
pub const DEFAULT_WINDOW: u32 = 512 * 1024;
/// The largest window an agent grants.
pub const MAX_WINDOW: u32 = 4 << 20;
/// A receiver acknowledges at least every this many stored bytes (and at the stream's end,
/// and whenever its caller flushes).
pub const ACK_EVERY: u64 = 64 * 1024;

/// Longest stream name in bytes (a file name's limit on Linux, `NAME_MAX`).
pub const MAX_NAME: usize = 255;

/// Why `name` cannot name a file of a stream directory, or `None` when it can: it must be a
/// plain file name, not empty, without `/` or NUL, not starting with `.` (so never `.` or `..`,
/// nor one of the agent's own part or marker files), at most [`MAX_NAME`] bytes. The one rule:
/// the agent refuses such a name, and the host checks it before it connects.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME {
        Some("it is longer than 255 bytes")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.contains('\0') {
        Some("it contains NUL")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else {
        None
    }
}

/// An input a stream machine refuses: the peer broke the protocol, or the stored state does
/// not fit the stream. The stream stops; a new STREAM_OPEN may resume it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A resume offset past the end of the stream.
    #[error("stream {id:#x}: resume offset {offset} is past the stream's end {total}")]
    OffsetPastEnd {
        /// The stream.
        id: u64,
        /// The offset given.
        offset: u64,
        /// The stream's length.
        total: u64,
    },
    /// An acknowledgement of bytes never sent.
    #[error("stream {id:#x}: acknowledgement of offset {offset}, but only {sent} bytes were sent")]
    AckBeyondSent {
        /// The stream.
        id: u64,
        /// The acknowledged offset.
        offset: u64,
        /// Bytes sent so far.
        sent: u64,
    },
    /// Data that starts after the receiver's offset: bytes before it were lost.
    #[error(
        "stream {id:#x}: data at offset {offset}, but the receiver stands at {expected} (bytes in between missing)"
    )]
    Gap {
        /// The stream.
        id: u64,
        /// Where the data starts.
        offset: u64,
        /// The receiver's offset.
        expected: u64,
    },
    /// Data past the stream's announced end.
    #[error("stream {id:#x}: data up to offset {end} is past the stream's end {total}")]
    PastEnd {
        /// The stream.
        id: u64,
        /// Where the data ends.
        end: u64,
        /// The stream's length.
        total: u64,
    },
    /// An input the machine's state does not allow (named).
    #[error("stream {id:#x}: {input} is not allowed while the stream is {state}")]
    WrongState {
        /// The stream.
        id: u64,
        /// The input.
        input: &'static str,
        /// The state.
        state: &'static str,
    },
}
