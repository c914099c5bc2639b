//! The recorder: the one place a run's events come from. It starts and ends groups (each with
//! a fresh trace), times and judges cases (their code's observation and the checker's verdict
//! on their trace), and folds every event it emits into the run's report.

use super::case::{chain, CaseDef, CaseError, Observation};
use super::options::SuiteOptions;
use super::trace::{judge_trace, judged, VmTrace};
use crate::report::{CaseResult, Environment, GroupError, RunEvent, RunReport, TraceVerdict, Verdict};
use crate::rig::Rig;
use crate::timeline::Timeline;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Guest console lines an ERROR note carries.
const CONSOLE_LINES: usize = 60;

/// How a case's code ended when it did not return an observation: the error, and what the
/// group's diagnosis found (if it has one).
pub(crate) type CaseFailure = (CaseError, Option<String>);

/// Emits the run's events and keeps its report.
pub(crate) struct Recorder<'a> {
    opts: &'a SuiteOptions,
    sink: &'a mut dyn FnMut(&RunEvent),
    report: RunReport,
    environment: Environment,
    started: Instant,
    /// Guest console and QEMU log of the group's current VM.
    logs: Option<(PathBuf, PathBuf)>,
    /// The current group's trace.
    trace: Timeline,
    /// The first record of the current group's trace that no case has been judged on yet.
    mark: u64,
}

impl<'a> Recorder<'a> {
    /// A recorder for a run of `selected` cases; emits `RunStarted`.
    pub(crate) fn new(opts: &'a SuiteOptions, sink: &'a mut dyn FnMut(&RunEvent), selected: usize) -> Self {
        let mut rec = Recorder {
            opts,
            sink,
            report: RunReport::new("conformance"),
            environment: Environment::default(),
            started: Instant::now(),
            logs: None,
            trace: Timeline::new(Instant::now()),
            mark: 0,
        };
        rec.emit(RunEvent::RunStarted { suite: "conformance".into(), cases: selected });
        rec
    }

    /// The run's options (borrowed for the whole run, not from the recorder).
    pub(crate) fn opts(&self) -> &'a SuiteOptions {
        self.opts
    }

    fn emit(&mut self, ev: RunEvent) {
        (self.sink)(&ev);
        self.report.apply(&ev);
    }

    /// Starts `group` with `cases` selected cases: a fresh trace (written to the trace
    /// directory if the options name one); emits `GroupStarted`.
    pub(crate) fn start_group(&mut self, group: &str, cases: usize) -> Result<(), CaseError> {
        self.emit(RunEvent::GroupStarted { group: group.into(), cases });
        self.logs = None;
        self.mark = 0;
        self.trace = match &self.opts.trace_dir {
            Some(dir) => Timeline::create(&dir.join(format!("{group}.jsonl")), Instant::now())?,
            None => Timeline::new(Instant::now()),
        };
        Ok(())
    }

    /// Ends the current group: the trace file (if any) is flushed.
    pub(crate) fn end_group(&mut self) {
        if let Err(e) = self.trace.flush() {
            log::warn!("conformance: the group's trace file is incomplete: {}", chain(&e));
        }
        self.logs = None;
    }

    /// Records `rig`'s QMP events on the group's trace, its ports named `<prefix><name>`.
    pub(crate) fn trace_vm(&self, rig: &Rig, prefix: &str) -> Result<VmTrace, CaseError> {
        VmTrace::start(&self.trace, rig, prefix)
    }

    /// From now on, a case that ends in ERROR carries the tails of this VM's guest console and
    /// QEMU log, read at the moment of the error, in its note.
    pub(crate) fn watch_vm(&mut self, vm: &crate::qemu::Vm) {
        self.logs = Some((vm.console_log(), vm.stderr_log()));
    }

    /// Notes the QEMU version and accelerator of `rig` and the guest kernel `kernel`, the
    /// first time they are known.
    pub(crate) fn note_versions(&mut self, rig: &Rig, kernel: &str) {
        let env = &mut self.environment;
        if env.qemu_version == "unknown" {
            if let Ok(v) = rig.qmp.query_version() {
                env.qemu_version = format!("{}.{}.{} ({})", v.major, v.minor, v.micro, v.package.trim());
            }
            env.accel = rig.vm.accel().to_string();
        }
        if env.kernel_release == "unknown" {
            env.kernel_release = kernel.to_string();
        }
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

    /// A case begins; emits `CaseStarted`.
    pub(crate) fn begin(&mut self, def: &CaseDef) -> Instant {
        self.emit(RunEvent::CaseStarted { group: def.group.into(), name: def.name.into() });
        Instant::now()
    }

    /// A case begun at `started` ended with `outcome`: judges its trace (the records since
    /// the previous case), combines, emits `CaseFinished`.
    pub(crate) fn finish(&mut self, def: &CaseDef, started: Instant, outcome: Result<Observation, CaseFailure>) {
        let duration = started.elapsed();
        let records = self.trace.records();
        let trace = judge_trace(&records, self.mark);
        self.mark = records.len() as u64;
        let outcome = outcome.map_err(|(e, diagnosis)| {
            let mut note = format!("case {}: {}{}", def.name, chain(&e), self.error_context());
            if let Some(d) = diagnosis {
                note.push('\n');
                note.push_str(&d);
            }
            note
        });
        let (verdict, observed, note) = judged(outcome, &trace);
        let r = result(def, verdict, observed, note, trace, duration);
        log::info!("conformance: {} {} ({:?})", r.verdict.label(), r.name, r.duration);
        self.emit(RunEvent::CaseFinished(r));
    }

    /// `group` could not be set up or went down: emits `GroupFailed`, then NOT RUN for each of
    /// `defs` not finished yet.
    pub(crate) fn group_failed(&mut self, group: &str, defs: &[&CaseDef], err: &CaseError) {
        let e = GroupError { group: group.into(), error: chain(err) };
        log::error!("conformance: group {group}: {}", e.error);
        let note = format!("group {group} could not run: {}", e.error);
        self.emit(RunEvent::GroupFailed(e));
        for def in defs {
            if self.report.cases.iter().any(|r| r.name == def.name) {
                continue;
            }
            let r =
                result(def, Verdict::NotRun, String::new(), note.clone(), TraceVerdict::NotRecorded, Duration::ZERO);
            self.emit(RunEvent::CaseFinished(r));
        }
    }

    /// Ends the run: emits `RunFinished` and returns the report (the fold of every event).
    pub(crate) fn finish_run(mut self) -> RunReport {
        let ev = RunEvent::RunFinished { environment: self.environment.clone(), elapsed: self.started.elapsed() };
        self.emit(ev);
        self.report
    }
}

fn result(
    def: &CaseDef,
    verdict: Verdict,
    observed: String,
    note: String,
    trace: TraceVerdict,
    duration: Duration,
) -> CaseResult {
    CaseResult {
        name: def.name.into(),
        group: def.group.into(),
        spec: def.spec.into(),
        expected: def.expected.into(),
        observed,
        verdict,
        note,
        trace,
        duration,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::GuestImage;

    fn options() -> SuiteOptions {
        SuiteOptions::new(GuestImage {
            dir: "/nonexistent".into(),
            kernel: "/nonexistent/bzImage".into(),
            initramfs: "/nonexistent/initramfs".into(),
            kernel_release: "6.1.0".into(),
            modules: Vec::new(),
            cmdline: String::new(),
            fresh: false,
            key: "0".into(),
        })
    }

    const DEF: CaseDef = CaseDef { name: "x", group: "g", spec: "s", expected: "READY" };

    /// A case whose code saw what the spec says, but whose trace has a second host connect
    /// without a disconnect: the event stream carries a FAIL naming the records, and the
    /// report (the fold of the stream) and its JSON say the same.
    #[test]
    fn a_passing_case_with_a_violation_in_its_trace_fails_in_the_event_stream() {
        let opts = options();
        let mut events = Vec::new();
        let mut sink = |ev: &RunEvent| events.push(ev.clone());
        let mut rec = Recorder::new(&opts, &mut sink, 2);
        rec.start_group("g", 2).unwrap();
        let started = rec.begin(&DEF);
        rec.trace.host_connect("p");
        rec.trace.hello("p", 7, 42);
        rec.trace.hello_ack("p", 7, 42);
        rec.finish(&DEF, started, Ok(Observation::check(true, "READY")));
        let started = rec.begin(&DEF);
        rec.trace.host_connect("p");
        rec.finish(&DEF, started, Ok(Observation::check(true, "READY")));
        rec.end_group();
        let report = rec.finish_run();
        let finished: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                RunEvent::CaseFinished(c) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(finished.len(), 2);
        assert_eq!(finished[0].verdict, Verdict::Pass);
        assert_eq!(finished[1].verdict, Verdict::Fail);
        assert!(finished[1].note.contains("duplicate-opened: records #0, #3"), "{}", finished[1].note);
        assert!(matches!(events.last(), Some(RunEvent::RunFinished { .. })));
        assert_eq!(report.cases[1].verdict, Verdict::Fail);
        assert_eq!(report.exit_code(), crate::exit::ExitCode::CheckFailed);
        let json: serde_json::Value = serde_json::from_str(&crate::report::json::render_json(&report)).unwrap();
        assert_eq!(json["cases"][0]["trace"]["verdict"], "clean");
        assert_eq!(json["cases"][1]["trace"]["verdict"], "violations");
        assert_eq!(json["cases"][1]["trace"]["violations"][0]["records"], serde_json::json!([0, 3]));
    }

    #[test]
    fn a_failed_group_reports_its_cases_not_run() {
        let opts = options();
        let mut events = Vec::new();
        let mut sink = |ev: &RunEvent| events.push(ev.clone());
        let mut rec = Recorder::new(&opts, &mut sink, 1);
        rec.start_group("g", 1).unwrap();
        rec.group_failed("g", &[&DEF], &CaseError::Other("qemu did not start".into()));
        let report = rec.finish_run();
        assert_eq!(report.cases[0].verdict, Verdict::NotRun);
        assert_eq!(report.cases[0].trace, TraceVerdict::NotRecorded);
        assert_eq!(report.infra_errors[0].error, "qemu did not start");
        assert_eq!(report.exit_code(), crate::exit::ExitCode::Infrastructure);
    }
}
