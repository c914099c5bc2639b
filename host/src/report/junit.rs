//! The run for CI: JUnit XML, one `<testsuite>` per group, one `<testcase>` per case. FAIL is
//! a `<failure>` (with the trace's violations when they are why), ERROR an `<error>`, NOT RUN
//! `<skipped>`; QUIRK passes with its note in `<system-out>` (an explained, consistent
//! difference, not a regression). Properties carry the QEMU and kernel versions and the
//! accelerator. Written by hand: no dependency.

use super::{CaseResult, RunReport, Verdict};
use std::fmt::Write as _;

/// `s` with the five XML special characters escaped and control characters blanked.
pub fn xml_escape(s: &str) -> String {
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

/// The report as JUnit XML.
pub fn render_junit(r: &RunReport) -> String {
    let mut groups: Vec<&str> = Vec::new();
    for c in &r.cases {
        if !groups.contains(&c.group.as_str()) {
            groups.push(&c.group);
        }
    }
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"vport-{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" time=\"{:.3}\">",
        xml_escape(&r.suite),
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
        let speed = format!("{:.1}", r.speed_factor);
        for (k, v) in
            [("qemu", &r.qemu_version), ("kernel", &r.kernel_release), ("accel", &r.accel), ("speed_factor", &speed)]
        {
            let _ = writeln!(out, "      <property name=\"{k}\" value=\"{}\"/>", xml_escape(v));
        }
        let _ = writeln!(out, "    </properties>");
        for c in cases {
            testcase(&mut out, &r.suite, c);
        }
        let _ = writeln!(out, "  </testsuite>");
    }
    out.push_str("</testsuites>\n");
    out
}

fn testcase(out: &mut String, suite: &str, c: &CaseResult) {
    let _ = writeln!(
        out,
        "    <testcase classname=\"vport.{}.{}\" name=\"{}\" time=\"{:.3}\">",
        xml_escape(suite),
        xml_escape(&c.group),
        xml_escape(&c.name),
        c.duration.as_secs_f64()
    );
    let mut msg = format!("expected: {}; observed: {}", c.expected, c.observed);
    for v in c.trace.violations() {
        msg.push_str("; trace ");
        msg.push_str(&v.to_string());
    }
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
    let mut text = format!("{} {}\nspec: {}\n{msg}\ntrace: {}", c.verdict.label(), c.name, c.spec, c.trace.short());
    if !c.note.is_empty() {
        text.push_str("\nnote: ");
        text.push_str(&c.note);
    }
    let _ = writeln!(out, "      <system-out>{}</system-out>", xml_escape(&text));
    let _ = writeln!(out, "    </testcase>");
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::*;

    #[test]
    fn junit_marks_failures_with_their_trace_violations_and_escapes() {
        let x = render_junit(&sample());
        assert!(x.starts_with("<?xml"));
        assert!(x.contains("<testsuites name=\"vport-conformance\" tests=\"4\" failures=\"1\" errors=\"0\""), "{x}");
        assert!(x.contains("<failure message=\"expected: mask == 0x4; observed: mask 0x4 &lt;&amp;&gt;; trace violation: duplicate-opened: records #5, #6"), "{x}");
        assert!(x.contains("<skipped message=\"no vm\"/>"), "{x}");
        assert!(x.contains("<property name=\"qemu\" value=\"7.2.19\"/>"), "{x}");
        assert!(x.contains("classname=\"vport.conformance.shared\" name=\"a\""), "{x}");
        assert_eq!(x.matches("<testcase ").count(), 4);
        assert_eq!(x.matches("</testcase>").count(), 4);
    }
}
