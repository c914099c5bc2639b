//! Target `decoder`: a byte stream through [`Decoder`] in chunks the input chooses.
//!
//! # Input
//!
//! | bytes | meaning |
//! |---|---|
//! | 1 | payload limit: below 0x80 the default (1 MiB), else `(b & 0x7f) * 4` bytes (0..=508) |
//! | 1 | mode: bit 0 set = the rest after the chunk plan is a *builder script* (frames with valid CRCs, damaged, torn, other-version and big-length frames, garbage), clear = the rest is the raw stream |
//! | 1 | `n`: the chunk plan's length (`n % 32`) |
//! | n | the chunk plan, used cyclically for the first 4096 pushes (then 4032-byte chunks): size `b & 0x3f`, times 64 if bit 7; bit 6 = drain with `next_frame` after this push. An empty plan pushes one byte at a time, draining after each |
//! | rest | the stream, or the builder script ([`build_stream`]) |
//!
//! # What is checked
//!
//! The documented guarantees of `common/src/decoder.rs`:
//! - **chunking does not matter**: the frames and errors (in order), the final counters and the
//!   bytes still held are the same as when the whole stream is pushed at once;
//! - **bounded memory**: after `next_frame` returned `None`, `buffered()` is below
//!   `max_payload + OVERHEAD` (the largest frame still incomplete); between drains it grows by
//!   at most the bytes pushed since ("the bytes not yet judged");
//! - **counters add up**: `bytes_in` is every byte pushed; `frames` and `errors` count the
//!   results; `skipped_bytes + wire bytes of the frames + buffered() == bytes_in`; every error
//!   skipped at least one byte;
//! - **frames are real**: every frame re-encodes to exactly the input bytes at the first magic
//!   after the previous result (the stream is searched in order; a frame starts at a magic);
//! - **errors are real**: every error's offset is that magic and the bytes there really have the
//!   defect it names (header CRC wrong, version not 1, length over the limit, frame CRC wrong);
//! - **nothing is skipped silently that could start a frame**: when the decoder waits, what it
//!   holds starts at the next magic (and a full header there is valid and not yet complete), or
//!   holds at most a partial magic when no magic follows.
//!
//! Never panicking is implied: a panic in the decoder is a crash like a failed assertion.

use crate::input::Input;
use memchr::memmem;
use vport_common::frame::{DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAGIC, OVERHEAD, VERSION};
use vport_common::{DecodeError, Decoder, DecoderStats, Frame};

// ---- adapter: the decoder API this target uses -------------------------------------------------

/// A decoder with payload limit `max_payload`.
fn new_decoder(max_payload: u32) -> Decoder {
    Decoder::new(max_payload)
}

/// Why a candidate frame was rejected, in the terms of the stream checks ([`check_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The header CRC does not match bytes 0..20.
    HeaderCrc,
    /// A valid header of another version.
    Version(u8),
    /// A valid header whose length exceeds the limit.
    Oversize { len: u32, max: u32 },
    /// A valid header and complete frame whose frame CRC does not match.
    FrameCrc,
}

/// The stream offset a decode error names, and what it claims about the bytes there. A new
/// [`DecodeError`] variant fails to compile here: add its claim to [`Verdict`] and
/// [`check_error`].
fn verdict(e: &DecodeError) -> (u64, Verdict) {
    match *e {
        DecodeError::BadHeaderCrc { offset } => (offset, Verdict::HeaderCrc),
        DecodeError::UnknownVersion { offset, version } => (offset, Verdict::Version(version)),
        DecodeError::Oversize { offset, len, max } => (offset, Verdict::Oversize { len, max }),
        DecodeError::BadCrc { offset } => (offset, Verdict::FrameCrc),
    }
}

// ---- end of adapter ----------------------------------------------------------------------------

/// Largest stream a builder script may produce.
const STREAM_CAP: usize = 256 * 1024;
/// Pushes that follow the plan; the rest of a long stream goes in [`LATE_PUSH`] chunks, so one
/// execution stays fast (a byte-at-a-time plan over a 256 KiB stream would take 25 ms).
const MAX_PUSHES: usize = 4096;
/// The chunk after [`MAX_PUSHES`]: 4032 bytes, then a drain.
const LATE_PUSH: u8 = 0xff;

/// Interprets `data` (layout in the module documentation) and checks every guarantee.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let max = match input.u8() {
        b if b < 0x80 => DEFAULT_MAX_PAYLOAD,
        b => u32::from(b & 0x7f) * 4,
    };
    let builder = input.u8() & 1 == 1;
    let n = usize::from(input.u8() % 32);
    let plan = input.bytes(n).to_vec();
    let stream = if builder { build_stream(&mut input) } else { input.rest().to_vec() };

    let whole = decode_whole(&stream, max);
    check_against_stream(&whole, &stream, max);
    let chunked = decode_chunked(&stream, &plan, max);
    assert_eq!(chunked.items, whole.items, "results depend on the chunking (plan {plan:?})");
    assert_eq!(chunked.stats, whole.stats, "counters depend on the chunking (plan {plan:?})");
    assert_eq!(chunked.buffered, whole.buffered, "held bytes depend on the chunking (plan {plan:?})");
}

/// What one decoding of a stream produced.
#[derive(Debug)]
struct Outcome {
    items: Vec<Result<Frame, DecodeError>>,
    stats: DecoderStats,
    buffered: usize,
}

/// The stream pushed at once, then drained.
fn decode_whole(stream: &[u8], max: u32) -> Outcome {
    let mut d = new_decoder(max);
    let mut items = Vec::new();
    d.push(stream);
    assert_eq!(d.stats().bytes_in, stream.len() as u64, "bytes_in counts every byte pushed");
    drain(&mut d, &mut items, max);
    Outcome { items, stats: d.stats(), buffered: d.buffered() }
}

/// The stream pushed in the plan's chunks, drained where the plan says and at the end.
fn decode_chunked(stream: &[u8], plan: &[u8], max: u32) -> Outcome {
    const BYTEWISE: &[u8] = &[0x41];
    let plan = if plan.is_empty() { BYTEWISE } else { plan };
    let mut d = new_decoder(max);
    let mut items = Vec::new();
    let (mut pos, mut since_drain, mut step, mut idle) = (0usize, 0usize, 0usize, 0usize);
    while pos < stream.len() {
        let b = if step < MAX_PUSHES { plan[step % plan.len()] } else { LATE_PUSH };
        step += 1;
        let mut size = usize::from(b & 0x3f) << if b & 0x80 != 0 { 6 } else { 0 };
        if size == 0 {
            // Empty pushes are legal; a plan of nothing but them still has to end.
            idle += 1;
            if idle > plan.len() {
                size = 1;
            }
        } else {
            idle = 0;
        }
        let size = size.min(stream.len() - pos);
        d.push(&stream[pos..pos + size]);
        pos += size;
        since_drain += size;
        assert_eq!(d.stats().bytes_in, pos as u64, "bytes_in counts every byte pushed");
        assert!(
            d.buffered() < OVERHEAD + max as usize + since_drain,
            "buffered {} exceeds the largest incomplete frame ({}) plus the {since_drain} bytes pushed since the \
             last drain",
            d.buffered(),
            OVERHEAD + max as usize - 1
        );
        if b & 0x40 != 0 {
            drain(&mut d, &mut items, max);
            since_drain = 0;
        }
    }
    drain(&mut d, &mut items, max);
    Outcome { items, stats: d.stats(), buffered: d.buffered() }
}

/// Takes results until the decoder needs more bytes; then it holds less than one frame.
fn drain(d: &mut Decoder, items: &mut Vec<Result<Frame, DecodeError>>, max: u32) {
    while let Some(r) = d.next_frame() {
        items.push(r);
        assert!(items.len() as u64 <= d.stats().bytes_in, "more results than bytes: the decoder is not advancing");
    }
    assert!(
        d.buffered() < OVERHEAD + max as usize,
        "the decoder waits holding {} bytes, more than the largest incomplete frame ({})",
        d.buffered(),
        OVERHEAD + max as usize - 1
    );
}

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

/// Checks the decoder's results against the bytes they came from (module documentation).
fn check_against_stream(out: &Outcome, stream: &[u8], max: u32) {
    let mut cursor = 0usize;
    let (mut frames, mut errors, mut frame_bytes) = (0u64, 0u64, 0u64);
    for (i, item) in out.items.iter().enumerate() {
        let at = next_magic(stream, cursor);
        match item {
            Ok(f) => {
                // A failed encode of a decoded frame is a finding: unwrap is the assertion.
                let wire = f.encode().expect("a decoded frame re-encodes");
                let Some(p) = at else { panic!("result {i}: frame {:?} but no magic after offset {cursor}", f.header) };
                assert_eq!(
                    stream.get(p..p + wire.len()),
                    Some(wire.as_slice()),
                    "result {i}: frame {:?} ({} bytes) is not the bytes at the next magic (offset {p})",
                    f.header,
                    wire.len()
                );
                cursor = p + wire.len();
                frames += 1;
                frame_bytes += wire.len() as u64;
            }
            Err(e) => {
                let (offset, v) = verdict(e);
                assert_eq!(Some(offset), at.map(|p| p as u64), "result {i}: {e} is not at the next magic");
                check_error(stream, offset as usize, v, max, e);
                cursor = offset as usize + 1;
                errors += 1;
            }
        }
    }
    let s = out.stats;
    assert_eq!(s.bytes_in, stream.len() as u64, "bytes_in");
    assert_eq!(s.frames, frames, "stats.frames counts the frames produced");
    assert_eq!(s.errors, errors, "stats.errors counts the errors produced");
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
        }
        None => {
            assert!(
                out.buffered < MAGIC.len() && MAGIC.starts_with(&stream[held..]),
                "no magic after offset {cursor}, but the decoder holds {:02x?}",
                &stream[held..]
            );
        }
    }
}

/// Checks that the bytes at `at` have the defect `v` claims.
fn check_error(stream: &[u8], at: usize, v: Verdict, max: u32, e: &DecodeError) {
    let h = header(stream, at);
    let ok = header_crc_ok(h);
    let len = le32(h, 16);
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
            let end = at + HEADER_LEN + len as usize;
            let Some(trailer) = stream.get(end..end + 4) else {
                panic!("{e}: but the frame ({} bytes) is not complete in the stream", end + 4 - at)
            };
            assert_ne!(crc32fast::hash(&stream[at..end]), le32(trailer, 0), "{e}, but the frame CRC matches");
        }
    }
}

/// A frame from the script: kind, session and seq from one byte each, payload length, payload.
fn script_frame(input: &mut Input) -> Vec<u8> {
    let kind = input.u8();
    let session = u32::from(input.u8());
    let seq = u32::from(input.u8());
    let len = usize::from(input.u8());
    let mut payload = input.bytes(len).to_vec();
    payload.resize(len, 0);
    // A 255-byte payload can never exceed the format's maximum: unwrap cannot fail.
    Frame::new(kind, session, seq, payload).encode().expect("small frame encodes")
}

/// Builds a stream from a script of operations (one byte each, then its arguments):
///
/// | op % 8 | appends |
/// |---|---|
/// | 0 | raw bytes: length byte, bytes |
/// | 1 | a valid frame ([`script_frame`]) |
/// | 2 | a damaged frame: a frame, then position (u16) and xor mask (u8) of one damaged byte |
/// | 3 | a torn frame: a frame cut at a position (u16) |
/// | 4 | a frame of another version (byte), both CRCs valid |
/// | 5 | a valid header claiming a length (u32) and nothing after it |
/// | 6 | the magic alone |
/// | 7 | a valid frame with a large payload: length u16, filled with a counter |
pub fn build_stream(input: &mut Input) -> Vec<u8> {
    let mut out = Vec::new();
    while !input.is_empty() && out.len() < STREAM_CAP {
        match input.u8() % 8 {
            0 => {
                let n = usize::from(input.u8());
                out.extend_from_slice(input.bytes(n));
            }
            1 => out.extend(script_frame(input)),
            2 => {
                let mut f = script_frame(input);
                let at = usize::from(input.u16()) % f.len();
                f[at] ^= input.u8() | 1;
                out.extend(f);
            }
            3 => {
                let f = script_frame(input);
                let at = usize::from(input.u16()) % f.len();
                out.extend_from_slice(&f[..at]);
            }
            4 => {
                let mut f = script_frame(input);
                f[4] = match input.u8() {
                    VERSION => VERSION + 1,
                    v => v,
                };
                let hcrc = crc32fast::hash(&f[..20]);
                f[20..24].copy_from_slice(&hcrc.to_le_bytes());
                let end = f.len() - 4;
                let fcrc = crc32fast::hash(&f[..end]);
                f[end..].copy_from_slice(&fcrc.to_le_bytes());
                out.extend(f);
            }
            5 => {
                // Empty and 64 KiB payloads are within the format: expect cannot fail.
                let mut h = Frame::new(input.u8(), 0, 0, Vec::new()).encode().expect("empty frame encodes");
                h.truncate(HEADER_LEN);
                h[16..20].copy_from_slice(&input.u32().to_le_bytes());
                let hcrc = crc32fast::hash(&h[..20]);
                h[20..24].copy_from_slice(&hcrc.to_le_bytes());
                out.extend(h);
            }
            6 => out.extend_from_slice(&MAGIC),
            _ => {
                let kind = input.u8();
                let len = usize::from(input.u16());
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                out.extend(Frame::new(kind, 1, 1, payload).encode().expect("64 KiB frame encodes"));
            }
        }
    }
    out
}

/// A seed in this target's input format: the raw `stream` with payload limit selector
/// `limit`, pushed in the chunks of `plan`.
pub fn seed(limit: u8, plan: &[u8], stream: &[u8]) -> Vec<u8> {
    let mut out = vec![limit, 0, plan.len() as u8];
    out.extend_from_slice(plan);
    out.extend_from_slice(stream);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_stream_and_a_damaged_one_pass() {
        let f = Frame::new(0x10, 7, 1, vec![1, 2, 3]).encode().unwrap();
        let mut s = b"garbage".to_vec();
        s.extend_from_slice(&f);
        s.extend_from_slice(&f[..10]);
        s.extend_from_slice(&f);
        let mut bad = f.clone();
        bad[25] ^= 1;
        s.extend_from_slice(&bad);
        for plan in [&[][..], &[3, 0x45, 0x81]] {
            run(&seed(0, plan, &s));
            run(&seed(0x81, plan, &s));
        }
    }

    #[test]
    fn every_builder_op_runs() {
        let script: Vec<u8> = (0u8..8).flat_map(|op| [op, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9]).collect();
        let mut data = vec![0, 1, 2, 0x47, 0xc1];
        data.extend_from_slice(&script);
        run(&data);
    }
}
