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
