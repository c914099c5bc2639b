//! `vport run conformance`: the suite on real VMs, progress on stderr while it runs, the
//! matrix (or JSON) on stdout, optionally JUnit XML to a file.

use super::image::{prepare, ImageChoice};
use super::{stdout_err, CommandError, Progress};
use crate::conformance::{self, SuiteOptions};
use crate::qemu::AccelChoice;
use crate::report::human;
use std::io::Write;
use std::path::PathBuf;

/// What `vport run conformance` is asked for.
#[derive(Debug, Clone)]
pub struct ConformanceCommand {
    /// The image.
    pub image: ImageChoice,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Which QEMU, machine type and vCPU count the VMs run on.
    pub platform: crate::qemu::Platform,
    /// Only the cases whose name contains one of these comma-separated strings.
    pub filter: Option<String>,
    /// Only list the selected cases.
    pub list: bool,
    /// vport-agent's log level.
    pub agent_log_level: String,
    /// Open/close cycles of the REOPEN case.
    pub cycles: u32,
    /// The report as JSON instead of the matrix.
    pub json: bool,
    /// Also write the report as JUnit XML here.
    pub junit: Option<PathBuf>,
}

/// `vport run conformance`. Values on the command line are checked before anything is built
/// (a filter that selects nothing, a JUnit file that cannot be created: usage errors). The
/// results are on `out` before a JUnit file that cannot be written is reported.
pub fn conformance(cmd: ConformanceCommand, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    crate::usage::check_filter(cmd.filter.as_deref())?;
    if cmd.list {
        let cases = conformance::selected_cases(cmd.filter.as_deref());
        if cmd.json {
            writeln!(out, "{}", serde_json::to_string(&cases)?).map_err(stdout_err)?;
        } else {
            for c in cases {
                writeln!(out, "{:<36} {:<10} {}", c.name, c.group, c.expected).map_err(stdout_err)?;
            }
        }
        return Ok(());
    }
    if let Some(path) = &cmd.junit {
        crate::usage::check_output_file("--junit", path)?;
    }
    let img = prepare(&cmd.image, progress)?;
    let mut opts = SuiteOptions::new(img);
    opts.accel = cmd.accel;
    opts.platform = cmd.platform;
    opts.filter = cmd.filter;
    opts.reopen_cycles = cmd.cycles;
    opts.agent_args = vec!["--log-level".into(), cmd.agent_log_level];
    let report = conformance::run(&opts, &mut |ev| {
        if let Some(line) = human::progress_line(ev) {
            progress.say(&line);
        }
    })?;
    super::write_suite_report(&report, cmd.json, cmd.junit, "", out)?;
    let infra = format!("{} vm(s) could not be set up", report.infra_errors.len());
    super::suite_outcome(&report, infra, "conformance cases failed")
}
