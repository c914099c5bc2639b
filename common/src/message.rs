//! Typed messages carried in frame payloads (protocol v1).
//!
//! Payload encoding: fields in order, integers little-endian, strings as a `u16` byte length
//! followed by UTF-8, byte blobs as the rest of the payload. A payload that is short, has
//! trailing bytes, or carries invalid UTF-8 is a [`MessageError`]; the frame itself was valid,
//! so the stream stays in sync and the receiver answers with an ERROR message.

use crate::frame::Frame;
use thiserror::Error;

/// Message type byte values. Gaps are reserved for later messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Agent -> host: a session starts.
    Hello = 0x01,
    /// Host -> agent: the session is accepted; the port becomes READY.
    HelloAck = 0x02,
    /// Host -> agent: start a new session now (the host connected and saw no HELLO).
    HelloRequest = 0x03,
    /// Agent -> host: the agent is about to close the port (command, or shutdown).
    Bye = 0x04,
    /// Either way: round-trip probe.
    Ping = 0x10,
    /// Answer to [`MessageType::Ping`].
    Pong = 0x11,
    /// Host -> agent: send these bytes back.
    Echo = 0x12,
    /// Agent -> host: the bytes of an [`MessageType::Echo`].
    EchoReply = 0x13,
    /// Host -> agent: close the port, reopen it after a delay.
    Close = 0x20,
    /// Host -> agent: close the port and reopen it at once.
    Reopen = 0x22,
    /// Host -> agent: run one system call on the port and report its raw result.
    Probe = 0x24,
    /// Agent -> host: the result of a [`MessageType::Probe`].
    ProbeResult = 0x25,
    /// Host -> agent: start, stop or query SIGIO observation on the port.
    Sigio = 0x26,
    /// Agent -> host: SIGIO observations.
    SigioReport = 0x27,
    /// Host -> agent: send a seeded pattern stream.
    Source = 0x30,
    /// Agent -> host: a [`MessageType::Source`] stream is complete.
    SourceDone = 0x31,
    /// Either way: a piece of a pattern stream.
    Data = 0x32,
    /// Host -> agent: receive and verify a seeded pattern stream.
    Sink = 0x34,
    /// Agent -> host: the verdict on a [`MessageType::Sink`] stream.
    SinkResult = 0x35,
    /// Host -> agent: report counters.
    Stats = 0x40,
    /// Agent -> host: counters as name/value pairs.
    StatsReply = 0x41,
    /// Host -> agent: report the port's life-cycle history.
    Events = 0x42,
    /// Agent -> host: life-cycle history records.
    EventsReply = 0x43,
    /// Host -> agent: a guest operation on a port the agent does not serve ([`GuestOp`]).
    GuestOp = 0x50,
    /// Agent -> host: a [`MessageType::GuestOp`] completed ([`GuestOpDone`]).
    GuestOpDone = 0x51,
    /// Either way: a request could not be served.
    Error = 0x7F,
}

impl MessageType {
    /// Every type this crate knows, for exhaustive tests and documentation.
    pub const ALL: [MessageType; 26] = [
        MessageType::Hello,
        MessageType::HelloAck,
        MessageType::HelloRequest,
        MessageType::Bye,
        MessageType::Ping,
        MessageType::Pong,
        MessageType::Echo,
        MessageType::EchoReply,
        MessageType::Close,
        MessageType::Reopen,
        MessageType::Probe,
        MessageType::ProbeResult,
        MessageType::Sigio,
        MessageType::SigioReport,
        MessageType::Source,
        MessageType::SourceDone,
        MessageType::Data,
        MessageType::Sink,
        MessageType::SinkResult,
        MessageType::Stats,
        MessageType::StatsReply,
        MessageType::Events,
        MessageType::EventsReply,
        MessageType::GuestOp,
        MessageType::GuestOpDone,
        MessageType::Error,
    ];

    /// The type for a frame's type byte, if known.
    pub fn from_u8(b: u8) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| *t as u8 == b)
    }
}

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

/// HELLO: the agent announces a new session on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
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

/// One SIGIO the agent received for the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigioSample {
    /// Agent monotonic time of receipt.
    pub time_ns: u64,
    /// `poll(2)` revents of the port fd right after the signal.
    pub mask: u16,
}

/// A port state as a number on the wire: 0 DISCONNECTED, 1 CONNECTED, 2 READY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StateCode {
    /// No host client.
    Disconnected = 0,
    /// Host attached, handshake pending.
    Connected = 1,
    /// Session live.
    Ready = 2,
}

impl From<&crate::lifecycle::PortState> for StateCode {
    fn from(s: &crate::lifecycle::PortState) -> Self {
        use crate::lifecycle::PortState as S;
        match s {
            S::Disconnected => StateCode::Disconnected,
            S::Connected { .. } => StateCode::Connected,
            S::Ready { .. } => StateCode::Ready,
        }
    }
}

impl StateCode {
    /// The name used in traces and logs.
    pub fn name(self) -> &'static str {
        match self {
            StateCode::Disconnected => "DISCONNECTED",
            StateCode::Connected => "CONNECTED",
            StateCode::Ready => "READY",
        }
    }
}

/// One life-cycle transition as the agent recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Sequence number; keeps counting when the ring drops old records.
    pub seq: u64,
    /// Agent monotonic time of the transition.
    pub time_ns: u64,
    /// State before.
    pub from: StateCode,
    /// State after.
    pub to: StateCode,
    /// Session id after the transition (0 when DISCONNECTED).
    pub session: u32,
    /// The agent's wakeup counter at the transition.
    pub wakeups: u64,
    /// The agent's CPU time (user + system) at the transition.
    pub cpu_ns: u64,
    /// What caused it (`poll: POLLHUP set`, `hello ack`, `unplugged`, ...).
    pub cause: String,
}

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
wire_enum!(StateCode { Disconnected, Connected, Ready });

/// A guest operation: one system call (or a loop of them) the agent runs inside the guest on a
/// port it does **not** serve, so the host can observe what an ordinary guest program sees.
///
/// Operations on a handle run in order of arrival on a worker thread of that handle, so a
/// blocking call (a write with no host client, a read with no data) blocks only its handle:
/// the agent keeps serving the control port, and the completion ([`GuestOpDone`]) arrives when
/// the call returns. Handles belong to the control session that opened them and are closed
/// when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOp {
    /// `open(node, O_RDWR|O_CLOEXEC|O_NOCTTY|O_NOFOLLOW [|O_NONBLOCK])` of a virtio-serial port
    /// node. `port` is a port reference: a sysfs port name, a node name `vportNpM`,
    /// `/dev/vportNpM` or `/dev/virtio-ports/NAME`, always resolved through sysfs (anything else
    /// is refused with ERROR denied; see `docs/security.md`). Done: `ret` = the new handle (> 0)
    /// or -1 and `errno` (ENOENT: no such port in sysfs); `data` = the device path opened.
    Open {
        /// Port reference (see above).
        port: String,
        /// Open with `O_NONBLOCK`.
        nonblock: bool,
        /// Count SIGIO for this fd (`F_SETOWN` + `F_SETSIG` + `O_ASYNC`), see [`GuestOp::SigioCount`].
        sigio: bool,
    },
    /// `read(2)`. With `all` false: one call of at most `bytes` (<= 64 KiB) bytes, `data` holds
    /// what it returned. With `all` true: calls until `bytes` bytes came, a call returned 0 or
    /// failed; `bytes`/`digest` (xxh3-64) cover everything, `data` the first 4 KiB.
    Read {
        /// The handle.
        handle: u32,
        /// Bytes wanted.
        bytes: u64,
        /// Keep reading until `bytes` came (or 0 / an error).
        all: bool,
    },
    /// `write(2)` of `bytes` bytes of the pattern of `seed`, calling again after short writes;
    /// done when all are written or a call failed: `bytes` written, `digest` of them, `ret` the
    /// last call's result.
    Write {
        /// The handle.
        handle: u32,
        /// Pattern seed ([`crate::pattern`]).
        seed: u64,
        /// Stream length.
        bytes: u64,
    },
    /// `poll(2)` on the handle: `ret` the call's result, `mask` the exact revents.
    Poll {
        /// The handle.
        handle: u32,
        /// Requested events.
        events: u16,
        /// poll timeout (-1 waits for ever).
        timeout_ms: i32,
    },
    /// Close the handle (after the operations queued on it; a blocked one is interrupted).
    Close {
        /// The handle.
        handle: u32,
    },
    /// Interrupt the handle's blocked operation (it completes with EINTR).
    Cancel {
        /// The handle.
        handle: u32,
    },
    /// The port's debugfs file (`/sys/kernel/debug/virtio-ports/vportNpM`) as text in `data`.
    Debugfs {
        /// Port name or node (`vportNpM`).
        port: String,
    },
    /// Every port in sysfs as `node name` lines in `data` (name empty when unset).
    Sysfs,
    /// SIGIO signals received for the handle since it was opened with `sigio`: `ret` the
    /// count, `data` the poll mask sampled at each (u16 little-endian, first 64).
    SigioCount {
        /// The handle.
        handle: u32,
    },
}

impl GuestOp {
    /// The handle the operation runs on, if any.
    pub fn handle(&self) -> Option<u32> {
        match self {
            GuestOp::Read { handle, .. }
            | GuestOp::Write { handle, .. }
            | GuestOp::Poll { handle, .. }
            | GuestOp::Close { handle }
            | GuestOp::Cancel { handle }
            | GuestOp::SigioCount { handle } => Some(*handle),
            GuestOp::Open { .. } | GuestOp::Debugfs { .. } | GuestOp::Sysfs => None,
        }
    }

    fn code(&self) -> u8 {
        match self {
            GuestOp::Open { .. } => 1,
            GuestOp::Read { .. } => 2,
            GuestOp::Write { .. } => 3,
            GuestOp::Poll { .. } => 4,
            GuestOp::Close { .. } => 5,
            GuestOp::Cancel { .. } => 6,
            GuestOp::Debugfs { .. } => 7,
            GuestOp::Sysfs => 8,
            GuestOp::SigioCount { .. } => 9,
        }
    }
}

/// The completion of a [`GuestOp`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestOpDone {
    /// The request's `op_id`.
    pub op_id: u32,
    /// The (last) system call's return value; -1 on failure.
    pub ret: i64,
    /// `errno` when `ret` is -1, else 0.
    pub errno: i32,
    /// poll revents (POLL), else 0.
    pub mask: u16,
    /// Bytes moved (READ, WRITE).
    pub bytes: u64,
    /// xxh3-64 of the bytes moved (READ, WRITE), else 0.
    pub digest: u64,
    /// Time from the start of the operation to its completion, in the guest.
    pub elapsed_ns: u64,
    /// Operation-specific bytes (see [`GuestOp`]).
    pub data: Vec<u8>,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// The host accepts the session whose HELLO carried `nonce`.
    HelloAck {
        /// Echo of [`Hello::nonce`].
        nonce: u64,
        /// Host software version.
        host_version: String,
    },
    /// Ask the agent to start a new session (it answers with HELLO).
    HelloRequest,
    /// Round-trip probe; `time_ns` is the sender's monotonic clock.
    Ping {
        /// Sender's clock at send time.
        time_ns: u64,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's `time_ns`, echoed.
        ping_time_ns: u64,
        /// The responder's monotonic clock when it answered.
        time_ns: u64,
    },
    /// Bytes to send back.
    Echo(Vec<u8>),
    /// The bytes of an echo.
    EchoReply(Vec<u8>),
    /// The agent is about to close the port. Sent and flushed before the close, so the host
    /// learns of it in band.
    Bye {
        /// When the agent will reopen the port, or [`NO_REOPEN`].
        reopen_after_ms: u32,
        /// Why (`close requested`, `reopen requested`, `shutdown`).
        reason: String,
    },
    /// Close the port and reopen it after `reopen_after_ms` (answered with BYE).
    Close {
        /// Delay before reopening.
        reopen_after_ms: u32,
    },
    /// Close the port and reopen it at once (answered with BYE).
    Reopen,
    /// Run one system call on the port.
    Probe {
        /// Which call.
        kind: ProbeKind,
        /// On which fd.
        target: ProbeTarget,
        /// Call argument (byte count for READ).
        arg: u32,
    },
    /// The raw result of a probe.
    ProbeResult {
        /// Which call.
        kind: ProbeKind,
        /// On which fd.
        target: ProbeTarget,
        /// The call's return value (-1 on failure).
        ret: i64,
        /// `errno` when `ret` is -1, else 0.
        errno: i32,
        /// For POLL: the revents; else 0.
        mask: u16,
        /// For READ: the bytes read.
        data: Vec<u8>,
    },
    /// Control SIGIO observation.
    Sigio {
        /// What to do.
        action: SigioAction,
    },
    /// SIGIO observations since the last Enable.
    SigioReport {
        /// Whether observation is on.
        enabled: bool,
        /// Signals received.
        count: u64,
        /// The first signals, with the poll mask seen at each (bounded by the agent).
        samples: Vec<SigioSample>,
    },
    /// Send `bytes` bytes of the pattern of `seed` in DATA frames of at most `chunk` bytes,
    /// then SOURCE_DONE.
    Source {
        /// Pattern seed.
        seed: u64,
        /// Stream length.
        bytes: u64,
        /// Largest DATA payload (after its 8-byte offset).
        chunk: u32,
    },
    /// A SOURCE stream is complete.
    SourceDone {
        /// Bytes sent.
        bytes: u64,
        /// xxh3-64 of the bytes sent.
        digest: u64,
    },
    /// A piece of a pattern stream starting at stream offset `offset`.
    Data {
        /// Offset of the first byte in the stream.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Receive `bytes` bytes of the pattern of `seed` in DATA frames and verify them.
    Sink {
        /// Pattern seed.
        seed: u64,
        /// Stream length.
        bytes: u64,
    },
    /// The verdict on a SINK stream.
    SinkResult {
        /// Bytes received.
        bytes: u64,
        /// xxh3-64 of the bytes received.
        digest: u64,
        /// Stream offset of the first byte that differed from the pattern, or [`NO_MISMATCH`].
        first_mismatch: u64,
    },
    /// Ask for counters.
    Stats,
    /// Counters, as (name, value) pairs; names are stable, new ones may appear.
    StatsReply(Vec<(String, u64)>),
    /// Ask for the port's life-cycle records with `seq >= since_seq`.
    Events {
        /// First sequence number wanted.
        since_seq: u64,
    },
    /// Life-cycle records.
    EventsReply {
        /// Oldest sequence number still in the agent's ring.
        first_seq: u64,
        /// The sequence number the next record will get.
        next_seq: u64,
        /// The records, oldest first.
        records: Vec<EventRecord>,
    },
    /// Run a guest operation; answered with [`Message::GuestOpDone`] carrying `op_id`, or
    /// ERROR when the request itself is refused.
    GuestOp {
        /// Chosen by the host; echoed in the completion.
        op_id: u32,
        /// The operation.
        op: GuestOp,
    },
    /// A guest operation completed.
    GuestOpDone(GuestOpDone),
    /// A request could not be served, or (`about_kind` 0) bytes did not decode.
    Error {
        /// One of [`error_code`].
        code: u16,
        /// Type byte of the frame this answers; 0 when it answers no frame (decode errors).
        about_kind: u8,
        /// Sequence number of the frame this answers (0 when `about_kind` is 0), so a host
        /// with several requests outstanding knows which one failed.
        about_seq: u32,
        /// Human-readable detail.
        text: String,
    },
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
}

impl Message {
    /// The type byte of this message.
    pub fn kind(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloAck { .. } => MessageType::HelloAck,
            Message::HelloRequest => MessageType::HelloRequest,
            Message::Ping { .. } => MessageType::Ping,
            Message::Pong { .. } => MessageType::Pong,
            Message::Echo(_) => MessageType::Echo,
            Message::EchoReply(_) => MessageType::EchoReply,
            Message::Bye { .. } => MessageType::Bye,
            Message::Close { .. } => MessageType::Close,
            Message::Reopen => MessageType::Reopen,
            Message::Probe { .. } => MessageType::Probe,
            Message::ProbeResult { .. } => MessageType::ProbeResult,
            Message::Sigio { .. } => MessageType::Sigio,
            Message::SigioReport { .. } => MessageType::SigioReport,
            Message::Source { .. } => MessageType::Source,
            Message::SourceDone { .. } => MessageType::SourceDone,
            Message::Data { .. } => MessageType::Data,
            Message::Sink { .. } => MessageType::Sink,
            Message::SinkResult { .. } => MessageType::SinkResult,
            Message::Stats => MessageType::Stats,
            Message::StatsReply(_) => MessageType::StatsReply,
            Message::Events { .. } => MessageType::Events,
            Message::EventsReply { .. } => MessageType::EventsReply,
            Message::GuestOp { .. } => MessageType::GuestOp,
            Message::GuestOpDone(_) => MessageType::GuestOpDone,
            Message::Error { .. } => MessageType::Error,
        }
    }

    /// The payload bytes of this message.
    pub fn encode_payload(&self) -> Result<Vec<u8>, MessageError> {
        let mut w = Writer { out: Vec::new(), kind: self.kind() };
        match self {
            Message::Hello(h) => {
                w.str("agent_version", &h.agent_version)?;
                w.str("port_name", &h.port_name)?;
                w.str("kernel_release", &h.kernel_release)?;
                w.str("boot_id", &h.boot_id)?;
                w.u64(h.nonce);
                w.u64(h.agent_time_ns);
            }
            Message::HelloAck { nonce, host_version } => {
                w.u64(*nonce);
                w.str("host_version", host_version)?;
            }
            Message::HelloRequest => {}
            Message::Ping { time_ns } => w.u64(*time_ns),
            Message::Pong { ping_time_ns, time_ns } => {
                w.u64(*ping_time_ns);
                w.u64(*time_ns);
            }
            Message::Echo(b) | Message::EchoReply(b) => w.out.extend_from_slice(b),
            Message::Bye { reopen_after_ms, reason } => {
                w.u32(*reopen_after_ms);
                w.str("reason", reason)?;
            }
            Message::Close { reopen_after_ms } => w.u32(*reopen_after_ms),
            Message::Reopen | Message::Stats => {}
            Message::Probe { kind, target, arg } => {
                w.u8(*kind as u8);
                w.u8(*target as u8);
                w.u32(*arg);
            }
            Message::ProbeResult { kind, target, ret, errno, mask, data } => {
                w.u8(*kind as u8);
                w.u8(*target as u8);
                w.u64(*ret as u64);
                w.u32(*errno as u32);
                w.u16(*mask);
                w.out.extend_from_slice(data);
            }
            Message::Sigio { action } => w.u8(*action as u8),
            Message::SigioReport { enabled, count, samples } => {
                w.u8(u8::from(*enabled));
                w.u64(*count);
                w.count("samples", samples.len())?;
                for s in samples {
                    w.u64(s.time_ns);
                    w.u16(s.mask);
                }
            }
            Message::Source { seed, bytes, chunk } => {
                w.u64(*seed);
                w.u64(*bytes);
                w.u32(*chunk);
            }
            Message::SourceDone { bytes, digest } => {
                w.u64(*bytes);
                w.u64(*digest);
            }
            Message::Data { offset, bytes } => {
                w.u64(*offset);
                w.out.extend_from_slice(bytes);
            }
            Message::Sink { seed, bytes } => {
                w.u64(*seed);
                w.u64(*bytes);
            }
            Message::SinkResult { bytes, digest, first_mismatch } => {
                w.u64(*bytes);
                w.u64(*digest);
                w.u64(*first_mismatch);
            }
            Message::StatsReply(pairs) => {
                w.count("stats", pairs.len())?;
                for (name, value) in pairs {
                    w.str("stat name", name)?;
                    w.u64(*value);
                }
            }
            Message::Events { since_seq } => w.u64(*since_seq),
            Message::EventsReply { first_seq, next_seq, records } => {
                w.u64(*first_seq);
                w.u64(*next_seq);
                w.count("records", records.len())?;
                for r in records {
                    w.u64(r.seq);
                    w.u64(r.time_ns);
                    w.u8(r.from as u8);
                    w.u8(r.to as u8);
                    w.u32(r.session);
                    w.u64(r.wakeups);
                    w.u64(r.cpu_ns);
                    w.str("cause", &r.cause)?;
                }
            }
            Message::GuestOp { op_id, op } => {
                w.u32(*op_id);
                w.u8(op.code());
                match op {
                    GuestOp::Open { port, nonblock, sigio } => {
                        w.str("port", port)?;
                        w.u8(u8::from(*nonblock));
                        w.u8(u8::from(*sigio));
                    }
                    GuestOp::Read { handle, bytes, all } => {
                        w.u32(*handle);
                        w.u64(*bytes);
                        w.u8(u8::from(*all));
                    }
                    GuestOp::Write { handle, seed, bytes } => {
                        w.u32(*handle);
                        w.u64(*seed);
                        w.u64(*bytes);
                    }
                    GuestOp::Poll { handle, events, timeout_ms } => {
                        w.u32(*handle);
                        w.u16(*events);
                        w.u32(*timeout_ms as u32);
                    }
                    GuestOp::Close { handle } | GuestOp::Cancel { handle } | GuestOp::SigioCount { handle } => {
                        w.u32(*handle)
                    }
                    GuestOp::Debugfs { port } => w.str("port", port)?,
                    GuestOp::Sysfs => {}
                }
            }
            Message::GuestOpDone(d) => {
                w.u32(d.op_id);
                w.u64(d.ret as u64);
                w.u32(d.errno as u32);
                w.u16(d.mask);
                w.u64(d.bytes);
                w.u64(d.digest);
                w.u64(d.elapsed_ns);
                w.out.extend_from_slice(&d.data);
            }
            Message::Error { code, about_kind, about_seq, text } => {
                w.u16(*code);
                w.u8(*about_kind);
                w.u32(*about_seq);
                w.str("text", text)?;
            }
        }
        Ok(w.out)
    }

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

    /// Parses the message a frame carries.
    pub fn from_frame(frame: &Frame) -> Result<Message, MessageError> {
        let kind = MessageType::from_u8(frame.header.kind).ok_or(MessageError::UnknownType(frame.header.kind))?;
        let mut r = Reader { b: &frame.payload, kind };
        let msg = match kind {
            MessageType::Hello => Message::Hello(Hello {
                agent_version: r.str("agent_version")?,
                port_name: r.str("port_name")?,
                kernel_release: r.str("kernel_release")?,
                boot_id: r.str("boot_id")?,
                nonce: r.u64("nonce")?,
                agent_time_ns: r.u64("agent_time_ns")?,
            }),
            MessageType::HelloAck => Message::HelloAck { nonce: r.u64("nonce")?, host_version: r.str("host_version")? },
            MessageType::HelloRequest => Message::HelloRequest,
            MessageType::Ping => Message::Ping { time_ns: r.u64("time_ns")? },
            MessageType::Pong => Message::Pong { ping_time_ns: r.u64("ping_time_ns")?, time_ns: r.u64("time_ns")? },
            MessageType::Echo => Message::Echo(r.rest()),
            MessageType::EchoReply => Message::EchoReply(r.rest()),
            MessageType::Bye => Message::Bye { reopen_after_ms: r.u32("reopen_after_ms")?, reason: r.str("reason")? },
            MessageType::Close => Message::Close { reopen_after_ms: r.u32("reopen_after_ms")? },
            MessageType::Reopen => Message::Reopen,
            MessageType::Probe => Message::Probe {
                kind: r.enum_u8("kind", ProbeKind::from_u8)?,
                target: r.enum_u8("target", ProbeTarget::from_u8)?,
                arg: r.u32("arg")?,
            },
            MessageType::ProbeResult => Message::ProbeResult {
                kind: r.enum_u8("kind", ProbeKind::from_u8)?,
                target: r.enum_u8("target", ProbeTarget::from_u8)?,
                ret: r.u64("ret")? as i64,
                errno: r.u32("errno")? as i32,
                mask: r.u16("mask")?,
                data: r.rest(),
            },
            MessageType::Sigio => Message::Sigio { action: r.enum_u8("action", SigioAction::from_u8)? },
            MessageType::SigioReport => {
                let enabled = r.bool("enabled")?;
                let count = r.u64("count")?;
                let n = r.u16("samples")?;
                let samples = (0..n)
                    .map(|_| Ok(SigioSample { time_ns: r.u64("sample time_ns")?, mask: r.u16("sample mask")? }))
                    .collect::<Result<_, MessageError>>()?;
                Message::SigioReport { enabled, count, samples }
            }
            MessageType::Source => {
                Message::Source { seed: r.u64("seed")?, bytes: r.u64("bytes")?, chunk: r.u32("chunk")? }
            }
            MessageType::SourceDone => Message::SourceDone { bytes: r.u64("bytes")?, digest: r.u64("digest")? },
            MessageType::Data => Message::Data { offset: r.u64("offset")?, bytes: r.rest() },
            MessageType::Sink => Message::Sink { seed: r.u64("seed")?, bytes: r.u64("bytes")? },
            MessageType::SinkResult => Message::SinkResult {
                bytes: r.u64("bytes")?,
                digest: r.u64("digest")?,
                first_mismatch: r.u64("first_mismatch")?,
            },
            MessageType::Stats => Message::Stats,
            MessageType::StatsReply => {
                let n = r.u16("stats")?;
                let pairs = (0..n)
                    .map(|_| Ok((r.str("stat name")?, r.u64("stat value")?)))
                    .collect::<Result<_, MessageError>>()?;
                Message::StatsReply(pairs)
            }
            MessageType::Events => Message::Events { since_seq: r.u64("since_seq")? },
            MessageType::EventsReply => {
                let first_seq = r.u64("first_seq")?;
                let next_seq = r.u64("next_seq")?;
                let n = r.u16("records")?;
                let records = (0..n)
                    .map(|_| {
                        Ok(EventRecord {
                            seq: r.u64("seq")?,
                            time_ns: r.u64("time_ns")?,
                            from: r.enum_u8("from", StateCode::from_u8)?,
                            to: r.enum_u8("to", StateCode::from_u8)?,
                            session: r.u32("session")?,
                            wakeups: r.u64("wakeups")?,
                            cpu_ns: r.u64("cpu_ns")?,
                            cause: r.str("cause")?,
                        })
                    })
                    .collect::<Result<_, MessageError>>()?;
                Message::EventsReply { first_seq, next_seq, records }
            }
            MessageType::GuestOp => {
                let op_id = r.u32("op_id")?;
                let op = match r.u8("op")? {
                    1 => GuestOp::Open { port: r.str("port")?, nonblock: r.bool("nonblock")?, sigio: r.bool("sigio")? },
                    2 => GuestOp::Read { handle: r.u32("handle")?, bytes: r.u64("bytes")?, all: r.bool("all")? },
                    3 => GuestOp::Write { handle: r.u32("handle")?, seed: r.u64("seed")?, bytes: r.u64("bytes")? },
                    4 => GuestOp::Poll {
                        handle: r.u32("handle")?,
                        events: r.u16("events")?,
                        timeout_ms: r.u32("timeout_ms")? as i32,
                    },
                    5 => GuestOp::Close { handle: r.u32("handle")? },
                    6 => GuestOp::Cancel { handle: r.u32("handle")? },
                    7 => GuestOp::Debugfs { port: r.str("port")? },
                    8 => GuestOp::Sysfs,
                    9 => GuestOp::SigioCount { handle: r.u32("handle")? },
                    v => return Err(MessageError::InvalidValue { kind, field: "op", value: v.into() }),
                };
                Message::GuestOp { op_id, op }
            }
            MessageType::GuestOpDone => Message::GuestOpDone(GuestOpDone {
                op_id: r.u32("op_id")?,
                ret: r.u64("ret")? as i64,
                errno: r.u32("errno")? as i32,
                mask: r.u16("mask")?,
                bytes: r.u64("bytes")?,
                digest: r.u64("digest")?,
                elapsed_ns: r.u64("elapsed_ns")?,
                data: r.rest(),
            }),
            MessageType::Error => Message::Error {
                code: r.u16("code")?,
                about_kind: r.u8("about_kind")?,
                about_seq: r.u32("about_seq")?,
                text: r.str("text")?,
            },
        };
        r.finish()?;
        Ok(msg)
    }
}

struct Writer {
    out: Vec<u8>,
    kind: MessageType,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn count(&mut self, field: &'static str, len: usize) -> Result<(), MessageError> {
        let n = u16::try_from(len).map_err(|_| MessageError::ListTooLong { kind: self.kind, field, len })?;
        self.u16(n);
        Ok(())
    }
    fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, field: &'static str, s: &str) -> Result<(), MessageError> {
        let len =
            u16::try_from(s.len()).map_err(|_| MessageError::StringTooLong { kind: self.kind, field, len: s.len() })?;
        self.u16(len);
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    kind: MessageType,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], MessageError> {
        if self.b.len() < n {
            return Err(MessageError::Truncated { kind: self.kind, field });
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, MessageError> {
        Ok(self.take(field, 1)?[0])
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, MessageError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(MessageError::InvalidValue { kind: self.kind, field, value: v.into() }),
        }
    }
    fn enum_u8<T>(&mut self, field: &'static str, from: fn(u8) -> Option<T>) -> Result<T, MessageError> {
        let v = self.u8(field)?;
        from(v).ok_or(MessageError::InvalidValue { kind: self.kind, field, value: v.into() })
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, MessageError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, MessageError> {
        let b = self.take(field, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, MessageError> {
        let b = self.take(field, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self, field: &'static str) -> Result<String, MessageError> {
        let len = self.u16(field)? as usize;
        let b = self.take(field, len)?;
        String::from_utf8(b.to_vec()).map_err(|_| MessageError::InvalidUtf8 { kind: self.kind, field })
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.b).to_vec()
    }
    fn finish(self) -> Result<(), MessageError> {
        match self.b.len() {
            0 => Ok(()),
            extra => Err(MessageError::TrailingBytes { kind: self.kind, extra }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                agent_version: "0.1.0".into(),
                port_name: "org.vport.0".into(),
                kernel_release: "6.1.0-28-amd64".into(),
                boot_id: "0f6c7c6e-7a5b-4c55-9d1e-2f0a6f0a7a11".into(),
                nonce: 0xDEAD_BEEF_0BAD_F00D,
                agent_time_ns: 12_345,
            }),
            Message::HelloAck { nonce: 42, host_version: "vport 0.1.0".into() },
            Message::HelloRequest,
            Message::Ping { time_ns: 1 },
            Message::Pong { ping_time_ns: 1, time_ns: 2 },
            Message::Echo(b"abc".to_vec()),
            Message::EchoReply(vec![]),
            Message::Bye { reopen_after_ms: NO_REOPEN, reason: "shutdown".into() },
            Message::Close { reopen_after_ms: 500 },
            Message::Reopen,
            Message::Probe { kind: ProbeKind::Open, target: ProbeTarget::SecondFd, arg: 0 },
            Message::ProbeResult {
                kind: ProbeKind::Read,
                target: ProbeTarget::OwnFd,
                ret: -1,
                errno: 11,
                mask: 0x19,
                data: vec![1, 2],
            },
            Message::Sigio { action: SigioAction::Enable },
            Message::SigioReport {
                enabled: true,
                count: 2,
                samples: vec![SigioSample { time_ns: 1, mask: 4 }, SigioSample { time_ns: 2, mask: 0x11 }],
            },
            Message::Source { seed: 7, bytes: 1 << 20, chunk: 4096 },
            Message::SourceDone { bytes: 1 << 20, digest: 0xABCD },
            Message::Data { offset: 4096, bytes: vec![9; 10] },
            Message::Sink { seed: 7, bytes: 10 },
            Message::SinkResult { bytes: 10, digest: 1, first_mismatch: NO_MISMATCH },
            Message::Stats,
            Message::StatsReply(vec![("wakeups".into(), 3), ("ebusy".into(), 0)]),
            Message::Events { since_seq: 0 },
            Message::EventsReply {
                first_seq: 0,
                next_seq: 1,
                records: vec![EventRecord {
                    seq: 0,
                    time_ns: 5,
                    from: StateCode::Disconnected,
                    to: StateCode::Connected,
                    session: 0x1234,
                    wakeups: 2,
                    cpu_ns: 1_000,
                    cause: "poll: POLLHUP clear".into(),
                }],
            },
            Message::GuestOp { op_id: 1, op: GuestOp::Open { port: "other.x".into(), nonblock: true, sigio: false } },
            Message::GuestOpDone(GuestOpDone {
                op_id: 1,
                ret: -1,
                errno: 11,
                mask: 0x4,
                bytes: 10,
                digest: 7,
                elapsed_ns: 99,
                data: b"x".to_vec(),
            }),
            Message::Error { code: error_code::MALFORMED, about_kind: 0x12, about_seq: 7, text: "bad".into() },
        ]
    }

    #[test]
    fn every_guest_op_round_trips() {
        let ops = [
            GuestOp::Open { port: "/dev/vport0p3".into(), nonblock: false, sigio: true },
            GuestOp::Read { handle: 2, bytes: 64 << 20, all: true },
            GuestOp::Write { handle: 2, seed: 9, bytes: 10 },
            GuestOp::Poll { handle: 2, events: 0x5, timeout_ms: -1 },
            GuestOp::Close { handle: 2 },
            GuestOp::Cancel { handle: 2 },
            GuestOp::Debugfs { port: "vport0p1".into() },
            GuestOp::Sysfs,
            GuestOp::SigioCount { handle: 3 },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            assert_eq!(op.code() as usize, i + 1);
            let m = Message::GuestOp { op_id: i as u32, op };
            assert_eq!(Message::from_frame(&m.to_frame(1, 1).unwrap()).unwrap(), m);
        }
        let f = Frame::new(MessageType::GuestOp as u8, 0, 0, vec![0, 0, 0, 0, 42]);
        assert!(matches!(Message::from_frame(&f), Err(MessageError::InvalidValue { field: "op", value: 42, .. })));
    }

    #[test]
    fn every_type_round_trips() {
        let msgs = samples();
        assert_eq!(msgs.len(), MessageType::ALL.len(), "a sample for every type");
        for m in msgs {
            let f = m.to_frame(3, 4).unwrap();
            assert_eq!(f.header.kind, m.kind() as u8);
            assert_eq!(Message::from_frame(&f).unwrap(), m);
        }
    }

    #[test]
    fn type_bytes_are_stable() {
        // These values are the wire format: changing one breaks every deployed agent.
        let bytes: Vec<u8> = MessageType::ALL.iter().map(|t| *t as u8).collect();
        assert_eq!(
            bytes,
            vec![
                0x01, 0x02, 0x03, 0x04, 0x10, 0x11, 0x12, 0x13, 0x20, 0x22, 0x24, 0x25, 0x26, 0x27, 0x30, 0x31, 0x32,
                0x34, 0x35, 0x40, 0x41, 0x42, 0x43, 0x50, 0x51, 0x7F
            ]
        );
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        let f = Frame::new(MessageType::Ping as u8, 0, 0, vec![1, 2, 3]);
        assert_eq!(Message::from_frame(&f), Err(MessageError::Truncated { kind: MessageType::Ping, field: "time_ns" }));
        let f = Frame::new(MessageType::Ping as u8, 0, 0, vec![0; 9]);
        assert_eq!(Message::from_frame(&f), Err(MessageError::TrailingBytes { kind: MessageType::Ping, extra: 1 }));
        let f = Frame::new(0x55, 0, 0, vec![]);
        assert_eq!(Message::from_frame(&f), Err(MessageError::UnknownType(0x55)));
        let f = Frame::new(MessageType::Error as u8, 0, 0, vec![1, 0, 0x12, 7, 0, 0, 0, 2, 0, 0xFF, 0xFE]);
        assert_eq!(Message::from_frame(&f), Err(MessageError::InvalidUtf8 { kind: MessageType::Error, field: "text" }));
        let f = Frame::new(MessageType::Probe as u8, 0, 0, vec![9, 0, 0, 0, 0, 0]);
        assert_eq!(
            Message::from_frame(&f),
            Err(MessageError::InvalidValue { kind: MessageType::Probe, field: "kind", value: 9 })
        );
        let f = Frame::new(MessageType::SigioReport as u8, 0, 0, vec![2]);
        assert!(matches!(Message::from_frame(&f), Err(MessageError::InvalidValue { field: "enabled", .. })));
        let f = Frame::new(MessageType::StatsReply as u8, 0, 0, vec![5, 0]);
        assert!(matches!(Message::from_frame(&f), Err(MessageError::Truncated { field: "stat name", .. })));
        let long = Message::error_unsolicited(1, "x".repeat(70_000));
        assert!(matches!(long.encode_payload(), Err(MessageError::StringTooLong { len: 70_000, .. })));
    }

    proptest! {
        #[test]
        fn any_payload_parses_or_errors_without_panicking_and_valid_ones_round_trip(
            kind in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..64)
        ) {
            let f = Frame::new(kind, 0, 0, payload.clone());
            if let Ok(m) = Message::from_frame(&f) {
                // Whatever parses must re-encode to the same bytes: the codec is canonical.
                prop_assert_eq!(m.encode_payload().unwrap(), payload);
            }
        }
    }
}
