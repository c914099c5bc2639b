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

    /// Gives the buffer's memory back beyond `keep` bytes of capacity when nothing is buffered
    /// (a large frame grew it): frames and offsets are unaffected. A receiver calls this when
    /// its input is drained, so that one 1 MiB frame does not hold a megabyte for ever.
    pub fn release_spare(&mut self, keep: usize) {
        if self.buffered() == 0 && self.buf.capacity() > keep {
            self.base += self.buf.len() as u64;
            self.buf = Vec::with_capacity(keep);
            self.start = 0;
            self.scan = None;
        }
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
    while let Some(i) = find_byte(&b[from..], MAGIC[0]) {
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

/// Position of the first `needle` in `b`, eight bytes at a time in plain 64-bit arithmetic
/// (the zero-byte test of `word ^ needle * 0x0101..01`). The agent runs this over every payload
/// byte it receives while a frame is pending (the greeting search), in a guest whose
/// instructions may be emulated: there, memchr's SSE2 compares measured 2.5 times slower than
/// this loop (32.3 against 13.2 ms for 32 MiB under QEMU 7.2's TCG).
fn find_byte(b: &[u8], needle: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let pattern = ONES.wrapping_mul(u64::from(needle));
    let mut words = b.chunks_exact(8);
    for (i, w) in (&mut words).enumerate() {
        let x = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) ^ pattern;
        // The lowest set high bit marks the first zero byte of x exactly (borrows only run
        // upwards, from a zero byte); higher ones may be false, and are not looked at.
        let zero = x.wrapping_sub(ONES) & !x & HIGHS;
        if zero != 0 {
            return Some(i * 8 + (zero.trailing_zeros() / 8) as usize);
        }
    }
    let rest = words.remainder();
    rest.iter().position(|&x| x == needle).map(|p| b.len() - rest.len() + p)
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
mod tests;
