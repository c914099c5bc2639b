//! The decoder target's stream model: what each result claims about the bytes it came from.

use super::{verdict, Outcome, Verdict};
use memchr::memmem;
use vport_common::frame::{HEADER_LEN, MAGIC, OVERHEAD, VERSION};
use vport_common::DecodeError;

/// Wire length of a greeting: a header and an empty payload.
const GREETING_LEN: usize = OVERHEAD;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Position of the first complete magic at or after `from`.
fn next_magic(stream: &[u8], from: usize) -> Option<usize> {
    stream.get(from..).and_then(|s| memmem::find(s, &MAGIC)).map(|i| from + i)
}

/// The header at `at` (24 bytes, which a verdict needs present).
fn header(stream: &[u8], at: usize) -> &[u8] {
    match stream.get(at..at + HEADER_LEN) {
        Some(h) => h,
        None => panic!("a verdict at offset {at} needs a whole header, but the stream has {} bytes", stream.len()),
    }
}

fn header_crc_ok(h: &[u8]) -> bool {
    crc32fast::hash(&h[..20]) == le32(h, 20)
}

/// True if `stream[at..]` starts with a complete valid frame of type `kind` with an empty
/// payload (what the decoder calls a greeting; session, seq and flags are not looked at).
fn is_greeting_at(stream: &[u8], at: usize, kind: u8) -> bool {
    let Some(b) = stream.get(at..at + GREETING_LEN) else { return false };
    b[..4] == MAGIC
        && b[4] == VERSION
        && b[5] == kind
        && le32(b, 16) == 0
        && header_crc_ok(b)
        && crc32fast::hash(&b[..HEADER_LEN]) == le32(b, HEADER_LEN)
}

/// Offsets of every complete greeting of type [`super::GREETING`] in the stream.
fn greetings(stream: &[u8]) -> Vec<usize> {
    memmem::find_iter(stream, &MAGIC).filter(|&p| is_greeting_at(stream, p, super::GREETING)).collect()
}

/// The payload length the header at `at` announces.
pub(crate) fn payload_len(stream: &[u8], at: usize) -> u32 {
    le32(header(stream, at), 16)
}

/// True if the whole frame at `at` carries a complete greeting inside it (after its first byte).
pub(crate) fn carries_greeting(stream: &[u8], at: usize) -> bool {
    let Some(h) = stream.get(at..at + HEADER_LEN) else { return false };
    let end = (at + OVERHEAD + le32(h, 16) as usize).min(stream.len());
    greetings(&stream[..end]).into_iter().any(|g| g > at)
}

/// True if a complete greeting is anywhere in the stream.
pub(crate) fn has_greeting(stream: &[u8]) -> bool {
    !greetings(stream).is_empty()
}

/// (offset, wire length) of every frame that came out, in order (the frames' positions are
/// established by [`check_against_stream`]).
pub(crate) fn frame_spans(out: &Outcome, stream: &[u8]) -> Vec<(usize, usize)> {
    let mut cursor = 0usize;
    let mut spans = Vec::new();
    for (item, _) in &out.items {
        let Some(at) = next_magic(stream, cursor) else { break };
        match item {
            Ok(f) => {
                let n = OVERHEAD + f.payload.len();
                spans.push((at, n));
                cursor = at + n;
            }
            Err(DecodeError::Torn { greeting_offset, .. }) => cursor = *greeting_offset as usize,
            Err(e) => cursor = e.offset() as usize + 1,
        }
    }
    spans
}

/// Checks the decoder's results against the bytes they came from (module documentation);
/// `greeting` is the decoder's greeting type.
pub(crate) fn check_against_stream(out: &Outcome, stream: &[u8], max: u32, greeting: Option<u8>) {
    let mut cursor = 0usize;
    let (mut frames, mut errors, mut torn, mut frame_bytes) = (0u64, 0u64, 0u64, 0u64);
    // Where the last result left consumed-but-not-framed bytes: the model of `last_skip_end`.
    let mut last_skip_end = 0u64;
    // A Torn result names the greeting that must come next.
    let mut expect_greeting: Option<usize> = None;
    for (i, (item, pushed)) in out.items.iter().enumerate() {
        let at = next_magic(stream, cursor);
        if let Some(g) = expect_greeting.take() {
            assert!(
                matches!(item, Ok(f) if f.header.kind == super::GREETING && f.payload.is_empty()) && at == Some(g),
                "result {i}: after a torn frame cut at {g}, {item:?} came, not the greeting there"
            );
        }
        if let Some(p) = at {
            if p > cursor {
                last_skip_end = p as u64;
            }
        }
        match item {
            Ok(f) => {
                // A failed encode of a decoded frame is a finding: expect is the assertion.
                let wire = f.encode().expect("a decoded frame re-encodes");
                let Some(p) = at else { panic!("result {i}: frame {:?} but no magic after offset {cursor}", f.header) };
                assert_eq!(
                    stream.get(p..p + wire.len()),
                    Some(wire.as_slice()),
                    "result {i}: frame {:?} ({} bytes) is not the bytes at the next magic (offset {p})",
                    f.header,
                    wire.len()
                );
                assert!(p + wire.len() <= *pushed, "result {i}: frame at {p} came out with only {pushed} bytes pushed");
                cursor = p + wire.len();
                frames += 1;
                frame_bytes += wire.len() as u64;
            }
            Err(e) => {
                let (offset, v, _) = verdict(e);
                assert_eq!(Some(offset), at.map(|p| p as u64), "result {i}: {e} is not at the next magic");
                let offset = offset as usize;
                check_error(stream, offset, v, max, e, *pushed);
                errors += 1;
                cursor = match v {
                    Verdict::Torn { greeting_offset, .. } => {
                        assert!(greeting.is_some(), "result {i}: {e} from a decoder without a greeting type");
                        torn += 1;
                        let g = greeting_offset as usize;
                        expect_greeting = Some(g);
                        g
                    }
                    _ => offset + 1,
                };
                last_skip_end = cursor as u64;
            }
        }
    }
    assert!(expect_greeting.is_none(), "the last result is a torn frame, and its greeting never came out");
    let s = out.stats;
    assert_eq!(s.bytes_in, stream.len() as u64, "bytes_in");
    assert_eq!(out.stream_offset, stream.len() as u64, "stream_offset() is every byte pushed");
    assert_eq!(s.frames, frames, "stats.frames counts the frames produced");
    assert_eq!(s.errors, errors, "stats.errors counts the errors produced");
    assert_eq!(s.torn, torn, "stats.torn counts the torn frames produced");
    assert_eq!(
        s.skipped_bytes + frame_bytes + out.buffered as u64,
        s.bytes_in,
        "skipped {} + frame bytes {frame_bytes} + buffered {} != bytes in {}",
        s.skipped_bytes,
        out.buffered,
        s.bytes_in
    );
    assert!(s.skipped_bytes >= s.errors, "every error skips at least one byte");

    // What the decoder still holds: the next candidate, or a partial magic.
    let held = stream.len() - out.buffered;
    if held > cursor {
        last_skip_end = held as u64;
    }
    assert_eq!(s.last_skip_end, last_skip_end, "last_skip_end is not the end of the last byte skipped");
    match next_magic(stream, cursor) {
        Some(p) => {
            assert_eq!(p, held, "the decoder waits, but the next magic after the last result is at {p}, not at {held}");
            if out.buffered >= HEADER_LEN {
                let h = header(stream, p);
                let len = le32(h, 16);
                assert!(
                    header_crc_ok(h) && h[4] == VERSION && len <= max && out.buffered < OVERHEAD + len as usize,
                    "the decoder waits on a candidate at {p} that it could judge now ({} bytes held)",
                    out.buffered
                );
            }
            if greeting.is_some() {
                let inside = greetings(stream).into_iter().find(|&q| q > p);
                assert!(
                    inside.is_none(),
                    "the decoder waits on a frame at {p} with a complete greeting inside at {inside:?}"
                );
            }
        }
        None => {
            assert!(
                out.buffered < MAGIC.len() && MAGIC.starts_with(&stream[held..]),
                "no magic after offset {cursor}, but the decoder holds {:02x?}",
                &stream[held..]
            );
        }
    }

    if greeting.is_some() {
        // No greeting is lost: each came out at its offset, or overlaps a frame that came out.
        let spans = frame_spans(out, stream);
        for g in greetings(stream) {
            let ok = spans.iter().any(|&(p, n)| p == g || (p < g && g < p + n));
            assert!(ok, "the complete greeting at {g} was lost: no frame came out there and none covers it");
        }
    }
}

/// Checks that the bytes at `at` have the defect `v` claims, judged on the `pushed` bytes that
/// were in when the error came out.
fn check_error(stream: &[u8], at: usize, v: Verdict, max: u32, e: &DecodeError, pushed: usize) {
    let h = header(stream, at);
    assert!(at + HEADER_LEN <= pushed, "{e}: judged with only {pushed} bytes pushed");
    let ok = header_crc_ok(h);
    let len = le32(h, 16);
    let total = at + OVERHEAD + len as usize;
    match v {
        Verdict::HeaderCrc => assert!(!ok, "{e}, but the header CRC matches"),
        Verdict::Version(version) => {
            assert!(ok && h[4] == version && version != VERSION, "{e}: header {h:02x?}")
        }
        Verdict::Oversize { len: l, max: m } => {
            assert!(ok && h[4] == VERSION && l == len && m == max && l > max, "{e}: header {h:02x?}, limit {max}")
        }
        Verdict::FrameCrc => {
            assert!(ok && h[4] == VERSION && len <= max, "{e}: header {h:02x?}, limit {max}");
            let end = total - 4;
            let Some(trailer) = stream.get(end..end + 4) else {
                panic!("{e}: but the frame ({} bytes) is not complete in the stream", total - at)
            };
            assert!(total <= pushed, "{e}: the frame ends at {total}, but only {pushed} bytes were pushed");
            assert_ne!(crc32fast::hash(&stream[at..end]), le32(trailer, 0), "{e}, but the frame CRC matches");
        }
        Verdict::Torn { announced, received, greeting_offset } => {
            assert!(ok && h[4] == VERSION && len <= max && announced == len, "{e}: header {h:02x?}, limit {max}");
            let g = greeting_offset as usize;
            assert!(g > at, "{e}: the greeting is not after the torn frame");
            assert!(
                is_greeting_at(stream, g, super::GREETING),
                "{e}: there is no complete greeting at {g}: {:02x?}",
                &stream[g.min(stream.len())..(g + GREETING_LEN).min(stream.len())]
            );
            assert!(
                g + GREETING_LEN <= pushed && pushed < total,
                "{e}: with {pushed} bytes pushed, the greeting (ends at {}) was not complete or the frame (ends at \
                 {total}) was",
                g + GREETING_LEN
            );
            let first = (at + 1..g).find(|&q| is_greeting_at(stream, q, super::GREETING));
            assert_eq!(first, None, "{e}: an earlier complete greeting was passed over");
            assert_eq!(received, (g - at).saturating_sub(HEADER_LEN) as u64, "{e}: received");
        }
    }
}
