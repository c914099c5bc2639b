//! `vport run matrix`: the suites once per platform cell ([`crate::matrix`]), progress on
//! stderr while the cells run, the summary table (or JSON) on stdout, and in the output
//! directory: a directory per cell (each suite's JSON report, log and JUnit), `junit.xml` (a
//! test suite per cell) and `summary.json`.

use super::image::{prepare, ImageChoice};
use super::{stdout_err, CommandError, Progress};
use crate::matrix::{self, plan, summary, Axes, KernelChoice, QemuChoice, RunOptions, Suite};
use crate::qemu::{Accel, AccelChoice};
use crate::speed::SpeedFactor;
use crate::usage::UsageError;
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// The `--kernel-deb` value that names the cached default kernel beside packages.
pub const CACHED_KERNEL: &str = "cached";

/// What `vport run matrix` is asked for. An empty list is the default of its axis.
#[derive(Debug, Clone)]
pub struct MatrixCommand {
    /// QEMU binaries (empty: qemu-system-x86_64 on PATH).
    pub qemus: Vec<PathBuf>,
    /// Kernel packages (empty: the cached one).
    pub kernel_debs: Vec<PathBuf>,
    /// Machine types.
    pub machines: Vec<String>,
    /// vCPU counts.
    pub cpus: Vec<u32>,
    /// Accelerators.
    pub accels: Vec<Accel>,
    /// The suites of every cell.
    pub suites: Vec<Suite>,
    /// Cells at once (`None`: half the cores, at least one).
    pub jobs: Option<usize>,
    /// Where the cells' directories and the summary go.
    pub out_dir: PathBuf,
    /// The agent every suite puts in its image (`None`: found as every command finds it).
    pub agent: Option<PathBuf>,
    /// Longest run of one suite.
    pub suite_deadline: Duration,
    /// The summary as JSON instead of the table.
    pub json: bool,
    /// The suites' speed factor (`None`: measured by a calibration boot).
    pub speed_factor: Option<SpeedFactor>,
}

/// `vport run matrix`. Every value is checked before a cell runs (a QEMU that does not answer
/// `--version`, a kernel package that is not there, an output directory that cannot be
/// written: usage errors, exit 2).
pub fn matrix(cmd: MatrixCommand, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    crate::usage::check_output_dir("--out", &cmd.out_dir)?;
    let qemus = qemu_choices(&cmd.qemus)?;
    let mut kernels = Vec::new();
    for deb in &cmd.kernel_debs {
        if deb.as_os_str() == CACHED_KERNEL {
            kernels.push(KernelChoice::cached());
            continue;
        }
        if !deb.is_file() {
            return Err(UsageError::BadValue {
                option: "--kernel-deb",
                value: deb.display().to_string(),
                reason: "no such file".into(),
                fix:
                    "give a linux-image-*.deb (scripts/fetch-platforms puts Linux 6.12's in the cache) or `cached` for \
                      the default kernel",
            }
            .into());
        }
        kernels.push(KernelChoice::deb(deb.clone()));
    }
    if kernels.is_empty() {
        kernels.push(KernelChoice::cached());
    }
    // Each kernel's guest image, built (or found in the cache) before any cell runs: a package
    // that cannot make an image fails here, once, and each cell is named by its kernel's release.
    let mut images = Vec::new();
    for kernel in &mut kernels {
        let choice = ImageChoice { kernel_deb: kernel.deb.clone(), agent: cmd.agent.clone(), ..Default::default() };
        let image = prepare(&choice, progress)?;
        kernel.label.clone_from(&image.kernel_release);
        images.push(image);
    }
    let axes = Axes {
        qemus: qemus.iter().map(|(q, _)| q.clone()).collect(),
        kernels,
        machines: cmd.machines.clone(),
        cpus: cmd.cpus.clone(),
        accels: cmd.accels.clone(),
    };
    let kvm_verdicts =
        if cmd.accels.contains(&Accel::Kvm) { kvm_verdicts(&qemus, &axes.kernels, &images) } else { Vec::new() };
    let cells: Vec<_> = matrix::cells(&axes)
        .into_iter()
        .map(|cell| {
            let kvm = kvm_verdicts
                .iter()
                .find(|(q, k, _)| *q == cell.qemu.path && *k == cell.kernel.label)
                .map_or(Ok(()), |(_, _, v)| v.clone());
            let skip = cell.skip_reason(&kvm);
            (cell, skip)
        })
        .collect();
    let runnable = cells.iter().filter(|(_, skip)| skip.is_none()).count();
    let jobs = cmd
        .jobs
        .unwrap_or_else(|| plan::default_jobs(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)));
    progress.say(&format!(
        "matrix: {} cell(s), {runnable} to run, {jobs} at a time; suites {}; results in {}",
        cells.len(),
        cmd.suites.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
        cmd.out_dir.display()
    ));
    let speed = match cmd.speed_factor {
        Some(f) => {
            progress.say(&format!("matrix: speed factor {f} (given)"));
            f
        }
        None => calibrate(&images[0], progress)?,
    };
    let vport = std::env::current_exe()
        .map_err(|e| CommandError::CheckFailed(format!("cannot find the running vport binary: {e}")))?;
    let mut extra_args: Vec<OsString> = Vec::new();
    if let Some(agent) = &cmd.agent {
        extra_args.extend(["--agent".into(), agent.clone().into_os_string()]);
    }
    extra_args.extend(["--speed-factor".into(), speed.to_string().into()]);
    let say = |line: &str| progress.say(&format!("matrix: {line}"));
    let opts = RunOptions {
        vport,
        out_dir: cmd.out_dir.clone(),
        jobs,
        suites: cmd.suites.clone(),
        extra_args,
        suite_deadline: cmd.suite_deadline,
        progress: &say,
    };
    let results = matrix::run::run(cells, &opts);
    let mut json = summary::render_json(&results);
    json["speed_factor"] = speed.get().into();
    if cmd.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?).map_err(stdout_err)?;
    } else {
        write!(out, "{}", summary::render_text(&results)).map_err(stdout_err)?;
    }
    for (name, text) in
        [("junit.xml", summary::render_junit(&results)), ("summary.json", serde_json::to_string_pretty(&json)?)]
    {
        let path = cmd.out_dir.join(name);
        std::fs::write(&path, text).map_err(|source| CommandError::Report { what: "matrix", path, source })?;
    }
    let code = summary::exit_code(&results);
    if code == crate::exit::ExitCode::Success {
        Ok(())
    } else {
        Err(CommandError::Suite {
            code,
            message: "matrix cells did not pass (see the table and each cell's log)".into(),
        })
    }
}

/// The machine's speed factor, from one calibration boot: the first kernel's guest under TCG
/// on the default QEMU, its boot to HELLO against [`crate::speed::REFERENCE_BOOT`]. A boot
/// that fails is an error here, once, rather than in every cell.
fn calibrate(image: &crate::image::GuestImage, progress: &Progress) -> Result<SpeedFactor, CommandError> {
    progress.say("matrix: calibration boot (the speed factor of the suites' deadlines)");
    let opts = crate::hello::HelloOptions { accel: AccelChoice::Tcg, pings: 1, ..Default::default() };
    let report = crate::hello::run(image, &opts, &mut |line| log::debug!("calibration: {line}")).map_err(|e| {
        CommandError::Suite {
            code: crate::exit::ExitCode::Infrastructure,
            message: format!(
                "the calibration boot failed, so no cell can run ({e}); pass --speed-factor to skip it, \
                 or see `vport hello --accel tcg`"
            ),
        }
    })?;
    let boot = Duration::from_millis(report.boot_to_hello_ms);
    let factor = SpeedFactor::from_boot(boot);
    progress.say(&format!(
        "matrix: speed factor {factor} (boot to HELLO {:.1} s against {} s)",
        boot.as_secs_f64(),
        crate::speed::REFERENCE_BOOT.as_secs()
    ));
    Ok(factor)
}

/// Whether KVM runs each kernel's guest with each QEMU: (QEMU path, kernel label, verdict). The
/// probe boots the kernel the cells would boot (vport's cached verdict when it has one): a
/// machine where KVM opens but cannot run the guest's kernel is caught here, not in a cell.
fn kvm_verdicts(
    qemus: &[(QemuChoice, PathBuf)],
    kernels: &[KernelChoice],
    images: &[crate::image::GuestImage],
) -> Vec<(Option<PathBuf>, String, Result<(), String>)> {
    let cache = crate::cache::cache_dir();
    let mut out = Vec::new();
    for (kernel, image) in kernels.iter().zip(images) {
        for (qemu, binary) in qemus {
            let verdict = crate::qemu::probe::kvm_runs_guests(binary, Some(&image.kernel), &cache);
            out.push((qemu.path.clone(), kernel.label.clone(), verdict));
        }
    }
    out
}

/// Each QEMU with its version for a label; the system's when none is given.
fn qemu_choices(paths: &[PathBuf]) -> Result<Vec<(QemuChoice, PathBuf)>, CommandError> {
    let given: Vec<Option<&PathBuf>> = if paths.is_empty() { vec![None] } else { paths.iter().map(Some).collect() };
    let mut out = Vec::new();
    for path in given {
        let bad = |reason: String| UsageError::BadValue {
            option: "--qemu",
            value: path.map_or_else(|| crate::qemu::QEMU_BINARY.to_string(), |p| p.display().to_string()),
            reason,
            fix: "give a qemu-system-x86_64 binary (scripts/fetch-platforms unpacks QEMU 10.0 into the cache)",
        };
        let binary = crate::qemu::find_qemu(path.map(|p| p.as_path())).map_err(|e| bad(e.to_string()))?;
        let version = crate::qemu::query_version(&binary).map_err(bad)?;
        out.push((QemuChoice { label: version.to_string(), path: path.cloned() }, binary));
    }
    Ok(out)
}
