//! `vport hello`: boot (or attach to a running VM), handshake, ping, check QEMU's view and the
//! run's own trace, report.

use super::image::{prepare, ImageChoice};
use super::{stdout_err, CommandError, Progress};
use crate::attach::{AttachSpec, Attached};
use crate::hello::{self, HelloOptions};
use std::io::Write;

/// What `vport hello` is asked for.
#[derive(Debug, Clone)]
pub struct HelloCommand {
    /// The image (unused when attaching).
    pub image: ImageChoice,
    /// The run's settings.
    pub hello: HelloOptions,
    /// Attach to this VM instead of booting one (`--socket`, `--qmp`); its one port is the
    /// port talked to.
    pub attach: Option<AttachSpec>,
    /// Print the report as JSON.
    pub json: bool,
}

/// `vport hello`: the report on `out`; a failed check (QEMU's view, the trace) is an error
/// after it.
pub fn hello(mut cmd: HelloCommand, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    if let Some(spec) = &cmd.attach {
        if let [(name, _)] = spec.ports.as_slice() {
            cmd.hello.port = name.clone();
        } else {
            return Err(crate::usage::UsageError::BadSocket {
                value: spec.names().join(" "),
                reason: "vport hello talks to one port: give --socket once (vport watch takes several)".into(),
            }
            .into());
        }
        if let Some(qmp) = &spec.qmp {
            crate::attach::check_qmp_path(qmp)?;
        }
    }
    crate::usage::check_port_names(std::slice::from_ref(&cmd.hello.port))?;
    if let Some(path) = &cmd.hello.trace {
        crate::usage::check_output_file("--trace", path)?;
    }
    let report = match &cmd.attach {
        Some(spec) => {
            let attached = Attached::attach(spec).map_err(CommandError::Attach)?;
            hello::run_attached(&attached, &cmd.hello, &mut |m| progress.say(m)).map_err(CommandError::Hello)?
        }
        None => {
            let img = prepare(&cmd.image, progress)?;
            hello::run(&img, &cmd.hello, &mut |m| progress.say(m)).map_err(CommandError::Hello)?
        }
    };
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
