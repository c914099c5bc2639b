//! One served port: its session state machine, frame decoder, output queue and counters.
//!
//! All I/O goes through [`PortIo`] so the logic is driven in unit tests by a scripted fake that
//! returns chosen poll masks, bytes and errnos; [`Env`] supplies the clock and randomness.
//!
//! # Rooms
//!
//! This file holds what a port *is*: the [`Port`] struct with its state, its constructors and
//! accessors, and the types its API hands out. What a port *does* sits in one file per job, each
//! adding methods to [`Port`] (the layout follows firecracker's vsock `csm/`):
//!
//! - `io.rs`: the traits the logic runs over, [`PortIo`] (the fd) and [`Env`] (clock,
//!   randomness, agent facts), and [`SystemEnv`], the real environment.
//! - `service.rs`: the service loop; [`Port::service`] polls, drains reads within the read
//!   budget and flushes within the write budget.
//! - `transmit.rs`: frames into the output queue ([`crate::outqueue`]) and out of it: sequence
//!   numbers, BYE last, overflows counted, flushing.
//! - `decode_reports.rs`: frames out of the decoder, and ERROR decode for damage and garbage,
//!   within the report rate limit.
//! - `session.rs`: the session life cycle over [`vport_common::PortMachine`]: host presence,
//!   HELLO, HELLO_REQUEST, HELLO_ACK, stale frames, the session's end.
//! - `commands.rs`: one received frame dispatched: PING, ECHO, CLOSE/REOPEN, PROBE, SIGIO,
//!   STATS, EVENTS, and the GUEST_OP hand-off to the event loop.
//! - `streams.rs`: SOURCE, SINK and DATA, seeded pattern streams ([`vport_common::pattern`]).
//! - `acked.rs`: acknowledged streams (STREAM_*), over [`vport_common::stream`] and the stream
//!   directory ([`crate::stream_dir`]).
//! - `counters.rs`: [`Counters`], [`Carry`] (what survives a reopen), the STATS and EVENTS
//!   listings.
//!
//! The rooms import this file (for [`Port`]) and the leaves `io.rs` and `counters.rs`; besides,
//! `service.rs` takes `FlushEnd` from `transmit.rs`. No two import each other: a method one
//! room offers the others is `pub(super)`, and calling it needs no import. The tests sit in
//! `tests/`, one file per room, over the shared fakes in `tests/mod.rs`.
//!
//! # How a port is serviced
//!
//! The event loop calls [`Port::service`] after registering the port and after every readiness
//! event on it. Registration is edge-triggered, so one call does what is possible now, within
//! the port's budgets ([`crate::settings::Limits`]), in this order:
//!
//! 1. `poll(2)` the exact mask: POLLHUP set means no host client is attached. A host that
//!    appeared starts a session (HELLO); a host that went away ends it.
//! 2. Drain reads until EAGAIN or 0, handing complete frames to `Port::handle_frame` as they
//!    arrive while a session is live. `read() == 0` means "no host", not end of file; ENODEV
//!    means unplugged. Reading pauses while the output queue is above [`READ_HIGH_WATER`]
//!    (backpressure to the host; the next writable edge resumes it), stops at the read budget,
//!    and stops for good once a CLOSE was served.
//! 3. `poll(2)` again (the host may have come or gone while reading), then handle frames that
//!    were buffered while no session was live; report the garbage skipped (ERROR decode).
//! 4. Flush the output queue until it is empty, EAGAIN, or the write budget is spent, at most
//!    [`MAX_WRITE`] bytes per call.
//!
//! A call that stopped at a budget returns [`Health::MoreWork`]: the loop calls again after
//! serving the other ports. Frames are queued whole and written in order, so short writes never
//! interleave frames. A running SOURCE is generated lazily between steps 3 and 4: frames are
//! added only while the queue holds less than [`SOURCE_LOW_WATER`], so a long stream never sits
//! in memory.
//!
//! # Safety rules every path keeps
//!
//! - BYE is the last frame of its session: nothing is queued after it.
//! - A HELLO_REQUEST in READY ends the old session's work (streams, unsent output, guest-op
//!   handles) before the new HELLO; a frame already on the wire is finished, never torn.
//! - Decode errors and garbage are reported to the host (ERROR decode), at most
//!   [`crate::settings::Limits::decode_reports_per_sec`] per second.
//!
//! # Commands (all need a READY session and the request's session id; else ERROR bad-state)
//!
//! - CLOSE / REOPEN: BYE is queued and [`Port::close_request`] tells the event loop, which
//!   flushes it (bounded), closes the fd and reopens the port after the delay.
//! - PROBE: one system call through [`PortIo::probe`]; the raw result is returned.
//! - SIGIO: [`PortIo::set_async`]; the loop feeds each signal for this fd to [`Port::on_sigio`].
//! - SOURCE / SINK / DATA: seeded pattern streams ([`vport_common::pattern`]).
//! - STATS / EVENTS: counters ([`Port::stats`]) and the life-cycle ring.
//!
//! A session that ends aborts a running SOURCE or SINK (logged and counted).

mod acked;
mod commands;
mod counters;
mod decode_reports;
mod io;
mod service;
mod session;
mod streams;
mod transmit;

#[cfg(test)]
mod tests;

pub use self::counters::{Carry, Counters};
pub use self::io::{Env, PortIo, ProbeOutcome, SystemEnv};
pub use crate::outqueue::OutQueue;

use crate::history::History;
use crate::ratelimit::ReportLimiter;
use crate::settings::Settings;
use nix::errno::Errno;
use std::rc::Rc;
use thiserror::Error;
use vport_common::frame::DEFAULT_MAX_PAYLOAD;
use vport_common::message::{GuestOp, SigioSample};
use vport_common::pattern::StreamDigest;
use vport_common::{Decoder, MessageType, PortMachine, PortState};

/// The most a virtio-serial write accepts per call (`port_fops_write`).
pub const MAX_WRITE: usize = 32 * 1024;
/// Output queue bound; a frame that would exceed it is dropped and reported.
pub const QUEUE_LIMIT: usize = 8 << 20;
/// Reading pauses while this much output is queued.
pub const READ_HIGH_WATER: usize = 1 << 20;
/// Input kept while no session is live (read before the guest learnt of the host that sent
/// it); reading stops there until a session starts.
pub const HELD_INPUT_LIMIT: usize = 1 << 20;
/// Read buffer size (the kernel hands out at most one page per read).
const READ_BUF: usize = 16 * 1024;
/// The decoder's buffer capacity kept while a port is drained (a frame up to about this size
/// needs no allocation; a larger one's buffer is given back once it is decoded).
const DECODER_KEEP: usize = 64 * 1024;
/// A running SOURCE adds frames only while less than this is queued.
pub const SOURCE_LOW_WATER: usize = 256 * 1024;
/// Largest DATA chunk: the payload limit minus the 8-byte offset.
pub const MAX_CHUNK: usize = DEFAULT_MAX_PAYLOAD as usize - 8;
/// Chunk used when a SOURCE asks for chunk 0: one frame fills one 32 KiB write.
pub const DEFAULT_CHUNK: usize = MAX_WRITE - vport_common::frame::OVERHEAD - 8;
/// SIGIO samples kept per port (the count keeps going).
pub const MAX_SIGIO_SAMPLES: usize = 64;
/// Most bytes a PROBE read takes.
pub const MAX_PROBE_READ: usize = 64 * 1024;
/// EVENTS records sent per reply at most (the ring is smaller anyway).
pub const MAX_EVENT_RECORDS: usize = 1024;

/// What HELLO says about the agent and guest (fixed for the agent's life).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// `CARGO_PKG_VERSION`.
    pub agent_version: String,
    /// `uname -r`.
    pub kernel_release: String,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
}

/// An I/O failure other than the expected ones (EAGAIN, EINTR, ENODEV, read 0).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("port {port}: {op} failed")]
pub struct PortError {
    /// Port name.
    pub port: String,
    /// `read`, `write` or `poll`.
    pub op: &'static str,
    /// The errno.
    #[source]
    pub source: Errno,
}

/// The port after [`Port::service`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Still usable; nothing more to do until the next readiness event.
    Open,
    /// Still usable, and it stopped at its write or read budget
    /// ([`crate::settings::Limits::write_budget`], [`crate::settings::Limits::read_budget`])
    /// with more to do: serve it again soon, without waiting for an event (none will come for
    /// work that did not block).
    MoreWork,
    /// ENODEV: the port was hot-unplugged; close and forget it.
    Unplugged,
}

/// SIGIO observation of one port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SigioState {
    /// Counting.
    pub enabled: bool,
    /// Signals counted since the last enable.
    pub count: u64,
    /// The first [`MAX_SIGIO_SAMPLES`] signals' times and masks.
    pub samples: Vec<SigioSample>,
}

/// A GUEST_OP accepted in a READY session, for the event loop to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOpRequest {
    /// The session it came in (its completion goes back there).
    pub session: u32,
    /// The request frame's sequence number (an ERROR refusing it names it).
    pub seq: u32,
    /// The host's id for the operation.
    pub op_id: u32,
    /// The operation.
    pub op: GuestOp,
}

/// A SOURCE stream in progress (`streams.rs`).
#[derive(Debug, Clone)]
struct SourceJob {
    session: u32,
    seed: u64,
    total: u64,
    chunk: usize,
    offset: u64,
    digest: StreamDigest,
}

/// A SINK stream in progress (`streams.rs`).
#[derive(Debug, Clone)]
struct SinkJob {
    session: u32,
    seed: u64,
    total: u64,
    received: u64,
    first_mismatch: u64,
    digest: StreamDigest,
}

/// The acknowledged streams open on a port (`acked.rs`): at most one each way.
#[derive(Debug, Default)]
pub struct AckedStreams {
    /// The to-guest stream being received.
    incoming: Option<Incoming>,
    /// The to-host stream being sent.
    outgoing: Option<Outgoing>,
    /// The to-guest stream last found complete at its STREAM_OPEN (id, name): its STREAM_END
    /// is judged from the file.
    completed: Option<(u64, String)>,
}

/// A to-guest stream being received into its part file.
#[derive(Debug)]
struct Incoming {
    session: u32,
    receiver: vport_common::stream::Receiver,
    part: crate::stream_dir::PartFile,
    name: String,
}

/// Where a to-host stream's bytes come from.
#[derive(Debug)]
enum OutSource {
    /// A file of the stream directory.
    File { file: std::fs::File, path: std::path::PathBuf },
    /// The pattern of a seed.
    Pattern { seed: u64 },
}

/// A to-host stream being sent.
#[derive(Debug)]
struct Outgoing {
    session: u32,
    sender: vport_common::stream::Sender,
    source: OutSource,
    end_sent: bool,
    /// The digest of bytes `0..digested` as sent, kept while the stream is sent from its start
    /// in order (a resent range is not digested twice); `None` after a gap (a stream resumed
    /// past 0), when STREAM_END's digest is computed over the source again.
    sent_digest: Option<vport_common::pattern::StreamDigest>,
    /// See `sent_digest`.
    digested: u64,
}

/// One served port.
#[derive(Debug)]
pub struct Port<I> {
    name: String,
    dev: String,
    io: I,
    info: Rc<AgentInfo>,
    settings: Rc<Settings>,
    /// The session life cycle (`session.rs`).
    machine: PortMachine,
    /// Received bytes to frames (`decode_reports.rs`).
    decoder: Decoder,
    /// The transmit buffer (`transmit.rs`).
    out: OutQueue,
    /// Sequence number of the next frame sent in the current session.
    seq: u32,
    counters: Counters,
    history: History,
    read_buf: Vec<u8>,
    sigio: SigioState,
    source: Option<SourceJob>,
    sink: Option<SinkJob>,
    acked: AckedStreams,
    /// A CLOSE/REOPEN was served: reopen after this many ms
    /// ([`vport_common::message::NO_REOPEN`]: not at all).
    close_request: Option<u32>,
    /// Why the port closes once `close_request` is set (`close requested`, `reopen requested`).
    close_cause: &'static str,
    /// GUEST_OP requests accepted in a READY session, for the event loop to run.
    guest_ops: Vec<GuestOpRequest>,
    /// Rate limit of the decode-error reports.
    reports: ReportLimiter,
    /// The decoder's `skipped_bytes` already accounted for in a report (or before the session).
    skipped_seen: u64,
    /// A decode error was reported in this service call: the bytes skipped after it are the
    /// rest of the damaged frame, explained by that report.
    damage_reported: bool,
    /// BYE was queued: the session's last frame; nothing more is queued after it.
    bye_queued: bool,
}

impl<I: PortIo> Port<I> {
    /// A port in DISCONNECTED with the default [`Settings`] (guest operations off); call
    /// [`Port::service`] to look at it.
    pub fn new(name: String, dev: String, io: I, info: Rc<AgentInfo>) -> Self {
        Self::with_carry(name, dev, io, info, Rc::new(Settings::default()), Carry::default())
    }

    /// A port in DISCONNECTED under `settings` that continues the counters and ring of an
    /// earlier open.
    pub fn with_carry(
        name: String,
        dev: String,
        io: I,
        info: Rc<AgentInfo>,
        settings: Rc<Settings>,
        carry: Carry,
    ) -> Self {
        let reports = ReportLimiter::new(settings.limits.decode_reports_per_sec, 1_000_000_000);
        Port {
            name,
            dev,
            io,
            info,
            settings,
            machine: PortMachine::new(),
            // A new host client always sends HELLO_REQUEST first: it cuts a frame the previous
            // client left half-sent (`vport_common::decoder`, "Torn frames").
            decoder: Decoder::with_greeting(DEFAULT_MAX_PAYLOAD, MessageType::HelloRequest as u8),
            out: OutQueue::new(QUEUE_LIMIT),
            seq: 0,
            counters: carry.counters,
            history: carry.history,
            read_buf: vec![0; READ_BUF],
            sigio: SigioState::default(),
            source: None,
            sink: None,
            acked: AckedStreams::default(),
            close_request: None,
            close_cause: "close requested",
            guest_ops: Vec::new(),
            reports,
            skipped_seen: 0,
            damage_reported: false,
            bye_queued: false,
        }
    }

    /// What a later reopen of this port continues from.
    pub fn into_carry(self) -> Carry {
        let mut counters = self.counters;
        counters.skipped_bytes_before += self.decoder.stats().skipped_bytes;
        Carry { counters, history: self.history }
    }

    /// Mutable counters, for the facts the event loop observes (opens, EBUSY, flush bound).
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// Set once a CLOSE or REOPEN was served: the delay before reopening in ms
    /// ([`vport_common::message::NO_REOPEN`]: stay closed). Frames are no longer handled once
    /// it is set.
    pub fn close_request(&self) -> Option<u32> {
        self.close_request
    }

    /// Why the port closes (the life-cycle cause and BYE reason of the served CLOSE/REOPEN).
    pub fn close_cause(&self) -> &'static str {
        self.close_cause
    }

    /// SIGIO observation state.
    pub fn sigio(&self) -> &SigioState {
        &self.sigio
    }

    /// The port's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port's node name (`vportNpM`).
    pub fn dev(&self) -> &str {
        &self.dev
    }

    /// The session state.
    pub fn state(&self) -> PortState {
        self.machine.state()
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Decoder counters so far.
    pub fn decoder_stats(&self) -> vport_common::DecoderStats {
        self.decoder.stats()
    }

    /// The life-cycle ring.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// The I/O object.
    pub fn io(&self) -> &I {
        &self.io
    }

    /// The I/O object, to change (a test's or a measurement's in-memory device).
    pub fn io_mut(&mut self) -> &mut I {
        &mut self.io
    }

    /// Whether the port reads input now: not paused at [`READ_HIGH_WATER`] and not closing.
    /// Unread input on a port that does not want it is expected, not a missed wakeup.
    pub fn wants_input(&self) -> bool {
        self.close_request.is_none() && self.out.len() < READ_HIGH_WATER
    }
}
