//! The session server's state and I/O, shared by a [`super::PortServer`] and its
//! [`super::Session`]s: the pure machine ([`ServerMachine`]) fed with what the connection and
//! QMP show, and the one loop ([`Core::pump`]) that reads the stream while looking at QMP.

use crate::chardev::{Connection, Endpoint};
use crate::link::{Link, LinkError, LinkObserver, Received};
use crate::qmp::{Qmp, QmpEvent};
use crossbeam_channel::{Receiver, TryRecvError};
use std::io::ErrorKind;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use vport_common::message::error_code;
use vport_common::server::{Action, EndReason, Input, ServerMachine, ServerState, SessionId};
use vport_common::Message;

use super::{PROBE_PING, PUMP_SLICE};
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
    pub(super) request_hello: bool,
    pub(super) probe_pending: bool,
    pub(super) host_version: String,
    /// Watches every connection's messages (a timeline).
    pub(super) observer: Option<Arc<dyn LinkObserver>>,
    /// Connections made so far (for [`super::Reconnect::Once`]).
    pub(super) connections: u64,
    /// Whether the observer was told of the current connection: only once QEMU serves it.
    pub(super) announced: bool,
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
        let mut yielded = None;
        for a in step.actions {
            match a {
                Action::Yield(id) => {
                    self.generation += 1;
                    self.probe_pending = false;
                    log::info!("port {}: session {} ({:#010x}) ready", self.port, self.generation, id.session);
                    yielded = Some(id);
                }
                Action::End(reason) => {
                    log::info!("port {}: session {} ended: {reason}", self.port, self.generation);
                    self.ends.push((self.generation, reason));
                }
                Action::Disconnect => self.drop_link(&input.to_string()),
                Action::RequestHello => self.request_hello = true,
            }
        }
        yielded
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
            "STOP" if self.migrating() => Input::Migrated,
            "STOP" => Input::VmStopped,
            "SHUTDOWN" => Input::VmExited,
            "RESET" => Input::GuestReset,
            _ => return,
        };
        self.apply(input);
    }

    /// Closes the connection (if any); the observer hears it if it heard of the connection.
    fn drop_link(&mut self, reason: &str) {
        if self.link.take().is_some() && std::mem::take(&mut self.announced) {
            if let Some(o) = &self.observer {
                o.host_disconnected(&self.port, reason);
            }
        }
    }

    /// Tells the observer of the connection once QEMU serves it, waiting until `deadline` for
    /// that (the kernel says when QEMU accepted it, `sock_diag`; there is no event to wait
    /// on, so it is asked every [`SERVED_POLL`]). A connection in QEMU's backlog is not the
    /// port's client yet: its connect and what it sends are recorded from the moment it is
    /// served. Returns whether it is served (or cannot be known: then it is taken as served).
    pub(super) fn announce_when_served(&mut self, deadline: Instant) -> bool {
        if self.announced {
            return true;
        }
        let Some(link) = self.link.as_mut() else { return false };
        let timeout = deadline.saturating_duration_since(Instant::now());
        let served = wait_until(
            "QEMU to serve the connection",
            timeout,
            SERVED_POLL,
            || Ok(()),
            || (link.stream().queued() != Some(true)).then_some(()),
        );
        if served.is_err() {
            return false;
        }
        self.announced = true;
        if let Some(o) = &self.observer {
            o.host_connected(&self.port);
            link.set_observer(o.clone());
        }
        true
    }

    /// Whether a migration is under way on this QEMU (asked with `query-migrate` when QMP
    /// says `STOP`: a migration stops the source VM before its last pass).
    fn migrating(&self) -> bool {
        let Some(qmp) = &self.qmp else { return false };
        match qmp.query_migrate() {
            Ok(m) => !matches!(m.status.as_str(), "none" | "failed" | "cancelled"),
            Err(e) => {
                log::debug!("port {}: query-migrate after STOP failed: {e}", self.port);
                false
            }
        }
    }

    /// Maps a link failure on the current connection to an input.
    pub(super) fn on_link_error(&mut self, e: &LinkError) -> Input {
        match e {
            LinkError::Closed { .. } => Input::ConnectionLost,
            LinkError::Io { source, .. }
                if matches!(source.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) =>
            {
                Input::ConnectionLost
            }
            other => Input::ProtocolError(other.to_string()),
        }
    }

    pub(super) fn live(&self, generation: u64) -> bool {
        self.generation == generation && matches!(self.state(), ServerState::Ready { .. })
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
            if link.stats().0.stale_frames > stale && !self.probe_pending {
                // A frame of another session: the agent may have started a newer one. A PING in
                // our session is answered with PONG if not, with ERROR bad-session if so.
                log::debug!("port {}: frame of another session dropped; probing", self.port);
                self.probe_pending = true;
                if let Err(e) = link.send(&Message::Ping { time_ns: PROBE_PING }) {
                    let input = self.on_link_error(&e);
                    self.apply(input);
                    continue;
                }
            }
            let r = match r {
                Ok(r) => r,
                Err(LinkError::Timeout { .. }) => continue,
                Err(e) => {
                    let input = self.on_link_error(&e);
                    self.apply(input);
                    continue;
                }
            };
            let input = match &r.message {
                Ok(Message::Bye { reopen_after_ms, reason }) => {
                    log::debug!("port {}: BYE ({reason}, reopen after {reopen_after_ms} ms)", self.port);
                    Input::Bye
                }
                Ok(Message::Hello(h)) => Input::Hello(SessionId { session: r.frame.header.session, nonce: h.nonce }),
                Ok(Message::Error { code: error_code::BAD_SESSION, text, .. }) => {
                    log::debug!("port {}: agent says bad session: {text}", self.port);
                    Input::BadSession
                }
                Ok(Message::Pong { ping_time_ns: PROBE_PING, .. }) => {
                    self.probe_pending = false;
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
