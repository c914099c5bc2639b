//! The run for people: one progress line per event (for stderr while the run goes), and the
//! matrix at the end (for stdout).

use super::{RunEvent, RunReport, Verdict};
use std::fmt::Write as _;

/// The progress line for `ev`, if it deserves one.
pub fn progress_line(ev: &RunEvent) -> Option<String> {
    match ev {
        RunEvent::RunStarted { suite, cases } => Some(format!("{suite} suite: {cases} case(s) selected")),
        RunEvent::GroupStarted { group, cases } => Some(format!("group {group}: booting ({cases} case(s))")),
        RunEvent::CaseStarted { .. } => None,
        RunEvent::CaseProgress { name, done, total } => Some(format!("        {name}: {done} of {total}")),
        RunEvent::CaseFinished(c) => {
            let trace = match c.trace.violations().len() {
                0 => String::new(),
                n => format!(" ({n} trace violation(s))"),
            };
            Some(format!("{:<7} {}{trace}", c.verdict.label(), c.name))
        }
        RunEvent::GroupFailed(e) => Some(format!("group {} could not be set up: {}", e.group, e.error)),
        RunEvent::RunFinished { elapsed, .. } => Some(format!("finished in {:.1} s", elapsed.as_secs_f64())),
    }
}

/// The matrix: a header with QEMU, kernel and accelerator, one row per case (case, result,
/// the checker's verdict on its trace, expected, observed), the notes below (QUIRK
/// explanations, trace violations, errors), and a summary line.
pub fn render_text(r: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "vport {}: QEMU {}, guest kernel {}, accelerator {}, {:.1} s{}",
        r.suite,
        r.qemu_version,
        r.kernel_release,
        r.accel,
        r.elapsed.as_secs_f64(),
        if r.speed_factor > 1.0 { format!(", deadlines x{:.1} (speed factor)", r.speed_factor) } else { String::new() }
    );
    let w = r.cases.iter().map(|c| c.name.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(out, "{:<w$}  {:<7}  {:<12}  {:<50}  observed", "case", "result", "trace", "expected");
    for c in &r.cases {
        let _ = writeln!(
            out,
            "{:<w$}  {:<7}  {:<12}  {:<50}  {}",
            c.name,
            c.verdict.label(),
            c.trace.short(),
            c.expected,
            if c.observed.is_empty() { "-" } else { &c.observed }
        );
    }
    let notes: Vec<_> = r.cases.iter().filter(|c| !c.note.is_empty()).collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "\nnotes:");
        for c in notes {
            let _ = writeln!(out, "  {} ({}): {}", c.name, c.verdict.label(), c.note);
        }
    }
    for e in &r.infra_errors {
        let _ = writeln!(out, "infrastructure error in group {}: {}", e.group, e.error);
    }
    let _ = writeln!(
        out,
        "\n{} cases: {} pass, {} quirk, {} fail, {} error, {} not run",
        r.cases.len(),
        r.count(Verdict::Pass),
        r.count(Verdict::Quirk),
        r.count(Verdict::Fail),
        r.count(Verdict::Error),
        r.count(Verdict::NotRun)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::*;

    #[test]
    fn text_matrix_has_rows_trace_verdicts_notes_and_summary() {
        let t = render_text(&sample());
        assert!(t.starts_with("vport conformance: QEMU 7.2.19, guest kernel 6.1.0, accelerator tcg"), "{t}");
        assert!(t.lines().any(|l| l.starts_with("b ") && l.contains("QUIRK") && l.contains("mask == 0x4")), "{t}");
        assert!(t.lines().any(|l| l.starts_with("c ") && l.contains("FAIL") && l.contains("1 violation")), "{t}");
        assert!(t.lines().any(|l| l.starts_with("a ") && l.contains("clean")), "{t}");
        assert!(t.contains("b (QUIRK): why it differs"), "{t}");
        assert!(t.contains("4 cases: 1 pass, 1 quirk, 1 fail, 0 error, 1 not run"), "{t}");
        assert!(t.contains("infrastructure error in group scale: no boot"), "{t}");
    }

    #[test]
    fn progress_names_the_case_and_its_trace_violations() {
        let r = sample();
        let line = progress_line(&RunEvent::CaseFinished(r.cases[2].clone())).unwrap();
        assert_eq!(line, "FAIL    c (1 trace violation(s))");
        assert!(progress_line(&RunEvent::CaseStarted { group: "g".into(), name: "c".into() }).is_none());
    }
}
