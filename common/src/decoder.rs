//! Streaming frame decoder.
//!
//! Guarantees:
//! - Bytes may arrive in any chunking, down to one byte per [`Decoder::push`]; the frames and
//!   errors produced do not depend on the chunking.
//! - Nothing is allocated for a payload before its header has passed the header CRC and the
//!   payload limit, so a hostile length cannot make the decoder allocate.
//! - After any damage (bad header CRC, unknown version, oversize length, bad frame CRC) the
//!   decoder reports a typed [`DecodeError`] and resumes the search for [`MAGIC`] one byte after
//!   the rejected candidate, so a valid frame that follows garbage or stale bytes of an
//!   earlier session is always found. Bytes that are not part of a frame and carry no magic are
//!   skipped silently and counted in [`DecoderStats::skipped_bytes`].
//!
//! # Torn frames
//!
//! A *torn* frame has a valid header but its sender stopped before the payload was complete
//! (a host client that left mid-frame). Its header CRC, version and length all pass, so by
//! itself it cannot be told from a frame that is merely slow until its announced length has
//! arrived: a decoder would swallow the next sender's bytes as that payload (up to the payload
//! limit, 1 MiB by default) and only then find the frames after it.
//!
//! A decoder built with [`Decoder::with_greeting`] recovers at once: while a frame is pending,
//! it looks inside the pending bytes for a complete, valid *greeting* frame (the type every new
//! sender must send first; the agent uses HELLO_REQUEST: magic, valid header of that type with
//! an empty payload, valid frame CRC, 28 bytes). When one is found, the pending frame is
//! declared torn ([`DecodeError::Torn`]) and decoding resumes at the greeting. Each pending
//! byte is examined once (positions where a greeting might start are kept until its 28 bytes
//! are in), so recovery costs O(bytes) however the bytes are chunked.
//!
//! Limits, by design:
//! - A new sender that does not start with a greeting is found only when the torn frame's
//!   announced length has arrived (the frame then fails its CRC and the search resumes inside
//!   it, as for any damage).
//! - A payload that legitimately *contains* a complete greeting frame (an ECHO of those 28
//!   bytes, say) is cut there if the greeting is in before the rest of the payload. Senders must
//!   not embed greeting frames; random data matches only with the magic and two CRC-32s
//!   (about 2^-96 per position).
//! - Only a greeting cuts a frame: any other valid frame found inside a pending payload is
//!   treated as payload, so nested frames of other types are safe.

use crate::frame::{le16, le32, Frame, Header, DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAGIC, TRAILER_LEN, VERSION};
use thiserror::Error;

/// A problem found in the byte stream. The decoder has already skipped past it when this is
/// returned; decoding may simply continue.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A magic was found but the header CRC did not match: garbage or a torn header.
    #[error("bad header crc at stream offset {offset}")]
    BadHeaderCrc {
        /// Stream offset of the rejected magic.
        offset: u64,
    },
    /// A well-formed header of a protocol version this decoder does not speak.
    #[error("unknown protocol version {version} at stream offset {offset}")]
    UnknownVersion {
        /// Stream offset of the frame.
        offset: u64,
        /// The version byte found.
        version: u8,
    },
    /// The header announces a payload larger than this decoder accepts.
    #[error("payload length {len} exceeds the limit of {max} at stream offset {offset}")]
    Oversize {
        /// Stream offset of the frame.
        offset: u64,
        /// Announced payload length.
        len: u32,
        /// The decoder's limit.
        max: u32,
    },
    /// Header and length were valid but the frame CRC did not match: the payload was damaged.
    #[error("bad frame crc at stream offset {offset}")]
    BadCrc {
        /// Stream offset of the frame.
        offset: u64,
    },
    /// A frame with a valid header was cut off: a greeting frame (see the module docs) began
    /// inside its payload before the payload was complete.
    #[error(
        "torn frame at stream offset {offset}: its header announced {announced} payload bytes, \
         {received} came before a new greeting at stream offset {greeting_offset}"
    )]
    Torn {
        /// Stream offset of the torn frame.
        offset: u64,
        /// The payload length its header announced.
        announced: u32,
        /// Payload bytes received before the greeting.
        received: u64,
        /// Stream offset of the greeting that cut it.
        greeting_offset: u64,
    },
}

impl DecodeError {
    /// Stream offset of the rejected frame.
    pub fn offset(&self) -> u64 {
        match self {
            DecodeError::BadHeaderCrc { offset }
            | DecodeError::UnknownVersion { offset, .. }
            | DecodeError::Oversize { offset, .. }
            | DecodeError::BadCrc { offset }
            | DecodeError::Torn { offset, .. } => *offset,
        }
    }

    /// A short stable name for the kind of damage (`bad_header_crc`, `unknown_version`,
    /// `oversize`, `bad_crc`, `torn`), for counters and reports.
    pub fn name(&self) -> &'static str {
        match self {
            DecodeError::BadHeaderCrc { .. } => "bad_header_crc",
            DecodeError::UnknownVersion { .. } => "unknown_version",
            DecodeError::Oversize { .. } => "oversize",
            DecodeError::BadCrc { .. } => "bad_crc",
            DecodeError::Torn { .. } => "torn",
        }
    }
}

/// Running counters of a [`Decoder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Valid frames produced.
    pub frames: u64,
    /// Errors reported (each also skipped at least one byte).
    pub errors: u64,
    /// Bytes consumed that were not part of a valid frame.
    pub skipped_bytes: u64,
    /// Every byte ever pushed.
    pub bytes_in: u64,
    /// Frames declared torn ([`DecodeError::Torn`]; also counted in `errors`).
    pub torn: u64,
    /// Stream offset just past the last byte skipped (0 before any skip).
    pub last_skip_end: u64,
}

/// Streaming decoder; see the module documentation for its guarantees.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Index in `buf` of the first byte not yet consumed.
    start: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    max_payload: u32,
    /// The greeting type that cuts a torn frame (see the module docs), if enabled.
    greeting: Option<u8>,
    /// Greeting search inside the pending frame: (stream offset of the pending frame, stream
    /// offset of the first position not yet judged).
    scan: Option<(u64, u64)>,
    stats: DecoderStats,
}

/// Wire length of a greeting frame: a header and an empty payload.
pub const GREETING_LEN: usize = HEADER_LEN + TRAILER_LEN;

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_PAYLOAD)
    }
}

/// Don't compact the buffer for less than this many consumed bytes (amortises the memmove).
const COMPACT_MIN: usize = 64 * 1024;

impl Decoder {
    /// A decoder that rejects payloads longer than `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Decoder {
            buf: Vec::new(),
            start: 0,
            base: 0,
            max_payload,
            greeting: None,
            scan: None,
            stats: DecoderStats::default(),
        }
    }

    /// A decoder that rejects payloads longer than `max_payload` bytes and recovers from torn
    /// frames at a complete frame of type `greeting` with an empty payload (see the module
    /// docs). The agent passes HELLO_REQUEST, which every new host client sends first.
    pub fn with_greeting(max_payload: u32, greeting: u8) -> Self {
        Decoder { greeting: Some(greeting), ..Decoder::new(max_payload) }
    }

    /// The payload limit.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && (self.start >= COMPACT_MIN || self.start == self.buf.len()) {
            self.buf.drain(..self.start);
            self.base += self.start as u64;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        self.stats.bytes_in += bytes.len() as u64;
    }

    /// Bytes held that are not yet part of a produced frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Counters so far.
    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Discards everything buffered (counted as skipped), for example when a session ends.
    pub fn clear(&mut self) {
        self.stats.skipped_bytes += self.buffered() as u64;
        self.base += self.buf.len() as u64;
        if self.buffered() > 0 {
            self.stats.last_skip_end = self.base;
        }
        self.buf.clear();
        self.start = 0;
        self.scan = None;
    }

    /// Stream offset of the next byte to be pushed: every byte pushed so far.
    pub fn stream_offset(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// The next frame or error, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, DecodeError>> {
        let pending = &self.buf[self.start..];
        let Some(pos) = find_magic(pending) else {
            // Keep a tail that may be the beginning of a magic split across pushes.
            let keep = magic_prefix_len(pending);
            self.skip(pending.len() - keep);
            return None;
        };
        self.skip(pos);
        let at = self.start;
        let offset = self.base + at as u64;
        let avail = self.buf.len() - at;
        if avail < HEADER_LEN {
            return None;
        }
        let h = &self.buf[at..at + HEADER_LEN];
        if crc32fast::hash(&h[..20]) != le32(h, 20) {
            return Some(Err(self.reject(DecodeError::BadHeaderCrc { offset })));
        }
        if h[4] != VERSION {
            let version = h[4];
            return Some(Err(self.reject(DecodeError::UnknownVersion { offset, version })));
        }
        let len = le32(h, 16);
        if len > self.max_payload {
            let max = self.max_payload;
            return Some(Err(self.reject(DecodeError::Oversize { offset, len, max })));
        }
        let total = HEADER_LEN + len as usize + TRAILER_LEN;
        if avail < total {
            return self.find_greeting(at, offset).map(|greeting_at| {
                let err = DecodeError::Torn {
                    offset,
                    announced: len,
                    received: (greeting_at - at).saturating_sub(HEADER_LEN) as u64,
                    greeting_offset: self.base + greeting_at as u64,
                };
                self.skip(greeting_at - at);
                self.stats.errors += 1;
                self.stats.torn += 1;
                self.scan = None;
                Err(err)
            });
        }
        let body = &self.buf[at..at + total - TRAILER_LEN];
        if crc32fast::hash(body) != le32(&self.buf, at + total - TRAILER_LEN) {
            return Some(Err(self.reject(DecodeError::BadCrc { offset })));
        }
        let header = Header { kind: h[5], flags: le16(h, 6), session: le32(h, 8), seq: le32(h, 12) };
        let payload = body[HEADER_LEN..].to_vec();
        self.start += total;
        self.stats.frames += 1;
        Some(Ok(Frame { header, payload }))
    }

    /// Looks for a complete greeting frame inside the pending frame at `at` (stream offset
    /// `offset`); returns its index in `buf`. Positions are judged once: the search resumes
    /// where it stopped, waiting at a magic whose greeting is not complete yet.
    fn find_greeting(&mut self, at: usize, offset: u64) -> Option<usize> {
        let kind = self.greeting?;
        let mut from = match self.scan {
            Some((pending, next)) if pending == offset => (next - self.base) as usize,
            _ => at + 1,
        };
        let found = loop {
            let Some(i) = find_magic(&self.buf[from..]) else {
                // Keep the positions where a magic may still begin.
                from = from.max(self.buf.len().saturating_sub(MAGIC.len() - 1));
                break None;
            };
            let p = from + i;
            if self.buf.len() - p < GREETING_LEN {
                from = p;
                break None;
            }
            if is_greeting(&self.buf[p..p + GREETING_LEN], kind) {
                break Some(p);
            }
            from = p + 1;
        };
        self.scan = Some((offset, self.base + from as u64));
        found
    }

    fn skip(&mut self, n: usize) {
        self.start += n;
        self.stats.skipped_bytes += n as u64;
        if n > 0 {
            self.stats.last_skip_end = self.base + self.start as u64;
        }
    }

    /// Rejects the candidate at `start`: resume the search one byte later.
    fn reject(&mut self, err: DecodeError) -> DecodeError {
        self.skip(1);
        self.stats.errors += 1;
        err
    }
}

impl Iterator for Decoder {
    type Item = Result<Frame, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_frame()
    }
}

/// Position of the first complete magic in `b`.
fn find_magic(b: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(MAGIC[0], &b[from..]) {
        let p = from + i;
        if b.len() - p < MAGIC.len() {
            return None;
        }
        if b[p..p + MAGIC.len()] == MAGIC {
            return Some(p);
        }
        from = p + 1;
    }
    None
}

/// True if `b` (exactly [`GREETING_LEN`] bytes) is a valid frame of type `kind` with an empty
/// payload.
fn is_greeting(b: &[u8], kind: u8) -> bool {
    b[..MAGIC.len()] == MAGIC
        && b[4] == VERSION
        && b[5] == kind
        && le32(b, 16) == 0
        && crc32fast::hash(&b[..20]) == le32(b, 20)
        && crc32fast::hash(&b[..HEADER_LEN]) == le32(b, HEADER_LEN)
}

/// Length of the longest suffix of `b` that is a proper prefix of [`MAGIC`].
fn magic_prefix_len(b: &[u8]) -> usize {
    (1..MAGIC.len()).rev().find(|&k| b.len() >= k && b[b.len() - k..] == MAGIC[..k]).unwrap_or(0)
}

#[cfg(test)]
mod tests {
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
}
