//! [`PortServer`]: hands out the [`Session`]s of one port, connecting the host end as its
//! [`Reconnect`] policy allows.

use super::core::{lock, Core, Pumped};
use super::{Session, SessionError, HANDSHAKE_SLICE};
use crate::chardev::{ChardevError, Endpoint, EndpointEvents};
use crate::link::{Link, LinkError, LinkObserver};
use crate::qemu::PortInfo;
use crate::qmp::{Qmp, QmpEvent};
use crossbeam_channel::Receiver;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vport_common::server::{EndReason, Input, ServerMachine, ServerState, SessionId};
use vport_common::Message;

/// When a [`PortServer`] connects the host end again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Whenever there is no connection (the host left, QEMU closed it): `accept` connects
    /// again, and retries a connect that QEMU's listener refuses (not there yet, being
    /// replaced) every `retry` until its deadline. The default, with 100 ms.
    Always {
        /// Time between connect attempts that were refused.
        retry: Duration,
    },
    /// One connection only: once it is gone, `accept` fails with
    /// [`SessionError::NoReconnect`] (a tool that must not take a port over again).
    Once,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect::Always { retry: Duration::from_millis(100) }
    }
}

impl Reconnect {
    /// Whether a failed connect is retried: under `Always`, a listener that refuses or is not
    /// there (yet).
    fn retries(&self, e: &ChardevError) -> bool {
        let io_kind = match e {
            ChardevError::ConnectUnix { source, .. } | ChardevError::ConnectTcp { source, .. } => source.kind(),
            _ => return false,
        };
        matches!(self, Reconnect::Always { .. })
            && matches!(io_kind, ErrorKind::ConnectionRefused | ErrorKind::NotFound)
    }
}

/// Whether the server's connection waits in QEMU's listen backlog. QEMU's socket chardev serves
/// one client per port; another client's connect succeeds and then waits there, unserved,
/// until the first leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// No connection now.
    NotConnected,
    /// QEMU accepted the connection: it is the port's client.
    Served,
    /// The connection waits in QEMU's backlog: another client holds the chardev.
    Queued,
    /// Unknown: not a unix client connection, or the kernel cannot be asked.
    Unknown,
}

/// Hands out the [`Session`]s of one port. See the module docs.
pub struct PortServer {
    pub(super) core: Arc<Mutex<Core>>,
    reconnect: Reconnect,
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
            observer: None,
            connections: 0,
            announced: false,
        };
        PortServer { core: Arc::new(Mutex::new(core)), reconnect: Reconnect::default() }
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

    /// Sets when the host end is connected again (default: [`Reconnect::Always`]).
    pub fn set_reconnect(&mut self, policy: Reconnect) {
        self.reconnect = policy;
    }

    /// Reports every message of every connection from now on to `observer` (a timeline).
    pub fn set_observer(&mut self, observer: Arc<dyn LinkObserver>) {
        let mut c = lock(&self.core);
        if c.announced {
            if let Some(link) = c.link.as_mut() {
                link.set_observer(observer.clone());
            }
        }
        c.observer = Some(observer);
    }

    /// Whether the current connection waits in QEMU's backlog (see [`Backlog`]).
    pub fn backlog(&self) -> Backlog {
        let c = lock(&self.core);
        let Some(link) = c.link.as_ref() else { return Backlog::NotConnected };
        match link.stream().queued() {
            Some(true) => Backlog::Queued,
            Some(false) => Backlog::Served,
            None => Backlog::Unknown,
        }
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
                return Err(SessionError::Timeout { port, what: "HELLO from vport-agent".into(), timeout });
            }
            match c.state().clone() {
                ServerState::Closed { reason } => return Err(SessionError::Closed { port, reason }),
                ServerState::Idle => {
                    drop(c);
                    self.connect_once(deadline)?;
                    c = lock(&self.core);
                }
                ServerState::Ready { .. } => {
                    let generation = c.generation;
                    if let Pumped::Frame(r) = c.pump(generation, deadline, "end of the live session") {
                        log::debug!("port {port}: discarding {:?} while waiting for the next session", r.message);
                    }
                }
                ServerState::Connected { .. } => {
                    if !c.announce_when_served(deadline) {
                        continue;
                    }
                    let request = std::mem::take(&mut c.request_hello);
                    let version = c.host_version.clone();
                    let Some(link) = c.link.as_mut() else {
                        c.apply(Input::ConnectionLost);
                        continue;
                    };
                    let sent = if request { link.send(&Message::HelloRequest) } else { Ok(()) };
                    match sent.and_then(|()| link.await_hello(left.min(HANDSHAKE_SLICE), &version)) {
                        Ok(mut hs) => {
                            hs.requests_sent += u32::from(request);
                            let id = SessionId { session: hs.session, nonce: hs.hello.nonce };
                            if c.apply(Input::Hello(id)).is_some() {
                                let generation = c.generation;
                                drop(c);
                                return Ok(Session::new(self.core.clone(), generation, id, port, hs));
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

    /// Connects the host end now, unless it is connected: for a host that must be there before
    /// the guest runs (connect, then `cont`). Waits up to `timeout` (a server endpoint waits for
    /// QEMU to connect).
    pub fn connect(&mut self, timeout: Duration) -> Result<(), SessionError> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = {
                let mut c = lock(&self.core);
                c.drain_qmp();
                c.state().clone()
            };
            match state {
                ServerState::Closed { reason } => return Err(SessionError::Closed { port: self.port(), reason }),
                ServerState::Connected { .. } | ServerState::Ready { .. } => return Ok(()),
                ServerState::Idle if Instant::now() >= deadline => {
                    return Err(SessionError::Timeout { port: self.port(), what: "host connection".into(), timeout })
                }
                ServerState::Idle => self.connect_once(deadline)?,
            }
        }
    }

    /// One connect attempt from IDLE, as the reconnect policy allows: on success the server is
    /// CONNECTED and will ask for a HELLO at once. A refused connect that the policy retries
    /// returns `Ok` after the retry interval (still IDLE).
    fn connect_once(&mut self, deadline: Instant) -> Result<(), SessionError> {
        let mut c = lock(&self.core);
        let port = c.port.clone();
        if c.connections > 0 && self.reconnect == Reconnect::Once {
            return Err(SessionError::NoReconnect { port });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match c.endpoint.connect(left) {
            Ok(conn) => {
                c.connections += 1;
                if conn.queued() == Some(true) {
                    log::info!(
                        "port {port}: connected, but QEMU has not accepted: another client holds the chardev and \
                         this connection waits in its backlog until that client leaves"
                    );
                }
                c.link = Some(Link::new(&port, conn));
                c.announced = false;
                c.announce_when_served(Instant::now());
                // Ask at once (see `Link::handshake`): the agent may not have seen us come.
                c.request_hello = true;
                c.apply(Input::HostConnected);
                Ok(())
            }
            Err(ChardevError::AcceptTimeout { .. }) => Ok(()),
            Err(e) => {
                let Reconnect::Always { retry } = self.reconnect else { return Err(e.into()) };
                if !self.reconnect.retries(&e) {
                    return Err(e.into());
                }
                log::debug!("port {port}: {e}; retrying in {retry:?}");
                drop(c);
                // A retry interval between connect attempts, bounded by the deadline: no event
                // tells when QEMU's listener is back.
                std::thread::sleep(retry.min(deadline.saturating_duration_since(Instant::now())));
                Ok(())
            }
        }
    }

    /// The host leaves now: closes the connection whatever the state (a live session ends with
    /// [`EndReason::HostClosed`]). Nothing happens without a connection. The next
    /// [`PortServer::accept`] or [`PortServer::connect`] connects again (as the reconnect policy
    /// allows).
    pub fn disconnect(&mut self) {
        let mut c = lock(&self.core);
        c.drain_qmp();
        if matches!(c.state(), ServerState::Connected { .. } | ServerState::Ready { .. }) {
            c.apply(Input::HostClose);
        }
    }

    /// Sends `msg` on the connection outside any session (session 0), before a session is
    /// handed out: for a host that queues requests while QEMU has not served it yet (see
    /// [`Backlog`]). Refused while a session is live (send in the [`Session`]) and without a
    /// connection.
    pub fn send_before_session(&mut self, msg: &Message) -> Result<u32, SessionError> {
        let mut c = lock(&self.core);
        c.drain_qmp();
        let port = c.port.clone();
        let state = c.state().clone();
        match state {
            ServerState::Closed { reason } => Err(SessionError::Closed { port, reason }),
            ServerState::Idle | ServerState::Ready { .. } => {
                Err(SessionError::WrongState { port, what: "send outside a session", state: state.name() })
            }
            ServerState::Connected { .. } => {
                let Some(link) = c.link.as_mut() else {
                    return Err(SessionError::WrongState { port, what: "send outside a session", state: "IDLE" });
                };
                match link.send_request(msg) {
                    Ok(seq) => Ok(seq),
                    Err(e) => {
                        let input = c.on_link_error(&e);
                        c.apply(input);
                        Err(SessionError::Link { port, source: e })
                    }
                }
            }
        }
    }

    /// Waits up to `window` for a session the agent offers without being asked (no
    /// HELLO_REQUEST is sent now or meanwhile, and none is pending from the connect): `Some` if
    /// a HELLO of a new session came, `None` if none did. Needs a connection and no live
    /// session (CONNECTED).
    pub fn accept_offered(&mut self, window: Duration) -> Result<Option<Session>, SessionError> {
        let mut c = lock(&self.core);
        c.drain_qmp();
        let port = c.port.clone();
        let state = c.state().clone();
        match state {
            ServerState::Closed { reason } => return Err(SessionError::Closed { port, reason }),
            ServerState::Idle | ServerState::Ready { .. } => {
                return Err(SessionError::WrongState { port, what: "wait for an offer", state: state.name() })
            }
            ServerState::Connected { .. } => {}
        }
        c.request_hello = false;
        c.announce_when_served(Instant::now());
        let version = c.host_version.clone();
        let Some(link) = c.link.as_mut() else {
            return Err(SessionError::WrongState { port, what: "wait for an offer", state: "IDLE" });
        };
        match link.await_offer(window, &version) {
            Ok(hs) => {
                let id = SessionId { session: hs.session, nonce: hs.hello.nonce };
                if c.apply(Input::Hello(id)).is_some() {
                    let generation = c.generation;
                    drop(c);
                    return Ok(Some(Session::new(self.core.clone(), generation, id, port, hs)));
                }
                Ok(None)
            }
            Err(LinkError::Timeout { .. }) => Ok(None),
            Err(e) => {
                let input = c.on_link_error(&e);
                c.apply(input);
                Err(SessionError::Link { port, source: e })
            }
        }
    }
}
