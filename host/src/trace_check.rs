//! `vport trace check FILE`: read a trace file, run the life-cycle checker, render the verdict
//! as text or JSON, and map it to an exit code.
//!
//! Exit codes ([`exit_code`], from [`crate::exit::ExitCode`]): `Success` (0) no violation
//! (notes allowed), `CheckFailed` (1) at least one violation, `Infrastructure` (3) the file
//! cannot be read or is not a valid trace (the error names the line).
//!
//! ```no_run
//! use std::path::Path;
//! use vport_host::trace_check;
//!
//! let outcome = trace_check::run(Path::new("trace.jsonl"));
//! match &outcome {
//!     Ok(report) => print!("{}", trace_check::render_text(report)),
//!     Err(e) => eprintln!("{}", trace_check::render_error_text(e)),
//! }
//! trace_check::exit_code(&outcome).exit();
//! ```

use crate::exit::ExitCode;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use thiserror::Error;
use vport_common::checker::{check, CheckReport, PortSummary};
use vport_common::trace::{parse_jsonl, TraceError};

/// Why a trace file could not be checked.
#[derive(Debug, Error)]
pub enum TraceCheckError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read trace file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid trace; the cause names the line.
    #[error("malformed trace file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause, with the line number.
        #[source]
        source: TraceError,
    },
}

/// Reads, parses and checks the trace at `path` (`-`: standard input).
pub fn run(path: &Path) -> Result<CheckReport, TraceCheckError> {
    let read = |source| TraceCheckError::Read { path: path.into(), source };
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(read)?
    } else {
        std::fs::read_to_string(path).map_err(read)?
    };
    let records = parse_jsonl(&text).map_err(|source| TraceCheckError::Parse { path: path.into(), source })?;
    Ok(check(&records))
}

/// Parses and checks a trace held in memory.
pub fn check_text(text: &str) -> Result<CheckReport, TraceError> {
    Ok(check(&parse_jsonl(text)?))
}

/// The exit code for an outcome of [`run`].
pub fn exit_code(outcome: &Result<CheckReport, TraceCheckError>) -> ExitCode {
    match outcome {
        Ok(report) => report_exit_code(report),
        Err(_) => ExitCode::Infrastructure,
    }
}

/// [`ExitCode::Success`] for a clean trace, else [`ExitCode::CheckFailed`].
fn report_exit_code(report: &CheckReport) -> ExitCode {
    if report.is_clean() {
        ExitCode::Success
    } else {
        ExitCode::CheckFailed
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn port_line(s: &PortSummary) -> String {
    let mut line = format!(
        "port {}: host {} connects, {} disconnects (connected: {}); {} sessions, {} ready, {} byes; data {} records, \
         h2g {} B, g2h {} B; state {}",
        s.port,
        s.counts.host_connects,
        s.counts.host_disconnects,
        yes_no(s.host_connected),
        s.counts.sessions,
        s.counts.ready,
        s.counts.byes,
        s.counts.data_records,
        s.counts.bytes_h2g,
        s.counts.bytes_g2h,
        s.state
    );
    if let Some(session) = s.session {
        let _ = write!(line, " (session {session:#010x})");
    }
    if s.counts.vserport_changes + s.counts.frontend_samples > 0 {
        let _ = write!(
            line,
            "; qmp {} VSERPORT_CHANGE ({} coalesced), {} frontend-open samples",
            s.counts.vserport_changes, s.counts.coalesced, s.counts.frontend_samples
        );
        if let Some(open) = s.guest_open {
            let _ = write!(line, " (last: {})", if open { "open" } else { "closed" });
        }
    }
    if s.counts.agent_transitions > 0 {
        let _ = write!(line, "; agent {} transitions", s.counts.agent_transitions);
        if let Some(state) = s.agent_state {
            let _ = write!(line, " (last: {})", state.name());
        }
    }
    let _ = write!(line, "; {} violations", s.violations);
    line
}

/// The report as text: one line per violation (`violation: <rule>: records #a, #b: port <port>:
/// <detail>`), one per note (`note: <kind>: ...`), one summary line per port, and a last line
/// with the totals and the verdict.
pub fn render_text(report: &CheckReport) -> String {
    let mut out = String::new();
    for v in &report.violations {
        let _ = writeln!(out, "{v}");
    }
    for n in &report.notes {
        let _ = writeln!(out, "{n}");
    }
    for p in &report.ports {
        let _ = writeln!(out, "{}", port_line(p));
    }
    let _ = writeln!(
        out,
        "trace: {} records, {} violations, {} notes: {}",
        report.records,
        report.violations.len(),
        report.notes.len(),
        if report.is_clean() { "clean" } else { "VIOLATIONS" }
    );
    out
}

/// The report as JSON: `{"clean", "exit_code", "records", "violations": [{"rule", "port",
/// "records", "detail"}], "notes": [{"kind", "port", "records", "detail"}], "ports": [...]}`.
pub fn render_json(report: &CheckReport) -> Value {
    let mut v = serde_json::to_value(report).unwrap_or_else(|e| json!({ "error": e.to_string() }));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("clean".into(), Value::Bool(report.is_clean()));
        obj.insert("exit_code".into(), json!(report_exit_code(report).code()));
    }
    v
}

/// An error as one line with its causes: `error: malformed trace file x: line 3: ...`.
pub fn render_error_text(e: &TraceCheckError) -> String {
    let mut text = format!("error: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// An error as JSON: `{"error": <text with causes>, "exit_code": 3, "line": <n or null>}`.
pub fn render_error_json(e: &TraceCheckError) -> Value {
    let line = match e {
        TraceCheckError::Parse { source, .. } => Some(source.line()),
        TraceCheckError::Read { .. } => None,
    };
    let text = render_error_text(e);
    json!({ "error": text.strip_prefix("error: ").unwrap_or(&text), "exit_code": ExitCode::Infrastructure.code(), "line": line })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECT: &str = r#"{"seq":0,"t_ns":1000,"port":"org.vport.0","source":"host","kind":"host_connect"}"#;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn a_clean_trace_exits_0() {
        let text = format!(
            "{CONNECT}\n{}\n{}\n{}\n",
            r#"{"seq":1,"t_ns":2000,"port":"org.vport.0","source":"host","kind":"hello","session":7,"nonce":42}"#,
            r#"{"seq":2,"t_ns":3000,"port":"org.vport.0","source":"host","kind":"hello_ack","session":7,"nonce":42}"#,
            r#"{"seq":3,"t_ns":4000,"port":"org.vport.0","source":"host","kind":"data","dir":"h2g","bytes":9,"session":7}"#,
        );
        let (_dir, path) = file(&text);
        let outcome = run(&path);
        assert_eq!(exit_code(&outcome), ExitCode::Success);
        let report = outcome.unwrap();
        let text = render_text(&report);
        assert_eq!(
            text,
            "port org.vport.0: host 1 connects, 0 disconnects (connected: yes); 1 sessions, 1 ready, 0 byes; data 1 \
             records, h2g 9 B, g2h 0 B; state READY (session 0x00000007); 0 violations\n\
             trace: 4 records, 0 violations, 0 notes: clean\n"
        );
        let v = render_json(&report);
        assert_eq!(
            (v["clean"].as_bool(), v["exit_code"].as_i64(), v["records"].as_u64()),
            (Some(true), Some(0), Some(4))
        );
        assert_eq!(v["ports"][0]["state"], "READY");
    }

    #[test]
    fn a_duplicate_opened_exits_1_naming_the_records() {
        let second = r#"{"seq":1,"t_ns":2000,"port":"org.vport.0","source":"host","kind":"host_connect"}"#;
        let (_dir, path) = file(&format!("{CONNECT}\n{second}\n"));
        let outcome = run(&path);
        assert_eq!(exit_code(&outcome), ExitCode::CheckFailed);
        let report = outcome.unwrap();
        let text = render_text(&report);
        assert_eq!(
            text.lines().next().unwrap(),
            "violation: duplicate-opened: records #0, #1: port org.vport.0: host connect while connected since #0 (a \
             duplicate OPENED)"
        );
        assert!(text.ends_with("trace: 2 records, 1 violations, 0 notes: VIOLATIONS\n"), "{text}");
        let v = render_json(&report);
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["violations"][0]["rule"], "duplicate-opened");
        assert_eq!(v["violations"][0]["records"], json!([0, 1]));
    }

    #[test]
    fn a_malformed_file_exits_3_naming_the_line() {
        let (_dir, path) = file(&format!("{CONNECT}\n{{\"seq\":1,\"kind\":\"warp\"}}\n"));
        let outcome = run(&path);
        assert_eq!(exit_code(&outcome), ExitCode::Infrastructure);
        let e = outcome.unwrap_err();
        let text = render_error_text(&e);
        assert!(
            text.starts_with(&format!(
                "error: malformed trace file {}: line 2: unknown record kind \"warp\"",
                path.display()
            )),
            "{text}"
        );
        let v = render_error_json(&e);
        assert_eq!((v["exit_code"].as_i64(), v["line"].as_u64()), (Some(3), Some(2)));
        assert!(v["error"].as_str().unwrap().starts_with("malformed trace file"), "{v}");
    }

    #[test]
    fn a_missing_file_exits_3() {
        let outcome = run(Path::new("/nonexistent/trace.jsonl"));
        assert_eq!(exit_code(&outcome), ExitCode::Infrastructure);
        let e = outcome.unwrap_err();
        assert!(render_error_text(&e).starts_with("error: cannot read trace file /nonexistent/trace.jsonl: "));
        assert_eq!(render_error_json(&e)["line"], Value::Null);
    }

    #[test]
    fn notes_do_not_make_a_trace_dirty() {
        let text = [
            r#"{"seq":0,"t_ns":0,"port":"p","source":"qmp","kind":"vserport_change","id":"v","open":false}"#,
            r#"{"seq":1,"t_ns":1000000000,"port":"p","source":"qmp","kind":"vserport_change","id":"v","open":false}"#,
        ]
        .join("\n");
        let report = check_text(&text).unwrap();
        assert!(report.is_clean());
        let out = render_text(&report);
        assert!(out.starts_with("note: coalesced-vserport-change: records #0, #1: port p: "), "{out}");
        assert!(out.ends_with("trace: 2 records, 0 violations, 1 notes: clean\n"), "{out}");
    }
}
