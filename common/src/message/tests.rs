//! The message codec's tests: every type round-trips, the bytes are protocol v1's to the
//! byte, malformed payloads are typed errors, and `docs/protocol.md` agrees with the table.

use super::*;
use crate::phase::Phase;
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
                from: Phase::Disconnected,
                to: Phase::Connected,
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
        Message::StreamOpen {
            id: 0x5EED,
            direction: StreamDirection::ToGuest,
            name: "disk.img".into(),
            seed: 0,
            total: 1 << 30,
            offset: 0,
            window: 512 * 1024,
        },
        Message::StreamAccept { id: 0x5EED, offset: 4096, total: 1 << 30, window: 512 * 1024 },
        Message::StreamData { id: 0x5EED, offset: 4096, bytes: vec![1, 2, 3] },
        Message::StreamAck { id: 0x5EED, offset: 4099 },
        Message::StreamEnd { id: 0x5EED, total: 1 << 30, digest: 0xD1 },
        Message::StreamDone { id: 0x5EED, bytes: 1 << 30, digest: 0xD1, ok: true },
        Message::Error { code: error_code::MALFORMED, about_kind: 0x12, about_seq: 7, text: "bad".into() },
    ]
}

fn guest_ops() -> [GuestOp; 12] {
    [
        GuestOp::Open { port: "/dev/vport0p3".into(), nonblock: false, sigio: true },
        GuestOp::Read { handle: 2, bytes: 64 << 20, all: true },
        GuestOp::Write { handle: 2, seed: 9, bytes: 10 },
        GuestOp::Poll { handle: 2, events: 0x5, timeout_ms: -1 },
        GuestOp::Close { handle: 2 },
        GuestOp::Cancel { handle: 2 },
        GuestOp::Debugfs { port: "vport0p1".into() },
        GuestOp::Sysfs,
        GuestOp::SigioCount { handle: 3 },
        GuestOp::Loopback { handle: 3, bytes: 640 },
        GuestOp::WriteEach { handle: 3, seed: 9, bytes: 1000, each: 64 },
        GuestOp::VsockAccept { port: 5000, timeout_ms: 30_000 },
    ]
}

#[test]
fn every_guest_op_round_trips() {
    let ops = guest_ops();
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
fn encoding_in_place_gives_the_frame_to_the_byte() {
    let mut out = b"before".to_vec();
    let mut expected = out.clone();
    for (seq, m) in samples().into_iter().enumerate() {
        m.encode_into(7, seq as u32, &mut out).unwrap();
        expected.extend(m.to_frame(7, seq as u32).unwrap().encode().unwrap());
        assert_eq!(out, expected, "{m:?}");
    }
    let huge = Message::Data { offset: 0, bytes: vec![0; crate::frame::MAX_PAYLOAD as usize] };
    assert!(matches!(huge.encode_into(7, 0, &mut out), Err(MessageError::Frame(_))));
    assert_eq!(out, expected, "a refused message leaves nothing behind");
}

#[test]
fn a_large_message_is_encoded_without_growing_its_buffer_twice() {
    let mut out = Vec::new();
    Message::EchoReply(vec![5; 1 << 20]).encode_into(1, 1, &mut out).unwrap();
    assert!(out.capacity() < out.len() + 4096, "capacity {} for {} bytes", out.capacity(), out.len());
}

#[test]
fn type_bytes_are_stable() {
    // These values are the wire format: changing one breaks every deployed agent.
    let bytes: Vec<u8> = MessageType::ALL.iter().map(|t| *t as u8).collect();
    assert_eq!(
        bytes,
        vec![
            0x01, 0x02, 0x03, 0x04, 0x10, 0x11, 0x12, 0x13, 0x20, 0x22, 0x24, 0x25, 0x26, 0x27, 0x30, 0x31, 0x32, 0x34,
            0x35, 0x40, 0x41, 0x42, 0x43, 0x50, 0x51, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x7F
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

/// The payloads of [`samples`] as the hand-written codec of protocol v1 encoded them, byte for
/// byte: the generated codec must not move a byte.
#[rustfmt::skip]
const GOLDEN_PAYLOADS: [(MessageType, &str); 32] = [
    (
        MessageType::Hello,
        concat!(
            "0500302e312e300b006f72672e76706f72742e300e00362e312e302d32382d616d643634240030663663376336652d37",
            "6135622d346335352d396431652d3266306136663061376131310df0ad0befbeadde3930000000000000",
        ),
    ),
    (MessageType::HelloAck, "2a000000000000000b0076706f727420302e312e30"),
    (MessageType::HelloRequest, ""),
    (MessageType::Ping, "0100000000000000"),
    (MessageType::Pong, "01000000000000000200000000000000"),
    (MessageType::Echo, "616263"),
    (MessageType::EchoReply, ""),
    (MessageType::Bye, "ffffffff080073687574646f776e"),
    (MessageType::Close, "f4010000"),
    (MessageType::Reopen, ""),
    (MessageType::Probe, "010100000000"),
    (MessageType::ProbeResult, "0300ffffffffffffffff0b00000019000102"),
    (MessageType::Sigio, "01"),
    (MessageType::SigioReport, "01020000000000000002000100000000000000040002000000000000001100"),
    (MessageType::Source, "0700000000000000000010000000000000100000"),
    (MessageType::SourceDone, "0000100000000000cdab000000000000"),
    (MessageType::Data, "001000000000000009090909090909090909"),
    (MessageType::Sink, "07000000000000000a00000000000000"),
    (MessageType::SinkResult, "0a000000000000000100000000000000ffffffffffffffff"),
    (MessageType::Stats, ""),
    (MessageType::StatsReply, "0200070077616b657570730300000000000000050065627573790000000000000000"),
    (MessageType::Events, "0000000000000000"),
    (
        MessageType::EventsReply,
        concat!(
            "000000000000000001000000000000000100000000000000000005000000000000000001341200000200000000000000",
            "e8030000000000001300706f6c6c3a20504f4c4c48555020636c656172",
        ),
    ),
    (MessageType::GuestOp, "010000000107006f746865722e780100"),
    (MessageType::GuestOpDone, "01000000ffffffffffffffff0b00000004000a000000000000000700000000000000630000000000000078"),
    (MessageType::StreamOpen, "ed5e0000000000000108006469736b2e696d6700000000000000000000004000000000000000000000000000000800"),
    (MessageType::StreamAccept, "ed5e0000000000000010000000000000000000400000000000000800"),
    (MessageType::StreamData, "ed5e0000000000000010000000000000010203"),
    (MessageType::StreamAck, "ed5e0000000000000310000000000000"),
    (MessageType::StreamEnd, "ed5e0000000000000000004000000000d100000000000000"),
    (MessageType::StreamDone, "ed5e0000000000000000004000000000d10000000000000001"),
    (MessageType::Error, "020012070000000300626164"),
];

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn payloads_are_protocol_v1_to_the_byte() {
    for (m, (kind, golden)) in samples().into_iter().zip(GOLDEN_PAYLOADS) {
        assert_eq!(m.kind(), kind);
        assert_eq!(hex(&m.encode_payload().unwrap()), golden, "{kind:?}");
    }
    let ops = [
        "00000000010d002f6465762f76706f72743070330001",
        "010000000202000000000000040000000001",
        "02000000030200000009000000000000000a00000000000000",
        "0300000004020000000500ffffffff",
        "040000000502000000",
        "050000000602000000",
        "0600000007080076706f7274307031",
        "0700000008",
        "080000000903000000",
        "090000000a030000008002000000000000",
        "0a0000000b030000000900000000000000e80300000000000040000000",
        "0b0000000c8813000030750000",
    ];
    assert_eq!(ops.len(), guest_ops().len(), "a golden payload for every guest op");
    for (i, (op, golden)) in guest_ops().into_iter().zip(ops).enumerate() {
        let m = Message::GuestOp { op_id: i as u32, op };
        assert_eq!(hex(&m.encode_payload().unwrap()), golden, "{m:?}");
    }
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

    #[test]
    fn any_vsock_accept_round_trips_and_decodes_from_its_layout(
        op_id in any::<u32>(), port in any::<u32>(), timeout_ms in any::<u32>()
    ) {
        let m = Message::GuestOp { op_id, op: GuestOp::VsockAccept { port, timeout_ms } };
        let payload = m.encode_payload().unwrap();
        // op_id, the op byte 12, port, timeout_ms: all little-endian.
        let mut layout = op_id.to_le_bytes().to_vec();
        layout.push(12);
        layout.extend(port.to_le_bytes());
        layout.extend(timeout_ms.to_le_bytes());
        prop_assert_eq!(&payload, &layout);
        prop_assert_eq!(Message::from_frame(&m.to_frame(1, 2).unwrap()).unwrap(), m);
        // Cut short anywhere, it is an error, never a panic or another op.
        for cut in 0..payload.len() {
            prop_assert!(Message::from_frame(&Frame::new(MessageType::GuestOp as u8, 0, 0, payload[..cut].to_vec())).is_err());
        }
    }
}

/// `HelloAck` -> `HELLO_ACK`, as `docs/protocol.md` names the types.
fn doc_name(t: MessageType) -> String {
    let mut out = String::new();
    for (i, c) in format!("{t:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[test]
fn the_protocol_document_lists_exactly_the_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    let doc = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let start = doc.find("| type | name | direction | payload |").expect("the table of messages");
    let rows: Vec<(u8, String, SentBy)> = doc[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let byte = u8::from_str_radix(cells[1].trim_start_matches("0x"), 16).unwrap_or_else(|e| panic!("{l}: {e}"));
            let sent_by = match cells[3] {
                "host -> agent" => SentBy::Host,
                "agent -> host" => SentBy::Agent,
                "either" => SentBy::Either,
                other => panic!("{l}: direction {other:?}"),
            };
            (byte, cells[2].to_string(), sent_by)
        })
        .collect();
    let table: Vec<(u8, String, SentBy)> =
        MessageType::ALL.iter().map(|t| (*t as u8, doc_name(*t), t.sent_by())).collect();
    assert_eq!(rows, table, "docs/protocol.md's table of messages and message/table.rs differ");
}

#[test]
fn replies_go_the_other_way_and_from_u8_is_total() {
    use MessageType as T;
    for (request, reply) in [
        (T::HelloRequest, T::Hello),
        (T::Echo, T::EchoReply),
        (T::Probe, T::ProbeResult),
        (T::Sigio, T::SigioReport),
        (T::Source, T::SourceDone),
        (T::Sink, T::SinkResult),
        (T::Stats, T::StatsReply),
        (T::Events, T::EventsReply),
        (T::GuestOp, T::GuestOpDone),
    ] {
        assert_eq!((request.sent_by(), reply.sent_by()), (SentBy::Host, SentBy::Agent), "{request:?}");
    }
    for b in 0..=u8::MAX {
        match MessageType::from_u8(b) {
            Some(t) => assert_eq!(t as u8, b),
            None => assert!(MessageType::ALL.iter().all(|t| *t as u8 != b), "{b:#04x}"),
        }
    }
}
