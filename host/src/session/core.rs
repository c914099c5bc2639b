//! The session server's state and I/O, shared by a [`super::PortServer`] and its
//! [`super::Session`]s: the pure machine ([`ServerMachine`]) fed with what the connection and
//! QMP show, and the one loop ([`Core::pump`]) that reads the stream while looking at QMP.

use crate::chardev::{Connection, Endpoint};
use crate::link::{Handshake, Link, LinkError, LinkObserver, Received};
use crate::qmp::{Qmp, QmpEvent};
use crossbeam_channel::{Receiver, TryRecvError};
use std::io::ErrorKind;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use vport_common::message::error_code;
use vport_common::server::{Action, EndReason, Input, ServerMachine, ServerState, SessionId};
use vport_common::{Message, MessageType};

use super::announce::{service, Gate};
use super::{Backlog, PROBE_PING, PUMP_SLICE};

/// How many ended guest sessions a server remembers ([`Core::ended_ids`]).
const ENDED_IDS: usize = 16;
use crate::qmp::QmpError;
use crate::wait::wait_until;
use std::time::Duration;

/// How often the kernel is asked whether QEMU accepted a queued connection.
pub(super) const SERVED_POLL: Duration = Duration::from_millis(10);
/// What one wait on the stream produced.
pub(super) enum Pumped {
    Frame(Received),
    Ended,
    Timeout,
}

/// The server's state and I/O, shared by the [`PortServer`] and its [`Session`]s.
pub(super) struct Core {
    pub(super) port: String,
    pub(super) device_id: String,
    pub(super) chardev_id: String,
    pub(super) endpoint: Box<dyn Endpoint>,
    pub(super) qmp: Option<Arc<Qmp>>,
    pub(super) events: Receiver<QmpEvent>,
    pub(super) events_open: bool,
    pub(super) machine: ServerMachine,
    /// Time 0 of the machine's clock.
    pub(super) origin: Instant,
    /// Inputs the machine refused (see [`super::PortServer::illegal_inputs`]).
    pub(super) illegal_inputs: u64,
    pub(super) link: Option<Link<Connection>>,
    /// Sessions handed out so far; the live one (if any) is number `generation`.
    pub(super) generation: u64,
    pub(super) ends: Vec<(u64, EndReason)>,
    /// The guest sessions that ended here, newest last (at most [`ENDED_IDS`]): a HELLO that
    /// offers one again is stale (an offer repeated by an agent that never got the last
    /// acknowledgement, or bytes of an old connection) and never becomes a new Session.
    pub(super) ended_ids: std::collections::VecDeque<SessionId>,
    pub(super) request_hello: bool,
    /// The sequence number of the probe PING ([`PROBE_PING`]) in flight in the live session,
    /// if one is: an ERROR bad-session answering it ends the session.
    pub(super) probe: Option<u32>,
    pub(super) host_version: String,
    /// Watches every connection's messages (a timeline).
    pub(super) observer: Option<Arc<dyn LinkObserver>>,
    /// Connections made so far (for [`super::Reconnect::Once`]).
    pub(super) connections: u64,
    /// Between the current connection's link and the observer: open once QEMU serves it.
    pub(super) gate: Option<Arc<Gate>>,
    /// When the wait for the next HELLO_REQUEST on the current connection began: the server's
    /// last request on it, QEMU serving it (a request that waited in its backlog reaches the
    /// agent then), or the end of the last session. `None`: nothing asked yet.
    pub(super) asked_at: Option<Instant>,
    /// HELLO_REQUESTs [`super::PortServer::accept`] sent on the current connection since the
    /// last session was handed out (a [`crate::link::Handshake`]'s `requests_sent`).
    pub(super) requests: u32,
    /// Whether the last connection ended with QEMU closing it (and none was made since).
    pub(super) lost_by_peer: bool,
    /// Why the chardev's server is taken for gone, once it is (see
    /// [`super::PortServer::infer_exit_from_chardev`]).
    pub(super) server_gone: Option<String>,
}

impl Core {
    /// The current state.
    pub(super) fn state(&self) -> &ServerState {
        self.machine.state()
    }

    /// Feeds `input` to the machine and carries out the actions; returns a yielded session. An
    /// input the machine refuses changes nothing; it is logged and counted.
    pub(super) fn apply(&mut self, input: Input) -> Option<SessionId> {
        let now_ns = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let step = match self.machine.step(&input, now_ns) {
            Ok(step) => step,
            Err(e) => {
                self.illegal_inputs += 1;
                log::warn!("port {}: illegal session-server input: {e}; state unchanged", self.port);
                return None;
            }
        };
        if step.to != step.from {
            log::debug!("port {}: {:?} --{input}--> {:?}", self.port, step.from, step.to);
        }
        let ending = match &step.from {
            ServerState::Ready { id } => Some(*id),
            _ => None,
        };
        let mut yielded = None;
        for a in step.actions {
            match a {
                Action::Yield(id) => {
                    self.generation += 1;
                    self.probe = None;
                    self.requests = 0;
                    log::info!("port {}: session {} ({:#010x}) ready", self.port, self.generation, id.session);
                    yielded = Some(id);
                }
                Action::End(reason) => {
                    log::info!("port {}: session {} ended: {reason}", self.port, self.generation);
                    self.ends.push((self.generation, reason));
                    if let Some(id) = ending {
                        if self.ended_ids.len() == ENDED_IDS {
                            self.ended_ids.pop_front();
                        }
                        self.ended_ids.push_back(id);
                    }
                    // The wait for the next session starts now: the agent is asked one interval
                    // later, unless the end asks at once (`RequestHello`).
                    self.asked_at = Some(Instant::now());
                }
                Action::Disconnect => self.drop_link(&input.to_string()),
                Action::RequestHello => self.request_hello = true,
            }
        }
        yielded
    }

    /// Applies a HELLO the agent offered: the new session's id, or `None` if it is not one (it
    /// repeats the live or the last session, or one that ended here: then a HELLO_REQUEST is
    /// due at once, which makes the agent start a new session).
    pub(super) fn offered(&mut self, id: SessionId) -> Option<SessionId> {
        if self.ended_ids.contains(&id) {
            // Ask for a new session once, not once per stale HELLO: a burst of them (the agent
            // answering requests it got before the session ended here) would otherwise send a
            // burst of requests, each of which makes a READY agent start yet another session,
            // which the next stale HELLO ends: a loop. A request sent within the interval (the
            // one made on connecting) is still on its way, and an agent that saw the host come
            // back starts a new session by itself: asking again then only races its HELLO. The
            // pacing asks again if nothing comes.
            let asked_lately = self.asked_at.is_some_and(|at| at.elapsed() < crate::link::HELLO_REQUEST_INTERVAL);
            log::info!(
                "port {}: hello of session {:#010x}, which ended here, ignored; {}",
                self.port,
                id.session,
                if asked_lately { "a request for a new one is on its way" } else { "asking for a new one" }
            );
            if !asked_lately {
                self.request_hello = true;
            }
            return None;
        }
        self.apply(Input::Hello(id))
    }

    pub(super) fn end_of(&self, generation: u64) -> Option<EndReason> {
        self.ends.iter().rev().find(|(g, _)| *g == generation).map(|(_, r)| r.clone())
    }

    /// Looks at every QMP event received so far, without waiting. QEMU emits a port's
    /// `VSERPORT_CHANGE` as a consequence before the event that says why (a reset emits
    /// open=false, then `RESET`; an unplug makes `frontend-open` false before
    /// `DEVICE_DELETED`), so within the events at hand the causes are applied first: the session
    /// ends with the cause as its reason. Events that arrive in separate looks are applied in
    /// order.
    pub(super) fn drain_qmp(&mut self) {
        let mut batch = Vec::new();
        let mut closed = false;
        loop {
            match self.events.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        batch.sort_by_key(|ev| ev.name == "VSERPORT_CHANGE");
        for ev in &batch {
            self.on_qmp(ev);
        }
        if closed && self.events_open {
            self.events_open = false;
            log::debug!("port {}: qmp closed", self.port);
            self.apply(Input::VmExited);
        }
    }

    fn on_qmp(&mut self, ev: &QmpEvent) {
        let input = match ev.name.as_str() {
            "VSERPORT_CHANGE" => match ev.vserport_change() {
                Some((id, hint)) if id == self.device_id => {
                    // A level hint (rate-limited, possibly coalesced): confirm it.
                    let open = match &self.qmp {
                        Some(q) => match q.frontend_open(&self.chardev_id) {
                            Ok(Some(v)) => v,
                            Ok(None) | Err(_) => hint,
                        },
                        None => hint,
                    };
                    if open != hint {
                        log::debug!("port {}: VSERPORT_CHANGE open={hint} but frontend-open is {open}", self.port);
                    }
                    Input::FrontendOpen(open)
                }
                _ => return,
            },
            "DEVICE_DELETED" if ev.data.get("device").and_then(|d| d.as_str()) == Some(self.device_id.as_str()) => {
                Input::DeviceDeleted
            }
            "STOP" if self.stopped_by_migration() => Input::Migrated,
            "STOP" => Input::VmStopped,
            "SHUTDOWN" => Input::VmExited,
            "RESET" => Input::GuestReset,
            "RESUME" => {
                // The VM runs again (`cont`): a session a STOP ended can be made now, so the
                // agent is asked at once rather than one interval after the STOP.
                if matches!(self.state(), ServerState::Connected { .. }) && self.asked_at.is_some() {
                    self.request_hello = true;
                }
                return;
            }
            _ => return,
        };
        self.apply(input);
    }

    /// Makes `conn` the current connection; its link reports to the observer through a gate
    /// that opens once QEMU serves it ([`Core::check_service`], or the first frame from the
    /// guest).
    pub(super) fn set_link(&mut self, mut link: Link<Connection>) {
        let gate = Gate::new(self.observer.clone());
        link.set_observer(gate.clone());
        self.link = Some(link);
        self.gate = Some(gate);
        self.asked_at = None;
        self.requests = 0;
    }

    /// Closes the connection (if any); the observer hears it if it heard of the connection.
    fn drop_link(&mut self, reason: &str) {
        let heard = self.gate.take().is_some_and(|g| g.is_open());
        if self.link.take().is_some() && heard {
            if let Some(o) = &self.observer {
                o.host_disconnected(&self.port, reason);
            }
        }
    }

    /// Whether QEMU serves the current connection, asked of the kernel ([`service`]) unless
    /// already known; once served, the observer hears of the connect. `NotConnected` without
    /// a connection. `Queued` is what the kernel also shows once QEMU has accepted and closed
    /// the connection: a read tells the two apart.
    pub(super) fn check_service(&mut self) -> Backlog {
        let (Some(link), Some(gate)) = (self.link.as_ref(), self.gate.as_ref()) else {
            return Backlog::NotConnected;
        };
        if gate.is_open() {
            return Backlog::Served;
        }
        let s = service(link.stream());
        if s == Backlog::Served {
            gate.open(&self.port);
            // A HELLO_REQUEST sent while queued reaches the agent now.
            if self.asked_at.is_some() {
                self.asked_at = Some(Instant::now());
            }
        }
        s
    }

    /// Waits until `deadline` for QEMU to serve the connection (see [`Core::check_service`]).
    /// The kernel is asked every [`SERVED_POLL`] (there is no event to wait on) and QMP events
    /// are looked at every [`PUMP_SLICE`] (an unplug or QEMU's exit ends the wait). Returns
    /// whether the handshake can go on: served, or unknown (never taken as served: the
    /// observer hears of the connect with the first frame from the guest). `false`: queued at
    /// `deadline`, or the connection is gone.
    pub(super) fn wait_served(&mut self, deadline: Instant) -> bool {
        loop {
            let slice_end = deadline.min(Instant::now() + PUMP_SLICE);
            let what = "QEMU to serve the connection";
            let timeout = slice_end.saturating_duration_since(Instant::now());
            let settled = || Some(self.check_service()).filter(|s| *s != Backlog::Queued);
            match wait_until(what, timeout, SERVED_POLL, || Ok(()), settled) {
                Ok(Backlog::NotConnected) => return false,
                Ok(_) => return true,
                Err(_) => {}
            }
            self.drain_qmp();
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Reads until `until` for a HELLO the agent offers without being asked, acknowledges it
    /// and applies it: the new session's id and handshake, `None` if none came (or it repeats
    /// the last session's). A HELLO of a session that ended here is not acknowledged. A failure
    /// of the connection is applied and returned.
    pub(super) fn take_offer(&mut self, until: Instant) -> Result<Option<(SessionId, Handshake)>, LinkError> {
        let version = self.host_version.clone();
        let Some(link) = self.link.as_mut() else { return Ok(None) };
        let ended = &self.ended_ids;
        let refuse = |session, nonce| ended.contains(&SessionId { session, nonce });
        match link.await_offer(until.saturating_duration_since(Instant::now()), &version, &refuse) {
            Ok(mut hs) => {
                hs.requests_sent = self.requests;
                let id = SessionId { session: hs.session, nonce: hs.hello.nonce };
                Ok(self.offered(id).map(|id| (id, hs)))
            }
            Err(LinkError::Timeout { .. }) => Ok(None),
            Err(e) => {
                self.link_failed(&e);
                Err(e)
            }
        }
    }

    /// Whether this `STOP` is the VM being migrated away, asked of QEMU's run state
    /// (`query-status`) when QMP says `STOP`. A migration stops its source in `finish-migrate`,
    /// which becomes `postmigrate` once it completed; no other cause of a `STOP` leaves a VM in
    /// either state ([`stopped_by_migration`]). `query-migrate` cannot tell: after an incoming
    /// migration the destination's status stays `completed`, so a later plain `stop` there
    /// would look like a migration, and a `stop` during an outgoing migration is a pause. A
    /// migration that fails after its stop resumes the VM: asked after the resume (`running`),
    /// the session ends `VmStopped`; asked before, `Migrated`.
    fn stopped_by_migration(&self) -> bool {
        let Some(qmp) = &self.qmp else { return false };
        match qmp.query_status() {
            Ok(state) => stopped_by_migration(&state),
            Err(e) => {
                log::debug!("port {}: query-status after STOP failed: {e}", self.port);
                false
            }
        }
    }

    /// Applies a failure of the current connection: QEMU closing it is the VM's exit if QEMU is
    /// gone ([`Core::qemu_gone`]), else [`Input::ConnectionLost`] (the server connects again);
    /// anything else is a protocol error.
    pub(super) fn link_failed(&mut self, e: &LinkError) {
        let lost = match e {
            LinkError::Closed { .. } => true,
            LinkError::Io { source, .. } => matches!(source.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
            _ => false,
        };
        if !lost {
            self.apply(Input::ProtocolError(e.to_string()));
            return;
        }
        // QMP may already say why (SHUTDOWN, an unplug, QMP closed): that ends things first.
        self.drain_qmp();
        if self.link.is_none() {
            return;
        }
        let input = if self.qemu_gone() { Input::VmExited } else { Input::ConnectionLost };
        self.lost_by_peer = input == Input::ConnectionLost;
        self.apply(input);
    }

    /// Whether QEMU is gone, after it closed the host connection: QMP is closed, or QEMU no
    /// longer answers on it (an exiting QEMU closes its monitors with its chardevs). Without
    /// QMP it cannot be asked: gone only if the event channel closed.
    fn qemu_gone(&self) -> bool {
        if !self.events_open {
            return true;
        }
        let Some(qmp) = &self.qmp else { return false };
        match qmp.query_status() {
            Err(e @ (QmpError::Disconnected { .. } | QmpError::Send { .. })) => {
                log::debug!("port {}: the connection closed and qmp is gone: {e}", self.port);
                true
            }
            _ => false,
        }
    }

    pub(super) fn live(&self, generation: u64) -> bool {
        self.generation == generation && matches!(self.state(), ServerState::Ready { .. })
    }

    /// Asks whether the agent is still in the live session, unless a probe is in flight: a
    /// PING in the session, answered with PONG if it is, with ERROR bad-session if the agent
    /// moved on to another (see [`Core::pump`]). A failure to send is applied.
    fn probe(&mut self) {
        if self.probe.is_some() {
            return;
        }
        let Some(link) = self.link.as_mut() else { return };
        match link.send_request(&Message::Ping { time_ns: PROBE_PING }) {
            Ok(seq) => self.probe = Some(seq),
            Err(e) => self.link_failed(&e),
        }
    }

    /// Waits until `deadline` for a frame of live session `generation` that is not a life-cycle
    /// signal; life-cycle signals are applied.
    pub(super) fn pump(&mut self, generation: u64, deadline: Instant, what: &str) -> Pumped {
        loop {
            self.drain_qmp();
            if !self.live(generation) {
                return Pumped::Ended;
            }
            let now = Instant::now();
            if now >= deadline {
                return Pumped::Timeout;
            }
            let Some(link) = self.link.as_mut() else { return Pumped::Ended };
            let stale = link.stats().0.stale_frames;
            let r = link.recv(deadline.min(now + PUMP_SLICE), what);
            if link.stats().0.stale_frames > stale {
                // A frame of another session: the agent may have started a newer one.
                log::debug!("port {}: frame of another session dropped", self.port);
                self.probe();
            }
            let r = match r {
                Ok(r) => r,
                Err(LinkError::Timeout { .. }) => continue,
                Err(e) => {
                    self.link_failed(&e);
                    continue;
                }
            };
            let input = match &r.message {
                Ok(Message::Bye { reopen_after_ms, reason }) => {
                    log::debug!("port {}: BYE ({reason}, reopen after {reopen_after_ms} ms)", self.port);
                    Input::Bye
                }
                Ok(Message::Hello(h)) => {
                    // Through the same check as an offer: a stale HELLO never makes a session.
                    self.offered(SessionId { session: r.frame.header.session, nonce: h.nonce });
                    continue;
                }
                Ok(Message::Error { code: error_code::BAD_SESSION, about_kind, about_seq, text })
                    if *about_kind == MessageType::Ping as u8 && self.probe == Some(*about_seq) =>
                {
                    log::debug!("port {}: agent says bad session to the probe: {text}", self.port);
                    Input::BadSession
                }
                Ok(Message::Error { code: error_code::BAD_SESSION, text, .. }) => {
                    // About a frame sent before this session (an acknowledgement of an offer the
                    // agent had left already, a request of the last session): it says nothing of
                    // this one. The probe asks.
                    log::debug!("port {}: agent says bad session to an earlier frame: {text}", self.port);
                    self.probe();
                    continue;
                }
                Ok(Message::Pong { ping_time_ns: PROBE_PING, .. }) => {
                    self.probe = None;
                    continue;
                }
                _ => return Pumped::Frame(r),
            };
            self.apply(input);
        }
    }
}

/// The server and its last Session are gone: the connection closes, and the observer hears it.
impl Drop for Core {
    fn drop(&mut self) {
        self.drop_link("session server dropped");
    }
}

pub(super) fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a VM whose run state (`query-status`) is `state` after a `STOP` was stopped by its
/// own outgoing migration: `finish-migrate` while the migration finishes, `postmigrate` once it
/// completed. A pause is `paused` (also on a destination whose incoming migration completed),
/// savevm `save-vm`, a migration that failed after the stop `running` again.
pub(super) fn stopped_by_migration(state: &str) -> bool {
    matches!(state, "finish-migrate" | "postmigrate")
}
