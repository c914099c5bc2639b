//! `vport bench`: the bench on a real VM, a progress line per sample on stderr, the table (or
//! JSON) on stdout, optionally the JSON to a file and SVG plots into a directory as well.

use super::image::{prepare, ImageChoice};
use super::{stdout_err, CommandError, Progress};
use crate::bench::{self, BenchOptions, BenchSize};
use crate::qemu::AccelChoice;
use std::io::Write;
use std::path::PathBuf;

/// What `vport bench` is asked for.
#[derive(Debug, Clone)]
pub struct BenchCommand {
    /// The image.
    pub image: ImageChoice,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Which QEMU, machine type and vCPU count the VMs run on.
    pub platform: crate::qemu::Platform,
    /// How much to measure.
    pub size: BenchSize,
    /// The report as JSON instead of the table.
    pub json: bool,
    /// Also write the JSON report here.
    pub json_out: Option<PathBuf>,
    /// Also draw the SVG plots into this directory.
    pub plots: Option<PathBuf>,
}

/// `vport bench`. A report file that cannot be created is a usage error before anything boots;
/// the results are on `out` before a report file that cannot be written is reported. Goals
/// missed are in the report, not in the exit code: only a wrong result (bytes not as sent) or
/// a VM that could not be driven fails the command.
pub fn bench(cmd: BenchCommand, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    if let Some(path) = &cmd.json_out {
        crate::usage::check_output_file("--json-out", path)?;
    }
    if let Some(dir) = &cmd.plots {
        crate::usage::check_output_dir("--plots", dir)?;
    }
    let image = prepare(&cmd.image, progress)?;
    let opts = BenchOptions { image, accel: cmd.accel, platform: cmd.platform, size: cmd.size };
    let mut report = bench::run(&opts, &mut |line| progress.say(&format!("bench: {line}")))?;
    // The agent's own size (the release build is stripped and static), beside the figures.
    match crate::image::resolve_agent(cmd.image.agent.as_deref()).map(|p| std::fs::metadata(&p).map(|m| (p, m.len()))) {
        Ok(Ok((_, size))) => report.environment.push(("agent binary".into(), format!("{size} bytes"))),
        Ok(Err(e)) => log::warn!("cannot read the agent binary's size: {e}"),
        Err(e) => log::warn!("cannot find the agent binary for its size: {e}"),
    }
    let json = serde_json::to_string_pretty(&report.to_json())?;
    if cmd.json {
        writeln!(out, "{json}").map_err(stdout_err)?;
    } else {
        write!(out, "{}", report.render_text()).map_err(stdout_err)?;
    }
    out.flush().map_err(stdout_err)?;
    if let Some(path) = cmd.json_out {
        if let Err(source) = std::fs::write(&path, format!("{json}\n")) {
            return Err(CommandError::Report { what: "JSON", path, source });
        }
    }
    if let Some(dir) = cmd.plots {
        for (name, svg) in bench::plot::write_all(&report).map_err(CommandError::Plot)? {
            let path = dir.join(name);
            if let Err(source) = std::fs::write(&path, svg) {
                return Err(CommandError::Report { what: "SVG plot", path, source });
            }
            progress.say(&format!("bench: plot {}", path.display()));
        }
    }
    Ok(())
}
