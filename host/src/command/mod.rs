//! The bodies of the `vport` commands: the binary parses its arguments into the option types
//! here, calls one function, and exits with [`CommandError::exit_code`] (one table:
//! [`crate::exit::ExitCode`]). Results go to the `out` writer (stdout), progress and
//! diagnostics to stderr.

pub mod bench;
pub mod boot;
pub mod conformance;
pub mod connect;
pub mod faults;
pub mod hello;
pub mod help;
pub mod image;
pub mod matrix;
pub mod soak;
pub mod trace;
pub mod transfer;

use crate::exit::ExitCode;
use std::path::PathBuf;
use std::time::Instant;
use thiserror::Error;

/// Progress lines on stderr with the time since the command started.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    /// Progress from now on, shown unless `quiet`.
    pub fn new(quiet: bool) -> Progress {
        Progress { start: Instant::now(), quiet }
    }

    /// Writes `vport [  1.2s] <msg>` to stderr.
    pub fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("vport [{:5.1}s] {msg}", self.start.elapsed().as_secs_f64());
        }
    }
}

/// Why a command did not succeed. Each variant maps to one exit code ([`CommandError::exit_code`]).
#[derive(Debug, Error)]
pub enum CommandError {
    /// A bad value on the command line, found before anything was built.
    #[error(transparent)]
    Usage(#[from] crate::usage::UsageError),
    /// The guest image could not be prepared.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// The VM could not be started or driven.
    #[error("{what}")]
    Rig {
        /// What could not be done.
        what: &'static str,
        /// Cause.
        #[source]
        source: crate::rig::RigError,
    },
    /// Waiting for QEMU to exit failed.
    #[error(transparent)]
    Vm(#[from] crate::qemu::vm::VmError),
    /// The `vport boot` registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// `vport connect` could not bridge the port.
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    /// `vport send` / `vport recv` did not complete the stream.
    #[error(transparent)]
    Transfer(#[from] crate::stream::TransferError),
    /// The libvirt domain's ports could not be had (`--libvirt`).
    #[error(transparent)]
    Libvirt(#[from] crate::libvirt::LibvirtError),
    /// The VM to attach to (`--socket`, `--qmp`) could not be reached.
    #[error("cannot attach to the vm")]
    Attach(#[source] crate::attach::AttachError),
    /// `vport hello` failed.
    #[error("vport hello failed")]
    Hello(#[source] crate::hello::HelloError),
    /// The bench did not produce its figures.
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
    /// The conformance suite could not start.
    #[error(transparent)]
    Conformance(#[from] crate::conformance::ConformanceError),
    /// A check failed (the VM ran, but did not behave as expected).
    #[error("{0}")]
    CheckFailed(String),
    /// A suite ran and did not succeed; `code` is its report's exit code.
    #[error("{message}")]
    Suite {
        /// The report's exit code ([`crate::report::RunReport::exit_code`]).
        code: ExitCode,
        /// What went wrong, in one line.
        message: String,
    },
    /// A report file could not be written at the end (the results are on stdout).
    #[error("cannot write the {what} report {} (the results are on stdout above)", path.display())]
    Report {
        /// Which report (`JUnit`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The bench's plots could not be drawn (the results are on stdout).
    #[error("cannot draw the bench's plots (the results are on stdout above)")]
    Plot(#[source] crate::bench::plot::PlotError),
    /// Writing the results to stdout failed.
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
    /// A result could not be serialised.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The command already reported its outcome (on stdout or stderr); only the exit code is
    /// left to give.
    #[error("exit {}", .0.code())]
    Reported(ExitCode),
}

impl CommandError {
    /// The exit code, from the one table.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CommandError::Usage(e) => e.exit_code(),
            CommandError::Connect(e) => e.exit_code(),
            CommandError::Libvirt(e) => e.exit_code(),
            CommandError::Conformance(e) => e.exit_code(),
            CommandError::Attach(e) | CommandError::Hello(crate::hello::HelloError::Attach(e)) => e.exit_code(),
            CommandError::Hello(e) if e.is_infrastructure() => ExitCode::Infrastructure,
            CommandError::Bench(e) if e.is_infrastructure() => ExitCode::Infrastructure,
            CommandError::Bench(_) => ExitCode::CheckFailed,
            CommandError::Transfer(crate::stream::TransferError::File { .. }) => ExitCode::Infrastructure,
            CommandError::Transfer(crate::stream::TransferError::NoSession { source, .. })
                if matches!(
                    **source,
                    crate::session::SessionError::Closed { reason: crate::session::EndReason::VmExited, .. }
                ) =>
            {
                // QEMU is gone: not a verdict on the stream.
                ExitCode::Infrastructure
            }
            CommandError::Transfer(_) => ExitCode::CheckFailed,
            CommandError::Hello(_) | CommandError::CheckFailed(_) => ExitCode::CheckFailed,
            CommandError::Suite { code, .. } | CommandError::Reported(code) => *code,
            CommandError::Image(_)
            | CommandError::Rig { .. }
            | CommandError::Vm(_)
            | CommandError::Registry(_)
            | CommandError::Report { .. }
            | CommandError::Plot(_)
            | CommandError::Stdout(_)
            | CommandError::Json(_) => ExitCode::Infrastructure,
        }
    }

    /// Whether the error still has to be shown (`false` for [`CommandError::Reported`]).
    pub fn needs_message(&self) -> bool {
        !matches!(self, CommandError::Reported(_))
    }
}

/// Writes a suite's report: the matrix (and `epilogue`, a text table that follows it) or the
/// JSON on `out` first, so that a JUnit file that cannot be written does not lose the
/// results, then the JUnit file if asked for.
pub(crate) fn write_suite_report(
    report: &crate::report::RunReport,
    json: bool,
    junit: Option<PathBuf>,
    epilogue: &str,
    out: &mut dyn std::io::Write,
) -> Result<(), CommandError> {
    use crate::report::{human, json as json_report, junit as junit_report};
    if json {
        writeln!(out, "{}", json_report::render_json(report)).map_err(stdout_err)?;
    } else {
        write!(out, "{}{epilogue}", human::render_text(report)).map_err(stdout_err)?;
    }
    out.flush().map_err(stdout_err)?;
    if let Some(path) = junit {
        if let Err(source) = std::fs::write(&path, junit_report::render_junit(report)) {
            return Err(CommandError::Report { what: "JUnit", path, source });
        }
    }
    Ok(())
}

/// A suite's outcome from its report's exit code: success, `infra` when a VM could not be set
/// up, `failed` when cases did not pass.
pub(crate) fn suite_outcome(
    report: &crate::report::RunReport,
    infra: String,
    failed: &str,
) -> Result<(), CommandError> {
    match report.exit_code() {
        ExitCode::Success => Ok(()),
        code @ ExitCode::Infrastructure => Err(CommandError::Suite { code, message: infra }),
        code => Err(CommandError::Suite { code, message: failed.into() }),
    }
}

/// Maps a stdout write error.
pub(crate) fn stdout_err(e: std::io::Error) -> CommandError {
    CommandError::Stdout(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_a_code_of_the_table() {
        assert_eq!(CommandError::CheckFailed("x".into()).exit_code(), ExitCode::CheckFailed);
        assert_eq!(CommandError::Reported(ExitCode::Infrastructure).exit_code(), ExitCode::Infrastructure);
        assert!(!CommandError::Reported(ExitCode::CheckFailed).needs_message());
        let usage = crate::usage::check_filter(Some("nosuchcase")).unwrap_err();
        assert_eq!(CommandError::from(usage).exit_code(), ExitCode::Usage);
        let suite = CommandError::Suite { code: ExitCode::CheckFailed, message: "cases failed".into() };
        assert_eq!((suite.exit_code(), suite.to_string().as_str()), (ExitCode::CheckFailed, "cases failed"));
        let report = CommandError::Report {
            what: "JUnit",
            path: "/dev/full".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert_eq!(report.exit_code(), ExitCode::Infrastructure);
        assert!(report.to_string().starts_with("cannot write the JUnit report /dev/full"), "{report}");
        let closed = |reason| crate::stream::TransferError::NoSession {
            port: "p".into(),
            acked: 1,
            total: 2,
            source: Box::new(crate::session::SessionError::Closed { port: "p".into(), reason }),
        };
        let vm_gone = CommandError::from(closed(crate::session::EndReason::VmExited));
        assert_eq!(vm_gone.exit_code(), ExitCode::Infrastructure, "QEMU exiting is the infrastructure's failure");
        let unplugged = CommandError::from(closed(crate::session::EndReason::Unplugged));
        assert_eq!(unplugged.exit_code(), ExitCode::CheckFailed);
    }
}
