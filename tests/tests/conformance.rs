//! The conformance suite (`vport_host::conformance`) on real VMs, each case reported as its
//! own test (`shared::second-open-ebusy`, ...), so CI names the case that failed. A `harness =
//! false` test binary on libtest-mimic: it takes libtest's arguments (a name filter, `--exact`,
//! `--skip`, `--list`, `--test-threads`) and prints libtest's lines, `test result:` included.
//!
//! The cases of a group share one VM boot: the first selected case of a group runs the whole
//! group (its selected cases), and every case then reports its own verdict. A case passes when
//! it is PASS, or QUIRK with its explanation; FAIL (the VM, or the checker on the case's
//! trace), ERROR and NOT RUN fail it. `VPORT_CONFORMANCE_FILTER=a,b` selects cases by
//! substring as `vport run conformance --filter` does, `VPORT_CONFORMANCE_CYCLES=n` sets the
//! REOPEN cycles. At the end it prints the matrix and writes `target/conformance.json`,
//! `target/conformance.xml` and each group's trace in `target/conformance-traces/`.

use libtest_mimic::{Arguments, Failed, Trial};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vport_host::conformance::{self, CaseDef, SuiteOptions};
use vport_host::report::{human, json, junit, RunReport, Verdict};

/// Runs each group once, when its first selected case is asked for.
struct Groups {
    /// The cases this invocation runs (what the filters left).
    selected: Vec<String>,
    /// Per group, its report; the lock also keeps VMs one at a time.
    reports: Mutex<BTreeMap<&'static str, RunReport>>,
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

impl Groups {
    fn run_group(&self, group: &'static str) -> RunReport {
        let mut opts = SuiteOptions::new(vport_tests::guest_image().clone());
        let all = conformance::all_cases();
        let mine = all.iter().filter(|c| c.group == group && self.selected.iter().any(|s| s == c.name));
        opts.names = Some(mine.map(|c| c.name.to_string()).collect());
        if let Some(n) = std::env::var("VPORT_CONFORMANCE_CYCLES").ok().and_then(|s| s.parse().ok()) {
            opts.reopen_cycles = n;
        }
        let traces = out_dir().join("conformance-traces");
        match std::fs::create_dir_all(&traces) {
            Ok(()) => opts.trace_dir = Some(traces),
            Err(e) => eprintln!("conformance: no trace files ({}: {e})", traces.display()),
        }
        conformance::run(&opts, &mut |ev| {
            if let Some(line) = human::progress_line(ev) {
                eprintln!("e2e: {line}");
            }
        })
        .unwrap_or_else(|e| panic!("group {group}: {e}"))
    }

    /// The verdict of `case`: runs its group first if it has not run.
    fn verdict(&self, case: &CaseDef) -> Result<(), Failed> {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if !reports.contains_key(case.group) {
            let report = self.run_group(case.group);
            reports.insert(case.group, report);
        }
        let report = &reports[case.group];
        let Some(c) = report.cases.iter().find(|c| c.name == case.name) else {
            return Err(format!("{} is not in its group's report", case.name).into());
        };
        if c.verdict == Verdict::Pass || (c.verdict == Verdict::Quirk && !c.note.is_empty()) {
            return Ok(());
        }
        Err(format!(
            "{} {}\nexpected: {}\nobserved: {}\ntrace: {}\nnote: {}",
            c.verdict.label(),
            c.name,
            c.expected,
            c.observed,
            c.trace.short(),
            c.note
        )
        .into())
    }

    /// Every group's report as one, in run order.
    fn merged(&self) -> Option<RunReport> {
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let order: Vec<&str> = conformance::all_cases().iter().map(|c| c.group).collect();
        let mut groups: Vec<&RunReport> = reports.values().collect();
        groups.sort_by_key(|r| r.cases.first().and_then(|c| order.iter().position(|g| *g == c.group)));
        let mut all = RunReport::new("conformance");
        for r in groups {
            if all.qemu_version == "unknown" {
                all.qemu_version.clone_from(&r.qemu_version);
                all.accel.clone_from(&r.accel);
            }
            if all.kernel_release == "unknown" {
                all.kernel_release.clone_from(&r.kernel_release);
            }
            all.cases.extend(r.cases.iter().cloned());
            all.infra_errors.extend(r.infra_errors.iter().cloned());
            all.elapsed += r.elapsed;
        }
        (!all.cases.is_empty()).then_some(all)
    }
}

fn main() {
    let args = Arguments::from_args();
    let env_filter = std::env::var("VPORT_CONFORMANCE_FILTER").ok().filter(|s| !s.is_empty());
    let test_name = |c: &CaseDef| format!("{}::{}", c.group, c.name);
    let cases = conformance::selected_cases(env_filter.as_deref());
    let selected = cases
        .iter()
        .filter(|c| {
            let probe = Trial::test(test_name(c), || Ok(()));
            !args.is_filtered_out(&probe) && !args.is_ignored(&probe)
        })
        .map(|c| c.name.to_string())
        .collect();
    let groups = Arc::new(Groups { selected, reports: Mutex::new(BTreeMap::new()) });
    let trials = cases
        .iter()
        .map(|&c| {
            let groups = groups.clone();
            Trial::test(test_name(c), move || groups.verdict(c))
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(report) = groups.merged() {
        println!("{}", human::render_text(&report));
        let out = out_dir();
        for (file, body) in
            [("conformance.json", json::render_json(&report)), ("conformance.xml", junit::render_junit(&report))]
        {
            let path = out.join(file);
            if let Err(e) = std::fs::write(&path, body) {
                eprintln!("conformance: cannot write {}: {e}", path.display());
            }
        }
        if report.elapsed > Duration::from_secs(600) {
            eprintln!("conformance: the suite took {:?} (more than 600 s)", report.elapsed);
        }
    }
    conclusion.exit();
}
