//! The message table: every message type once, with its type byte, who sends it and its
//! payload fields in wire order. [`MessageType`], [`Message`], [`MessageType::ALL`],
//! [`MessageType::from_u8`], [`MessageType::sent_by`], [`Message::kind`] and the payload
//! encoder and decoder are generated from it, so a new message is one entry here (and a row in
//! `docs/protocol.md`, which a test holds against this table).
//!
//! An entry is `Name = byte, sender` followed by the payload: nothing (a unit message),
//! `(field: Type)` (one unnamed field, named in errors as `field`) or `{ field: Type, ... }`.
//! A `Vec<u8>` field marked `as rest` takes the rest of the payload.

use super::codec::{Reader, Writer};
use super::{
    EventRecord, GuestOp, GuestOpDone, Hello, MessageError, ProbeKind, ProbeTarget, SigioAction, SigioSample,
    StreamDirection,
};

/// Who sends a message type (`docs/protocol.md`, "Messages", column "direction").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SentBy {
    /// Only the host sends it (a request to the agent).
    Host,
    /// Only the agent sends it (a reply, or an announcement); the agent refuses it with ERROR
    /// `wrong_direction`.
    Agent,
    /// Either side.
    Either,
}

macro_rules! message_table {
    ($(
        $(#[$doc:meta])*
        $name:ident = $byte:literal, $sent_by:ident
        $( ( $tf:ident : $tt:ty $(as $tenc:ident)? ) )?
        $( {
            $( $(#[$fdoc:meta])* $f:ident : $ft:ty $(as $fenc:ident)? ),* $(,)?
        } )?
        ;
    )*) => {
        /// Message type byte values. Gaps are reserved for later messages.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum MessageType {
            $( $(#[$doc])* $name = $byte, )*
        }

        /// How many message types there are.
        const COUNT: usize = [$(stringify!($name)),*].len();

        impl MessageType {
            /// Every type this crate knows, in table order, for exhaustive tests and documentation.
            pub const ALL: [MessageType; COUNT] = [$(MessageType::$name),*];

            /// The type for a frame's type byte, if known.
            pub fn from_u8(b: u8) -> Option<MessageType> {
                match b {
                    $( $byte => Some(MessageType::$name), )*
                    _ => None,
                }
            }

            /// Who sends messages of this type.
            pub fn sent_by(self) -> SentBy {
                match self {
                    $( MessageType::$name => SentBy::$sent_by, )*
                }
            }
        }

        /// One protocol message.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Message {
            $(
                $(#[$doc])*
                $name $( ($tt) )? $( { $( $(#[$fdoc])* $f: $ft ),* } )?,
            )*
        }

        impl Message {
            /// The type byte of this message.
            pub fn kind(&self) -> MessageType {
                match self {
                    $( Message::$name { .. } => MessageType::$name, )*
                }
            }

            /// The payload bytes of this message.
            pub fn encode_payload(&self) -> Result<Vec<u8>, MessageError> {
                let mut writer = Writer::new(self.kind());
                self.write_payload(&mut writer)?;
                Ok(writer.finish())
            }

            /// Writes this message's fields in order.
            pub(super) fn write_payload(&self, w: &mut Writer) -> Result<(), MessageError> {
                match self {
                    $(
                        Message::$name $( ($tf) )? $( { $($f),* } )? => {
                            $( put!(w, stringify!($tf), $tf $(, $tenc)?); )?
                            $( $( put!(w, stringify!($f), $f $(, $fenc)?); )* )?
                        }
                    )*
                }
                Ok(())
            }

            /// Reads the payload of a message of type `kind`; the reader's end is checked by
            /// the caller.
            pub(super) fn decode_payload(r: &mut Reader<'_>) -> Result<Message, MessageError> {
                Ok(match r.kind() {
                    $(
                        MessageType::$name => Message::$name
                            $( ( get!(r, stringify!($tf) $(, $tenc)?) ) )?
                            $( { $( $f: get!(r, stringify!($f) $(, $fenc)?) ),* } )?,
                    )*
                })
            }
        }
    };
}

message_table! {
    /// Agent -> host: a session starts ([`Hello`]).
    Hello = 0x01, Agent (hello: Hello);
    /// Host -> agent: the session whose HELLO carried `nonce` is accepted; the port becomes
    /// READY.
    HelloAck = 0x02, Host {
        /// Echo of [`Hello::nonce`].
        nonce: u64,
        /// Host software version.
        host_version: String,
    };
    /// Host -> agent: start a new session now (the host connected and saw no HELLO; or, when
    /// READY, a fresh session). The agent answers with HELLO.
    HelloRequest = 0x03, Host;
    /// Agent -> host: the agent is about to close the port (command, or shutdown). Sent and
    /// flushed before the close, so the host learns of it in band.
    Bye = 0x04, Agent {
        /// When the agent will reopen the port, or [`super::NO_REOPEN`].
        reopen_after_ms: u32,
        /// Why (`close requested`, `reopen requested`, `shutdown`).
        reason: String,
    };
    /// Either way: round-trip probe; `time_ns` is the sender's monotonic clock.
    Ping = 0x10, Either {
        /// Sender's clock at send time.
        time_ns: u64,
    };
    /// Answer to [`MessageType::Ping`].
    Pong = 0x11, Either {
        /// The ping's `time_ns`, echoed.
        ping_time_ns: u64,
        /// The responder's monotonic clock when it answered.
        time_ns: u64,
    };
    /// Host -> agent: send these bytes back.
    Echo = 0x12, Host (bytes: Vec<u8> as rest);
    /// Agent -> host: the bytes of an [`MessageType::Echo`].
    EchoReply = 0x13, Agent (bytes: Vec<u8> as rest);
    /// Host -> agent: close the port and reopen it after `reopen_after_ms` (answered with BYE).
    Close = 0x20, Host {
        /// Delay before reopening.
        reopen_after_ms: u32,
    };
    /// Host -> agent: close the port and reopen it at once (answered with BYE).
    Reopen = 0x22, Host;
    /// Host -> agent: run one system call on the port and report its raw result.
    Probe = 0x24, Host {
        /// Which call.
        kind: ProbeKind,
        /// On which fd.
        target: ProbeTarget,
        /// Call argument (byte count for READ).
        arg: u32,
    };
    /// Agent -> host: the raw result of a [`MessageType::Probe`].
    ProbeResult = 0x25, Agent {
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
        data: Vec<u8> as rest,
    };
    /// Host -> agent: start, stop or query SIGIO observation on the port.
    Sigio = 0x26, Host {
        /// What to do.
        action: SigioAction,
    };
    /// Agent -> host: SIGIO observations since the last Enable.
    SigioReport = 0x27, Agent {
        /// Whether observation is on.
        enabled: bool,
        /// Signals received.
        count: u64,
        /// The first signals, with the poll mask seen at each (bounded by the agent).
        samples: Vec<SigioSample>,
    };
    /// Host -> agent: send `bytes` bytes of the pattern of `seed` in DATA frames of at most
    /// `chunk` bytes, then SOURCE_DONE.
    Source = 0x30, Host {
        /// Pattern seed.
        seed: u64,
        /// Stream length.
        bytes: u64,
        /// Largest DATA payload (after its 8-byte offset).
        chunk: u32,
    };
    /// Agent -> host: a [`MessageType::Source`] stream is complete.
    SourceDone = 0x31, Agent {
        /// Bytes sent.
        bytes: u64,
        /// xxh3-64 of the bytes sent.
        digest: u64,
    };
    /// Either way: a piece of a pattern stream starting at stream offset `offset`.
    Data = 0x32, Either {
        /// Offset of the first byte in the stream.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8> as rest,
    };
    /// Host -> agent: receive `bytes` bytes of the pattern of `seed` in DATA frames and verify
    /// them.
    Sink = 0x34, Host {
        /// Pattern seed.
        seed: u64,
        /// Stream length.
        bytes: u64,
    };
    /// Agent -> host: the verdict on a [`MessageType::Sink`] stream.
    SinkResult = 0x35, Agent {
        /// Bytes received.
        bytes: u64,
        /// xxh3-64 of the bytes received.
        digest: u64,
        /// Stream offset of the first byte that differed from the pattern, or
        /// [`super::NO_MISMATCH`].
        first_mismatch: u64,
    };
    /// Host -> agent: report counters.
    Stats = 0x40, Host;
    /// Agent -> host: counters as (name, value) pairs; names are stable, new ones may appear.
    StatsReply = 0x41, Agent (stats: Vec<(String, u64)>);
    /// Host -> agent: report the port's life-cycle records with `seq >= since_seq`.
    Events = 0x42, Host {
        /// First sequence number wanted.
        since_seq: u64,
    };
    /// Agent -> host: life-cycle records.
    EventsReply = 0x43, Agent {
        /// Oldest sequence number still in the agent's ring.
        first_seq: u64,
        /// The sequence number the next record will get.
        next_seq: u64,
        /// The records, oldest first.
        records: Vec<EventRecord>,
    };
    /// Host -> agent: a guest operation on a port the agent does not serve ([`GuestOp`]);
    /// answered with [`Message::GuestOpDone`] carrying `op_id`, or ERROR when the request
    /// itself is refused.
    GuestOp = 0x50, Host {
        /// Chosen by the host; echoed in the completion.
        op_id: u32,
        /// The operation.
        op: GuestOp,
    };
    /// Agent -> host: a [`MessageType::GuestOp`] completed ([`GuestOpDone`]).
    GuestOpDone = 0x51, Agent (done: GuestOpDone);
    /// Host -> agent: open acknowledged stream `id`, or resume it after a session ended
    /// (`docs/protocol.md`, "Acknowledged streams"). Answered with STREAM_ACCEPT, or ERROR.
    StreamOpen = 0x60, Host {
        /// Chosen by the host; names the stream across sessions, agent restarts and rewinds.
        id: u64,
        /// Which way the bytes go.
        direction: StreamDirection,
        /// A file name under the agent's stream directory: where a to-guest stream is stored,
        /// or the file a to-host stream sends. Empty for a to-host pattern stream.
        name: String,
        /// Pattern seed of a to-host pattern stream (ignored otherwise).
        seed: u64,
        /// Stream length: to-guest, and to-host pattern streams; 0 for a to-host file (its size).
        total: u64,
        /// To-host: the host's receive offset, where the agent starts sending; to-guest: 0.
        offset: u64,
        /// Most unacknowledged bytes the sender may have in flight.
        window: u32,
    };
    /// Agent -> host: stream `id` is open; the sender starts at `offset`.
    StreamAccept = 0x61, Agent {
        /// The stream.
        id: u64,
        /// Where the sender starts: the agent's receive offset (to-guest) or the host's (to-host).
        offset: u64,
        /// The stream's length.
        total: u64,
        /// The window both sides use: the host's, capped by the agent.
        window: u32,
    };
    /// Either way (the sender): bytes of stream `id` starting at stream offset `offset`.
    StreamData = 0x62, Either {
        /// The stream.
        id: u64,
        /// Offset of the first byte.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8> as rest,
    };
    /// Either way (the receiver): every byte of stream `id` before `offset` is stored.
    StreamAck = 0x63, Either {
        /// The stream.
        id: u64,
        /// Cumulative: the receiver's offset.
        offset: u64,
    };
    /// Either way (the sender, once every byte is acknowledged): the stream's length and digest.
    StreamEnd = 0x64, Either {
        /// The stream.
        id: u64,
        /// The stream's length.
        total: u64,
        /// xxh3-64 of the whole stream.
        digest: u64,
    };
    /// Either way (the receiver): the verdict on the whole stored stream.
    StreamDone = 0x65, Either {
        /// The stream.
        id: u64,
        /// Bytes stored.
        bytes: u64,
        /// xxh3-64 of the bytes stored.
        digest: u64,
        /// True when `bytes` and `digest` match the STREAM_END.
        ok: bool,
    };
    /// Either way: a request could not be served, or (`about_kind` 0) bytes did not decode.
    Error = 0x7F, Either {
        /// One of [`super::error_code`].
        code: u16,
        /// Type byte of the frame this answers; 0 when it answers no frame (decode errors).
        about_kind: u8,
        /// Sequence number of the frame this answers (0 when `about_kind` is 0), so a host
        /// with several requests outstanding knows which one failed.
        about_seq: u32,
        /// Human-readable detail.
        text: String,
    };
}
