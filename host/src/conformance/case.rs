//! What a case is: its static description ([`CaseDef`]) joined to its code ([`Case`]), what
//! its code returns ([`Observation`]) and why it could not complete ([`CaseError`]).

use crate::report::Verdict;
use serde::Serialize;
use thiserror::Error;

/// Static description of a case.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CaseDef {
    /// Stable case name (`kebab-case`), also the JUnit and e2e test name.
    pub name: &'static str,
    /// The VM group the case runs in.
    pub group: &'static str,
    /// The spec row it checks (with the source function that decides it).
    pub spec: &'static str,
    /// The outcome the spec predicts.
    pub expected: &'static str,
}

/// A case: its description and its code, which runs against the state `S` its group set up
/// (the VM, the links) and leaves that state for the next case. A case cannot exist without
/// its code, and the suite runs exactly the cases its groups hold.
pub struct Case<S> {
    /// The description.
    pub def: CaseDef,
    /// The code: observes the VM and says what it saw.
    pub run: fn(&mut S) -> Result<Observation, CaseError>,
}

impl<S> Case<S> {
    /// The case `name` of group `group`, checking `spec`, expecting `expected`, run by `run`.
    pub const fn new(
        group: &'static str,
        name: &'static str,
        spec: &'static str,
        expected: &'static str,
        run: fn(&mut S) -> Result<Observation, CaseError>,
    ) -> Self {
        Case { def: CaseDef { name, group, spec, expected }, run }
    }
}

/// What a case's code returns: its verdict, what it saw, and (QUIRK) why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// PASS, FAIL or QUIRK.
    pub verdict: Verdict,
    /// What the VM did.
    pub observed: String,
    /// QUIRK explanation (empty otherwise).
    pub note: String,
}

impl Observation {
    /// PASS when `ok`, else FAIL, with `observed`.
    pub fn check(ok: bool, observed: impl Into<String>) -> Self {
        Observation {
            verdict: if ok { Verdict::Pass } else { Verdict::Fail },
            observed: observed.into(),
            note: String::new(),
        }
    }

    /// QUIRK with `observed` and the explanation `note`.
    pub fn quirk(observed: impl Into<String>, note: impl Into<String>) -> Self {
        Observation { verdict: Verdict::Quirk, observed: observed.into(), note: note.into() }
    }
}

/// Why a case could not complete, or why a group could not be set up.
#[derive(Debug, Error)]
pub enum CaseError {
    /// The rig failed (QEMU start, QMP, chardev).
    #[error("rig: {0}")]
    Rig(#[from] crate::rig::RigError),
    /// A link request failed.
    #[error("link: {0}")]
    Link(#[from] crate::link::LinkError),
    /// A session request failed, or the session ended.
    #[error("session: {0}")]
    Session(#[from] crate::session::SessionError),
    /// A QMP command failed.
    #[error("qmp: {0}")]
    Qmp(#[from] crate::qmp::QmpError),
    /// A deadline-bounded wait failed.
    #[error("wait: {0}")]
    Wait(#[from] crate::wait::WaitError),
    /// The group's trace file could not be created.
    #[error("trace: {0}")]
    Trace(#[from] crate::timeline::TimelineError),
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}

/// Flattens an error and its sources into one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
