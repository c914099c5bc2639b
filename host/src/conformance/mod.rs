//! The conformance suite: the virtio-serial semantics of `shared/spec/virtio-serial-semantics.md`
//! turned into executable cases against a real VM running the real agent.
//!
//! A case has a name, the spec row it checks, an expected outcome and a function. Cases that
//! can share a VM run in a *group* on one boot, in a fixed order where no case disturbs the next;
//! a group whose setup fails (QEMU will not start, the agent never says HELLO) is an
//! infrastructure error: its cases are reported `NOT RUN`, the other groups still run. A case that
//! fails or errors never stops the cases after it.
//!
//! Verdicts: PASS (the VM did what the spec says), FAIL (it did not), QUIRK (the VM consistently
//! differs from the spec in a way the suite explains: `note` says what and why), ERROR (the case
//! itself could not complete: a link or QMP failure), NOT RUN (its group's VM was unavailable).
//!
//! Entry point: [`run`]; renderers: [`render_text`], [`render_json`], [`render_junit`].

mod cases;
mod guest;
mod render;

pub use cases::CASES;
pub use render::{render_json, render_junit, render_text};

use crate::image::GuestImage;
use crate::qemu::AccelChoice;
use serde::Serialize;
use std::time::{Duration, Instant};
use thiserror::Error;

/// What a case concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// As the spec says.
    Pass,
    /// Not as the spec says.
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
}

/// Static description of a case.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CaseDef {
    /// Stable case name (`kebab-case`), also the JUnit test name.
    pub name: &'static str,
    /// The VM group the case runs in.
    pub group: &'static str,
    /// The spec row it checks (with the source function that decides it).
    pub spec: &'static str,
    /// The outcome the spec predicts.
    pub expected: &'static str,
}

/// One case's result.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// VM group.
    pub group: String,
    /// Spec row.
    pub spec: String,
    /// Expected outcome.
    pub expected: String,
    /// What the VM did.
    pub observed: String,
    /// Verdict.
    pub verdict: Verdict,
    /// For QUIRK: what differs and why; for ERROR / NOT RUN: the error.
    pub note: String,
    /// How long the case took.
    #[serde(serialize_with = "render::ser_secs")]
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

/// The whole suite's result.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    /// QEMU version (`query-version`: `7.2.19 (Debian ...)`), or `unknown`.
    pub qemu_version: String,
    /// Guest kernel release from the agent's HELLO, or `unknown`.
    pub kernel_release: String,
    /// Accelerator QEMU ran with (`tcg`, `kvm`).
    pub accel: String,
    /// Every case in [`CASES`] order (filtered by [`SuiteOptions::filter`]).
    pub cases: Vec<CaseResult>,
    /// Groups that could not be set up.
    pub infra_errors: Vec<GroupError>,
    /// Wall time of the run.
    #[serde(serialize_with = "render::ser_secs")]
    pub elapsed: Duration,
}

impl SuiteReport {
    /// Number of cases with verdict `v`.
    pub fn count(&self, v: Verdict) -> usize {
        self.cases.iter().filter(|c| c.verdict == v).count()
    }

    /// True when no case failed or errored and every group could run.
    pub fn ok(&self) -> bool {
        self.infra_errors.is_empty()
            && self.cases.iter().all(|c| matches!(c.verdict, Verdict::Pass | Verdict::Quirk))
            && self.cases.iter().all(|c| c.verdict != Verdict::Quirk || !c.note.is_empty())
    }
}

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// The guest image (kernel, initramfs with the agent).
    pub image: GuestImage,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Run only cases whose name contains one of these comma-separated strings (and the
    /// groups they are in).
    pub filter: Option<String>,
    /// Open/close cycles of the REOPEN case (the issue asks for 1000).
    pub reopen_cycles: u32,
    /// Deadline from `cont` to the agent's HELLO (a TCG boot takes 4-8 s; more under load).
    pub hello_timeout: Duration,
    /// Deadline of one request on a live session.
    pub reply_timeout: Duration,
    /// Extra vport-agent arguments (kernel command line), e.g. `--log-level debug`.
    pub agent_args: Vec<String>,
}

impl SuiteOptions {
    /// Defaults: auto accelerator, every case, 1000 cycles, 90 s HELLO and 15 s reply deadlines.
    pub fn new(image: GuestImage) -> Self {
        SuiteOptions {
            image,
            accel: AccelChoice::Auto,
            filter: None,
            reopen_cycles: 1000,
            hello_timeout: Duration::from_secs(90),
            reply_timeout: Duration::from_secs(15),
            agent_args: Vec::new(),
        }
    }

    fn selected(&self, name: &str) -> bool {
        filter_selects(self.filter.as_deref(), name)
    }
}

/// Whether `filter` (comma-separated parts; `None`: no filter) selects the case `name`: some
/// non-empty part is contained in the name.
fn filter_selects(filter: Option<&str>, name: &str) -> bool {
    filter.is_none_or(|f| f.split(',').any(|p| !p.is_empty() && name.contains(p)))
}

/// The cases `filter` selects, in [`CASES`] order (every case for `None`). Empty means
/// [`run`] would refuse the filter with [`ConformanceError::NothingSelected`].
pub fn selected_cases(filter: Option<&str>) -> Vec<&'static CaseDef> {
    CASES.iter().filter(|c| filter_selects(filter, c.name)).collect()
}

/// Progress reported while the suite runs.
#[derive(Debug, Clone)]
pub enum CaseEvent {
    /// A group's VM is being set up.
    GroupStarted {
        /// Group name.
        group: String,
    },
    /// A case finished.
    CaseFinished(CaseResult),
    /// A group could not be set up; its cases are NOT RUN.
    GroupFailed(GroupError),
}

/// Errors of the suite as a whole (per-case and per-group trouble is in the report instead).
#[derive(Debug, Error)]
pub enum ConformanceError {
    /// The filter selects no case.
    #[error("no conformance case matches the filter {0:?}")]
    NothingSelected(String),
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
    /// A QMP command failed.
    #[error("qmp: {0}")]
    Qmp(#[from] crate::qmp::QmpError),
    /// A deadline-bounded wait failed.
    #[error("wait: {0}")]
    Wait(#[from] crate::wait::WaitError),
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

/// What a case function returns: its verdict, what it saw, and (QUIRK) why.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Verdict.
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

/// Collects results and reports progress.
pub(crate) struct Recorder<'a> {
    opts: &'a SuiteOptions,
    sink: &'a mut dyn FnMut(&CaseEvent),
    pub(crate) report: SuiteReport,
    /// Guest console and QEMU log of the group's current VM.
    logs: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Guest console lines an ERROR note carries.
const CONSOLE_LINES: usize = 60;

impl Recorder<'_> {
    /// Whether any selected case is in `group`.
    pub(crate) fn group_selected(&self, group: &str) -> bool {
        CASES.iter().any(|c| c.group == group && self.opts.selected(c.name))
    }

    /// From now on, a case that ends in ERROR carries the tails of this VM's guest console and
    /// QEMU log, read at the moment of the error, in its note.
    pub(crate) fn watch_vm(&mut self, vm: &crate::qemu::Vm) {
        self.logs = Some((vm.console_log(), vm.stderr_log()));
    }

    fn error_context(&self) -> String {
        use crate::qemu::vm::file_tail;
        let Some((console, qemu)) = &self.logs else { return String::new() };
        format!(
            "\n--- last {CONSOLE_LINES} lines of the guest console ({}) ---\n{}\n--- last 10 lines of qemu's log ---\n{}",
            console.display(),
            file_tail(console, CONSOLE_LINES).trim_end(),
            file_tail(qemu, 10).trim_end()
        )
    }

    /// Whether the last recorded case ended in ERROR.
    pub(crate) fn last_errored(&self) -> bool {
        self.report.cases.last().is_some_and(|c| c.verdict == Verdict::Error)
    }

    /// Appends a line to the note of the last recorded case.
    pub(crate) fn append_to_last_note(&mut self, line: &str) {
        if let Some(c) = self.report.cases.last_mut() {
            c.note.push('\n');
            c.note.push_str(line);
        }
    }

    /// Runs case `name` (if selected) and records it. A panic-free case function is expected;
    /// its `Err` becomes an ERROR verdict and the next case still runs.
    pub(crate) fn case(&mut self, name: &str, f: impl FnOnce() -> Result<Observation, CaseError>) {
        let Some(def) = CASES.iter().find(|c| c.name == name) else {
            log::error!("conformance: case {name} is not in the case table");
            return;
        };
        if !self.opts.selected(name) {
            return;
        }
        let start = Instant::now();
        let (verdict, observed, note) = match f() {
            Ok(o) => (o.verdict, o.observed, o.note),
            Err(e) => (Verdict::Error, String::new(), format!("case {name}: {}{}", chain(&e), self.error_context())),
        };
        let r = CaseResult {
            name: def.name.into(),
            group: def.group.into(),
            spec: def.spec.into(),
            expected: def.expected.into(),
            observed,
            verdict,
            note,
            duration: start.elapsed(),
        };
        log::info!("conformance: {} {} ({:?})", r.verdict.label(), r.name, r.duration);
        (self.sink)(&CaseEvent::CaseFinished(r.clone()));
        self.report.cases.push(r);
    }

    /// Records that `group` could not be set up: its selected cases not yet recorded are NOT RUN.
    pub(crate) fn group_failed(&mut self, group: &str, err: &CaseError) {
        let e = GroupError { group: group.into(), error: chain(err) };
        log::error!("conformance: group {group}: {}", e.error);
        (self.sink)(&CaseEvent::GroupFailed(e.clone()));
        for def in CASES.iter().filter(|c| c.group == group && self.opts.selected(c.name)) {
            if self.report.cases.iter().any(|r| r.name == def.name) {
                continue;
            }
            let r = CaseResult {
                name: def.name.into(),
                group: def.group.into(),
                spec: def.spec.into(),
                expected: def.expected.into(),
                observed: String::new(),
                verdict: Verdict::NotRun,
                note: format!("group {group} could not run: {}", e.error),
                duration: Duration::ZERO,
            };
            (self.sink)(&CaseEvent::CaseFinished(r.clone()));
            self.report.cases.push(r);
        }
        self.report.infra_errors.push(e);
    }
}

/// Runs every selected case, group by group (one VM boot per group, fresh VMs where a case
/// needs one), reporting each finished case to `progress`. Case failures and group set-up
/// failures are in the report; `Err` only when nothing could be selected.
pub fn run(opts: &SuiteOptions, progress: &mut dyn FnMut(&CaseEvent)) -> Result<SuiteReport, ConformanceError> {
    if let Some(f) = &opts.filter {
        if !CASES.iter().any(|c| opts.selected(c.name)) {
            return Err(ConformanceError::NothingSelected(f.clone()));
        }
    }
    let start = Instant::now();
    let mut rec = Recorder {
        opts,
        sink: progress,
        report: SuiteReport {
            qemu_version: "unknown".into(),
            kernel_release: "unknown".into(),
            accel: "unknown".into(),
            cases: Vec::new(),
            infra_errors: Vec::new(),
            elapsed: Duration::ZERO,
        },
        logs: None,
    };
    for (group, f) in cases::GROUPS {
        if !rec.group_selected(group) {
            continue;
        }
        (rec.sink)(&CaseEvent::GroupStarted { group: group.to_string() });
        if let Err(e) = f(opts, &mut rec) {
            rec.group_failed(group, &e);
        }
        rec.logs = None;
    }
    // Table order, whatever order groups ran in.
    rec.report.cases.sort_by_key(|r| CASES.iter().position(|c| c.name == r.name));
    rec.report.elapsed = start.elapsed();
    Ok(rec.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_table_is_consistent() {
        let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate case names");
        for c in CASES {
            assert!(cases::GROUPS.iter().any(|(g, _)| *g == c.group), "{} in unknown group {}", c.name, c.group);
            assert!(!c.spec.is_empty() && !c.expected.is_empty(), "{}", c.name);
        }
    }

    #[test]
    fn filters_select_by_substring_of_any_part() {
        assert_eq!(selected_cases(None).len(), CASES.len());
        let names = |f| selected_cases(Some(f)).iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names("second-open-ebusy"), ["second-open-ebusy"]);
        assert_eq!(names("second-open-ebusy,lseek"), ["second-open-ebusy", "lseek-pread-pwrite-espipe"]);
        assert!(names("nosuchcase").is_empty());
        assert!(names("").is_empty() && names(",").is_empty(), "empty parts select nothing");
    }

    #[test]
    fn report_ok_needs_explained_quirks() {
        let case = |v: Verdict, note: &str| CaseResult {
            name: "x".into(),
            group: "g".into(),
            spec: "s".into(),
            expected: "e".into(),
            observed: "o".into(),
            verdict: v,
            note: note.into(),
            duration: Duration::ZERO,
        };
        let mut r = SuiteReport {
            qemu_version: "7.2".into(),
            kernel_release: "6.1".into(),
            accel: "tcg".into(),
            cases: vec![case(Verdict::Pass, ""), case(Verdict::Quirk, "why")],
            infra_errors: vec![],
            elapsed: Duration::ZERO,
        };
        assert!(r.ok());
        r.cases.push(case(Verdict::Quirk, ""));
        assert!(!r.ok());
        r.cases.pop();
        r.cases.push(case(Verdict::Fail, ""));
        assert!(!r.ok());
        assert_eq!(r.count(Verdict::Pass), 1);
    }
}
