//! Target `message`: a frame of input-chosen type and payload through [`Message::from_frame`].
//!
//! # Input
//!
//! The first byte is the frame's type byte, the rest its payload.
//!
//! # What is checked
//!
//! - **Parsing is total**: `from_frame` returns `Ok` or a typed error, never panics.
//! - **Unknown types, and only they**, are `UnknownType` with the frame's type byte.
//! - **Errors name the frame's type**, are ones parsing can produce (not the encoder-only
//!   `ListTooLong`/`StringTooLong`), and `TrailingBytes` counts between 1 and the payload length.
//! - **The codec is canonical**: a parsed message re-encodes to exactly the payload it came
//!   from, and its `kind()` is the frame's type.
//! - **Round trip**: `to_frame(session, seq)` carries the message's type, flags 0 and the given
//!   session and seq, and parses back to an equal message; the encoded frame passes through a
//!   [`vport_common::Decoder`] whole and unchanged.

use vport_common::frame::DEFAULT_MAX_PAYLOAD;
use vport_common::{Decoder, Frame, Message, MessageError, MessageType};

// ---- adapter: the message API this target uses ------------------------------------------------

/// Parses a frame into a message.
fn parse(frame: &Frame) -> Result<Message, MessageError> {
    Message::from_frame(frame)
}

/// The message type an error names; `None` for an unknown type byte (that error carries the
/// byte itself) and for a frame-size error (the encoder's only). A new [`MessageError`] variant
/// fails to compile here.
fn error_kind(e: &MessageError) -> Option<MessageType> {
    match *e {
        MessageError::UnknownType(_) | MessageError::Frame(_) => None,
        MessageError::Truncated { kind, .. }
        | MessageError::TrailingBytes { kind, .. }
        | MessageError::InvalidUtf8 { kind, .. }
        | MessageError::InvalidValue { kind, .. }
        | MessageError::ListTooLong { kind, .. }
        | MessageError::StringTooLong { kind, .. } => Some(kind),
    }
}

// ---- end of adapter ----------------------------------------------------------------------------

/// Session and seq of the parsed frame, and the ones its message is re-framed with.
const IN_SESSION: u32 = 0x5eed_0001;
const IN_SEQ: u32 = 7;
const OUT_SESSION: u32 = 0xa5a5_5a5a;
const OUT_SEQ: u32 = u32::MAX;

/// Interprets `data` (type byte, payload) and checks every property in the module documentation.
pub fn run(data: &[u8]) {
    let Some((&kind, payload)) = data.split_first() else { return };
    let frame = Frame::new(kind, IN_SESSION, IN_SEQ, payload.to_vec());
    let known = MessageType::from_u8(kind);
    match parse(&frame) {
        Ok(m) => {
            assert_eq!(known, Some(m.kind()), "type byte {kind:#04x} parsed as {:?}", m.kind());
            // An encode failure of a parsed message is a finding: expect is the assertion.
            let again = m.encode_payload().expect("a parsed message re-encodes");
            assert_eq!(again, payload, "{:?}: not canonical: re-encodes to other bytes", m.kind());
            let f = m.to_frame(OUT_SESSION, OUT_SEQ).expect("a parsed message frames");
            assert_eq!(f.header.kind, kind, "to_frame type byte");
            assert_eq!((f.header.flags, f.header.session, f.header.seq), (0, OUT_SESSION, OUT_SEQ), "to_frame header");
            assert_eq!(f.payload, payload, "to_frame payload");
            assert_eq!(parse(&f).as_ref(), Ok(&m), "round trip through to_frame and from_frame");
            if payload.len() <= DEFAULT_MAX_PAYLOAD as usize {
                let wire = f.encode().expect("a parsed message's frame encodes");
                let mut d = Decoder::default();
                d.push(&wire);
                assert_eq!(d.next_frame(), Some(Ok(f)), "the frame through a decoder");
                assert_eq!(d.next_frame(), None);
                assert_eq!(d.buffered(), 0);
            }
        }
        Err(MessageError::UnknownType(b)) => {
            assert_eq!(b, kind, "UnknownType names another byte");
            assert_eq!(known, None, "type {kind:#04x} is known but reported unknown");
        }
        Err(e) => {
            assert!(known.is_some(), "unknown type {kind:#04x} reported as {e:?}");
            assert_eq!(error_kind(&e), known, "{e:?} names another type than {kind:#04x}");
            match e {
                MessageError::TrailingBytes { extra, .. } => {
                    assert!(extra >= 1 && extra <= payload.len(), "{e:?} with a {}-byte payload", payload.len())
                }
                MessageError::ListTooLong { .. } | MessageError::StringTooLong { .. } | MessageError::Frame(_) => {
                    panic!("parsing reported an encoder-only error: {e:?}")
                }
                _ => {}
            }
            // The error's text is what the agent sends in ERROR: formatting must not panic.
            let _ = e.to_string();
        }
    }
}

/// A seed in this target's input format for `frame` (its session and seq are not part of it).
pub fn seed(frame: &Frame) -> Vec<u8> {
    let mut out = vec![frame.header.kind];
    out.extend_from_slice(&frame.payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_unknown_and_malformed() {
        let ping = Message::Ping { time_ns: 5 }.to_frame(1, 1).unwrap();
        run(&seed(&ping));
        run(&[0x55, 1, 2]);
        run(&[0x10, 1, 2]);
        run(&[0x10, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        run(&[]);
    }
}
