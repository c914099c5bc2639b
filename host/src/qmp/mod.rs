//! QMP client: commands with ids and deadlines, events on a channel, and a reader that
//! survives whatever the server sends.
//!
//! One reader thread owns the socket's read half. Replies are routed to the waiting command by
//! `id`; events go to a crossbeam channel together with the local monotonic time they arrived.
//! When the connection ends every waiting command fails at once with
//! [`QmpError::Disconnected`], which says why ([`ConnectionEnd`]), and the event channels close,
//! so nobody waits for a dead VM until its deadline.
//!
//! QMP rate-limits `VSERPORT_CHANGE` to one event per second per port id (the first at once,
//! later ones in the window replaced by the latest): treat it as a level hint and confirm with
//! [`Qmp::query_chardev`]'s `frontend_open`.
//!
//! # A misbehaving server
//!
//! Guarantees, whatever the server sends or fails to send (each is tested against a scripted
//! fake server):
//!
//! - **Deadlines.** [`Qmp::connect`] gets the greeting within its timeout (one deadline for the
//!   whole line, however slowly it trickles in), and every command is written and answered
//!   within its own deadline, or fails with [`QmpError::Greeting`] / [`QmpError::Timeout`]. A
//!   command that could only be written in part before its deadline (the server stopped
//!   reading) ends the connection ([`ConnectionEnd::CommandCutOff`]): the server would read the
//!   rest as garbage. (Commands from several threads write one at a time: a command may first
//!   wait for the one writing, at most until that one's deadline.)
//! - **Bounded memory.** A line is at most [`MAX_LINE_BYTES`]. A longer one, complete or not,
//!   ends the connection with [`ConnectionEnd::LineTooLong`]: it is not skipped, because it
//!   may have been the reply a command waits for or an event a caller relies on, and failing
//!   every waiter at once says so where skipping would leave them to time out. Each event
//!   receiver holds at most [`EVENT_BACKLOG`] events nobody took; later ones are dropped for
//!   it and counted ([`QmpStats::events_dropped`]).
//! - **Garbage is skipped.** A line that is not a QMP message ([`parse_message`] fails: not
//!   UTF-8, not JSON, not an object, none of the known members) and a greeting after the first
//!   are logged, counted ([`QmpStats::skipped`]) and skipped; a reply whose id is missing,
//!   unknown or no longer waited for is counted ([`QmpStats::unmatched_replies`]) and dropped.
//!   Events are delivered whatever their name, data or timestamp.
//! - **No panic, no hang.** The reader never panics on input; should it end for any reason,
//!   including a bug, every waiter still wakes with [`QmpError::Disconnected`].
//!
//! [`wait_ready`], the start-up check of `Vm::start`, is a [`Qmp::connect_while`] on a short
//! connection of its own, retried while the socket refuses or drops connections: the same
//! client, with the same bounds. A [`Qmp`] closes its connection when dropped.
//!
//! The pure parts, [`parse_message`] and [`LineSplitter`], do no I/O and are the entry points
//! for fuzzing. The typed commands (`query-chardev`, `migrate`, ...) are in `commands.rs`.

mod commands;
mod lines;
mod parse;
mod reader;
mod ready;

pub use commands::{ChardevInfo, MigrationStatus, QemuVersion};
pub use lines::{LineSplitter, LineTooLong, MAX_LINE_BYTES};
pub use parse::{parse_message, ErrorReply, EventMessage, Incoming, QmpParseError, ReplyMessage};
pub use reader::{QmpStats, EVENT_BACKLOG};
pub use ready::wait_ready;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use reader::Shared;
use serde_json::{json, Map, Value};
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// What went wrong talking QMP.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The QMP socket could not be connected.
    #[error("cannot connect to qmp socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server did not send a valid greeting in time.
    #[error("no valid qmp greeting from {path}: {problem}")]
    Greeting {
        /// Socket path.
        path: PathBuf,
        /// What came instead.
        problem: GreetingError,
    },
    /// Writing a command failed.
    #[error("cannot send qmp command {command}")]
    Send {
        /// The command.
        command: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered the command with an error.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class ([`MISSING`] when the server sent none).
        class: String,
        /// QMP error description ([`MISSING`] when the server sent none).
        desc: String,
    },
    /// The command was not written and answered before the deadline.
    #[error("qmp command {command} got no reply within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The connection ended before the reply, or had ended before the command.
    #[error("qmp connection lost while running {command}: {reason}")]
    Disconnected {
        /// The command.
        command: String,
        /// Why the connection ended.
        reason: ConnectionEnd,
    },
    /// The liveness check of [`Qmp::connect_while`] failed while the command waited for its
    /// reply (for example QEMU exited).
    #[error("gave up on qmp command {command}: {reason}")]
    Abandoned {
        /// The command.
        command: String,
        /// What the liveness check said.
        reason: String,
    },
    /// A reply did not have the expected shape.
    #[error("unexpected reply to qmp command {command}: {reply}")]
    Unexpected {
        /// The command.
        command: String,
        /// The reply, as JSON text.
        reply: String,
    },
}

/// The `class` or `desc` of a [`QmpError::Command`] whose error reply lacked it.
pub const MISSING: &str = "(missing)";

/// Why a connection ended. The first reason wins; later commands fail with the same one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnectionEnd {
    /// The server closed the socket between two lines (QEMU exited).
    #[error("the server closed the connection")]
    Closed,
    /// The server closed the socket in the middle of a line.
    #[error("the server closed the connection in the middle of a line ({bytes} bytes of it came)")]
    ClosedMidLine {
        /// Bytes of the unfinished line.
        bytes: usize,
    },
    /// The server sent a line longer than the limit; the client closed the connection.
    #[error("the server sent a line longer than {limit} bytes")]
    LineTooLong {
        /// The limit ([`MAX_LINE_BYTES`]).
        limit: usize,
    },
    /// Reading the socket failed.
    #[error("reading the qmp socket failed ({kind:?}): {message}")]
    Read {
        /// The I/O error's kind.
        kind: ErrorKind,
        /// The I/O error's text.
        message: String,
    },
    /// A command could be written only in part (deadline or write error), so the server would
    /// read the rest of the stream as garbage; the client closed the connection.
    #[error("command {command} could only be written in part; the connection was closed")]
    CommandCutOff {
        /// The command.
        command: String,
    },
    /// The reader thread ended without a reason (a bug in vport).
    #[error("the qmp reader thread ended unexpectedly")]
    ReaderGone,
}

/// Why [`Qmp::connect`] got no greeting.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GreetingError {
    /// No complete line within the deadline.
    #[error("nothing within {timeout:?}")]
    Timeout {
        /// The deadline.
        timeout: Duration,
    },
    /// The connection ended first.
    #[error("{0}")]
    Lost(ConnectionEnd),
    /// The first line is not a QMP message.
    #[error("the first line is {0}")]
    Parse(QmpParseError),
    /// The first line is a QMP message, but not the greeting.
    #[error("the first line is {got}, not a greeting")]
    NotAGreeting {
        /// `an event` or `a command reply`.
        got: &'static str,
    },
    /// The liveness check of [`Qmp::connect_while`] failed first (for example QEMU exited).
    #[error("gave up: {reason}")]
    Abandoned {
        /// What the liveness check said.
        reason: String,
    },
}

/// How often [`Qmp::connect_while`] asks its liveness check while it waits.
pub const ALIVE_STEP: Duration = Duration::from_millis(20);

/// A liveness check asked between waiting steps: `Err(reason)` once the server can no longer
/// answer (for example QEMU exited). `None`: no check, the wait ends only at its deadline.
pub(crate) type Alive<'a> = Option<&'a mut dyn FnMut() -> Result<(), String>>;

/// `alive` for one wait, leaving it usable for the next.
fn reborrow<'s>(alive: &'s mut Alive<'_>) -> Alive<'s> {
    match alive {
        Some(alive) => Some(&mut **alive),
        None => None,
    }
}

/// A QMP event with the time it was received.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, for example `VSERPORT_CHANGE`.
    pub name: String,
    /// The event's `data` member (`Null` when absent).
    pub data: Value,
    /// QEMU's wall-clock timestamp in microseconds since the epoch.
    pub qemu_time_us: u64,
    /// Local monotonic time of receipt.
    pub received: Instant,
}

impl QmpEvent {
    /// For `VSERPORT_CHANGE`: the port id and the `open` flag.
    pub fn vserport_change(&self) -> Option<(&str, bool)> {
        if self.name != "VSERPORT_CHANGE" {
            return None;
        }
        Some((self.data.get("id")?.as_str()?, self.data.get("open")?.as_bool()?))
    }
}

/// A connected QMP session (capabilities negotiated). See the module docs for what it
/// guarantees when the server misbehaves.
pub struct Qmp {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    events: Receiver<QmpEvent>,
    /// The default deadline for commands.
    pub timeout: Duration,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, all within `timeout`, which is
    /// also the default deadline of later commands ([`Qmp::timeout`]).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        Qmp::open(path, timeout, None)
    }

    /// Like [`Qmp::connect`], and asks `alive` every [`ALIVE_STEP`] while it waits for the
    /// greeting and for the reply to `qmp_capabilities`: its `Err` ends the wait at once
    /// ([`GreetingError::Abandoned`], [`QmpError::Abandoned`]). For a server that may still be
    /// starting or may have died, such as a QEMU just spawned ([`wait_ready`]).
    pub fn connect_while(
        path: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> Result<Qmp, QmpError> {
        Qmp::open(path, timeout, Some(&mut alive))
    }

    fn open(path: &Path, timeout: Duration, mut alive: Alive<'_>) -> Result<Qmp, QmpError> {
        let deadline = deadline_after(timeout);
        let connect_err = |source| QmpError::Connect { path: path.into(), source };
        let mut stream = UnixStream::connect(path).map_err(connect_err)?;
        let mut lines = LineSplitter::new(MAX_LINE_BYTES);
        let greeting = reader::read_greeting(&mut stream, &mut lines, deadline, timeout, reborrow(&mut alive))
            .map_err(|problem| QmpError::Greeting { path: path.into(), problem })?;
        log::debug!("qmp <- greeting {greeting}");
        stream.set_read_timeout(None).map_err(connect_err)?;
        let read_half = stream.try_clone().map_err(connect_err)?;
        let (shared, events) = reader::spawn(read_half, lines).map_err(connect_err)?;
        let qmp = Qmp { writer: Mutex::new(stream), shared, next_id: AtomicU64::new(1), events, timeout };
        qmp.execute_while("qmp_capabilities", None, deadline, timeout, alive)?;
        Ok(qmp)
    }

    /// The main event stream: every event since the connection, delivered once, to whichever
    /// caller takes it (at most [`EVENT_BACKLOG`] waiting; see the module docs).
    pub fn events(&self) -> &Receiver<QmpEvent> {
        &self.events
    }

    /// A private copy of every event received from now on, independent of [`Qmp::events`] and
    /// of other subscribers. The receiver disconnects when the connection ends.
    pub fn subscribe(&self) -> Receiver<QmpEvent> {
        self.shared.subscribe()
    }

    /// What the reader has seen so far.
    pub fn stats(&self) -> QmpStats {
        self.shared.stats()
    }

    /// Runs `command` with the default deadline.
    pub fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, self.timeout)
    }

    /// Runs `command`: writes it and waits for its reply, both before `timeout` has passed.
    pub fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_while(command, arguments, deadline_after(timeout), timeout, None)
    }

    /// Runs `command` before `deadline` (`timeout` after the start of the caller's wait, as
    /// errors report it), asking `alive` every [`ALIVE_STEP`] while the reply is awaited.
    fn execute_while(
        &self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
        timeout: Duration,
        mut alive: Alive<'_>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.shared.expect(id, tx).map_err(|reason| QmpError::Disconnected { command: command.into(), reason })?;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(args) = arguments {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), json!(id));
        let mut line = Value::Object(msg).to_string();
        log::debug!("qmp -> {}", reader::shown(line.as_bytes()));
        line.push('\n');
        if let Err(e) = self.write_line(command, line.as_bytes(), deadline, timeout) {
            self.shared.forget(id);
            return Err(e);
        }
        let outcome = loop {
            let step_end = match alive {
                Some(_) => deadline.min(Instant::now() + ALIVE_STEP),
                None => deadline,
            };
            match rx.recv_deadline(step_end) {
                Ok(outcome) => break outcome,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Some(Err(reason)) = alive.as_mut().map(|alive| alive()) {
                        self.shared.forget(id);
                        return Err(QmpError::Abandoned { command: command.into(), reason });
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.shared.forget(id);
                    // The reply may have come between the deadline and `forget`.
                    match rx.try_recv() {
                        Ok(outcome) => break outcome,
                        Err(_) => return Err(QmpError::Timeout { command: command.into(), timeout }),
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(QmpError::Disconnected { command: command.into(), reason: self.shared.end() })
                }
            }
        };
        outcome.map_err(|e| QmpError::Command {
            command: command.into(),
            class: e.class.unwrap_or_else(|| MISSING.into()),
            desc: e.desc.unwrap_or_else(|| MISSING.into()),
        })
    }

    /// Writes `bytes` before `deadline`. A write that stops part-way ends the connection (see
    /// [`ConnectionEnd::CommandCutOff`]).
    fn write_line(&self, command: &str, bytes: &[u8], deadline: Instant, timeout: Duration) -> Result<(), QmpError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut written = 0;
        let failure = loop {
            if written == bytes.len() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break QmpError::Timeout { command: command.into(), timeout };
            }
            let send_err = |source| QmpError::Send { command: command.into(), source };
            if let Err(source) = w.set_write_timeout(Some(left)) {
                break send_err(source);
            }
            match w.write(&bytes[written..]) {
                Ok(0) => break send_err(ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break QmpError::Timeout { command: command.into(), timeout }
                }
                Err(source) => break send_err(source),
            }
        };
        if written > 0 {
            log::warn!("qmp: command {command} cut off after {written} of {} bytes; closing", bytes.len());
            self.shared.close(ConnectionEnd::CommandCutOff { command: command.into() });
            // Ends the reader too; errors only mean the socket is gone already.
            let _ = w.shutdown(Shutdown::Both);
        }
        Err(failure)
    }

    /// Waits up to `timeout` for an event accepted by `pred`; other events received meanwhile
    /// are returned too, in order, so the caller can record them.
    pub fn wait_event(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&QmpEvent) -> bool,
    ) -> (Option<QmpEvent>, Vec<QmpEvent>) {
        let deadline = deadline_after(timeout);
        let mut others = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) if pred(&ev) => return (Some(ev), others),
                Ok(ev) => others.push(ev),
                Err(_) => return (None, others),
            }
        }
    }
}

impl Drop for Qmp {
    /// Closes the connection (both directions, so the reader thread ends too): QEMU serves one
    /// QMP client at a time on a socket, and this frees it for the next.
    fn drop(&mut self) {
        let w = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        // Errors only mean the socket is gone already.
        let _ = w.shutdown(Shutdown::Both);
    }
}

/// `timeout` from now; a timeout beyond a year counts as a year (no overflow panic on
/// `Duration::MAX`).
fn deadline_after(timeout: Duration) -> Instant {
    Instant::now() + timeout.min(Duration::from_secs(365 * 24 * 3600))
}

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
