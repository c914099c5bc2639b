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
//! See [`Rule`] for the list. The records are folded by [`crate::replay`] (the same replay
//! `vport watch` shows), and each of its steps is judged here against the state before it. The
//! in-band session (HELLO, HELLO_ACK, BYE, host disconnect) is modelled there with
//! [`PortMachine`](crate::lifecycle::PortMachine), the same state machine the agent runs, so
//! "legal" means the same thing on both sides. QMP `VSERPORT_CHANGE` is only a level hint: QEMU throttles it
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

use crate::phase::Phase;
use crate::replay::Counts;
use crate::trace::{Kind, Record};
use serde::Serialize;

mod judge;

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

/// What the trace says about one port, counted over the whole trace: the replay's counts
/// ([`Counts`], written as fields of this object) and its state at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortSummary {
    /// The port's name.
    pub port: String,
    /// What the port's records add up to.
    #[serde(flatten)]
    pub counts: Counts,
    /// Whether the host endpoint is connected at the end.
    pub host_connected: bool,
    /// The in-band session's phase at the end (written `DISCONNECTED`, `CONNECTED` or `READY`).
    pub state: Phase,
    /// The session id at the end, if any.
    pub session: Option<u32>,
    /// The last `frontend_open` sample, if any: QEMU's view of whether the guest has it open.
    pub guest_open: Option<bool>,
    /// The agent's phase after its last record, if any.
    pub agent_state: Option<Phase>,
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
    let mut c = judge::Checker::default();
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
        c.observe(r);
    }
    c.finish(records.len())
}
