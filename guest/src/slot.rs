//! Where a known port stands in the event loop, as a pure machine: one [`Slot`] per port node
//! (`vportNpM`), one transition [`Slot::step`], a defined result for every input in every
//! state, and a typed [`SlotError`] for an input that cannot happen in a state (the state is
//! then left unchanged). Time is passed in; nothing here opens, reads or closes anything: the
//! event loop ([`crate::event_loop`]) does the I/O and carries out the [`SlotAction`] each step
//! returns.
//!
//! ```text
//!          Wanted                  OpenEnded(Opened)              Served{close}
//!  Absent --------> (open attempt) -----------------> Open ----------------------> Closing
//!                     |        ^                        |                             |
//!   OpenEnded(Busy,   |        | Tick (due),            | IoFailed: Close             | BYE written, or
//!   Denied, Failed)   |        | Wanted{retry},         v                             | flush bound passed:
//!                     v        | PermissionsChanged   Busy                            | Close
//!            Busy, Denied, Failed ----+                                               v
//!                                             (open attempt) <---- Tick (due) ---- Reopen
//!
//!  Open, Closing  --- Unplugged, Unlisted{fd_unplugged}, Shutdown: Close ---> Absent
//!  Busy, Failed, Denied, Reopen  --- Unlisted: Forget ---------------------> Absent
//! ```
//!
//! - **Absent**: not known (never wanted, or forgotten): the loop keeps no entry.
//! - **Open**: open and served on its readiness events. With `serve_again`, its last service
//!   stopped at a budget, or guest-op work was queued on it: it is served again on the loop's
//!   next turn without waiting for an event (none comes for work that did not block), after the
//!   other ports' events, so one port never starves another.
//! - **Closing**: open, a CLOSE/REOPEN was served on it: its BYE is flushed on writable edges
//!   until it is written or [`BYE_FLUSH_BOUND`] passed; then it is closed, and reopened after
//!   the delay the command asked for.
//! - **Busy**: opening failed with EBUSY (another process holds the port), or the port was
//!   closed after an unexpected I/O error: opened again at `retry_at`, the back-off doubling
//!   from [`BACKOFF_MIN`] to [`BACKOFF_MAX`] while EBUSY lasts.
//! - **Failed**: opening failed otherwise: tried again on the next uevent naming the port.
//! - **Denied**: opening failed with EACCES/EPERM and the node is watched: tried again when its
//!   mode or owner changes (or a uevent names it), with no wakeup until then.
//! - **Reopen**: closed by a CLOSE/REOPEN command: opened again at `at`.
//!
//! A closing port's queue shrinks only in a service call, and the loop reports every service
//! call ([`SlotInput::Served`]): a BYE written in time is seen there, so a flush bound that
//! passes ([`SlotInput::Tick`]) means the BYE was not written.

use std::time::{Duration, Instant};
use thiserror::Error;

/// First EBUSY back-off.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest EBUSY back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a BYE may take to be written before the port is closed anyway.
pub const BYE_FLUSH_BOUND: Duration = Duration::from_secs(1);

/// The next EBUSY back-off after `prev`: 100 ms, doubling, capped at 5 s.
pub fn next_backoff(prev: Option<Duration>) -> Duration {
    match prev {
        None => BACKOFF_MIN,
        Some(d) => (d * 2).clamp(BACKOFF_MIN, BACKOFF_MAX),
    }
}

/// Where a known port stands (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Not known: never wanted, or forgotten.
    Absent,
    /// Open and served.
    Open {
        /// Serve it again on the loop's next turn.
        serve_again: bool,
    },
    /// Open, flushing the BYE of a served CLOSE/REOPEN.
    Closing {
        /// The delay the command asked for before the port is opened again, in ms.
        reopen_after_ms: u32,
        /// When the port is closed even if its BYE is not written.
        flush_deadline: Instant,
        /// Serve it again on the loop's next turn.
        serve_again: bool,
    },
    /// Waiting to open again after EBUSY or an I/O error.
    Busy {
        /// The back-off that led here.
        delay: Duration,
        /// When to open again.
        retry_at: Instant,
    },
    /// Opening failed; waiting for a uevent.
    Failed,
    /// Opening was refused (EACCES/EPERM); waiting for the node's permissions to change.
    Denied,
    /// Closed by command; waiting to open again.
    Reopen {
        /// When to open again.
        at: Instant,
    },
}

/// How an open attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenOutcome {
    /// Opened and registered with the loop.
    Opened,
    /// EBUSY: another process holds the port.
    Busy,
    /// EACCES/EPERM. `watched`: the node is watched for a change of its mode or owner.
    Denied {
        /// Whether a permission change will be reported ([`SlotInput::PermissionsChanged`]).
        watched: bool,
    },
    /// Any other failure (of the open or of the registration).
    Failed,
}

/// A served CLOSE/REOPEN, as a service call leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByeFlush {
    /// The delay the command asked for before the port is opened again, in ms.
    pub reopen_after_ms: u32,
    /// The port's output, the BYE last, is all written.
    pub written: bool,
}

/// What the event loop tells the machine about a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotInput {
    /// A sysfs scan selected the port. `retry`: a uevent named it, or uevents were lost.
    Wanted {
        /// Try a Failed or Denied port again.
        retry: bool,
    },
    /// The port is no longer listed in sysfs.
    Unlisted {
        /// For an open port: its fd reports POLLHUP alone (or poll failed), as an unplugged
        /// port does.
        fd_unplugged: bool,
    },
    /// inotify: the port's node changed mode or owner.
    PermissionsChanged,
    /// An open attempt ended.
    OpenEnded(OpenOutcome),
    /// A service call left the port open.
    Served {
        /// It stopped at its read or write budget with more to do.
        more_work: bool,
        /// A CLOSE/REOPEN was served on the port (in this call or an earlier one).
        close: Option<ByeFlush>,
    },
    /// A service call found the port unplugged (ENODEV).
    Unplugged,
    /// A service call failed with an unexpected I/O error.
    IoFailed,
    /// Guest-op requests or completions were queued on the port.
    WorkQueued,
    /// The loop's turn to serve the open ports that have work left.
    ServeTurn,
    /// A timer turn: the deadlines at or before `now` are due.
    Tick,
    /// The agent exits.
    Shutdown,
}

/// Why the loop closes an open port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// A served CLOSE/REOPEN; `bye_written`: false when the flush bound passed first (counted
    /// in STATS `bye_flush_timeouts`).
    Commanded {
        /// The BYE was written.
        bye_written: bool,
    },
    /// Hot-unplugged.
    Unplugged,
    /// An unexpected I/O error.
    IoError,
    /// The agent exits.
    AgentExit,
}

/// What the loop does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAction {
    /// Nothing now.
    Wait,
    /// Try to open the port and report how it ended ([`SlotInput::OpenEnded`]).
    Open,
    /// Serve the open port (and report the result).
    Serve,
    /// Close the open port: deregister it, end its session, keep its counters by name.
    Close(CloseCause),
    /// Forget the port: stop watching its node.
    Forget,
}

/// The result of a legal input: the state after it, and what the loop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotStep {
    /// The state after the input ([`Slot::Absent`]: drop the entry).
    pub next: Slot,
    /// What the loop does now.
    pub action: SlotAction,
}

/// An input that cannot happen in the state it came in; the state is left unchanged.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// A service result or queued work for a port that is not open.
    #[error("{input} for a port that is not open ({slot})")]
    NotOpen {
        /// The state.
        slot: &'static str,
        /// The input.
        input: &'static str,
    },
    /// An open attempt's result for a port that is already open.
    #[error("an open attempt ended ({outcome:?}) for a port that is already {slot}")]
    AlreadyOpen {
        /// The state.
        slot: &'static str,
        /// How the attempt ended.
        outcome: OpenOutcome,
    },
    /// A closing port reported another CLOSE/REOPEN than the one it is closing for, or none (a
    /// served close is never withdrawn).
    #[error("a port closing to reopen after {closing_ms} ms reported a close request of {reported_ms:?} ms")]
    CloseChanged {
        /// The delay the port is closing with.
        closing_ms: u32,
        /// The delay the service call reported.
        reported_ms: Option<u32>,
    },
}

impl Slot {
    /// The state's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Slot::Absent => "absent",
            Slot::Open { .. } => "open",
            Slot::Closing { .. } => "closing",
            Slot::Busy { .. } => "busy",
            Slot::Failed => "failed",
            Slot::Denied => "denied",
            Slot::Reopen { .. } => "reopen",
        }
    }

    /// Whether the port is open (Open or Closing).
    pub fn is_open(&self) -> bool {
        matches!(self, Slot::Open { .. } | Slot::Closing { .. })
    }

    /// The open port has work left: serve it on the loop's next turn, without waiting.
    pub fn serve_again(&self) -> bool {
        matches!(self, Slot::Open { serve_again: true } | Slot::Closing { serve_again: true, .. })
    }

    /// The state's timer, for the loop's poll timeout: a retry, a reopen, or a flush bound.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Slot::Busy { retry_at, .. } => Some(*retry_at),
            Slot::Reopen { at } => Some(*at),
            Slot::Closing { flush_deadline, .. } => Some(*flush_deadline),
            Slot::Absent | Slot::Open { .. } | Slot::Failed | Slot::Denied => None,
        }
    }

    /// Applies `input` at `now`: the one place where a port's slot changes.
    pub fn step(self, input: SlotInput, now: Instant) -> Result<SlotStep, SlotError> {
        use OpenOutcome as O;
        use Slot as S;
        use SlotAction as A;
        use SlotInput as In;
        let stay = |action| Ok(SlotStep { next: self, action });
        let to = |next, action| Ok(SlotStep { next, action });
        match (self, input) {
            (S::Absent, In::Wanted { .. }) => stay(A::Open),
            (S::Failed | S::Denied, In::Wanted { retry: true }) => stay(A::Open),
            (S::Failed | S::Denied, In::Wanted { retry: false }) => stay(A::Wait),
            // Open, or already scheduled to open.
            (S::Open { .. } | S::Closing { .. } | S::Busy { .. } | S::Reopen { .. }, In::Wanted { .. }) => {
                stay(A::Wait)
            }

            (S::Open { .. } | S::Closing { .. }, In::Unlisted { fd_unplugged: true }) => {
                to(S::Absent, A::Close(CloseCause::Unplugged))
            }
            // Gone from sysfs but the fd still works: its ENODEV (or a later scan) decides.
            (S::Open { .. } | S::Closing { .. }, In::Unlisted { fd_unplugged: false }) => stay(A::Wait),
            (S::Busy { .. } | S::Failed | S::Denied | S::Reopen { .. }, In::Unlisted { .. }) => {
                to(S::Absent, A::Forget)
            }
            (S::Absent, In::Unlisted { .. }) => stay(A::Wait),

            (S::Denied, In::PermissionsChanged) => stay(A::Open),
            // A change of a node that waits for none (it was opened, or is retried otherwise).
            (
                S::Absent | S::Open { .. } | S::Closing { .. } | S::Busy { .. } | S::Failed | S::Reopen { .. },
                In::PermissionsChanged,
            ) => stay(A::Wait),

            (S::Open { .. } | S::Closing { .. }, In::OpenEnded(outcome)) => {
                Err(SlotError::AlreadyOpen { slot: self.name(), outcome })
            }
            (S::Absent | S::Busy { .. } | S::Failed | S::Denied | S::Reopen { .. }, In::OpenEnded(outcome)) => {
                match outcome {
                    O::Opened => to(S::Open { serve_again: false }, A::Serve),
                    O::Busy => {
                        let delay = next_backoff(self.backoff());
                        to(S::Busy { delay, retry_at: now + delay }, A::Wait)
                    }
                    O::Denied { watched: true } => to(S::Denied, A::Wait),
                    // Without a watch, a later uevent (or a rescan) is the only retry.
                    O::Denied { watched: false } | O::Failed => to(S::Failed, A::Wait),
                }
            }

            (S::Open { serve_again }, In::Served { more_work, close: None }) => {
                to(S::Open { serve_again: serve_again || more_work }, A::Wait)
            }
            (S::Open { serve_again }, In::Served { more_work, close: Some(bye) }) => {
                Ok(closing(bye.reopen_after_ms, now + BYE_FLUSH_BOUND, serve_again || more_work, bye.written, now))
            }
            (S::Closing { reopen_after_ms, flush_deadline, serve_again }, In::Served { more_work, close }) => {
                match close {
                    Some(bye) if bye.reopen_after_ms == reopen_after_ms => {
                        Ok(closing(reopen_after_ms, flush_deadline, serve_again || more_work, bye.written, now))
                    }
                    Some(_) | None => Err(SlotError::CloseChanged {
                        closing_ms: reopen_after_ms,
                        reported_ms: close.map(|b| b.reopen_after_ms),
                    }),
                }
            }
            (S::Open { .. } | S::Closing { .. }, In::Unplugged) => to(S::Absent, A::Close(CloseCause::Unplugged)),
            (S::Open { .. } | S::Closing { .. }, In::IoFailed) => {
                let delay = next_backoff(None);
                to(S::Busy { delay, retry_at: now + delay }, A::Close(CloseCause::IoError))
            }
            (S::Open { .. }, In::WorkQueued) => to(S::Open { serve_again: true }, A::Wait),
            (S::Closing { reopen_after_ms, flush_deadline, .. }, In::WorkQueued) => {
                to(S::Closing { reopen_after_ms, flush_deadline, serve_again: true }, A::Wait)
            }
            (
                S::Absent | S::Busy { .. } | S::Failed | S::Denied | S::Reopen { .. },
                In::Served { .. } | In::Unplugged | In::IoFailed | In::WorkQueued,
            ) => Err(SlotError::NotOpen { slot: self.name(), input: input.name() }),

            (S::Open { serve_again: true }, In::ServeTurn) => to(S::Open { serve_again: false }, A::Serve),
            (S::Closing { reopen_after_ms, flush_deadline, serve_again: true }, In::ServeTurn) => {
                to(S::Closing { reopen_after_ms, flush_deadline, serve_again: false }, A::Serve)
            }
            (S::Open { serve_again: false } | S::Closing { serve_again: false, .. }, In::ServeTurn) => stay(A::Wait),
            (S::Absent | S::Busy { .. } | S::Failed | S::Denied | S::Reopen { .. }, In::ServeTurn) => stay(A::Wait),

            (S::Busy { retry_at, .. }, In::Tick) => stay(if retry_at <= now { A::Open } else { A::Wait }),
            (S::Reopen { at }, In::Tick) => stay(if at <= now { A::Open } else { A::Wait }),
            (S::Closing { reopen_after_ms, flush_deadline, .. }, In::Tick) => {
                if flush_deadline <= now {
                    to(reopen_at(reopen_after_ms, now), A::Close(CloseCause::Commanded { bye_written: false }))
                } else {
                    stay(A::Wait)
                }
            }
            (S::Absent | S::Open { .. } | S::Failed | S::Denied, In::Tick) => stay(A::Wait),

            (S::Open { .. } | S::Closing { .. }, In::Shutdown) => to(S::Absent, A::Close(CloseCause::AgentExit)),
            // Nothing open: nothing to close.
            (S::Absent | S::Busy { .. } | S::Failed | S::Denied | S::Reopen { .. }, In::Shutdown) => stay(A::Wait),
        }
    }

    /// The back-off an EBUSY now doubles: the one that led to Busy, else none.
    fn backoff(&self) -> Option<Duration> {
        match self {
            Slot::Busy { delay, .. } => Some(*delay),
            Slot::Absent
            | Slot::Open { .. }
            | Slot::Closing { .. }
            | Slot::Failed
            | Slot::Denied
            | Slot::Reopen { .. } => None,
        }
    }
}

/// A closing port after a service call: closed (and reopened `reopen_after_ms` later) once its
/// BYE is `written` or `flush_deadline` passed, else still closing.
fn closing(reopen_after_ms: u32, flush_deadline: Instant, serve_again: bool, written: bool, now: Instant) -> SlotStep {
    if written || flush_deadline <= now {
        let action = SlotAction::Close(CloseCause::Commanded { bye_written: written });
        return SlotStep { next: reopen_at(reopen_after_ms, now), action };
    }
    SlotStep { next: Slot::Closing { reopen_after_ms, flush_deadline, serve_again }, action: SlotAction::Wait }
}

/// Closed by command at `now`: open again `reopen_after_ms` later.
fn reopen_at(reopen_after_ms: u32, now: Instant) -> Slot {
    Slot::Reopen { at: now + Duration::from_millis(u64::from(reopen_after_ms)) }
}

impl SlotInput {
    /// The input's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            SlotInput::Wanted { .. } => "wanted",
            SlotInput::Unlisted { .. } => "unlisted",
            SlotInput::PermissionsChanged => "permissions changed",
            SlotInput::OpenEnded(_) => "open ended",
            SlotInput::Served { .. } => "served",
            SlotInput::Unplugged => "unplugged",
            SlotInput::IoFailed => "i/o failed",
            SlotInput::WorkQueued => "work queued",
            SlotInput::ServeTurn => "serve turn",
            SlotInput::Tick => "tick",
            SlotInput::Shutdown => "shutdown",
        }
    }
}

#[cfg(test)]
#[path = "slot_tests.rs"]
mod tests;
