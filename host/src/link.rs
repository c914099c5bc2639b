//! A framed, typed message link to `vport-agent` over one port's chardev connection.
//!
//! The link owns a [`Decoder`] and the host's session view: it performs the HELLO handshake
//! (asking for a HELLO with HELLO_REQUEST when none comes, because a reconnect can happen
//! without an edge the agent can see), and offers request/response helpers with deadlines.
//! Damaged bytes are counted and skipped (the decoder resynchronises); they never end the link.
//!
//! Typed commands (each sends one request in the session and waits for its typed reply until a
//! deadline; an agent ERROR answering that request is [`LinkError::Agent`]): [`Link::close`],
//! [`Link::reopen`], [`Link::probe`], [`Link::sigio`], [`Link::source`] (verified on the host
//! against the pattern), [`Link::sink`], [`Link::stats`], [`Link::events`].
//!
//! Agent ERRORs are matched to requests by the type and sequence number they name
//! (`about_kind`, `about_seq`): an ERROR answering another frame does not fail the request
//! being waited for, and an unsolicited one (a decode-error report, `about_kind` 0) is kept
//! in [`Link::agent_reports`].

use crate::chardev::Stream;
use crate::timeline::Timeline;
use std::io::ErrorKind;
use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::frame::DEFAULT_MAX_PAYLOAD;
use vport_common::message::{
    EventRecord, GuestOp, GuestOpDone, Hello, MessageType, ProbeKind, ProbeTarget, SigioAction, SigioSample,
    NO_MISMATCH,
};
use vport_common::pattern::{self, StreamDigest};
use vport_common::trace::Direction;
use vport_common::{Decoder, Frame, Message, MessageError};

/// What went wrong on a link.
#[derive(Debug, Error)]
pub enum LinkError {
    /// Reading or writing the chardev connection failed.
    #[error("i/o error on port {port}")]
    Io {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection (the VM exited or the chardev went away).
    #[error("port {port}: connection closed by qemu")]
    Closed {
        /// Port name.
        port: String,
    },
    /// Nothing awaited arrived in time.
    #[error("port {port}: no {what} within {timeout:?}")]
    Timeout {
        /// Port name.
        port: String,
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// A message could not be encoded.
    #[error("port {port}: cannot encode message")]
    Encode {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: MessageError,
    },
    /// A frame could not be encoded (payload over the protocol maximum).
    #[error("port {port}: cannot encode frame")]
    Frame {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: vport_common::FrameError,
    },
    /// The agent answered with an ERROR message.
    #[error("port {port}: agent error {code}: {text}")]
    Agent {
        /// Port name.
        port: String,
        /// Error code.
        code: u16,
        /// Error text.
        text: String,
    },
}

/// A frame received, with its parsed message and arrival time.
#[derive(Debug, Clone)]
pub struct Received {
    /// The frame.
    pub frame: Frame,
    /// The message it carries, or why it does not parse.
    pub message: Result<Message, MessageError>,
    /// Local monotonic arrival time.
    pub at: Instant,
}

/// The result of a completed handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// The agent's HELLO.
    pub hello: Hello,
    /// The session id the agent chose.
    pub session: u32,
    /// When the HELLO arrived.
    pub hello_at: Instant,
    /// HELLO_REQUESTs the host had to send before a HELLO came.
    pub requests_sent: u32,
    /// Frames received before the HELLO and not part of the handshake (for example replies of
    /// an earlier session still in flight), in arrival order.
    pub before: Vec<Received>,
}

/// The BYE the agent sent before closing its end of the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bye {
    /// Delay before the agent reopens, ms ([`vport_common::message::NO_REOPEN`]: never).
    pub reopen_after_ms: u32,
    /// Why.
    pub reason: String,
    /// The session the BYE ended.
    pub session: u32,
}

/// The raw result of a PROBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The system call's return value.
    pub ret: i64,
    /// errno when `ret == -1`.
    pub errno: i32,
    /// poll revents (Poll probes).
    pub mask: u16,
    /// Bytes read (Read probes).
    pub data: Vec<u8>,
}

/// A SIGIO report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigioOutcome {
    /// Counting.
    pub enabled: bool,
    /// Signals counted since the last enable.
    pub count: u64,
    /// The first signals' times and poll masks.
    pub samples: Vec<SigioSample>,
}

/// The life-cycle records of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsOutcome {
    /// Oldest sequence number still held by the agent.
    pub first_seq: u64,
    /// The sequence number of the next record.
    pub next_seq: u64,
    /// Records, oldest first.
    pub records: Vec<EventRecord>,
}

/// A SOURCE stream as the host received and checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOutcome {
    /// Bytes received in DATA frames.
    pub bytes: u64,
    /// The agent's digest (SOURCE_DONE).
    pub digest: u64,
    /// True when every byte matched the pattern, in order, the byte counts agree and the
    /// host's digest equals the agent's.
    pub verified: bool,
    /// First stream offset that was wrong (a wrong byte, or a gap), if any.
    pub first_mismatch: Option<u64>,
    /// DATA frames received.
    pub frames: u64,
    /// From the request to SOURCE_DONE.
    pub elapsed: Duration,
}

/// A SINK stream's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkOutcome {
    /// Bytes the agent received.
    pub bytes: u64,
    /// The agent's digest of them.
    pub digest: u64,
    /// First wrong offset as the agent saw it, if any.
    pub first_mismatch: Option<u64>,
    /// True when the agent saw every byte right and its digest equals the pattern's.
    pub verified: bool,
    /// From the request to SINK_RESULT.
    pub elapsed: Duration,
}

/// The value of STATS entry `name`, if present.
pub fn stat(stats: &[(String, u64)], name: &str) -> Option<u64> {
    stats.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// One ping round trip.
#[derive(Debug, Clone, Copy)]
pub struct PingSample {
    /// Round-trip time measured on the host's monotonic clock.
    pub rtt: Duration,
    /// The agent's monotonic clock when it answered.
    pub agent_time_ns: u64,
    /// Host send time.
    pub sent: Instant,
}

/// Counters of a link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkStats {
    /// Frames sent.
    pub frames_out: u64,
    /// Frames received and returned.
    pub frames_in: u64,
    /// Frames of another session dropped.
    pub stale_frames: u64,
    /// Agent ERRORs that answered no request this link waited for (unsolicited reports,
    /// answers to frames sent raw or to requests given up on).
    pub agent_errors: u64,
}

/// An agent ERROR this link did not hand to a waiting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    /// Error code ([`vport_common::message::error_code`]).
    pub code: u16,
    /// Type of the frame it answers (0: none, such as a decode-error report).
    pub about_kind: u8,
    /// Sequence number of the frame it answers.
    pub about_seq: u32,
    /// The agent's text.
    pub text: String,
}

/// Agent reports kept by a link (the oldest are dropped first).
pub const MAX_AGENT_REPORTS: usize = 256;

/// How long the host waits for a HELLO before it asks for one with HELLO_REQUEST.
pub const HELLO_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

/// A framed link on one port.
pub struct Link<S: Stream> {
    port: String,
    stream: S,
    decoder: Decoder,
    session: u32,
    seq: u32,
    stats: LinkStats,
    buf: Vec<u8>,
    timeline: Option<Timeline>,
    /// The op_id of the next GUEST_OP.
    next_op_id: u32,
    /// GUEST_OP completions received while waiting for something else.
    guest_ops_done: std::collections::HashMap<u32, GuestOpDone>,
    /// Sequence number of each GUEST_OP request not completed yet -> its op_id.
    guest_op_seqs: std::collections::HashMap<u32, u32>,
    /// GUEST_OP requests the agent refused (ERROR), by op_id.
    guest_ops_refused: std::collections::HashMap<u32, AgentReport>,
    /// Agent ERRORs no waiting request took, newest last (at most [`MAX_AGENT_REPORTS`]).
    reports: std::collections::VecDeque<AgentReport>,
}

impl<S: Stream> Link<S> {
    /// Records every message this link sends and returns on `timeline` from now on
    /// (handshake messages as themselves, requests and replies as data; see
    /// [`Timeline::message`]).
    pub fn set_timeline(&mut self, timeline: Timeline) {
        self.timeline = Some(timeline);
    }

    /// A link for port `port` over `stream`, outside any session.
    pub fn new(port: &str, stream: S) -> Self {
        Link {
            port: port.into(),
            stream,
            decoder: Decoder::default(),
            session: 0,
            seq: 0,
            stats: LinkStats::default(),
            buf: vec![0; 64 * 1024],
            timeline: None,
            next_op_id: 1,
            guest_ops_done: std::collections::HashMap::new(),
            guest_op_seqs: std::collections::HashMap::new(),
            guest_ops_refused: std::collections::HashMap::new(),
            reports: std::collections::VecDeque::new(),
        }
    }

    /// Agent ERRORs that no waiting request took, oldest first: decode-error reports
    /// (`about_kind` 0) and answers to frames sent without waiting.
    pub fn agent_reports(&self) -> impl Iterator<Item = &AgentReport> {
        self.reports.iter()
    }

    /// Takes the kept agent reports.
    pub fn take_agent_reports(&mut self) -> Vec<AgentReport> {
        self.reports.drain(..).collect()
    }

    /// The port name.
    pub fn port(&self) -> &str {
        &self.port
    }

    /// The current session id (0 before the handshake).
    pub fn session(&self) -> u32 {
        self.session
    }

    /// The underlying stream, for writing raw bytes outside the framing (tests that inject
    /// garbage or half frames).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Counters of the link and of its decoder.
    pub fn stats(&self) -> (LinkStats, vport_common::DecoderStats) {
        (self.stats, self.decoder.stats())
    }

    /// Sends `msg` in the current session.
    pub fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.send_request(msg).map(|_| ())
    }

    /// Sends `msg` in the current session; returns the sequence number it was sent with (an
    /// ERROR answering it names it in `about_seq`).
    pub fn send_request(&mut self, msg: &Message) -> Result<u32, LinkError> {
        let seq = self.seq;
        let frame =
            msg.to_frame(self.session, seq).map_err(|source| LinkError::Encode { port: self.port.clone(), source })?;
        let wire = frame.encode().map_err(|source| LinkError::Frame { port: self.port.clone(), source })?;
        self.stream.write_all(&wire).map_err(|source| self.io_err(source))?;
        log::trace!(
            "port {}: sent {:?} session {:#010x} seq {} ({} bytes)",
            self.port,
            msg.kind(),
            self.session,
            self.seq,
            wire.len()
        );
        if let Some(tl) = &self.timeline {
            tl.message(&self.port, Direction::HostToGuest, self.session, msg, wire.len() as u64);
        }
        self.seq = self.seq.wrapping_add(1);
        self.stats.frames_out += 1;
        Ok(seq)
    }

    /// The next frame, waiting until `deadline`. Frames of another session than the current
    /// one (after the handshake) are dropped and counted.
    pub fn recv(&mut self, deadline: Instant, what: &str) -> Result<Received, LinkError> {
        let started = Instant::now();
        loop {
            while let Some(item) = self.decoder.next_frame() {
                match item {
                    Ok(frame) => {
                        if self.session != 0 && frame.header.session != 0 && frame.header.session != self.session {
                            self.stats.stale_frames += 1;
                            log::debug!(
                                "port {}: dropping frame of stale session {:#x}",
                                self.port,
                                frame.header.session
                            );
                            continue;
                        }
                        self.stats.frames_in += 1;
                        let message = Message::from_frame(&frame);
                        log::trace!(
                            "port {}: received type {:#04x} session {:#010x} seq {}",
                            self.port,
                            frame.header.kind,
                            frame.header.session,
                            frame.header.seq
                        );
                        if let (Some(tl), Ok(m)) = (&self.timeline, &message) {
                            let wire = frame.wire_len() as u64;
                            tl.message(&self.port, Direction::GuestToHost, frame.header.session, m, wire);
                        }
                        return Ok(Received { frame, message, at: Instant::now() });
                    }
                    Err(e) => log::debug!("port {}: {e}", self.port),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout {
                    port: self.port.clone(),
                    what: what.into(),
                    timeout: started.elapsed(),
                });
            }
            self.stream.set_read_timeout(Some(left)).map_err(|source| self.io_err(source))?;
            match self.stream.read(&mut self.buf) {
                // A peer that closes with our bytes unread makes the read fail with ECONNRESET.
                Ok(0) => return Err(LinkError::Closed { port: self.port.clone() }),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Err(LinkError::Closed { port: self.port.clone() })
                }
                Ok(n) => {
                    log::trace!("port {}: read {n} bytes", self.port);
                    self.decoder.push(&self.buf[..n]);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(source) => return Err(self.io_err(source)),
            }
        }
    }

    /// Asks for a session and completes the handshake: sends HELLO_REQUEST at once, then
    /// [`Link::await_hello`]. Use this on every fresh connection.
    ///
    /// Why at once: on a real VM a disconnect followed quickly by a connect flips the port's
    /// host-connected state false and true before the agent runs, so the agent cannot see the
    /// new host, and its old session would only end at a request. An agent that did see the
    /// connect answers by repeating its pending offer (same session), and requests written
    /// before the agent opened the port wait in QEMU and are answered the same way, so asking
    /// never costs a session.
    pub fn handshake(&mut self, timeout: Duration, host_version: &str) -> Result<Handshake, LinkError> {
        self.session = 0;
        self.send(&Message::HelloRequest)?;
        let mut hs = self.await_hello(timeout, host_version)?;
        hs.requests_sent += 1;
        Ok(hs)
    }

    /// Waits for the agent's HELLO and acknowledges it; the link then belongs to that session.
    /// Sends HELLO_REQUEST only after each [`HELLO_REQUEST_INTERVAL`] without a HELLO, for
    /// callers that decide themselves when to ask (the session server).
    pub fn await_hello(&mut self, timeout: Duration, host_version: &str) -> Result<Handshake, LinkError> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        self.session = 0;
        let mut requests_sent = 0;
        loop {
            let slice = (Instant::now() + HELLO_REQUEST_INTERVAL).min(deadline);
            match self.recv(slice, "HELLO") {
                Ok(Received { frame, message: Ok(Message::Hello(hello)), at }) => {
                    self.session = frame.header.session;
                    self.seq = 0;
                    let nonce = hello.nonce;
                    self.send(&Message::HelloAck { nonce, host_version: host_version.into() })?;
                    return Ok(Handshake { hello, session: frame.header.session, hello_at: at, requests_sent, before });
                }
                Ok(other) => {
                    log::debug!("port {}: ignoring {:?} before HELLO", self.port, other.message);
                    before.push(other);
                }
                Err(LinkError::Timeout { .. }) if Instant::now() < deadline => {
                    log::debug!("port {}: no HELLO yet; sending HELLO_REQUEST", self.port);
                    self.send(&Message::HelloRequest)?;
                    requests_sent += 1;
                }
                Err(LinkError::Timeout { .. }) => {
                    return Err(LinkError::Timeout {
                        port: self.port.clone(),
                        what: "HELLO from vport-agent".into(),
                        timeout,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Files an agent ERROR that is not the answer to `request` (type, seq): a GUEST_OP
    /// refusal under its op_id, anything else in the reports. Returns the error as the answer
    /// to `request` when it is one.
    fn file_error(&mut self, e: AgentReport, request: (MessageType, u32)) -> Option<LinkError> {
        if e.about_kind == request.0 as u8 && e.about_seq == request.1 {
            return Some(LinkError::Agent { port: self.port.clone(), code: e.code, text: e.text });
        }
        if e.about_kind == MessageType::GuestOp as u8 {
            if let Some(op_id) = self.guest_op_seqs.remove(&e.about_seq) {
                self.guest_ops_refused.insert(op_id, e);
                return None;
            }
        }
        log::debug!(
            "port {}: agent error {} about type {:#04x} seq {}: {}",
            self.port,
            e.code,
            e.about_kind,
            e.about_seq,
            e.text
        );
        self.stats.agent_errors += 1;
        if self.reports.len() == MAX_AGENT_REPORTS {
            self.reports.pop_front();
        }
        self.reports.push_back(e);
        None
    }

    /// Waits until `deadline` for a reply accepted by `pick`, skipping repeated HELLOs of the
    /// current session and failing on an agent ERROR that answers `request` (its type and
    /// sequence number); other ERRORs are filed ([`Link::agent_reports`]).
    fn await_reply<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        request: (MessageType, u32),
        mut pick: impl FnMut(&Message) -> Option<T>,
    ) -> Result<(T, Instant), LinkError> {
        loop {
            let r = self.recv(deadline, what)?;
            match &r.message {
                Ok(Message::Error { code, about_kind, about_seq, text }) => {
                    let report =
                        AgentReport { code: *code, about_kind: *about_kind, about_seq: *about_seq, text: text.clone() };
                    if let Some(e) = self.file_error(report, request) {
                        return Err(e);
                    }
                    if let Some(refused) = self.refused_guest_op(request) {
                        return Err(refused);
                    }
                }
                Ok(m) => match pick(m) {
                    Some(v) => return Ok((v, r.at)),
                    // Kept for Link::await_guest_op: guest ops complete in any order.
                    None if matches!(m, Message::GuestOpDone(_)) => {
                        if let Message::GuestOpDone(d) = m {
                            self.guest_op_seqs.retain(|_, op| *op != d.op_id);
                            self.guest_ops_done.insert(d.op_id, d.clone());
                        }
                    }
                    None => log::debug!("port {}: skipping {:?} while waiting for {what}", self.port, m.kind()),
                },
                Err(e) => log::debug!("port {}: unparsable frame while waiting for {what}: {e}", self.port),
            }
        }
    }

    /// One PING/PONG round trip; `now_ns` is the host's monotonic clock sent in the PING.
    pub fn ping(&mut self, timeout: Duration, now_ns: u64) -> Result<PingSample, LinkError> {
        let sent = Instant::now();
        let seq = self.send_request(&Message::Ping { time_ns: now_ns })?;
        let (agent_time_ns, at) = self.await_reply(sent + timeout, "PONG", (MessageType::Ping, seq), |m| match m {
            Message::Pong { ping_time_ns, time_ns } if *ping_time_ns == now_ns => Some(*time_ns),
            _ => None,
        })?;
        Ok(PingSample { rtt: at - sent, agent_time_ns, sent })
    }

    /// Sends `data` in an ECHO and returns what came back.
    pub fn echo(&mut self, data: &[u8], timeout: Duration) -> Result<Vec<u8>, LinkError> {
        let sent = Instant::now();
        let seq = self.send_request(&Message::Echo(data.to_vec()))?;
        let (bytes, _) = self.await_reply(sent + timeout, "ECHO_REPLY", (MessageType::Echo, seq), |m| match m {
            Message::EchoReply(b) => Some(b.clone()),
            _ => None,
        })?;
        Ok(bytes)
    }

    /// CLOSE: the agent answers BYE, closes the port and reopens it after `reopen_after_ms`.
    /// After the reopen it offers a new session: call [`Link::handshake`] again.
    pub fn close(&mut self, reopen_after_ms: u32, timeout: Duration) -> Result<Bye, LinkError> {
        let seq = self.send_request(&Message::Close { reopen_after_ms })?;
        self.await_bye(timeout, (MessageType::Close, seq))
    }

    /// REOPEN: like [`Link::close`] with no delay.
    pub fn reopen(&mut self, timeout: Duration) -> Result<Bye, LinkError> {
        let seq = self.send_request(&Message::Reopen)?;
        self.await_bye(timeout, (MessageType::Reopen, seq))
    }

    fn await_bye(&mut self, timeout: Duration, request: (MessageType, u32)) -> Result<Bye, LinkError> {
        let session = self.session;
        let (bye, _) = self.await_reply(Instant::now() + timeout, "BYE", request, |m| match m {
            Message::Bye { reopen_after_ms, reason } => {
                Some(Bye { reopen_after_ms: *reopen_after_ms, reason: reason.clone(), session })
            }
            _ => None,
        })?;
        Ok(bye)
    }

    /// PROBE: one system call on the agent's fd or a second fd; the raw result.
    pub fn probe(
        &mut self,
        kind: ProbeKind,
        target: ProbeTarget,
        arg: u32,
        timeout: Duration,
    ) -> Result<ProbeOutcome, LinkError> {
        let seq = self.send_request(&Message::Probe { kind, target, arg })?;
        let request = (MessageType::Probe, seq);
        let (out, _) = self.await_reply(Instant::now() + timeout, "PROBE_RESULT", request, |m| match m {
            Message::ProbeResult { kind: k, target: t, ret, errno, mask, data } if *k == kind && *t == target => {
                Some(ProbeOutcome { ret: *ret, errno: *errno, mask: *mask, data: data.clone() })
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// GUEST_OP: starts `op` in the guest and returns its op_id; the completion is collected
    /// with [`Link::await_guest_op`] (other requests may be made meanwhile).
    pub fn start_guest_op(&mut self, op: GuestOp) -> Result<u32, LinkError> {
        let op_id = self.next_op_id;
        self.next_op_id = self.next_op_id.wrapping_add(1).max(1);
        let seq = self.send_request(&Message::GuestOp { op_id, op })?;
        self.guest_op_seqs.insert(seq, op_id);
        Ok(op_id)
    }

    /// Waits up to `timeout` for the completion of guest op `op_id`. A timeout is
    /// [`LinkError::Timeout`]: the op may still complete later (ask again). An op the agent
    /// refused (guest ops disabled, not a port, over a limit) is [`LinkError::Agent`].
    pub fn await_guest_op(&mut self, op_id: u32, timeout: Duration) -> Result<GuestOpDone, LinkError> {
        if let Some(d) = self.guest_ops_done.remove(&op_id) {
            return Ok(d);
        }
        if let Some(e) = self.guest_ops_refused.remove(&op_id) {
            return Err(LinkError::Agent { port: self.port.clone(), code: e.code, text: e.text });
        }
        let seq = self.guest_op_seqs.iter().find(|(_, op)| **op == op_id).map_or(u32::MAX, |(s, _)| *s);
        let (d, _) =
            self.await_reply(Instant::now() + timeout, "GUEST_OP_DONE", (MessageType::GuestOp, seq), |m| match m {
                Message::GuestOpDone(d) if d.op_id == op_id => Some(d.clone()),
                _ => None,
            })?;
        self.guest_op_seqs.remove(&seq);
        Ok(d)
    }

    /// The refusal of the guest op awaited by `request`, if it was filed meanwhile.
    fn refused_guest_op(&mut self, request: (MessageType, u32)) -> Option<LinkError> {
        if request.0 != MessageType::GuestOp {
            return None;
        }
        let op_id = *self.guest_op_seqs.get(&request.1)?;
        let e = self.guest_ops_refused.remove(&op_id)?;
        Some(LinkError::Agent { port: self.port.clone(), code: e.code, text: e.text })
    }

    /// Runs guest op `op` and waits up to `timeout` for its completion.
    pub fn guest_op(&mut self, op: GuestOp, timeout: Duration) -> Result<GuestOpDone, LinkError> {
        let id = self.start_guest_op(op)?;
        self.await_guest_op(id, timeout)
    }

    /// SIGIO: enable (reset and count), disable or query SIGIO observation.
    pub fn sigio(&mut self, action: SigioAction, timeout: Duration) -> Result<SigioOutcome, LinkError> {
        let seq = self.send_request(&Message::Sigio { action })?;
        let request = (MessageType::Sigio, seq);
        let (out, _) = self.await_reply(Instant::now() + timeout, "SIGIO_REPORT", request, |m| match m {
            Message::SigioReport { enabled, count, samples } => {
                Some(SigioOutcome { enabled: *enabled, count: *count, samples: samples.clone() })
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// STATS: the agent's counters as name/value pairs (look names up with [`stat`]).
    pub fn agent_stats(&mut self, timeout: Duration) -> Result<Vec<(String, u64)>, LinkError> {
        let seq = self.send_request(&Message::Stats)?;
        let request = (MessageType::Stats, seq);
        let (pairs, _) = self.await_reply(Instant::now() + timeout, "STATS_REPLY", request, |m| match m {
            Message::StatsReply(p) => Some(p.clone()),
            _ => None,
        })?;
        Ok(pairs)
    }

    /// EVENTS: the port's life-cycle records with `seq >= since_seq`.
    pub fn events(&mut self, since_seq: u64, timeout: Duration) -> Result<EventsOutcome, LinkError> {
        let seq = self.send_request(&Message::Events { since_seq })?;
        let request = (MessageType::Events, seq);
        let (out, _) = self.await_reply(Instant::now() + timeout, "EVENTS_REPLY", request, |m| match m {
            Message::EventsReply { first_seq, next_seq, records } => {
                Some(EventsOutcome { first_seq: *first_seq, next_seq: *next_seq, records: records.clone() })
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// SOURCE: the agent streams `bytes` bytes of the pattern of `seed` in DATA frames of at
    /// most `chunk` bytes; each is checked against the pattern here. `timeout` bounds the wait
    /// for each frame (not the whole stream).
    pub fn source(&mut self, seed: u64, bytes: u64, chunk: u32, timeout: Duration) -> Result<SourceOutcome, LinkError> {
        let started = Instant::now();
        let seq = self.send_request(&Message::Source { seed, bytes, chunk })?;
        let request = (MessageType::Source, seq);
        let mut digest = StreamDigest::new();
        let mut first_mismatch = None;
        let mut frames = 0;
        loop {
            let (m, _) = self.await_reply(Instant::now() + timeout, "DATA or SOURCE_DONE", request, |m| match m {
                Message::Data { .. } | Message::SourceDone { .. } => Some(m.clone()),
                _ => None,
            })?;
            match m {
                Message::Data { offset, bytes: data } => {
                    frames += 1;
                    let expected = digest.bytes();
                    if first_mismatch.is_none() {
                        first_mismatch = if offset != expected {
                            Some(expected)
                        } else {
                            pattern::first_mismatch(seed, offset, &data)
                        };
                    }
                    digest.update(&data);
                }
                Message::SourceDone { bytes: agent_bytes, digest: agent_digest } => {
                    let got = digest.bytes();
                    if first_mismatch.is_none() && got < bytes {
                        first_mismatch = Some(got);
                    }
                    let verified = first_mismatch.is_none()
                        && got == bytes
                        && agent_bytes == bytes
                        && agent_digest == digest.digest();
                    return Ok(SourceOutcome {
                        bytes: got,
                        digest: agent_digest,
                        verified,
                        first_mismatch,
                        frames,
                        elapsed: started.elapsed(),
                    });
                }
                _ => {}
            }
        }
    }

    /// SINK: sends `bytes` bytes of the pattern of `seed` in DATA frames of `chunk` bytes
    /// (capped by the payload limit) and returns the agent's verdict.
    pub fn sink(&mut self, seed: u64, bytes: u64, chunk: u32, timeout: Duration) -> Result<SinkOutcome, LinkError> {
        let started = Instant::now();
        let seq = self.send_request(&Message::Sink { seed, bytes })?;
        let request = (MessageType::Sink, seq);
        let chunk = (chunk as u64).clamp(1, u64::from(DEFAULT_MAX_PAYLOAD) - 8);
        let mut offset = 0;
        while offset < bytes {
            let n = (bytes - offset).min(chunk) as usize;
            let mut data = vec![0u8; n];
            pattern::fill(seed, offset, &mut data);
            self.send(&Message::Data { offset, bytes: data })?;
            offset += n as u64;
        }
        let ((got, digest, mismatch), _) =
            self.await_reply(Instant::now() + timeout, "SINK_RESULT", request, |m| match m {
                Message::SinkResult { bytes, digest, first_mismatch } => Some((*bytes, *digest, *first_mismatch)),
                _ => None,
            })?;
        let first_mismatch = (mismatch != NO_MISMATCH).then_some(mismatch);
        let verified = first_mismatch.is_none() && got == bytes && digest == pattern::pattern_digest(seed, bytes);
        Ok(SinkOutcome { bytes: got, digest, first_mismatch, verified, elapsed: started.elapsed() })
    }

    /// A failed read or write: the peer gone (EPIPE, ECONNRESET) is [`LinkError::Closed`], as
    /// a read of 0 is; anything else is [`LinkError::Io`].
    fn io_err(&self, source: std::io::Error) -> LinkError {
        match source.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => LinkError::Closed { port: self.port.clone() },
            _ => LinkError::Io { port: self.port.clone(), source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A scripted agent on the other end of a socketpair.
    fn agent(script: impl FnOnce(&mut Link<UnixStream>) + Send + 'static) -> Link<UnixStream> {
        let (host, guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut l = Link::new("fake-agent", guest);
            script(&mut l);
        });
        Link::new("org.vport.test", host)
    }

    fn hello(nonce: u64) -> Message {
        Message::Hello(Hello {
            agent_version: "t".into(),
            port_name: "org.vport.test".into(),
            kernel_release: "k".into(),
            boot_id: "b".into(),
            nonce,
            agent_time_ns: 0,
        })
    }

    fn send_in(l: &mut Link<UnixStream>, session: u32, m: &Message) {
        l.session = session;
        l.send(m).unwrap();
    }

    #[test]
    fn handshake_acks_the_hello_nonce_and_adopts_its_session() {
        let mut host = agent(|g| {
            // garbage first: the decoder must resynchronise
            g.stream.write_all(b"\xF5VPR stale bytes").unwrap();
            let r = g.recv(Instant::now() + Duration::from_secs(5), "request").unwrap();
            assert!(matches!(r.message, Ok(Message::HelloRequest)), "the host asks at once: {:?}", r.message);
            send_in(g, 0xAB, &hello(77));
            let r = g.recv(Instant::now() + Duration::from_secs(5), "ack").unwrap();
            assert_eq!(r.frame.header.session, 0xAB);
            assert!(matches!(r.message, Ok(Message::HelloAck { nonce: 77, .. })));
            let ping = g.recv(Instant::now() + Duration::from_secs(5), "ping").unwrap();
            let Ok(Message::Ping { time_ns }) = ping.message else { panic!("{:?}", ping.message) };
            send_in(g, 0x99, &Message::Pong { ping_time_ns: time_ns, time_ns: 1 }); // stale session
            send_in(g, 0xAB, &Message::Pong { ping_time_ns: time_ns, time_ns: 2 });
        });
        let hs = host.handshake(Duration::from_secs(5), "test").unwrap();
        assert_eq!((hs.session, hs.hello.nonce, hs.requests_sent), (0xAB, 77, 1));
        let p = host.ping(Duration::from_secs(5), 1234).unwrap();
        assert_eq!(p.agent_time_ns, 2, "the stale-session PONG must be dropped");
        assert_eq!(host.stats().0.stale_frames, 1);
    }

    #[test]
    fn a_silent_agent_gets_hello_requests_again_then_the_handshake_completes() {
        let mut host = agent(|g| {
            // Ignore the first request, as an agent that has not opened the port yet would.
            for _ in 0..2 {
                let r = g.recv(Instant::now() + Duration::from_secs(5), "request").unwrap();
                assert!(matches!(r.message, Ok(Message::HelloRequest)));
            }
            send_in(g, 5, &hello(1));
            let _ = g.recv(Instant::now() + Duration::from_secs(5), "ack");
        });
        let hs = host.handshake(Duration::from_secs(5), "test").unwrap();
        assert_eq!(hs.requests_sent, 2);
    }

    #[test]
    fn no_hello_is_a_timeout_naming_what_was_awaited_and_close_is_closed() {
        let (host_end, guest_end) = UnixStream::pair().unwrap();
        let mut host = Link::new("org.vport.quiet", host_end);
        let err = host.handshake(Duration::from_millis(1500), "test").unwrap_err();
        assert!(err.to_string().contains("HELLO from vport-agent"), "{err}");
        drop(guest_end);
        let err = host.recv(Instant::now() + Duration::from_secs(5), "anything").unwrap_err();
        assert!(matches!(err, LinkError::Closed { .. }), "{err}");
    }

    #[test]
    fn an_agent_error_fails_the_request_it_answers_and_others_are_filed() {
        let mut host = agent(|g| {
            let r = g.recv(Instant::now() + Duration::from_secs(5), "echo").unwrap();
            // A decode-error report, an answer to some other frame, then the answer to the echo.
            send_in(g, 0, &Message::error_unsolicited(6, "bad frame crc at stream offset 3"));
            let other = vport_common::Header { kind: 0x40, seq: r.frame.header.seq + 7, ..r.frame.header };
            send_in(g, 0, &Message::error_for(&other, 4, "not this one"));
            send_in(g, 0, &Message::error_for(&r.frame.header, 4, "not ready"));
        });
        let err = host.echo(b"x", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(&err, LinkError::Agent { code: 4, text, .. } if text == "not ready"), "{err}");
        let reports: Vec<AgentReport> = host.take_agent_reports();
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert_eq!((reports[0].code, reports[0].about_kind), (6, 0));
        assert_eq!((reports[1].text.as_str(), reports[1].about_kind), ("not this one", 0x40));
        assert_eq!(host.stats().0.agent_errors, 2);
    }

    #[test]
    fn a_refused_guest_op_fails_its_own_wait_even_while_waiting_for_another() {
        let mut host = agent(|g| {
            let first = g.recv(Instant::now() + Duration::from_secs(5), "op 1").unwrap();
            let second = g.recv(Instant::now() + Duration::from_secs(5), "op 2").unwrap();
            send_in(g, 0, &Message::error_for(&first.frame.header, 8, "guest ops disabled"));
            let Ok(Message::GuestOp { op_id, .. }) = second.message else { panic!("{:?}", second.message) };
            send_in(g, 0, &Message::GuestOpDone(GuestOpDone { op_id, ret: 5, ..Default::default() }));
        });
        let a = host.start_guest_op(GuestOp::Sysfs).unwrap();
        let b = host.start_guest_op(GuestOp::Sysfs).unwrap();
        assert_eq!(host.await_guest_op(b, Duration::from_secs(5)).unwrap().ret, 5);
        let err = host.await_guest_op(a, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, LinkError::Agent { code: 8, .. }), "{err}");
    }

    #[test]
    fn writing_to_a_closed_peer_is_closed_not_an_io_error() {
        let (host_end, guest_end) = UnixStream::pair().unwrap();
        drop(guest_end);
        let mut host = Link::new("org.vport.gone", host_end);
        let err = host.send(&Message::HelloRequest).unwrap_err();
        assert!(matches!(err, LinkError::Closed { .. }), "{err}");
    }

    const T: Duration = Duration::from_secs(5);

    /// A host link already in session 7, with a scripted agent that also uses session 7.
    fn in_session(script: impl FnOnce(&mut Link<UnixStream>) + Send + 'static) -> Link<UnixStream> {
        let mut host = agent(move |g| {
            g.session = 7;
            script(g)
        });
        host.session = 7;
        host
    }

    fn next(g: &mut Link<UnixStream>) -> Message {
        g.recv(Instant::now() + T, "request").unwrap().message.unwrap()
    }

    #[test]
    fn close_reopen_probe_sigio_stats_and_events_return_typed_replies() {
        let mut host = in_session(|g| {
            assert_eq!(next(g), Message::Close { reopen_after_ms: 1500 });
            g.send(&Message::Pong { ping_time_ns: 0, time_ns: 0 }).unwrap(); // skipped
            g.send(&Message::Bye { reopen_after_ms: 1500, reason: "close requested".into() }).unwrap();
            assert_eq!(next(g), Message::Reopen);
            g.send(&Message::Bye { reopen_after_ms: 0, reason: "reopen requested".into() }).unwrap();
            let Message::Probe { kind, target, .. } = next(g) else { panic!() };
            g.send(&Message::ProbeResult { kind, target, ret: -1, errno: 16, mask: 0, data: vec![] }).unwrap();
            assert_eq!(next(g), Message::Sigio { action: SigioAction::Enable });
            let samples = vec![SigioSample { time_ns: 1, mask: 0x11 }];
            g.send(&Message::SigioReport { enabled: true, count: 3, samples }).unwrap();
            assert_eq!(next(g), Message::Stats);
            g.send(&Message::StatsReply(vec![("ebusy".into(), 2), ("wakeups".into(), 9)])).unwrap();
            assert_eq!(next(g), Message::Events { since_seq: 4 });
            g.send(&Message::EventsReply { first_seq: 0, next_seq: 4, records: vec![] }).unwrap();
        });
        let bye = host.close(1500, T).unwrap();
        assert_eq!(bye, Bye { reopen_after_ms: 1500, reason: "close requested".into(), session: 7 });
        assert_eq!(host.reopen(T).unwrap().reopen_after_ms, 0);
        let p = host.probe(ProbeKind::Open, ProbeTarget::SecondFd, 0, T).unwrap();
        assert_eq!((p.ret, p.errno), (-1, 16));
        let s = host.sigio(SigioAction::Enable, T).unwrap();
        assert_eq!((s.enabled, s.count, s.samples.len()), (true, 3, 1));
        let stats = host.agent_stats(T).unwrap();
        assert_eq!((stat(&stats, "ebusy"), stat(&stats, "wakeups"), stat(&stats, "nope")), (Some(2), Some(9), None));
        let ev = host.events(4, T).unwrap();
        assert_eq!((ev.first_seq, ev.next_seq, ev.records.len()), (0, 4, 0));
    }

    #[test]
    fn source_is_verified_on_the_host_and_a_gap_is_found() {
        fn stream(g: &mut Link<UnixStream>, skip: Option<u64>) {
            let Message::Source { seed, bytes, chunk } = next(g) else { panic!() };
            let mut d = StreamDigest::new();
            let mut off = 0;
            while off < bytes {
                let n = (bytes - off).min(chunk as u64) as usize;
                let mut b = vec![0u8; n];
                pattern::fill(seed, off, &mut b);
                if Some(off) != skip {
                    d.update(&b);
                    g.send(&Message::Data { offset: off, bytes: b }).unwrap();
                }
                off += n as u64;
            }
            g.send(&Message::SourceDone { bytes, digest: d.digest() }).unwrap();
        }
        let mut host = in_session(|g| {
            stream(g, None);
            stream(g, Some(2000));
        });
        let ok = host.source(5, 5000, 1000, T).unwrap();
        assert!(ok.verified, "{ok:?}");
        assert_eq!((ok.bytes, ok.frames, ok.first_mismatch), (5000, 5, None));
        let bad = host.source(5, 5000, 1000, T).unwrap();
        assert!(!bad.verified);
        assert_eq!(bad.first_mismatch, Some(2000));
    }

    #[test]
    fn sink_sends_the_pattern_and_reads_the_verdict() {
        let mut host = in_session(|g| {
            let Message::Sink { seed, bytes } = next(g) else { panic!() };
            let mut d = StreamDigest::new();
            let mut mismatch = NO_MISMATCH;
            while d.bytes() < bytes {
                let Message::Data { offset, bytes: b } = next(g) else { panic!() };
                if mismatch == NO_MISMATCH {
                    mismatch = pattern::first_mismatch(seed, offset, &b).unwrap_or(NO_MISMATCH);
                }
                d.update(&b);
            }
            g.send(&Message::SinkResult { bytes, digest: d.digest(), first_mismatch: mismatch }).unwrap();
            let Message::Sink { bytes, .. } = next(g) else { panic!() };
            while d.bytes() < 10_000 + bytes {
                let Message::Data { bytes: b, .. } = next(g) else { panic!() };
                d.update(&b);
            }
            g.send(&Message::SinkResult { bytes, digest: 1, first_mismatch: 77 }).unwrap();
        });
        let ok = host.sink(3, 10_000, 3000, T).unwrap();
        assert!(ok.verified, "{ok:?}");
        let bad = host.sink(3, 100, 3000, T).unwrap();
        assert!(!bad.verified);
        assert_eq!(bad.first_mismatch, Some(77));
    }

    #[test]
    fn handshake_keeps_frames_that_came_before_the_hello() {
        let mut host = agent(|g| {
            send_in(g, 0x55, &Message::EchoReply(b"old".to_vec()));
            send_in(g, 0xAB, &hello(3));
            for what in ["request", "ack"] {
                let _ = g.recv(Instant::now() + T, what);
            }
        });
        let hs = host.handshake(T, "test").unwrap();
        assert_eq!(hs.before.len(), 1);
        assert_eq!(hs.before[0].frame.header.session, 0x55);
    }
}
