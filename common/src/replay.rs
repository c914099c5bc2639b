//! One replay of a trace: folds records ([`crate::trace`]) into what they say about each port:
//! whether the guest has it open, whether the host is connected, the in-band phase and session,
//! bytes each way, counts, and the last event. The checker ([`crate::checker`]) judges each
//! step of this replay; `vport watch` renders it as its live table. Both therefore see the
//! same port in the same state.
//!
//! Pure: records are data, time is their `t_ns`. The replay takes records in the order it is
//! given them (the checker sorts host and QMP records by time first; watch applies them as
//! they are recorded) and never refuses one: an illegal record is reported in its step
//! ([`Effect`]) and leaves the in-band state unchanged, exactly as [`PortMachine`] does.
//!
//! ```
//! use vport_common::replay::Replay;
//! use vport_common::trace::{Kind, Record, Source};
//! use vport_common::Phase;
//!
//! let mut replay = Replay::default();
//! for (seq, kind) in [Kind::HostConnect, Kind::Hello { session: 7, nonce: 42 }, Kind::HelloAck { session: 7, nonce: 42 }]
//!     .into_iter()
//!     .enumerate()
//! {
//!     let source = kind.default_source();
//!     replay.apply(&Record { seq: seq as u64, t_ns: 0, port: "org.vport.0".into(), source, kind });
//! }
//! let port = replay.port("org.vport.0").unwrap();
//! assert_eq!((port.phase(), port.session(), port.host_connected()), (Phase::Ready, Some(7), true));
//! ```

use crate::lifecycle::{PortEvent, PortMachine, PortState, Transition, TransitionError};
use crate::phase::Phase;
use crate::trace::{Direction, Kind, Record};
use serde::Serialize;
use std::collections::BTreeMap;

/// The last `VSERPORT_CHANGE` of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Its record.
    pub seq: u64,
    /// Its `open`.
    pub open: bool,
    /// Its `t_ns`.
    pub t_ns: u64,
}

/// The last agent transition record taken for a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentMark {
    /// Its record.
    pub seq: u64,
    /// The agent's record number.
    pub agent_seq: u64,
    /// The phase it ended in.
    pub to: Phase,
    /// Its session id.
    pub session: u32,
}

/// Where a port is, and the records (`seq`) that put it there. Copied into every [`Applied`] as
/// the state before the record, for the checker to judge the record against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// The host connect of the current host connection; `None` while not connected.
    pub host_connect: Option<u64>,
    /// The last host disconnect.
    pub last_disconnect: Option<u64>,
    /// The in-band session as the host sees it (HELLO, HELLO_ACK, BYE, host disconnect).
    pub state: PortState,
    /// The record that put `state` where it is.
    pub state_since: Option<u64>,
    /// The first HELLO of the current session.
    pub hello: Option<u64>,
    /// The HELLO_ACK of the current session.
    pub ack: Option<u64>,
    /// A HELLO_REQUEST was sent after the current session became READY.
    pub request_since_ack: bool,
    /// The last BYE, until the HELLO of a new session shows the guest open again. (QMP records
    /// do not count: they race with the endpoint's reads.)
    pub guest_closed_by: Option<u64>,
    /// The last `VSERPORT_CHANGE`.
    pub vserport: Option<Level>,
    /// The last agent transition record taken.
    pub agent: Option<AgentMark>,
}

impl Default for Marks {
    fn default() -> Self {
        Marks {
            host_connect: None,
            last_disconnect: None,
            state: PortState::Disconnected,
            state_since: None,
            hello: None,
            ack: None,
            request_since_ack: false,
            guest_closed_by: None,
            vserport: None,
            agent: None,
        }
    }
}

/// What the records of a port add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Records about this port.
    pub records: u64,
    /// Host connects.
    pub host_connects: u64,
    /// Host disconnects.
    pub host_disconnects: u64,
    /// Sessions offered (HELLOs of a new session that the in-band machine took).
    pub sessions: u64,
    /// HELLOs repeated for the pending or live session (answers to HELLO_REQUEST).
    pub hello_repeats: u64,
    /// HELLO_REQUESTs sent.
    pub hello_requests: u64,
    /// Sessions that became READY.
    pub ready: u64,
    /// BYEs received.
    pub byes: u64,
    /// Data records.
    pub data_records: u64,
    /// Bytes host to guest (all data records, saturating).
    pub bytes_h2g: u64,
    /// Bytes guest to host (all data records, saturating).
    pub bytes_g2h: u64,
    /// `VSERPORT_CHANGE` events.
    pub vserport_changes: u64,
    /// Of those, repeats of the previous level (QEMU's throttle coalesced the changes between).
    pub coalesced: u64,
    /// `frontend_open` samples.
    pub frontend_samples: u64,
    /// Agent transition records (repeated ones included).
    pub agent_transitions: u64,
}

/// What one record did to its port: the step the checker judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Levels and counts only (a connect, data, HELLO_REQUEST, QMP, a note), or an event the
    /// in-band machine had nothing to apply to (a disconnect with no connection, a BYE while
    /// DISCONNECTED).
    Recorded,
    /// The in-band machine took `event`; an illegal one left the state unchanged.
    Step {
        /// The event the record means.
        event: PortEvent,
        /// The machine's answer.
        result: Result<Transition, TransitionError>,
    },
    /// A HELLO repeating the pending or live offer (same session and nonce).
    HelloRepeated,
    /// A HELLO of the current session's id with another nonce: not applied.
    HelloNonceConflict,
    /// A HELLO_ACK for another session than the offered one: not applied.
    AckOfOtherSession,
    /// A BYE while the last one is not yet followed by a reopen: not applied.
    ByeAgain,
    /// An agent record after the last one taken: taken.
    AgentRecord,
    /// An agent record whose number does not follow the last one taken (fetched twice):
    /// counted, otherwise ignored.
    AgentRecordRepeated,
}

/// One record's step: the port's [`Marks`] before it, and what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The port before the record.
    pub before: Marks,
    /// What the record did.
    pub effect: Effect,
}

/// One port as its records tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortReplay {
    port: String,
    machine: PortMachine,
    marks: Marks,
    counts: Counts,
    guest_open: Option<bool>,
    frontend_open: Option<bool>,
    last: Option<Record>,
}

impl PortReplay {
    fn new(port: &str) -> PortReplay {
        PortReplay {
            port: port.to_string(),
            machine: PortMachine::new(),
            marks: Marks::default(),
            counts: Counts::default(),
            guest_open: None,
            frontend_open: None,
            last: None,
        }
    }

    /// The port's name.
    pub fn port(&self) -> &str {
        &self.port
    }

    /// The in-band state (phase, session id and nonce).
    pub fn state(&self) -> PortState {
        self.machine.state()
    }

    /// The in-band phase.
    pub fn phase(&self) -> Phase {
        self.machine.state().phase()
    }

    /// The session id, unless DISCONNECTED.
    pub fn session(&self) -> Option<u32> {
        self.machine.state().session()
    }

    /// Whether the host endpoint is connected.
    pub fn host_connected(&self) -> bool {
        self.marks.host_connect.is_some()
    }

    /// Whether the guest has the port open, by the latest evidence of any kind: HELLO (open),
    /// BYE (closing), `VSERPORT_CHANGE`, `frontend_open`. `None` before any.
    pub fn guest_open(&self) -> Option<bool> {
        self.guest_open
    }

    /// The last `frontend_open` sample: QEMU's own record of whether the guest has it open.
    pub fn frontend_open(&self) -> Option<bool> {
        self.frontend_open
    }

    /// The marks: the records that put the port where it is.
    pub fn marks(&self) -> &Marks {
        &self.marks
    }

    /// The counts.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// The last record applied.
    pub fn last(&self) -> Option<&Record> {
        self.last.as_ref()
    }

    /// Applies one record of this port.
    pub fn apply(&mut self, r: &Record) -> Applied {
        let before = self.marks;
        self.counts.records += 1;
        let effect = self.fold(r);
        self.last = Some(r.clone());
        Applied { before, effect }
    }

    fn fold(&mut self, r: &Record) -> Effect {
        let seq = r.seq;
        let (m, c) = (&mut self.marks, &mut self.counts);
        match &r.kind {
            Kind::HostConnect => {
                c.host_connects += 1;
                m.host_connect.get_or_insert(seq);
                Effect::Recorded
            }
            Kind::HostDisconnect { .. } => {
                c.host_disconnects += 1;
                let was_connected = m.host_connect.take().is_some();
                m.last_disconnect = Some(seq);
                if was_connected && self.machine.state() != PortState::Disconnected {
                    self.end_session(PortEvent::HostDisconnected, r)
                } else {
                    Effect::Recorded
                }
            }
            Kind::Hello { session, nonce } => {
                self.guest_open = Some(true);
                m.guest_closed_by = None;
                let (session, nonce) = (*session, *nonce);
                match self.machine.state() {
                    PortState::Disconnected => self.offer(PortEvent::HostConnected { session, nonce }, r),
                    PortState::Connected { session: s, nonce: n } | PortState::Ready { session: s, nonce: n }
                        if s == session =>
                    {
                        if n == nonce {
                            c.hello_repeats += 1;
                            Effect::HelloRepeated
                        } else {
                            Effect::HelloNonceConflict
                        }
                    }
                    PortState::Connected { .. } | PortState::Ready { .. } => {
                        self.offer(PortEvent::NewSession { session, nonce }, r)
                    }
                }
            }
            Kind::HelloAck { session, nonce } => match self.machine.state() {
                PortState::Connected { session: s, .. } if s != *session => Effect::AckOfOtherSession,
                _ => {
                    let effect = self.step(PortEvent::HelloAcked { nonce: *nonce }, r);
                    if matches!(effect, Effect::Step { result: Ok(_), .. }) {
                        self.marks.ack = Some(seq);
                        self.marks.request_since_ack = false;
                        self.counts.ready += 1;
                    }
                    effect
                }
            },
            Kind::HelloRequest => {
                c.hello_requests += 1;
                if matches!(self.machine.state(), PortState::Ready { .. }) {
                    m.request_since_ack = true;
                }
                Effect::Recorded
            }
            Kind::Data { dir, bytes, .. } => {
                c.data_records += 1;
                let total = match dir {
                    Direction::HostToGuest => &mut c.bytes_h2g,
                    Direction::GuestToHost => &mut c.bytes_g2h,
                };
                *total = total.saturating_add(*bytes);
                Effect::Recorded
            }
            Kind::Bye { .. } => {
                c.byes += 1;
                self.guest_open = Some(false);
                let closed_before = m.guest_closed_by.replace(seq);
                if closed_before.is_some() {
                    Effect::ByeAgain
                } else if self.machine.state() != PortState::Disconnected {
                    self.end_session(PortEvent::Closed, r)
                } else {
                    Effect::Recorded
                }
            }
            Kind::VserportChange { open, .. } => {
                c.vserport_changes += 1;
                if m.vserport.is_some_and(|prev| prev.open == *open) {
                    c.coalesced += 1;
                }
                m.vserport = Some(Level { seq, open: *open, t_ns: r.t_ns });
                self.guest_open = Some(*open);
                Effect::Recorded
            }
            Kind::FrontendOpen { open } => {
                c.frontend_samples += 1;
                self.frontend_open = Some(*open);
                self.guest_open = Some(*open);
                Effect::Recorded
            }
            Kind::AgentTransition { to, session, agent_seq, .. } => {
                c.agent_transitions += 1;
                if m.agent.is_some_and(|prev| *agent_seq <= prev.agent_seq) {
                    return Effect::AgentRecordRepeated;
                }
                m.agent = Some(AgentMark { seq, agent_seq: *agent_seq, to: *to, session: *session });
                Effect::AgentRecord
            }
            Kind::Note { .. } => Effect::Recorded,
        }
    }

    /// Steps the in-band machine; a change of state is marked with the record.
    fn step(&mut self, event: PortEvent, r: &Record) -> Effect {
        let result = self.machine.step(event, r.t_ns);
        if result.is_ok() {
            self.marks.state = self.machine.state();
            self.marks.state_since = Some(r.seq);
        }
        Effect::Step { event, result }
    }

    /// A HELLO of a new session.
    fn offer(&mut self, event: PortEvent, r: &Record) -> Effect {
        let effect = self.step(event, r);
        if matches!(effect, Effect::Step { result: Ok(_), .. }) {
            self.marks.hello = Some(r.seq);
            self.marks.ack = None;
            self.marks.request_since_ack = false;
            self.counts.sessions += 1;
        }
        effect
    }

    /// The host disconnected or the guest closed: the session ends.
    fn end_session(&mut self, event: PortEvent, r: &Record) -> Effect {
        let effect = self.step(event, r);
        self.marks.hello = None;
        self.marks.ack = None;
        effect
    }
}

/// Every port of a trace, in the order they first appear.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    ports: Vec<PortReplay>,
    index: BTreeMap<String, usize>,
}

impl Replay {
    /// Applies one record. A rig note about no particular port (empty `port`) is about no port:
    /// `None`. Any other record is its port's (a record with an empty `port` that is not a note
    /// is the port named "").
    pub fn apply(&mut self, r: &Record) -> Option<Applied> {
        if r.port.is_empty() && matches!(r.kind, Kind::Note { .. }) {
            return None;
        }
        let i = match self.index.get(&r.port) {
            Some(i) => *i,
            None => {
                self.ports.push(PortReplay::new(&r.port));
                self.index.insert(r.port.clone(), self.ports.len() - 1);
                self.ports.len() - 1
            }
        };
        self.ports.get_mut(i).map(|p| p.apply(r))
    }

    /// The ports, in the order their first record was applied.
    pub fn ports(&self) -> &[PortReplay] {
        &self.ports
    }

    /// One port, by name.
    pub fn port(&self, name: &str) -> Option<&PortReplay> {
        self.index.get(name).and_then(|i| self.ports.get(*i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Source;

    fn rec(seq: u64, port: &str, kind: Kind) -> Record {
        Record { seq, t_ns: seq * 1000, port: port.into(), source: kind.default_source(), kind }
    }

    #[test]
    fn a_session_folds_into_levels_phase_and_counts() {
        let mut r = Replay::default();
        let p = "org.vport.0";
        let kinds = [
            Kind::VserportChange { id: "v".into(), open: true },
            Kind::HostConnect,
            Kind::Hello { session: 7, nonce: 1 },
            Kind::Hello { session: 7, nonce: 1 },
            Kind::HelloAck { session: 7, nonce: 1 },
            Kind::Data { dir: Direction::HostToGuest, bytes: 40, session: 7 },
            Kind::Data { dir: Direction::GuestToHost, bytes: u64::MAX, session: 7 },
            Kind::Data { dir: Direction::GuestToHost, bytes: 2, session: 7 },
        ];
        for (i, k) in kinds.into_iter().enumerate() {
            r.apply(&rec(i as u64, p, k));
        }
        assert_eq!(r.apply(&Record { port: String::new(), ..rec(8, "", Kind::Note { text: "x".into() }) }), None);
        let port = r.port(p).unwrap();
        assert_eq!(
            (port.phase(), port.session(), port.host_connected(), port.guest_open()),
            (Phase::Ready, Some(7), true, Some(true))
        );
        let c = port.counts();
        assert_eq!((c.records, c.sessions, c.hello_repeats, c.ready), (8, 1, 1, 1));
        assert_eq!((c.bytes_h2g, c.bytes_g2h), (40, u64::MAX), "byte counts saturate");
        assert_eq!((port.marks().hello, port.marks().ack, port.marks().state_since), (Some(2), Some(4), Some(4)));
        assert_eq!(port.last().map(|l| l.seq), Some(7));
        assert_eq!(r.ports().len(), 1);
    }

    #[test]
    fn each_step_reports_what_the_record_did() {
        let mut r = Replay::default();
        let p = "p";
        let mut step = |seq: u64, k: Kind| r.apply(&rec(seq, p, k)).unwrap();
        assert_eq!(step(0, Kind::HostConnect).effect, Effect::Recorded);
        let hello = step(1, Kind::Hello { session: 1, nonce: 5 });
        assert!(matches!(hello.effect, Effect::Step { event: PortEvent::HostConnected { .. }, result: Ok(_) }));
        assert_eq!(step(2, Kind::Hello { session: 1, nonce: 6 }).effect, Effect::HelloNonceConflict);
        assert_eq!(step(3, Kind::HelloAck { session: 2, nonce: 5 }).effect, Effect::AckOfOtherSession);
        let bad_ack = step(4, Kind::HelloAck { session: 1, nonce: 9 });
        assert!(matches!(bad_ack.effect, Effect::Step { result: Err(TransitionError::NonceMismatch { .. }), .. }));
        assert_eq!(bad_ack.before.state, PortState::Connected { session: 1, nonce: 5 }, "unchanged");
        let bye = step(5, Kind::Bye { session: 1, reopen_after_ms: None, reason: String::new() });
        assert!(matches!(bye.effect, Effect::Step { event: PortEvent::Closed, result: Ok(_) }));
        let again = step(6, Kind::Bye { session: 1, reopen_after_ms: None, reason: String::new() });
        assert_eq!((again.effect, again.before.guest_closed_by), (Effect::ByeAgain, Some(5)));
        let agent = |agent_seq| Kind::AgentTransition {
            from: Phase::Disconnected,
            to: Phase::Connected,
            session: 1,
            cause: String::new(),
            agent_time_ns: 0,
            agent_seq,
        };
        assert_eq!(step(7, agent(3)).effect, Effect::AgentRecord);
        assert_eq!(step(8, agent(3)).effect, Effect::AgentRecordRepeated);
        let disconnect = step(9, Kind::HostDisconnect { reason: String::new() });
        assert_eq!((disconnect.effect, disconnect.before.host_connect), (Effect::Recorded, Some(0)));
        assert_eq!(step(10, Kind::HostDisconnect { reason: String::new() }).before.last_disconnect, Some(9));
        let port = r.port(p).unwrap();
        assert_eq!((port.phase(), port.guest_open(), port.host_connected()), (Phase::Disconnected, Some(false), false));
        assert_eq!(port.marks().agent.map(|a| (a.seq, a.agent_seq)), Some((7, 3)));
        assert_eq!(port.last().map(|l| l.source), Some(Source::Host));
    }
}
