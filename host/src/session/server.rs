//! [`PortServer`]: hands out the [`Session`]s of one port, connecting the host end as its
//! [`Reconnect`] policy allows.

use super::announce::service;
use super::core::{lock, Core, Pumped};
use super::{Session, SessionError, HANDSHAKE_SLICE, PUMP_SLICE, SERVE_GRACE};
use crate::chardev::{ChardevError, Endpoint, EndpointEvents};
use crate::link::{Link, LinkObserver, HELLO_REQUEST_INTERVAL};
use crate::qemu::PortInfo;
use crate::qmp::{Qmp, QmpEvent};
use crossbeam_channel::Receiver;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vport_common::server::{EndReason, Input, ServerMachine, ServerState};
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
    /// Unknown: a TCP or pty connection vport made, or a unix one the kernel cannot be asked
    /// about (no `unix_diag`). Never taken as served: the observer hears of such a connection
    /// with the first frame from the guest (see [`PortServer::set_observer`]).
    Unknown,
}

/// Hands out the [`Session`]s of one port. See the module docs.
pub struct PortServer {
    pub(super) core: Arc<Mutex<Core>>,
    reconnect: Reconnect,
    /// See [`PortServer::infer_exit_from_chardev`].
    exit_from_chardev: bool,
}

/// Whether a failed connect says that the chardev's server is gone: a socket QEMU listened on
/// that refuses or is no longer there, a pty that is gone.
fn server_gone(e: &ChardevError) -> Option<&std::io::Error> {
    match e {
        ChardevError::ConnectUnix { source, .. } | ChardevError::ConnectTcp { source, .. }
            if matches!(source.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) =>
        {
            Some(source)
        }
        ChardevError::Pty { source, .. }
            if source.kind() == ErrorKind::NotFound || source.raw_os_error() == Some(nix::libc::EIO) =>
        {
            Some(source)
        }
        _ => None,
    }
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
            ended_ids: Default::default(),
            request_hello: false,
            probe: None,
            host_version: concat!("vport-host ", env!("CARGO_PKG_VERSION")).into(),
            observer: None,
            connections: 0,
            gate: None,
            asked_at: None,
            requests: 0,
            lost_by_peer: false,
            server_gone: None,
        };
        PortServer { core: Arc::new(Mutex::new(core)), reconnect: Reconnect::default(), exit_from_chardev: false }
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

    /// For a server without QMP (a VM vport did not start, no `--qmp`): QEMU's exit is then
    /// inferred from the chardev. Once QEMU has closed the connection, a reconnect that finds
    /// its server gone (a unix or TCP socket QEMU listened on refusing or no longer there, a pty
    /// that is gone) closes the server as [`EndReason::VmExited`], and
    /// [`PortServer::server_gone`] says why. A QEMU that listens goes on listening while it
    /// runs, so this is its exit (or the chardev's removal). A host end where vport listens
    /// cannot tell: QEMU reconnecting late looks the same as QEMU gone.
    pub fn infer_exit_from_chardev(&mut self) {
        self.exit_from_chardev = true;
    }

    /// Why the chardev's server was taken for gone ([`PortServer::infer_exit_from_chardev`]),
    /// once it was.
    pub fn server_gone(&self) -> Option<String> {
        lock(&self.core).server_gone.clone()
    }

    /// Sets when the host end is connected again (default: [`Reconnect::Always`]).
    pub fn set_reconnect(&mut self, policy: Reconnect) {
        self.reconnect = policy;
    }

    /// Reports every connection and its messages from now on to `observer` (a timeline). A
    /// connection QEMU already serves is reported to it as connected first, so that it never
    /// hears a disconnect without the connect. A connection QEMU serves is reported when it is
    /// seen served (asked of the kernel, see [`Backlog`]); one whose service cannot be known
    /// ([`Backlog::Unknown`]) with the first frame from the guest.
    pub fn set_observer(&mut self, observer: Arc<dyn LinkObserver>) {
        let mut c = lock(&self.core);
        if let Some(gate) = &c.gate {
            gate.set_observer(&c.port, observer.clone());
        }
        c.observer = Some(observer);
    }

    /// The observer set with [`PortServer::set_observer`], if any: a server made anew for
    /// the same port (after an unplug) reports to it too.
    pub fn observer(&self) -> Option<Arc<dyn LinkObserver>> {
        lock(&self.core).observer.clone()
    }

    /// Whether the VM is paused for now, asked of QEMU (`query-status`, see
    /// [`paused_for_now`]): a VM that is paused, migrating in or saving yields no session, and
    /// a caller waiting for one does not count that time against the agent. `false` without
    /// QMP, when QEMU does not answer, and in a state the VM does not leave by itself.
    pub fn vm_paused(&self) -> bool {
        let Some(qmp) = lock(&self.core).qmp.clone() else { return false };
        match qmp.query_status() {
            Ok(state) => paused_for_now(&state),
            Err(e) => {
                log::debug!("port {}: query-status failed: {e}", self.port());
                false
            }
        }
    }

    /// Whether the current connection waits in QEMU's backlog (see [`Backlog`]).
    pub fn backlog(&self) -> Backlog {
        let c = lock(&self.core);
        c.link.as_ref().map_or(Backlog::NotConnected, |link| service(link.stream()))
    }

    /// Waits up to `timeout` for the next guest session and returns it once the handshake is
    /// done. Connects the host end when there is no connection. While a session is live this
    /// first waits for it to end (frames of it read meanwhile are discarded). Asks for a HELLO
    /// (HELLO_REQUEST) at once on a new connection (and when the machine says so,
    /// [`vport_common::server::Action::RequestHello`]), then once every
    /// [`HELLO_REQUEST_INTERVAL`] without a HELLO, counted from the last request, from QEMU
    /// serving the connection, or from the end of the last session; across calls: a caller
    /// accepting in short slices asks as often as one long call does, and a long call no more
    /// often. The session's [`crate::link::Handshake::requests_sent`] counts the requests since
    /// the connection or the last session.
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
                ServerState::Connected { .. } if c.check_service() == Backlog::Queued => {
                    // QEMU has not accepted the connection, or has accepted and closed it (the
                    // kernel shows both alike): read for one slice. A HELLO (answering a
                    // request queued with it) proves it served, end of file ends it. Nothing is
                    // asked meanwhile: a request would wait in the backlog.
                    if let Ok(Some((id, hs))) = c.take_offer(deadline.min(Instant::now() + PUMP_SLICE)) {
                        let generation = c.generation;
                        drop(c);
                        return Ok(Session::new(self.core.clone(), generation, id, port, hs));
                    }
                }
                ServerState::Connected { .. } => {
                    let due = c.asked_at.is_none_or(|at| at.elapsed() >= HELLO_REQUEST_INTERVAL);
                    let request = std::mem::take(&mut c.request_hello) || due;
                    let core = &mut *c;
                    let Some(link) = core.link.as_mut() else {
                        core.apply(Input::ConnectionLost);
                        continue;
                    };
                    if request {
                        if let Err(e) = link.send(&Message::HelloRequest) {
                            core.link_failed(&e);
                            continue;
                        }
                        core.asked_at = Some(Instant::now());
                        core.requests += 1;
                    }
                    // Read until the next request is due: the interval is kept here, across
                    // calls, so the link must not ask on its own (`take_offer`).
                    let next_ask =
                        core.asked_at.map_or(Duration::ZERO, |at| HELLO_REQUEST_INTERVAL.saturating_sub(at.elapsed()));
                    let slice = left.min(HANDSHAKE_SLICE).min(next_ask);
                    // A failure of the connection is applied there; the loop looks at the state.
                    if let Ok(Some((id, hs))) = core.take_offer(Instant::now() + slice) {
                        let generation = c.generation;
                        drop(c);
                        return Ok(Session::new(self.core.clone(), generation, id, port, hs));
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
    /// CONNECTED and will ask for a HELLO at once. QEMU accepts a connection asynchronously:
    /// the observer is told of it once QEMU serves it, waited for up to [`SERVE_GRACE`] here
    /// (a connection still queued after that waits for another client to leave; `accept` tells
    /// the observer when QEMU serves it). A refused connect that the policy retries returns
    /// `Ok` after the retry interval (still IDLE).
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
                c.lost_by_peer = false;
                if conn.queued() == Some(true) {
                    log::info!(
                        "port {port}: connected, but QEMU has not accepted: another client holds the chardev and \
                         this connection waits in its backlog until that client leaves"
                    );
                }
                c.set_link(Link::new(&port, conn));
                // Ask at once (see `Link::handshake`): the agent may not have seen us come.
                c.request_hello = true;
                c.apply(Input::HostConnected);
                c.wait_served((Instant::now() + SERVE_GRACE).min(deadline));
                Ok(())
            }
            Err(ChardevError::AcceptTimeout { .. }) => Ok(()),
            Err(e) if self.exit_from_chardev && c.lost_by_peer && server_gone(&e).is_some() => {
                let cause = server_gone(&e).map(ToString::to_string).unwrap_or_default();
                let why = format!(
                    "the chardev's server is gone (qemu exited?): it closed the connection and {} now fails ({cause})",
                    c.endpoint.addr()
                );
                log::warn!("port {port}: {why}");
                c.server_gone = Some(why);
                c.apply(Input::VmExited);
                Ok(())
            }
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
    /// [`Backlog`]). Refused while a session is live (send in the [`Session`]), without a
    /// connection, and after a session ended on this connection until the next handshake
    /// attempt (the connection is still in that session: a frame would go into it).
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
                let core = &mut *c;
                let Some(link) = core.link.as_mut() else {
                    return Err(SessionError::WrongState { port, what: "send outside a session", state: "IDLE" });
                };
                if link.session() != 0 {
                    let what = "send outside a session while the connection is still in an ended one";
                    return Err(SessionError::WrongState { port, what, state: state.name() });
                }
                match link.send_request(msg) {
                    Ok(seq) => {
                        if matches!(msg, Message::HelloRequest) {
                            core.asked_at = Some(Instant::now());
                        }
                        Ok(seq)
                    }
                    Err(e) => {
                        core.link_failed(&e);
                        Err(SessionError::Link { port, source: e })
                    }
                }
            }
        }
    }

    /// Waits up to `window` for a session the agent offers without being asked (no
    /// HELLO_REQUEST is sent now or meanwhile, and none is pending from the connect): `Some` if
    /// a HELLO of a new session came, `None` if none did. Needs a connection and no live
    /// session (CONNECTED). A connection still in QEMU's backlog is waited for within the
    /// window (and told to the observer once served): `None` if it stays queued.
    pub fn accept_offered(&mut self, window: Duration) -> Result<Option<Session>, SessionError> {
        let deadline = Instant::now() + window;
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
        // In slices: QEMU serving a queued connection meanwhile is seen (and told to the
        // observer) within a slice, not only with the HELLO.
        while Instant::now() < deadline {
            c.check_service();
            match c.take_offer(deadline.min(Instant::now() + PUMP_SLICE)) {
                Ok(Some((id, hs))) => {
                    let generation = c.generation;
                    drop(c);
                    return Ok(Some(Session::new(self.core.clone(), generation, id, port, hs)));
                }
                Ok(None) if matches!(c.state(), ServerState::Connected { .. }) => {}
                Ok(None) => break,
                Err(source) => return Err(SessionError::Link { port, source }),
            }
        }
        Ok(None)
    }
}

/// Whether QEMU run state `state` (`query-status`) is a pause the VM comes back from: `paused`
/// (a `stop`), `prelaunch`, `suspended`, `inmigrate`, `finish-migrate`, `save-vm`,
/// `restore-vm`. `running` is not a pause; neither are the states that need more than a `cont`
/// or never end (`postmigrate`, `shutdown`, `guest-panicked`, `internal-error`, `io-error`,
/// `watchdog`): waiting there without a deadline would wait forever.
pub fn paused_for_now(state: &str) -> bool {
    matches!(state, "paused" | "prelaunch" | "suspended" | "inmigrate" | "finish-migrate" | "save-vm" | "restore-vm")
}
