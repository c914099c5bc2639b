//! Session server: one port's connections turned into [`Session`]s that live exactly as long as
//! one READY connection — the 2010 "CharServerState" idea, and the host's only way to talk to
//! an agent in normal use.
//!
//! A [`PortServer`] owns the port's [`Endpoint`](crate::chardev::Endpoint), the current
//! connection (a [`Link`](crate::link::Link)) and a
//! private QMP event subscription. [`PortServer::accept`] connects the host end when needed
//! (as its [`Reconnect`] policy allows) and returns a [`Session`] only when the guest has the
//! port open and the handshake is done (CONNECTED_AND_READY): one Session per guest session.
//! A HELLO repeated for the session already handed out is not a new Session; a HELLO of a new
//! session (the guest reopened) is. A Session is an
//! [`AgentClient`](crate::client::AgentClient): every typed request
//! (PING, ECHO, PROBE, SOURCE, SINK, ...) goes through the one request/reply path.
//!
//! **Backlog.** QEMU's socket chardev serves one client per port and does not `accept(2)`
//! another while it has one: a second client's connect succeeds and then waits, silently, in
//! the listening socket's backlog until the first leaves. [`PortServer::backlog`] says whether
//! the server's own connection is waiting there (asked of the kernel), and `accept` logs it.
//! An observer ([`PortServer::set_observer`], a timeline) hears of a connection only once
//! QEMU serves it; where that cannot be asked ([`Backlog::Unknown`]: TCP, pty, no
//! `unix_diag`), with the first frame from the guest, never on the assumption that it is.
//!
//! A Session ends exactly once, with an [`EndReason`]:
//!
//! | reason | observed as |
//! |---|---|
//! | [`EndReason::AgentBye`] | BYE in band (the agent closes the port: CLOSE, REOPEN, its shutdown) |
//! | [`EndReason::GuestClosed`] | `frontend-open` false (after `VSERPORT_CHANGE`, confirmed with `query-chardev`); the agent in a newer session (its HELLO, or ERROR bad-session) |
//! | [`EndReason::HostClosed`] | [`Session::close`] or dropping the Session: the host left |
//! | [`EndReason::Unplugged`] | `DEVICE_DELETED` for the port's device id |
//! | [`EndReason::VmStopped`] | QMP `STOP` not caused by an outgoing migration (pause, savevm; also on a destination after its incoming migration) |
//! | [`EndReason::Migrated`] | QMP `STOP` with the run state (`query-status`) `finish-migrate` or `postmigrate`: this VM's outgoing migration stopped it |
//! | [`EndReason::GuestReset`] | QMP `RESET` (`system_reset`, guest reboot, loadvm) |
//! | [`EndReason::VmExited`] | `SHUTDOWN`, QMP closed, or QEMU closing the host connection as it exits (QMP gone too) |
//! | [`EndReason::ConnectionLost`] | QEMU closing the host connection while it runs on; the server connects again |
//! | [`EndReason::ProtocolError`] | a HELLO contradicting the session; an i/o error on the connection |
//!
//! After the end every operation on the Session fails with [`SessionError::Ended`]: nothing
//! is silently dropped, and nothing is written into the next session. The logic is the pure
//! machine [`vport_common::server`] (one state enum, one transition `match`, typed errors for
//! illegal inputs); the I/O around it (`core.rs`) only turns observations into [`Input`]s,
//! passes the time, and carries out the [`Action`]s. An input the machine refuses
//! ([`ServerError`]) leaves the state unchanged; it is logged as a warning and counted
//! ([`PortServer::illegal_inputs`]).
//!
//! Detection is in band first (BYE is read within the same call that reads the stream) and
//! QMP second: QMP events are looked at before every operation and between read slices of at
//! most [`PUMP_SLICE`] while a call waits.
//!
//! ```no_run
//! use std::time::Duration;
//! use vport_host::client::AgentClient;
//! use vport_host::image::GuestImage;
//! use vport_host::rig::{vm_config, Rig};
//!
//! fn one_guest_open(image: &GuestImage) -> Result<(), Box<dyn std::error::Error>> {
//! let mut rig = Rig::launch(vm_config(image, &["org.vport.0"], &[]))?;
//! let mut server = rig.port_server("org.vport.0")?;
//! rig.resume()?;
//! let mut session = server.accept(Duration::from_secs(60))?;
//! session.ping(Duration::from_secs(5), 1)?;
//! let _why = session.close_guest(100, Duration::from_secs(10))?; // AgentBye
//! assert!(session.ping(Duration::from_secs(5), 2).is_err()); // SessionError::Ended
//! let _next = server.accept(Duration::from_secs(10))?; // after the agent reopened
//! Ok(())
//! }
//! ```

mod announce;
mod core;
#[cfg(test)]
pub(crate) mod fakes;
mod live;
mod server;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_service;

use crate::chardev::ChardevError;
use crate::link::LinkError;
use std::time::Duration;
use thiserror::Error;

pub use live::Session;
pub use server::{paused_for_now, Backlog, PortServer, Reconnect};
pub use vport_common::server::{Action, EndReason, Input, ServerError, ServerState, SessionId};

/// Longest read slice while waiting: QMP events are looked at least this often.
pub const PUMP_SLICE: Duration = Duration::from_millis(100);
/// Longest wait for a HELLO in [`PortServer::accept`] between looks at QMP events: a `RESUME`
/// that asks for a session at once is acted on within it (a longer slice held such a request
/// back until the next paced one, about 1 s, on a port whose session a `stop` had ended).
pub const HANDSHAKE_SLICE: Duration = Duration::from_millis(100);
/// How long a connect waits for QEMU to accept the new connection (it does so asynchronously,
/// from its main loop), so that the observer hears of it when it happens. A connection still
/// queued after that waits for another client to leave.
pub const SERVE_GRACE: Duration = Duration::from_millis(250);
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
    /// The operation needs another server state (see [`ServerState`]).
    #[error("port {port}: cannot {what} while the session server is {state}")]
    WrongState {
        /// Port name.
        port: String,
        /// The operation.
        what: &'static str,
        /// The state's name ([`ServerState::name`]).
        state: &'static str,
    },
    /// The [`Reconnect`] policy forbids another connection and the last one is gone.
    #[error("port {port}: the connection is gone and the reconnect policy is `once`")]
    NoReconnect {
        /// Port name.
        port: String,
    },
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
