//! The matrix's results three ways: one table for people (a row per cell, a column per suite,
//! then the conformance cases whose verdict differs between cells), one JSON object, and JUnit
//! XML (a `<testsuite>` per cell, a `<testcase>` per suite), plus the exit code.

use super::plan::Suite;
use super::run::{CellResult, Outcome};
use crate::exit::ExitCode;
use crate::report::junit::xml_escape;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The run's exit code: 1 when a suite failed, else 3 when one could not run, else 0 (skipped
/// cells do not fail a run: their reasons are in the report).
pub fn exit_code(results: &[CellResult]) -> ExitCode {
    let outcomes = || results.iter().flat_map(|c| c.suites.iter().map(|s| &s.outcome));
    if outcomes().any(|o| *o == Outcome::Failed) {
        ExitCode::CheckFailed
    } else if outcomes().any(|o| matches!(o, Outcome::Error { .. })) {
        ExitCode::Infrastructure
    } else {
        ExitCode::Success
    }
}

/// Each conformance case whose verdict is not the same in every cell that ran it: case ->
/// (cell name, verdict) for every cell.
pub fn differing_verdicts(results: &[CellResult]) -> BTreeMap<String, Vec<(String, String)>> {
    let mut by_case: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for cell in results {
        let Some(report) = cell.suites.iter().find(|s| s.suite == Suite::Conformance).and_then(|s| s.report.as_ref())
        else {
            continue;
        };
        for case in report.get("cases").and_then(|c| c.as_array()).into_iter().flatten() {
            let (Some(name), Some(verdict)) =
                (case.get("name").and_then(|v| v.as_str()), case.get("verdict").and_then(|v| v.as_str()))
            else {
                continue;
            };
            by_case.entry(name.to_string()).or_default().push((cell.cell.name(), verdict.to_string()));
        }
    }
    by_case.retain(|_, cells| cells.iter().any(|(_, v)| *v != cells[0].1));
    by_case
}

fn outcome_word(o: &Outcome) -> String {
    match o {
        Outcome::Passed => "passed".into(),
        Outcome::Failed => "FAILED".into(),
        Outcome::Error { detail } => format!("ERROR: {detail}"),
        Outcome::Skipped { .. } => "skipped".into(),
    }
}

/// The summary for people.
pub fn render_text(results: &[CellResult]) -> String {
    let mut s = String::new();
    let width = results.iter().map(|c| c.cell.name().len()).max().unwrap_or(4).max(4);
    let suites: Vec<Suite> = results.first().map(|c| c.suites.iter().map(|s| s.suite).collect()).unwrap_or_default();
    let _ = write!(s, "{:<width$}", "cell");
    for suite in &suites {
        let _ = write!(s, "  {:<14}", suite.name());
    }
    let _ = writeln!(s, "  time");
    for c in results {
        let _ = write!(s, "{:<width$}", c.cell.name());
        for r in &c.suites {
            let word = match &r.outcome {
                Outcome::Error { .. } => "ERROR".to_string(),
                o => outcome_word(o),
            };
            let _ = write!(s, "  {word:<14}");
        }
        let secs: f64 = c.suites.iter().map(|r| r.seconds).sum();
        let _ = writeln!(s, "  {secs:.0} s");
    }
    let mut notes = Vec::new();
    for c in results {
        if let Some(Outcome::Skipped { reason }) = c.suites.first().map(|r| &r.outcome) {
            notes.push(format!("{}: skipped: {reason}", c.cell.name()));
            continue;
        }
        for r in &c.suites {
            match (&r.outcome, &r.summary) {
                (Outcome::Skipped { .. }, _) => {}
                (Outcome::Error { detail }, _) => {
                    notes.push(format!("{} {}: {detail} (log: {})", c.cell.name(), r.suite.name(), r.log.display()))
                }
                (_, Some(summary)) => notes.push(format!("{} {}: {summary}", c.cell.name(), r.suite.name())),
                (_, None) => {}
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(s);
        for n in notes {
            let _ = writeln!(s, "{n}");
        }
    }
    let differing = differing_verdicts(results);
    if !differing.is_empty() {
        let _ = writeln!(s, "\nconformance cases whose verdict differs between cells:");
        for (case, cells) in &differing {
            let list: Vec<String> = cells.iter().map(|(cell, v)| format!("{cell} {v}")).collect();
            let _ = writeln!(s, "  {case}: {}", list.join(", "));
        }
    }
    s
}

/// The summary for machines.
pub fn render_json(results: &[CellResult]) -> serde_json::Value {
    let cells: Vec<serde_json::Value> = results
        .iter()
        .map(|c| {
            serde_json::json!({
                "cell": c.cell.name(),
                "qemu": c.cell.qemu.label,
                "kernel": c.cell.kernel.label,
                "machine": c.cell.machine,
                "cpus": c.cell.cpus,
                "accel": c.cell.accel.as_str(),
                "suites": c.suites,
            })
        })
        .collect();
    let differing: serde_json::Map<String, serde_json::Value> = differing_verdicts(results)
        .into_iter()
        .map(|(case, cells)| {
            let v: serde_json::Map<String, serde_json::Value> =
                cells.into_iter().map(|(cell, verdict)| (cell, verdict.into())).collect();
            (case, v.into())
        })
        .collect();
    serde_json::json!({ "cells": cells, "differing_conformance_verdicts": differing, "exit_code": exit_code(results) as i32 })
}

/// The summary as JUnit XML: a `<testsuite>` per cell, a `<testcase>` per suite (FAILED a
/// `<failure>`, ERROR an `<error>`, skipped `<skipped>` with the reason).
pub fn render_junit(results: &[CellResult]) -> String {
    let all = || results.iter().flat_map(|c| c.suites.iter());
    let count = |f: &dyn Fn(&Outcome) -> bool| all().filter(|s| f(&s.outcome)).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"vport-matrix\" tests=\"{}\" failures=\"{}\" errors=\"{}\">",
        all().count(),
        count(&|o| *o == Outcome::Failed),
        count(&|o| matches!(o, Outcome::Error { .. }))
    );
    for c in results {
        let n = |f: &dyn Fn(&Outcome) -> bool| c.suites.iter().filter(|s| f(&s.outcome)).count();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\">",
            xml_escape(&c.cell.name()),
            c.suites.len(),
            n(&|o| *o == Outcome::Failed),
            n(&|o| matches!(o, Outcome::Error { .. })),
            n(&|o| matches!(o, Outcome::Skipped { .. }))
        );
        for r in &c.suites {
            let _ = write!(
                out,
                "    <testcase classname=\"vport.matrix.{}\" name=\"{}\" time=\"{:.3}\">",
                xml_escape(&c.cell.name()),
                r.suite.name(),
                r.seconds
            );
            let summary = r.summary.as_deref().unwrap_or("");
            match &r.outcome {
                Outcome::Passed => {}
                Outcome::Failed => {
                    let _ = write!(
                        out,
                        "<failure message=\"{}\"/>",
                        xml_escape(&format!("{summary} (log: {})", r.log.display()))
                    );
                }
                Outcome::Error { detail } => {
                    let _ = write!(
                        out,
                        "<error message=\"{}\"/>",
                        xml_escape(&format!("{detail} (log: {})", r.log.display()))
                    );
                }
                Outcome::Skipped { reason } => {
                    let _ = write!(out, "<skipped message=\"{}\"/>", xml_escape(reason));
                }
            }
            if !summary.is_empty() && r.outcome == Outcome::Passed {
                let _ = write!(out, "<system-out>{}</system-out>", xml_escape(summary));
            }
            let _ = writeln!(out, "</testcase>");
        }
        let _ = writeln!(out, "  </testsuite>");
    }
    out.push_str("</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::plan::{Cell, KernelChoice, QemuChoice};
    use super::super::run::SuiteResult;
    use super::*;
    use crate::qemu::Accel;

    fn cell(machine: &str, accel: Accel) -> Cell {
        Cell {
            qemu: QemuChoice { label: "7.2.22".into(), path: None },
            kernel: KernelChoice::cached(),
            machine: machine.into(),
            cpus: 1,
            accel,
        }
    }

    fn conformance(outcome: Outcome, verdicts: &[(&str, &str)]) -> SuiteResult {
        let cases: Vec<_> = verdicts.iter().map(|(n, v)| serde_json::json!({"name": n, "verdict": v})).collect();
        let report = serde_json::json!({ "cases": cases });
        SuiteResult {
            suite: Suite::Conformance,
            outcome,
            seconds: 60.0,
            summary: super::super::run::summarise(Suite::Conformance, &report),
            report: Some(report),
            log: "/o/c/conformance.log".into(),
        }
    }

    fn sample() -> Vec<CellResult> {
        let skipped = SuiteResult {
            suite: Suite::Conformance,
            outcome: Outcome::Skipped { reason: "KVM does not run a guest here: no /dev/kvm".into() },
            seconds: 0.0,
            summary: None,
            report: None,
            log: Default::default(),
        };
        vec![
            CellResult {
                cell: cell("pc", Accel::Tcg),
                suites: vec![conformance(Outcome::Passed, &[("a", "pass"), ("pause", "quirk")])],
            },
            CellResult {
                cell: cell("q35", Accel::Tcg),
                suites: vec![conformance(Outcome::Failed, &[("a", "fail"), ("pause", "quirk")])],
            },
            CellResult { cell: cell("pc", Accel::Kvm), suites: vec![skipped] },
        ]
    }

    #[test]
    fn a_failed_suite_fails_the_run_and_a_skipped_cell_does_not() {
        let results = sample();
        assert_eq!(exit_code(&results), ExitCode::CheckFailed);
        assert_eq!(exit_code(&results[..1]), ExitCode::Success);
        assert_eq!(exit_code(&results[2..]), ExitCode::Success);
        let mut error = sample();
        error[1].suites[0].outcome = Outcome::Error { detail: "exit 3".into() };
        assert_eq!(exit_code(&error), ExitCode::Infrastructure);
    }

    #[test]
    fn the_table_names_every_cell_and_the_cases_that_differ() {
        let text = render_text(&sample());
        let row =
            |cell: &str| text.lines().find(|l| l.starts_with(cell)).map(|l| l.split_whitespace().collect::<Vec<_>>());
        assert_eq!(row("qemu-7.2.22_linux-cached_pc_1cpu_tcg ").unwrap()[1], "passed", "{text}");
        assert_eq!(row("qemu-7.2.22_linux-cached_q35_1cpu_tcg ").unwrap()[1], "FAILED", "{text}");
        assert!(text.contains("qemu-7.2.22_linux-cached_pc_1cpu_kvm: skipped: KVM does not run"), "{text}");
        assert!(
            text.contains("  a: qemu-7.2.22_linux-cached_pc_1cpu_tcg pass, qemu-7.2.22_linux-cached_q35_1cpu_tcg fail"),
            "{text}"
        );
        assert!(!text.contains("  pause:"), "the same verdict everywhere is no difference: {text}");
    }

    #[test]
    fn json_and_junit_carry_each_cell() {
        let results = sample();
        let json = render_json(&results);
        assert_eq!(json["cells"][1]["machine"], "q35");
        assert_eq!(json["cells"][1]["suites"][0]["outcome"], "failed");
        assert_eq!(json["cells"][2]["suites"][0]["reason"], "KVM does not run a guest here: no /dev/kvm");
        assert_eq!(json["differing_conformance_verdicts"]["a"]["qemu-7.2.22_linux-cached_q35_1cpu_tcg"], "fail");
        assert_eq!(json["exit_code"], 1);
        let xml = render_junit(&results);
        assert!(xml.contains("<testsuites name=\"vport-matrix\" tests=\"3\" failures=\"1\" errors=\"0\">"), "{xml}");
        assert!(xml.contains("<failure message=\"2 cases: 1 fail, 1 quirk (log: /o/c/conformance.log)\"/>"), "{xml}");
        assert!(xml.contains("<skipped message=\"KVM does not run a guest here: no /dev/kvm\"/>"), "{xml}");
    }
}
