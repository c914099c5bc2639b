//! Wire protocol v1: frame layout and encoding.
//!
//! Every frame is a fixed 24-byte header, a payload, and a 4-byte trailer, all integers
//! little-endian:
//!
//! | offset | size | field        | meaning                                                     |
//! |-------:|-----:|--------------|-------------------------------------------------------------|
//! | 0      | 4    | magic        | `F5 56 50 52` ([`MAGIC`])                                   |
//! | 4      | 1    | version      | [`VERSION`] (1)                                              |
//! | 5      | 1    | type         | message type ([`crate::message::MessageType`])              |
//! | 6      | 2    | flags        | reserved in v1: sent as 0, ignored on receipt               |
//! | 8      | 4    | session      | session id chosen by the agent at HELLO; 0 = no session     |
//! | 12     | 4    | seq          | sender's sequence number within the session                 |
//! | 16     | 4    | length       | payload length in bytes                                     |
//! | 20     | 4    | header CRC   | CRC-32 (IEEE) of bytes 0..20                                |
//! | 24     | len  | payload      | message body                                                |
//! | 24+len | 4    | frame CRC    | CRC-32 (IEEE) of bytes 0..24+len (header and payload)       |
//!
//! The header CRC lets a receiver reject a false magic found inside garbage after 24 bytes,
//! without trusting its length field: a corrupted length can never make the decoder wait for
//! bytes that will not come.

use thiserror::Error;

/// The four bytes every frame starts with. The first byte is not ASCII, so text on a console
/// port never looks like the start of a frame.
pub const MAGIC: [u8; 4] = [0xF5, 0x56, 0x50, 0x52];
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header, header CRC included.
pub const HEADER_LEN: usize = 24;
/// Size of the trailing frame CRC.
pub const TRAILER_LEN: usize = 4;
/// Bytes a frame adds around its payload.
pub const OVERHEAD: usize = HEADER_LEN + TRAILER_LEN;
/// The largest payload the format allows; a decoder may enforce a smaller limit.
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// The payload limit decoders use unless told otherwise.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1024 * 1024;

/// The fixed fields of a frame, without magic, version, length and checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Message type byte (see [`crate::message::MessageType`]); unknown types still decode as
    /// frames so a receiver can answer them with an error.
    pub kind: u8,
    /// Reserved flags; 0 in v1.
    pub flags: u16,
    /// Session id; 0 outside a session.
    pub session: u32,
    /// Sender's sequence number.
    pub seq: u32,
}

/// One frame: header fields and payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    /// Header fields.
    pub header: Header,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// Why a frame could not be encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The payload is larger than the format allows.
    #[error("payload of {len} bytes exceeds the protocol maximum of {max} bytes")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// [`MAX_PAYLOAD`].
        max: u32,
    },
}

impl Frame {
    /// A frame with the given header fields and payload.
    pub fn new(kind: u8, session: u32, seq: u32, payload: Vec<u8>) -> Self {
        Frame { header: Header { kind, flags: 0, session, seq }, payload }
    }

    /// Bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        OVERHEAD + self.payload.len()
    }

    /// Appends the wire form of this frame to `out`; on error nothing is appended.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        out.reserve(self.wire_len());
        let start = begin_frame(out, &self.header);
        out.extend_from_slice(&self.payload);
        seal_frame(out, start)
    }

    /// The wire form of this frame.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(self.wire_len());
        self.encode_into(&mut out)?;
        Ok(out)
    }
}

/// Starts a frame at the end of `out`: appends its header with the length and header CRC
/// still zero, and returns where the frame starts. The caller appends the payload, then
/// [`seal_frame`] completes the frame. Encoding a payload in place this way copies its bytes
/// once, straight into the output.
pub fn begin_frame(out: &mut Vec<u8>, header: &Header) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(header.kind);
    out.extend_from_slice(&header.flags.to_le_bytes());
    out.extend_from_slice(&header.session.to_le_bytes());
    out.extend_from_slice(&header.seq.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    start
}

/// Completes the frame [`begin_frame`] started at `start`: everything after its header is the
/// payload. Writes the length and the header CRC, and appends the frame CRC. A payload over
/// [`MAX_PAYLOAD`] is an error, and then the frame is removed from `out` (truncated to
/// `start`): a partial frame is never left behind.
pub fn seal_frame(out: &mut Vec<u8>, start: usize) -> Result<(), FrameError> {
    let payload = out.len().saturating_sub(start + HEADER_LEN);
    let Some(len) = u32::try_from(payload).ok().filter(|&l| l <= MAX_PAYLOAD) else {
        out.truncate(start);
        return Err(FrameError::PayloadTooLarge { len: payload, max: MAX_PAYLOAD });
    };
    out[start + 16..start + 20].copy_from_slice(&len.to_le_bytes());
    let hcrc = crc32fast::hash(&out[start..start + 20]);
    out[start + 20..start + HEADER_LEN].copy_from_slice(&hcrc.to_le_bytes());
    let fcrc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&fcrc.to_le_bytes());
    Ok(())
}

/// Reads a little-endian u16 at `at`; the caller guarantees the bounds.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Reads a little-endian u32 at `at`; the caller guarantees the bounds.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_documented_offsets() {
        let f = Frame::new(0x10, 0x0102_0304, 7, vec![0xAA, 0xBB]);
        let w = f.encode().unwrap();
        assert_eq!(w.len(), 24 + 2 + 4);
        assert_eq!(&w[0..4], &MAGIC);
        assert_eq!(w[4], 1);
        assert_eq!(w[5], 0x10);
        assert_eq!(le16(&w, 6), 0);
        assert_eq!(le32(&w, 8), 0x0102_0304);
        assert_eq!(le32(&w, 12), 7);
        assert_eq!(le32(&w, 16), 2);
        assert_eq!(le32(&w, 20), crc32fast::hash(&w[0..20]));
        assert_eq!(&w[24..26], &[0xAA, 0xBB]);
        assert_eq!(le32(&w, 26), crc32fast::hash(&w[0..26]));
    }

    #[test]
    fn refuses_payload_over_the_protocol_maximum() {
        let f = Frame::new(1, 0, 0, vec![0; MAX_PAYLOAD as usize + 1]);
        assert_eq!(f.encode(), Err(FrameError::PayloadTooLarge { len: MAX_PAYLOAD as usize + 1, max: MAX_PAYLOAD }));
    }

    #[test]
    fn a_refused_frame_leaves_what_was_queued_before_it_untouched() {
        let mut out = b"queued".to_vec();
        let f = Frame::new(0x10, 1, 2, vec![0; MAX_PAYLOAD as usize + 1]);
        assert!(f.encode_into(&mut out).is_err());
        assert_eq!(out, b"queued");
        let ok = Frame::new(0x10, 1, 3, vec![7; 5]);
        ok.encode_into(&mut out).unwrap();
        assert_eq!(&out[..6], b"queued");
        assert_eq!(&out[6..], &ok.encode().unwrap()[..]);
    }
}
