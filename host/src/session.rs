//! Session server: one port's connections turned into [`Session`]s that live exactly as long as
//! the guest's open of the port — the 2010 "CharServerState" idea.
//!
//! A [`PortServer`] owns the port's [`Endpoint`], the current connection (a [`Link`]) and a
//! private QMP event subscription. [`PortServer::accept`] connects the host end when needed and
//! returns a [`Session`] only when the guest has the port open and the handshake is done
//! (CONNECTED_AND_READY): one Session per guest session. A HELLO repeated for the session
//! already handed out is not a new Session; a HELLO of a new session (the guest reopened) is.
//!
//! A Session ends exactly once, with an [`EndReason`]:
//!
//! | reason | observed as |
//! |---|---|
//! | [`EndReason::GuestClosed`] | BYE in band; the agent answering ERROR bad-session (it has moved to a newer session); `frontend-open` false (after `VSERPORT_CHANGE`, confirmed with `query-chardev`); guest `RESET` |
//! | [`EndReason::HostClosed`] | [`Session::close`] or dropping the Session: the host connection is closed |
//! | [`EndReason::Unplugged`] | `DEVICE_DELETED` for the port's device id |
//! | [`EndReason::VmStopped`] | QMP `STOP`; `SHUTDOWN`, QMP closed, or QEMU closing the connection (QEMU exits) |
//! | [`EndReason::ProtocolError`] | a HELLO contradicting the session; an i/o error on the connection |
//!
//! After the end every operation on the Session fails with [`SessionError::Ended`]: nothing
//! is silently dropped. The logic is the pure machine [`vport_common::server`] (one state enum,
//! one transition `match`, typed errors for illegal inputs); the I/O around it only turns
//! observations into [`Input`]s, passes the time, and carries out the [`Action`]s. An input the
//! machine refuses ([`ServerError`]) leaves the state unchanged; it is logged as a warning and
//! counted ([`PortServer::illegal_inputs`]).
//!
//! Detection is in band first (BYE is read within the same call that reads the stream) and
//! QMP second: QMP events are looked at before every operation and between read slices of at
//! most [`PUMP_SLICE`] while a call waits.
//!
//! ```no_run
//! use std::time::Duration;
//! use vport_host::image::GuestImage;
//! use vport_host::rig::{vm_config, Rig};
//!
//! fn one_guest_open(image: &GuestImage) -> Result<(), Box<dyn std::error::Error>> {
//! let mut rig = Rig::launch(vm_config(image, &["org.vport.0"], &[]))?;
//! let mut server = rig.port_server("org.vport.0")?;
//! rig.resume()?;
//! let mut session = server.accept(Duration::from_secs(60))?;
//! session.ping(Duration::from_secs(5), 1)?;
//! let _why = session.close_guest(100, Duration::from_secs(10))?; // GuestClosed
//! assert!(session.ping(Duration::from_secs(5), 2).is_err()); // SessionError::Ended
//! let _next = server.accept(Duration::from_secs(10))?; // after the agent reopened
//! Ok(())
//! }
//! ```

use crate::chardev::{ChardevError, Connection, Endpoint, EndpointEvents};
use crate::link::{Handshake, Link, LinkError, PingSample, Received};
use crate::qemu::PortInfo;
use crate::qmp::{Qmp, QmpEvent};
use crossbeam_channel::{Receiver, TryRecvError};
use std::io::ErrorKind;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::message::error_code;
use vport_common::server::ServerMachine;
pub use vport_common::server::{Action, EndReason, Input, ServerError, ServerState, SessionId};
use vport_common::Message;

/// Longest read slice while waiting: QMP events are looked at least this often.
pub const PUMP_SLICE: Duration = Duration::from_millis(100);
/// Longest handshake attempt in [`PortServer::accept`] between looks at QMP events.
pub const HANDSHAKE_SLICE: Duration = Duration::from_millis(1500);
/// The `time_ns` of the PING the server sends to check whether the agent moved on to a newer
/// session (after a frame of another session was dropped).
pub const PROBE_PING: u64 = u64::MAX;

/// What went wrong with a session or the session server.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The session has ended; the operation was not carried out.
    #[error("the session has ended: {0}")]
    Ended(EndReason),
    /// The server cannot yield sessions any more (the port was unplugged, QEMU exited).
    #[error("port {port}: no more sessions: {reason}")]
    Closed {
        /// Port name.
        port: String,
        /// Why.
        reason: EndReason,
    },
    /// Nothing awaited happened in time.
    #[error("port {port}: no {what} within {timeout:?}")]
    Timeout {
        /// Port name.
        port: String,
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The agent answered a request with ERROR.
    #[error("port {port}: agent error {code}: {text}")]
    Agent {
        /// Port name.
        port: String,
        /// Error code.
        code: u16,
        /// Error text.
        text: String,
    },
    /// The host end could not be connected.
    #[error("cannot connect the host end")]
    Endpoint(#[from] ChardevError),
    /// The link failed outside a session's life cycle.
    #[error("link failure on port {port}")]
    Link {
        /// Port name.
        port: String,
        /// Cause.
        #[source]
        source: LinkError,
    },
}

/// What one wait on the stream produced.
enum Pumped {
    Frame(Received),
    Ended,
    Timeout,
}

/// The server's state and I/O, shared by the [`PortServer`] and its [`Session`]s.
struct Core {
    port: String,
    device_id: String,
    chardev_id: String,
    endpoint: Box<dyn Endpoint>,
    qmp: Option<Arc<Qmp>>,
    events: Receiver<QmpEvent>,
    events_open: bool,
    machine: ServerMachine,
    /// Time 0 of the machine's clock.
    origin: Instant,
    /// Inputs the machine refused (see [`PortServer::illegal_inputs`]).
    illegal_inputs: u64,
    link: Option<Link<Connection>>,
    /// Sessions handed out so far; the live one (if any) is number `generation`.
    generation: u64,
    ends: Vec<(u64, EndReason)>,
    request_hello: bool,
    probe_pending: bool,
    host_version: String,
}

impl Core {
    /// The current state.
    fn state(&self) -> &ServerState {
        self.machine.state()
    }

    /// Feeds `input` to the machine and carries out the actions; returns a yielded session. An
    /// input the machine refuses changes nothing; it is logged and counted.
    fn apply(&mut self, input: Input) -> Option<SessionId> {
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
                Action::Disconnect => self.link = None,
                Action::RequestHello => self.request_hello = true,
            }
        }
        yielded
    }

    fn end_of(&self, generation: u64) -> Option<EndReason> {
        self.ends.iter().rev().find(|(g, _)| *g == generation).map(|(_, r)| r.clone())
    }

    /// Looks at every QMP event received so far, without waiting.
    fn drain_qmp(&mut self) {
        loop {
            match self.events.try_recv() {
                Ok(ev) => self.on_qmp(&ev),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    if self.events_open {
                        self.events_open = false;
                        log::debug!("port {}: qmp closed", self.port);
                        self.apply(Input::VmExited);
                    }
                    return;
                }
            }
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
            "STOP" => Input::VmStopped,
            "SHUTDOWN" => Input::VmExited,
            "RESET" => Input::GuestReset,
            _ => return,
        };
        self.apply(input);
    }

    /// Maps a link failure on the current connection to an input.
    fn on_link_error(&mut self, e: &LinkError) -> Input {
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

    fn live(&self, generation: u64) -> bool {
        self.generation == generation && matches!(self.state(), ServerState::Ready { .. })
    }

    /// Waits until `deadline` for a frame of live session `generation` that is not a life-cycle
    /// signal; life-cycle signals are applied.
    fn pump(&mut self, generation: u64, deadline: Instant, what: &str) -> Pumped {
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

/// Hands out the [`Session`]s of one port. See the module docs.
pub struct PortServer {
    core: Arc<Mutex<Core>>,
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

impl PortServer {
    /// A server for `port` over `endpoint`, watching QEMU's events through a subscription taken
    /// now and confirming `frontend-open` with `qmp`.
    pub fn new(port: &PortInfo, endpoint: Box<dyn Endpoint>, qmp: Arc<Qmp>) -> PortServer {
        let events = qmp.subscribe();
        PortServer::with_events(&port.name, &port.id, &port.chardev_id, endpoint, events, Some(qmp))
    }

    /// A server fed with QMP events from `events` (for example a scripted channel in tests);
    /// without `qmp`, a `VSERPORT_CHANGE` is taken at its word.
    pub fn with_events(
        port: &str,
        device_id: &str,
        chardev_id: &str,
        endpoint: Box<dyn Endpoint>,
        events: Receiver<QmpEvent>,
        qmp: Option<Arc<Qmp>>,
    ) -> PortServer {
        let core = Core {
            port: port.into(),
            device_id: device_id.into(),
            chardev_id: chardev_id.into(),
            endpoint,
            qmp,
            events,
            events_open: true,
            machine: ServerMachine::new(),
            origin: Instant::now(),
            illegal_inputs: 0,
            link: None,
            generation: 0,
            ends: Vec::new(),
            request_hello: false,
            probe_pending: false,
            host_version: concat!("vport-host ", env!("CARGO_PKG_VERSION")).into(),
        };
        PortServer { core: Arc::new(Mutex::new(core)) }
    }

    /// The port name.
    pub fn port(&self) -> String {
        lock(&self.core).port.clone()
    }

    /// The current state (after looking at pending QMP events).
    pub fn state(&self) -> ServerState {
        let mut c = lock(&self.core);
        c.drain_qmp();
        c.state().clone()
    }

    /// Inputs the session-server machine refused so far (each also logged as a warning): an
    /// observation that is illegal in the server's state, such as a second host connect. The
    /// state does not change on them.
    pub fn illegal_inputs(&self) -> u64 {
        lock(&self.core).illegal_inputs
    }

    /// How the last session ended, if one did.
    pub fn last_end(&self) -> Option<EndReason> {
        let mut c = lock(&self.core);
        c.drain_qmp();
        c.ends.last().map(|(_, r)| r.clone())
    }

    /// Sessions handed out so far.
    pub fn sessions(&self) -> u64 {
        lock(&self.core).generation
    }

    /// The endpoint's connect/disconnect record.
    pub fn endpoint_events(&self) -> EndpointEvents {
        lock(&self.core).endpoint.events().clone()
    }

    /// Waits up to `timeout` for the next guest session and returns it once the handshake is
    /// done. Connects the host end when there is no connection. While a session is live this
    /// first waits for it to end (frames of it read meanwhile are discarded).
    pub fn accept(&mut self, timeout: Duration) -> Result<Session, SessionError> {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.core);
        loop {
            c.drain_qmp();
            let left = deadline.saturating_duration_since(Instant::now());
            let port = c.port.clone();
            if left.is_zero() {
                return Err(SessionError::Timeout { port, what: "guest session".into(), timeout });
            }
            match c.state().clone() {
                ServerState::Closed { reason } => return Err(SessionError::Closed { port, reason }),
                ServerState::Idle => match c.endpoint.connect(left) {
                    Ok(conn) => {
                        c.link = Some(Link::new(&port, conn));
                        // Ask at once (see `Link::handshake`): the agent may not have seen us come.
                        c.request_hello = true;
                        c.apply(Input::HostConnected);
                    }
                    Err(ChardevError::AcceptTimeout { .. }) => {}
                    Err(e) => return Err(e.into()),
                },
                ServerState::Ready { .. } => {
                    let generation = c.generation;
                    if let Pumped::Frame(r) = c.pump(generation, deadline, "end of the live session") {
                        log::debug!("port {port}: discarding {:?} while waiting for the next session", r.message);
                    }
                }
                ServerState::Connected { .. } => {
                    let request = std::mem::take(&mut c.request_hello);
                    let version = c.host_version.clone();
                    let Some(link) = c.link.as_mut() else {
                        c.apply(Input::ConnectionLost);
                        continue;
                    };
                    let sent = if request { link.send(&Message::HelloRequest) } else { Ok(()) };
                    match sent.and_then(|()| link.await_hello(left.min(HANDSHAKE_SLICE), &version)) {
                        Ok(hs) => {
                            let id = SessionId { session: hs.session, nonce: hs.hello.nonce };
                            if c.apply(Input::Hello(id)).is_some() {
                                let generation = c.generation;
                                drop(c);
                                return Ok(Session { core: self.core.clone(), generation, id, port, handshake: hs });
                            }
                            log::debug!("port {port}: repeated hello of session {:#010x} ignored", id.session);
                        }
                        Err(LinkError::Timeout { .. }) => {}
                        Err(e) => {
                            let input = c.on_link_error(&e);
                            c.apply(input);
                        }
                    }
                }
            }
        }
    }
}

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

    /// Sends `msg` in the session.
    pub fn send(&mut self, msg: &Message) -> Result<(), SessionError> {
        self.send_request(msg).map(|_| ())
    }

    /// Sends `msg` in the session; returns its sequence number (an agent ERROR answering it
    /// names it).
    pub fn send_request(&mut self, msg: &Message) -> Result<u32, SessionError> {
        let mut c = self.live()?;
        let Some(link) = c.link.as_mut() else { return Err(self.ended(&c)) };
        match link.send_request(msg) {
            Ok(seq) => Ok(seq),
            Err(e @ (LinkError::Encode { .. } | LinkError::Frame { .. })) => {
                Err(SessionError::Link { port: self.port.clone(), source: e })
            }
            Err(e) => {
                let input = c.on_link_error(&e);
                c.apply(input);
                Err(self.ended(&c))
            }
        }
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

    /// Sends `msg` and waits up to `timeout` for a reply accepted by `pick`; other frames are
    /// skipped, an agent ERROR answering this request fails it (other ERRORs are logged), the
    /// session's end fails it with [`SessionError::Ended`].
    pub fn request<T>(
        &mut self,
        msg: &Message,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&Message) -> Option<T>,
    ) -> Result<(T, Instant), SessionError> {
        let deadline = Instant::now() + timeout;
        let seq = self.send_request(msg)?;
        let kind = msg.kind() as u8;
        let mut c = self.live()?;
        loop {
            match c.pump(self.generation, deadline, what) {
                Pumped::Frame(r) => match &r.message {
                    Ok(Message::Error { code, text, about_kind, about_seq })
                        if (*about_kind, *about_seq) == (kind, seq) =>
                    {
                        return Err(SessionError::Agent { port: self.port.clone(), code: *code, text: text.clone() })
                    }
                    Ok(Message::Error { code, text, about_kind, about_seq }) => log::warn!(
                        "port {}: agent error {code} about type {about_kind:#04x} seq {about_seq} while waiting for \
                         {what}: {text}",
                        self.port
                    ),
                    Ok(m) => match pick(m) {
                        Some(v) => return Ok((v, r.at)),
                        None => log::debug!("port {}: skipping {:?} while waiting for {what}", self.port, m.kind()),
                    },
                    Err(e) => log::debug!("port {}: unparsable frame while waiting for {what}: {e}", self.port),
                },
                Pumped::Ended => return Err(self.ended(&c)),
                Pumped::Timeout => {
                    return Err(SessionError::Timeout { port: self.port.clone(), what: what.into(), timeout })
                }
            }
        }
    }

    /// One PING/PONG round trip; `now_ns` is the host clock sent in the PING.
    pub fn ping(&mut self, timeout: Duration, now_ns: u64) -> Result<PingSample, SessionError> {
        let sent = Instant::now();
        let (agent_time_ns, at) = self.request(&Message::Ping { time_ns: now_ns }, timeout, "PONG", |m| match m {
            Message::Pong { ping_time_ns, time_ns } if *ping_time_ns == now_ns => Some(*time_ns),
            _ => None,
        })?;
        Ok(PingSample { rtt: at - sent, agent_time_ns, sent })
    }

    /// Sends `data` in an ECHO and returns what came back.
    pub fn echo(&mut self, data: &[u8], timeout: Duration) -> Result<Vec<u8>, SessionError> {
        let (bytes, _) = self.request(&Message::Echo(data.to_vec()), timeout, "ECHO_REPLY", |m| match m {
            Message::EchoReply(b) => Some(b.clone()),
            _ => None,
        })?;
        Ok(bytes)
    }

    /// Asks the agent to close the port (CLOSE, reopening after `reopen_after_ms`) and waits up
    /// to `timeout` for the session's end (normally [`EndReason::GuestClosed`] on the BYE).
    pub fn close_guest(&mut self, reopen_after_ms: u32, timeout: Duration) -> Result<EndReason, SessionError> {
        self.request_end(&Message::Close { reopen_after_ms }, timeout)
    }

    /// Asks the agent to close the port and reopen it at once (REOPEN) and waits up to `timeout`
    /// for the session's end (normally [`EndReason::GuestClosed`] on the BYE); the reopened
    /// port's session comes from the next [`PortServer::accept`].
    pub fn reopen_guest(&mut self, timeout: Duration) -> Result<EndReason, SessionError> {
        self.request_end(&Message::Reopen, timeout)
    }

    /// Sends `msg` and waits up to `timeout` for the session's end; an agent ERROR answering
    /// `msg` (a refused CLOSE) is [`SessionError::Agent`].
    fn request_end(&mut self, msg: &Message, timeout: Duration) -> Result<EndReason, SessionError> {
        let seq = self.send_request(msg)?;
        let kind = msg.kind() as u8;
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.core);
        loop {
            if let Some(r) = c.end_of(self.generation) {
                return Ok(r);
            }
            match c.pump(self.generation, deadline, "end of the session") {
                Pumped::Frame(r) => match &r.message {
                    Ok(Message::Error { code, text, about_kind, about_seq })
                        if (*about_kind, *about_seq) == (kind, seq) =>
                    {
                        return Err(SessionError::Agent { port: self.port.clone(), code: *code, text: text.clone() })
                    }
                    other => log::debug!("port {}: discarding {other:?} while waiting for the end", self.port),
                },
                Pumped::Ended => {}
                Pumped::Timeout => {
                    return Err(SessionError::Timeout {
                        port: self.port.clone(),
                        what: "end of the session".into(),
                        timeout,
                    })
                }
            }
        }
    }

    /// Waits up to `timeout` for the session to end and returns why; frames read meanwhile are
    /// discarded (an agent ERROR among them is logged).
    pub fn wait_end(&mut self, timeout: Duration) -> Result<EndReason, SessionError> {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.core);
        loop {
            if let Some(r) = c.end_of(self.generation) {
                return Ok(r);
            }
            match c.pump(self.generation, deadline, "end of the session") {
                Pumped::Frame(r) => {
                    log::debug!("port {}: discarding {:?} while waiting for the end", self.port, r.message)
                }
                Pumped::Ended => {}
                Pumped::Timeout => {
                    return Err(SessionError::Timeout {
                        port: self.port.clone(),
                        what: "end of the session".into(),
                        timeout,
                    })
                }
            }
        }
    }

    /// Runs `f` on the live session's link, for link requests this type does not wrap. `f`
    /// reads the stream itself, so a BYE it skips is not seen; the QMP events and the link's
    /// failures are still applied, and a closed or bad-session answer ends the session. Use
    /// [`Session::close_guest`] / [`Session::reopen_guest`] rather than the link's own close and
    /// reopen requests, whose BYE the session would not see.
    pub fn with_link<T>(
        &mut self,
        f: impl FnOnce(&mut Link<Connection>) -> Result<T, LinkError>,
    ) -> Result<T, SessionError> {
        let mut c = self.live()?;
        let Some(link) = c.link.as_mut() else { return Err(self.ended(&c)) };
        let r = f(link);
        let out = match r {
            Ok(v) => Ok(v),
            Err(LinkError::Agent { code: error_code::BAD_SESSION, .. }) => {
                c.apply(Input::BadSession);
                Err(self.ended(&c))
            }
            Err(e @ (LinkError::Closed { .. } | LinkError::Io { .. })) => {
                let input = c.on_link_error(&e);
                c.apply(input);
                Err(self.ended(&c))
            }
            Err(source) => Err(SessionError::Link { port: self.port.clone(), source }),
        };
        c.drain_qmp();
        out
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

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chardev::{EndpointAddr, EndpointEventKind, EndpointKind};
    use crossbeam_channel::Sender;
    use serde_json::json;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use vport_common::message::Hello;
    use vport_common::Decoder;
    use ServerState::*;

    const A: SessionId = SessionId { session: 0xA, nonce: 1 };
    const B: SessionId = SessionId { session: 0xB, nonce: 2 };

    #[test]
    fn an_illegal_input_is_counted_and_changes_nothing() {
        let (srv, _agents, _qmp) = server();
        {
            let mut c = lock(&srv.core);
            assert_eq!(c.apply(Input::Hello(A)), None, "a HELLO with no connection");
            assert_eq!(c.apply(Input::HostConnected), None);
            assert_eq!(c.apply(Input::HostConnected), None, "a second host connect");
        }
        assert_eq!(srv.illegal_inputs(), 2);
        assert_eq!(srv.state(), Connected { last: None });
    }

    /// An endpoint whose connections are socketpairs handed to a scripted agent.
    struct FakeEndpoint {
        addr: EndpointAddr,
        events: EndpointEvents,
        agents: Sender<UnixStream>,
    }

    impl Endpoint for FakeEndpoint {
        fn port(&self) -> &str {
            "org.vport.fake"
        }
        fn addr(&self) -> &EndpointAddr {
            &self.addr
        }
        fn connect(&mut self, _timeout: Duration) -> Result<Connection, ChardevError> {
            let (host, guest) = UnixStream::pair().unwrap();
            self.agents.send(guest).unwrap();
            Ok(Connection::from_unix_stream("org.vport.fake", EndpointKind::UnixClient, host, &self.events))
        }
        fn events(&self) -> &EndpointEvents {
            &self.events
        }
    }

    /// The guest side of one connection, scripted by the test thread.
    struct Agent {
        s: UnixStream,
        dec: Decoder,
        seq: u32,
    }

    impl Agent {
        fn send(&mut self, session: u32, m: &Message) {
            self.s.write_all(&m.to_frame(session, self.seq).unwrap().encode().unwrap()).unwrap();
            self.seq += 1;
        }
        fn hello(&mut self, id: SessionId) {
            let h = Hello {
                agent_version: "t".into(),
                port_name: "org.vport.fake".into(),
                kernel_release: "k".into(),
                boot_id: "b".into(),
                nonce: id.nonce,
                agent_time_ns: 0,
            };
            self.send(id.session, &Message::Hello(h));
        }
        fn recv(&mut self) -> (u32, Message) {
            let (h, m) = self.recv_frame();
            (h.session, m)
        }
        fn recv_frame(&mut self) -> (vport_common::Header, Message) {
            let mut buf = [0u8; 4096];
            loop {
                if let Some(f) = self.dec.next_frame() {
                    let f = f.unwrap();
                    return (f.header, Message::from_frame(&f).unwrap());
                }
                let n = self.s.read(&mut buf).unwrap();
                assert!(n > 0, "host closed");
                self.dec.push(&buf[..n]);
            }
        }
        /// Answers requests like the agent in session `id` until `until` matches.
        fn serve(&mut self, id: SessionId, mut until: impl FnMut(&Message) -> bool) {
            loop {
                let (sess, m) = self.recv();
                if until(&m) {
                    return;
                }
                match m {
                    Message::Ping { time_ns } if sess == id.session || sess == 0 => {
                        self.send(sess, &Message::Pong { ping_time_ns: time_ns, time_ns: 7 })
                    }
                    Message::Ping { .. } => self.send(0, &Message::error_unsolicited(error_code::BAD_SESSION, "stale")),
                    _ => {}
                }
            }
        }
    }

    fn server() -> (PortServer, Receiver<UnixStream>, Sender<QmpEvent>) {
        let (agents, rx) = crossbeam_channel::unbounded();
        let addr = EndpointAddr::UnixClient { path: "/fake".into() };
        let ep = FakeEndpoint { addr, events: Default::default(), agents };
        let (qtx, qrx) = crossbeam_channel::unbounded();
        let srv = PortServer::with_events("org.vport.fake", "vport-port0", "vport-ch0", Box::new(ep), qrx, None);
        (srv, rx, qtx)
    }

    fn agent(rx: &Receiver<UnixStream>) -> Agent {
        Agent { s: rx.recv_timeout(Duration::from_secs(5)).unwrap(), dec: Decoder::default(), seq: 0 }
    }

    fn event(name: &str, data: serde_json::Value) -> QmpEvent {
        QmpEvent { name: name.into(), data, qemu_time_us: 0, received: Instant::now() }
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn scripted_agent_bye_reopen_and_host_close() {
        let (mut srv, agents, _qmp) = server();
        let guest = std::thread::spawn(move || {
            let mut g = agent(&agents);
            assert!(matches!(g.recv(), (0, Message::HelloRequest)), "the server asks for a session at once");
            g.hello(A);
            assert!(matches!(g.recv(), (0xA, Message::HelloAck { nonce: 1, .. })));
            g.hello(A); // repeated offer: no new session
            g.serve(A, |m| matches!(m, Message::Close { .. }));
            g.send(A.session, &Message::Bye { reopen_after_ms: 0, reason: "close command".into() });
            g.hello(B); // reopened
            assert!(matches!(g.recv(), (0xB, Message::HelloAck { nonce: 2, .. })));
            g.serve(B, |_| false);
        });
        let mut s1 = srv.accept(T).unwrap();
        assert_eq!((s1.id(), s1.number()), (A, 1));
        assert_eq!(s1.ping(T, 11).unwrap().agent_time_ns, 7);
        assert_eq!(s1.close_guest(0, T).unwrap(), EndReason::GuestClosed);
        assert_eq!(s1.end_reason(), Some(EndReason::GuestClosed));
        assert!(matches!(s1.ping(T, 12), Err(SessionError::Ended(EndReason::GuestClosed))));
        assert!(matches!(s1.send(&Message::Stats), Err(SessionError::Ended(EndReason::GuestClosed))));
        let mut s2 = srv.accept(T).unwrap();
        assert_eq!((s2.id(), s2.number()), (B, 2));
        s2.ping(T, 13).unwrap();
        assert_eq!(s2.close(), EndReason::HostClosed);
        assert!(matches!(s2.echo(b"x", T), Err(SessionError::Ended(EndReason::HostClosed))));
        assert_eq!(s1.end_reason(), Some(EndReason::GuestClosed), "an old session keeps its reason");
        guest.join().unwrap_err(); // the scripted agent saw the host close (assert in recv)
        let whats: Vec<_> = srv.endpoint_events().history().iter().map(|e| e.what).collect();
        assert_eq!(whats, [EndpointEventKind::Connected, EndpointEventKind::ClosedByHost]);
        assert_eq!(srv.state(), Idle);
    }

    #[test]
    fn a_refused_close_is_an_agent_error_not_a_timeout() {
        let (mut srv, agents, _qmp) = server();
        let guest = std::thread::spawn(move || {
            let mut g = agent(&agents);
            g.recv();
            g.hello(A);
            g.recv();
            loop {
                let (h, m) = g.recv_frame();
                if matches!(m, Message::Close { .. }) {
                    g.send(A.session, &Message::error_for(&h, error_code::LIMIT, "a reopen delay of 70000 ms exceeds"));
                    break;
                }
            }
            g.serve(A, |_| false);
        });
        let mut s1 = srv.accept(T).unwrap();
        let err = s1.close_guest(70_000, T).unwrap_err();
        assert!(matches!(err, SessionError::Agent { code: error_code::LIMIT, .. }), "{err}");
        assert_eq!(s1.end_reason(), None, "the session goes on");
        drop(s1);
        drop(srv);
        let _ = guest.join();
    }

    #[test]
    fn a_newer_session_is_found_by_probing_and_the_next_accept_asks_for_its_hello() {
        let (mut srv, agents, _qmp) = server();
        let guest = std::thread::spawn(move || {
            let mut g = agent(&agents);
            assert!(matches!(g.recv(), (0, Message::HelloRequest)), "the server asks for a session at once");
            g.hello(A);
            g.recv();
            g.serve(A, |m| matches!(m, Message::Ping { time_ns: 1 }));
            g.send(A.session, &Message::Pong { ping_time_ns: 1, time_ns: 1 });
            // The guest reopened without a BYE reaching the host: a HELLO of session B.
            g.hello(B);
            // The host's probe in session A gets bad-session; then it asks for a HELLO.
            g.serve(B, |m| matches!(m, Message::HelloRequest));
            g.hello(B);
            assert!(matches!(g.recv(), (0xB, Message::HelloAck { nonce: 2, .. })));
        });
        let mut s1 = srv.accept(T).unwrap();
        s1.ping(T, 1).unwrap();
        assert_eq!(s1.wait_end(T).unwrap(), EndReason::GuestClosed);
        let s2 = srv.accept(T).unwrap();
        assert_eq!(s2.id(), B);
        guest.join().unwrap();
    }

    #[test]
    fn qmp_events_end_sessions_and_close_the_server() {
        let (mut srv, agents, qmp) = server();
        let guest = std::thread::spawn(move || {
            let mut g = agent(&agents);
            g.hello(A);
            g.recv();
            g.serve(A, |_| false); // until the host closes the connection
        });
        let mut s1 = srv.accept(T).unwrap();
        qmp.send(event("VSERPORT_CHANGE", json!({"id": "other-port", "open": false}))).unwrap();
        assert_eq!(s1.end_reason(), None, "another port's event");
        qmp.send(event("VSERPORT_CHANGE", json!({"id": "vport-port0", "open": false}))).unwrap();
        assert!(matches!(s1.ping(T, 1), Err(SessionError::Ended(EndReason::GuestClosed))));
        drop(s1);
        assert_eq!(srv.last_end(), Some(EndReason::GuestClosed), "dropping an ended session changes nothing");
        qmp.send(event("DEVICE_DELETED", json!({"device": "vport-port0", "path": "/x"}))).unwrap();
        let err = srv.accept(T).unwrap_err();
        assert!(matches!(err, SessionError::Closed { reason: EndReason::Unplugged, .. }), "{err}");
        assert!(err.to_string().contains("org.vport.fake"), "{err}");
        drop(srv);
        drop(qmp);
        let _ = guest.join();
    }

    #[test]
    fn stop_ends_with_vm_stopped_and_qmp_gone_closes_the_server() {
        let (mut srv, agents, qmp) = server();
        let guest = std::thread::spawn(move || {
            let mut g = agent(&agents);
            g.hello(A);
            g.recv();
            g.serve(A, |m| matches!(m, Message::HelloRequest));
            g.hello(B);
            g.recv();
            g.serve(B, |_| false);
        });
        let mut s1 = srv.accept(T).unwrap();
        qmp.send(event("STOP", serde_json::Value::Null)).unwrap();
        assert_eq!(s1.wait_end(T).unwrap(), EndReason::VmStopped);
        // After `cont` the agent is still in session A: accept asks for a new one.
        let mut s2 = srv.accept(T).unwrap();
        assert_eq!(s2.id(), B);
        drop(qmp);
        assert!(matches!(s2.ping(T, 1), Err(SessionError::Ended(EndReason::VmStopped))));
        assert!(matches!(srv.accept(T), Err(SessionError::Closed { reason: EndReason::VmStopped, .. })));
        drop(srv);
        drop(s2);
        let _ = guest.join();
    }
}
