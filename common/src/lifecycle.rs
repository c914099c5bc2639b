//! The life cycle of one port's session, as the 2010 design asked for: three states, a defined
//! result for every event in every state, and illegal transitions as typed errors (never
//! silently ignored).
//!
//! ```text
//!               HostConnected                 HelloAcked(nonce)
//! DISCONNECTED ---------------> CONNECTED ----------------------> READY
//!      ^                          |   ^  NewSession                 |
//!      |     HostDisconnected /   |   +-----------------------------+
//!      +------ Closed ------------+---------------------------------+
//! ```
//!
//! - DISCONNECTED: no host client is attached (or the port is closed/unplugged).
//! - CONNECTED (connected but not ready): a host client is attached and a session was offered
//!   with HELLO; the handshake is pending.
//! - READY (connected and ready): HELLO_ACK with the session's nonce arrived; data may flow.
//!
//! [`PortState`] is a [`Phase`] with the session's data; [`PortState::phase`] drops the data.

use crate::phase::Phase;
use thiserror::Error;

/// One of the three states of a port's session: its [`Phase`] and, once a host client is
/// attached, the session's id and nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// No host client is attached.
    Disconnected,
    /// A host client is attached; HELLO sent, HELLO_ACK pending.
    Connected {
        /// Session id offered in HELLO.
        session: u32,
        /// Nonce offered in HELLO.
        nonce: u64,
    },
    /// The handshake completed: the session is live.
    Ready {
        /// Session id.
        session: u32,
        /// The session's nonce.
        nonce: u64,
    },
}

impl PortState {
    /// The phase, without the session's data.
    pub fn phase(&self) -> Phase {
        match self {
            PortState::Disconnected => Phase::Disconnected,
            PortState::Connected { .. } => Phase::Connected,
            PortState::Ready { .. } => Phase::Ready,
        }
    }

    /// The phase's name as written in traces and logs ([`Phase::name`]).
    pub fn name(&self) -> &'static str {
        self.phase().name()
    }

    /// The current session id, if a host client is attached.
    pub fn session(&self) -> Option<u32> {
        match self {
            PortState::Disconnected => None,
            PortState::Connected { session, .. } | PortState::Ready { session, .. } => Some(*session),
        }
    }
}

impl From<&PortState> for Phase {
    fn from(s: &PortState) -> Phase {
        s.phase()
    }
}

impl From<PortState> for Phase {
    fn from(s: PortState) -> Phase {
        s.phase()
    }
}

/// Something that happened to a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEvent {
    /// A host client is now attached; a session is offered with these values.
    HostConnected {
        /// New session id.
        session: u32,
        /// New nonce.
        nonce: u64,
    },
    /// The host asked for a fresh session while attached (HELLO_REQUEST); offered with these.
    NewSession {
        /// New session id.
        session: u32,
        /// New nonce.
        nonce: u64,
    },
    /// HELLO_ACK arrived carrying this nonce.
    HelloAcked {
        /// Nonce in the acknowledgement.
        nonce: u64,
    },
    /// The host client went away (POLLHUP, or read returned 0).
    HostDisconnected,
    /// The guest closed the port, or it was unplugged: whatever the state, the session ends.
    Closed,
}

/// An event that is not legal in the current state. The state is left unchanged.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum TransitionError {
    /// A connect was reported while a host client was already attached (a duplicate OPENED).
    #[error("host connect reported while already {0}")]
    DuplicateConnect(Phase),
    /// A disconnect was reported with no host client attached (a duplicate CLOSED).
    #[error("host disconnect reported while already DISCONNECTED")]
    DuplicateDisconnect,
    /// HELLO_ACK or a new-session request with no host client attached.
    #[error("{event} while DISCONNECTED")]
    NotConnected {
        /// The offending event.
        event: &'static str,
    },
    /// HELLO_ACK for another session's nonce (a stale acknowledgement).
    #[error("hello ack for nonce {got:#x}, but the session's nonce is {expected:#x}")]
    NonceMismatch {
        /// The nonce of the current session.
        expected: u64,
        /// The nonce acknowledged.
        got: u64,
    },
    /// A second HELLO_ACK for a session that is already READY.
    #[error("duplicate hello ack: session already READY")]
    AlreadyReady,
}

/// A state change that happened, with the time it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: PortState,
    /// State after.
    pub to: PortState,
    /// Caller's monotonic clock, nanoseconds.
    pub at_ns: u64,
}

/// The state machine of one port. Time is passed in; nothing here reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMachine {
    state: PortState,
}

impl Default for PortMachine {
    fn default() -> Self {
        PortMachine { state: PortState::Disconnected }
    }
}

impl PortMachine {
    /// A machine in DISCONNECTED.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state.
    pub fn state(&self) -> PortState {
        self.state
    }

    /// Applies `event` at `now_ns`: the one place where states change.
    pub fn step(&mut self, event: PortEvent, now_ns: u64) -> Result<Transition, TransitionError> {
        use PortEvent as E;
        use PortState as S;
        let from = self.state;
        let to = match (from, event) {
            (S::Disconnected, E::HostConnected { session, nonce }) => S::Connected { session, nonce },
            (S::Connected { .. } | S::Ready { .. }, E::HostConnected { .. }) => {
                return Err(TransitionError::DuplicateConnect(from.phase()))
            }
            (S::Connected { .. } | S::Ready { .. }, E::NewSession { session, nonce }) => {
                S::Connected { session, nonce }
            }
            (S::Disconnected, E::NewSession { .. }) => {
                return Err(TransitionError::NotConnected { event: "new session request" })
            }
            (S::Connected { session, nonce }, E::HelloAcked { nonce: got }) if got == nonce => {
                S::Ready { session, nonce }
            }
            (S::Connected { nonce, .. }, E::HelloAcked { nonce: got }) => {
                return Err(TransitionError::NonceMismatch { expected: nonce, got })
            }
            (S::Ready { .. }, E::HelloAcked { .. }) => return Err(TransitionError::AlreadyReady),
            (S::Disconnected, E::HelloAcked { .. }) => {
                return Err(TransitionError::NotConnected { event: "hello ack" })
            }
            (S::Connected { .. } | S::Ready { .. }, E::HostDisconnected) => S::Disconnected,
            (S::Disconnected, E::HostDisconnected) => return Err(TransitionError::DuplicateDisconnect),
            (_, E::Closed) => S::Disconnected,
        };
        self.state = to;
        Ok(Transition { from, to, at_ns: now_ns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PortEvent as E;
    use PortState as S;

    const C: PortEvent = E::HostConnected { session: 1, nonce: 10 };

    #[test]
    fn handshake_reaches_ready_and_disconnect_returns() {
        let mut m = PortMachine::new();
        let t = m.step(C, 5).unwrap();
        assert_eq!((t.from, t.to, t.at_ns), (S::Disconnected, S::Connected { session: 1, nonce: 10 }, 5));
        m.step(E::HelloAcked { nonce: 10 }, 6).unwrap();
        assert_eq!(m.state(), S::Ready { session: 1, nonce: 10 });
        m.step(E::HostDisconnected, 7).unwrap();
        assert_eq!(m.state(), S::Disconnected);
    }

    #[test]
    fn the_phase_is_the_state_without_its_data() {
        let states = [S::Disconnected, S::Connected { session: 1, nonce: 10 }, S::Ready { session: 1, nonce: 10 }];
        let phases: Vec<Phase> = states.iter().map(Phase::from).collect();
        assert_eq!(phases, Phase::ALL);
        assert!(states.iter().all(|s| s.name() == s.phase().name()));
        assert_eq!(
            TransitionError::DuplicateConnect(Phase::Ready).to_string(),
            "host connect reported while already READY"
        );
    }

    #[test]
    fn every_event_in_every_state_has_a_defined_result() {
        let states = [S::Disconnected, S::Connected { session: 1, nonce: 10 }, S::Ready { session: 1, nonce: 10 }];
        let events = [
            C,
            E::NewSession { session: 2, nonce: 20 },
            E::HelloAcked { nonce: 10 },
            E::HelloAcked { nonce: 99 },
            E::HostDisconnected,
            E::Closed,
        ];
        use TransitionError as T;
        #[rustfmt::skip]
        let expected: [[Result<PortState, TransitionError>; 6]; 3] = [
            // Disconnected
            [Ok(S::Connected { session: 1, nonce: 10 }), Err(T::NotConnected { event: "new session request" }),
             Err(T::NotConnected { event: "hello ack" }), Err(T::NotConnected { event: "hello ack" }),
             Err(T::DuplicateDisconnect), Ok(S::Disconnected)],
            // Connected
            [Err(T::DuplicateConnect(Phase::Connected)), Ok(S::Connected { session: 2, nonce: 20 }),
             Ok(S::Ready { session: 1, nonce: 10 }), Err(T::NonceMismatch { expected: 10, got: 99 }),
             Ok(S::Disconnected), Ok(S::Disconnected)],
            // Ready
            [Err(T::DuplicateConnect(Phase::Ready)), Ok(S::Connected { session: 2, nonce: 20 }),
             Err(T::AlreadyReady), Err(T::AlreadyReady), Ok(S::Disconnected), Ok(S::Disconnected)],
        ];
        for (si, s) in states.iter().enumerate() {
            for (ei, e) in events.iter().enumerate() {
                let mut m = PortMachine { state: *s };
                let got = m.step(*e, 0).map(|t| t.to);
                assert_eq!(got, expected[si][ei], "state {s:?} event {e:?}");
                if got.is_err() {
                    assert_eq!(m.state(), *s, "an illegal event leaves the state unchanged");
                }
            }
        }
    }
}
