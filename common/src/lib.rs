//! vport-common: the pure core of vport.
//!
//! - [`frame`]: the wire protocol v1 frame layout and encoder (`docs/protocol.md`).
//! - [`decoder`]: a streaming decoder that accepts arbitrary chunks and resynchronises on the
//!   next magic after any damage.
//! - [`message`]: the typed messages carried in frames.
//! - [`phase`]: the three phases of a port's session (DISCONNECTED, CONNECTED, READY), named
//!   and numbered in one place for the port machine, the wire and the trace.
//! - [`lifecycle`]: the port's life-cycle machine over those phases, with typed errors for
//!   illegal transitions.
//! - [`server`]: the host's session server for one port, as a machine of the same kind.
//! - [`stream`]: acknowledged streams, the sender and receiver machines that carry bytes
//!   through any number of sessions without loss or duplicates.
//! - [`trace`]: the trace format; [`replay`] folds a trace into per-port state, which
//!   [`checker`] judges and `vport watch` renders.
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
pub mod phase;
pub mod replay;
pub mod server;
pub mod stream;
pub mod trace;

pub use decoder::{DecodeError, Decoder, DecoderStats};
pub use frame::{Frame, FrameError, Header};
pub use lifecycle::{PortEvent, PortMachine, PortState, Transition, TransitionError};
pub use message::{Message, MessageError, MessageType};
pub use phase::Phase;
