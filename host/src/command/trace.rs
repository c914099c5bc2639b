//! `vport trace check`: judge a trace file and report (the engine is
//! [`crate::trace_check`]).

use super::{stdout_err, CommandError};
use crate::exit::ExitCode;
use crate::trace_check;
use std::io::Write;
use std::path::Path;

/// `vport trace check FILE`: the verdict on `out` (or, for a file that cannot be read, the
/// error on stderr, or on `out` as JSON); the outcome's exit code as
/// [`CommandError::Reported`] unless the trace is clean.
pub fn check(file: &Path, json: bool, out: &mut dyn Write) -> Result<(), CommandError> {
    let result = trace_check::run(file);
    let code = trace_check::exit_code(&result);
    match (&result, json) {
        (Ok(report), false) => write!(out, "{}", trace_check::render_text(report)).map_err(stdout_err)?,
        (Ok(report), true) => writeln!(out, "{}", trace_check::render_json(report)).map_err(stdout_err)?,
        (Err(e), false) => eprintln!("vport: {}", trace_check::render_error_text(e)),
        (Err(e), true) => writeln!(out, "{}", trace_check::render_error_json(e)).map_err(stdout_err)?,
    }
    match code {
        ExitCode::Success => Ok(()),
        code => Err(CommandError::Reported(code)),
    }
}
