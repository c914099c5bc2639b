//! The decoder's tests.

use super::*;
use crate::frame::MAX_PAYLOAD;
use proptest::prelude::*;

fn frame(kind: u8, seq: u32, payload: &[u8]) -> Frame {
    Frame::new(kind, 9, seq, payload.to_vec())
}

fn decode_all(d: &mut Decoder) -> (Vec<Frame>, Vec<DecodeError>) {
    let (mut ok, mut err) = (vec![], vec![]);
    for r in d.by_ref() {
        match r {
            Ok(f) => ok.push(f),
            Err(e) => err.push(e),
        }
    }
    (ok, err)
}

#[test]
fn one_byte_at_a_time() {
    let frames = vec![frame(1, 1, b"hello"), frame(2, 2, b""), frame(3, 3, &[0xF5; 100])];
    let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
    let mut d = Decoder::default();
    let mut out = vec![];
    for b in &wire {
        d.push(std::slice::from_ref(b));
        while let Some(r) = d.next_frame() {
            out.push(r.unwrap());
        }
    }
    assert_eq!(out, frames);
    assert_eq!(d.buffered(), 0);
    assert_eq!(d.stats().skipped_bytes, 0);
}

#[test]
fn bad_frame_crc_is_reported_and_the_next_frame_found() {
    let mut a = frame(1, 1, b"payload").encode().unwrap();
    a[26] ^= 0x01; // damage the payload
    let b = frame(2, 2, b"next").encode().unwrap();
    let mut d = Decoder::default();
    d.push(&a);
    d.push(&b);
    let (ok, err) = decode_all(&mut d);
    assert_eq!(err, vec![DecodeError::BadCrc { offset: 0 }]);
    assert_eq!(ok, vec![frame(2, 2, b"next")]);
}

#[test]
fn oversize_is_rejected_before_waiting_for_the_payload() {
    let big = frame(1, 1, &[7; 200]).encode().unwrap();
    let small = frame(2, 2, b"x").encode().unwrap();
    let mut d = Decoder::new(100);
    d.push(&big[..HEADER_LEN]); // only the header: the verdict must not wait for 200 bytes
    assert_eq!(d.next_frame(), Some(Err(DecodeError::Oversize { offset: 0, len: 200, max: 100 })));
    d.push(&big[HEADER_LEN..]);
    d.push(&small);
    let (ok, _) = decode_all(&mut d);
    assert_eq!(ok, vec![frame(2, 2, b"x")]);
}

#[test]
fn unknown_version_is_a_typed_error() {
    let mut w = frame(1, 1, b"v2").encode().unwrap();
    w[4] = 2;
    let hcrc = crc32fast::hash(&w[..20]);
    w[20..24].copy_from_slice(&hcrc.to_le_bytes());
    let mut d = Decoder::default();
    d.push(&w);
    assert_eq!(d.next_frame(), Some(Err(DecodeError::UnknownVersion { offset: 0, version: 2 })));
}

#[test]
fn a_false_magic_with_a_huge_length_does_not_wedge_the_stream() {
    // Stale bytes: a magic and a header claiming MAX_PAYLOAD, with a wrong header CRC.
    let mut stale = MAGIC.to_vec();
    stale.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    stale.extend_from_slice(&MAX_PAYLOAD.to_le_bytes());
    stale.extend_from_slice(&[0, 0, 0, 0]);
    let good = frame(5, 5, b"fresh").encode().unwrap();
    let mut d = Decoder::new(MAX_PAYLOAD);
    d.push(&stale);
    d.push(&good);
    let (ok, err) = decode_all(&mut d);
    assert_eq!(err, vec![DecodeError::BadHeaderCrc { offset: 0 }]);
    assert_eq!(ok, vec![frame(5, 5, b"fresh")]);
}

#[test]
fn a_torn_frame_is_resolved_once_its_claimed_length_has_arrived() {
    // An earlier session ended mid-frame; its header is valid and claims 64 payload bytes.
    // The decoder cannot tell a torn frame from a slow one until that many bytes arrived,
    // so later frames surface then, in order (which is why endpoints call `clear` at a
    // session boundary they observe).
    let old = frame(1, 1, &[0x11; 64]).encode().unwrap();
    let new: Vec<Frame> = (1..=3).map(|s| frame(2, s, b"new session")).collect();
    let mut d = Decoder::default();
    d.push(&old[..40]);
    d.push(&new[0].encode().unwrap());
    assert_eq!(d.next_frame(), None, "92 bytes claimed, 79 present");
    d.push(&new[1].encode().unwrap());
    d.push(&new[2].encode().unwrap());
    let (ok, err) = decode_all(&mut d);
    assert_eq!(err, vec![DecodeError::BadCrc { offset: 0 }]);
    assert_eq!(ok, new);
}

#[test]
fn clear_drops_a_torn_frame_at_a_session_boundary() {
    let old = frame(1, 1, &[0x11; 64]).encode().unwrap();
    let new = frame(2, 1, b"new session").encode().unwrap();
    let mut d = Decoder::default();
    d.push(&old[..40]);
    assert_eq!(d.next_frame(), None);
    d.clear();
    d.push(&new);
    assert_eq!(d.next_frame(), Some(Ok(frame(2, 1, b"new session"))));
    assert_eq!(d.stats().skipped_bytes, 40);
}

const GREET: u8 = 0x03;

fn greeting() -> Vec<u8> {
    Frame::new(GREET, 0, 0, vec![]).encode().unwrap()
}

#[test]
fn a_greeting_inside_a_pending_payload_cuts_the_torn_frame_at_once() {
    // The old client sent half of a 4 KiB frame and left; the new one greets and asks.
    let old = frame(0x12, 7, &[0x11; 4096]).encode().unwrap();
    let after = frame(0x10, 1, b"ping").encode().unwrap();
    let mut d = Decoder::with_greeting(DEFAULT_MAX_PAYLOAD, GREET);
    d.push(&old[..2048]);
    assert_eq!(d.next_frame(), None, "a slow frame is waited for");
    d.push(&greeting());
    d.push(&after);
    assert_eq!(
        d.next_frame(),
        Some(Err(DecodeError::Torn { offset: 0, announced: 4096, received: 2048 - 24, greeting_offset: 2048 }))
    );
    assert_eq!(d.next_frame(), Some(Ok(Frame::new(GREET, 0, 0, vec![]))));
    assert_eq!(d.next_frame(), Some(Ok(frame(0x10, 1, b"ping"))));
    assert_eq!(d.next_frame(), None);
    assert_eq!((d.stats().torn, d.stats().errors, d.stats().skipped_bytes), (1, 1, 2048));
}

#[test]
fn without_a_greeting_type_a_torn_frame_waits_for_its_length() {
    let old = frame(0x12, 7, &[0x11; 4096]).encode().unwrap();
    let mut d = Decoder::default();
    d.push(&old[..2048]);
    d.push(&greeting());
    assert_eq!(d.next_frame(), None);
}

#[test]
fn a_complete_frame_carrying_a_greeting_is_delivered_whole() {
    // Nested greeting bytes in one push: the outer frame is complete, so it wins.
    let mut payload = b"before".to_vec();
    payload.extend_from_slice(&greeting());
    payload.extend_from_slice(b"after");
    let outer = frame(0x12, 7, &payload).encode().unwrap();
    let mut d = Decoder::with_greeting(DEFAULT_MAX_PAYLOAD, GREET);
    d.push(&outer);
    assert_eq!(d.next_frame(), Some(Ok(frame(0x12, 7, &payload))));
    assert_eq!(d.next_frame(), None);
}

#[test]
fn other_frames_inside_a_pending_payload_do_not_cut_it() {
    // A valid frame of another type inside a payload is payload, however it is chunked.
    let inner = frame(0x10, 1, b"inner").encode().unwrap();
    let mut payload = inner.clone();
    payload.extend_from_slice(&[0x22; 100]);
    let outer = frame(0x12, 7, &payload).encode().unwrap();
    let mut d = Decoder::with_greeting(DEFAULT_MAX_PAYLOAD, GREET);
    for b in &outer {
        d.push(std::slice::from_ref(b));
        if let Some(r) = d.next_frame() {
            assert_eq!(r, Ok(frame(0x12, 7, &payload)));
        }
    }
    assert_eq!(d.stats().frames, 1);
    assert_eq!(d.stats().errors, 0);
}

#[test]
fn nested_torn_frames_are_cut_once_at_the_greeting() {
    // Two clients left mid-frame in a row, then a third greets.
    let a = frame(0x12, 1, &[0xAA; 1000]).encode().unwrap();
    let b = frame(0x12, 2, &[0xBB; 1000]).encode().unwrap();
    let mut d = Decoder::with_greeting(DEFAULT_MAX_PAYLOAD, GREET);
    d.push(&a[..300]);
    d.push(&b[..300]);
    d.push(&greeting());
    let r = d.next_frame();
    assert!(matches!(r, Some(Err(DecodeError::Torn { offset: 0, greeting_offset: 600, .. }))), "{r:?}");
    assert_eq!(d.next_frame(), Some(Ok(Frame::new(GREET, 0, 0, vec![]))));
}

#[test]
fn a_torn_frame_at_the_payload_limit_is_cut_and_each_byte_judged_once() {
    // Half of a 1 MiB frame, in 4 KiB reads, then a greeting: found at once.
    let old = frame(0x12, 7, &vec![0x5A; DEFAULT_MAX_PAYLOAD as usize]).encode().unwrap();
    let mut d = Decoder::with_greeting(DEFAULT_MAX_PAYLOAD, GREET);
    for c in old[..old.len() / 2].chunks(4096) {
        d.push(c);
        assert_eq!(d.next_frame(), None);
    }
    d.push(&greeting());
    assert!(matches!(d.next_frame(), Some(Err(DecodeError::Torn { .. }))));
    assert_eq!(d.next_frame(), Some(Ok(Frame::new(GREET, 0, 0, vec![]))));
    assert_eq!(d.buffered(), 0);
}

#[test]
fn releasing_spare_memory_keeps_offsets_and_pending_bytes() {
    let mut d = Decoder::new(MAX_PAYLOAD);
    let big = frame(0x32, 1, &vec![7; 300_000]).encode().unwrap();
    d.push(&big);
    assert!(matches!(d.next_frame(), Some(Ok(_))));
    let half = frame(0x32, 2, b"next").encode().unwrap();
    d.push(&half[..10]);
    d.release_spare(1024);
    assert_eq!(d.buffered(), 10, "bytes of a pending frame are never released");
    d.push(&half[10..]);
    assert!(matches!(d.next_frame(), Some(Ok(f)) if f.header.seq == 2));
    let before = d.stream_offset();
    d.release_spare(1024);
    assert_eq!(d.stream_offset(), before);
    assert_eq!(d.stats().skipped_bytes, 0);
    d.push(&frame(0x32, 3, b"after").encode().unwrap());
    assert!(matches!(d.next_frame(), Some(Ok(f)) if f.header.seq == 3));
}

#[test]
fn magic_split_across_pushes_is_kept() {
    let w = frame(1, 1, b"z").encode().unwrap();
    let mut d = Decoder::default();
    d.push(b"garbage");
    d.push(&w[..2]);
    assert_eq!(d.next_frame(), None);
    assert_eq!(d.buffered(), 2, "F5 56 may start a magic and must be kept");
    d.push(&w[2..]);
    assert_eq!(d.next_frame(), Some(Ok(frame(1, 1, b"z"))));
    assert_eq!(d.stats().skipped_bytes, 7);
    assert_eq!(d.stats().last_skip_end, 7, "the garbage ended where the frame began");
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (any::<u8>(), any::<u32>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(k, s, q, p)| Frame::new(k, s, q, p))
}

proptest! {
    #[test]
    fn any_split_decodes_identically(
        frames in proptest::collection::vec(arb_frame(), 0..12),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.sort_unstable();
        let mut d = Decoder::default();
        let mut out = vec![];
        let mut last = 0;
        for p in points.into_iter().chain(std::iter::once(wire.len())) {
            d.push(&wire[last..p]);
            last = p;
            while let Some(r) = d.next_frame() {
                out.push(r.unwrap());
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_torn_frame_of_any_length_and_chunking_is_cut_at_the_greeting(
        old in arb_frame(),
        cut in any::<prop::sample::Index>(),
        after in proptest::collection::vec(arb_frame(), 0..4),
        chunk in 1usize..97,
    ) {
        let old = old.encode().unwrap();
        // Cut inside the payload (or at its very start), never after the last byte.
        let keep = HEADER_LEN + cut.index(old.len() - HEADER_LEN - TRAILER_LEN + 1).min(old.len() - HEADER_LEN - 1);
        let mut wire = old[..keep].to_vec();
        wire.extend_from_slice(&greeting());
        for f in &after {
            wire.extend_from_slice(&f.encode().unwrap());
        }
        let mut d = Decoder::with_greeting(DEFAULT_MAX_PAYLOAD, GREET);
        let (mut frames, mut errors) = (vec![], vec![]);
        for c in wire.chunks(chunk) {
            d.push(c);
            while let Some(r) = d.next_frame() {
                match r {
                    Ok(f) => frames.push(f),
                    Err(e) => errors.push(e),
                }
            }
        }
        let mut expected = vec![Frame::new(GREET, 0, 0, vec![])];
        expected.extend(after);
        prop_assert_eq!(frames, expected);
        prop_assert_eq!(errors.len(), 1);
        // Torn, or (when the greeting's first bytes complete the announced length before the
        // whole greeting is in) a bad CRC, after which the search resumes inside it.
        prop_assert!(
            matches!(errors[0], DecodeError::Torn { offset: 0, .. } | DecodeError::BadCrc { offset: 0 }),
            "{:?}",
            errors[0]
        );
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn garbage_between_frames_yields_exactly_the_frames(
        items in proptest::collection::vec(
            (arb_frame(), proptest::collection::vec(any::<u8>(), 0..200), any::<bool>()), 0..12),
        chunk in 1usize..97,
    ) {
        let mut wire = vec![];
        for (f, garbage, magic_in_garbage) in &items {
            wire.extend_from_slice(garbage);
            if *magic_in_garbage {
                // the nastiest garbage: a real magic followed by a torn header
                wire.extend_from_slice(&MAGIC);
                wire.extend_from_slice(&garbage[..garbage.len().min(10)]);
            }
            wire.extend_from_slice(&f.encode().unwrap());
        }
        let mut d = Decoder::default();
        let mut out = vec![];
        for c in wire.chunks(chunk) {
            d.push(c);
            while let Some(r) = d.next_frame() {
                if let Ok(f) = r { out.push(f) }
            }
        }
        let expected: Vec<Frame> = items.into_iter().map(|(f, _, _)| f).collect();
        prop_assert_eq!(out, expected);
    }
}

proptest! {
    /// The word-at-a-time search finds exactly the first needle, whatever the alignment, the
    /// length and the bytes around it (bytes one bit away from the needle, which a zero-byte
    /// test could mistake for it, are drawn often).
    #[test]
    fn find_byte_finds_the_first_needle_exactly(
        needle in any::<u8>(),
        picks in proptest::collection::vec((0u8..6, any::<u8>()), 0..80),
        skip in 0usize..8,
    ) {
        let bytes: Vec<u8> = picks
            .iter()
            .map(|&(how, any)| match how {
                0 => needle,
                1 => needle ^ 0x01,
                2 => needle ^ 0x80,
                3 => needle.wrapping_add(1),
                4 => needle.wrapping_sub(1),
                _ => any,
            })
            .collect();
        let b = &bytes[skip.min(bytes.len())..];
        prop_assert_eq!(super::find_byte(b, needle), b.iter().position(|&x| x == needle));
    }
}
