//! Target `agent_port`: the agent's frame handling, a [`vport_agent::port::Port`] driven by a
//! scripted fake port ([`FakeIo`]) and environment ([`FuzzEnv`]).
//!
//! The script plays host and kernel at once: it queues reads (raw bytes, frames, typed
//! requests, HELLO_ACKs with the nonce the port offered, `read() == 0`, errnos), sets the poll
//! mask (host connected, no host, unplugged), write budgets, short writes and errnos, and
//! calls the port the way the event loop does (`service`, guest-op completions, SIGIO, close
//! and reopen with the carried counters, shutdown BYE).
//!
//! Work per input is capped: at most [`WRITE_CAP`] bytes are ever accepted by the fake's
//! writes (a SOURCE of 2^64 bytes stops there: writes return EAGAIN), and [`MAX_OPS`] steps.
//!
//! # What is checked
//!
//! Output (every byte the port wrote, per open of the port):
//! - it is **whole, valid frames** (magic, version, both CRCs, payload within the default
//!   limit), except that a frame may be cut short where the port may have dropped its queue (a
//!   `read() == 0`, a poll showing POLLHUP, a close), and the last frame may be incomplete while
//!   the rest is still queued;
//! - every frame **parses** as a message of a type the agent sends, with flags 0; every write
//!   is at most 32 KiB;
//! - **sequence numbers** go up by one per frame; only a new session's HELLO starts again at 0;
//!   a HELLO with seq > 0 repeats the current offer (same session and nonce);
//! - **replies match requests** (requests are found by decoding every byte the host side fed):
//!   PONG echoes a PING's time, ECHO_REPLY an ECHO's bytes, DATA is the pattern of a SOURCE's
//!   seed at its offset, SOURCE_DONE has a SOURCE's length and digest, GUEST_OP_DONE an accepted
//!   op's id, each in the request's session; every reply's session is 0, one the host used or
//!   one the agent offered; ERROR codes are the documented ones;
//! - nothing of a session follows its **BYE**.
//!
//! State and counters, after every step:
//! - after `service` returned `Open`, the state follows the mask: a host attached means a
//!   session (CONNECTED or READY), no host means DISCONNECTED;
//! - `bytes_out` is exactly what the fake accepted, `bytes_in` exactly what reads (and own-fd
//!   read probes) returned; the decoder's `bytes_in`, frames and errors match this open's reads,
//!   `frames_in` and `decode_errors`; counters never go down; the queue stays within its limit;
//! - the life-cycle ring is continuous (each record starts where the previous ended) and ends
//!   in the current state; `STATS` names are unique.
//!
//! Never panicking is implied (and the port must not loop for ever: libFuzzer's timeout).

use crate::input::{put_u16, Input};
use nix::errno::Errno;
use nix::poll::PollFlags;
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use vport_agent::port::{AgentInfo, Carry, Counters, Env, Health, Port, PortIo, ProbeOutcome, MAX_WRITE, QUEUE_LIMIT};
use vport_common::frame::{DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAGIC, OVERHEAD, VERSION};
use vport_common::message::{GuestOp, GuestOpDone, Hello, MessageType as T, ProbeKind, ProbeTarget};
use vport_common::pattern;
use vport_common::{Frame, Message, PortState};

// ---- adapter: the agent API this target uses ---------------------------------------------------

/// The port's name, and what its HELLO says about the agent.
const NAME: &str = "org.vport.0";
const AGENT_VERSION: &str = "fuzz-agent";

/// A port in DISCONNECTED over `io`, continuing `carry` (the counters and ring of an earlier
/// open), as the event loop makes one.
fn open_port(io: FakeIo, carry: Carry) -> Port<FakeIo> {
    let info = Rc::new(AgentInfo {
        agent_version: AGENT_VERSION.into(),
        kernel_release: "6.1.0-fuzz".into(),
        boot_id: "fuzz-boot".into(),
    });
    Port::with_carry(NAME.into(), "vport0p1".into(), io, info, carry)
}

/// Counters as a list, to check that none goes down (a new counter belongs here).
fn counter_list(c: &Counters) -> [(&'static str, u64); 20] {
    [
        ("bytes_in", c.bytes_in),
        ("bytes_out", c.bytes_out),
        ("frames_in", c.frames_in),
        ("frames_out", c.frames_out),
        ("sessions", c.sessions),
        ("hello_repeats", c.hello_repeats),
        ("decode_errors", c.decode_errors),
        ("stale_frames", c.stale_frames),
        ("illegal_transitions", c.illegal_transitions),
        ("errors_sent", c.errors_sent),
        ("errors_received", c.errors_received),
        ("dropped_bytes", c.dropped_bytes),
        ("queue_overflows", c.queue_overflows),
        ("short_writes", c.short_writes),
        ("ebusy", c.ebusy),
        ("opens", c.opens),
        ("closes", c.closes),
        ("stream_aborts", c.stream_aborts),
        ("bye_flush_timeouts", c.bye_flush_timeouts),
        ("sigio_signals", c.sigio_signals),
    ]
}

// ---- end of adapter ----------------------------------------------------------------------------

/// Most bytes the fake accepts in writes over one input.
pub const WRITE_CAP: usize = 512 * 1024;
/// Most script steps per input.
pub const MAX_OPS: usize = 2000;

/// Host presence as the fake's poll reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// POLLOUT (| POLLIN with input waiting): a host client is attached.
    Host,
    /// POLLIN | POLLHUP: no host client; reads return 0, writes block (EAGAIN).
    NoHost,
    /// POLLHUP alone: the port was unplugged; reads and writes fail with ENODEV.
    Unplugged,
}

/// One queued result of `read(2)`.
#[derive(Debug)]
enum ReadItem {
    Data(Vec<u8>),
    Zero,
    Err(Errno),
}

/// The fake's state, shared by the harness and the [`FakeIo`] the port owns.
#[derive(Debug)]
struct Wire {
    mode: Mode,
    reads: VecDeque<ReadItem>,
    /// One-shot errors for the next poll and the next writes.
    poll_err: Option<Errno>,
    write_errs: VecDeque<Errno>,
    /// Most bytes one write accepts (0: writes return 0).
    write_chunk: usize,
    /// Bytes writes accept before EAGAIN (set by the script), and what is left of [`WRITE_CAP`].
    budget: usize,
    cap_left: usize,
    /// What the current open of the port wrote, and the offsets in it where the port may have
    /// dropped its queue (it learnt that the host is gone, or was closed).
    written: Vec<u8>,
    cuts: Vec<usize>,
    /// Every byte reads returned (all opens), to find the requests replies answer.
    fed: Vec<u8>,
    bytes_read: u64,
    bytes_read_this_open: u64,
    bytes_written: u64,
    probe: ProbeOutcome,
    probe_data_len: usize,
    probe_read_bytes: u64,
    async_err: Option<Errno>,
}

/// The port's fd, as the agent's [`PortIo`] sees it.
#[derive(Debug)]
pub struct FakeIo {
    wire: Rc<RefCell<Wire>>,
}

impl PortIo for FakeIo {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        let mut w = self.wire.borrow_mut();
        if w.mode == Mode::Unplugged {
            return Err(Errno::ENODEV);
        }
        match w.reads.pop_front() {
            Some(ReadItem::Data(mut d)) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                if n < d.len() {
                    w.reads.push_front(ReadItem::Data(d.split_off(n)));
                }
                w.fed.extend_from_slice(&buf[..n]);
                w.bytes_read += n as u64;
                w.bytes_read_this_open += n as u64;
                Ok(n)
            }
            Some(ReadItem::Zero) => {
                // read() == 0: the host client is gone (until the script attaches one again).
                w.mode = Mode::NoHost;
                let at = w.written.len();
                w.cuts.push(at);
                Ok(0)
            }
            Some(ReadItem::Err(e)) => Err(e),
            None if w.mode == Mode::Host => Err(Errno::EAGAIN),
            None => {
                let at = w.written.len();
                w.cuts.push(at);
                Ok(0)
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, Errno> {
        assert!(buf.len() <= MAX_WRITE, "a write of {} bytes: the port accepts at most {MAX_WRITE}", buf.len());
        let mut w = self.wire.borrow_mut();
        if let Some(e) = w.write_errs.pop_front() {
            return Err(e);
        }
        match w.mode {
            Mode::Unplugged => return Err(Errno::ENODEV),
            Mode::NoHost => return Err(Errno::EAGAIN),
            Mode::Host => {}
        }
        if w.write_chunk == 0 {
            return Ok(0);
        }
        let n = buf.len().min(w.write_chunk).min(w.budget).min(w.cap_left);
        if n == 0 {
            return Err(Errno::EAGAIN);
        }
        w.budget -= n;
        w.cap_left -= n;
        w.written.extend_from_slice(&buf[..n]);
        w.bytes_written += n as u64;
        Ok(n)
    }

    fn poll_mask(&mut self) -> Result<PollFlags, Errno> {
        let mut w = self.wire.borrow_mut();
        if let Some(e) = w.poll_err.take() {
            return Err(e);
        }
        let at = w.written.len();
        Ok(match w.mode {
            Mode::Host if w.reads.is_empty() => PollFlags::POLLOUT,
            Mode::Host => PollFlags::POLLOUT | PollFlags::POLLIN,
            Mode::NoHost => {
                w.cuts.push(at);
                PollFlags::POLLIN | PollFlags::POLLHUP
            }
            Mode::Unplugged => {
                w.cuts.push(at);
                PollFlags::POLLHUP
            }
        })
    }

    fn probe(&mut self, kind: ProbeKind, target: ProbeTarget, arg: u32) -> ProbeOutcome {
        assert!(arg as usize <= vport_agent::port::MAX_PROBE_READ, "probe arg {arg} over MAX_PROBE_READ");
        let mut w = self.wire.borrow_mut();
        let mut out = w.probe.clone();
        if kind == ProbeKind::Read {
            let n = w.probe_data_len.min(arg as usize);
            out.data = vec![0x5a; n];
            if target == ProbeTarget::OwnFd {
                w.probe_read_bytes += n as u64;
            }
        }
        out
    }

    fn set_async(&mut self, _on: bool) -> Result<(), Errno> {
        self.wire.borrow().async_err.map_or(Ok(()), Err)
    }
}

/// Clock and randomness: the clock advances 1 µs per reading; randomness is splitmix64 from
/// an input-chosen seed.
#[derive(Debug)]
pub struct FuzzEnv {
    now: u64,
    rng: u64,
    wakeups: u64,
}

impl Env for FuzzEnv {
    fn now_ns(&mut self) -> u64 {
        self.now += 1000;
        self.now
    }
    fn random_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn wakeups(&mut self) -> u64 {
        self.wakeups += 1;
        self.wakeups
    }
    fn cpu_ns(&mut self) -> u64 {
        self.now / 2
    }
    fn agent_stats(&mut self) -> Vec<(&'static str, u64)> {
        vec![("wakeups", self.wakeups), ("ebusy_total", 0), ("pid", 1)]
    }
}

const ERRNOS: [Errno; 6] = [Errno::EAGAIN, Errno::EINTR, Errno::ENODEV, Errno::EIO, Errno::EBADF, Errno::EPIPE];

/// The harness: the port, its fake, and what the checks remember.
struct Harness {
    wire: Rc<RefCell<Wire>>,
    port: Port<FakeIo>,
    env: FuzzEnv,
    /// Guest ops taken from the port and not completed yet: (session, op_id).
    deferred: Vec<(u32, u32)>,
    /// The counters after the previous step.
    prev: Counters,
    /// `frames_in` and `decode_errors` when this open began (the decoder is per open).
    frames_in_at_open: u64,
    errors_at_open: u64,
    /// Sessions the port has been in (for the "previous session" selector and reply checks).
    sessions: Vec<u32>,
    /// Service steps since the port asked to be closed (CLOSE or REOPEN served).
    closing: u32,
}

impl Harness {
    fn new(env_seed: u8) -> Self {
        let wire = Rc::new(RefCell::new(Wire {
            mode: Mode::NoHost,
            reads: VecDeque::new(),
            poll_err: None,
            write_errs: VecDeque::new(),
            write_chunk: MAX_WRITE,
            budget: usize::MAX,
            cap_left: WRITE_CAP,
            written: Vec::new(),
            cuts: Vec::new(),
            fed: Vec::new(),
            bytes_read: 0,
            bytes_read_this_open: 0,
            bytes_written: 0,
            probe: ProbeOutcome::default(),
            probe_data_len: 0,
            probe_read_bytes: 0,
            async_err: None,
        }));
        let port = open_port(FakeIo { wire: Rc::clone(&wire) }, Carry::default());
        let env = FuzzEnv { now: 0, rng: u64::from(env_seed), wakeups: 0 };
        let prev = port.counters();
        Harness {
            wire,
            port,
            env,
            deferred: Vec::new(),
            prev,
            frames_in_at_open: 0,
            errors_at_open: 0,
            sessions: Vec::new(),
            closing: 0,
        }
    }

    fn current_session(&self) -> u32 {
        self.port.state().session().unwrap_or(0)
    }

    /// The header session for a frame the script sends: 0, the current one, the previous one,
    /// or one from the input.
    fn session(&self, sel: u8, input: &mut Input) -> u32 {
        match sel % 4 {
            0 => 0,
            1 => self.current_session(),
            2 => {
                let cur = self.current_session();
                self.sessions.iter().rev().copied().find(|&s| s != cur).unwrap_or(0)
            }
            _ => input.u32(),
        }
    }

    /// Queues `bytes` as the result of the next read (nothing for no bytes: a read returning 0
    /// means "no host", which is [`ops::READ_ZERO`]).
    fn feed(&self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.wire.borrow_mut().reads.push_back(ReadItem::Data(bytes));
        }
    }

    fn feed_message(&self, m: &Message, session: u32, seq: u32) {
        // Requests built here are small: an encode failure is a finding in the encoder.
        let frame = m.to_frame(session, seq).expect("a request frames");
        self.feed(frame.encode().expect("a request encodes"));
    }

    /// One step of the event loop for this port: `service`, the guest ops it accepted (even
    /// op ids complete at once, odd ones later), and the close it asked for.
    fn service(&mut self) {
        let health = self.port.service(&mut self.env);
        if let Ok(Health::Open) = health {
            let state = self.port.state();
            match self.wire.borrow().mode {
                Mode::Host => assert!(state.session().is_some(), "a host is attached but the port is {state:?}"),
                Mode::NoHost => assert_eq!(state, PortState::Disconnected, "no host is attached"),
                Mode::Unplugged => {}
            }
        }
        self.note_session();
        for (session, op_id, _op) in self.port.take_guest_ops() {
            if op_id % 2 == 0 {
                self.complete(session, op_id);
            } else {
                self.deferred.push((session, op_id));
            }
        }
        let flushed = self.port.flush_out();
        match health {
            Ok(Health::Open) if flushed.is_err() => self.reopen("i/o error"),
            Ok(Health::Open) if self.port.close_request().is_some() => {
                // The loop closes once BYE (and what was queued before it) is written, or after
                // its flush bound: here, the third service step.
                self.closing += 1;
                if self.port.queued() == 0 || self.closing >= 3 {
                    if self.port.queued() > 0 {
                        self.port.counters_mut().bye_flush_timeouts += 1;
                    }
                    self.reopen("close requested");
                }
            }
            Ok(Health::Open) => {}
            Ok(Health::Unplugged) => self.reopen("unplugged"),
            Err(_) => self.reopen("i/o error"),
        }
    }

    fn complete(&mut self, session: u32, op_id: u32) {
        let ready = self.port.session_is_ready(session);
        let done = GuestOpDone { op_id, ret: 0, data: b"done".to_vec(), ..GuestOpDone::default() };
        let sent = self.port.send_guest_op_done(session, done);
        assert!(!sent || ready, "GUEST_OP_DONE queued for session {session:#x}, which is not READY");
    }

    fn note_session(&mut self) {
        if let Some(s) = self.port.state().session() {
            if self.sessions.last() != Some(&s) {
                self.sessions.push(s);
            }
        }
    }

    /// Closes this open of the port as the event loop does, checks what it wrote, and opens the
    /// port again with the carried counters and ring.
    fn reopen(&mut self, cause: &'static str) {
        self.port.close(&mut self.env, cause);
        self.port.counters_mut().closes += 1;
        {
            let mut w = self.wire.borrow_mut();
            let at = w.written.len();
            w.cuts.push(at);
        }
        self.check_output(false);
        let fresh = open_port(FakeIo { wire: Rc::clone(&self.wire) }, Carry::default());
        let old = std::mem::replace(&mut self.port, fresh);
        let carry = old.into_carry();
        let fresh = open_port(FakeIo { wire: Rc::clone(&self.wire) }, carry);
        self.port = fresh;
        let mut w = self.wire.borrow_mut();
        w.written.clear();
        w.cuts.clear();
        w.bytes_read_this_open = 0;
        self.deferred.clear();
        self.closing = 0;
        self.frames_in_at_open = self.port.counters().frames_in;
        self.errors_at_open = self.port.counters().decode_errors;
    }

    /// Invariants of state and counters, after every step.
    fn check_state(&mut self) {
        let c = self.port.counters();
        for ((name, now), (_, before)) in counter_list(&c).into_iter().zip(counter_list(&self.prev)) {
            assert!(now >= before, "counter {name} went down from {before} to {now}");
        }
        self.prev = c;
        let w = self.wire.borrow();
        assert_eq!(c.bytes_out, w.bytes_written, "bytes_out is not what writes accepted");
        assert_eq!(c.bytes_in, w.bytes_read + w.probe_read_bytes, "bytes_in is not what reads returned");
        let d = self.port.decoder_stats();
        assert_eq!(d.bytes_in, w.bytes_read_this_open, "the decoder got other bytes than this open read");
        assert_eq!(c.frames_in - self.frames_in_at_open, d.frames, "frames_in is not the frames decoded");
        assert_eq!(c.decode_errors - self.errors_at_open, d.errors, "decode_errors is not the decoder's errors");
        assert!(self.port.queued() <= QUEUE_LIMIT, "queue of {} bytes over its limit", self.port.queued());
        let mut prev_to: Option<PortState> = None;
        for r in self.port.history().since(0) {
            if let Some(to) = prev_to {
                assert_eq!(r.transition.from, to, "history record {} does not start where the last ended", r.seq);
            }
            prev_to = Some(r.transition.to);
        }
        if let Some(to) = prev_to {
            assert_eq!(to, self.port.state(), "the history does not end in the current state");
        }
    }

    /// Checks what this open of the port wrote (module documentation). `end` is true at the end
    /// of the input, where the port is still open and the rest of a frame may still be queued.
    fn check_output(&self, end: bool) {
        let w = self.wire.borrow();
        let tail_allowed = end && self.port.queued() > 0;
        let frames = split_frames(&w.written, &w.cuts, tail_allowed);
        let requests = Requests::scan(&w.fed);
        let mut offer: Option<(u32, u64)> = None;
        let mut prev_seq: Option<u32> = None;
        let mut closed: HashSet<u32> = HashSet::new();
        let mut offered: HashSet<u32> = HashSet::new();
        for (at, f) in frames {
            let h = f.header;
            let msg = match Message::from_frame(&f) {
                Ok(m) => m,
                Err(e) => panic!("offset {at}: the agent sent a frame that does not parse: {e} ({h:?})"),
            };
            assert_eq!(h.flags, 0, "offset {at}: flags");
            if closed.contains(&h.session) && !crate::allowed("after-bye") {
                panic!("offset {at}: {:?} after the BYE of session {:#x} [after-bye]", msg.kind(), h.session);
            }
            let new_offer = matches!(msg, Message::Hello(_)) && h.seq == 0;
            if let Some(p) = prev_seq {
                assert!(
                    h.seq == p.wrapping_add(1) || new_offer,
                    "offset {at}: {:?} has seq {} after seq {p}",
                    msg.kind(),
                    h.seq
                );
            }
            prev_seq = Some(h.seq);
            let s = h.session;
            match &msg {
                Message::Hello(Hello { agent_version, port_name, nonce, .. }) => {
                    assert_ne!(s, 0, "offset {at}: HELLO offers session 0");
                    assert_eq!((agent_version.as_str(), port_name.as_str()), (AGENT_VERSION, NAME), "HELLO");
                    if new_offer {
                        offer = Some((s, *nonce));
                        offered.insert(s);
                    } else {
                        assert_eq!(offer, Some((s, *nonce)), "offset {at}: a repeated HELLO is not the current offer");
                    }
                }
                Message::Bye { .. } => {
                    closed.insert(s);
                }
                Message::Pong { ping_time_ns, .. } => {
                    assert!(
                        requests.has(s, |m| matches!(m, Message::Ping { time_ns } if time_ns == ping_time_ns)),
                        "offset {at}: PONG for no PING ({ping_time_ns}) of session {s:#x}"
                    )
                }
                Message::EchoReply(bytes) => {
                    assert!(
                        requests.has(s, |m| matches!(m, Message::Echo(b) if b == bytes)),
                        "offset {at}: ECHO_REPLY of no ECHO in session {s:#x}"
                    )
                }
                Message::Data { offset, bytes } => assert!(
                    requests.has(s, |m| matches!(m, Message::Source { seed, .. }
                        if pattern::first_mismatch(*seed, *offset, bytes).is_none())),
                    "offset {at}: DATA at stream offset {offset} ({} bytes) is no SOURCE's pattern in session {s:#x}",
                    bytes.len()
                ),
                Message::SourceDone { bytes, digest } => assert!(
                    requests.has(s, |m| matches!(m, Message::Source { seed, bytes: total, .. }
                        if total == bytes && (*bytes > 1 << 20 || pattern::pattern_digest(*seed, *bytes) == *digest))),
                    "offset {at}: SOURCE_DONE ({bytes} bytes, digest {digest:#x}) matches no SOURCE of session {s:#x}"
                ),
                Message::GuestOpDone(done) => assert!(
                    requests.has(s, |m| matches!(m, Message::GuestOp { op_id, .. } if *op_id == done.op_id)),
                    "offset {at}: GUEST_OP_DONE {} for no GUEST_OP of session {s:#x}",
                    done.op_id
                ),
                Message::Error { code, .. } => assert!((1..=5).contains(code), "offset {at}: ERROR code {code}"),
                Message::SigioReport { samples, .. } => {
                    assert!(samples.len() <= vport_agent::port::MAX_SIGIO_SAMPLES, "offset {at}: SIGIO samples")
                }
                Message::ProbeResult { data, .. } => {
                    assert!(data.len() <= vport_agent::port::MAX_PROBE_READ, "offset {at}: probe data")
                }
                Message::StatsReply(_) | Message::EventsReply { .. } | Message::SinkResult { .. } => {}
                other => panic!("offset {at}: the agent sent {:?}, which it never should", other.kind()),
            }
            if !matches!(msg, Message::Hello(_)) {
                assert!(
                    s == 0 || requests.sessions.contains(&s) || offered.contains(&s) || self.sessions.contains(&s),
                    "offset {at}: {:?} in session {s:#x}, which neither side used",
                    msg.kind()
                );
            }
        }
    }
}

/// Every frame found anywhere in the bytes the host side fed (at every magic), parsed.
struct Requests {
    messages: Vec<(u32, Message)>,
    sessions: HashSet<u32>,
}

impl Requests {
    fn scan(fed: &[u8]) -> Self {
        let mut messages = Vec::new();
        let mut sessions = HashSet::new();
        for at in memchr::memmem::find_iter(fed, &MAGIC) {
            if let Parsed::Frame(f, _) = parse_at(fed, at) {
                sessions.insert(f.header.session);
                if let Ok(m) = Message::from_frame(&f) {
                    messages.push((f.header.session, m));
                }
            }
        }
        Requests { messages, sessions }
    }

    fn has(&self, session: u32, pred: impl Fn(&Message) -> bool) -> bool {
        self.messages.iter().any(|(s, m)| *s == session && pred(m))
    }
}

/// What the bytes at an offset are.
enum Parsed {
    /// A whole valid frame and its length on the wire.
    Frame(Frame, usize),
    /// A valid beginning of a frame that the bytes end within.
    Prefix,
    /// Not a frame (for a reason given).
    Bad(&'static str),
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Strict frame parse at `at`: magic, version, header CRC, length within the default payload
/// limit, frame CRC.
fn parse_at(b: &[u8], at: usize) -> Parsed {
    let rest = &b[at..];
    let m = rest.len().min(MAGIC.len());
    if rest[..m] != MAGIC[..m] {
        return Parsed::Bad("no magic");
    }
    if rest.len() < HEADER_LEN {
        return Parsed::Prefix;
    }
    if rest[4] != VERSION {
        return Parsed::Bad("version");
    }
    if crc32fast::hash(&rest[..20]) != le32(rest, 20) {
        return Parsed::Bad("header crc");
    }
    let len = le32(rest, 16);
    if len > DEFAULT_MAX_PAYLOAD {
        return Parsed::Bad("payload over the default limit");
    }
    let total = OVERHEAD + len as usize;
    if rest.len() < total {
        return Parsed::Prefix;
    }
    let body = total - 4;
    if crc32fast::hash(&rest[..body]) != le32(rest, body) {
        return Parsed::Bad("frame crc");
    }
    let header = vport_common::Header {
        kind: rest[5],
        flags: u16::from_le_bytes([rest[6], rest[7]]),
        session: le32(rest, 8),
        seq: le32(rest, 12),
    };
    Parsed::Frame(Frame { header, payload: rest[HEADER_LEN..body].to_vec() }, total)
}

/// Splits what one open wrote into whole frames (with their offsets). A frame may stop short at
/// a cut (the queue was dropped there: the next frame starts at the cut); the last one may be
/// incomplete if `tail_allowed`. Anything else fails.
fn split_frames(b: &[u8], cuts: &[usize], tail_allowed: bool) -> Vec<(usize, Frame)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let why = match parse_at(b, pos) {
            Parsed::Frame(f, n) => {
                out.push((pos, f));
                pos += n;
                continue;
            }
            Parsed::Prefix => "incomplete",
            Parsed::Bad(why) => why,
        };
        // A frame cut short where the queue may have been dropped: its bytes up to the cut are
        // a valid beginning of a frame, and what follows the cut starts a new one.
        // (The next frame may itself stop short at a later cut, even inside its magic.)
        let torn = cuts.iter().copied().find(|&c| {
            let next_end = cuts.iter().copied().filter(|&d| d > c).min().unwrap_or(b.len()).min(b.len());
            c > pos
                && c <= b.len()
                && matches!(parse_at(&b[..c], pos), Parsed::Prefix)
                && b[c..].starts_with(&MAGIC[..MAGIC.len().min(next_end - c)])
        });
        match torn {
            Some(c) => pos = c,
            None if why == "incomplete" && tail_allowed => break,
            None => panic!(
                "the agent wrote bytes that are not whole frames at offset {pos} of {} ({why}); cuts {cuts:?}: {:02x?}",
                b.len(),
                &b[pos..b.len().min(pos + 48)]
            ),
        }
    }
    out
}

/// A request the script can send: a message type and fields from the input.
fn request(idx: u8, input: &mut Input) -> Message {
    match idx % 16 {
        0 => Message::Ping { time_ns: input.u64() },
        1 => {
            let n = usize::from(input.u8());
            Message::Echo(input.bytes(n).to_vec())
        }
        2 => Message::Close { reopen_after_ms: input.u32() },
        3 => Message::Reopen,
        4 => {
            let kind = ProbeKind::from_u8(input.u8() % 6 + 1).unwrap_or(ProbeKind::Poll);
            let target = if input.u8() & 1 == 0 { ProbeTarget::OwnFd } else { ProbeTarget::SecondFd };
            Message::Probe { kind, target, arg: input.u32() }
        }
        5 => {
            let action = vport_common::message::SigioAction::from_u8(input.u8() % 3);
            Message::Sigio { action: action.unwrap_or(vport_common::message::SigioAction::Query) }
        }
        6 => {
            let seed = u64::from(input.u8());
            let bytes = match input.u8() {
                0xFF => u64::MAX,
                b => u64::from(b) << (input.u8() % 24),
            };
            Message::Source { seed, bytes, chunk: u32::from(input.u16()) << (input.u8() % 8) }
        }
        7 => Message::Sink { seed: u64::from(input.u8()), bytes: u64::from(input.u16()) },
        8 => {
            // A piece of the pattern of a small seed (what a SINK of that seed expects).
            let (seed, offset, n) = (u64::from(input.u8()), u64::from(input.u16()), usize::from(input.u8()));
            let mut bytes = vec![0; n];
            pattern::fill(seed, offset, &mut bytes);
            if input.u8() & 1 == 1 && n > 0 {
                bytes[n / 2] ^= 1;
            }
            Message::Data { offset, bytes }
        }
        9 => Message::Stats,
        10 => Message::Events { since_seq: u64::from(input.u8()) },
        11 => {
            let op_id = u32::from(input.u8());
            let op = match input.u8() % 9 {
                0 => GuestOp::Open { port: "org.vport.1".into(), nonblock: true, sigio: false },
                1 => GuestOp::Read { handle: 1, bytes: 16, all: false },
                2 => GuestOp::Write { handle: 1, seed: 1, bytes: 16 },
                3 => GuestOp::Poll { handle: 1, events: 1, timeout_ms: 0 },
                4 => GuestOp::Close { handle: 1 },
                5 => GuestOp::Cancel { handle: 1 },
                6 => GuestOp::Debugfs { port: "vport0p2".into() },
                7 => GuestOp::Sysfs,
                _ => GuestOp::SigioCount { handle: 1 },
            };
            Message::GuestOp { op_id, op }
        }
        12 => Message::HelloRequest,
        13 => Message::Error { code: input.u16(), text: "host error".into() },
        14 => Message::HelloAck { nonce: input.u64(), host_version: "fuzz-host".into() },
        _ => Message::Hello(Hello {
            agent_version: "host?".into(),
            port_name: NAME.into(),
            kernel_release: String::new(),
            boot_id: String::new(),
            nonce: 1,
            agent_time_ns: 2,
        }),
    }
}

/// Interprets `data` as a script (see [`op`]) and checks every property in the module
/// documentation.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut h = Harness::new(input.u8());
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_OPS {
        steps += 1;
        op(&mut h, &mut input);
        h.check_state();
    }
    h.check_output(true);
    // STATS names are unique (the host reads them into a map).
    let stats = h.port.stats(&mut h.env);
    let names: HashSet<&str> = stats.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), stats.len(), "duplicate STATS names: {stats:?}");
}

/// Op codes (the first byte of each step, modulo [`OPS`]).
pub mod ops {
    /// Host attached.
    pub const HOST: u8 = 0;
    /// No host.
    pub const NO_HOST: u8 = 1;
    /// Unplugged.
    pub const UNPLUG: u8 = 2;
    /// Raw bytes: length (u8), bytes.
    pub const RAW: u8 = 3;
    /// A frame: session selector (u8), type (u8), payload length (u16), payload.
    pub const FRAME: u8 = 4;
    /// A typed request: which ([`super::request`]), session selector, fields.
    pub const REQUEST: u8 = 5;
    /// HELLO_ACK: variant (0 right, 1 wrong nonce, 2 session 0, 3 previous session).
    pub const ACK: u8 = 6;
    /// read() == 0 (the host leaves).
    pub const READ_ZERO: u8 = 7;
    /// A read errno (selector).
    pub const READ_ERR: u8 = 8;
    /// Write budget (u16; 0xFFFF unlimited).
    pub const BUDGET: u8 = 9;
    /// Largest write (u16; 0 makes writes return 0).
    pub const CHUNK: u8 = 10;
    /// A one-shot write errno (selector).
    pub const WRITE_ERR: u8 = 11;
    /// A one-shot poll errno (selector).
    pub const POLL_ERR: u8 = 12;
    /// One event-loop step (`service` and what follows it).
    pub const SERVICE: u8 = 13;
    /// A SIGIO for the port.
    pub const SIGIO: u8 = 14;
    /// Complete the deferred guest ops.
    pub const COMPLETE: u8 = 15;
    /// Agent shutdown: BYE, flush, close, open again.
    pub const SHUTDOWN: u8 = 16;
    /// Close (unplug) and open again.
    pub const CLOSE: u8 = 17;
    /// Probe results: ret (u8 - 1), errno (u8), mask (u16), read length (u16).
    pub const PROBE: u8 = 18;
    /// SIGIO set-up fails from now on (bit 0 of the next byte) or not.
    pub const ASYNC_ERR: u8 = 19;
    /// How many op codes there are.
    pub const OPS: u8 = 20;
}

/// Runs one script step.
fn op(h: &mut Harness, input: &mut Input) {
    let code = input.u8() % ops::OPS;
    match code {
        ops::HOST => h.wire.borrow_mut().mode = Mode::Host,
        ops::NO_HOST => h.wire.borrow_mut().mode = Mode::NoHost,
        ops::UNPLUG => h.wire.borrow_mut().mode = Mode::Unplugged,
        ops::RAW => {
            let n = usize::from(input.u8());
            h.feed(input.bytes(n).to_vec());
        }
        ops::FRAME => {
            let sel = input.u8();
            let session = h.session(sel, input);
            let kind = input.u8();
            let n = usize::from(input.u16());
            let payload = input.bytes(n).to_vec();
            // At most 64 KiB of payload: an encode failure is a finding in the encoder.
            h.feed(Frame::new(kind, session, u32::from(sel), payload).encode().expect("a 64 KiB frame encodes"));
        }
        ops::REQUEST => {
            let idx = input.u8();
            let sel = input.u8();
            let session = h.session(sel, input);
            let m = request(idx, input);
            h.feed_message(&m, session, u32::from(idx));
        }
        ops::ACK => {
            let v = input.u8();
            let (session, nonce) = match h.port.state() {
                PortState::Connected { session, nonce } | PortState::Ready { session, nonce } => (session, nonce),
                PortState::Disconnected => (0, 0),
            };
            let (session, nonce) = match v % 4 {
                0 => (session, nonce),
                1 => (session, nonce ^ 1),
                2 => (0, nonce),
                _ => (h.session(2, input), nonce),
            };
            h.feed_message(&Message::HelloAck { nonce, host_version: "fuzz-host".into() }, session, 0);
        }
        ops::READ_ZERO => h.wire.borrow_mut().reads.push_back(ReadItem::Zero),
        ops::READ_ERR => {
            let e = ERRNOS[usize::from(input.u8()) % ERRNOS.len()];
            h.wire.borrow_mut().reads.push_back(ReadItem::Err(e));
        }
        ops::BUDGET => {
            h.wire.borrow_mut().budget = match input.u16() {
                0xFFFF => usize::MAX,
                b => usize::from(b),
            }
        }
        ops::CHUNK => h.wire.borrow_mut().write_chunk = usize::from(input.u16()),
        ops::WRITE_ERR => {
            let e = ERRNOS[usize::from(input.u8()) % ERRNOS.len()];
            h.wire.borrow_mut().write_errs.push_back(e);
        }
        ops::POLL_ERR => h.wire.borrow_mut().poll_err = Some(ERRNOS[usize::from(input.u8()) % ERRNOS.len()]),
        ops::SERVICE => h.service(),
        ops::SIGIO => h.port.on_sigio(&mut h.env),
        ops::COMPLETE => {
            for (session, op_id) in std::mem::take(&mut h.deferred) {
                h.complete(session, op_id);
            }
            let _ = h.port.flush_out();
        }
        ops::SHUTDOWN => {
            let had_session = h.port.state().session().is_some();
            let sent = h.port.say_bye(vport_common::message::NO_REOPEN, "shutdown");
            assert!(!sent || had_session, "BYE queued with no session");
            let _ = h.port.flush_out();
            h.reopen("shutdown");
        }
        ops::CLOSE => h.reopen("unplugged"),
        ops::PROBE => {
            let mut w = h.wire.borrow_mut();
            w.probe = ProbeOutcome {
                ret: i64::from(input.u8()) - 1,
                errno: i32::from(input.u8()),
                mask: input.u16(),
                data: Vec::new(),
            };
            w.probe_data_len = usize::from(input.u16());
        }
        _ => h.wire.borrow_mut().async_err = (input.u8() & 1 == 1).then_some(Errno::EIO),
    }
}

/// What a host sent, for seeds: a frame, or raw bytes (garbage, a damaged frame).
#[derive(Debug, Clone)]
pub enum HostSend {
    /// A whole frame.
    Frame(Frame),
    /// Bytes as they were written.
    Raw(Vec<u8>),
}

/// Writes seed steps that replay a host's side of a real conversation: attach a host, then
/// each thing the host sent, each followed by a service step. HELLO_ACK becomes an ACK of the
/// current offer (the fake's nonce is not the captured one); frames in one of `sessions` (the
/// sessions the captured agent offered) use the current session; raw bytes are fed as they
/// were.
pub fn seed_from_host(sent: &[HostSend], sessions: &[u32]) -> Vec<u8> {
    let mut out = vec![7, ops::HOST, ops::SERVICE];
    for item in sent {
        match item {
            HostSend::Frame(f) if f.header.kind == T::HelloAck as u8 => out.extend_from_slice(&[ops::ACK, 0]),
            HostSend::Frame(f) => {
                let sel = match f.header.session {
                    0 => 0,
                    s if sessions.contains(&s) => 1,
                    _ => 2,
                };
                out.extend_from_slice(&[ops::FRAME, sel, f.header.kind]);
                let n = f.payload.len().min(usize::from(u16::MAX));
                put_u16(&mut out, n as u16);
                out.extend_from_slice(&f.payload[..n]);
            }
            HostSend::Raw(bytes) => {
                for c in bytes.chunks(255) {
                    out.extend_from_slice(&[ops::RAW, c.len() as u8]);
                    out.extend_from_slice(c);
                }
            }
        }
        out.push(ops::SERVICE);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_with_requests() {
        let mut s = vec![1, ops::HOST, ops::SERVICE, ops::ACK, 0, ops::SERVICE];
        for idx in 0..16u8 {
            s.extend_from_slice(&[ops::REQUEST, idx, 1, 3, 4, 5, 6, 7, 8, 9, 10, ops::SERVICE]);
        }
        s.extend_from_slice(&[ops::REQUEST, 6, 1, 9, 2, 10, 0, 4, 0, ops::SERVICE, ops::SERVICE]);
        s.extend_from_slice(&[ops::READ_ZERO, ops::SERVICE, ops::HOST, ops::SERVICE, ops::SHUTDOWN]);
        run(&s);
    }

    #[test]
    fn every_op() {
        let mut s = vec![3];
        for code in 0..ops::OPS {
            s.extend_from_slice(&[ops::HOST, code, 1, 2, 3, 4, 5, 6, ops::SERVICE]);
        }
        run(&s);
    }
}
