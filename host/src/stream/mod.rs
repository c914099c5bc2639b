//! Acknowledged streams, the host's side: a file moved between the host and the guest's stream
//! directory so that nothing the receiver acknowledged is lost and nothing is stored twice,
//! through any number of ended sessions (the protocol: `docs/protocol.md`, "Acknowledged
//! streams"; the machines: [`vport_common::stream`]).
//!
//! A transfer ([`to_guest::ToGuest`], [`to_host::ToHost`]) runs one stream to its end over the sessions a [`SessionSource`] hands out:
//! when a session ends (the host left, the guest closed the port, the agent restarted, the VM
//! was stopped, reset or migrated), the transfer asks for the next one and resumes from the
//! receiver's offset. Progress and every interruption are reported as [`TransferEvent`]s to a
//! hook, which may also inject a fault ([`Control::DropSession`]).
//!
//! - [`to_guest`]: `vport send`, a host file into the guest's stream directory.
//! - [`to_host`]: `vport recv`, a file of the guest's stream directory into a host file, kept in
//!   a part file ([`part`]) until its digest is verified.

pub mod part;
pub mod replug;
pub mod to_guest;
pub mod to_host;

use crate::session::{PortServer, Session, SessionError};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::message::error_code;
use vport_common::pattern::StreamDigest;
use vport_common::stream::DEFAULT_WINDOW;

/// Bytes of file data per STREAM_DATA the host sends: one frame fits the 32 KiB a guest
/// `read()` can take at most, like the agent's chunks.
pub const HOST_CHUNK: usize = 32 * 1024 - 28 - 16;

/// Hands out the sessions a transfer runs in, one after another.
pub trait SessionSource {
    /// The next session, waiting up to `timeout` for it.
    fn next_session(&mut self, timeout: Duration) -> Result<Session, SessionError>;
    /// The host leaves the connection that yields no session and makes a new one: QEMU then
    /// delivers a real close to the port (which, among other things, unthrottles a port QEMU
    /// left throttled with nothing to wake it: after a migration or a pause, see
    /// docs/reliability.md).
    fn reconnect(&mut self);
    /// Whether the VM is paused for now (`false` when it cannot be known). While it is
    /// (stopped, migrating in, saving), waiting for a session is not a stall: no reconnect,
    /// and the time does not count against the session timeout.
    fn vm_paused(&self) -> bool {
        false
    }
}

impl SessionSource for PortServer {
    fn next_session(&mut self, timeout: Duration) -> Result<Session, SessionError> {
        self.accept(timeout)
    }
    fn reconnect(&mut self) {
        self.disconnect();
    }
    fn vm_paused(&self) -> bool {
        PortServer::vm_paused(self)
    }
}

/// How a transfer behaves.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Bytes sent but not acknowledged, at most (the window the host asks for).
    pub window: u32,
    /// How long to wait for a session, at the start and after each interruption.
    pub session_timeout: Duration,
    /// How long a live session may go without any progress (no acknowledgement, no data)
    /// before the host takes it for dead, leaves, and resumes in a new one.
    pub stall_timeout: Duration,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            window: DEFAULT_WINDOW,
            session_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// What happened in a transfer, as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// A session was handed out; the stream is being opened in it (`number` counts from 1).
    Session {
        /// The session's number in this transfer.
        number: u64,
    },
    /// The receiver answered STREAM_ACCEPT: the stream (re)starts at `offset`.
    Accepted {
        /// Where the sender starts.
        offset: u64,
        /// The stream's length.
        total: u64,
    },
    /// The receiver acknowledged `acked` bytes of `total` (at most one event per
    /// acknowledgement).
    Progress {
        /// Bytes acknowledged (stored by the receiver).
        acked: u64,
        /// The stream's length.
        total: u64,
    },
    /// The session ended (or was dropped) before the stream did; the transfer resumes in the
    /// next one.
    Interrupted {
        /// Why, in words.
        reason: String,
        /// Bytes acknowledged at that moment.
        acked: u64,
    },
    /// No session came on the connection within the stall timeout: the host left it and
    /// connects again (liveness; the recovery from a port QEMU left stuck).
    Reconnecting {
        /// How long the connection yielded nothing.
        waited: Duration,
    },
}

/// What the hook wants after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// The host leaves the connection now (a fault); the transfer resumes in the next session.
    DropSession,
    /// The guest closes the port and opens it again now (REOPEN, a fault); the transfer
    /// resumes in the next session.
    ReopenGuest,
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    /// The stream id.
    pub id: u64,
    /// Bytes in the stream (all verified).
    pub bytes: u64,
    /// The stream's xxh3-64 digest, equal on both sides.
    pub digest: u64,
    /// Sessions the transfer ran in.
    pub sessions: u64,
    /// Sessions that ended before the stream did.
    pub interruptions: u64,
    /// Bytes sent again because they were not acknowledged when a session ended.
    pub resent: u64,
    /// Bytes the receiver got twice and dropped (to-host only: the agent counts its own).
    pub duplicates: u64,
    /// Where the stream started in its first session (bytes a previous run had already moved).
    pub started_at: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Why a transfer failed.
#[derive(Debug, Error)]
pub enum TransferError {
    /// A host file could not be read or written.
    #[error("{op} {path}: {source}")]
    File {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// The agent predates acknowledged streams.
    #[error(
        "the agent on port {port} does not know acknowledged streams (it answered STREAM_OPEN with \
         unknown_type): install a newer vport-agent in the guest"
    )]
    AgentTooOld {
        /// Port name.
        port: String,
    },
    /// The agent refused the stream (no `--stream-dir`, a bad name, over its limit, a missing
    /// file).
    #[error("the agent on port {port} refused the stream: {text} (agent error {code_name})")]
    Refused {
        /// Port name.
        port: String,
        /// The ERROR's code name.
        code_name: String,
        /// The agent's text.
        text: String,
    },
    /// The agent broke the protocol of the stream (an acknowledgement of bytes never sent, a
    /// gap, a wrong id).
    #[error("port {port}: stream {id:#018x}: {detail}")]
    Protocol {
        /// Port name.
        port: String,
        /// The stream id.
        id: u64,
        /// What went wrong.
        detail: String,
    },
    /// Both sides hold the whole stream but their digests differ: nothing was kept.
    #[error(
        "port {port}: stream {id:#018x}: the receiver's digest {got:#018x} differs from the sender's \
         {expected:#018x} over {bytes} bytes; the receiver's copy was discarded, run again"
    )]
    DigestMismatch {
        /// Port name.
        port: String,
        /// The stream id.
        id: u64,
        /// Bytes compared.
        bytes: u64,
        /// The sender's digest.
        expected: u64,
        /// The receiver's digest.
        got: u64,
    },
    /// No session came within the timeout (the agent is not running, the port is closed, the VM
    /// is gone), or the server cannot hand out any more.
    #[error("port {port}: no session to carry the stream ({source}); {acked} of {total} bytes are acknowledged, run again to resume")]
    NoSession {
        /// Port name.
        port: String,
        /// Bytes acknowledged so far (kept: a new run resumes there).
        acked: u64,
        /// The stream's length (0 while unknown).
        total: u64,
        /// Why.
        source: Box<SessionError>,
    },
    /// Sessions came and ended, and none moved the stream on, for longer than the timeout: a
    /// link that looks alive but carries nothing (the last session's end names the cause).
    #[error(
        "port {port}: {sessions} sessions in {waited:?} moved nothing (the last ended: {last}); {acked} of \
         {total} bytes are acknowledged, run again to resume"
    )]
    NoProgress {
        /// Port name.
        port: String,
        /// Sessions since the last progress.
        sessions: u64,
        /// Time since the last progress.
        waited: Duration,
        /// How the last session ended.
        last: String,
        /// Bytes acknowledged so far.
        acked: u64,
        /// The stream's length (0 while unknown).
        total: u64,
    },
}

/// Sessions in a row that may move nothing before [`TransferError::NoProgress`] (and the
/// timeout must have passed too): a stream is given up only when the link cycles uselessly.
pub const IDLE_SESSIONS: u64 = 3;

/// Whether the stream moved since the last look: `acked` against the mark, counting the
/// sessions and the time without progress.
#[derive(Debug)]
pub(crate) struct ProgressMark {
    acked: u64,
    since: Instant,
    idle_sessions: u64,
}

impl ProgressMark {
    pub(crate) fn new(acked: u64, now: Instant) -> ProgressMark {
        ProgressMark { acked, since: now, idle_sessions: 0 }
    }

    /// A session ended with `acked` acknowledged at `now`: `Some((sessions, waited))` once
    /// [`IDLE_SESSIONS`] sessions and `timeout` have passed without progress.
    pub(crate) fn session_ended(&mut self, acked: u64, now: Instant, timeout: Duration) -> Option<(u64, Duration)> {
        if acked != self.acked {
            *self = ProgressMark::new(acked, now);
            return None;
        }
        self.idle_sessions += 1;
        let waited = now.saturating_duration_since(self.since);
        (self.idle_sessions >= IDLE_SESSIONS && waited >= timeout).then_some((self.idle_sessions, waited))
    }
}

/// How a session's part of a stream ended ([`StreamSide::in_session`]).
pub enum SessionOutcome {
    /// The stream ended in this session.
    Finished(TransferReport),
    /// The session ended first (why, in words).
    Interrupted(String),
}

/// A live session's failure seen by a transfer: the session's end is an interruption, a
/// timeout a stall (the caller leaves and resumes), an agent ERROR about the stream a failure.
pub(crate) fn classify(port: &str, e: SessionError) -> Result<String, TransferError> {
    match e {
        SessionError::Ended(reason) => Ok(format!("the session ended: {reason}")),
        SessionError::Timeout { what, timeout, .. } => Ok(format!("no {what} within {timeout:?}: the session stalled")),
        SessionError::Agent { code: error_code::UNKNOWN_TYPE, .. } => {
            Err(TransferError::AgentTooOld { port: port.to_owned() })
        }
        SessionError::Agent { code, text, .. } => {
            Err(TransferError::Refused { port: port.to_owned(), code_name: error_code::name(code).into_owned(), text })
        }
        other => Ok(format!("the session failed: {other}")),
    }
}

/// The stream id of a transfer: a digest of what identifies it, so that running the same
/// transfer again resumes it (and a different one never does).
pub fn stream_id(parts: &[&[u8]]) -> u64 {
    let mut d = StreamDigest::new();
    for p in parts {
        d.update(&(p.len() as u64).to_le_bytes());
        d.update(p);
    }
    d.digest()
}

/// One side of a stream as the host runs it ([`to_guest::ToGuest`], [`to_host::ToHost`]):
/// [`StreamSide::run`] carries it to its end through as many sessions as it takes.
pub trait StreamSide {
    /// The port's name (for messages).
    fn port(&self) -> &str;
    /// The transfer's options.
    fn options(&self) -> &TransferOptions;
    /// `(acknowledged, total)` so far (total 0 while unknown).
    fn progress(&self) -> (u64, u64);
    /// Opens or resumes the stream in `session` and runs it until it ends or the session
    /// does. A [`Control::DropSession`] from the hook returns [`SessionOutcome::Interrupted`]:
    /// dropping the session closes the host's connection.
    fn in_session(
        &mut self,
        session: &mut Session,
        hook: &mut dyn FnMut(&TransferEvent) -> Control,
    ) -> Result<SessionOutcome, TransferError>;

    /// Runs the stream in session after session from `source` until it ends, reporting each
    /// session and interruption to `hook`.
    fn run(
        &mut self,
        source: &mut dyn SessionSource,
        hook: &mut dyn FnMut(&TransferEvent) -> Control,
    ) -> Result<TransferReport, TransferError>
    where
        Self: Sized,
    {
        let started = Instant::now();
        let mut number = 0;
        let mut mark = ProgressMark::new(self.progress().0, started);
        loop {
            let mut session = next_session(self, source, hook)?;
            number += 1;
            log::info!("port {}: stream in session {number} ({:#010x})", self.port(), session.id().session);
            let outcome = match hook(&TransferEvent::Session { number }) {
                Control::Continue => self.in_session(&mut session, hook)?,
                other => SessionOutcome::Interrupted(obey(other, &mut session).unwrap_or_default()),
            };
            match outcome {
                SessionOutcome::Finished(mut report) => {
                    report.sessions = number;
                    report.elapsed = started.elapsed();
                    return Ok(report);
                }
                SessionOutcome::Interrupted(reason) => {
                    // Closes the host's connection if the session is still live.
                    drop(session);
                    log::info!("port {}: stream interrupted: {reason}", self.port());
                    let (acked, total) = self.progress();
                    if let Some((sessions, waited)) =
                        mark.session_ended(acked, Instant::now(), self.options().session_timeout)
                    {
                        let port = self.port().to_owned();
                        return Err(TransferError::NoProgress { port, sessions, waited, last: reason, acked, total });
                    }
                    hook(&TransferEvent::Interrupted { reason, acked });
                }
            }
        }
    }
}

/// The next session within [`TransferOptions::session_timeout`] of the VM running (time the
/// VM spends paused or migrating does not count). A connection that yields none within
/// [`TransferOptions::stall_timeout`] while the VM runs is left and made again: a port can be
/// stuck so that only QEMU's close of the host connection frees it (the host leaving during a
/// pause, a port throttled when a migration completed before the host was back).
fn next_session(
    side: &dyn StreamSide,
    source: &mut dyn SessionSource,
    hook: &mut dyn FnMut(&TransferEvent) -> Control,
) -> Result<Session, TransferError> {
    let (port, opts) = (side.port(), side.options());
    let mut deadline = Instant::now() + opts.session_timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = left.min(opts.stall_timeout);
        let started = Instant::now();
        let e = match source.next_session(wait) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if matches!(e, SessionError::Timeout { .. }) {
            if source.vm_paused() {
                // Paused or migrating: no session can come; neither a stall nor time lost.
                log::info!("port {port}: the vm is not running; waiting for the next session without a deadline");
                deadline += started.elapsed();
                continue;
            }
            if wait < left {
                log::warn!("port {port}: no session within {wait:?}; leaving the connection and connecting again");
                hook(&TransferEvent::Reconnecting { waited: wait });
                source.reconnect();
                continue;
            }
        }
        let (acked, total) = side.progress();
        return Err(TransferError::NoSession { port: port.to_owned(), acked, total, source: Box::new(e) });
    }
}

/// How long the agent may take to close and reopen a port on [`Control::ReopenGuest`].
const REOPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Carries out what the hook asked for inside a live session: `Some(why)` when the session is
/// to end (the transfer resumes in the next one), `None` to go on.
pub(crate) fn obey(control: Control, session: &mut Session) -> Option<String> {
    match control {
        Control::Continue => None,
        Control::DropSession => Some("the host left (asked for)".into()),
        Control::ReopenGuest => Some(match session.reopen_guest(REOPEN_TIMEOUT) {
            Ok(end) => format!("the guest closed and reopened the port (asked for): {end}"),
            Err(e) => format!("the guest was asked to reopen the port: {e}"),
        }),
    }
}

/// What a live session gave a transfer ([`receive`]).
pub(crate) enum Incoming {
    /// A message of the session (frames that do not parse are skipped).
    Message(vport_common::Message),
    /// Nothing within the timeout.
    Idle,
    /// The session is over (why, in words): the transfer resumes in the next one.
    Over(String),
}

/// The next message of `session` within `timeout`. An agent ERROR about a stream message
/// fails the transfer (a refusal or a broken stream is not cured by resuming).
pub(crate) fn receive(
    session: &mut Session,
    timeout: Duration,
    port: &str,
    id: u64,
) -> Result<Incoming, TransferError> {
    let deadline = Instant::now() + timeout;
    loop {
        let received = match session.recv(deadline.saturating_duration_since(Instant::now())) {
            Ok(r) => r,
            Err(SessionError::Timeout { .. }) => return Ok(Incoming::Idle),
            Err(e) => return classify(port, e).map(Incoming::Over),
        };
        return match received.message {
            Ok(vport_common::Message::Error { code, text, about_kind, .. }) if (0x60..=0x65).contains(&about_kind) => {
                let (kind, code) = (kind_name(about_kind), error_code::name(code));
                let detail = format!("the agent answered {kind} with ERROR {code}: {text}");
                Err(TransferError::Protocol { port: port.to_owned(), id, detail })
            }
            Ok(m) => Ok(Incoming::Message(m)),
            Err(e) => {
                log::debug!("port {port}: a frame that does not parse is ignored: {e}");
                continue;
            }
        };
    }
}

/// The name of message type `kind` for errors (`StreamData`, or `type 0xNN`).
pub(crate) fn kind_name(kind: u8) -> String {
    match vport_common::MessageType::from_u8(kind) {
        Some(t) => format!("{t:?}"),
        None => format!("type {kind:#04x}"),
    }
}

#[cfg(test)]
mod tests;
