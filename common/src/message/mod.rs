//! Typed messages carried in frame payloads (protocol v1).
//!
//! Payload encoding: fields in order, integers little-endian, strings as a `u16` byte length
//! followed by UTF-8, byte blobs as the rest of the payload. A payload that is short, has
//! trailing bytes, or carries invalid UTF-8 is a [`MessageError`]; the frame itself was valid,
//! so the stream stays in sync and the receiver answers with an ERROR message.
//!
//! # Layout
//!
//! - `table.rs`: the message table, every type once (type byte, [`SentBy`], payload fields in
//!   wire order). [`MessageType`], [`Message`] and their encoder and decoder are generated from
//!   it, so a new message is one entry there. A test holds `docs/protocol.md`'s table of
//!   messages against it (type byte, name and direction of every row).
//! - `codec.rs`: how each field type is encoded (the `Wire` trait) and `wire_struct!`, which
//!   defines a payload struct and its encoding from one field list.
//! - `guest_op.rs`: [`GuestOp`] (generated from its own table of operation codes) and
//!   [`GuestOpDone`].
//! - here: the payload structs and enumerations the tables refer to, and the frame glue.

use crate::frame::Frame;
use thiserror::Error;

#[macro_use]
mod codec;
mod bulk;
mod guest_op;
mod table;
#[cfg(test)]
mod tests;

pub use bulk::{BulkError, BulkHead, BulkRef};
use codec::{ListItem, Reader};
pub use guest_op::{GuestOp, GuestOpDone, MAX_WRITE_EACH};
pub use table::{Message, MessageType, SentBy};

/// Error codes carried by [`Message::Error`] (`docs/protocol.md`, "Errors").
pub mod error_code {
    /// The frame's type is unknown to the receiver.
    pub const UNKNOWN_TYPE: u16 = 1;
    /// The payload did not parse.
    pub const MALFORMED: u16 = 2;
    /// The frame's session id is not the current session's.
    pub const BAD_SESSION: u16 = 3;
    /// The message is known but not valid in the receiver's current state.
    pub const BAD_STATE: u16 = 4;
    /// The receiver failed while serving the request.
    pub const INTERNAL: u16 = 5;
    /// Bytes the receiver read did not decode (damaged, foreign or torn frame, unknown
    /// version, over the payload limit). Unsolicited: it answers no request.
    pub const DECODE: u16 = 6;
    /// The request exceeds one of the receiver's limits (stream length, open handles, ...).
    pub const LIMIT: u16 = 7;
    /// The receiver's configuration or policy refuses the request (guest operations
    /// disabled; OPEN of something that is not a virtio-serial port).
    pub const DENIED: u16 = 8;
    /// The message type is valid only in the other direction (a reply sent as a request).
    pub const WRONG_DIRECTION: u16 = 9;

    /// A short name for `code` (`unknown_type`, ..., `wrong_direction`; `code_N` otherwise).
    pub fn name(code: u16) -> std::borrow::Cow<'static, str> {
        match code {
            UNKNOWN_TYPE => "unknown_type".into(),
            MALFORMED => "malformed".into(),
            BAD_SESSION => "bad_session".into(),
            BAD_STATE => "bad_state".into(),
            INTERNAL => "internal".into(),
            DECODE => "decode".into(),
            LIMIT => "limit".into(),
            DENIED => "denied".into(),
            WRONG_DIRECTION => "wrong_direction".into(),
            other => format!("code_{other}").into(),
        }
    }
}

wire_struct! {
    /// HELLO: the agent announces a new session on a port.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Hello (names "") {
        /// `vport-agent` version.
        pub agent_version: String,
        /// The port's virtio-serial name (`/sys/class/virtio-ports/*/name`).
        pub port_name: String,
        /// Guest kernel release (`uname -r`).
        pub kernel_release: String,
        /// Guest boot id (`/proc/sys/kernel/random/boot_id`): changes on every guest boot.
        pub boot_id: String,
        /// Fresh random value for this session; HELLO_ACK echoes it.
        pub nonce: u64,
        /// The agent's monotonic clock at send time, in nanoseconds.
        pub agent_time_ns: u64,
    }
}

/// `Bye::reopen_after_ms` value meaning "not reopening" (sent only at the agent's shutdown).
pub const NO_REOPEN: u32 = u32::MAX;
/// The longest `reopen_after_ms` a CLOSE may ask of vport-agent (its default limit): longer is
/// refused with ERROR limit, so no host can keep a port closed.
pub const MAX_REOPEN_DELAY_MS: u32 = 60_000;
/// `SinkResult::first_mismatch` value meaning "every byte matched".
pub const NO_MISMATCH: u64 = u64::MAX;

/// The system call a PROBE runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ProbeKind {
    /// `open(path, O_RDWR|O_NONBLOCK|O_CLOEXEC|O_NOCTTY)` of the port's node (closed again at
    /// once on success):
    /// EBUSY is expected while the agent holds the port.
    Open = 1,
    /// `lseek(fd, 0, SEEK_CUR)`: ESPIPE expected.
    Lseek = 2,
    /// Non-blocking `read(fd, buf, arg)`; on the agent's own fd the bytes are taken from the
    /// stream (they are returned in `data`, not decoded).
    Read = 3,
    /// `poll(fd, POLLIN|POLLOUT, 0)`: the exact revents.
    Poll = 4,
    /// `pread(fd, buf, 1, 0)`: ESPIPE expected.
    Pread = 5,
    /// `pwrite(fd, "p", 1, 0)`: one byte at offset 0; ESPIPE expected.
    Pwrite = 6,
}

/// Which file descriptor a PROBE uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ProbeTarget {
    /// The fd the agent serves the port on.
    OwnFd = 0,
    /// A second fd, opened for the probe (`O_RDWR|O_NONBLOCK|O_CLOEXEC|O_NOCTTY`) and closed
    /// after it; if that
    /// open fails, the result is the open's.
    SecondFd = 1,
}

/// SIGIO observation control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SigioAction {
    /// Report without changing anything.
    Query = 0,
    /// Reset the counters and start counting (F_SETOWN + O_ASYNC on the port fd).
    Enable = 1,
    /// Stop counting (clear O_ASYNC); the counters are kept for a final report.
    Disable = 2,
}

wire_struct! {
    /// One SIGIO the agent received for the port.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SigioSample (names "sample ") {
        /// Agent monotonic time of receipt.
        pub time_ns: u64,
        /// `poll(2)` revents of the port fd right after the signal.
        pub mask: u16,
    }
}
impl ListItem for SigioSample {}

wire_struct! {
    /// One life-cycle transition as the agent recorded it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct EventRecord (names "") {
        /// Sequence number; keeps counting when the ring drops old records.
        pub seq: u64,
        /// Agent monotonic time of the transition.
        pub time_ns: u64,
        /// Phase before (one byte on the wire, [`Phase::code`](crate::phase::Phase::code)).
        pub from: crate::phase::Phase,
        /// Phase after.
        pub to: crate::phase::Phase,
        /// Session id after the transition (0 when DISCONNECTED).
        pub session: u32,
        /// The agent's wakeup counter at the transition.
        pub wakeups: u64,
        /// The agent's CPU time (user + system) at the transition.
        pub cpu_ns: u64,
        /// What caused it (`poll: POLLHUP set`, `hello ack`, `unplugged`, ...).
        pub cause: String,
    }
}
impl ListItem for EventRecord {}

macro_rules! wire_enum {
    ($t:ident { $($v:ident),* }) => {
        impl $t {
            /// The value for a wire byte, if known.
            pub fn from_u8(b: u8) -> Option<$t> {
                [$($t::$v),*].into_iter().find(|v| *v as u8 == b)
            }
        }
    };
}
wire_enum!(ProbeKind { Open, Lseek, Read, Poll, Pread, Pwrite });
wire_enum!(ProbeTarget { OwnFd, SecondFd });
wire_enum!(SigioAction { Query, Enable, Disable });
wire_enum!(StreamDirection { ToGuest, ToHost });

/// Which way an acknowledged stream's bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamDirection {
    /// Host to guest: the host sends, the agent stores into its stream directory.
    ToGuest = 1,
    /// Guest to host: the agent sends (a file of its stream directory, or a pattern).
    ToHost = 2,
}

/// Why a frame's payload is not a valid message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// The frame's type byte is not a known message type.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// The payload ended before a field was complete.
    #[error("{kind:?} payload truncated in field {field}")]
    Truncated {
        /// Message type.
        kind: MessageType,
        /// The incomplete field.
        field: &'static str,
    },
    /// The payload has bytes after the last field.
    #[error("{kind:?} payload has {extra} trailing bytes")]
    TrailingBytes {
        /// Message type.
        kind: MessageType,
        /// How many.
        extra: usize,
    },
    /// A string field is not UTF-8.
    #[error("{kind:?} field {field} is not valid utf-8")]
    InvalidUtf8 {
        /// Message type.
        kind: MessageType,
        /// The field.
        field: &'static str,
    },
    /// A field holds a value outside its enumeration.
    #[error("{kind:?} field {field} has invalid value {value}")]
    InvalidValue {
        /// Message type.
        kind: MessageType,
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// A list has more entries than its u16 count prefix can say.
    #[error("{kind:?} field {field} has {len} entries, over the 65535-entry limit")]
    ListTooLong {
        /// Message type.
        kind: MessageType,
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// A string field is longer than its u16 length prefix can say.
    #[error("{kind:?} field {field} is {len} bytes, over the 65535-byte string limit")]
    StringTooLong {
        /// Message type.
        kind: MessageType,
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The message does not fit in a frame.
    #[error(transparent)]
    Frame(#[from] crate::frame::FrameError),
}

impl Message {
    /// An ERROR answering the frame with header `request`.
    pub fn error_for(request: &crate::frame::Header, code: u16, text: impl Into<String>) -> Message {
        Message::Error { code, about_kind: request.kind, about_seq: request.seq, text: text.into() }
    }

    /// An ERROR that answers no frame (`about_kind` 0), such as a decode error report.
    pub fn error_unsolicited(code: u16, text: impl Into<String>) -> Message {
        Message::Error { code, about_kind: 0, about_seq: 0, text: text.into() }
    }

    /// This message as a frame of session `session` with sequence number `seq`.
    pub fn to_frame(&self, session: u32, seq: u32) -> Result<Frame, MessageError> {
        Ok(Frame::new(self.kind() as u8, session, seq, self.encode_payload()?))
    }

    /// Appends this message to `out` as a frame of session `session` with sequence number
    /// `seq`, its payload written in place (the bytes of a DATA frame are copied once, into
    /// `out`). On error nothing is appended.
    pub fn encode_into(&self, session: u32, seq: u32, out: &mut Vec<u8>) -> Result<(), MessageError> {
        let header = crate::frame::Header { kind: self.kind() as u8, flags: 0, session, seq };
        // Room for the whole frame first: a large payload would otherwise grow the buffer
        // (and copy it) on the way, and the trailer double it once more.
        out.reserve(crate::frame::OVERHEAD + self.bulk_len() + 64);
        let start = crate::frame::begin_frame(out, &header);
        let mut writer = codec::Writer::after(self.kind(), std::mem::take(out));
        let written = self.write_payload(&mut writer);
        *out = writer.finish();
        if let Err(e) = written {
            out.truncate(start);
            return Err(e);
        }
        Ok(crate::frame::seal_frame(out, start)?)
    }

    /// The length of the message's byte blob (its `rest` field), the bulk of a large payload;
    /// 0 for messages without one.
    fn bulk_len(&self) -> usize {
        match self {
            Message::Echo(b) | Message::EchoReply(b) => b.len(),
            Message::Data { bytes, .. } | Message::StreamData { bytes, .. } => bytes.len(),
            Message::GuestOpDone(done) => done.data.len(),
            _ => 0,
        }
    }

    /// Parses the message a frame carries.
    pub fn from_frame(frame: &Frame) -> Result<Message, MessageError> {
        let kind = MessageType::from_u8(frame.header.kind).ok_or(MessageError::UnknownType(frame.header.kind))?;
        let mut r = Reader::new(&frame.payload, kind);
        let msg = Message::decode_payload(&mut r)?;
        r.finish()?;
        Ok(msg)
    }
}
