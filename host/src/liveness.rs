//! Liveness of a READY session nobody streams on: is the agent still there?
//!
//! A live session can look alive while its agent is dead to it (the agent hung, or a port
//! QEMU left stuck): nothing arrives, and silence is also what an idle session looks like.
//! [`IdleLiveness`] tells them apart by asking: once the session has been silent for half the
//! deadline, the host sends a PING (which the agent answers in any state); a session that
//! stays silent for the whole deadline, the PING unanswered, is dead, and the host leaves it
//! and connects again (QEMU then delivers a real close to the port).
//!
//! [`SessionWait`] is the same question before a session: a connection that gives none for
//! the deadline while the VM runs is left and made again.
//!
//! Time the VM spends paused (stopped, migrating, saving) is not silence: no agent can answer
//! then, so the measure starts again when the VM runs ([`IdleLiveness::paused`]). Pure: the
//! caller passes the time in, sends the PING and acts on [`LivenessAction::Dead`].

use std::time::{Duration, Instant};

/// Where an idle session's liveness stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeState {
    /// Heard from the agent (or the VM ran again) at `since`; no PING outstanding.
    Listening {
        /// Start of the silence.
        since: Instant,
    },
    /// Silent since `since`; a PING went out at `sent` and has not been answered.
    Probed {
        /// Start of the silence.
        since: Instant,
        /// When the PING was sent.
        sent: Instant,
    },
}

/// What the caller does next ([`IdleLiveness::poll`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessAction {
    /// Nothing: the session was heard from recently, or a PING is on its way.
    Wait,
    /// Send a PING now (the session has been silent for half the deadline).
    SendPing,
    /// The session is dead: silent for `silent` (at least the deadline) while the VM ran, the
    /// PING sent after `probe_after` unanswered. Leave and connect again.
    Dead {
        /// How long the session has been silent.
        silent: Duration,
        /// How long after the silence began the PING went out.
        probe_after: Duration,
    },
}

/// The liveness of one live session. See the module docs.
#[derive(Debug, Clone)]
pub struct IdleLiveness {
    deadline: Duration,
    state: ProbeState,
}

impl IdleLiveness {
    /// A session handed out at `now`, dead after `deadline` of silence while the VM runs.
    pub fn new(deadline: Duration, now: Instant) -> IdleLiveness {
        IdleLiveness { deadline, state: ProbeState::Listening { since: now } }
    }

    /// The deadline this liveness enforces.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Something of the session arrived at `now` (any message: a PONG, data, an event).
    pub fn heard(&mut self, now: Instant) {
        self.state = ProbeState::Listening { since: now };
    }

    /// The VM was found not running at `now`: the silence so far does not count, and an
    /// outstanding PING is forgotten (the agent could not answer).
    pub fn paused(&mut self, now: Instant) {
        self.state = ProbeState::Listening { since: now };
    }

    /// Whether [`IdleLiveness::poll`] would ask for something at `now` (a PING or a verdict):
    /// the moment to ask QEMU whether the VM runs.
    pub fn due(&self, now: Instant) -> bool {
        match self.state {
            ProbeState::Listening { since } => now.saturating_duration_since(since) >= self.deadline / 2,
            ProbeState::Probed { since, .. } => now.saturating_duration_since(since) >= self.deadline,
        }
    }

    /// What to do at `now`. [`LivenessAction::SendPing`] is returned once per silence: the
    /// state then counts the PING as sent.
    pub fn poll(&mut self, now: Instant) -> LivenessAction {
        match self.state {
            ProbeState::Listening { since } if now.saturating_duration_since(since) >= self.deadline / 2 => {
                self.state = ProbeState::Probed { since, sent: now };
                LivenessAction::SendPing
            }
            ProbeState::Listening { .. } => LivenessAction::Wait,
            ProbeState::Probed { since, sent } => {
                let silent = now.saturating_duration_since(since);
                if silent >= self.deadline {
                    LivenessAction::Dead { silent, probe_after: sent.saturating_duration_since(since) }
                } else {
                    LivenessAction::Wait
                }
            }
        }
    }
}

/// How long a host has waited for a session on its connection while the VM ran: a port can be stuck so that
/// only the host leaving frees it (the pause bug: a client that left during `stop` is never
/// seen by the guest, and the next client's OPENED is ignored).
pub struct SessionWait {
    since: Instant,
}

impl SessionWait {
    /// A wait that starts at `now`.
    pub fn new(now: Instant) -> SessionWait {
        SessionWait { since: now }
    }

    /// `Some(what)` when no session came within `deadline` of the VM running (`vm_paused` is
    /// asked only then; a paused VM starts the wait again); the wait then starts again.
    pub fn overdue(&mut self, now: Instant, deadline: Duration, vm_paused: &dyn Fn() -> bool) -> Option<String> {
        let waited = now.saturating_duration_since(self.since);
        if waited < deadline {
            return None;
        }
        self.since = now;
        (!vm_paused()).then(|| format!("gave no session within {} ms while the vm ran", waited.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(10);

    #[test]
    fn a_silent_session_is_probed_at_half_the_deadline_and_dead_at_the_deadline() {
        let t0 = Instant::now();
        let mut l = IdleLiveness::new(D, t0);
        assert!(!l.due(t0 + Duration::from_secs(4)));
        assert_eq!(l.poll(t0 + Duration::from_secs(4)), LivenessAction::Wait);
        assert!(l.due(t0 + Duration::from_secs(5)));
        assert_eq!(l.poll(t0 + Duration::from_secs(5)), LivenessAction::SendPing);
        assert_eq!(l.poll(t0 + Duration::from_secs(6)), LivenessAction::Wait, "one PING per silence");
        assert!(!l.due(t0 + Duration::from_millis(9999)));
        assert_eq!(l.poll(t0 + Duration::from_millis(9999)), LivenessAction::Wait);
        assert!(l.due(t0 + D));
        assert_eq!(
            l.poll(t0 + D),
            LivenessAction::Dead { silent: D, probe_after: Duration::from_secs(5) },
            "the PING unanswered at the deadline"
        );
    }

    #[test]
    fn an_answer_starts_the_silence_again() {
        let t0 = Instant::now();
        let mut l = IdleLiveness::new(D, t0);
        assert_eq!(l.poll(t0 + Duration::from_secs(5)), LivenessAction::SendPing);
        l.heard(t0 + Duration::from_secs(6));
        assert_eq!(l.poll(t0 + D), LivenessAction::Wait, "heard 4 s ago");
        assert_eq!(l.poll(t0 + Duration::from_secs(11)), LivenessAction::SendPing, "silent 5 s again");
        assert_eq!(
            l.poll(t0 + Duration::from_secs(16)),
            LivenessAction::Dead { silent: D, probe_after: Duration::from_secs(5) }
        );
    }

    #[test]
    fn time_paused_is_not_silence_and_forgets_the_ping() {
        let t0 = Instant::now();
        let mut l = IdleLiveness::new(D, t0);
        assert_eq!(l.poll(t0 + Duration::from_secs(5)), LivenessAction::SendPing);
        // The VM stops before the answer and stays stopped for a minute.
        l.paused(t0 + Duration::from_secs(6));
        l.paused(t0 + Duration::from_secs(66));
        assert_eq!(l.poll(t0 + Duration::from_secs(67)), LivenessAction::Wait, "no false alarm after the pause");
        assert_eq!(l.poll(t0 + Duration::from_secs(71)), LivenessAction::SendPing, "asked again once it ran 5 s");
    }

    #[test]
    fn a_wait_for_a_session_is_overdue_at_the_deadline_only_while_the_vm_runs() {
        let t0 = Instant::now();
        let d = Duration::from_secs(30);
        let mut w = SessionWait::new(t0);
        assert_eq!(w.overdue(t0 + Duration::from_secs(29), d, &|| false), None);
        assert_eq!(w.overdue(t0 + d, d, &|| true), None, "paused: not a stall");
        assert_eq!(w.overdue(t0 + Duration::from_secs(59), d, &|| false), None, "the wait started again");
        let text = w.overdue(t0 + Duration::from_secs(60), d, &|| false).unwrap();
        assert_eq!(text, "gave no session within 30000 ms while the vm ran");
    }
}
