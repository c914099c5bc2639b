//! The rules applied to each step of the replay: every record is folded by
//! [`crate::replay::Replay`], then judged here against the port as it was before the record
//! ([`Applied::before`]) and what the record did ([`Applied::effect`]). What is kept here is
//! only what the rules need beyond the replay: the open run of data outside READY and the
//! `frontend_open` sample awaiting its event.

use super::{CheckReport, Note, NoteKind, PortSummary, Rule, Violation, RECONCILE_SLACK_NS, THROTTLE_NS};
use crate::lifecycle::{PortEvent, PortMachine, PortState, TransitionError};
use crate::phase::Phase;
use crate::replay::{Applied, Effect, Marks, PortReplay, Replay};
use crate::trace::{Kind, Record};
use std::collections::BTreeMap;

/// Violations and notes, in the order found.
#[derive(Default)]
pub(super) struct Out {
    violations: Vec<Violation>,
    notes: Vec<Note>,
}

fn sorted(records: &[Option<u64>]) -> Vec<u64> {
    let mut v: Vec<u64> = records.iter().flatten().copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

impl Out {
    pub(super) fn violation(&mut self, rule: Rule, port: &str, records: &[Option<u64>], detail: String) -> usize {
        self.violations.push(Violation { rule, port: port.to_string(), records: sorted(records), detail });
        self.violations.len() - 1
    }

    fn note(&mut self, kind: NoteKind, port: &str, records: &[Option<u64>], detail: String) {
        self.notes.push(Note { kind, port: port.to_string(), records: sorted(records), detail });
    }
}

/// Data records outside READY in one state: one violation, later ones counted into it.
struct DataRun {
    violation: usize,
    more: u64,
    last: u64,
}

/// A `frontend_open` sample that disagrees with the last `VSERPORT_CHANGE`, waiting for the
/// event that must follow.
struct Pending {
    sample: u64,
    open: bool,
    event: u64,
    deadline: u64,
}

/// What the rules keep about one port beyond the replay.
#[derive(Default)]
struct Judge {
    data_run: Option<DataRun>,
    pending: Option<Pending>,
}

fn session_text(s: PortState) -> String {
    match s.session() {
        Some(id) => format!("{} (session {id:#010x})", s.name()),
        None => s.name().to_string(),
    }
}

fn rule_for(e: &TransitionError) -> Rule {
    match e {
        TransitionError::DuplicateConnect(_) => Rule::DuplicateOpened,
        TransitionError::DuplicateDisconnect | TransitionError::NotConnected { event: "new session request" } => {
            Rule::AgentTransition
        }
        TransitionError::NotConnected { .. }
        | TransitionError::NonceMismatch { .. }
        | TransitionError::AlreadyReady => Rule::ReadyOnlyFromConnected,
    }
}

impl Judge {
    fn close_data_run(&mut self, out: &mut Out) {
        if let Some(run) = self.data_run.take() {
            if run.more > 0 {
                if let Some(v) = out.violations.get_mut(run.violation) {
                    v.detail.push_str(&format!("; {} more such data records, the last #{}", run.more, run.last));
                }
            }
        }
    }

    /// Judges an in-band step: a change of state ends a data run; an illegal event is a
    /// violation naming the record and `context`.
    fn stepped(&mut self, r: &Record, a: &Applied, context: Option<u64>, out: &mut Out) {
        match &a.effect {
            Effect::Step { result: Ok(_), .. } => self.close_data_run(out),
            Effect::Step { result: Err(e), .. } => {
                let detail = format!("{} in {}: {e}", r.kind, session_text(a.before.state));
                out.violation(rule_for(e), &r.port, &[context, Some(r.seq)], detail);
            }
            _ => {}
        }
    }

    fn need_host(b: &Marks, r: &Record, out: &mut Out) {
        if b.host_connect.is_none() {
            let detail = format!("{} while the host endpoint is not connected", r.kind);
            out.violation(Rule::InBandWithoutHost, &r.port, &[b.last_disconnect, Some(r.seq)], detail);
        }
    }

    fn judge(&mut self, r: &Record, a: &Applied, out: &mut Out) {
        let (seq, port, b) = (r.seq, r.port.as_str(), &a.before);
        match &r.kind {
            Kind::HostConnect => {
                if let Some(prev) = b.host_connect {
                    let detail = format!("host connect while connected since #{prev} (a duplicate OPENED)");
                    out.violation(Rule::DuplicateOpened, port, &[Some(prev), Some(seq)], detail);
                }
            }
            Kind::HostDisconnect { .. } => {
                if b.host_connect.is_none() {
                    let detail = match b.last_disconnect {
                        Some(d) => format!("host disconnect while not connected (disconnected at #{d})"),
                        None => "host disconnect with no host connect before it".to_string(),
                    };
                    out.violation(Rule::HostAlternation, port, &[b.last_disconnect, Some(seq)], detail);
                }
                self.stepped(r, a, None, out);
            }
            Kind::Hello { session, nonce } => {
                Judge::need_host(b, r, out);
                match &a.effect {
                    Effect::HelloNonceConflict => {
                        let (s, n) = match b.state {
                            PortState::Connected { session, nonce } | PortState::Ready { session, nonce } => {
                                (session, nonce)
                            }
                            PortState::Disconnected => (*session, *nonce),
                        };
                        let detail = format!(
                            "session {s:#010x} offered again with nonce {nonce:#x}; it was offered with nonce {n:#x}"
                        );
                        out.violation(Rule::DuplicateOpened, port, &[b.hello, Some(seq)], detail);
                    }
                    Effect::Step { event: PortEvent::NewSession { .. }, .. } => {
                        let explained = matches!(b.state, PortState::Ready { .. }) && b.request_since_ack;
                        if !explained {
                            let detail = format!(
                                "session {session:#010x} replaced {} with no HELLO_REQUEST after READY, reconnect or \
                                 BYE (agent restarted, or the guest reopened the port without BYE)",
                                session_text(b.state)
                            );
                            out.note(NoteKind::UnexplainedNewSession, port, &[b.hello, Some(seq)], detail);
                        }
                        self.stepped(r, a, b.hello, out);
                    }
                    _ => self.stepped(r, a, None, out),
                }
            }
            Kind::HelloAck { session, .. } => {
                Judge::need_host(b, r, out);
                if a.effect == Effect::AckOfOtherSession {
                    let offered = b.state.session().unwrap_or_default();
                    let detail = format!(
                        "hello ack for session {session:#010x}, but the offered session is {offered:#010x}: READY only \
                         from CONNECTED of the same session"
                    );
                    out.violation(Rule::ReadyOnlyFromConnected, port, &[b.hello, Some(seq)], detail);
                } else {
                    let context = match b.state {
                        PortState::Connected { .. } => b.hello,
                        PortState::Ready { .. } => b.ack,
                        PortState::Disconnected => b.state_since,
                    };
                    self.stepped(r, a, context, out);
                }
            }
            Kind::HelloRequest => Judge::need_host(b, r, out),
            Kind::Data { dir, bytes, session } => match b.state {
                PortState::Ready { session: s, .. } if s == *session => {}
                state => match &mut self.data_run {
                    Some(run) => {
                        run.more += 1;
                        run.last = seq;
                    }
                    None => {
                        let since = match b.state_since {
                            Some(s) => format!(" since #{s}"),
                            None => String::new(),
                        };
                        let detail = format!(
                            "{} data ({bytes} bytes) of session {session:#010x} while the port is {}{since}",
                            dir.name(),
                            session_text(state)
                        );
                        let violation =
                            out.violation(Rule::NoDataOutsideReady, port, &[b.state_since, Some(seq)], detail);
                        self.data_run = Some(DataRun { violation, more: 0, last: seq });
                    }
                },
            },
            Kind::Bye { session, .. } => {
                Judge::need_host(b, r, out);
                if let Some(prev) = b.guest_closed_by {
                    let detail = format!("bye (a guest close) again with no sign of a reopen since bye #{prev}");
                    out.violation(Rule::GuestAlternation, port, &[Some(prev), Some(seq)], detail);
                } else {
                    match b.state {
                        PortState::Connected { session: s, .. } | PortState::Ready { session: s, .. }
                            if s == *session => {}
                        state => {
                            let detail = format!("bye for session {session:#010x} while {}", session_text(state));
                            out.violation(Rule::GuestAlternation, port, &[b.state_since, Some(seq)], detail);
                        }
                    }
                    self.stepped(r, a, None, out);
                }
            }
            Kind::VserportChange { open, .. } => {
                if let Some(prev) = b.vserport.filter(|prev| prev.open == *open) {
                    let gap_ms = r.t_ns.saturating_sub(prev.t_ns) / 1_000_000;
                    let detail = format!(
                        "VSERPORT_CHANGE open={open} twice in a row ({gap_ms} ms apart): QEMU's one-per-second \
                         throttle replaced the changes in between (or a reset, migration or resume replayed the \
                         level); a level hint, not a guest violation"
                    );
                    out.note(NoteKind::CoalescedVserportChange, port, &[Some(prev.seq), Some(seq)], detail);
                }
                // QEMU reported a change: whatever a sample saw in between is accounted for.
                self.pending = None;
            }
            Kind::FrontendOpen { open } => match b.vserport {
                Some(event) if event.open != *open => {
                    if self.pending.is_none() {
                        let deadline =
                            event.t_ns.saturating_add(THROTTLE_NS).max(r.t_ns).saturating_add(RECONCILE_SLACK_NS);
                        self.pending = Some(Pending { sample: seq, open: *open, event: event.seq, deadline });
                    }
                }
                _ => self.pending = None,
            },
            Kind::AgentTransition { .. } => Judge::agent(r, a, out),
            Kind::Note { .. } => {}
        }
    }

    fn agent(r: &Record, a: &Applied, out: &mut Out) {
        let Kind::AgentTransition { from, to, session, agent_seq, .. } = &r.kind else {
            return;
        };
        let (from, to, session, agent_seq) = (*from, *to, *session, *agent_seq);
        let port = r.port.as_str();
        let mut from_session = session;
        if let Some(prev) = a.before.agent {
            if a.effect == Effect::AgentRecordRepeated {
                let detail = format!(
                    "agent record {agent_seq} does not follow agent record {} (#{}): fetched twice? ignored",
                    prev.agent_seq, prev.seq
                );
                out.note(NoteKind::AgentRecordRepeated, port, &[Some(prev.seq), Some(r.seq)], detail);
                return;
            }
            if agent_seq > prev.agent_seq.saturating_add(1) {
                let detail = format!(
                    "agent records {}..{} are missing (dropped from the agent's ring before they were fetched); \
                     continuity not checked across the gap",
                    prev.agent_seq + 1,
                    agent_seq - 1
                );
                out.note(NoteKind::AgentRecordsMissing, port, &[Some(prev.seq), Some(r.seq)], detail);
            } else if from != prev.to {
                let detail = format!(
                    "agent transition {from} -> {to} starts in {from}, but the previous agent record ended in {}",
                    prev.to
                );
                out.violation(Rule::AgentContinuity, port, &[Some(prev.seq), Some(r.seq)], detail);
            } else {
                from_session = prev.session;
            }
        }
        let mut m = machine_in(from, from_session);
        let what = format!("agent transition {from} -> {to}");
        let mut bad = |rule: Rule, detail: String| {
            out.violation(rule, port, &[Some(r.seq)], format!("{what}: {detail}"));
        };
        if to != Phase::Disconnected && session == 0 {
            bad(Rule::AgentTransition, "session 0 is no session".to_string());
        }
        let result = match (from, to) {
            (Phase::Disconnected, Phase::Disconnected) => m.step(PortEvent::HostDisconnected, r.t_ns),
            (_, Phase::Disconnected) => m.step(PortEvent::Closed, r.t_ns),
            (Phase::Disconnected, Phase::Connected) => m.step(PortEvent::HostConnected { session, nonce: 0 }, r.t_ns),
            (_, Phase::Connected) => {
                if session == from_session {
                    bad(Rule::AgentTransition, format!("a new session must have a new id, got {session:#010x} again"));
                }
                m.step(PortEvent::NewSession { session, nonce: 0 }, r.t_ns)
            }
            (_, Phase::Ready) => {
                if from == Phase::Connected && session != from_session {
                    bad(
                        Rule::ReadyOnlyFromConnected,
                        format!("READY for session {session:#010x}, but CONNECTED was session {from_session:#010x}"),
                    );
                }
                m.step(PortEvent::HelloAcked { nonce: 0 }, r.t_ns)
            }
        };
        if let Err(e) = result {
            let e = match e {
                TransitionError::DuplicateDisconnect => "no transition: already DISCONNECTED".to_string(),
                TransitionError::NotConnected { .. } | TransitionError::AlreadyReady => {
                    format!("READY only from CONNECTED ({e})")
                }
                e => e.to_string(),
            };
            bad(rule_for_agent(to), e);
        }
    }
}

fn rule_for_agent(to: Phase) -> Rule {
    match to {
        Phase::Ready => Rule::ReadyOnlyFromConnected,
        Phase::Disconnected | Phase::Connected => Rule::AgentTransition,
    }
}

/// A machine in `phase` (nonce 0: agent records carry no nonce).
fn machine_in(phase: Phase, session: u32) -> PortMachine {
    let mut m = PortMachine::new();
    if phase != Phase::Disconnected {
        let _ = m.step(PortEvent::HostConnected { session, nonce: 0 }, 0);
    }
    if phase == Phase::Ready {
        let _ = m.step(PortEvent::HelloAcked { nonce: 0 }, 0);
    }
    m
}

/// The replay and the judges of every port.
#[derive(Default)]
pub(super) struct Checker {
    pub(super) out: Out,
    replay: Replay,
    judges: BTreeMap<String, Judge>,
}

impl Checker {
    /// Folds one record into the replay and judges the step.
    pub(super) fn observe(&mut self, r: &Record) {
        if let Some(applied) = self.replay.apply(r) {
            self.judges.entry(r.port.clone()).or_default().judge(r, &applied, &mut self.out);
        }
    }

    /// Writes a note for every sample/event disagreement whose deadline passed before `now`.
    pub(super) fn expire_pending(&mut self, now: u64) {
        for (name, judge) in &mut self.judges {
            if let Some(x) = judge.pending.take_if(|x| now > x.deadline) {
                let detail = format!(
                    "frontend_open open={} (#{}) disagrees with the last VSERPORT_CHANGE (#{}), and no \
                     VSERPORT_CHANGE followed within the throttle window: an event was lost or not recorded",
                    x.open, x.sample, x.event
                );
                self.out.note(NoteKind::UnreconciledQmpLevel, name, &[Some(x.event), Some(x.sample)], detail);
            }
        }
    }

    pub(super) fn finish(mut self, records: usize) -> CheckReport {
        for judge in self.judges.values_mut() {
            judge.close_data_run(&mut self.out);
        }
        let mut ports: Vec<PortSummary> = self.replay.ports().iter().map(summary).collect();
        ports.sort_by(|a, b| a.port.cmp(&b.port));
        for s in &mut ports {
            s.violations = self.out.violations.iter().filter(|v| v.port == s.port).count() as u64;
        }
        CheckReport { records, violations: self.out.violations, notes: self.out.notes, ports }
    }
}

/// What the replay says about one port at the end of the trace.
fn summary(p: &PortReplay) -> PortSummary {
    PortSummary {
        port: p.port().to_string(),
        counts: *p.counts(),
        host_connected: p.host_connected(),
        state: p.phase(),
        session: p.session(),
        guest_open: p.frontend_open(),
        agent_state: p.marks().agent.map(|a| a.to),
        violations: 0,
    }
}
