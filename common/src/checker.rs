//! The life-cycle checker: judges a trace ([`crate::trace`]) against the port life cycle and
//! names, for every violation, the rule and the records (`seq`) involved.
//!
//! Pure: the records are data, time is their `t_ns`; nothing here reads a clock or a file.
//!
//! # How records are read
//!
//! - Host, QMP and rig records are taken in `t_ns` order (ties in file order): a QMP event is
//!   stamped with its receipt time but may be written after later endpoint records.
//! - Agent transition records are a separate stream, checked among themselves in file order
//!   (which is the agent's order: the recorder appends them as EVENTS returns them). Their
//!   `t_ns` is an estimate (±RTT/2), too coarse to interleave with the host's own records.
//!
//! # Rules
//!
//! See [`Rule`] for the list. The in-band session (HELLO, HELLO_ACK, BYE, host disconnect)
//! is modelled with [`PortMachine`], the same state machine the agent runs, so "legal" means
//! the same thing on both sides. QMP `VSERPORT_CHANGE` is only a level hint: QEMU throttles it
//! to one event per second per port (the first at once, later ones in the window replaced by
//! the latest), so two events with the same `open` in a row are expected. They become
//! [`NoteKind::CoalescedVserportChange`] notes, never violations. `frontend_open` samples are
//! reconciled with the events: a sample disagreeing with the last event must be followed by an
//! event within the throttle window ([`THROTTLE_NS`] + [`RECONCILE_SLACK_NS`]); otherwise a
//! [`NoteKind::UnreconciledQmpLevel`] note is written (a QEMU or recorder problem, not the
//! guest's).
//!
//! The checker is deliberately conservative about the guest side: a race between two observers
//! (QMP thread, endpoint thread) must not become a violation, so only evidence that cannot
//! race is used for violations, and everything else is a note.

use crate::lifecycle::{PortEvent, PortMachine, PortState, TransitionError};
use crate::trace::{Direction, Kind, Record, TraceState};
use serde::Serialize;
use std::collections::BTreeMap;

/// QEMU's `VSERPORT_CHANGE` rate limit: one event per second per port id.
pub const THROTTLE_NS: u64 = 1_000_000_000;
/// Extra time allowed, after the throttle window, for a `VSERPORT_CHANGE` to arrive (QMP
/// delivery and the recorder's own latency).
pub const RECONCILE_SLACK_NS: u64 = 500_000_000;

/// A rule of the port life cycle. Its name (kebab-case) is what reports print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Record numbers increase in file order (they are how every other rule names records).
    RecordNumbering,
    /// Host connect and disconnect alternate per port: a disconnect needs a connection.
    HostAlternation,
    /// No duplicate OPENED: a second host connect without a disconnect in between, or one
    /// session id offered twice with different nonces. (A HELLO repeated with the same session
    /// and nonce is the protocol's answer to HELLO_REQUEST, and legal.)
    DuplicateOpened,
    /// Guest close announcements (BYE) alternate with opens: a second BYE needs a reopen (the
    /// HELLO of a new session) in between, and a BYE needs the session it names to be open.
    GuestAlternation,
    /// READY only from CONNECTED: HELLO_ACK only for the pending offer (same session and nonce,
    /// not yet acknowledged); an agent transition to READY only from CONNECTED.
    ReadyOnlyFromConnected,
    /// Session data only while that session is READY.
    NoDataOutsideReady,
    /// In-band messages (HELLO, HELLO_ACK, HELLO_REQUEST, BYE) only while the host endpoint is
    /// connected: they travel over that connection.
    InBandWithoutHost,
    /// Each agent transition starts in the state the previous one (of consecutive agent record
    /// numbers) ended in.
    AgentContinuity,
    /// An agent record that is no transition of the life cycle (DISCONNECTED -> DISCONNECTED, a
    /// new session with the old id, session 0 while attached).
    AgentTransition,
}

impl Rule {
    /// Every rule, in report order.
    pub const ALL: [Rule; 9] = [
        Rule::RecordNumbering,
        Rule::HostAlternation,
        Rule::DuplicateOpened,
        Rule::GuestAlternation,
        Rule::ReadyOnlyFromConnected,
        Rule::NoDataOutsideReady,
        Rule::InBandWithoutHost,
        Rule::AgentContinuity,
        Rule::AgentTransition,
    ];

    /// The rule's name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            Rule::RecordNumbering => "record-numbering",
            Rule::HostAlternation => "host-alternation",
            Rule::DuplicateOpened => "duplicate-opened",
            Rule::GuestAlternation => "guest-alternation",
            Rule::ReadyOnlyFromConnected => "ready-only-from-connected",
            Rule::NoDataOutsideReady => "no-data-outside-ready",
            Rule::InBandWithoutHost => "in-band-without-host",
            Rule::AgentContinuity => "agent-continuity",
            Rule::AgentTransition => "agent-transition",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which rule.
    pub rule: Rule,
    /// The port (empty for a record-numbering problem with no port).
    pub port: String,
    /// The records involved (`seq`), ascending: the offending record and the one(s) that made
    /// it illegal (the earlier connect, the pending HELLO, the record that ended the session).
    pub records: Vec<u64>,
    /// What happened, in words.
    pub detail: String,
}

/// Writes `#a, #b`.
fn write_records(f: &mut std::fmt::Formatter<'_>, records: &[u64]) -> std::fmt::Result {
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "#{r}")?;
    }
    Ok(())
}

impl std::fmt::Display for Violation {
    /// `violation: <rule>: records #a, #b: port <port>: <detail>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "violation: {}: records ", self.rule)?;
        write_records(f, &self.records)?;
        write!(f, ": port {}: {}", self.port, self.detail)
    }
}

/// What a note is about. Notes are observations worth knowing that break no rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoteKind {
    /// Two `VSERPORT_CHANGE` with the same `open` in a row: QEMU's throttle coalesced the
    /// changes in between (or a reset, migration or resume replayed the level).
    CoalescedVserportChange,
    /// A `frontend_open` sample disagreed with the last `VSERPORT_CHANGE`, and no event
    /// followed within the throttle window.
    UnreconciledQmpLevel,
    /// A new session replaced a live one with no HELLO_REQUEST after READY, reconnect or BYE
    /// seen: the agent restarted, or the guest reopened the port without a BYE.
    UnexplainedNewSession,
    /// Agent record numbers jump: the agent's ring dropped records before they were fetched.
    AgentRecordsMissing,
    /// An agent record number that is not after the previous one (fetched twice); ignored.
    AgentRecordRepeated,
}

impl NoteKind {
    /// The note kind's name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            NoteKind::CoalescedVserportChange => "coalesced-vserport-change",
            NoteKind::UnreconciledQmpLevel => "unreconciled-qmp-level",
            NoteKind::UnexplainedNewSession => "unexplained-new-session",
            NoteKind::AgentRecordsMissing => "agent-records-missing",
            NoteKind::AgentRecordRepeated => "agent-record-repeated",
        }
    }
}

impl std::fmt::Display for NoteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An observation that breaks no rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    /// What it is about.
    pub kind: NoteKind,
    /// The port.
    pub port: String,
    /// The records involved, ascending.
    pub records: Vec<u64>,
    /// In words.
    pub detail: String,
}

impl std::fmt::Display for Note {
    /// `note: <kind>: records #a, #b: port <port>: <detail>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "note: {}: records ", self.kind)?;
        write_records(f, &self.records)?;
        write!(f, ": port {}: {}", self.port, self.detail)
    }
}

/// What the trace says about one port, counted over the whole trace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortSummary {
    /// The port's name.
    pub port: String,
    /// Records about this port.
    pub records: u64,
    /// Host connects.
    pub host_connects: u64,
    /// Host disconnects.
    pub host_disconnects: u64,
    /// Whether the host endpoint is connected at the end.
    pub host_connected: bool,
    /// Sessions offered (HELLOs of a new session).
    pub sessions: u64,
    /// HELLOs repeated for the pending session (answers to HELLO_REQUEST).
    pub hello_repeats: u64,
    /// HELLO_REQUESTs sent.
    pub hello_requests: u64,
    /// Sessions that became READY.
    pub ready: u64,
    /// BYEs received.
    pub byes: u64,
    /// Data records.
    pub data_records: u64,
    /// Bytes host to guest (all data records).
    pub bytes_h2g: u64,
    /// Bytes guest to host (all data records).
    pub bytes_g2h: u64,
    /// The in-band session state at the end: `DISCONNECTED`, `CONNECTED` or `READY`.
    pub state: String,
    /// The session id at the end, if any.
    pub session: Option<u32>,
    /// `VSERPORT_CHANGE` events.
    pub vserport_changes: u64,
    /// Of those, repeats of the previous level (throttle coalescing).
    pub coalesced: u64,
    /// `frontend_open` samples.
    pub frontend_samples: u64,
    /// The last `frontend_open` sample, if any: QEMU's view of whether the guest has it open.
    pub guest_open: Option<bool>,
    /// Agent transition records.
    pub agent_transitions: u64,
    /// The agent's state after its last record, if any.
    pub agent_state: Option<TraceState>,
    /// Violations about this port.
    pub violations: u64,
}

/// The checker's verdict on a trace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Records read.
    pub records: usize,
    /// Broken rules, in the order found (main pass, then agent records).
    pub violations: Vec<Violation>,
    /// Observations that break no rule.
    pub notes: Vec<Note>,
    /// One summary per port, by name.
    pub ports: Vec<PortSummary>,
}

impl CheckReport {
    /// True when no rule is broken (notes do not count).
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// The violations of one rule.
    pub fn of_rule(&self, rule: Rule) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(move |v| v.rule == rule)
    }
}

/// Checks `records` (a whole trace, in file order). Never fails: every problem is a
/// [`Violation`] or a [`Note`] in the report.
pub fn check(records: &[Record]) -> CheckReport {
    let mut c = Checker::default();
    let mut prev: Option<&Record> = None;
    for r in records {
        if let Some(p) = prev {
            if r.seq <= p.seq {
                c.out.violation(
                    Rule::RecordNumbering,
                    &r.port,
                    &[Some(p.seq), Some(r.seq)],
                    format!("record #{} follows record #{}: record numbers must increase", r.seq, p.seq),
                );
            }
        }
        prev = Some(r);
    }
    let mut main: Vec<&Record> = records.iter().filter(|r| !matches!(r.kind, Kind::AgentTransition { .. })).collect();
    main.sort_by_key(|r| r.t_ns);
    for r in main {
        c.expire_pending(r.t_ns);
        c.observe(r);
    }
    for r in records.iter().filter(|r| matches!(r.kind, Kind::AgentTransition { .. })) {
        c.agent(r);
    }
    c.finish(records.len())
}

#[derive(Default)]
struct Out {
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
    fn violation(&mut self, rule: Rule, port: &str, records: &[Option<u64>], detail: String) -> usize {
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

struct AgentTrack {
    seq: u64,
    agent_seq: u64,
    to: TraceState,
    session: u32,
}

#[derive(Default)]
struct PortCheck {
    /// The host connect of the current connection.
    host: Option<u64>,
    last_disconnect: Option<u64>,
    /// The in-band session, as the host sees it.
    machine: PortMachine,
    /// The record that put `machine` in its current state.
    state_since: Option<u64>,
    /// The first HELLO of the current session.
    hello: Option<u64>,
    /// The HELLO_ACK of the current session.
    ack: Option<u64>,
    /// A HELLO_REQUEST was sent after the current session became READY.
    request_since_ack: bool,
    data_run: Option<DataRun>,
    /// The last BYE, until the HELLO of a new session shows the guest open again. (QMP
    /// records do not count: they race with the endpoint's reads.)
    guest_closed_by: Option<u64>,
    /// The last VSERPORT_CHANGE: seq, open, t_ns.
    vserport: Option<(u64, bool, u64)>,
    pending: Option<Pending>,
    agent: Option<AgentTrack>,
    sum: PortSummary,
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

impl PortCheck {
    /// The in-band state changed at record `seq`.
    fn set_state(&mut self, seq: u64, out: &mut Out) {
        self.state_since = Some(seq);
        self.close_data_run(out);
    }

    fn close_data_run(&mut self, out: &mut Out) {
        if let Some(run) = self.data_run.take() {
            if run.more > 0 {
                if let Some(v) = out.violations.get_mut(run.violation) {
                    v.detail.push_str(&format!("; {} more such data records, the last #{}", run.more, run.last));
                }
            }
        }
    }

    /// Steps the in-band machine; an illegal event is a violation naming `seq` and `context`.
    fn step(&mut self, ev: PortEvent, r: &Record, context: Option<u64>, out: &mut Out) -> bool {
        match self.machine.step(ev, r.t_ns) {
            Ok(_) => {
                self.set_state(r.seq, out);
                true
            }
            Err(e) => {
                let detail = format!("{} in {}: {e}", r.kind, session_text(self.machine.state()));
                out.violation(rule_for(&e), &r.port, &[context, Some(r.seq)], detail);
                false
            }
        }
    }

    fn need_host(&self, r: &Record, out: &mut Out) {
        if self.host.is_none() {
            let detail = format!("{} while the host endpoint is not connected", r.kind);
            out.violation(Rule::InBandWithoutHost, &r.port, &[self.last_disconnect, Some(r.seq)], detail);
        }
    }

    fn observe(&mut self, r: &Record, out: &mut Out) {
        let seq = r.seq;
        let port = r.port.as_str();
        match &r.kind {
            Kind::HostConnect => {
                self.sum.host_connects += 1;
                match self.host {
                    Some(prev) => {
                        let detail = format!("host connect while connected since #{prev} (a duplicate OPENED)");
                        out.violation(Rule::DuplicateOpened, port, &[Some(prev), Some(seq)], detail);
                    }
                    None => self.host = Some(seq),
                }
            }
            Kind::HostDisconnect { .. } => {
                self.sum.host_disconnects += 1;
                if self.host.take().is_none() {
                    let detail = match self.last_disconnect {
                        Some(d) => format!("host disconnect while not connected (disconnected at #{d})"),
                        None => "host disconnect with no host connect before it".to_string(),
                    };
                    out.violation(Rule::HostAlternation, port, &[self.last_disconnect, Some(seq)], detail);
                } else if self.machine.state() != PortState::Disconnected {
                    self.step(PortEvent::HostDisconnected, r, None, out);
                    self.hello = None;
                    self.ack = None;
                }
                self.last_disconnect = Some(seq);
            }
            Kind::Hello { session, nonce } => {
                self.need_host(r, out);
                self.guest_closed_by = None;
                let (session, nonce) = (*session, *nonce);
                match self.machine.state() {
                    PortState::Disconnected => {
                        if self.step(PortEvent::HostConnected { session, nonce }, r, None, out) {
                            self.new_session(seq);
                        }
                    }
                    PortState::Connected { session: s, nonce: n } | PortState::Ready { session: s, nonce: n }
                        if s == session =>
                    {
                        if n == nonce {
                            self.sum.hello_repeats += 1;
                        } else {
                            let detail = format!(
                                "session {s:#010x} offered again with nonce {nonce:#x}; it was offered with nonce {n:#x}"
                            );
                            out.violation(Rule::DuplicateOpened, port, &[self.hello, Some(seq)], detail);
                        }
                    }
                    state => {
                        let explained = matches!(state, PortState::Ready { .. }) && self.request_since_ack;
                        if !explained {
                            let detail = format!(
                                "session {session:#010x} replaced {} with no HELLO_REQUEST after READY, reconnect or \
                                 BYE (agent restarted, or the guest reopened the port without BYE)",
                                session_text(state)
                            );
                            out.note(NoteKind::UnexplainedNewSession, port, &[self.hello, Some(seq)], detail);
                        }
                        if self.step(PortEvent::NewSession { session, nonce }, r, self.hello, out) {
                            self.new_session(seq);
                        }
                    }
                }
            }
            Kind::HelloAck { session, nonce } => {
                self.need_host(r, out);
                match self.machine.state() {
                    PortState::Connected { session: s, .. } if s != *session => {
                        let detail = format!(
                            "hello ack for session {session:#010x}, but the offered session is {s:#010x}: READY only \
                             from CONNECTED of the same session"
                        );
                        out.violation(Rule::ReadyOnlyFromConnected, port, &[self.hello, Some(seq)], detail);
                    }
                    state => {
                        let context = match state {
                            PortState::Connected { .. } => self.hello,
                            PortState::Ready { .. } => self.ack,
                            PortState::Disconnected => self.state_since,
                        };
                        if self.step(PortEvent::HelloAcked { nonce: *nonce }, r, context, out) {
                            self.ack = Some(seq);
                            self.request_since_ack = false;
                            self.sum.ready += 1;
                        }
                    }
                }
            }
            Kind::HelloRequest => {
                self.need_host(r, out);
                self.sum.hello_requests += 1;
                if matches!(self.machine.state(), PortState::Ready { .. }) {
                    self.request_since_ack = true;
                }
            }
            Kind::Data { dir, bytes, session } => {
                self.sum.data_records += 1;
                match dir {
                    Direction::HostToGuest => self.sum.bytes_h2g = self.sum.bytes_h2g.saturating_add(*bytes),
                    Direction::GuestToHost => self.sum.bytes_g2h = self.sum.bytes_g2h.saturating_add(*bytes),
                }
                match self.machine.state() {
                    PortState::Ready { session: s, .. } if s == *session => {}
                    state => match &mut self.data_run {
                        Some(run) => {
                            run.more += 1;
                            run.last = seq;
                        }
                        None => {
                            let since = match self.state_since {
                                Some(s) => format!(" since #{s}"),
                                None => String::new(),
                            };
                            let detail = format!(
                                "{} data ({bytes} bytes) of session {session:#010x} while the port is {}{since}",
                                dir.name(),
                                session_text(state)
                            );
                            let violation =
                                out.violation(Rule::NoDataOutsideReady, port, &[self.state_since, Some(seq)], detail);
                            self.data_run = Some(DataRun { violation, more: 0, last: seq });
                        }
                    },
                }
            }
            Kind::Bye { session, .. } => {
                self.need_host(r, out);
                self.sum.byes += 1;
                if let Some(prev) = self.guest_closed_by {
                    let detail = format!("bye (a guest close) again with no sign of a reopen since bye #{prev}");
                    out.violation(Rule::GuestAlternation, port, &[Some(prev), Some(seq)], detail);
                } else {
                    match self.machine.state() {
                        PortState::Connected { session: s, .. } | PortState::Ready { session: s, .. }
                            if s == *session => {}
                        state => {
                            let detail = format!("bye for session {session:#010x} while {}", session_text(state));
                            out.violation(Rule::GuestAlternation, port, &[self.state_since, Some(seq)], detail);
                        }
                    }
                    if self.machine.state() != PortState::Disconnected {
                        self.step(PortEvent::Closed, r, None, out);
                        self.hello = None;
                        self.ack = None;
                    }
                }
                self.guest_closed_by = Some(seq);
            }
            Kind::VserportChange { open, .. } => {
                self.sum.vserport_changes += 1;
                if let Some((prev, prev_open, prev_t)) = self.vserport {
                    if prev_open == *open {
                        self.sum.coalesced += 1;
                        let gap_ms = r.t_ns.saturating_sub(prev_t) / 1_000_000;
                        let detail = format!(
                            "VSERPORT_CHANGE open={open} twice in a row ({gap_ms} ms apart): QEMU's one-per-second \
                             throttle replaced the changes in between (or a reset, migration or resume replayed \
                             the level); a level hint, not a guest violation"
                        );
                        out.note(NoteKind::CoalescedVserportChange, port, &[Some(prev), Some(seq)], detail);
                    }
                }
                // QEMU reported a change: whatever a sample saw in between is accounted for.
                self.pending = None;
                self.vserport = Some((seq, *open, r.t_ns));
            }
            Kind::FrontendOpen { open } => {
                self.sum.frontend_samples += 1;
                self.sum.guest_open = Some(*open);
                match self.vserport {
                    Some((event, event_open, event_t)) if event_open != *open => {
                        if self.pending.is_none() {
                            let deadline =
                                event_t.saturating_add(THROTTLE_NS).max(r.t_ns).saturating_add(RECONCILE_SLACK_NS);
                            self.pending = Some(Pending { sample: seq, open: *open, event, deadline });
                        }
                    }
                    _ => self.pending = None,
                }
            }
            Kind::Note { .. } | Kind::AgentTransition { .. } => {}
        }
    }

    fn new_session(&mut self, seq: u64) {
        self.hello = Some(seq);
        self.ack = None;
        self.request_since_ack = false;
        self.sum.sessions += 1;
    }

    fn agent(&mut self, r: &Record, out: &mut Out) {
        let Kind::AgentTransition { from, to, session, agent_seq, .. } = &r.kind else {
            return;
        };
        let (from, to, session, agent_seq) = (*from, *to, *session, *agent_seq);
        let port = r.port.as_str();
        self.sum.agent_transitions += 1;
        let mut from_session = session;
        if let Some(prev) = &self.agent {
            if agent_seq <= prev.agent_seq {
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
                    "agent transition {} -> {} starts in {}, but the previous agent record ended in {}",
                    from.name(),
                    to.name(),
                    from.name(),
                    prev.to.name()
                );
                out.violation(Rule::AgentContinuity, port, &[Some(prev.seq), Some(r.seq)], detail);
            } else {
                from_session = prev.session;
            }
        }
        let mut m = machine_in(from, from_session);
        let what = format!("agent transition {} -> {}", from.name(), to.name());
        let mut bad = |rule: Rule, detail: String| {
            out.violation(rule, port, &[Some(r.seq)], format!("{what}: {detail}"));
        };
        if to != TraceState::Disconnected && session == 0 {
            bad(Rule::AgentTransition, "session 0 is no session".to_string());
        }
        let result = match (from, to) {
            (TraceState::Disconnected, TraceState::Disconnected) => m.step(PortEvent::HostDisconnected, r.t_ns),
            (_, TraceState::Disconnected) => m.step(PortEvent::Closed, r.t_ns),
            (TraceState::Disconnected, TraceState::Connected) => {
                m.step(PortEvent::HostConnected { session, nonce: 0 }, r.t_ns)
            }
            (_, TraceState::Connected) => {
                if session == from_session {
                    bad(Rule::AgentTransition, format!("a new session must have a new id, got {session:#010x} again"));
                }
                m.step(PortEvent::NewSession { session, nonce: 0 }, r.t_ns)
            }
            (_, TraceState::Ready) => {
                if from == TraceState::Connected && session != from_session {
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
            bad(rule_for_agent(from, to), e);
        }
        self.agent = Some(AgentTrack { seq: r.seq, agent_seq, to, session });
        self.sum.agent_state = Some(to);
    }
}

fn rule_for_agent(from: TraceState, to: TraceState) -> Rule {
    match (from, to) {
        (_, TraceState::Ready) => Rule::ReadyOnlyFromConnected,
        _ => Rule::AgentTransition,
    }
}

/// A machine in `state` (nonce 0: agent records carry no nonce).
fn machine_in(state: TraceState, session: u32) -> PortMachine {
    let mut m = PortMachine::new();
    if state != TraceState::Disconnected {
        let _ = m.step(PortEvent::HostConnected { session, nonce: 0 }, 0);
    }
    if state == TraceState::Ready {
        let _ = m.step(PortEvent::HelloAcked { nonce: 0 }, 0);
    }
    m
}

#[derive(Default)]
struct Checker {
    out: Out,
    ports: BTreeMap<String, PortCheck>,
}

impl Checker {
    fn port(&mut self, name: &str) -> &mut PortCheck {
        self.ports.entry(name.to_string()).or_insert_with(|| PortCheck {
            sum: PortSummary { port: name.to_string(), ..PortSummary::default() },
            ..PortCheck::default()
        })
    }

    fn observe(&mut self, r: &Record) {
        if r.port.is_empty() && matches!(r.kind, Kind::Note { .. }) {
            return;
        }
        let out = &mut self.out;
        let p = self.ports.entry(r.port.clone()).or_insert_with(|| PortCheck {
            sum: PortSummary { port: r.port.clone(), ..PortSummary::default() },
            ..PortCheck::default()
        });
        p.sum.records += 1;
        p.observe(r, out);
    }

    fn agent(&mut self, r: &Record) {
        self.port(&r.port).sum.records += 1;
        let out = &mut self.out;
        if let Some(p) = self.ports.get_mut(&r.port) {
            p.agent(r, out);
        }
    }

    /// Writes a note for every sample/event disagreement whose deadline passed before `now`.
    fn expire_pending(&mut self, now: u64) {
        for (name, p) in &mut self.ports {
            if p.pending.as_ref().is_some_and(|x| now > x.deadline) {
                if let Some(x) = p.pending.take() {
                    let detail = format!(
                        "frontend_open open={} (#{}) disagrees with the last VSERPORT_CHANGE (#{}), and no \
                         VSERPORT_CHANGE followed within the throttle window: an event was lost or not recorded",
                        x.open, x.sample, x.event
                    );
                    self.out.note(NoteKind::UnreconciledQmpLevel, name, &[Some(x.event), Some(x.sample)], detail);
                }
            }
        }
    }

    fn finish(mut self, records: usize) -> CheckReport {
        let mut ports = Vec::new();
        for (_, mut p) in std::mem::take(&mut self.ports) {
            p.close_data_run(&mut self.out);
            p.sum.host_connected = p.host.is_some();
            p.sum.state = p.machine.state().name().to_string();
            p.sum.session = p.machine.state().session();
            ports.push(p.sum);
        }
        for s in &mut ports {
            s.violations = self.out.violations.iter().filter(|v| v.port == s.port).count() as u64;
        }
        CheckReport { records, violations: self.out.violations, notes: self.out.notes, ports }
    }
}
