//! Target `decoder`: a byte stream through [`Decoder`] in chunks the input chooses.
//!
//! # Input
//!
//! | bytes | meaning |
//! |---|---|
//! | 1 | payload limit: below 0x80 the default (1 MiB), else `(b & 0x7f) * 4` bytes (0..=508) |
//! | 1 | mode: bit 0 set = the rest after the chunk plan is a *builder script* ([`build::build_stream`]: frames with valid CRCs, damaged, torn, other-version and big-length frames, greetings, garbage), clear = the rest is the raw stream; bit 1 set = **greeting mode**: the decoder is `Decoder::with_greeting(limit, 0x03)` (HELLO_REQUEST, as the agent's) |
//! | 1 | `n`: the chunk plan's length (`n % 32`) |
//! | n | the chunk plan, used cyclically for the first 4096 pushes (then 4032-byte chunks): size `b & 0x3f`, times 64 if bit 7; bit 6 = drain with `next_frame` after this push. An empty plan pushes one byte at a time, draining after each |
//! | rest | the stream, or the builder script |
//!
//! # What is checked
//!
//! The documented guarantees of `common/src/decoder.rs`. Both modes, any chunking:
//! - **bounded memory**: after `next_frame` returned `None`, `buffered()` is below
//!   `max_payload + OVERHEAD` (the largest frame still incomplete); between drains it grows by
//!   at most the bytes pushed since ("the bytes not yet judged");
//! - **counters add up**: `bytes_in` (and `stream_offset()`) is every byte pushed; `frames`,
//!   `errors` and `torn` count the results; `skipped_bytes + wire bytes of the frames +
//!   buffered() == bytes_in`; every error skipped at least one byte; `last_skip_end` is the
//!   end of the last byte consumed outside a frame;
//! - **frames are real**: every frame re-encodes to exactly the input bytes at the first magic
//!   after the previous result, and those bytes had all been pushed when it came out;
//! - **errors are real**: every error's offset (and `offset()`, `name()`) is that magic and the
//!   bytes there really have the defect it names (header CRC wrong, version not 1, length over
//!   the limit, frame CRC wrong), judged only on bytes already pushed;
//! - **nothing is skipped silently that could start a frame**: when the decoder waits, what it
//!   holds starts at the next magic (and a full header there is valid and not yet complete), or
//!   holds at most a partial magic when no magic follows.
//!
//! Without a greeting (`Decoder::new`, behaviour unchanged): **chunking does not matter**: the
//! frames and errors (in order), the final counters and the bytes still held are the same as
//! when the whole stream is pushed at once; no error is `Torn`.
//!
//! Greeting mode (results may depend on push boundaries, so no chunking comparison):
//! - every `Torn` names a pending frame (valid header, payload within the limit, `announced` its
//!   length) that was still incomplete when the greeting was complete (judged on the bytes
//!   pushed at that moment); `greeting_offset` is the first complete valid greeting after the
//!   torn frame's offset, `received` the payload bytes before it, and **the very next result is
//!   that greeting frame**;
//! - **no greeting is lost**: every complete greeting in the stream comes out as a frame at its
//!   offset, unless it overlaps a valid frame that came out (a payload that carries a greeting:
//!   the documented limit); when the decoder waits, no complete greeting lies inside what it
//!   holds; in builder mode, the valid frames the script put right after a greeting (after a
//!   torn frame or not) come out too;
//! - pushed at once, the results are the ones of `Decoder::new` (the same results, counters and
//!   held bytes when no greeting is in the stream); where `Decoder::new` ends waiting on a
//!   frame, the greeting decoder may go on with a `Torn` and what follows it.
//!
//! Never panicking is implied: a panic in the decoder is a crash like a failed assertion.

pub mod build;
mod check;

use crate::input::Input;
use build::{build_stream, Built, GREETING};
use check::check_against_stream;
use vport_common::frame::OVERHEAD;
use vport_common::{DecodeError, Decoder, DecoderStats, Frame};

// ---- adapter: the decoder API this target uses -------------------------------------------------

/// A decoder with payload limit `max_payload`, recovering from torn frames at a greeting of
/// type `greeting` if given.
fn new_decoder(max_payload: u32, greeting: Option<u8>) -> Decoder {
    match greeting {
        None => Decoder::new(max_payload),
        Some(g) => Decoder::with_greeting(max_payload, g),
    }
}

/// Why a candidate frame was rejected, in the terms of the stream checks
/// ([`check::check_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The header CRC does not match bytes 0..20.
    HeaderCrc,
    /// A valid header of another version.
    Version(u8),
    /// A valid header whose length exceeds the limit.
    Oversize { len: u32, max: u32 },
    /// A valid header and complete frame whose frame CRC does not match.
    FrameCrc,
    /// A valid pending frame cut by a greeting.
    Torn { announced: u32, received: u64, greeting_offset: u64 },
}

/// The stream offset a decode error names, what it claims about the bytes there, and its
/// `name()`. A new [`DecodeError`] variant fails to compile here: add its claim to [`Verdict`]
/// and [`check::check_error`].
pub(crate) fn verdict(e: &DecodeError) -> (u64, Verdict, &'static str) {
    let (offset, v) = match *e {
        DecodeError::BadHeaderCrc { offset } => (offset, Verdict::HeaderCrc),
        DecodeError::UnknownVersion { offset, version } => (offset, Verdict::Version(version)),
        DecodeError::Oversize { offset, len, max } => (offset, Verdict::Oversize { len, max }),
        DecodeError::BadCrc { offset } => (offset, Verdict::FrameCrc),
        DecodeError::Torn { offset, announced, received, greeting_offset } => {
            (offset, Verdict::Torn { announced, received, greeting_offset })
        }
    };
    let name = match v {
        Verdict::HeaderCrc => "bad_header_crc",
        Verdict::Version(_) => "unknown_version",
        Verdict::Oversize { .. } => "oversize",
        Verdict::FrameCrc => "bad_crc",
        Verdict::Torn { .. } => "torn",
    };
    assert_eq!(e.offset(), offset, "{e}: offset() is not the variant's offset");
    assert_eq!(e.name(), name, "{e}: name()");
    (offset, v, name)
}

// ---- end of adapter ----------------------------------------------------------------------------

/// Pushes that follow the plan; the rest of a long stream goes in [`LATE_PUSH`] chunks, so one
/// execution stays fast (a byte-at-a-time plan over a 256 KiB stream would take 25 ms).
const MAX_PUSHES: usize = 4096;
/// The chunk after [`MAX_PUSHES`]: 4032 bytes, then a drain.
const LATE_PUSH: u8 = 0xff;

/// Interprets `data` (layout in the module documentation) and checks every guarantee.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let max = match input.u8() {
        b if b < 0x80 => vport_common::frame::DEFAULT_MAX_PAYLOAD,
        b => u32::from(b & 0x7f) * 4,
    };
    let mode = input.u8();
    let builder = mode & 1 == 1;
    let greeting = (mode & 2 == 2).then_some(GREETING);
    let n = usize::from(input.u8() % 32);
    let plan = input.bytes(n).to_vec();
    let built =
        if builder { build_stream(&mut input) } else { Built { bytes: input.rest().to_vec(), ..Built::default() } };
    let stream = &built.bytes;

    let whole = decode_whole(stream, max, greeting);
    check_against_stream(&whole, stream, max, greeting);
    let chunked = decode_chunked(stream, &plan, max, greeting);
    match greeting {
        None => {
            assert_eq!(chunked.results(), whole.results(), "results depend on the chunking (plan {plan:?})");
            assert_eq!(chunked.stats, whole.stats, "counters depend on the chunking (plan {plan:?})");
            assert_eq!(chunked.buffered, whole.buffered, "held bytes depend on the chunking (plan {plan:?})");
        }
        Some(_) => {
            check_against_stream(&chunked, stream, max, greeting);
            check_builder_runs(&built, &whole, max);
            check_builder_runs(&built, &chunked, max);
            check_one_push_is_the_plain_model(&whole, stream, max);
        }
    }
}

/// What one decoding of a stream produced: each result with the number of bytes pushed when it
/// came out.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub items: Vec<(Result<Frame, DecodeError>, usize)>,
    pub stats: DecoderStats,
    pub buffered: usize,
    pub stream_offset: u64,
}

impl Outcome {
    fn results(&self) -> Vec<&Result<Frame, DecodeError>> {
        self.items.iter().map(|(r, _)| r).collect()
    }
}

/// The stream pushed at once, then drained.
fn decode_whole(stream: &[u8], max: u32, greeting: Option<u8>) -> Outcome {
    let mut d = new_decoder(max, greeting);
    let mut items = Vec::new();
    d.push(stream);
    assert_eq!(d.stats().bytes_in, stream.len() as u64, "bytes_in counts every byte pushed");
    drain(&mut d, &mut items, max, stream.len());
    Outcome { items, stats: d.stats(), buffered: d.buffered(), stream_offset: d.stream_offset() }
}

/// The stream pushed in the plan's chunks, drained where the plan says and at the end.
fn decode_chunked(stream: &[u8], plan: &[u8], max: u32, greeting: Option<u8>) -> Outcome {
    const BYTEWISE: &[u8] = &[0x41];
    let plan = if plan.is_empty() { BYTEWISE } else { plan };
    let mut d = new_decoder(max, greeting);
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
        assert_eq!(d.stream_offset(), pos as u64, "stream_offset() is every byte pushed");
        assert!(
            d.buffered() < OVERHEAD + max as usize + since_drain,
            "buffered {} exceeds the largest incomplete frame ({}) plus the {since_drain} bytes pushed since the \
             last drain",
            d.buffered(),
            OVERHEAD + max as usize - 1
        );
        if b & 0x40 != 0 {
            drain(&mut d, &mut items, max, pos);
            since_drain = 0;
        }
    }
    drain(&mut d, &mut items, max, pos);
    Outcome { items, stats: d.stats(), buffered: d.buffered(), stream_offset: d.stream_offset() }
}

/// Takes results until the decoder needs more bytes; then it holds less than one frame.
fn drain(d: &mut Decoder, items: &mut Vec<(Result<Frame, DecodeError>, usize)>, max: u32, pushed: usize) {
    while let Some(r) = d.next_frame() {
        items.push((r, pushed));
        assert!(items.len() as u64 <= d.stats().bytes_in, "more results than bytes: the decoder is not advancing");
    }
    assert!(
        d.buffered() < OVERHEAD + max as usize,
        "the decoder waits holding {} bytes, more than the largest incomplete frame ({})",
        d.buffered(),
        OVERHEAD + max as usize - 1
    );
}

/// Builder mode: each greeting the script emitted came out at its offset (unless a valid frame
/// that came out overlaps it: the documented limit), and so did the valid frames the script put
/// right after it (up to one over the payload limit, or whose payload carries a complete
/// greeting: the same documented limit).
fn check_builder_runs(built: &Built, out: &Outcome, max: u32) {
    let frames = check::frame_spans(out, &built.bytes);
    let produced = |at: usize| frames.iter().any(|&(p, _)| p == at);
    for run in &built.greetings {
        if !produced(run.at) {
            let cover = frames.iter().find(|&&(p, n)| p < run.at && run.at < p + n);
            assert!(
                cover.is_some(),
                "the greeting the script put at {} (after a torn frame: {}) was lost: no frame came out there and \
                 none covers it",
                run.at,
                run.after_torn
            );
            continue;
        }
        for &f in &run.frames_after {
            if produced(f) {
                continue;
            }
            // Over the payload limit, the frame is rejected (and the search resumes inside it);
            // the documented limit: a payload carrying a complete greeting is cut there when the
            // greeting is in before the rest of the payload. Either way, what follows is anyone's.
            assert!(
                check::payload_len(&built.bytes, f) > max || check::carries_greeting(&built.bytes, f),
                "the frame the script put at {f}, right after the greeting at {}, was lost",
                run.at
            );
            break;
        }
    }
}

/// Greeting mode pushed at once: `Decoder::new` on the same bytes gives a prefix of the
/// results; where they differ, the greeting decoder goes on with a `Torn` (the plain one waits
/// there); with no greeting in the stream everything is the same.
fn check_one_push_is_the_plain_model(with_greeting: &Outcome, stream: &[u8], max: u32) {
    let plain = decode_whole(stream, max, None);
    let (a, b) = (plain.results(), with_greeting.results());
    assert!(b.len() >= a.len(), "pushed at once, the greeting decoder gave fewer results than Decoder::new");
    assert_eq!(&b[..a.len()], &a[..], "pushed at once, the greeting decoder differs from Decoder::new");
    if let Some(next) = b.get(a.len()) {
        assert!(
            matches!(next, Err(DecodeError::Torn { .. })),
            "where Decoder::new waits, the greeting decoder went on with {next:?}, not a torn frame"
        );
    } else {
        assert_eq!(with_greeting.stats, plain.stats, "same results pushed at once, other counters");
        assert_eq!(with_greeting.buffered, plain.buffered, "same results pushed at once, other held bytes");
    }
    if !check::has_greeting(stream) {
        assert_eq!(b.len(), a.len(), "no greeting in the stream, yet the greeting decoder went on");
    }
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
            let mut g = seed(0, plan, &s);
            g[1] = 2;
            run(&g);
        }
    }

    #[test]
    fn every_builder_op_runs_in_both_modes() {
        let script: Vec<u8> = (0u8..9).flat_map(|op| [op, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9]).collect();
        for mode in 0..4 {
            let mut data = vec![0, mode, 2, 0x47, 0xc1];
            data.extend_from_slice(&script);
            run(&data);
        }
    }

    /// A torn frame, a greeting, frames after it, pushed in small chunks: the torn frame is cut
    /// and nothing after the greeting is lost.
    pub(crate) fn torn_script() -> Vec<u8> {
        // Default limit, builder and greeting mode, plan: 5-byte pushes, 7-byte pushes, drains.
        let mut t = vec![0, 3, 2, 0x45, 0x47, 1, 0x10, 1, 1, 3, 9, 9, 9];
        t.extend_from_slice(&[3, 0x12, 1, 2, 200]); // a frame with a 200-byte payload ...
        t.extend((0..200).map(|i| i as u8));
        t.extend_from_slice(&[100, 0]); // ... cut at 100: torn
        t.extend_from_slice(&[8, 0, 0]); // the greeting
        t.extend_from_slice(&[1, 0x10, 5, 6, 2, 1, 2, 8, 0, 1, 1, 0x11, 5, 7, 0]); // two frames, a greeting
        t
    }

    #[test]
    fn a_torn_frame_then_a_greeting() {
        let data = torn_script();
        run(&data);
        let mut input = Input::new(&data[5..]);
        let built = build_stream(&mut input);
        assert_eq!(built.greetings.len(), 2);
        assert!(built.greetings[0].after_torn);
        assert_eq!(built.greetings[0].frames_after.len(), 2, "a frame and the next greeting");
        assert_eq!(built.greetings[1].frames_after.len(), 1);
        let out = decode_chunked(&built.bytes, &[0x45, 0x47], 1 << 20, Some(GREETING));
        assert!(out.items.iter().any(|(r, _)| matches!(r, Err(DecodeError::Torn { .. }))), "{:?}", out.items);
    }
}
