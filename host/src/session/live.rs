//! [`Session`]: one guest session on a port, from the acknowledged HELLO to its end, and the
//! [`AgentClient`] that carries the session's requests.

use super::core::{lock, Core, Pumped};
use super::SessionError;
use crate::chardev::Connection;
use crate::client::{AgentClient, GuestOpProgress};
use crate::link::{Handshake, Link, LinkError, Offer, Received};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vport_common::message::{error_code, GuestOp, MessageType};
use vport_common::server::{EndReason, Input, SessionId};
use vport_common::Message;

/// One guest session on a port, from the acknowledged HELLO to its end. See the module docs.
/// Dropping a live Session closes the host connection ([`EndReason::HostClosed`]).
pub struct Session {
    core: Arc<Mutex<Core>>,
    generation: u64,
    id: SessionId,
    port: String,
    handshake: Handshake,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("port", &self.port)
            .field("number", &self.generation)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The port name.
    pub fn port(&self) -> &str {
        &self.port
    }

    /// The session id and nonce.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The session's number on its server, from 1.
    pub fn number(&self) -> u64 {
        self.generation
    }

    /// The handshake that started the session.
    pub fn handshake(&self) -> &Handshake {
        &self.handshake
    }

    /// Why the session ended, or `None` while it is live (as far as seen so far: pending QMP
    /// events are looked at; the stream is read only by the waiting calls).
    pub fn end_reason(&self) -> Option<EndReason> {
        let mut c = lock(&self.core);
        c.drain_qmp();
        c.end_of(self.generation)
    }

    /// A session handed out by the server: number `generation`, guest session `id`.
    pub(super) fn new(
        core: Arc<Mutex<Core>>,
        generation: u64,
        id: SessionId,
        port: String,
        handshake: Handshake,
    ) -> Self {
        Session { core, generation, id, port, handshake }
    }

    /// The core, if the session is live; else the end as an error.
    fn live(&self) -> Result<MutexGuard<'_, Core>, SessionError> {
        let mut c = lock(&self.core);
        c.drain_qmp();
        if c.live(self.generation) {
            return Ok(c);
        }
        Err(SessionError::Ended(c.end_of(self.generation).unwrap_or(EndReason::HostClosed)))
    }

    fn ended(&self, c: &Core) -> SessionError {
        SessionError::Ended(c.end_of(self.generation).unwrap_or(EndReason::HostClosed))
    }

    /// The next frame of the session within `timeout` that is not a life-cycle signal.
    pub fn recv(&mut self, timeout: Duration) -> Result<Received, SessionError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.live()?;
        match c.pump(self.generation, deadline, "frame") {
            Pumped::Frame(r) => Ok(r),
            Pumped::Ended => Err(self.ended(&c)),
            Pumped::Timeout => Err(SessionError::Timeout { port: self.port.clone(), what: "frame".into(), timeout }),
        }
    }

    /// Asks the agent to close the port (CLOSE, reopening after `reopen_after_ms`) and waits up
    /// to `timeout` for the session's end (normally [`EndReason::AgentBye`]).
    pub fn close_guest(&mut self, reopen_after_ms: u32, timeout: Duration) -> Result<EndReason, SessionError> {
        self.request_end(&Message::Close { reopen_after_ms }, timeout)
    }

    /// Asks the agent to close the port and reopen it at once (REOPEN) and waits up to `timeout`
    /// for the session's end (normally [`EndReason::AgentBye`]); the reopened
    /// port's session comes from the next [`super::PortServer::accept`].
    pub fn reopen_guest(&mut self, timeout: Duration) -> Result<EndReason, SessionError> {
        self.request_end(&Message::Reopen, timeout)
    }

    /// Sends `msg` and waits up to `timeout` for the session's end; an agent ERROR answering
    /// `msg` (a refused CLOSE) is [`SessionError::Agent`].
    fn request_end(&mut self, msg: &Message, timeout: Duration) -> Result<EndReason, SessionError> {
        let seq = self.send_request(msg)?;
        self.await_end(timeout, Some((msg.kind() as u8, seq)))
    }

    /// Waits up to `timeout` for the session to end and returns why; frames read meanwhile are
    /// discarded (an agent ERROR among them is logged).
    pub fn wait_end(&mut self, timeout: Duration) -> Result<EndReason, SessionError> {
        self.await_end(timeout, None)
    }

    /// Waits up to `timeout` for the end; an agent ERROR answering `request` (type, seq) fails
    /// the wait, other frames are discarded.
    fn await_end(&mut self, timeout: Duration, request: Option<(u8, u32)>) -> Result<EndReason, SessionError> {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.core);
        loop {
            if let Some(r) = c.end_of(self.generation) {
                return Ok(r);
            }
            match c.pump(self.generation, deadline, "end of the session") {
                Pumped::Frame(r) => match &r.message {
                    Ok(Message::Error { code, text, about_kind, about_seq })
                        if Some((*about_kind, *about_seq)) == request =>
                    {
                        return Err(SessionError::Agent { port: self.port.clone(), code: *code, text: text.clone() })
                    }
                    other => log::debug!("port {}: discarding {other:?} while waiting for the end", self.port),
                },
                Pumped::Ended => {}
                Pumped::Timeout => {
                    let what = "end of the session".into();
                    return Err(SessionError::Timeout { port: self.port.clone(), what, timeout });
                }
            }
        }
    }

    /// Runs `f` on the live session's link (to write raw bytes into the session, for example).
    /// If `f` reads the stream itself a BYE it skips is not seen; the QMP events and the
    /// link's failures are still applied, and a closed or bad-session answer ends the session.
    /// Use [`Session::close_guest`] / [`Session::reopen_guest`] rather than the link's own close
    /// and reopen requests, whose BYE the session would not see.
    pub fn with_link<T>(
        &mut self,
        f: impl FnOnce(&mut Link<Connection>) -> Result<T, LinkError>,
    ) -> Result<T, SessionError> {
        let mut c = self.live()?;
        let Some(link) = c.link.as_mut() else { return Err(self.ended(&c)) };
        let r = f(link);
        let out = match r {
            Ok(v) => Ok(v),
            Err(e) => Err(self.failure(&mut c, e)),
        };
        c.drain_qmp();
        out
    }

    /// The session error for link failure `e`: an agent ERROR bad-session or a lost connection
    /// ends the session (the end is applied and returned); another agent ERROR is
    /// [`SessionError::Agent`]; anything else is [`SessionError::Link`].
    fn failure(&self, c: &mut Core, e: LinkError) -> SessionError {
        match e {
            LinkError::Agent { code: error_code::BAD_SESSION, .. } => {
                c.apply(Input::BadSession);
                self.ended(c)
            }
            LinkError::Agent { code, text, .. } => SessionError::Agent { port: self.port.clone(), code, text },
            e @ (LinkError::Closed { .. } | LinkError::Io { .. }) => {
                c.link_failed(&e);
                self.ended(c)
            }
            source => SessionError::Link { port: self.port.clone(), source },
        }
    }

    /// Ends the session from the host side: closes the host connection. Returns how the session
    /// ended ([`EndReason::HostClosed`], or the earlier reason if it had already ended).
    pub fn close(&mut self) -> EndReason {
        let mut c = lock(&self.core);
        c.drain_qmp();
        if c.live(self.generation) {
            c.apply(Input::HostClose);
        }
        c.end_of(self.generation).unwrap_or(EndReason::HostClosed)
    }
}

/// The session's requests: every reply is awaited through the server's pump, so the session's
/// end (BYE, QMP, a lost connection) fails the request with [`SessionError::Ended`].
impl AgentClient for Session {
    type Error = SessionError;

    fn send_request(&mut self, msg: &Message) -> Result<u32, SessionError> {
        self.with_link(|link| link.send_request(msg))
    }

    fn await_reply<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        request: (MessageType, u32),
        pick: &mut dyn FnMut(&Message) -> Option<T>,
    ) -> Result<(T, Instant), SessionError> {
        let started = Instant::now();
        let mut c = self.live()?;
        loop {
            match c.pump(self.generation, deadline, what) {
                Pumped::Frame(r) => {
                    let Some(link) = c.link.as_mut() else { return Err(self.ended(&c)) };
                    match link.replies_mut().offer(&r, what, request, pick) {
                        Offer::Reply(v) => return Ok((v, r.at)),
                        Offer::Failed(e) => return Err(self.failure(&mut c, e)),
                        Offer::Other => {}
                    }
                }
                Pumped::Ended => return Err(self.ended(&c)),
                Pumped::Timeout => {
                    let timeout = started.elapsed();
                    return Err(SessionError::Timeout { port: self.port.clone(), what: what.into(), timeout });
                }
            }
        }
    }

    fn start_guest_op(&mut self, op: GuestOp) -> Result<u32, SessionError> {
        self.with_link(|link| link.start_guest_op(op))
    }

    fn guest_op_progress(&mut self, op_id: u32) -> Result<GuestOpProgress, SessionError> {
        let mut c = self.live()?;
        let Some(link) = c.link.as_mut() else { return Err(self.ended(&c)) };
        match link.replies_mut().finished_guest_op(op_id) {
            Some(Ok(d)) => Ok(GuestOpProgress::Done(d)),
            Some(Err(e)) => Err(self.failure(&mut c, e)),
            None => Ok(GuestOpProgress::Pending { seq: link.replies_mut().guest_op_seq(op_id) }),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}
