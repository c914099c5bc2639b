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
    stats: DecoderStats,
}

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
        Decoder { buf: Vec::new(), start: 0, base: 0, max_payload, stats: DecoderStats::default() }
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
        self.buf.clear();
        self.start = 0;
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
            return None;
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

    fn skip(&mut self, n: usize) {
        self.start += n;
        self.stats.skipped_bytes += n as u64;
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
