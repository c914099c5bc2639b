//! The decoder target's *builder script*: a stream made of frames with valid CRCs, damaged,
//! torn, other-version and big-length frames, greetings and garbage, with a record of where
//! the builder put the greetings and the valid frames right after them.

use crate::input::Input;
use vport_common::frame::{HEADER_LEN, MAGIC, VERSION};
use vport_common::Frame;

/// Largest stream a builder script may produce.
pub const STREAM_CAP: usize = 256 * 1024;

/// The greeting type the target's greeting mode uses (HELLO_REQUEST, as the agent does).
pub const GREETING: u8 = 0x03;

/// A stream built from a script, and what the builder knows about it.
#[derive(Debug, Default)]
pub struct Built {
    /// The stream.
    pub bytes: Vec<u8>,
    /// Every greeting op, in order.
    pub greetings: Vec<GreetingRun>,
}

/// A greeting the builder emitted, and the valid frames it emitted right after it (nothing
/// between them), each by stream offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreetingRun {
    /// Offset of the greeting.
    pub at: usize,
    /// The op before it left a frame torn (a cut frame, or a header alone with its length).
    pub after_torn: bool,
    /// Offsets of the valid frames (and greetings) that follow it back to back.
    pub frames_after: Vec<usize>,
}

/// A frame from the script: kind, session and seq from one byte each, payload length, payload.
fn script_frame(input: &mut Input) -> Vec<u8> {
    let kind = input.u8();
    let session = u32::from(input.u8());
    let seq = u32::from(input.u8());
    let len = usize::from(input.u8());
    let mut payload = input.bytes(len).to_vec();
    payload.resize(len, 0);
    // A 255-byte payload can never exceed the format's maximum: expect cannot fail.
    Frame::new(kind, session, seq, payload).encode().expect("small frame encodes")
}

/// A greeting: a frame of type [`GREETING`] with an empty payload (session and seq from the
/// script: the decoder's greeting test ignores them).
pub fn greeting(session: u32, seq: u32) -> Vec<u8> {
    // An empty payload is within the format: expect cannot fail.
    Frame::new(GREETING, session, seq, Vec::new()).encode().expect("a greeting encodes")
}

/// Builds a stream from a script of operations (one byte each, then its arguments):
///
/// | op % 9 | appends |
/// |---|---|
/// | 0 | raw bytes: length byte, bytes |
/// | 1 | a valid frame ([`script_frame`]) |
/// | 2 | a damaged frame: a frame, then position (u16) and xor mask (u8) of one damaged byte |
/// | 3 | a torn frame: a frame cut at a position (u16) |
/// | 4 | a frame of another version (byte), both CRCs valid |
/// | 5 | a valid header claiming a length (u32) and nothing after it |
/// | 6 | the magic alone |
/// | 7 | a valid frame with a large payload: length u16, filled with a counter |
/// | 8 | a greeting ([`GREETING`], empty payload): session byte, seq byte |
pub fn build_stream(input: &mut Input) -> Built {
    let mut b = Built::default();
    // Whether the last op left a frame torn, and whether the current greeting run continues.
    let (mut torn, mut run_open) = (false, false);
    while !input.is_empty() && b.bytes.len() < STREAM_CAP {
        let out = &mut b.bytes;
        let at = out.len();
        let op = input.u8() % 9;
        match op {
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
                // An empty payload is within the format: expect cannot fail.
                let mut h = Frame::new(input.u8(), 0, 0, Vec::new()).encode().expect("empty frame encodes");
                h.truncate(HEADER_LEN);
                h[16..20].copy_from_slice(&input.u32().to_le_bytes());
                let hcrc = crc32fast::hash(&h[..20]);
                h[20..24].copy_from_slice(&hcrc.to_le_bytes());
                out.extend(h);
            }
            6 => out.extend_from_slice(&MAGIC),
            7 => {
                let kind = input.u8();
                let len = usize::from(input.u16());
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                // At most 64 KiB of payload, within the format: expect cannot fail.
                out.extend(Frame::new(kind, 1, 1, payload).encode().expect("64 KiB frame encodes"));
            }
            _ => {
                let (session, seq) = (u32::from(input.u8()), u32::from(input.u8()));
                out.extend(greeting(session, seq));
            }
        }
        // Valid frames continue the current greeting run; anything else ends it.
        let valid_frame = matches!(op, 1 | 7 | 8);
        if run_open && valid_frame {
            if let Some(r) = b.greetings.last_mut() {
                r.frames_after.push(at);
            }
        } else {
            run_open = false;
        }
        if op == 8 {
            b.greetings.push(GreetingRun { at, after_torn: torn, frames_after: Vec::new() });
            run_open = true;
        }
        torn = match op {
            3 => true,
            5 => true,
            // An empty raw run changes nothing.
            0 => torn && b.bytes.len() == at,
            _ => false,
        };
    }
    b
}
