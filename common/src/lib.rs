//! vport-common: the pure core of vport.
//!
//! - [`frame`]: the wire protocol v1 frame layout and encoder (`docs/protocol.md`).
//! - [`decoder`]: a streaming decoder that accepts arbitrary chunks and resynchronises on the
//!   next magic after any damage.
//! - [`message`]: the typed messages carried in frames.
//! - [`lifecycle`]: the three-state port life cycle (DISCONNECTED, CONNECTED, READY) with typed
//!   errors for illegal transitions.
//!
//! Nothing here performs I/O or reads a clock: time is passed in as arguments, so every part is
//! unit-tested and fuzzed without a VM.
//!
//! # Example: frames through a damaged stream
//!
//! ```
//! use vport_common::{Decoder, Message};
//!
//! let ping = Message::Ping { time_ns: 42 }.to_frame(7, 0).unwrap().encode().unwrap();
//! let mut stream = b"stale bytes of an earlier session".to_vec();
//! stream.extend_from_slice(&ping);
//!
//! let mut decoder = Decoder::default();
//! // Any chunking works, down to one byte at a time.
//! for chunk in stream.chunks(5) {
//!     decoder.push(chunk);
//! }
//! let frame = decoder.next_frame().unwrap().unwrap();
//! assert_eq!(frame.header.session, 7);
//! assert_eq!(Message::from_frame(&frame).unwrap(), Message::Ping { time_ns: 42 });
//! assert_eq!(decoder.stats().skipped_bytes, 33);
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod checker;
pub mod decoder;
pub mod frame;
pub mod lifecycle;
pub mod message;
pub mod pattern;
pub mod trace;

pub use decoder::{DecodeError, Decoder, DecoderStats};
pub use frame::{Frame, FrameError, Header};
pub use lifecycle::{PortEvent, PortMachine, PortState, Transition, TransitionError};
pub use message::{Message, MessageError, MessageType};
