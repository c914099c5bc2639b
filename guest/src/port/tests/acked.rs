//! Acknowledged streams (`acked.rs`): refusals, a to-guest stream stored, acknowledged,
//! resumed from its part file and completed; a to-host stream sent within its window and
//! resumed from the host's offset.

use super::*;
use crate::settings::DEFAULT_MAX_STREAM_BYTES;
use vport_common::message::StreamDirection;
use vport_common::stream::ACK_EVERY;

fn port_in(dir: &std::path::Path) -> Port<Fake> {
    port_with(Settings { stream_dir: Some(dir.to_owned()), ..Settings::default() })
}

fn open(id: u64, direction: StreamDirection, name: &str, total: u64, offset: u64) -> Message {
    Message::StreamOpen { id, direction, name: name.into(), seed: 9, total, offset, window: 0 }
}

/// Feeds one request and services the port until it has no more work (the write budget cuts
/// a turn in the middle of a frame); returns what it sent.
fn request_all(p: &mut Port<Fake>, e: &mut TestEnv, msg: &Message, session: u32) -> Vec<(Header, Message)> {
    feed(p, &wire(msg, session, 1));
    service_until_idle(p, e);
    take_sent(p)
}

#[test]
fn streams_are_refused_without_a_stream_directory_and_for_bad_names() {
    let (mut p, mut e) = (port(), env());
    let s = ready(&mut p, &mut e);
    let sent = request(&mut p, &mut e, &open(1, StreamDirection::ToGuest, "f", 10, 0), s);
    expect_error(&sent, error_code::DENIED);
    assert!(matches!(&sent[0].1, Message::Error { text, .. } if text.contains("--stream-dir")));

    let dir = tempfile::tempdir().unwrap();
    let (mut p, mut e) = (port_in(dir.path()), env());
    let s = ready(&mut p, &mut e);
    for bad in ["../x", "", ".hidden", "a/b"] {
        expect_error(&request(&mut p, &mut e, &open(1, StreamDirection::ToGuest, bad, 10, 0), s), error_code::DENIED);
    }
    expect_error(&request(&mut p, &mut e, &open(1, StreamDirection::ToHost, "missing", 0, 0), s), error_code::INTERNAL);
    let too_long = open(1, StreamDirection::ToGuest, "f", DEFAULT_MAX_STREAM_BYTES + 1, 0);
    expect_error(&request(&mut p, &mut e, &too_long, s), error_code::LIMIT);
    let data = Message::StreamData { id: 1, offset: 0, bytes: vec![1] };
    expect_error(&request(&mut p, &mut e, &data, s), error_code::BAD_STATE);
    expect_error(&request(&mut p, &mut e, &Message::StreamAck { id: 1, offset: 0 }, s), error_code::BAD_STATE);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing was created");
}

#[test]
fn a_to_guest_stream_is_stored_acknowledged_resumed_and_completed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, mut e) = (port_in(dir.path()), env());
    let s = ready(&mut p, &mut e);
    let total = 3 * ACK_EVERY + 100;
    let mut stream = vec![0u8; total as usize];
    pattern::fill(5, 0, &mut stream);
    let sent = request(&mut p, &mut e, &open(0xAB, StreamDirection::ToGuest, "f", total, 0), s);
    assert_eq!(sent[0].1, Message::StreamAccept { id: 0xAB, offset: 0, total, window: 512 * 1024 });
    // A second to-guest stream with another id is refused while this one is open.
    expect_error(&request(&mut p, &mut e, &open(0xAC, StreamDirection::ToGuest, "g", 1, 0), s), error_code::BAD_STATE);

    let first = (ACK_EVERY + 10) as usize;
    let sent =
        request(&mut p, &mut e, &Message::StreamData { id: 0xAB, offset: 0, bytes: stream[..first].to_vec() }, s);
    assert_eq!(sent, vec![(sent[0].0, Message::StreamAck { id: 0xAB, offset: first as u64 })]);
    // A gap is refused and stores nothing.
    let gap = Message::StreamData { id: 0xAB, offset: first as u64 + 1, bytes: vec![0] };
    expect_error(&request(&mut p, &mut e, &gap, s), error_code::BAD_STATE);

    // The session ends; the part file holds the offset; a new session resumes there.
    p.io.mask = NO_HOST;
    p.service(&mut e).unwrap();
    let s = ready(&mut p, &mut e);
    let sent = request(&mut p, &mut e, &open(0xAB, StreamDirection::ToGuest, "f", total, 0), s);
    assert!(matches!(sent[0].1, Message::StreamAccept { offset, .. } if offset == first as u64));
    // The sender, not trusting that, sends again from 0: the repeated bytes are dropped.
    let sent = request(&mut p, &mut e, &Message::StreamData { id: 0xAB, offset: 0, bytes: stream.clone() }, s);
    assert_eq!(sent.last().unwrap().1, Message::StreamAck { id: 0xAB, offset: total });
    let digest = pattern::pattern_digest(5, total);
    let sent = request(&mut p, &mut e, &Message::StreamEnd { id: 0xAB, total, digest }, s);
    assert_eq!(sent[0].1, Message::StreamDone { id: 0xAB, bytes: total, digest, ok: true });
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), stream, "stored exactly once, in order");

    // A sender that missed STREAM_DONE opens again: the stream is complete, judged from the file.
    let sent = request(&mut p, &mut e, &open(0xAB, StreamDirection::ToGuest, "f", total, 0), s);
    assert!(matches!(sent[0].1, Message::StreamAccept { offset, .. } if offset == total));
    let sent = request(&mut p, &mut e, &Message::StreamEnd { id: 0xAB, total, digest }, s);
    assert_eq!(sent[0].1, Message::StreamDone { id: 0xAB, bytes: total, digest, ok: true });
}

#[test]
fn a_to_guest_stream_with_a_wrong_digest_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, mut e) = (port_in(dir.path()), env());
    let s = ready(&mut p, &mut e);
    request(&mut p, &mut e, &open(1, StreamDirection::ToGuest, "f", 3, 0), s);
    request(&mut p, &mut e, &Message::StreamData { id: 1, offset: 0, bytes: b"abc".to_vec() }, s);
    let sent = request(&mut p, &mut e, &Message::StreamEnd { id: 1, total: 3, digest: 1 }, s);
    assert!(matches!(sent[0].1, Message::StreamDone { ok: false, bytes: 3, .. }));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the part file is removed");
}

#[test]
fn a_to_host_stream_keeps_its_window_and_resumes_from_the_hosts_offset() {
    let dir = tempfile::tempdir().unwrap();
    let total = 300_000u64;
    let mut file = vec![0u8; total as usize];
    pattern::fill(3, 0, &mut file);
    std::fs::write(dir.path().join("src.bin"), &file).unwrap();
    let (mut p, mut e) = (port_in(dir.path()), env());
    let s = ready(&mut p, &mut e);
    let req = Message::StreamOpen {
        id: 7,
        direction: StreamDirection::ToHost,
        name: "src.bin".into(),
        seed: 0,
        total: 0,
        offset: 0,
        window: 100_000,
    };
    let sent = request_all(&mut p, &mut e, &req, s);
    assert_eq!(sent[0].1, Message::StreamAccept { id: 7, offset: 0, total, window: 100_000 });
    let in_flight: u64 = sent[1..]
        .iter()
        .map(|(_, m)| match m {
            Message::StreamData { offset, bytes, .. } => {
                assert_eq!(&file[*offset as usize..*offset as usize + bytes.len()], &bytes[..]);
                bytes.len() as u64
            }
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(in_flight, 100_000, "exactly one window in flight");
    // The host acknowledges part, then the session ends; it resumes from its own offset.
    let sent = request_all(&mut p, &mut e, &Message::StreamAck { id: 7, offset: 50_000 }, s);
    assert!(sent.iter().all(|(_, m)| matches!(m, Message::StreamData { .. })));
    p.io.mask = NO_HOST;
    p.service(&mut e).unwrap();
    let s = ready(&mut p, &mut e);
    let resume = Message::StreamOpen {
        id: 7,
        direction: StreamDirection::ToHost,
        name: "src.bin".into(),
        seed: 0,
        total: 0,
        offset: 40_000,
        window: 0,
    };
    let sent = request_all(&mut p, &mut e, &resume, s);
    assert!(matches!(sent[1].1, Message::StreamData { offset: 40_000, .. }), "{:?}", sent[1]);
    // Acknowledge what arrives until STREAM_END comes with the file's digest; DONE closes it.
    let sent_up_to = |msgs: &[(Header, Message)], upto: &mut u64, end: &mut Option<(u64, u64)>| {
        for (_, m) in msgs {
            match m {
                Message::StreamData { offset, bytes, .. } => *upto = (*upto).max(offset + bytes.len() as u64),
                Message::StreamEnd { total, digest, .. } => *end = Some((*total, *digest)),
                other => panic!("{other:?}"),
            }
        }
    };
    let (mut upto, mut end) = (0, None);
    sent_up_to(&sent[1..], &mut upto, &mut end);
    for _ in 0..50 {
        if end.is_some() {
            break;
        }
        let msgs = request_all(&mut p, &mut e, &Message::StreamAck { id: 7, offset: upto }, s);
        sent_up_to(&msgs, &mut upto, &mut end);
    }
    let mut whole = StreamDigest::new();
    whole.update(&file);
    assert_eq!(end, Some((total, whole.digest())));
    assert!(request_all(
        &mut p,
        &mut e,
        &Message::StreamDone { id: 7, bytes: total, digest: whole.digest(), ok: true },
        s
    )
    .is_empty());
    expect_error(&request_all(&mut p, &mut e, &Message::StreamAck { id: 7, offset: 1 }, s), error_code::BAD_STATE);
}

#[test]
fn the_digest_of_a_to_host_stream_counts_each_byte_once_and_gives_up_at_a_gap() {
    let mut data = vec![0u8; 100];
    pattern::fill(5, 0, &mut data);
    let mut out = crate::port::Outgoing {
        session: 1,
        sender: vport_common::stream::Sender::new(1, 100, 0),
        source: crate::port::OutSource::Pattern { seed: 5 },
        end_sent: false,
        sent_digest: Some(StreamDigest::new()),
        digested: 0,
    };
    out.digest_sent(0, &data[..40]);
    out.digest_sent(20, &data[20..40]); // resent: nothing new
    out.digest_sent(30, &data[30..70]); // straddles: 40..70 is new
    out.digest_sent(70, &data[70..]);
    let mut whole = StreamDigest::new();
    whole.update(&data);
    assert_eq!((out.digested, out.sent_digest.as_ref().map(StreamDigest::digest)), (100, Some(whole.digest())));
    let mut gap = crate::port::Outgoing { sent_digest: Some(StreamDigest::new()), digested: 0, ..out };
    gap.digest_sent(10, &data[10..20]);
    assert!(gap.sent_digest.is_none(), "a stream resumed past its start is digested again at its end");
}
