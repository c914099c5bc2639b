//! The host's session server for one port, as a pure machine: the 2010 "CharServerState" idea.
//! The host's `PortServer` (vport-host `session.rs`) turns what it observes on the connection
//! and on QMP into [`Input`]s, feeds them to a [`ServerMachine`] with the time, and carries out
//! the [`Action`]s that come back; the decisions are all here.
//!
//! ```text
//!            HostConnected              Hello(new id): Yield
//!    IDLE ------------------> CONNECTED ---------------------> READY
//!     ^  ConnectionLost,       |  ^   Bye, FrontendOpen(false),  |
//!     |  HostClose,            |  |   GuestReset, VmStopped,     |
//!     |                        |  |   Migrated,                  |
//!     |  ProtocolError         |  |   BadSession, Hello(other):  |
//!     +------------------------+  +--------- End ----------------+
//!     +-------------------- ConnectionLost, HostClose, ProtocolError: End --+
//!
//!    any state but CLOSED --- DeviceDeleted, VmExited ---> CLOSED (terminal)
//! ```
//!
//! - IDLE: no connection to the chardev.
//! - CONNECTED: connected; waiting for the HELLO of a guest session other than `last`, the one
//!   handed out last on this connection (its repeated HELLOs are no new session).
//! - READY: session `id` is live (CONNECTED_AND_READY): exactly one host `Session` exists for it.
//! - CLOSED: no more sessions: the port was unplugged or the VM is gone.
//!
//! Guarantees: every way out of READY ends the live session exactly once ([`Action::End`]);
//! a session is handed out ([`Action::Yield`]) only from CONNECTED, for a HELLO of a session
//! other than the last one; CLOSED is never left.
//!
//! # Every input in every state
//!
//! [`ServerMachine::step`] has one `match` over (state, input) with no wildcard arm: each pair
//! is a transition, a deliberate no-op, or a typed [`ServerError`] (the state is then left
//! unchanged; the host logs and counts it). The table test in `tests.rs` lists all of them.
//! The decisions for inputs that change nothing:
//!
//! | state | input | result | why |
//! |---|---|---|---|
//! | IDLE | `FrontendOpen`, `VmStopped`, `Migrated`, `GuestReset` | no-op | QMP reports on a port with no host connection: no session to end; the next connection asks for a HELLO anyway |
//! | IDLE | `Hello`, `Bye`, `BadSession`, `ConnectionLost`, `HostClose`, `ProtocolError` | [`ServerError::NoConnection`] | each is read from, or about, a connection there is none of |
//! | CONNECTED, READY | `HostConnected` | [`ServerError::AlreadyConnected`] | QEMU serves one client per port: a second connect is a host bug (a duplicate OPENED) |
//! | CONNECTED | `Hello` of `last` | no-op | a HELLO repeated for the session already handed out is not a new session |
//! | CONNECTED | `Bye`, `FrontendOpen`, `VmStopped`, `Migrated`, `GuestReset` | no-op | the session they would end has already ended (QMP or in band saw it first) or was never handed out; the agent's next HELLO starts the next one |
//! | CONNECTED | `BadSession` | [`Action::RequestHello`] | the agent is in a session newer than any handed out: ask for its HELLO rather than wait for one it already sent |
//! | READY | `Hello` of the live session | no-op | a repeated offer (the answer to a HELLO_REQUEST) |
//! | READY | `FrontendOpen(true)` | no-op | QEMU confirms what the live session already says |
//! | CLOSED | `DeviceDeleted`, `VmExited`, `VmStopped`, `Migrated`, `GuestReset`, `FrontendOpen` | no-op | QEMU goes on reporting while it goes down (SHUTDOWN, then the QMP connection closes) |
//! | CLOSED | `HostConnected`, `Hello`, `Bye`, `BadSession`, `ConnectionLost`, `HostClose`, `ProtocolError` | [`ServerError::Closed`] | a closed server has no connection and connects no more |

use crate::phase::Phase;
use thiserror::Error;

#[cfg(test)]
mod tests;

/// A guest session: the session id from the HELLO header and the HELLO's nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    /// Session id.
    pub session: u32,
    /// Nonce.
    pub nonce: u64,
}

/// Why a session ended: one reason per way a READY connection can end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// The guest closed the port: `frontend-open` false, or the agent is in a newer session
    /// (its HELLO, or ERROR bad-session) without a BYE the host read.
    GuestClosed,
    /// The agent said BYE in band (it closes the port: CLOSE, REOPEN, shutdown).
    AgentBye,
    /// The host left: it closed its connection.
    HostClosed,
    /// The port was hot-unplugged (`DEVICE_DELETED`).
    Unplugged,
    /// The VM stopped (`STOP` for anything but this VM's outgoing migration: a pause, savevm;
    /// also a stop on a destination after its incoming migration completed).
    VmStopped,
    /// The VM was migrated away: `STOP` by this VM's own outgoing migration (its run state,
    /// `query-status`, is `finish-migrate` or `postmigrate`).
    Migrated,
    /// The guest was reset (`RESET`: `system_reset`, a guest reboot, loadvm).
    GuestReset,
    /// QEMU is gone or going: `SHUTDOWN`, the QMP connection closed, or QEMU closed the host
    /// connection as it exited.
    VmExited,
    /// QEMU closed the host connection while it runs on (the chardev was changed or removed,
    /// the socket failed): the server connects again.
    ConnectionLost,
    /// The connection can no longer carry the session.
    ProtocolError(String),
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::GuestClosed => f.write_str("the guest closed the port"),
            EndReason::AgentBye => f.write_str("the agent said bye"),
            EndReason::HostClosed => f.write_str("the host closed the connection"),
            EndReason::Unplugged => f.write_str("the port was unplugged"),
            EndReason::VmStopped => f.write_str("the vm stopped"),
            EndReason::Migrated => f.write_str("the vm was migrated away"),
            EndReason::GuestReset => f.write_str("the guest was reset"),
            EndReason::VmExited => f.write_str("qemu exited"),
            EndReason::ConnectionLost => f.write_str("qemu closed the host connection"),
            EndReason::ProtocolError(d) => write!(f, "protocol error: {d}"),
        }
    }
}

/// The server's state for one port. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerState {
    /// No connection to the chardev.
    Idle,
    /// Connected; waiting for the HELLO of a guest session other than `last`.
    Connected {
        /// The last session handed out on this connection.
        last: Option<SessionId>,
    },
    /// Session `id` is live (CONNECTED_AND_READY).
    Ready {
        /// The live session.
        id: SessionId,
    },
    /// No more sessions: the port or the VM is gone.
    Closed {
        /// Why.
        reason: EndReason,
    },
}

impl ServerState {
    /// The state's name in logs and errors: `IDLE`, `CONNECTED`, `READY` or `CLOSED`.
    pub fn name(&self) -> &'static str {
        match self {
            ServerState::Idle => "IDLE",
            ServerState::Connected { .. } => "CONNECTED",
            ServerState::Ready { .. } => "READY",
            ServerState::Closed { .. } => "CLOSED",
        }
    }

    /// The port's phase as the server sees it: IDLE and CLOSED are DISCONNECTED.
    pub fn phase(&self) -> Phase {
        match self {
            ServerState::Idle | ServerState::Closed { .. } => Phase::Disconnected,
            ServerState::Connected { .. } => Phase::Connected,
            ServerState::Ready { .. } => Phase::Ready,
        }
    }
}

/// An observation fed to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The host end connected.
    HostConnected,
    /// A HELLO (acknowledged) for this session.
    Hello(SessionId),
    /// BYE: the agent is closing the port.
    Bye,
    /// The agent answered ERROR bad-session to a frame of the live session (the server's probe):
    /// it is in a newer session. An ERROR about a frame sent before the live session is not
    /// this input: it says nothing of the live session.
    BadSession,
    /// `frontend-open` as confirmed after a `VSERPORT_CHANGE`.
    FrontendOpen(bool),
    /// `DEVICE_DELETED` for the port.
    DeviceDeleted,
    /// QMP `STOP` (not by an outgoing migration).
    VmStopped,
    /// QMP `STOP` by this VM's outgoing migration: the run state (`query-status`) is
    /// `finish-migrate` or `postmigrate`.
    Migrated,
    /// QMP `SHUTDOWN`, the QMP connection closed, or QEMU closed the host connection and QMP
    /// no longer answers: QEMU is exiting or gone.
    VmExited,
    /// QMP `RESET`: the guest restarts.
    GuestReset,
    /// QEMU closed the host connection while it runs (a QEMU that exits is [`Input::VmExited`]).
    ConnectionLost,
    /// The host closes the connection.
    HostClose,
    /// The connection cannot carry the protocol any more.
    ProtocolError(String),
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::HostConnected => f.write_str("host connect"),
            Input::Hello(id) => write!(f, "hello of session {:#010x} (nonce {:#x})", id.session, id.nonce),
            Input::Bye => f.write_str("bye"),
            Input::BadSession => f.write_str("bad-session error"),
            Input::FrontendOpen(open) => write!(f, "frontend-open {open}"),
            Input::DeviceDeleted => f.write_str("device deleted"),
            Input::VmStopped => f.write_str("vm stopped"),
            Input::Migrated => f.write_str("vm migrated"),
            Input::VmExited => f.write_str("vm exited"),
            Input::GuestReset => f.write_str("guest reset"),
            Input::ConnectionLost => f.write_str("connection lost"),
            Input::HostClose => f.write_str("host close"),
            Input::ProtocolError(d) => write!(f, "protocol error ({d})"),
        }
    }
}

/// What the host must do after a transition, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Hand out a new session for this guest session.
    Yield(SessionId),
    /// The live session ends for this reason.
    End(EndReason),
    /// Close the host connection.
    Disconnect,
    /// Ask the agent for a HELLO (HELLO_REQUEST) before the next handshake: its HELLO of the
    /// newer session was consumed.
    RequestHello,
}

/// An input that is not legal in the machine's state. The state is left unchanged.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ServerError {
    /// An input read from, or about, a host connection while there is none (IDLE).
    #[error("{input} with no host connection")]
    NoConnection {
        /// The input.
        input: Input,
    },
    /// A host connect while a connection is up (a duplicate OPENED).
    #[error("{input} while already connected ({state})")]
    AlreadyConnected {
        /// The input.
        input: Input,
        /// The state's name ([`ServerState::name`]).
        state: &'static str,
    },
    /// An input that needs a connection after the server closed.
    #[error("{input} after the server closed: {reason}")]
    Closed {
        /// The input.
        input: Input,
        /// Why the server closed.
        reason: EndReason,
    },
}

/// A state change (or a deliberate no-op: `from == to`, no actions), with its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// State before.
    pub from: ServerState,
    /// State after.
    pub to: ServerState,
    /// What the host must do, in order.
    pub actions: Vec<Action>,
    /// Caller's monotonic clock, nanoseconds.
    pub at_ns: u64,
}

/// The session server of one port. Time is passed in; nothing here reads a clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerMachine {
    state: ServerState,
    since_ns: u64,
}

impl Default for ServerMachine {
    fn default() -> Self {
        ServerMachine { state: ServerState::Idle, since_ns: 0 }
    }
}

impl ServerMachine {
    /// A machine in IDLE.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state.
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// When the current state was entered (the `now_ns` of the step that entered it; 0 for the
    /// initial IDLE).
    pub fn since_ns(&self) -> u64 {
        self.since_ns
    }

    /// Applies `input` at `now_ns`: the one place where the server's state changes.
    pub fn step(&mut self, input: &Input, now_ns: u64) -> Result<Step, ServerError> {
        let (to, actions) = next(&self.state, input)?;
        let from = std::mem::replace(&mut self.state, to.clone());
        if from != to {
            self.since_ns = now_ns;
        }
        Ok(Step { from, to, actions, at_ns: now_ns })
    }
}

/// The transition function: every (state, input) pair, no wildcard.
fn next(state: &ServerState, input: &Input) -> Result<(ServerState, Vec<Action>), ServerError> {
    use Action::{Disconnect, End, RequestHello, Yield};
    use Input as I;
    use ServerState as S;
    let stay = || Ok((state.clone(), Vec::new()));
    let no_connection = || Err(ServerError::NoConnection { input: input.clone() });
    let already = || Err(ServerError::AlreadyConnected { input: input.clone(), state: state.name() });
    let closed = |reason: EndReason| (S::Closed { reason }, Vec::new());
    let after = |id: &SessionId| S::Connected { last: Some(*id) };
    Ok(match (state, input) {
        // CLOSED is terminal.
        (
            S::Closed { .. },
            I::DeviceDeleted | I::VmExited | I::VmStopped | I::Migrated | I::GuestReset | I::FrontendOpen(_),
        ) => return stay(),
        (
            S::Closed { reason },
            I::HostConnected
            | I::Hello(_)
            | I::Bye
            | I::BadSession
            | I::ConnectionLost
            | I::HostClose
            | I::ProtocolError(_),
        ) => return Err(ServerError::Closed { input: input.clone(), reason: reason.clone() }),

        // The port or the VM goes away: CLOSED from every other state.
        (S::Idle, I::DeviceDeleted) => closed(EndReason::Unplugged),
        (S::Idle, I::VmExited) => closed(EndReason::VmExited),
        (S::Connected { .. }, I::DeviceDeleted) => (S::Closed { reason: EndReason::Unplugged }, vec![Disconnect]),
        (S::Connected { .. }, I::VmExited) => (S::Closed { reason: EndReason::VmExited }, vec![Disconnect]),
        (S::Ready { .. }, I::DeviceDeleted) => {
            (S::Closed { reason: EndReason::Unplugged }, vec![End(EndReason::Unplugged), Disconnect])
        }
        (S::Ready { .. }, I::VmExited) => {
            (S::Closed { reason: EndReason::VmExited }, vec![End(EndReason::VmExited), Disconnect])
        }

        // IDLE.
        (S::Idle, I::HostConnected) => (S::Connected { last: None }, Vec::new()),
        (S::Idle, I::FrontendOpen(_) | I::VmStopped | I::Migrated | I::GuestReset) => return stay(),
        (S::Idle, I::Hello(_) | I::Bye | I::BadSession | I::ConnectionLost | I::HostClose | I::ProtocolError(_)) => {
            return no_connection()
        }

        // CONNECTED.
        (S::Connected { .. }, I::HostConnected) => return already(),
        (S::Connected { last }, I::Hello(id)) if *last == Some(*id) => return stay(),
        (S::Connected { .. }, I::Hello(id)) => (S::Ready { id: *id }, vec![Yield(*id)]),
        (S::Connected { .. }, I::Bye | I::FrontendOpen(_) | I::VmStopped | I::Migrated | I::GuestReset) => {
            return stay()
        }
        (S::Connected { .. }, I::BadSession) => (state.clone(), vec![RequestHello]),
        (S::Connected { .. }, I::ConnectionLost | I::HostClose | I::ProtocolError(_)) => (S::Idle, vec![Disconnect]),

        // READY: every way out ends the session once.
        (S::Ready { .. }, I::HostConnected) => return already(),
        (S::Ready { id }, I::Hello(h)) if h == id => return stay(),
        (S::Ready { id }, I::Hello(h)) if h.session == id.session => {
            let detail = format!(
                "hello for session {:#010x} with nonce {:#x}, the session's is {:#x}",
                h.session, h.nonce, id.nonce
            );
            (S::Idle, vec![End(EndReason::ProtocolError(detail)), Disconnect])
        }
        (S::Ready { id }, I::Hello(_) | I::BadSession) => (after(id), vec![End(EndReason::GuestClosed), RequestHello]),
        (S::Ready { id }, I::Bye) => (after(id), vec![End(EndReason::AgentBye)]),
        (S::Ready { id }, I::FrontendOpen(false)) => (after(id), vec![End(EndReason::GuestClosed)]),
        (S::Ready { id }, I::GuestReset) => (after(id), vec![End(EndReason::GuestReset)]),
        (S::Ready { .. }, I::FrontendOpen(true)) => return stay(),
        (S::Ready { id }, I::VmStopped) => (after(id), vec![End(EndReason::VmStopped)]),
        (S::Ready { id }, I::Migrated) => (after(id), vec![End(EndReason::Migrated)]),
        (S::Ready { .. }, I::ConnectionLost) => (S::Idle, vec![End(EndReason::ConnectionLost), Disconnect]),
        (S::Ready { .. }, I::HostClose) => (S::Idle, vec![End(EndReason::HostClosed), Disconnect]),
        (S::Ready { .. }, I::ProtocolError(d)) => (S::Idle, vec![End(EndReason::ProtocolError(d.clone())), Disconnect]),
    })
}
