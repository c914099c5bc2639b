//! `vport run faults`: the fault suite on a real VM, progress on stderr while it runs, the
//! matrix (or JSON) on stdout, optionally JUnit XML to a file.

use super::image::{prepare, ImageChoice};
use super::{CommandError, Progress};
use crate::faults::{self, FaultsOptions};
use crate::qemu::AccelChoice;
use crate::report::human;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// What `vport run faults` is asked for.
#[derive(Debug, Clone)]
pub struct FaultsCommand {
    /// The image.
    pub image: ImageChoice,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Which QEMU, machine type and vCPU count the VMs run on.
    pub platform: crate::qemu::Platform,
    /// Repetitions of each fault.
    pub repeats: u32,
    /// The faults (empty: all).
    pub faults: Vec<faults::Fault>,
    /// The transfers' liveness deadline.
    pub stall: Duration,
    /// Also write the run's trace here.
    pub trace: Option<PathBuf>,
    /// The report as JSON instead of the matrix.
    pub json: bool,
    /// Also write the report as JUnit XML here.
    pub junit: Option<PathBuf>,
}

/// `vport run faults`. A JUnit or trace file that cannot be created is a usage error before
/// anything boots; the results are on `out` before a JUnit file that cannot be written is reported.
pub fn faults(cmd: FaultsCommand, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    if let Some(path) = &cmd.junit {
        crate::usage::check_output_file("--junit", path)?;
    }
    if let Some(path) = &cmd.trace {
        crate::usage::check_output_file("--trace", path)?;
    }
    let img = prepare(&cmd.image, progress)?;
    let mut opts = FaultsOptions::new(img);
    opts.accel = cmd.accel;
    opts.platform = cmd.platform;
    opts.repeats = cmd.repeats;
    if !cmd.faults.is_empty() {
        opts.faults = cmd.faults;
    }
    opts.stall = cmd.stall;
    opts.trace = cmd.trace;
    let (report, figures) = faults::run(&opts, &mut |ev| {
        if let Some(line) = human::progress_line(ev) {
            progress.say(&line);
        }
    });
    let summary = if figures.is_empty() {
        String::new()
    } else {
        format!("\nper fault (median / max over its repetitions):\n{}", faults::summary::render(&figures))
    };
    super::write_suite_report(&report, cmd.json, cmd.junit, &summary, out)?;
    super::suite_outcome(&report, "the fault suite's vm could not be set up".into(), "fault cases failed")
}
