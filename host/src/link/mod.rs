//! A framed, typed message link to `vport-agent` over one port's chardev connection: the
//! transport under every conversation the host has with an agent.
//!
//! The link owns a [`Decoder`] and the host's session view: it performs the HELLO handshake
//! (asking for a HELLO with HELLO_REQUEST when none comes, because a reconnect can happen
//! without an edge the agent can see), sends frames in the current session and returns the
//! frames of that session. Damaged bytes are counted and skipped (the decoder
//! resynchronises); they never end the link.
//!
//! The link knows nothing of the session's life cycle: [`crate::session`] builds
//! [`crate::session::Session`]s over it, and the typed requests (PING, ECHO, PROBE, SOURCE,
//! ...) are written once, in [`crate::client::AgentClient`], over the primitives here
//! ([`Link::send_request`], [`Link::await_reply`], the guest-op pair). Replies are matched to
//! requests by [`Replies`].
//!
//! What the link sends and returns can be watched by a [`LinkObserver`] (the host's timeline
//! is one): the link reports to it and does not own a timeline.

mod replies;
mod types;

use crate::chardev::Stream;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vport_common::message::{GuestOp, MessageType};
use vport_common::trace::Direction;
use vport_common::{Decoder, Message};

pub use replies::{Offer, Replies};
pub use types::*;

/// Watches a port's host connections and the messages a [`Link`] sends and returns (a
/// timeline records them). The link reports messages; whoever opens and closes the
/// connection (the session server) reports those.
pub trait LinkObserver: Send + Sync {
    /// `msg` went `dir` on `port` in `session`, `wire_len` bytes on the wire.
    fn message(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_len: u64);
    /// A frame of `session` that no session of this connection owns came `dir` on `port` and
    /// was dropped (sent before this connection's handshake, or in a session that ended): not
    /// session data, but worth knowing (a rewound guest's old session, for example).
    fn stale(&self, port: &str, dir: Direction, session: u32, msg: &Message, wire_len: u64);
    /// The host end of `port` connected.
    fn host_connected(&self, port: &str);
    /// The host end of `port` disconnected, for `reason`.
    fn host_disconnected(&self, port: &str, reason: &str);
}

/// A framed link on one port.
pub struct Link<S: Stream> {
    port: String,
    stream: S,
    decoder: Decoder,
    session: u32,
    seq: u32,
    stats: LinkStats,
    buf: Vec<u8>,
    observer: Option<Arc<dyn LinkObserver>>,
    replies: Replies,
    /// The session and nonce of the last HELLO acknowledged on this connection: a HELLO that
    /// repeats them (the agent answering a HELLO_REQUEST) is not acknowledged again.
    acked: Option<(u32, u64)>,
}

impl<S: Stream> Link<S> {
    /// Reports every message this link sends and returns to `observer` from now on (a
    /// timeline records handshake messages as themselves, requests and replies as data).
    pub fn set_observer(&mut self, observer: Arc<dyn LinkObserver>) {
        self.observer = Some(observer);
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
            observer: None,
            replies: Replies::new(port),
            acked: None,
        }
    }

    /// Agent ERRORs that no waiting request took, oldest first: decode-error reports
    /// (`about_kind` 0) and answers to frames sent without waiting.
    pub fn agent_reports(&self) -> impl Iterator<Item = &AgentReport> {
        self.replies.reports()
    }

    /// Takes the kept agent reports.
    pub fn take_agent_reports(&mut self) -> Vec<AgentReport> {
        self.replies.take_reports()
    }

    /// The reply bookkeeping (for a session reading frames through [`Link::recv`] itself).
    pub fn replies_mut(&mut self) -> &mut Replies {
        &mut self.replies
    }
    /// The port name.
    pub fn port(&self) -> &str {
        &self.port
    }

    /// The current session id (0 before the handshake).
    pub fn session(&self) -> u32 {
        self.session
    }

    /// The underlying stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, for writing raw bytes outside the framing (tests that inject
    /// garbage or half frames).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Counters of the link and of its decoder.
    pub fn stats(&self) -> (LinkStats, vport_common::DecoderStats) {
        (LinkStats { agent_errors: self.replies.filed(), ..self.stats }, self.decoder.stats())
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
        if let Some(o) = &self.observer {
            o.message(&self.port, Direction::HostToGuest, self.session, msg, wire.len() as u64);
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
                            if let (Some(o), Ok(m)) = (&self.observer, Message::from_frame(&frame)) {
                                let wire = frame.wire_len() as u64;
                                o.stale(&self.port, Direction::GuestToHost, frame.header.session, &m, wire);
                            }
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
                        if let (Some(o), Ok(m)) = (&self.observer, &message) {
                            let wire = frame.wire_len() as u64;
                            // Before this connection's handshake, a frame of a session (other
                            // than the HELLO that starts one) belongs to an earlier one.
                            let before_handshake = self.session == 0 && frame.header.session != 0;
                            if before_handshake && !matches!(m, Message::Hello(_)) {
                                o.stale(&self.port, Direction::GuestToHost, frame.header.session, m, wire);
                            } else {
                                o.message(&self.port, Direction::GuestToHost, frame.header.session, m, wire);
                            }
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
        self.await_hello_asking(timeout, host_version, true, &|_, _| false)
    }

    /// Waits up to `timeout` for a HELLO the agent offers without being asked (no
    /// HELLO_REQUEST is sent) and acknowledges it, unless `refuse(session, nonce)` holds: a
    /// HELLO of a session that ended at the caller (bytes of an old connection, or the agent
    /// repeating an offer it made before the host left) is returned unacknowledged, and the
    /// link stays outside any session. Acknowledging it would reach an agent that has moved
    /// on, which answers ERROR bad-session.
    pub fn await_offer(
        &mut self,
        timeout: Duration,
        host_version: &str,
        refuse: &dyn Fn(u32, u64) -> bool,
    ) -> Result<Handshake, LinkError> {
        self.await_hello_asking(timeout, host_version, false, refuse)
    }

    fn await_hello_asking(
        &mut self,
        timeout: Duration,
        host_version: &str,
        ask: bool,
        refuse: &dyn Fn(u32, u64) -> bool,
    ) -> Result<Handshake, LinkError> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        self.session = 0;
        let mut requests_sent = 0;
        loop {
            let slice = if ask { (Instant::now() + HELLO_REQUEST_INTERVAL).min(deadline) } else { deadline };
            match self.recv(slice, "HELLO") {
                Ok(Received { frame, message: Ok(Message::Hello(hello)), at }) => {
                    let nonce = hello.nonce;
                    if refuse(frame.header.session, nonce) {
                        // The link stays outside any session (session 0).
                        log::debug!(
                            "port {}: HELLO of session {:#010x} refused by the caller: not acknowledged",
                            self.port,
                            frame.header.session
                        );
                    } else if self.acked == Some((frame.header.session, nonce)) {
                        // One HELLO_ACK per session offer: the agent repeats its HELLO for every
                        // HELLO_REQUEST it reads (a burst of them, queued while it was away), and
                        // an acknowledgement of a session already READY breaks the life cycle.
                        self.session = frame.header.session;
                        log::debug!(
                            "port {}: HELLO repeats session {:#010x}, acknowledged already on this connection",
                            self.port,
                            self.session
                        );
                    } else {
                        self.session = frame.header.session;
                        self.seq = 0;
                        self.send(&Message::HelloAck { nonce, host_version: host_version.into() })?;
                        self.acked = Some((self.session, nonce));
                    }
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

    /// Waits until `deadline` for a reply to `request` (its type and sequence number) that
    /// `pick` accepts, skipping other frames; an agent ERROR answering `request` is
    /// [`LinkError::Agent`], other ERRORs are filed ([`Link::agent_reports`]).
    pub fn await_reply<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        request: (MessageType, u32),
        pick: &mut dyn FnMut(&Message) -> Option<T>,
    ) -> Result<(T, Instant), LinkError> {
        loop {
            let r = self.recv(deadline, what)?;
            match self.replies.offer(&r, what, request, pick) {
                Offer::Reply(v) => return Ok((v, r.at)),
                Offer::Failed(e) => return Err(e),
                Offer::Other => {}
            }
        }
    }

    /// CLOSE: the agent answers BYE, closes the port and reopens it after `reopen_after_ms`.
    /// After the reopen it offers a new session: call [`Link::handshake`] again. (A
    /// [`crate::session::Session`] ends with `close_guest` instead.)
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
        let (bye, _) = self.await_reply(Instant::now() + timeout, "BYE", request, &mut |m| match m {
            Message::Bye { reopen_after_ms, reason } => {
                Some(Bye { reopen_after_ms: *reopen_after_ms, reason: reason.clone(), session })
            }
            _ => None,
        })?;
        Ok(bye)
    }

    /// GUEST_OP: starts `op` in the guest and returns its op_id; the completion is collected
    /// with `AgentClient::await_guest_op` (other requests may be made meanwhile).
    pub fn start_guest_op(&mut self, op: GuestOp) -> Result<u32, LinkError> {
        let op_id = self.replies.next_guest_op();
        let seq = self.send_request(&Message::GuestOp { op_id, op })?;
        self.replies.guest_op_sent(seq, op_id);
        Ok(op_id)
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
mod tests;
