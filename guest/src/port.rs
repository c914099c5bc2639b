//! One served port: its session state machine, frame decoder, output queue and counters.
//!
//! All I/O goes through [`PortIo`] so the logic is driven in unit tests by a scripted fake that
//! returns chosen poll masks, bytes and errnos; [`Env`] supplies the clock and randomness.
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

use crate::history::{History, DEFAULT_CAPACITY};
pub use crate::outqueue::OutQueue;
use crate::ratelimit::ReportLimiter;
use crate::settings::Settings;
use nix::errno::Errno;
use nix::poll::PollFlags;
use std::rc::Rc;
use thiserror::Error;
use vport_common::frame::DEFAULT_MAX_PAYLOAD;
use vport_common::message::error_code;
use vport_common::message::{
    EventRecord, GuestOp, GuestOpDone, ProbeKind, ProbeTarget, SigioAction, SigioSample, StateCode, NO_MISMATCH,
    NO_REOPEN,
};
use vport_common::pattern::{self, StreamDigest};
use vport_common::{
    DecodeError, Decoder, Frame, Header, Message, MessageError, MessageType, PortEvent, PortMachine, PortState,
};

/// The most a virtio-serial write accepts per call (`port_fops_write`).
pub const MAX_WRITE: usize = 32 * 1024;
/// Output queue bound; a frame that would exceed it is dropped and reported.
pub const QUEUE_LIMIT: usize = 8 << 20;
/// Reading pauses while this much output is queued.
pub const READ_HIGH_WATER: usize = 1 << 20;
/// Read buffer size (the kernel hands out at most one page per read).
const READ_BUF: usize = 16 * 1024;
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

/// The three operations the port logic needs from a port's fd.
pub trait PortIo {
    /// `read(2)`.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno>;
    /// `write(2)`.
    fn write(&mut self, buf: &[u8]) -> Result<usize, Errno>;
    /// The current `poll(2)` mask (timeout 0).
    fn poll_mask(&mut self) -> Result<PollFlags, Errno>;
    /// Runs one PROBE system call (see [`ProbeKind`] and [`ProbeTarget`]) and reports its raw
    /// result; never fails: an errno is part of the result.
    fn probe(&mut self, kind: ProbeKind, target: ProbeTarget, arg: u32) -> ProbeOutcome;
    /// Starts (`F_SETOWN` + `F_SETSIG` + `O_ASYNC`) or stops (clears `O_ASYNC`) SIGIO delivery
    /// for the fd.
    fn set_async(&mut self, on: bool) -> Result<(), Errno>;
}

/// The raw result of a PROBE system call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeOutcome {
    /// The call's return value (-1 on failure).
    pub ret: i64,
    /// errno when `ret == -1`, else 0.
    pub errno: i32,
    /// `revents` for a poll probe, else 0.
    pub mask: u16,
    /// Bytes a read probe returned.
    pub data: Vec<u8>,
}

impl ProbeOutcome {
    /// A failed call.
    pub fn failed(errno: Errno) -> Self {
        ProbeOutcome { ret: -1, errno: errno as i32, ..Default::default() }
    }
}

/// Clock, randomness and the agent-wide facts a port reports.
pub trait Env {
    /// Monotonic nanoseconds.
    fn now_ns(&mut self) -> u64;
    /// A random u64.
    fn random_u64(&mut self) -> u64;
    /// The agent's wakeup counter (returns from `epoll_wait`).
    fn wakeups(&mut self) -> u64;
    /// The agent's CPU time (user + system), nanoseconds.
    fn cpu_ns(&mut self) -> u64;
    /// Agent-wide STATS entries (see [`Port::stats`] for the names).
    fn agent_stats(&mut self) -> Vec<(&'static str, u64)>;
}

/// The real clock and random source, and the agent-wide counters the event loop keeps.
#[derive(Debug, Clone, Copy)]
pub struct SystemEnv {
    /// Returns from `epoll_wait` (the loop increments it).
    pub wakeups: u64,
    /// EBUSY results of opening any port.
    pub ebusy_total: u64,
    /// Ports currently open.
    pub ports_open: u64,
    /// Plain SIGIO signals received: the real-time signal queue overflowed.
    pub sigio_overflows: u64,
    /// Open ports found with data pending that epoll had not reported (see the event loop).
    pub missed_wakeups: u64,
    /// Whether GUEST_OP requests are served (`--allow-guest-ops`).
    pub guest_ops_allowed: bool,
    /// Monotonic time the agent started.
    pub started_ns: u64,
}

impl SystemEnv {
    /// Counters at zero, started now.
    pub fn new() -> Self {
        SystemEnv {
            wakeups: 0,
            ebusy_total: 0,
            ports_open: 0,
            sigio_overflows: 0,
            missed_wakeups: 0,
            guest_ops_allowed: false,
            started_ns: crate::sys::monotonic_ns(),
        }
    }
}

impl Default for SystemEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Env for SystemEnv {
    fn now_ns(&mut self) -> u64 {
        crate::sys::monotonic_ns()
    }
    fn random_u64(&mut self) -> u64 {
        crate::sys::random_u64()
    }
    fn wakeups(&mut self) -> u64 {
        self.wakeups
    }
    fn cpu_ns(&mut self) -> u64 {
        crate::sys::cpu_ns()
    }
    fn agent_stats(&mut self) -> Vec<(&'static str, u64)> {
        vec![
            ("wakeups", self.wakeups),
            ("ebusy_total", self.ebusy_total),
            ("rss_kib", crate::sys::rss_kib()),
            ("uptime_ns", crate::sys::monotonic_ns().saturating_sub(self.started_ns)),
            ("cpu_ns", crate::sys::cpu_ns()),
            ("ports_open", self.ports_open),
            ("pid", u64::from(std::process::id())),
            ("sigio_overflows", self.sigio_overflows),
            ("missed_wakeups", self.missed_wakeups),
            ("euid", u64::from(nix::unistd::geteuid().as_raw())),
            ("egid", u64::from(nix::unistd::getegid().as_raw())),
            ("guest_ops_allowed", u64::from(self.guest_ops_allowed)),
        ]
    }
}

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

/// Running counters of one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read from the port.
    pub bytes_in: u64,
    /// Bytes written to the port.
    pub bytes_out: u64,
    /// Valid frames received.
    pub frames_in: u64,
    /// Frames queued for sending.
    pub frames_out: u64,
    /// Sessions started (HELLO sent).
    pub sessions: u64,
    /// HELLOs repeated because a HELLO_REQUEST came while the offer was pending.
    pub hello_repeats: u64,
    /// Decoder errors (damaged or foreign bytes).
    pub decode_errors: u64,
    /// Frames of a session that is neither 0 nor the current one.
    pub stale_frames: u64,
    /// Events the state machine refused.
    pub illegal_transitions: u64,
    /// ERROR frames sent.
    pub errors_sent: u64,
    /// ERROR frames received from the host.
    pub errors_received: u64,
    /// Queued bytes thrown away because the session ended or the port closed.
    pub dropped_bytes: u64,
    /// Frames refused because the output queue was full.
    pub queue_overflows: u64,
    /// Write calls that accepted fewer bytes than offered.
    pub short_writes: u64,
    /// EBUSY results of opening this port (another process held it).
    pub ebusy: u64,
    /// Successful opens of this port.
    pub opens: u64,
    /// Closes of this port (command, unplug, error, exit).
    pub closes: u64,
    /// SOURCE or SINK streams aborted because their session ended.
    pub stream_aborts: u64,
    /// BYE frames not fully written within the flush bound before a close.
    pub bye_flush_timeouts: u64,
    /// SIGIO signals counted for this port while observation was enabled.
    pub sigio_signals: u64,
    /// Torn frames cut at a new client's HELLO_REQUEST (also in `decode_errors`).
    pub torn_frames: u64,
    /// ERROR decode reports sent to the host (rate-limited; the rest are only counted).
    pub decode_reports: u64,
    /// ERROR decode reports held back by the rate limit.
    pub decode_reports_held_back: u64,
    /// Bytes the decoder skipped outside valid frames on earlier opens of this port (the
    /// current open's are in its decoder).
    pub skipped_bytes_before: u64,
    /// Requests refused by a limit or the policy (ERROR limit or denied).
    pub refusals: u64,
    /// Frames not queued because the session's BYE was already queued (late replies).
    pub after_bye_dropped: u64,
}

/// What survives a close and reopen of a port (and an unplug and replug of the same name):
/// the counters and the life-cycle ring.
#[derive(Debug, Clone)]
pub struct Carry {
    /// Counters so far.
    pub counters: Counters,
    /// The ring so far.
    pub history: History,
}

impl Default for Carry {
    fn default() -> Self {
        Carry { counters: Counters::default(), history: History::new(DEFAULT_CAPACITY) }
    }
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

/// A SOURCE stream in progress.
#[derive(Debug, Clone)]
struct SourceJob {
    session: u32,
    seed: u64,
    total: u64,
    chunk: usize,
    offset: u64,
    digest: StreamDigest,
}

/// A SINK stream in progress.
#[derive(Debug, Clone)]
struct SinkJob {
    session: u32,
    seed: u64,
    total: u64,
    received: u64,
    first_mismatch: u64,
    digest: StreamDigest,
}

/// How a read drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// EAGAIN: host attached, nothing more to read.
    WouldBlock,
    /// read returned 0: no host client.
    NoHost,
    /// Stopped because the output queue is above the high-water mark.
    Throttled,
    /// Stopped at the read budget with input maybe left.
    Budget,
    /// Not read: a CLOSE or REOPEN was served, the port closes once its BYE is out.
    Closing,
    /// ENODEV.
    Unplugged,
}

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushEnd {
    /// Queue empty.
    Done,
    /// EAGAIN with bytes left: wait for the next writable edge.
    Pending,
    /// The write budget ran out with bytes left and no EAGAIN seen.
    Budget,
    /// ENODEV.
    Unplugged,
}

/// One served port.
#[derive(Debug)]
pub struct Port<I> {
    name: String,
    dev: String,
    io: I,
    info: Rc<AgentInfo>,
    settings: Rc<Settings>,
    machine: PortMachine,
    decoder: Decoder,
    out: OutQueue,
    /// Sequence number of the next frame sent in the current session.
    seq: u32,
    counters: Counters,
    history: History,
    read_buf: Vec<u8>,
    sigio: SigioState,
    source: Option<SourceJob>,
    sink: Option<SinkJob>,
    /// A CLOSE/REOPEN was served: reopen after this many ms ([`NO_REOPEN`]: not at all).
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
    /// ([`NO_REOPEN`]: stay closed). Frames are no longer handled once it is set.
    pub fn close_request(&self) -> Option<u32> {
        self.close_request
    }

    /// Why the port closes (the life-cycle cause and BYE reason of the served CLOSE/REOPEN).
    pub fn close_cause(&self) -> &'static str {
        self.close_cause
    }

    /// The GUEST_OP requests accepted since the last call. The event loop runs them
    /// ([`crate::guest_ops`]) and answers with [`Port::send_guest_op_done`] or
    /// [`Port::refuse_guest_op`].
    pub fn take_guest_ops(&mut self) -> Vec<GuestOpRequest> {
        std::mem::take(&mut self.guest_ops)
    }

    /// Answers `request` with ERROR `code` (limit or denied) in its session, if that is still
    /// the READY session; returns whether it was queued.
    pub fn refuse_guest_op(&mut self, request: &GuestOpRequest, code: u16, text: String) -> bool {
        if !self.session_is_ready(request.session) {
            log::info!("port {}: refusal of guest op {} after its session ended; dropped", self.name, request.op_id);
            return false;
        }
        log::info!("port {}: guest op {} refused: {text}", self.name, request.op_id);
        self.counters.refusals += 1;
        let header = Header { kind: MessageType::GuestOp as u8, flags: 0, session: request.session, seq: request.seq };
        self.reply_error(&header, request.session, code, text);
        true
    }

    /// Whether `session` is the port's READY session (guest-op handles live as long as it).
    pub fn session_is_ready(&self, session: u32) -> bool {
        matches!(self.machine.state(), PortState::Ready { session: s, .. } if s == session)
    }

    /// Queues GUEST_OP_DONE in `session` if that is still the READY session; returns whether
    /// it was queued (a completion for an ended session is dropped and logged).
    pub fn send_guest_op_done(&mut self, session: u32, done: GuestOpDone) -> bool {
        if !self.session_is_ready(session) {
            log::info!(
                "port {}: guest op {} finished after its session {session:#010x} ended; dropped",
                self.name,
                done.op_id
            );
            return false;
        }
        self.send(&Message::GuestOpDone(done), session)
    }

    /// SIGIO observation state.
    pub fn sigio(&self) -> &SigioState {
        &self.sigio
    }

    /// One SIGIO for this port's fd arrived: counted, and its poll mask sampled, while
    /// observation is enabled.
    pub fn on_sigio(&mut self, env: &mut impl Env) {
        if !self.sigio.enabled {
            return;
        }
        self.sigio.count += 1;
        self.counters.sigio_signals += 1;
        if self.sigio.samples.len() < MAX_SIGIO_SAMPLES {
            let mask = self.io.poll_mask().map(|m| m.bits() as u16).unwrap_or(0);
            self.sigio.samples.push(SigioSample { time_ns: env.now_ns(), mask });
        }
    }

    /// Queues BYE in the live session, if any (agent shutdown). Returns whether one was queued.
    pub fn say_bye(&mut self, reopen_after_ms: u32, reason: &str) -> bool {
        match self.machine.state().session() {
            Some(session) => self.send(&Message::Bye { reopen_after_ms, reason: reason.to_owned() }, session),
            None => false,
        }
    }

    /// Writes queued output until the queue is empty or the port would block. Returns true
    /// when nothing is left to write (or the port is gone).
    pub fn flush_out(&mut self) -> Result<bool, PortError> {
        let mut unlimited = usize::MAX;
        Ok(match self.flush(&mut unlimited)? {
            FlushEnd::Done | FlushEnd::Unplugged => true,
            FlushEnd::Pending | FlushEnd::Budget => false,
        })
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

    /// Does everything that can be done now, writing at most the write budget; see the module
    /// documentation.
    pub fn service(&mut self, env: &mut impl Env) -> Result<Health, PortError> {
        let mut budget = self.settings.limits.write_budget;
        let mut read_budget = self.settings.limits.read_budget;
        loop {
            let mask = self.poll_mask()?;
            self.apply_mask(mask, env);
            let end = self.drain_reads(&mut read_budget, env)?;
            match end {
                ReadEnd::Unplugged => return Ok(Health::Unplugged),
                ReadEnd::NoHost => self.host_gone(env, "read returned 0"),
                ReadEnd::WouldBlock | ReadEnd::Throttled | ReadEnd::Budget | ReadEnd::Closing => {}
            }
            let mask = self.poll_mask()?;
            self.apply_mask(mask, env);
            self.process_frames(env);
            self.report_skipped(env);
            self.damage_reported = false;
            let flushed = loop {
                self.pump_source();
                let f = self.flush(&mut budget)?;
                if f != FlushEnd::Done || self.source.is_none() {
                    break f;
                }
                if budget == 0 {
                    break FlushEnd::Budget;
                }
            };
            match flushed {
                FlushEnd::Unplugged => return Ok(Health::Unplugged),
                FlushEnd::Budget => return Ok(Health::MoreWork),
                FlushEnd::Done | FlushEnd::Pending if end == ReadEnd::Budget => return Ok(Health::MoreWork),
                FlushEnd::Done | FlushEnd::Pending if end == ReadEnd::Throttled && budget == 0 => {
                    return Ok(Health::MoreWork)
                }
                FlushEnd::Done if end == ReadEnd::Throttled => continue,
                FlushEnd::Pending if end == ReadEnd::Throttled && self.out.len() < READ_HIGH_WATER => continue,
                FlushEnd::Done | FlushEnd::Pending => return Ok(Health::Open),
            }
        }
    }

    /// The port is being closed (unplug, agent exit): the session ends.
    pub fn close(&mut self, env: &mut impl Env, cause: &'static str) {
        if self.machine.state() != PortState::Disconnected {
            let _ = self.step(PortEvent::Closed, cause, env);
        }
        self.end_session_buffers();
    }

    /// True when the mask is exactly what an unplugged port reports (POLLHUP only).
    pub fn looks_unplugged(&mut self) -> Result<bool, PortError> {
        let mask = self.poll_mask()?;
        Ok(mask.contains(PollFlags::POLLHUP) && !mask.intersects(PollFlags::POLLIN | PollFlags::POLLOUT))
    }

    /// The port's current `poll(2)` revents (POLLIN|POLLOUT asked), `None` if poll failed.
    pub fn peek_mask(&mut self) -> Option<PollFlags> {
        self.poll_mask().ok()
    }

    /// Whether the port reads input now: not paused at [`READ_HIGH_WATER`] and not closing.
    /// Unread input on a port that does not want it is expected, not a missed wakeup.
    pub fn wants_input(&self) -> bool {
        self.close_request.is_none() && self.out.len() < READ_HIGH_WATER
    }

    fn poll_mask(&mut self) -> Result<PollFlags, PortError> {
        self.io.poll_mask().map_err(|source| PortError { port: self.name.clone(), op: "poll", source })
    }

    /// Reconciles the state machine with host presence as `poll` reports it.
    fn apply_mask(&mut self, mask: PollFlags, env: &mut impl Env) {
        // POLLHUP alone is what an unplugged port reports: leave that verdict to read/write
        // (ENODEV), so the history says "closed: unplugged" rather than "host disconnected".
        if mask.contains(PollFlags::POLLHUP) && !mask.intersects(PollFlags::POLLIN | PollFlags::POLLOUT) {
            return;
        }
        let host = !mask.contains(PollFlags::POLLHUP);
        match (self.machine.state(), host) {
            (PortState::Disconnected, true) => self.start_session(false, env),
            (PortState::Connected { .. } | PortState::Ready { .. }, false) => self.host_gone(env, "poll: POLLHUP"),
            _ => {}
        }
    }

    /// Reads until EAGAIN, 0 or an error, handing frames over as they complete; stops early
    /// at the output high-water mark, when `budget` bytes were read (decreased by what was
    /// read), or once a CLOSE was served.
    fn drain_reads(&mut self, budget: &mut usize, env: &mut impl Env) -> Result<ReadEnd, PortError> {
        loop {
            if self.close_request.is_some() {
                return Ok(ReadEnd::Closing);
            }
            if self.out.len() >= READ_HIGH_WATER {
                return Ok(ReadEnd::Throttled);
            }
            if *budget == 0 {
                return Ok(ReadEnd::Budget);
            }
            match self.io.read(&mut self.read_buf) {
                Ok(0) => return Ok(ReadEnd::NoHost),
                Ok(n) => {
                    *budget = budget.saturating_sub(n);
                    log::trace!("port {}: read {n} bytes", self.name);
                    self.counters.bytes_in += n as u64;
                    self.decoder.push(&self.read_buf[..n]);
                    self.process_frames(env);
                }
                Err(Errno::EAGAIN) => {
                    log::trace!("port {}: read: EAGAIN", self.name);
                    return Ok(ReadEnd::WouldBlock);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::ENODEV) => return Ok(ReadEnd::Unplugged),
                Err(source) => return Err(PortError { port: self.name.clone(), op: "read", source }),
            }
        }
    }

    /// Writes queued output until the queue is empty, the port would block, or `budget` bytes
    /// were written (the budget is decreased by what was written).
    fn flush(&mut self, budget: &mut usize) -> Result<FlushEnd, PortError> {
        while !self.out.is_empty() {
            if *budget == 0 {
                return Ok(FlushEnd::Budget);
            }
            let chunk = self.out.front(MAX_WRITE.min(*budget));
            let offered = chunk.len();
            match self.io.write(chunk) {
                // A zero-byte write of a non-empty buffer would otherwise spin; wait for an edge.
                Ok(0) => return Ok(FlushEnd::Pending),
                Ok(n) => {
                    log::trace!("port {}: wrote {n} of {offered} bytes", self.name);
                    if n < offered {
                        self.counters.short_writes += 1;
                    }
                    self.out.consume(n);
                    self.counters.bytes_out += n as u64;
                    *budget = budget.saturating_sub(n);
                }
                Err(Errno::EAGAIN) => return Ok(FlushEnd::Pending),
                Err(Errno::EINTR) => {}
                Err(Errno::ENODEV) => return Ok(FlushEnd::Unplugged),
                Err(source) => return Err(PortError { port: self.name.clone(), op: "write", source }),
            }
        }
        Ok(FlushEnd::Done)
    }

    /// Handles complete frames while a session is live. Frames that arrive with no session are
    /// kept until the next poll tells whether a host is attached. Decode errors, and bytes
    /// skipped outside any frame, are reported to the host (ERROR decode, rate-limited).
    ///
    /// A torn frame is reported after the HELLO_REQUEST that cut it has been handled, so the
    /// report goes to the new session (the old one's output is dropped at that point).
    fn process_frames(&mut self, env: &mut impl Env) {
        let mut torn: Option<String> = None;
        while self.machine.state().session().is_some() && self.close_request.is_none() {
            match self.decoder.next_frame() {
                None => break,
                Some(Ok(frame)) => {
                    // Garbage before a frame is reported before the frame's own answer.
                    self.report_skipped(env);
                    self.damage_reported = false;
                    self.handle_frame(frame, env);
                    if let Some(text) = torn.take() {
                        self.report_decode(&text, env);
                    }
                }
                Some(Err(e)) => {
                    self.counters.decode_errors += 1;
                    log::debug!("port {}: {e}", self.name);
                    // Garbage before the damaged frame is reported first; the bytes of the
                    // frame itself (skipped from its magic on) are the error's.
                    // (After an earlier error in this turn, the bytes between are its frame's.)
                    let stats = self.decoder.stats();
                    let damage = stats.last_skip_end.saturating_sub(e.offset());
                    if !self.damage_reported {
                        self.report_garbage(stats.skipped_bytes.saturating_sub(damage), e.offset(), env);
                    }
                    self.skipped_seen = stats.skipped_bytes;
                    if matches!(e, DecodeError::Torn { .. }) {
                        self.counters.torn_frames += 1;
                        torn = Some(e.to_string());
                    } else {
                        self.report_decode(&e.to_string(), env);
                    }
                    // The rejected frame's bytes are skipped from here on: this error explains them.
                    self.damage_reported = true;
                }
            }
        }
        if let Some(text) = torn {
            self.report_decode(&text, env);
        }
    }

    /// Reports the bytes the decoder skipped outside any frame since the last look (and that
    /// no decode error explained) as one ERROR decode: a burst of garbage gets one report.
    fn report_skipped(&mut self, env: &mut impl Env) {
        let stats = self.decoder.stats();
        if self.damage_reported {
            self.skipped_seen = stats.skipped_bytes;
            return;
        }
        self.report_garbage(stats.skipped_bytes, stats.last_skip_end, env);
        self.skipped_seen = stats.skipped_bytes;
    }

    /// Reports the bytes skipped since the last look when the decoder's count is `skipped`,
    /// the last of them just before stream offset `end`.
    fn report_garbage(&mut self, skipped: u64, end: u64, env: &mut impl Env) {
        let new = skipped.saturating_sub(self.skipped_seen);
        if new > 0 && self.machine.state().session().is_some() {
            let text = format!(
                "skipped {new} bytes that are not part of any frame, the last just before stream offset {end} \
                 (a frame starts with the magic f5 56 50 52)"
            );
            self.report_decode(&text, env);
        }
    }

    /// Sends ERROR decode with `text` in the current session, unless the rate limit holds it
    /// back (then it is only counted).
    fn report_decode(&mut self, text: &str, env: &mut impl Env) {
        let Some(session) = self.machine.state().session() else { return };
        let Some(held_back) = self.reports.admit(env.now_ns()) else {
            self.counters.decode_reports_held_back += 1;
            return;
        };
        let text = match held_back {
            0 => text.to_owned(),
            n => format!("{text} ({n} earlier reports held back by the rate limit)"),
        };
        self.counters.decode_reports += 1;
        self.counters.errors_sent += 1;
        self.send(&Message::error_unsolicited(error_code::DECODE, text), session);
    }

    /// Applies `event` to the state machine, recording and logging the transition, or counting
    /// and logging the refusal.
    fn step(&mut self, event: PortEvent, cause: &'static str, env: &mut impl Env) -> Result<(), ()> {
        let now = env.now_ns();
        match self.machine.step(event, now) {
            Ok(t) => {
                let (wakeups, cpu_ns) = (env.wakeups(), env.cpu_ns());
                self.history.push(t, event, cause, wakeups, cpu_ns);
                let session = t.to.session().or(t.from.session()).unwrap_or(0);
                log::info!(
                    "port {}: {} -> {} session={session:#010x} ({cause})",
                    self.name,
                    t.from.name(),
                    t.to.name()
                );
                Ok(())
            }
            Err(e) => {
                self.counters.illegal_transitions += 1;
                log::warn!("port {}: illegal {event:?} in {}: {e} ({cause})", self.name, self.machine.state().name());
                Err(())
            }
        }
    }

    /// Host attached (`new_session == false`) or HELLO_REQUEST: new session id and nonce, HELLO.
    fn start_session(&mut self, new_session: bool, env: &mut impl Env) {
        let old = self.machine.state().session().unwrap_or(0);
        let session = loop {
            let s = env.random_u64() as u32;
            if s != 0 && s != old {
                break s;
            }
        };
        let nonce = env.random_u64();
        let (event, cause) = if new_session {
            (PortEvent::NewSession { session, nonce }, "hello request")
        } else {
            (PortEvent::HostConnected { session, nonce }, "poll: POLLHUP clear")
        };
        if self.step(event, cause, env).is_err() {
            return;
        }
        if new_session {
            // The old session's work ends here: its streams stop and its unsent output goes
            // (a frame already on its way is finished, never torn). Its guest-op handles are
            // closed by the event loop, which sees the session is no longer READY.
            self.abort_streams();
            let dropped = self.out.drop_unstarted();
            if dropped > 0 {
                self.counters.dropped_bytes += dropped as u64;
                log::info!("port {}: dropped {dropped} unsent bytes of session {old:#010x}", self.name);
            }
        }
        self.skipped_seen = self.decoder.stats().skipped_bytes;
        self.seq = 0;
        self.counters.sessions += 1;
        self.send_hello(session, nonce, env);
    }

    /// Offers session `session` with `nonce` (again, when repeating an unanswered offer).
    fn send_hello(&mut self, session: u32, nonce: u64, env: &mut impl Env) {
        let hello = Message::Hello(vport_common::message::Hello {
            agent_version: self.info.agent_version.clone(),
            port_name: self.name.clone(),
            kernel_release: self.info.kernel_release.clone(),
            boot_id: self.info.boot_id.clone(),
            nonce,
            agent_time_ns: env.now_ns(),
        });
        self.send(&hello, session);
    }

    /// No host: the session (if any) ends, and nothing buffered belongs to anyone any more.
    fn host_gone(&mut self, env: &mut impl Env, cause: &'static str) {
        if self.machine.state() != PortState::Disconnected {
            let _ = self.step(PortEvent::HostDisconnected, cause, env);
        }
        self.end_session_buffers();
    }

    fn end_session_buffers(&mut self) {
        self.abort_streams();
        self.decoder.clear();
        let dropped = self.out.clear();
        if dropped > 0 {
            self.counters.dropped_bytes += dropped as u64;
            log::info!("port {}: dropped {dropped} unsent bytes of the ended session", self.name);
        }
    }

    /// Stops a running SOURCE and SINK (counted in `stream_aborts` and logged).
    fn abort_streams(&mut self) {
        if let Some(job) = self.source.take() {
            self.counters.stream_aborts += 1;
            log::warn!(
                "port {}: SOURCE aborted at {} of {} bytes: the session ended",
                self.name,
                job.offset,
                job.total
            );
        }
        if let Some(job) = self.sink.take() {
            self.counters.stream_aborts += 1;
            log::warn!(
                "port {}: SINK aborted at {} of {} bytes: the session ended",
                self.name,
                job.received,
                job.total
            );
        }
    }

    /// Queues `msg` as one frame with header session `session` and the next sequence number.
    /// Returns false (logged and counted) when it could not be queued.
    fn send(&mut self, msg: &Message, session: u32) -> bool {
        if self.bye_queued {
            // BYE ends the session on the wire: a late reply (a guest-op completion, a second
            // BYE at shutdown) is dropped, never sent after it.
            self.counters.after_bye_dropped += 1;
            log::debug!("port {}: {:?} after BYE dropped", self.name, msg.kind());
            return false;
        }
        let wire = match msg.to_frame(session, self.seq).map(|f| f.encode()) {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                log::error!("port {}: cannot encode {:?}: {e}", self.name, msg.kind());
                return false;
            }
            Err(e) => {
                log::error!("port {}: cannot encode {:?}: {e}", self.name, msg.kind());
                return false;
            }
        };
        match self.out.push(&wire) {
            Ok(()) => {
                self.seq = self.seq.wrapping_add(1);
                self.counters.frames_out += 1;
                self.bye_queued = msg.kind() == MessageType::Bye;
                true
            }
            Err(len) => {
                self.counters.queue_overflows += 1;
                self.counters.dropped_bytes += len as u64;
                log::error!(
                    "port {}: output queue full ({} bytes queued, limit {QUEUE_LIMIT}): dropped a {:?} frame of {len} bytes",
                    self.name,
                    self.out.len(),
                    msg.kind()
                );
                false
            }
        }
    }

    /// Answers `request` with an ERROR in session `session`, unless the request was itself an
    /// ERROR (no loops).
    fn reply_error(&mut self, request: &Header, session: u32, code: u16, text: String) {
        if request.kind == MessageType::Error as u8 {
            return;
        }
        self.counters.errors_sent += 1;
        self.send(&Message::error_for(request, code, text), session);
    }

    /// True if `h` carries the READY session's id; otherwise answers BAD_STATE, saying what
    /// is missing, and returns false. (Frames of a foreign non-zero session never get here.)
    fn require_ready(&mut self, h: &Header, kind: MessageType) -> bool {
        let text = match self.machine.state() {
            PortState::Ready { session, .. } if session == h.session => return true,
            PortState::Ready { session, .. } => format!(
                "{kind:?} needs the READY session's id in its header: it carries {:#010x}, the session is \
                 {session:#010x}",
                h.session
            ),
            state => format!(
                "{kind:?} needs a READY session: the port is {} (send HELLO_ACK with the HELLO's nonce first)",
                state.name()
            ),
        };
        self.reply_error(h, h.session, error_code::BAD_STATE, text);
        false
    }

    /// Adds SOURCE frames while the queue is below [`SOURCE_LOW_WATER`]; queues SOURCE_DONE at
    /// the end of the stream.
    fn pump_source(&mut self) {
        while self.out.len() < SOURCE_LOW_WATER {
            let Some(job) = self.source.as_mut() else { return };
            let session = job.session;
            if job.offset >= job.total {
                let done = Message::SourceDone { bytes: job.total, digest: job.digest.digest() };
                log::info!("port {}: SOURCE of {} bytes complete", self.name, job.total);
                self.source = None;
                self.send(&done, session);
                return;
            }
            let n = (job.total - job.offset).min(job.chunk as u64) as usize;
            let mut bytes = vec![0u8; n];
            pattern::fill(job.seed, job.offset, &mut bytes);
            job.digest.update(&bytes);
            let offset = job.offset;
            job.offset += n as u64;
            if !self.send(&Message::Data { offset, bytes }, session) {
                self.counters.stream_aborts += 1;
                log::error!("port {}: SOURCE aborted at {offset}: DATA frame could not be queued", self.name);
                self.source = None;
            }
        }
    }

    /// Counters as STATS name/value pairs. Per port: `bytes_in`, `bytes_out`, `frames_in`,
    /// `frames_out`, `decode_errors`, `skipped_bytes` (decoder bytes outside valid frames),
    /// `stale_frames`, `sessions`, `hello_repeats`, `illegal_transitions`, `errors_sent`,
    /// `errors_received`, `dropped_bytes`, `short_writes`, `queue_overflows`, `ebusy` (EBUSY met
    /// opening this port), `opens`, `closes`, `stream_aborts`, `bye_flush_timeouts`,
    /// `sigio_signals`, `torn_frames`, `decode_reports`, `decode_reports_held_back`,
    /// `refusals` (ERROR limit or denied), `after_bye_dropped` (late replies not sent after a
    /// BYE), `queued` (bytes waiting now). Agent-wide
    /// ([`Env::agent_stats`]): `wakeups`, `ebusy_total`, `rss_kib`, `uptime_ns`, `cpu_ns`,
    /// `ports_open`, `pid`, `sigio_overflows`, `missed_wakeups`, `euid`, `egid`,
    /// `guest_ops_allowed`. Counters survive a close/reopen and an unplug/replug of the same
    /// name (`queued` is the present).
    pub fn stats(&self, env: &mut impl Env) -> Vec<(String, u64)> {
        let c = &self.counters;
        let d = self.decoder.stats();
        let mut v: Vec<(String, u64)> = [
            ("bytes_in", c.bytes_in),
            ("bytes_out", c.bytes_out),
            ("frames_in", c.frames_in),
            ("frames_out", c.frames_out),
            ("decode_errors", c.decode_errors),
            ("skipped_bytes", c.skipped_bytes_before + d.skipped_bytes),
            ("stale_frames", c.stale_frames),
            ("sessions", c.sessions),
            ("hello_repeats", c.hello_repeats),
            ("illegal_transitions", c.illegal_transitions),
            ("errors_sent", c.errors_sent),
            ("errors_received", c.errors_received),
            ("dropped_bytes", c.dropped_bytes),
            ("short_writes", c.short_writes),
            ("queue_overflows", c.queue_overflows),
            ("ebusy", c.ebusy),
            ("opens", c.opens),
            ("closes", c.closes),
            ("stream_aborts", c.stream_aborts),
            ("bye_flush_timeouts", c.bye_flush_timeouts),
            ("sigio_signals", c.sigio_signals),
            ("torn_frames", c.torn_frames),
            ("decode_reports", c.decode_reports),
            ("decode_reports_held_back", c.decode_reports_held_back),
            ("refusals", c.refusals),
            ("after_bye_dropped", c.after_bye_dropped),
            ("queued", self.out.len() as u64),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        v.extend(env.agent_stats().into_iter().map(|(k, v)| (k.to_owned(), v)));
        v
    }

    /// History records with `seq >= since` as EVENTS records.
    fn event_records(&self, since: u64) -> Vec<EventRecord> {
        self.history
            .since(since)
            .take(MAX_EVENT_RECORDS)
            .map(|r| EventRecord {
                seq: r.seq,
                time_ns: r.transition.at_ns,
                from: StateCode::from(&r.transition.from),
                to: StateCode::from(&r.transition.to),
                session: r.transition.to.session().unwrap_or(0),
                wakeups: r.wakeups,
                cpu_ns: r.cpu_ns,
                cause: r.cause.to_owned(),
            })
            .collect()
    }

    /// CLOSE/REOPEN: BYE, then the loop closes the port (see [`Port::close_request`]). A
    /// running stream stops here (nothing is added after the BYE); a delay over the limit is
    /// refused (ERROR limit), so no host can keep the port closed for long.
    fn on_close(&mut self, h: &Header, reopen_after_ms: u32, reason: &'static str) {
        let max = self.settings.limits.max_reopen_delay_ms;
        if reopen_after_ms > max {
            self.counters.refusals += 1;
            let text = format!(
                "a reopen delay of {reopen_after_ms} ms exceeds the agent's limit of {max} ms (a host may not keep \
                 the port closed longer)"
            );
            return self.reply_error(h, h.session, error_code::LIMIT, text);
        }
        self.abort_streams();
        log::info!(
            "port {}: {reason}: closing, reopen after {}",
            self.name,
            if reopen_after_ms == NO_REOPEN { "never".to_owned() } else { format!("{reopen_after_ms} ms") }
        );
        self.send(&Message::Bye { reopen_after_ms, reason: reason.to_owned() }, h.session);
        self.close_request = Some(reopen_after_ms);
        self.close_cause = reason;
    }

    fn on_sigio_request(&mut self, h: &Header, action: SigioAction) {
        let result = match action {
            SigioAction::Query => Ok(()),
            SigioAction::Enable => self.io.set_async(true).map(|()| {
                self.sigio = SigioState { enabled: true, count: 0, samples: Vec::new() };
            }),
            SigioAction::Disable => self.io.set_async(false).map(|()| self.sigio.enabled = false),
        };
        if let Err(e) = result {
            log::warn!("port {}: SIGIO {action:?} failed: {e}", self.name);
            return self.reply_error(
                h,
                h.session,
                error_code::INTERNAL,
                format!("sigio {action:?}: fcntl failed: {e}"),
            );
        }
        let s = &self.sigio;
        log::debug!("port {}: SIGIO {action:?}: enabled={} count={}", self.name, s.enabled, s.count);
        let report = Message::SigioReport { enabled: s.enabled, count: s.count, samples: s.samples.clone() };
        self.send(&report, h.session);
    }

    /// True if a stream of `bytes` is within the stream limit; otherwise answers ERROR limit.
    fn within_stream_limit(&mut self, h: &Header, bytes: u64) -> bool {
        let max = self.settings.limits.max_stream_bytes;
        if bytes <= max {
            return true;
        }
        self.counters.refusals += 1;
        let text = format!(
            "a stream of {bytes} bytes exceeds the agent's limit of {max} bytes (vport-agent --max-stream-bytes)"
        );
        self.reply_error(h, h.session, error_code::LIMIT, text);
        false
    }

    fn on_data(&mut self, h: &Header, offset: u64, bytes: &[u8]) {
        let Some(job) = self.sink.as_mut() else {
            return self.reply_error(h, h.session, error_code::BAD_STATE, "DATA outside a SINK".to_owned());
        };
        if offset != job.received && job.first_mismatch == NO_MISMATCH {
            log::debug!("port {}: SINK expected offset {}, got {offset}", self.name, job.received);
            job.first_mismatch = job.received;
        }
        if job.first_mismatch == NO_MISMATCH {
            if let Some(m) = pattern::first_mismatch(job.seed, job.received, bytes) {
                job.first_mismatch = m;
            }
        }
        job.digest.update(bytes);
        job.received += bytes.len() as u64;
        if job.received >= job.total {
            self.finish_sink();
        }
    }

    fn finish_sink(&mut self) {
        let Some(job) = self.sink.take() else { return };
        let result = Message::SinkResult {
            bytes: job.received,
            digest: job.digest.digest(),
            first_mismatch: job.first_mismatch,
        };
        log::info!(
            "port {}: SINK of {} bytes complete, first mismatch {}",
            self.name,
            job.received,
            if job.first_mismatch == NO_MISMATCH { "none".to_owned() } else { job.first_mismatch.to_string() }
        );
        self.send(&result, job.session);
    }

    /// Handles one frame received while a session is live. Replies carry the request's
    /// header session.
    fn handle_frame(&mut self, frame: Frame, env: &mut impl Env) {
        self.counters.frames_in += 1;
        let state = self.machine.state();
        let (current, nonce) = match state {
            PortState::Connected { session, nonce } | PortState::Ready { session, nonce } => (session, nonce),
            PortState::Disconnected => return,
        };
        let h = frame.header;
        if h.session != 0 && h.session != current && h.kind != MessageType::HelloRequest as u8 {
            self.counters.stale_frames += 1;
            log::debug!(
                "port {}: stale frame type {:#04x} of session {:#010x} (current {current:#010x}) dropped",
                self.name,
                h.kind,
                h.session
            );
            // Answered outside any session (0), which every host accepts: a host still in an
            // ended session learns it has ended, and a host that used a wrong id sees the answer.
            let text = format!("session {:#010x} is not the current session {current:#010x}", h.session);
            self.reply_error(&h, 0, error_code::BAD_SESSION, text);
            return;
        }
        let msg = match Message::from_frame(&frame) {
            Ok(m) => m,
            Err(e @ MessageError::UnknownType(_)) => {
                return self.reply_error(&h, h.session, error_code::UNKNOWN_TYPE, e.to_string())
            }
            Err(e) => {
                log::debug!("port {}: malformed frame: {e}", self.name);
                return self.reply_error(&h, h.session, error_code::MALFORMED, e.to_string());
            }
        };
        match msg {
            // A request for a session already offered and not yet acknowledged repeats the offer:
            // requests the host queued while the guest was booting must not multiply sessions.
            Message::HelloRequest => match state {
                PortState::Connected { session, nonce } => {
                    log::debug!("port {}: hello request while the offer is pending: repeating HELLO", self.name);
                    self.counters.hello_repeats += 1;
                    self.send_hello(session, nonce, env);
                }
                _ => {
                    log::info!("port {}: host requested a new session", self.name);
                    self.start_session(true, env);
                }
            },
            Message::HelloAck { nonce: got, host_version } => {
                if h.session != current {
                    let text = format!("hello ack for session {:#010x}, current is {current:#010x}", h.session);
                    return self.reply_error(&h, 0, error_code::BAD_SESSION, text);
                }
                let mismatch = got != nonce;
                if self.step(PortEvent::HelloAcked { nonce: got }, "hello ack", env).is_err() {
                    let (code, text) = if mismatch {
                        (error_code::BAD_SESSION, format!("hello ack nonce {got:#x} is not the session's"))
                    } else {
                        (error_code::BAD_STATE, "session already ready".to_owned())
                    };
                    let session = if code == error_code::BAD_SESSION { 0 } else { current };
                    return self.reply_error(&h, session, code, text);
                }
                log::info!("port {} READY session={current:#010x} host={host_version}", self.name);
            }
            Message::Ping { time_ns } => {
                let pong = Message::Pong { ping_time_ns: time_ns, time_ns: env.now_ns() };
                self.send(&pong, h.session);
            }
            Message::Echo(bytes) => {
                if self.require_ready(&h, MessageType::Echo) {
                    self.send(&Message::EchoReply(bytes), h.session);
                }
            }
            Message::Error { code, text, .. } => {
                self.counters.errors_received += 1;
                log::warn!("port {}: host reported error {code}: {text}", self.name);
            }
            Message::Pong { .. } => log::debug!("port {}: unsolicited pong ignored", self.name),
            Message::Close { reopen_after_ms } => {
                if self.require_ready(&h, MessageType::Close) {
                    self.on_close(&h, reopen_after_ms, "close requested");
                }
            }
            Message::Reopen => {
                if self.require_ready(&h, MessageType::Reopen) {
                    self.on_close(&h, 0, "reopen requested");
                }
            }
            Message::Probe { kind, target, arg } => {
                if self.require_ready(&h, MessageType::Probe) {
                    let out = self.io.probe(kind, target, arg.min(MAX_PROBE_READ as u32));
                    if kind == ProbeKind::Read && target == ProbeTarget::OwnFd {
                        self.counters.bytes_in += out.data.len() as u64;
                    }
                    log::debug!(
                        "port {}: probe {kind:?} on {target:?}: ret {} errno {}",
                        self.name,
                        out.ret,
                        out.errno
                    );
                    let reply = Message::ProbeResult {
                        kind,
                        target,
                        ret: out.ret,
                        errno: out.errno,
                        mask: out.mask,
                        data: out.data,
                    };
                    self.send(&reply, h.session);
                }
            }
            Message::Sigio { action } => {
                if self.require_ready(&h, MessageType::Sigio) {
                    self.on_sigio_request(&h, action);
                }
            }
            Message::Source { seed, bytes, chunk } => {
                if !self.require_ready(&h, MessageType::Source) {
                    return;
                }
                if self.source.is_some() {
                    return self.reply_error(
                        &h,
                        h.session,
                        error_code::BAD_STATE,
                        "a SOURCE is already running".into(),
                    );
                }
                if !self.within_stream_limit(&h, bytes) {
                    return;
                }
                let chunk = match chunk as usize {
                    0 => DEFAULT_CHUNK,
                    c => c.min(MAX_CHUNK),
                };
                log::info!("port {}: SOURCE seed={seed:#x} bytes={bytes} chunk={chunk}", self.name);
                self.source = Some(SourceJob {
                    session: h.session,
                    seed,
                    total: bytes,
                    chunk,
                    offset: 0,
                    digest: StreamDigest::new(),
                });
            }
            Message::Sink { seed, bytes } => {
                if !self.require_ready(&h, MessageType::Sink) {
                    return;
                }
                if self.sink.is_some() {
                    return self.reply_error(&h, h.session, error_code::BAD_STATE, "a SINK is already running".into());
                }
                if !self.within_stream_limit(&h, bytes) {
                    return;
                }
                log::info!("port {}: SINK seed={seed:#x} bytes={bytes}", self.name);
                self.sink = Some(SinkJob {
                    session: h.session,
                    seed,
                    total: bytes,
                    received: 0,
                    first_mismatch: NO_MISMATCH,
                    digest: StreamDigest::new(),
                });
                if bytes == 0 {
                    self.finish_sink();
                }
            }
            Message::Data { offset, bytes } => {
                if self.require_ready(&h, MessageType::Data) {
                    self.on_data(&h, offset, &bytes);
                }
            }
            Message::Stats => {
                if self.require_ready(&h, MessageType::Stats) {
                    let stats = self.stats(env);
                    self.send(&Message::StatsReply(stats), h.session);
                }
            }
            Message::Events { since_seq } => {
                if self.require_ready(&h, MessageType::Events) {
                    let reply = Message::EventsReply {
                        first_seq: self.history.first_seq(),
                        next_seq: self.history.next_seq(),
                        records: self.event_records(since_seq),
                    };
                    self.send(&reply, h.session);
                }
            }
            Message::GuestOp { op_id, op } => {
                if !self.settings.allow_guest_ops {
                    self.counters.refusals += 1;
                    let text = format!(
                        "guest ops disabled: guest op {op_id} refused, nothing was opened (start vport-agent with \
                         --allow-guest-ops to serve them; see docs/security.md)"
                    );
                    return self.reply_error(&h, h.session, error_code::DENIED, text);
                }
                if self.require_ready(&h, MessageType::GuestOp) {
                    log::debug!("port {}: guest op {op_id}: {op:?}", self.name);
                    self.guest_ops.push(GuestOpRequest { session: h.session, seq: h.seq, op_id, op });
                }
            }
            Message::Hello(_)
            | Message::GuestOpDone(_)
            | Message::EchoReply(_)
            | Message::Bye { .. }
            | Message::ProbeResult { .. }
            | Message::SigioReport { .. }
            | Message::SourceDone { .. }
            | Message::SinkResult { .. }
            | Message::StatsReply(_)
            | Message::EventsReply { .. } => {
                let text = format!("{:?} is sent by the agent, never to it", msg.kind());
                self.reply_error(&h, h.session, error_code::WRONG_DIRECTION, text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Limits;
    use std::collections::VecDeque;
    use vport_common::message::Hello;

    const HOST: PollFlags = PollFlags::POLLOUT;
    const NO_HOST: PollFlags = PollFlags::POLLIN.union(PollFlags::POLLHUP);

    enum Read {
        Data(Vec<u8>),
        Zero,
        Err(Errno),
    }

    /// A scripted port: reads come from `reads` (EAGAIN when empty, like a connected port with
    /// no data), `mask` is what poll says, writes accept at most `chunk` bytes per call and
    /// `budget` bytes in total before EAGAIN.
    struct Fake {
        reads: VecDeque<Read>,
        mask: PollFlags,
        chunk: usize,
        budget: usize,
        written: Vec<u8>,
        write_calls: Vec<usize>,
        probes: Vec<(ProbeKind, ProbeTarget, u32)>,
        probe_result: ProbeOutcome,
        async_calls: Vec<bool>,
        async_err: Option<Errno>,
    }

    impl Fake {
        fn new() -> Self {
            Fake {
                reads: VecDeque::new(),
                mask: NO_HOST,
                chunk: usize::MAX,
                budget: usize::MAX,
                written: vec![],
                write_calls: vec![],
                probes: vec![],
                probe_result: ProbeOutcome::default(),
                async_calls: vec![],
                async_err: None,
            }
        }
    }

    impl PortIo for Fake {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
            match self.reads.pop_front() {
                Some(Read::Data(d)) => {
                    assert!(d.len() <= buf.len());
                    buf[..d.len()].copy_from_slice(&d);
                    Ok(d.len())
                }
                Some(Read::Zero) => {
                    // read() == 0 means no host client at this moment.
                    self.mask = NO_HOST;
                    Ok(0)
                }
                Some(Read::Err(e)) => Err(e),
                None if self.mask.contains(PollFlags::POLLHUP) => Ok(0),
                None => Err(Errno::EAGAIN),
            }
        }
        fn write(&mut self, buf: &[u8]) -> Result<usize, Errno> {
            assert!(buf.len() <= MAX_WRITE, "write of {} bytes exceeds 32 KiB", buf.len());
            if self.budget == 0 {
                return Err(Errno::EAGAIN);
            }
            let n = buf.len().min(self.chunk).min(self.budget);
            self.budget -= n;
            self.written.extend_from_slice(&buf[..n]);
            self.write_calls.push(n);
            Ok(n)
        }
        fn poll_mask(&mut self) -> Result<PollFlags, Errno> {
            Ok(self.mask)
        }
        fn probe(&mut self, kind: ProbeKind, target: ProbeTarget, arg: u32) -> ProbeOutcome {
            self.probes.push((kind, target, arg));
            self.probe_result.clone()
        }
        fn set_async(&mut self, on: bool) -> Result<(), Errno> {
            self.async_calls.push(on);
            self.async_err.map_or(Ok(()), Err)
        }
    }

    /// Deterministic env: the clock advances 1000 ns per reading; randomness is a counter-seeded
    /// splitmix so every value differs.
    struct TestEnv {
        now: u64,
        rng: u64,
        wakeups: u64,
    }

    impl Env for TestEnv {
        fn now_ns(&mut self) -> u64 {
            self.now += 1000;
            self.now
        }
        fn wakeups(&mut self) -> u64 {
            self.wakeups
        }
        fn cpu_ns(&mut self) -> u64 {
            self.wakeups * 10
        }
        fn agent_stats(&mut self) -> Vec<(&'static str, u64)> {
            vec![("wakeups", self.wakeups), ("ebusy_total", 3)]
        }
        fn random_u64(&mut self) -> u64 {
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    fn env() -> TestEnv {
        TestEnv { now: 0, rng: 7, wakeups: 0 }
    }

    /// A port with guest operations allowed (the default settings refuse them: see
    /// `guest_ops_are_refused_unless_allowed`).
    fn port() -> Port<Fake> {
        port_with(Settings { allow_guest_ops: true, ..Settings::default() })
    }

    fn port_with(settings: Settings) -> Port<Fake> {
        let info = Rc::new(AgentInfo {
            agent_version: "9.9.9".into(),
            kernel_release: "6.1.0-test".into(),
            boot_id: "boot-id".into(),
        });
        Port::with_carry(
            "org.vport.0".into(),
            "vport0p1".into(),
            Fake::new(),
            info,
            Rc::new(settings),
            Carry::default(),
        )
    }

    /// Frames the port wrote since the last call, decoded.
    fn take_sent(p: &mut Port<Fake>) -> Vec<(Header, Message)> {
        let bytes = std::mem::take(&mut p.io.written);
        let mut d = Decoder::default();
        d.push(&bytes);
        let mut out = vec![];
        for f in d.by_ref() {
            let f = f.expect("agent wrote a damaged frame");
            out.push((f.header, Message::from_frame(&f).unwrap()));
        }
        assert_eq!(d.buffered(), 0, "agent wrote a partial frame");
        out
    }

    fn wire(msg: &Message, session: u32, seq: u32) -> Vec<u8> {
        msg.to_frame(session, seq).unwrap().encode().unwrap()
    }

    fn expect_hello(sent: &[(Header, Message)]) -> (u32, Hello) {
        match sent {
            [(h, Message::Hello(hello))] => (h.session, hello.clone()),
            other => panic!("expected one HELLO, got {other:?}"),
        }
    }

    fn expect_error(sent: &[(Header, Message)], want: u16) -> Header {
        match sent {
            [(h, Message::Error { code, .. })] if *code == want => *h,
            other => panic!("expected one ERROR {want}, got {other:?}"),
        }
    }

    /// Queues `bytes` as reads of at most one read buffer each.
    fn feed(p: &mut Port<Fake>, bytes: &[u8]) {
        for c in bytes.chunks(READ_BUF) {
            p.io.reads.push_back(Read::Data(c.to_vec()));
        }
    }

    /// Connects a host and completes the handshake; returns the session.
    fn ready(p: &mut Port<Fake>, e: &mut TestEnv) -> u32 {
        p.io.mask = HOST;
        p.service(e).unwrap();
        let (session, hello) = expect_hello(&take_sent(p));
        let ack = Message::HelloAck { nonce: hello.nonce, host_version: "host".into() };
        p.io.reads.push_back(Read::Data(wire(&ack, session, 0)));
        p.service(e).unwrap();
        assert!(take_sent(p).is_empty());
        assert_eq!(p.state(), PortState::Ready { session, nonce: hello.nonce });
        session
    }

    #[test]
    fn no_host_stays_disconnected_and_sends_nothing() {
        let (mut p, mut e) = (port(), env());
        assert_eq!(p.service(&mut e), Ok(Health::Open));
        assert_eq!(p.state(), PortState::Disconnected);
        assert!(p.io.written.is_empty());
        assert!(p.history().is_empty());
    }

    #[test]
    fn host_connect_sends_hello_with_a_fresh_nonce() {
        let (mut p, mut e) = (port(), env());
        p.io.mask = HOST;
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        let (session, hello) = expect_hello(&sent);
        assert_eq!(sent[0].0.seq, 0);
        assert_ne!(session, 0);
        assert_eq!(p.state(), PortState::Connected { session, nonce: hello.nonce });
        assert_eq!(hello.agent_version, "9.9.9");
        assert_eq!(hello.port_name, "org.vport.0");
        assert_eq!(hello.kernel_release, "6.1.0-test");
        assert_eq!(hello.boot_id, "boot-id");
        assert!(hello.agent_time_ns > 0);

        // The host leaves and comes back: a new session with a new id and nonce.
        p.io.mask = NO_HOST;
        p.service(&mut e).unwrap();
        assert_eq!(p.state(), PortState::Disconnected);
        p.io.mask = HOST;
        p.service(&mut e).unwrap();
        let (session2, hello2) = expect_hello(&take_sent(&mut p));
        assert_ne!(session2, session);
        assert_ne!(hello2.nonce, hello.nonce);
        assert_eq!(p.counters().sessions, 2);
        let names: Vec<&str> = p.history().since(0).map(|r| r.transition.to.name()).collect();
        assert_eq!(names, ["CONNECTED", "DISCONNECTED", "CONNECTED"]);
    }

    #[test]
    fn hello_ack_makes_ready_and_wrong_nonce_or_session_is_refused() {
        let (mut p, mut e) = (port(), env());
        p.io.mask = HOST;
        p.service(&mut e).unwrap();
        let (session, hello) = expect_hello(&take_sent(&mut p));

        let bad_nonce = Message::HelloAck { nonce: hello.nonce ^ 1, host_version: "h".into() };
        p.io.reads.push_back(Read::Data(wire(&bad_nonce, session, 0)));
        p.service(&mut e).unwrap();
        expect_error(&take_sent(&mut p), error_code::BAD_SESSION);
        assert!(matches!(p.state(), PortState::Connected { .. }));
        assert_eq!(p.counters().illegal_transitions, 1);

        let ack = Message::HelloAck { nonce: hello.nonce, host_version: "h".into() };
        p.io.reads.push_back(Read::Data(wire(&ack, 0, 1)));
        p.service(&mut e).unwrap();
        expect_error(&take_sent(&mut p), error_code::BAD_SESSION);
        assert!(matches!(p.state(), PortState::Connected { .. }));

        p.io.reads.push_back(Read::Data(wire(&ack, session, 2)));
        p.service(&mut e).unwrap();
        assert!(take_sent(&mut p).is_empty());
        assert_eq!(p.state(), PortState::Ready { session, nonce: hello.nonce });

        // A duplicate ack in READY is refused with BAD_STATE and changes nothing.
        p.io.reads.push_back(Read::Data(wire(&ack, session, 3)));
        p.service(&mut e).unwrap();
        expect_error(&take_sent(&mut p), error_code::BAD_STATE);
        assert_eq!(p.state(), PortState::Ready { session, nonce: hello.nonce });
        assert_eq!(p.counters().illegal_transitions, 2);
    }

    #[test]
    fn ping_gets_pong_in_the_requests_session() {
        let (mut p, mut e) = (port(), env());
        p.io.mask = HOST;
        p.service(&mut e).unwrap();
        let (session, _) = expect_hello(&take_sent(&mut p));
        p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 77 }, 0, 0)));
        p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 78 }, session, 1)));
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), 2);
        assert_eq!((sent[0].0.session, sent[0].0.seq), (0, 1));
        assert_eq!((sent[1].0.session, sent[1].0.seq), (session, 2));
        match (&sent[0].1, &sent[1].1) {
            (Message::Pong { ping_time_ns: 77, time_ns: t1 }, Message::Pong { ping_time_ns: 78, time_ns: t2 }) => {
                assert!(*t1 > 0 && t2 > t1)
            }
            other => panic!("expected two PONGs, got {other:?}"),
        }
    }

    #[test]
    fn echo_only_in_ready() {
        let (mut p, mut e) = (port(), env());
        p.io.mask = HOST;
        p.service(&mut e).unwrap();
        let (session, hello) = expect_hello(&take_sent(&mut p));
        p.io.reads.push_back(Read::Data(wire(&Message::Echo(b"early".to_vec()), session, 0)));
        p.service(&mut e).unwrap();
        expect_error(&take_sent(&mut p), error_code::BAD_STATE);

        let ack = Message::HelloAck { nonce: hello.nonce, host_version: "h".into() };
        p.io.reads.push_back(Read::Data(wire(&ack, session, 1)));
        p.io.reads.push_back(Read::Data(wire(&Message::Echo(b"hello world".to_vec()), session, 2)));
        p.io.reads.push_back(Read::Data(wire(&Message::Echo(b"no session".to_vec()), 0, 3)));
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0].1, Message::EchoReply(b"hello world".to_vec()));
        assert_eq!(sent[0].0.session, session);
        expect_error(&sent[1..], error_code::BAD_STATE);
    }

    #[test]
    fn read_zero_disconnects_drops_the_queue_and_clears_the_decoder() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        // The host can't take output, sends a ping and half a frame, then leaves.
        p.io.budget = 0;
        let ping = wire(&Message::Ping { time_ns: 1 }, session, 1);
        let half = wire(&Message::Echo(vec![9; 100]), session, 2);
        let mut bytes = ping.clone();
        bytes.extend_from_slice(&half[..60]);
        p.io.reads.push_back(Read::Data(bytes));
        p.io.reads.push_back(Read::Zero);
        p.service(&mut e).unwrap();
        assert_eq!(p.state(), PortState::Disconnected);
        assert_eq!(p.queued(), 0);
        let pong_len = wire(&Message::Pong { ping_time_ns: 1, time_ns: 1 }, session, 1).len();
        assert_eq!(p.counters().dropped_bytes, pong_len as u64);
        assert_eq!(p.decoder.buffered(), 0, "decoder cleared");

        // A new host must not see anything of the old session, and the old half frame must not
        // swallow the new host's first frame.
        p.io.budget = usize::MAX;
        p.io.mask = HOST;
        p.service(&mut e).unwrap();
        let (session2, _) = expect_hello(&take_sent(&mut p));
        p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 5 }, session2, 0)));
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert!(matches!(sent.as_slice(), [(_, Message::Pong { ping_time_ns: 5, .. })]), "{sent:?}");
    }

    #[test]
    fn stale_session_frame_gets_bad_session() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let stale = session.wrapping_add(1);
        p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 3 }, stale, 9)));
        p.io.reads.push_back(Read::Data(wire(&Message::Echo(b"x".to_vec()), stale, 10)));
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), 2);
        // Answered outside any session (every host accepts session 0), naming the frame it
        // answers and both ids.
        assert_eq!(expect_error(&sent[..1], error_code::BAD_SESSION).session, 0);
        assert!(matches!(&sent[0].1, Message::Error { about_kind: 0x10, about_seq: 9, text, .. }
            if text.contains(&format!("{stale:#010x}")) && text.contains(&format!("{session:#010x}"))));
        expect_error(&sent[1..], error_code::BAD_SESSION);
        assert_eq!(p.counters().stale_frames, 2);
        assert!(matches!(p.state(), PortState::Ready { .. }));
    }

    #[test]
    fn unknown_type_and_malformed_payload() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let unknown = Frame::new(0x55, session, 1, vec![]).encode().unwrap();
        let malformed = Frame::new(MessageType::Ping as u8, session, 2, vec![1, 2]).encode().unwrap();
        let host_error = wire(&Message::error_unsolicited(5, "x"), session, 3);
        p.io.reads.push_back(Read::Data([unknown, malformed, host_error].concat()));
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), 2, "no reply to the host's ERROR: {sent:?}");
        expect_error(&sent[..1], error_code::UNKNOWN_TYPE);
        expect_error(&sent[1..], error_code::MALFORMED);
        assert_eq!(p.counters().errors_received, 1);
    }

    #[test]
    fn short_writes_deliver_identical_frames_in_order() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        p.io.chunk = 5;
        p.io.write_calls.clear();
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 3 + i as usize * 7]).collect();
        let mut input = vec![];
        for (i, pl) in payloads.iter().enumerate() {
            input.extend(wire(&Message::Echo(pl.clone()), session, i as u32 + 1));
        }
        p.io.reads.push_back(Read::Data(input));
        p.service(&mut e).unwrap();
        assert!(p.io.write_calls.iter().all(|&n| n <= 5));
        let expected: Vec<u8> = payloads
            .iter()
            .enumerate()
            .flat_map(|(i, pl)| wire(&Message::EchoReply(pl.clone()), session, i as u32 + 1))
            .collect();
        assert_eq!(p.io.written, expected, "byte-identical, in order, seq 1..=20");
        assert!(p.counters().short_writes > 0);
        assert_eq!(p.queued(), 0);
    }

    #[test]
    fn eagain_mid_frame_resumes_on_the_next_writable_event() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let big = vec![0xAB; 50_000];
        p.io.budget = 1000;
        p.io.write_calls.clear();
        feed(&mut p, &wire(&Message::Echo(big[..10_000].to_vec()), session, 1));
        feed(&mut p, &wire(&Message::Echo(big[10_000..].to_vec()), session, 2));
        p.service(&mut e).unwrap();
        assert_eq!(p.io.written.len(), 1000);
        let expected = [
            wire(&Message::EchoReply(big[..10_000].to_vec()), session, 1),
            wire(&Message::EchoReply(big[10_000..].to_vec()), session, 2),
        ]
        .concat();
        assert_eq!(p.queued(), expected.len() - 1000);
        // Nothing more until the port is writable again; then the rest, in 32 KiB writes.
        p.io.budget = usize::MAX;
        p.service(&mut e).unwrap();
        assert_eq!(p.io.written, expected);
        assert!(p.io.write_calls[1..].iter().all(|&n| n <= MAX_WRITE));
        assert_eq!(p.io.write_calls.len(), 1 + expected[1000..].len().div_ceil(MAX_WRITE));
    }

    #[test]
    fn hello_request_starts_a_new_session_with_a_new_nonce() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let PortState::Ready { nonce: old_nonce, .. } = p.state() else { panic!() };
        // Any session id is accepted; a ping right behind it is served (decoder not cleared).
        let mut bytes = wire(&Message::HelloRequest, 0xdead_beef, 0);
        p.io.reads.push_back(Read::Data(bytes.split_off(10)));
        p.io.reads.push_front(Read::Data(bytes));
        p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 4 }, 0, 1)));
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), 2, "{sent:?}");
        let (session2, hello) = expect_hello(&sent[..1]);
        assert_eq!(sent[0].0.seq, 0, "a new session's HELLO has seq 0");
        assert_ne!(session2, session);
        assert_ne!(hello.nonce, old_nonce);
        assert_eq!(p.state(), PortState::Connected { session: session2, nonce: hello.nonce });
        assert!(matches!(sent[1].1, Message::Pong { ping_time_ns: 4, .. }));
        assert_eq!(sent[1].0.seq, 1);
        let last = p.history().since(0).last().unwrap();
        assert_eq!(last.event, PortEvent::NewSession { session: session2, nonce: hello.nonce });
    }

    #[test]
    fn hello_requests_queued_before_the_agent_opened_repeat_the_pending_offer() {
        // A host that connected while the guest booted sent HELLO_REQUESTs that QEMU held back;
        // they all arrive at once after the agent offered its first session.
        let (mut p, mut e) = (port(), env());
        p.io.mask = HOST;
        let mut queued = Vec::new();
        for seq in 0..3 {
            queued.extend(wire(&Message::HelloRequest, 0, seq));
        }
        p.io.reads.push_back(Read::Data(queued));
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), 4, "one HELLO on connect and one repeat per request: {sent:?}");
        let (session, first) = expect_hello(&sent[..1]);
        for (h, m) in &sent[1..] {
            let Message::Hello(again) = m else { panic!("{m:?}") };
            assert_eq!((h.session, again.nonce), (session, first.nonce), "the same offer, not a new session");
        }
        assert_eq!(p.counters().sessions, 1);
        assert_eq!(p.counters().hello_repeats, 3);
        assert_eq!(p.state(), PortState::Connected { session, nonce: first.nonce });
    }

    #[test]
    fn data_from_a_departed_host_is_discarded() {
        let (mut p, mut e) = (port(), env());
        // Data buffered before the host left, then "not connected": no session is started.
        p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 1 }, 0, 0)));
        p.service(&mut e).unwrap();
        assert_eq!(p.state(), PortState::Disconnected);
        assert!(p.io.written.is_empty());
        assert!(p.history().is_empty());
    }

    #[test]
    fn enodev_means_unplugged_and_close_records_it() {
        let (mut p, mut e) = (port(), env());
        ready(&mut p, &mut e);
        p.io.mask = PollFlags::POLLHUP;
        assert!(p.looks_unplugged().unwrap());
        p.io.reads.push_back(Read::Err(Errno::ENODEV));
        assert_eq!(p.service(&mut e), Ok(Health::Unplugged));
        p.close(&mut e, "unplugged");
        assert_eq!(p.state(), PortState::Disconnected);
        // Connected, Ready, then Closed: POLLHUP alone is not taken for a host disconnect.
        assert_eq!(p.history().len(), 3);
        let last = p.history().since(0).last().unwrap();
        assert_eq!((last.event, last.cause), (PortEvent::Closed, "unplugged"));
    }

    #[test]
    fn other_errnos_are_errors_naming_the_port() {
        let (mut p, mut e) = (port(), env());
        p.io.mask = HOST;
        p.io.reads.push_back(Read::Err(Errno::EIO));
        let err = p.service(&mut e).unwrap_err();
        assert_eq!(err.to_string(), "port org.vport.0: read failed");
        assert_eq!(err.source, Errno::EIO);
    }

    #[test]
    fn reading_pauses_at_the_high_water_mark_and_resumes() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        p.io.budget = 0;
        let payload = vec![1u8; 200_000];
        let echo = wire(&Message::Echo(payload.clone()), session, 1);
        let n_frames = 8; // 1.6 MB of replies > READ_HIGH_WATER
        for _ in 0..n_frames {
            feed(&mut p, &echo);
        }
        service_until_idle(&mut p, &mut e);
        assert!(p.queued() >= READ_HIGH_WATER && p.queued() < READ_HIGH_WATER + echo.len());
        assert!(!p.io.reads.is_empty(), "reading paused");
        p.io.budget = usize::MAX;
        let calls = service_until_idle(&mut p, &mut e);
        assert!(calls > 1, "1.6 MB of replies take several write budgets");
        assert!(p.io.reads.is_empty());
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), n_frames);
        assert!(sent.iter().all(|(_, m)| *m == Message::EchoReply(payload.clone())));
    }

    /// Services the port as the event loop does: again while it reports more work (bounded).
    /// Returns the number of calls.
    fn service_until_idle(p: &mut Port<Fake>, e: &mut TestEnv) -> usize {
        for calls in 1..10_000 {
            if p.service(e).unwrap() != Health::MoreWork {
                return calls;
            }
        }
        panic!("the port never ran out of work");
    }

    /// Feeds one request in `session` and services the port; returns what it sent.
    fn request(p: &mut Port<Fake>, e: &mut TestEnv, msg: &Message, session: u32) -> Vec<(Header, Message)> {
        feed(p, &wire(msg, session, 1));
        p.service(e).unwrap();
        take_sent(p)
    }

    #[test]
    fn commands_need_a_ready_session() {
        let (mut p, mut e) = (port(), env());
        p.io.mask = HOST;
        p.service(&mut e).unwrap();
        let (session, _) = expect_hello(&take_sent(&mut p));
        let cmds = [
            Message::Close { reopen_after_ms: 5 },
            Message::Reopen,
            Message::Probe { kind: ProbeKind::Lseek, target: ProbeTarget::OwnFd, arg: 0 },
            Message::Sigio { action: SigioAction::Query },
            Message::Source { seed: 1, bytes: 10, chunk: 0 },
            Message::Sink { seed: 1, bytes: 10 },
            Message::Data { offset: 0, bytes: vec![1] },
            Message::Stats,
            Message::Events { since_seq: 0 },
            Message::GuestOp { op_id: 1, op: GuestOp::Sysfs },
        ];
        for m in &cmds {
            expect_error(&request(&mut p, &mut e, m, session), error_code::BAD_STATE);
        }
        assert_eq!(p.close_request(), None);
        assert!(p.io.probes.is_empty() && p.io.async_calls.is_empty());
        expect_error(&request(&mut p, &mut e, &Message::Stats, 0), error_code::BAD_STATE);
        // Agent-to-host messages are refused in any state, as sent the wrong way.
        let bye = Message::Bye { reopen_after_ms: 0, reason: "x".into() };
        expect_error(&request(&mut p, &mut e, &bye, session), error_code::WRONG_DIRECTION);
    }

    #[test]
    fn guest_ops_are_handed_to_the_loop_and_answered_only_in_their_session() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let op = GuestOp::Read { handle: 3, bytes: 10, all: false };
        let sent = request(&mut p, &mut e, &Message::GuestOp { op_id: 7, op: op.clone() }, session);
        assert!(sent.is_empty(), "the completion comes from the loop, not the port");
        let taken = p.take_guest_ops();
        assert_eq!(taken.len(), 1);
        assert_eq!((taken[0].session, taken[0].op_id, &taken[0].op), (session, 7, &op));
        assert!(p.take_guest_ops().is_empty());
        let done = GuestOpDone { op_id: 7, ret: 10, ..Default::default() };
        assert!(p.send_guest_op_done(session, done.clone()));
        assert!(!p.send_guest_op_done(session ^ 1, done.clone()), "another session's completion is dropped");
        p.flush_out().unwrap();
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0.session, session);
        assert_eq!(sent[0].1, Message::GuestOpDone(done));
    }

    #[test]
    fn close_queues_bye_in_the_session_and_stops_serving() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        p.io.budget = 0;
        let mut bytes = wire(&Message::Close { reopen_after_ms: 1500 }, session, 1);
        bytes.extend(wire(&Message::Ping { time_ns: 1 }, session, 2));
        feed(&mut p, &bytes);
        p.service(&mut e).unwrap();
        assert_eq!(p.close_request(), Some(1500));
        assert!(p.queued() > 0, "BYE waits for a writable port");
        p.io.budget = usize::MAX;
        assert!(p.flush_out().unwrap());
        let sent = take_sent(&mut p);
        assert_eq!(sent.len(), 1, "the PING after CLOSE is not served: {sent:?}");
        assert_eq!(sent[0].0.session, session);
        assert_eq!(sent[0].1, Message::Bye { reopen_after_ms: 1500, reason: "close requested".into() });

        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let sent = request(&mut p, &mut e, &Message::Reopen, session);
        assert!(matches!(&sent[..], [(_, Message::Bye { reopen_after_ms: 0, .. })]), "{sent:?}");
        assert_eq!(p.close_request(), Some(0));
        // A shutdown while that BYE is pending sends no second BYE: nothing follows a BYE.
        assert!(!p.say_bye(NO_REOPEN, "shutdown"));
        p.close(&mut e, "reopen requested");
        assert_eq!(p.state(), PortState::Disconnected);

        // Shutdown BYE only with a session.
        let (mut p, mut e) = (port(), env());
        assert!(!p.say_bye(NO_REOPEN, "shutdown"), "no session, no BYE");
        ready(&mut p, &mut e);
        assert!(p.say_bye(NO_REOPEN, "shutdown"));
        assert!(!p.say_bye(NO_REOPEN, "shutdown"), "one BYE per session");
    }

    #[test]
    fn close_stops_a_running_stream_and_nothing_follows_the_bye() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        p.io.budget = 0;
        let mut bytes = wire(&Message::Source { seed: 1, bytes: 1 << 30, chunk: 0 }, session, 1);
        bytes.extend(wire(&Message::Close { reopen_after_ms: 10 }, session, 2));
        feed(&mut p, &bytes);
        p.service(&mut e).unwrap();
        let queued = p.queued();
        // A late guest-op completion is not queued after the BYE either.
        assert!(!p.send_guest_op_done(session, GuestOpDone { op_id: 1, ..Default::default() }));
        p.io.budget = usize::MAX;
        service_until_idle(&mut p, &mut e);
        assert_eq!(p.queued(), 0);
        let sent = take_sent(&mut p);
        assert!(matches!(sent.last(), Some((_, Message::Bye { .. }))), "BYE is the last frame: {sent:?}");
        assert!(sent.len() * DEFAULT_CHUNK <= queued + DEFAULT_CHUNK, "the stream stopped at CLOSE");
        assert_eq!(p.counters().stream_aborts, 1);
    }

    #[test]
    fn a_reopen_delay_over_the_limit_is_refused() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        for ms in [60_001, NO_REOPEN] {
            expect_error(&request(&mut p, &mut e, &Message::Close { reopen_after_ms: ms }, session), error_code::LIMIT);
        }
        assert_eq!(p.close_request(), None, "the port stays open");
        let sent = request(&mut p, &mut e, &Message::Close { reopen_after_ms: 60_000 }, session);
        assert!(matches!(&sent[..], [(_, Message::Bye { reopen_after_ms: 60_000, .. })]), "{sent:?}");
    }

    #[test]
    fn probe_returns_the_raw_result_of_the_call() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        p.io.probe_result = ProbeOutcome { ret: -1, errno: Errno::EBUSY as i32, mask: 0, data: vec![] };
        let req = Message::Probe { kind: ProbeKind::Open, target: ProbeTarget::SecondFd, arg: 0 };
        let sent = request(&mut p, &mut e, &req, session);
        assert_eq!(
            sent[0].1,
            Message::ProbeResult {
                kind: ProbeKind::Open,
                target: ProbeTarget::SecondFd,
                ret: -1,
                errno: Errno::EBUSY as i32,
                mask: 0,
                data: vec![]
            }
        );
        p.io.probe_result = ProbeOutcome { ret: 3, errno: 0, mask: 0, data: b"abc".to_vec() };
        let req = Message::Probe { kind: ProbeKind::Read, target: ProbeTarget::OwnFd, arg: 1 << 30 };
        let before = p.counters().bytes_in;
        let sent = request(&mut p, &mut e, &req, session);
        assert!(matches!(&sent[0].1, Message::ProbeResult { ret: 3, data, .. } if data == b"abc"), "{sent:?}");
        assert_eq!(p.io.probes[1], (ProbeKind::Read, ProbeTarget::OwnFd, MAX_PROBE_READ as u32), "read size capped");
        assert_eq!(p.counters().bytes_in - before, 3 + wire(&req, session, 1).len() as u64);
    }

    #[test]
    fn sigio_enable_counts_samples_and_disable_stops() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        p.on_sigio(&mut e);
        assert_eq!(p.sigio().count, 0, "not counting before enable");
        let sent = request(&mut p, &mut e, &Message::Sigio { action: SigioAction::Enable }, session);
        assert_eq!(sent[0].1, Message::SigioReport { enabled: true, count: 0, samples: vec![] });
        for i in 0..70 {
            p.io.mask = if i % 2 == 0 { HOST } else { NO_HOST };
            p.on_sigio(&mut e);
        }
        p.io.mask = HOST;
        let sent = request(&mut p, &mut e, &Message::Sigio { action: SigioAction::Query }, session);
        let Message::SigioReport { enabled: true, count: 70, samples } = &sent[0].1 else { panic!("{sent:?}") };
        assert_eq!(samples.len(), MAX_SIGIO_SAMPLES);
        assert_eq!((samples[0].mask, samples[1].mask), (HOST.bits() as u16, NO_HOST.bits() as u16));
        assert!(samples.windows(2).all(|w| w[0].time_ns < w[1].time_ns));
        let sent = request(&mut p, &mut e, &Message::Sigio { action: SigioAction::Disable }, session);
        assert!(matches!(sent[0].1, Message::SigioReport { enabled: false, count: 70, .. }));
        p.on_sigio(&mut e);
        assert_eq!(p.sigio().count, 70);
        assert_eq!(p.io.async_calls, vec![true, false]);
        p.io.async_err = Some(Errno::EINVAL);
        let sent = request(&mut p, &mut e, &Message::Sigio { action: SigioAction::Enable }, session);
        expect_error(&sent, error_code::INTERNAL);
    }

    #[test]
    fn source_streams_the_pattern_lazily_then_reports_the_digest() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let total = 3 * SOURCE_LOW_WATER as u64 + 123;
        p.io.budget = 0;
        request(&mut p, &mut e, &Message::Source { seed: 42, bytes: total, chunk: 10_000 }, session);
        assert!(p.queued() >= SOURCE_LOW_WATER && p.queued() < SOURCE_LOW_WATER + 10_100, "lazy: {}", p.queued());
        let mut got = 0u64;
        let mut digest = StreamDigest::new();
        let mut done = None;
        let mut d = Decoder::default();
        for _ in 0..100 {
            p.io.budget = 100_000;
            p.service(&mut e).unwrap();
            d.push(&std::mem::take(&mut p.io.written));
            for f in d.by_ref() {
                let f = f.unwrap();
                let (h, m) = (f.header, Message::from_frame(&f).unwrap());
                assert_eq!(h.session, session);
                match m {
                    Message::Data { offset, bytes } => {
                        assert_eq!(offset, got);
                        assert!(bytes.len() <= 10_000);
                        assert_eq!(pattern::first_mismatch(42, offset, &bytes), None);
                        digest.update(&bytes);
                        got += bytes.len() as u64;
                    }
                    Message::SourceDone { bytes, digest } => done = Some((bytes, digest)),
                    other => panic!("{other:?}"),
                }
            }
            if done.is_some() {
                break;
            }
        }
        assert_eq!(got, total);
        assert_eq!(done, Some((total, digest.digest())));
        assert_eq!(digest.digest(), pattern::pattern_digest(42, total));

        // A session that ends aborts a running SOURCE.
        p.io.budget = 0;
        request(&mut p, &mut e, &Message::Source { seed: 1, bytes: 1 << 30, chunk: 0 }, session);
        p.io.mask = NO_HOST;
        p.service(&mut e).unwrap();
        assert_eq!(p.counters().stream_aborts, 1);
        assert_eq!(p.queued(), 0);
    }

    #[test]
    fn guest_ops_are_refused_unless_allowed() {
        let (mut p, mut e) = (port_with(Settings::default()), env());
        let session = ready(&mut p, &mut e);
        let op = GuestOp::Open { port: "/etc/passwd".into(), nonblock: true, sigio: false };
        let sent = request(&mut p, &mut e, &Message::GuestOp { op_id: 3, op }, session);
        expect_error(&sent, error_code::DENIED);
        assert!(matches!(&sent[0].1, Message::Error { about_kind: 0x50, about_seq: 1, text, .. }
            if text.contains("guest ops disabled") && text.contains("--allow-guest-ops")));
        assert!(p.take_guest_ops().is_empty(), "nothing reaches the loop: nothing is opened");
        assert_eq!(p.counters().refusals, 1);
    }

    #[test]
    fn streams_over_the_limit_are_refused() {
        let limits = Limits { max_stream_bytes: 1000, ..Limits::default() };
        let (mut p, mut e) = (port_with(Settings { limits, ..Settings::default() }), env());
        let session = ready(&mut p, &mut e);
        for m in [Message::Source { seed: 1, bytes: 1001, chunk: 0 }, Message::Sink { seed: 1, bytes: 1 << 40 }] {
            let sent = request(&mut p, &mut e, &m, session);
            expect_error(&sent, error_code::LIMIT);
        }
        // At the limit is fine.
        let sent = request(&mut p, &mut e, &Message::Source { seed: 1, bytes: 1000, chunk: 0 }, session);
        assert!(matches!(sent.last(), Some((_, Message::SourceDone { bytes: 1000, .. }))), "{sent:?}");
        assert_eq!(p.counters().refusals, 2);
    }

    #[test]
    fn echo_says_exactly_what_it_lacks() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let sent = request(&mut p, &mut e, &Message::Echo(b"x".to_vec()), 0);
        expect_error(&sent, error_code::BAD_STATE);
        assert!(
            matches!(&sent[0].1, Message::Error { text, .. }
            if text.contains("needs the READY session's id") && text.contains("0x00000000")),
            "{sent:?}"
        );
        let sent = request(&mut p, &mut e, &Message::Echo(b"x".to_vec()), session);
        assert_eq!(sent[0].1, Message::EchoReply(b"x".to_vec()));
    }

    #[test]
    fn a_hello_request_in_ready_ends_the_old_sessions_work_at_once() {
        let (mut p, mut e) = (port(), env());
        let old = ready(&mut p, &mut e);
        // A long SOURCE, and a host that takes only 1000 bytes: the queue holds a frame cut in
        // the middle on the wire plus more unsent frames.
        p.io.budget = 1000;
        feed(&mut p, &wire(&Message::Source { seed: 9, bytes: 1 << 30, chunk: 0 }, old, 1));
        p.service(&mut e).unwrap();
        assert!(p.queued() > DEFAULT_CHUNK, "{}", p.queued());
        let mut wire_bytes = std::mem::take(&mut p.io.written);
        // A new client (the old one left without the agent seeing it) asks for a session.
        p.io.budget = usize::MAX;
        feed(&mut p, &wire(&Message::HelloRequest, 0, 0));
        service_until_idle(&mut p, &mut e);
        wire_bytes.extend(std::mem::take(&mut p.io.written));
        // Whole frames only: the frame cut on the wire was finished, the rest dropped.
        let mut d = Decoder::default();
        d.push(&wire_bytes);
        let frames: Vec<(Header, Message)> =
            d.by_ref().map(|f| f.unwrap()).map(|f| (f.header, Message::from_frame(&f).unwrap())).collect();
        assert_eq!(d.buffered(), 0, "no torn frame");
        assert_eq!(d.stats().errors, 0);
        let (last_h, last) = frames.last().unwrap();
        let Message::Hello(hello) = last else { panic!("the HELLO comes last: {frames:?}") };
        assert_ne!(last_h.session, old);
        assert!(frames[..frames.len() - 1].iter().all(|(h, m)| h.session == old && matches!(m, Message::Data { .. })));
        assert_eq!(frames.len(), 2, "one DATA frame (the one started) then the HELLO");
        assert_eq!(p.counters().stream_aborts, 1);
        assert!(p.counters().dropped_bytes > 0);
        assert_eq!(p.state(), PortState::Connected { session: last_h.session, nonce: hello.nonce });
        // Nothing of the old stream follows.
        service_until_idle(&mut p, &mut e);
        assert!(take_sent(&mut p).is_empty());
    }

    #[test]
    fn a_hello_request_is_read_between_write_budgets_of_a_stream() {
        let (mut p, mut e) = (port(), env());
        let old = ready(&mut p, &mut e);
        feed(&mut p, &wire(&Message::Source { seed: 9, bytes: 1 << 30, chunk: 0 }, old, 1));
        assert_eq!(p.service(&mut e).unwrap(), Health::MoreWork, "a 1 GiB stream stops at the budget");
        let first = std::mem::take(&mut p.io.written).len();
        assert!(first <= Limits::default().write_budget + MAX_WRITE, "{first}");
        feed(&mut p, &wire(&Message::HelloRequest, 0, 0));
        assert_eq!(p.service(&mut e).unwrap(), Health::Open, "the request ended the stream");
        assert!(matches!(p.state(), PortState::Connected { .. }));
        assert_eq!(p.counters().stream_aborts, 1);
    }

    #[test]
    fn a_torn_frame_left_by_a_client_is_cut_by_the_next_clients_hello_request() {
        let (mut p, mut e) = (port(), env());
        let old = ready(&mut p, &mut e);
        let big = wire(&Message::Echo(vec![7; 4096]), old, 1);
        feed(&mut p, &big[..2048]);
        p.service(&mut e).unwrap();
        assert!(take_sent(&mut p).is_empty(), "half a frame: nothing to do yet");
        feed(&mut p, &wire(&Message::HelloRequest, 0, 0));
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        // The new session is offered, and the torn frame reported in it.
        assert_eq!(sent.len(), 2, "{sent:?}");
        let (session, _) = expect_hello(&sent[..1]);
        assert_ne!(session, old);
        assert!(
            matches!(&sent[1], (h, Message::Error { code: error_code::DECODE, about_kind: 0, text, .. })
            if h.session == session && text.starts_with("torn frame at stream offset 42: its header announced 4096")),
            "{sent:?}"
        );
        assert_eq!((p.counters().torn_frames, p.counters().decode_errors), (1, 1));
    }

    #[test]
    fn decode_errors_and_garbage_are_reported_within_the_rate_limit() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        feed(&mut p, b"hello agent\n");
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert!(
            matches!(&sent[..], [(h, Message::Error { code: error_code::DECODE, text, .. })]
            if h.session == session && text.starts_with("skipped 12 bytes")),
            "{sent:?}"
        );
        // 30 frames with a damaged payload: 10 reports per second at most (the test clock
        // advances 1 us per reading), and the held-back ones are counted.
        let mut bad = wire(&Message::Ping { time_ns: 1 }, session, 2);
        bad[26] ^= 0xFF;
        for _ in 0..30 {
            feed(&mut p, &bad);
        }
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        let reports = sent.iter().filter(|(_, m)| matches!(m, Message::Error { code: error_code::DECODE, .. })).count();
        assert_eq!(reports, 9, "10 per window, one used by the garbage report: {sent:?}");
        let stats = p.stats(&mut e);
        let get = |n: &str| stats.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        assert_eq!(get("decode_errors"), Some(30));
        assert_eq!(get("decode_reports"), Some(10));
        assert_eq!(get("decode_reports_held_back"), Some(21));
        // A second later the next report says how many were held back.
        e.now += 2_000_000_000;
        feed(&mut p, &bad);
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        assert!(
            matches!(&sent[..], [(_, Message::Error { text, .. })] if text.contains("(21 earlier reports held back")),
            "{sent:?}"
        );
    }

    #[test]
    fn a_burst_of_garbage_gets_one_report_naming_where_it_ended() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let start = p.decoder.stream_offset();
        // 20 KiB of garbage in five reads, then a PING: one report, the garbage ending where the
        // PING begins, then the PONG.
        let mut bytes = vec![b'x'; 20 * 1024];
        bytes.extend(wire(&Message::Ping { time_ns: 5 }, session, 2));
        feed(&mut p, &bytes);
        p.service(&mut e).unwrap();
        let sent = take_sent(&mut p);
        let want = format!(
            "skipped 20480 bytes that are not part of any frame, the last just before stream offset {}",
            start + 20480
        );
        assert!(
            matches!(&sent[..], [(_, Message::Error { code: error_code::DECODE, text, .. }), (_, Message::Pong { .. })]
            if text.starts_with(&want)),
            "{sent:?}"
        );
    }

    #[test]
    fn garbage_before_a_damaged_frame_is_reported_before_the_frame() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        let start = p.decoder.stream_offset();
        let mut bytes = b"hello agent\n".to_vec();
        let mut bad = wire(&Message::Ping { time_ns: 1 }, session, 2);
        bad[30] ^= 0xFF; // the payload: a bad frame crc
        bytes.extend(&bad);
        feed(&mut p, &bytes);
        p.service(&mut e).unwrap();
        let texts: Vec<String> = take_sent(&mut p)
            .into_iter()
            .map(|(_, m)| match m {
                Message::Error { code: error_code::DECODE, text, .. } => text,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(
            texts[0].starts_with(&format!(
                "skipped 12 bytes that are not part of any frame, the last just before stream offset {}",
                start + 12
            )),
            "{texts:?}"
        );
        assert_eq!(texts[1], format!("bad frame crc at stream offset {}", start + 12));
    }

    #[test]
    fn reading_stops_at_the_read_budget_and_goes_on_at_the_next_turn() {
        let limits = Limits { read_budget: 10 * 1024, ..Limits::default() };
        let (mut p, mut e) = (port_with(Settings { limits, ..Settings::default() }), env());
        let session = ready(&mut p, &mut e);
        // 64 KiB of SINK data that needs no answer: a flood no output queue would stop.
        feed(&mut p, &wire(&Message::Sink { seed: 4, bytes: 60_000 }, session, 1));
        let mut data = vec![0u8; 60_000];
        pattern::fill(4, 0, &mut data);
        feed(&mut p, &wire(&Message::Data { offset: 0, bytes: data }, session, 2));
        let before = p.counters().bytes_in;
        assert_eq!(p.service(&mut e).unwrap(), Health::MoreWork);
        let taken = p.counters().bytes_in - before;
        // The read that crosses the budget is the last one of the turn.
        assert!(taken <= (10 * 1024 + READ_BUF) as u64, "{taken} bytes read in one turn");
        let calls = service_until_idle(&mut p, &mut e);
        assert!(calls >= 4, "{calls}");
        let sent = take_sent(&mut p);
        assert!(
            matches!(&sent[..], [(_, Message::SinkResult { bytes: 60_000, first_mismatch: NO_MISMATCH, .. })]),
            "{sent:?}"
        );
    }

    #[test]
    fn skipped_bytes_and_held_back_reports_survive_a_reopen() {
        let (mut p, mut e) = (port(), env());
        ready(&mut p, &mut e);
        feed(&mut p, b"garbage!");
        p.service(&mut e).unwrap();
        let get =
            |p: &Port<Fake>, e: &mut TestEnv, n: &str| p.stats(e).into_iter().find(|(k, _)| k == n).map(|(_, v)| v);
        assert_eq!(get(&p, &mut e, "skipped_bytes"), Some(8));
        let carry = p.into_carry();
        let p2 = Port::with_carry(
            "org.vport.0".into(),
            "vport0p1".into(),
            Fake::new(),
            Rc::new(AgentInfo { agent_version: "x".into(), kernel_release: "k".into(), boot_id: "b".into() }),
            Rc::new(Settings::default()),
            carry,
        );
        assert_eq!(get(&p2, &mut e, "skipped_bytes"), Some(8));
    }

    #[test]
    fn sink_verifies_in_order_and_reports_the_first_mismatch() {
        let (mut p, mut e) = (port(), env());
        let session = ready(&mut p, &mut e);
        expect_error(
            &request(&mut p, &mut e, &Message::Data { offset: 0, bytes: vec![0] }, session),
            error_code::BAD_STATE,
        );

        let mut stream = vec![0u8; 50_000];
        pattern::fill(9, 0, &mut stream);
        assert!(request(&mut p, &mut e, &Message::Sink { seed: 9, bytes: 50_000 }, session).is_empty());
        let mut sent = vec![];
        for (i, c) in stream.chunks(7_000).enumerate() {
            sent = request(&mut p, &mut e, &Message::Data { offset: (i * 7_000) as u64, bytes: c.to_vec() }, session);
        }
        let good = Message::SinkResult {
            bytes: 50_000,
            digest: pattern::pattern_digest(9, 50_000),
            first_mismatch: NO_MISMATCH,
        };
        assert_eq!(sent, vec![(sent[0].0, good)]);

        // A flipped byte is located exactly.
        let mut bad = stream.clone();
        bad[12_345] ^= 0x40;
        request(&mut p, &mut e, &Message::Sink { seed: 9, bytes: 50_000 }, session);
        let sent = request(&mut p, &mut e, &Message::Data { offset: 0, bytes: bad }, session);
        assert!(matches!(sent[0].1, Message::SinkResult { bytes: 50_000, first_mismatch: 12_345, .. }), "{sent:?}");

        // A gap counts as a mismatch at the expected offset.
        request(&mut p, &mut e, &Message::Sink { seed: 9, bytes: 20_000 }, session);
        request(&mut p, &mut e, &Message::Data { offset: 0, bytes: stream[..10_000].to_vec() }, session);
        let sent =
            request(&mut p, &mut e, &Message::Data { offset: 11_000, bytes: stream[11_000..21_000].to_vec() }, session);
        assert!(matches!(sent[0].1, Message::SinkResult { first_mismatch: 10_000, .. }), "{sent:?}");
        // A zero-byte SINK answers at once.
        let sent = request(&mut p, &mut e, &Message::Sink { seed: 9, bytes: 0 }, session);
        assert!(matches!(sent[0].1, Message::SinkResult { bytes: 0, first_mismatch: NO_MISMATCH, .. }));
    }

    #[test]
    fn stats_and_events_report_counters_and_stamped_transitions() {
        let (mut p, mut e) = (port(), env());
        p.counters_mut().ebusy = 2;
        e.wakeups = 5;
        let session = ready(&mut p, &mut e);
        e.wakeups = 9;
        let sent = request(&mut p, &mut e, &Message::Stats, session);
        let Message::StatsReply(pairs) = &sent[0].1 else { panic!("{sent:?}") };
        let get = |n: &str| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        assert_eq!(get("ebusy"), Some(2));
        assert_eq!(get("sessions"), Some(1));
        assert_eq!(get("frames_in"), Some(2));
        assert_eq!(get("wakeups"), Some(9));
        assert_eq!(get("ebusy_total"), Some(3));
        for name in [
            "bytes_in",
            "bytes_out",
            "frames_out",
            "decode_errors",
            "stale_frames",
            "hello_repeats",
            "illegal_transitions",
            "dropped_bytes",
            "short_writes",
            "queue_overflows",
            "opens",
            "closes",
        ] {
            assert!(get(name).is_some(), "{name} missing");
        }

        let sent = request(&mut p, &mut e, &Message::Events { since_seq: 1 }, session);
        let Message::EventsReply { first_seq: 0, next_seq: 2, records } = &sent[0].1 else { panic!("{sent:?}") };
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!((r.seq, r.from, r.to, r.session), (1, StateCode::Connected, StateCode::Ready, session));
        assert_eq!((r.wakeups, r.cpu_ns, r.cause.as_str()), (5, 50, "hello ack"));

        // Counters and ring survive a close and reopen.
        p.close(&mut e, "reopen requested");
        let carry = std::mem::replace(&mut p, port()).into_carry();
        assert_eq!(carry.history.next_seq(), 3);
        let p2 = Port::with_carry(
            "org.vport.0".into(),
            "vport0p1".into(),
            Fake::new(),
            p.info.clone(),
            p.settings.clone(),
            carry,
        );
        assert_eq!(p2.counters().ebusy, 2);
        assert_eq!(p2.history().since(0).last().unwrap().transition.to, PortState::Disconnected);
    }

    #[test]
    fn queue_overflow_is_counted_not_silent() {
        let mut q = OutQueue::new(10);
        assert_eq!(q.push(&[1; 6]), Ok(()));
        assert_eq!(q.push(&[2; 6]), Err(6));
        assert_eq!(q.front(4), &[1; 4]);
        q.consume(4);
        assert_eq!(q.push(&[3; 8]), Ok(()));
        assert_eq!(q.len(), 10);
        assert_eq!(q.front(100), &[1, 1, 3, 3, 3, 3, 3, 3, 3, 3]);
        assert_eq!(q.clear(), 10);
    }
}
