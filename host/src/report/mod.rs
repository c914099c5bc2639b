//! One typed run-event stream, reported three ways (cargo-nextest is the example): a suite
//! (the conformance suite today, the faults and bench suites to come) emits [`RunEvent`]s as
//! it runs; [`RunReport::apply`] folds them into the run's report, and that report is rendered
//! as human text ([`human`]: the matrix, and one progress line per event), as JSON ([`json`])
//! and as JUnit XML ([`junit`]). The exit code of a run comes from the one table,
//! [`crate::exit::ExitCode`], through [`RunReport::exit_code`].
//!
//! Verdicts: PASS (the VM did what the spec says), FAIL (it did not, or the case's life-cycle
//! trace breaks a rule of the checker), QUIRK (the VM consistently differs from the spec in a
//! way the suite explains: the note says what and why), ERROR (the case itself could not
//! complete: a link or QMP failure), NOT RUN (its group's VM was unavailable).

pub mod human;
pub mod json;
pub mod junit;

use crate::exit::ExitCode;
use serde::Serialize;
use std::time::Duration;
use vport_common::checker::Violation;

/// What a case concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// As the spec says, and the case's trace is clean.
    Pass,
    /// Not as the spec says, or the case's trace breaks a life-cycle rule.
    Fail,
    /// Consistently different from the spec, explained in the case's note.
    Quirk,
    /// The case could not complete (link, QMP or VM trouble during the case).
    Error,
    /// The case's VM group could not be set up (infrastructure error).
    NotRun,
}

impl Verdict {
    /// Upper-case label for the matrix.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Quirk => "QUIRK",
            Verdict::Error => "ERROR",
            Verdict::NotRun => "NOT RUN",
        }
    }

    /// Whether the verdict lets the run succeed (PASS, or an explained QUIRK).
    pub fn is_success(self) -> bool {
        matches!(self, Verdict::Pass | Verdict::Quirk)
    }
}

/// The life-cycle checker's verdict on the records a case added to its group's trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum TraceVerdict {
    /// No trace was judged: the case did not run.
    NotRecorded,
    /// No rule is broken by the case's records.
    Clean {
        /// The case's first record (`seq`) in its group's trace.
        first_record: u64,
        /// How many records the case added.
        records: u64,
        /// Notes about them (observations that break no rule).
        notes: usize,
    },
    /// Rules are broken; each violation names its records.
    Violations {
        /// The case's first record (`seq`) in its group's trace.
        first_record: u64,
        /// How many records the case added.
        records: u64,
        /// Notes about them.
        notes: usize,
        /// The broken rules, with their records.
        violations: Vec<Violation>,
    },
}

impl TraceVerdict {
    /// The violations (empty unless [`TraceVerdict::Violations`]).
    pub fn violations(&self) -> &[Violation] {
        match self {
            TraceVerdict::Violations { violations, .. } => violations,
            _ => &[],
        }
    }

    /// Short form for the matrix: `clean`, `2 violations`, `-`.
    pub fn short(&self) -> String {
        match self {
            TraceVerdict::NotRecorded => "-".into(),
            TraceVerdict::Clean { .. } => "clean".into(),
            TraceVerdict::Violations { violations, .. } => match violations.len() {
                1 => "1 violation".into(),
                n => format!("{n} violations"),
            },
        }
    }
}

/// One case's result.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case name (`kebab-case`), also the JUnit test name.
    pub name: String,
    /// The group (VM boot) it ran in.
    pub group: String,
    /// The spec row it checks.
    pub spec: String,
    /// The outcome the spec predicts.
    pub expected: String,
    /// What the VM did.
    pub observed: String,
    /// Verdict.
    pub verdict: Verdict,
    /// For QUIRK: what differs and why; for FAIL by the trace, ERROR and NOT RUN: why.
    pub note: String,
    /// The checker's verdict on the case's part of the group's trace.
    pub trace: TraceVerdict,
    /// How long the case took.
    #[serde(serialize_with = "ser_secs")]
    pub duration: Duration,
}

/// An infrastructure error of a group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupError {
    /// Group name.
    pub group: String,
    /// The error, with its causes.
    pub error: String,
}

/// What the run found out about the machine it ran on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Environment {
    /// QEMU version (`7.2.19 (Debian ...)`), or `unknown`.
    pub qemu_version: String,
    /// Guest kernel release from the agent's HELLO, or `unknown`.
    pub kernel_release: String,
    /// Accelerator QEMU ran with (`tcg`, `kvm`), or `unknown`.
    pub accel: String,
}

impl Default for Environment {
    fn default() -> Self {
        Environment { qemu_version: "unknown".into(), kernel_release: "unknown".into(), accel: "unknown".into() }
    }
}

/// What a suite reports while it runs, in this order: `RunStarted`; per group `GroupStarted`,
/// then per case `CaseStarted` and `CaseFinished` (a group whose set-up fails: `GroupFailed`
/// and a `CaseFinished` NOT RUN for each of its cases not finished yet); `RunFinished`.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// The run begins.
    RunStarted {
        /// The suite (`conformance`).
        suite: String,
        /// How many cases are selected.
        cases: usize,
    },
    /// A group's VM is being set up.
    GroupStarted {
        /// Group name.
        group: String,
        /// Selected cases in the group.
        cases: usize,
    },
    /// A case begins.
    CaseStarted {
        /// Group name.
        group: String,
        /// Case name.
        name: String,
    },
    /// A long case's progress (a soak's cycles): `done` of `total` steps so far.
    CaseProgress {
        /// Case name.
        name: String,
        /// Steps done.
        done: u64,
        /// Steps in all.
        total: u64,
    },
    /// A case ended (or was found NOT RUN).
    CaseFinished(CaseResult),
    /// A group could not be set up; its cases are NOT RUN.
    GroupFailed(GroupError),
    /// The run ended.
    RunFinished {
        /// The machine the run found.
        environment: Environment,
        /// Wall time of the run.
        elapsed: Duration,
    },
}

/// A run's report: the fold of its [`RunEvent`]s ([`RunReport::apply`]). Serialised as the
/// JSON report ([`json::render_json`]).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The suite.
    pub suite: String,
    /// QEMU version, or `unknown`.
    pub qemu_version: String,
    /// Guest kernel release, or `unknown`.
    pub kernel_release: String,
    /// Accelerator, or `unknown`.
    pub accel: String,
    /// Every finished case, in the order the suite finished them (its table order).
    pub cases: Vec<CaseResult>,
    /// Groups that could not be set up.
    pub infra_errors: Vec<GroupError>,
    /// Wall time of the run.
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Duration,
    /// The speed factor the run's failure deadlines were stretched by ([`crate::speed`]).
    pub speed_factor: f64,
}

impl RunReport {
    /// An empty report of `suite`.
    pub fn new(suite: &str) -> RunReport {
        let env = Environment::default();
        RunReport {
            suite: suite.into(),
            qemu_version: env.qemu_version,
            kernel_release: env.kernel_release,
            accel: env.accel,
            cases: Vec::new(),
            infra_errors: Vec::new(),
            elapsed: Duration::ZERO,
            speed_factor: crate::speed::get().get(),
        }
    }

    /// The report of a whole event stream.
    pub fn from_events<'a>(suite: &str, events: impl IntoIterator<Item = &'a RunEvent>) -> RunReport {
        let mut r = RunReport::new(suite);
        for ev in events {
            r.apply(ev);
        }
        r
    }

    /// Takes one event into the report.
    pub fn apply(&mut self, ev: &RunEvent) {
        match ev {
            RunEvent::RunStarted { suite, .. } => self.suite.clone_from(suite),
            RunEvent::GroupStarted { .. } | RunEvent::CaseStarted { .. } | RunEvent::CaseProgress { .. } => {}
            RunEvent::CaseFinished(c) => self.cases.push(c.clone()),
            RunEvent::GroupFailed(e) => self.infra_errors.push(e.clone()),
            RunEvent::RunFinished { environment, elapsed } => {
                self.qemu_version.clone_from(&environment.qemu_version);
                self.kernel_release.clone_from(&environment.kernel_release);
                self.accel.clone_from(&environment.accel);
                self.elapsed = *elapsed;
            }
        }
    }

    /// Number of cases with verdict `v`.
    pub fn count(&self, v: Verdict) -> usize {
        self.cases.iter().filter(|c| c.verdict == v).count()
    }

    /// True when every group could run, every case passed or is an explained QUIRK.
    pub fn ok(&self) -> bool {
        self.infra_errors.is_empty()
            && self.cases.iter().all(|c| c.verdict.is_success())
            && self.cases.iter().all(|c| c.verdict != Verdict::Quirk || !c.note.is_empty())
    }

    /// The run's exit code: infrastructure when a group could not be set up, check failed
    /// when a case did not pass, else success.
    pub fn exit_code(&self) -> ExitCode {
        if !self.infra_errors.is_empty() {
            ExitCode::Infrastructure
        } else if !self.ok() {
            ExitCode::CheckFailed
        } else {
            ExitCode::Success
        }
    }
}

/// Serialises a duration as fractional seconds.
pub(crate) fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vport_common::checker::Rule;

    /// A report with one case of every kind; case `c` fails by its trace.
    pub(crate) fn sample() -> RunReport {
        let case = |name: &str, v: Verdict, note: &str, trace: TraceVerdict| CaseResult {
            name: name.into(),
            group: "shared".into(),
            spec: "poll, host connected".into(),
            expected: "mask == 0x4".into(),
            observed: "mask 0x4 <&>".into(),
            verdict: v,
            note: note.into(),
            trace,
            duration: Duration::from_millis(1500),
        };
        let clean = TraceVerdict::Clean { first_record: 0, records: 4, notes: 0 };
        let broken = TraceVerdict::Violations {
            first_record: 4,
            records: 3,
            notes: 0,
            violations: vec![Violation {
                rule: Rule::DuplicateOpened,
                port: "org.vport.conf.a".into(),
                records: vec![5, 6],
                detail: "host connect while connected since #5 (a duplicate OPENED)".into(),
            }],
        };
        let events = vec![
            RunEvent::RunStarted { suite: "conformance".into(), cases: 4 },
            RunEvent::GroupStarted { group: "shared".into(), cases: 3 },
            RunEvent::CaseFinished(case("a", Verdict::Pass, "", clean.clone())),
            RunEvent::CaseFinished(case("b", Verdict::Quirk, "why it differs", clean)),
            RunEvent::CaseFinished(case("c", Verdict::Fail, "the trace breaks a rule", broken)),
            RunEvent::GroupFailed(GroupError { group: "scale".into(), error: "no boot".into() }),
            RunEvent::CaseFinished(case("d", Verdict::NotRun, "no vm", TraceVerdict::NotRecorded)),
            RunEvent::RunFinished {
                environment: Environment {
                    qemu_version: "7.2.19".into(),
                    kernel_release: "6.1.0".into(),
                    accel: "tcg".into(),
                },
                elapsed: Duration::from_secs(3),
            },
        ];
        RunReport::from_events("conformance", &events)
    }

    #[test]
    fn the_report_is_the_fold_of_the_events() {
        let r = sample();
        assert_eq!(r.cases.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert_eq!((r.qemu_version.as_str(), r.accel.as_str()), ("7.2.19", "tcg"));
        assert_eq!(r.infra_errors.len(), 1);
        assert_eq!(r.elapsed, Duration::from_secs(3));
        assert_eq!(r.count(Verdict::Fail), 1);
    }

    #[test]
    fn exit_codes_come_from_the_one_table() {
        let mut r = sample();
        assert_eq!(r.exit_code(), ExitCode::Infrastructure);
        r.infra_errors.clear();
        assert_eq!(r.exit_code(), ExitCode::CheckFailed);
        r.cases.retain(|c| c.verdict.is_success());
        assert_eq!(r.exit_code(), ExitCode::Success);
        r.cases[1].note.clear();
        assert_eq!(r.exit_code(), ExitCode::CheckFailed, "a QUIRK needs its explanation");
    }

    #[test]
    fn trace_verdicts_have_a_short_form() {
        let r = sample();
        let short: Vec<String> = r.cases.iter().map(|c| c.trace.short()).collect();
        assert_eq!(short, ["clean", "clean", "1 violation", "-"]);
        assert_eq!(r.cases[2].trace.violations()[0].records, [5, 6]);
    }
}
