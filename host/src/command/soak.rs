//! `vport run soak`: the soak on a real VM, progress on stderr while it runs, the matrix (or
//! JSON) on stdout, optionally JUnit XML to a file.

use super::image::{prepare, ImageChoice};
use super::{CommandError, Progress};
use crate::qemu::AccelChoice;
use crate::report::human;
use crate::soak::{self, SoakCounts, SoakOptions};
use std::io::Write;
use std::path::PathBuf;

/// What `vport run soak` is asked for.
#[derive(Debug, Clone)]
pub struct SoakCommand {
    /// The image.
    pub image: ImageChoice,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Which QEMU, machine type and vCPU count the VMs run on.
    pub platform: crate::qemu::Platform,
    /// How many of each cycle.
    pub counts: SoakCounts,
    /// The report as JSON instead of the matrix.
    pub json: bool,
    /// Also write the report as JUnit XML here.
    pub junit: Option<PathBuf>,
}

/// `vport run soak`. A JUnit file that cannot be created is a usage error before anything
/// boots; the results are on `out` before a JUnit file that cannot be written is reported.
pub fn soak(cmd: SoakCommand, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    if let Some(path) = &cmd.junit {
        crate::usage::check_output_file("--junit", path)?;
    }
    let image = prepare(&cmd.image, progress)?;
    let opts = SoakOptions { image, accel: cmd.accel, platform: cmd.platform, counts: cmd.counts };
    let report = soak::run(&opts, &mut |ev| {
        if let Some(line) = human::progress_line(ev) {
            progress.say(&line);
        }
    });
    super::write_suite_report(&report, cmd.json, cmd.junit, "", out)?;
    super::suite_outcome(&report, "the soak's vm could not be set up".into(), "soak cases failed")
}
