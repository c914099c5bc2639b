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
    /// Either way: round-trip probe.
    Ping = 0x10,
    /// Answer to [`MessageType::Ping`].
    Pong = 0x11,
    /// Host -> agent: send these bytes back.
    Echo = 0x12,
    /// Agent -> host: the bytes of an [`MessageType::Echo`].
    EchoReply = 0x13,
    /// Either way: a request could not be served.
    Error = 0x7F,
}

impl MessageType {
    /// Every type this crate knows, for exhaustive tests and documentation.
    pub const ALL: [MessageType; 8] = [
        MessageType::Hello,
        MessageType::HelloAck,
        MessageType::HelloRequest,
        MessageType::Ping,
        MessageType::Pong,
        MessageType::Echo,
        MessageType::EchoReply,
        MessageType::Error,
    ];

    /// The type for a frame's type byte, if known.
    pub fn from_u8(b: u8) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| *t as u8 == b)
    }
}

/// Error codes carried by [`Message::Error`].
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
    /// A request could not be served.
    Error {
        /// One of [`error_code`].
        code: u16,
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
            Message::Error { code, text } => {
                w.u16(*code);
                w.str("text", text)?;
            }
        }
        Ok(w.out)
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
            MessageType::Error => Message::Error { code: r.u16("code")?, text: r.str("text")? },
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
            Message::Error { code: error_code::MALFORMED, text: "bad".into() },
        ]
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
        assert_eq!(bytes, vec![0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x13, 0x7F]);
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        let f = Frame::new(MessageType::Ping as u8, 0, 0, vec![1, 2, 3]);
        assert_eq!(Message::from_frame(&f), Err(MessageError::Truncated { kind: MessageType::Ping, field: "time_ns" }));
        let f = Frame::new(MessageType::Ping as u8, 0, 0, vec![0; 9]);
        assert_eq!(Message::from_frame(&f), Err(MessageError::TrailingBytes { kind: MessageType::Ping, extra: 1 }));
        let f = Frame::new(0x55, 0, 0, vec![]);
        assert_eq!(Message::from_frame(&f), Err(MessageError::UnknownType(0x55)));
        let f = Frame::new(MessageType::Error as u8, 0, 0, vec![1, 0, 2, 0, 0xFF, 0xFE]);
        assert_eq!(Message::from_frame(&f), Err(MessageError::InvalidUtf8 { kind: MessageType::Error, field: "text" }));
        let long = Message::Error { code: 1, text: "x".repeat(70_000) };
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
