//! `vport hello`: boot, handshake, ping, check QEMU's view and the run's own trace, report.

use super::image::{prepare, ImageChoice};
use super::{stdout_err, CommandError, Progress};
use crate::hello::{self, HelloOptions};
use std::io::Write;

/// What `vport hello` is asked for.
#[derive(Debug, Clone)]
pub struct HelloCommand {
    /// The image.
    pub image: ImageChoice,
    /// The run's settings.
    pub hello: HelloOptions,
    /// Print the report as JSON.
    pub json: bool,
}

/// `vport hello`: the report on `out`; a failed check (QEMU's view, the trace) is an error
/// after it.
pub fn hello(cmd: HelloCommand, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    crate::usage::check_port_names(std::slice::from_ref(&cmd.hello.port))?;
    if let Some(path) = &cmd.hello.trace {
        crate::usage::check_output_file("--trace", path)?;
    }
    let img = prepare(&cmd.image, progress)?;
    let report = hello::run(&img, &cmd.hello, &mut |m| progress.say(m)).map_err(CommandError::Hello)?;
    if cmd.json {
        writeln!(out, "{}", serde_json::to_string(&report)?).map_err(stdout_err)?;
    } else {
        write!(out, "{}", report.to_text()).map_err(stdout_err)?;
    }
    match report.problem() {
        Some(problem) => Err(CommandError::CheckFailed(problem)),
        None => Ok(()),
    }
}
