//! Renderers of a [`SuiteReport`]: a text matrix for people, JSON and JUnit XML for machines.

use super::{SuiteReport, Verdict};
use std::fmt::Write as _;
use std::time::Duration;

/// Serialises a duration as fractional seconds.
pub(crate) fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The text matrix: a header with QEMU, kernel and accelerator, one row per case (case,
/// expected, observed, result), QUIRK/ERROR notes below, and a summary line.
pub fn render_text(r: &SuiteReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "vport conformance: QEMU {}, guest kernel {}, accelerator {}, {:.1} s",
        r.qemu_version,
        r.kernel_release,
        r.accel,
        r.elapsed.as_secs_f64()
    );
    let w = r.cases.iter().map(|c| c.name.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(out, "{:<w$}  {:<7}  {:<50}  observed", "case", "result", "expected");
    for c in &r.cases {
        let _ = writeln!(
            out,
            "{:<w$}  {:<7}  {:<50}  {}",
            c.name,
            c.verdict.label(),
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

/// The report as pretty-printed JSON (the [`SuiteReport`] fields; durations in seconds).
pub fn render_json(r: &SuiteReport) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise: {e}\"}}"))
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' && c != '\r' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// JUnit XML: one `<testsuite>` per VM group, one `<testcase>` per case. FAIL is a
/// `<failure>`, ERROR an `<error>`, NOT RUN `<skipped>`; QUIRK passes with its note in
/// `<system-out>` (it is an explained, consistent difference, not a regression). Properties
/// carry the QEMU and kernel versions and the accelerator. Written by hand: no dependency.
pub fn render_junit(r: &SuiteReport) -> String {
    let mut groups: Vec<&str> = Vec::new();
    for c in &r.cases {
        if !groups.contains(&c.group.as_str()) {
            groups.push(&c.group);
        }
    }
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"vport-conformance\" tests=\"{}\" failures=\"{}\" errors=\"{}\" time=\"{:.3}\">",
        r.cases.len(),
        r.count(Verdict::Fail),
        r.count(Verdict::Error),
        r.elapsed.as_secs_f64()
    );
    for g in groups {
        let cases: Vec<_> = r.cases.iter().filter(|c| c.group == g).collect();
        let n = |v: Verdict| cases.iter().filter(|c| c.verdict == v).count();
        let time: f64 = cases.iter().map(|c| c.duration.as_secs_f64()).sum();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{time:.3}\">",
            xml_escape(g),
            cases.len(),
            n(Verdict::Fail),
            n(Verdict::Error),
            n(Verdict::NotRun)
        );
        let _ = writeln!(out, "    <properties>");
        for (k, v) in [("qemu", &r.qemu_version), ("kernel", &r.kernel_release), ("accel", &r.accel)] {
            let _ = writeln!(out, "      <property name=\"{k}\" value=\"{}\"/>", xml_escape(v));
        }
        let _ = writeln!(out, "    </properties>");
        for c in cases {
            let _ = writeln!(
                out,
                "    <testcase classname=\"vport.conformance.{}\" name=\"{}\" time=\"{:.3}\">",
                xml_escape(g),
                xml_escape(&c.name),
                c.duration.as_secs_f64()
            );
            let msg = format!("expected: {}; observed: {}", c.expected, c.observed);
            match c.verdict {
                Verdict::Fail => {
                    let _ = writeln!(out, "      <failure message=\"{}\"/>", xml_escape(&msg));
                }
                Verdict::Error => {
                    let _ = writeln!(out, "      <error message=\"{}\"/>", xml_escape(&c.note));
                }
                Verdict::NotRun => {
                    let _ = writeln!(out, "      <skipped message=\"{}\"/>", xml_escape(&c.note));
                }
                Verdict::Pass | Verdict::Quirk => {}
            }
            let mut text = format!("{} {}\nspec: {}\n{msg}", c.verdict.label(), c.name, c.spec);
            if !c.note.is_empty() {
                text.push_str("\nnote: ");
                text.push_str(&c.note);
            }
            let _ = writeln!(out, "      <system-out>{}</system-out>", xml_escape(&text));
            let _ = writeln!(out, "    </testcase>");
        }
        let _ = writeln!(out, "  </testsuite>");
    }
    out.push_str("</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::{CaseResult, GroupError};
    use super::*;

    fn report() -> SuiteReport {
        let case = |name: &str, v: Verdict, note: &str| CaseResult {
            name: name.into(),
            group: "shared".into(),
            spec: "poll, host connected".into(),
            expected: "mask == 0x4".into(),
            observed: "mask 0x4 <&>".into(),
            verdict: v,
            note: note.into(),
            duration: Duration::from_millis(1500),
        };
        SuiteReport {
            qemu_version: "7.2.19".into(),
            kernel_release: "6.1.0".into(),
            accel: "tcg".into(),
            cases: vec![
                case("a", Verdict::Pass, ""),
                case("b", Verdict::Quirk, "why it differs"),
                case("c", Verdict::Fail, ""),
                case("d", Verdict::NotRun, "no vm"),
            ],
            infra_errors: vec![GroupError { group: "scale".into(), error: "no boot".into() }],
            elapsed: Duration::from_secs(3),
        }
    }

    #[test]
    fn text_matrix_has_rows_notes_and_summary() {
        let t = render_text(&report());
        assert!(t.contains("QEMU 7.2.19, guest kernel 6.1.0, accelerator tcg"), "{t}");
        assert!(t.lines().any(|l| l.starts_with("b ") && l.contains("QUIRK") && l.contains("mask == 0x4")), "{t}");
        assert!(t.contains("b (QUIRK): why it differs"), "{t}");
        assert!(t.contains("4 cases: 1 pass, 1 quirk, 1 fail, 0 error, 1 not run"), "{t}");
        assert!(t.contains("infrastructure error in group scale: no boot"), "{t}");
    }

    #[test]
    fn json_round_trips_verdicts() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&report())).unwrap();
        assert_eq!(v["cases"][1]["verdict"], "quirk");
        assert_eq!(v["cases"][3]["verdict"], "not-run");
        assert_eq!(v["cases"][0]["duration"], 1.5);
        assert_eq!(v["qemu_version"], "7.2.19");
    }

    #[test]
    fn junit_marks_failures_and_escapes() {
        let x = render_junit(&report());
        assert!(x.starts_with("<?xml"));
        assert!(x.contains("tests=\"4\" failures=\"1\" errors=\"0\""), "{x}");
        assert!(x.contains("<failure message=\"expected: mask == 0x4; observed: mask 0x4 &lt;&amp;&gt;\"/>"), "{x}");
        assert!(x.contains("<skipped message=\"no vm\"/>"), "{x}");
        assert!(x.contains("<property name=\"qemu\" value=\"7.2.19\"/>"), "{x}");
        assert_eq!(x.matches("<testcase ").count(), 4);
        assert_eq!(x.matches("</testcase>").count(), 4);
    }
}
