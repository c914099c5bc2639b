//! The run for machines: the [`RunReport`] as one JSON object (durations in seconds; each
//! case's `trace` holds the checker's verdict on its records: `clean`, or `violations` with
//! the rule, port, record numbers and detail of each).

use super::RunReport;

/// The report as pretty-printed JSON.
pub fn render_json(r: &RunReport) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise: {e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::*;

    #[test]
    fn json_carries_verdicts_and_trace_verdicts() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&sample())).unwrap();
        assert_eq!(v["suite"], "conformance");
        assert_eq!(v["cases"][1]["verdict"], "quirk");
        assert_eq!(v["cases"][3]["verdict"], "not-run");
        assert_eq!(v["cases"][0]["duration"], 1.5);
        assert_eq!(v["qemu_version"], "7.2.19");
        assert_eq!(v["cases"][0]["trace"]["verdict"], "clean");
        assert_eq!(v["cases"][0]["trace"]["records"], 4);
        let t = &v["cases"][2]["trace"];
        assert_eq!(t["verdict"], "violations");
        assert_eq!(t["violations"][0]["rule"], "duplicate-opened");
        assert_eq!(t["violations"][0]["records"], serde_json::json!([5, 6]));
        assert_eq!(v["cases"][3]["trace"]["verdict"], "not-recorded");
    }
}
