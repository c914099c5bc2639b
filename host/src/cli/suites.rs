//! The suites' arguments: `vport bench`, `vport run conformance | faults | soak | matrix`, and the
//! platform options they share.

use super::{parse_accel, ImageArgs};
use clap::Args;
use std::path::PathBuf;
use vport_host::qemu::accel::AccelChoice;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    /// Accelerator: auto tries KVM once (the verdict is cached) and falls back to TCG.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub(crate) accel: AccelChoice,
    #[command(flatten)]
    pub(crate) platform: PlatformArgs,
    /// 8 MiB a sample, 3 rounds, 2 s idle (the default; well under 2 minutes under TCG).
    #[arg(long, conflicts_with = "full")]
    pub(crate) quick: bool,
    /// 64 MiB a sample, 5 rounds, 10 s idle.
    #[arg(long)]
    pub(crate) full: bool,
    /// MiB each sample moves (instead of the preset's), at most 192 (the guest's stream
    /// directory is in its RAM).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=vport_host::bench::MAX_SAMPLE_MIB))]
    pub(crate) mib: Option<u64>,
    /// Rounds: samples of each figure (instead of the preset's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) rounds: Option<u32>,
    /// Seconds the agent is watched idle (instead of the preset's).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) idle: Option<u64>,
    /// Print the report as one JSON object on stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the JSON report to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) json_out: Option<PathBuf>,
    /// Also draw SVG plots into DIR (created if missing): throughput-guest-to-host.svg and
    /// throughput-host-to-guest.svg (MB/s against write size: raw, plain, acked) and
    /// round-trips.svg (the distributions of the round trips).
    #[arg(long, value_name = "DIR")]
    pub(crate) plots: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct MatrixArgs {
    /// QEMU binaries, comma-separated or repeated (default: qemu-system-x86_64 on PATH, or
    /// VPORT_QEMU).
    #[arg(long = "qemu", value_name = "PATH", value_delimiter = ',')]
    pub(crate) qemus: Vec<PathBuf>,
    /// Guest kernel packages (linux-image-*.deb), comma-separated or repeated; `cached` is the
    /// default kernel in vport's cache (the default when none is given), e.g.
    /// `--kernel-deb cached,$kernel_deb` for Linux 6.1 and 6.12.
    #[arg(long = "kernel-deb", value_name = "DEB", value_delimiter = ',')]
    pub(crate) kernel_debs: Vec<PathBuf>,
    /// Machine types: pc, q35 (virtio-serial-pci), microvm (virtio-serial-device on virtio-mmio).
    #[arg(long = "machine", value_name = "NAME", value_delimiter = ',', default_value = "pc,q35", value_parser = vport_host::qemu::MACHINES)]
    pub(crate) machines: Vec<String>,
    /// vCPU counts.
    #[arg(long = "cpus", value_name = "N", value_delimiter = ',', default_value = "1,2", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) cpus: Vec<u32>,
    /// Accelerators: tcg, kvm (a KVM cell is skipped, with the probe's reason, where KVM does
    /// not run a guest).
    #[arg(long = "accel", value_name = "NAME", value_delimiter = ',', default_value = "tcg,kvm", value_parser = parse_matrix_accel)]
    pub(crate) accels: Vec<vport_host::qemu::Accel>,
    /// The suites each cell runs: conformance, faults, bench.
    #[arg(long = "suite", value_name = "NAME", value_delimiter = ',', default_value = "conformance,faults,bench", value_parser = vport_host::matrix::Suite::from_name)]
    pub(crate) suites: Vec<vport_host::matrix::Suite>,
    /// Cells at once (default: half the cores, at least one: a TCG guest keeps a core busy).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) jobs: Option<u16>,
    /// The directory of the results: one directory per cell (each suite's JSON, log and JUnit),
    /// junit.xml and summary.json (created if missing).
    #[arg(long, value_name = "DIR", default_value = "vport-matrix")]
    pub(crate) out: PathBuf,
    /// The statically linked vport-agent every suite puts in its image.
    #[arg(long, value_name = "PATH", env = "VPORT_AGENT")]
    pub(crate) agent: Option<PathBuf>,
    /// Minutes one suite of one cell may run before it is stopped (an error, not a hang).
    #[arg(long, value_name = "MIN", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=1440))]
    pub(crate) suite_deadline: u64,
    /// Print the summary as one JSON object on stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// The speed factor every suite's failure deadlines are stretched by (1 to 10). Default:
    /// measured from a calibration boot (a TCG guest's boot to HELLO against 6 s).
    #[arg(long, value_name = "X", env = "VPORT_SPEED_FACTOR")]
    pub(crate) speed_factor: Option<vport_host::speed::SpeedFactor>,
}

fn parse_matrix_accel(s: &str) -> Result<vport_host::qemu::Accel, String> {
    match s {
        "tcg" => Ok(vport_host::qemu::Accel::Tcg),
        "kvm" => Ok(vport_host::qemu::Accel::Kvm),
        _ => Err(format!("unknown accelerator `{s}`: give tcg, kvm or both (tcg,kvm)")),
    }
}

#[derive(Args)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    /// Accelerator: auto tries KVM once (the verdict is cached) and falls back to TCG.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub(crate) accel: AccelChoice,
    #[command(flatten)]
    pub(crate) platform: PlatformArgs,
    /// 1,000 reconnects, 500 reopens, 50 stop/cont, 10 replugs (the default; about a minute).
    #[arg(long, conflicts_with = "full")]
    pub(crate) quick: bool,
    /// 10,000 reconnects, 10,000 reopens, 1,000 stop/cont, 100 replugs.
    #[arg(long)]
    pub(crate) full: bool,
    /// Host disconnects and reconnects (instead of the preset's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) reconnects: Option<u64>,
    /// Guest closes and reopens (instead of the preset's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) reopens: Option<u64>,
    /// stop/cont pairs (instead of the preset's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) stop_conts: Option<u64>,
    /// Unplugs and replugs under traffic (instead of the preset's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) replugs: Option<u64>,
    /// Print the report as one JSON object on stdout instead of the matrix.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the report as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) junit: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct FaultsArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    /// Accelerator: auto tries KVM once (the verdict is cached) and falls back to TCG.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub(crate) accel: AccelChoice,
    #[command(flatten)]
    pub(crate) platform: PlatformArgs,
    /// Each fault 3 times (the default).
    #[arg(long, conflicts_with_all = ["full", "repeats"])]
    pub(crate) quick: bool,
    /// Each fault 50 times.
    #[arg(long, conflicts_with = "repeats")]
    pub(crate) full: bool,
    /// Each fault this many times.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) repeats: Option<u32>,
    /// Only this fault (repeatable): host-drop, guest-close-reopen, stop-cont,
    /// host-drop-during-stop, host-drop-queue-full, unplug-replug, agent-kill, migrate-live,
    /// migrate-file, restore-twice, system-reset, guest-reboot, qemu-kill.
    #[arg(long = "fault", value_name = "NAME", value_parser = vport_host::faults::Fault::from_name)]
    pub(crate) faults: Vec<vport_host::faults::Fault>,
    /// Seconds a connection may yield no session while the VM runs before the host leaves and
    /// connects again (the transfers' liveness deadline).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) stall: u64,
    /// Also write the run's life-cycle trace to FILE (JSON lines: every VM's ports as vm1/...,
    /// vm2/..., the injections and liveness reconnects as notes; check it with `vport trace
    /// check FILE`). Each case's part is judged by the checker in any case.
    #[arg(long, value_name = "FILE")]
    pub(crate) trace: Option<PathBuf>,
    /// Print the report as one JSON object on stdout instead of the matrix.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the report as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) junit: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ConformanceArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    /// Accelerator: auto tries KVM once (the verdict is cached) and falls back to TCG.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub(crate) accel: AccelChoice,
    #[command(flatten)]
    pub(crate) platform: PlatformArgs,
    /// Run only the cases whose name contains one of these comma-separated strings (see --list).
    #[arg(long)]
    pub(crate) filter: Option<String>,
    /// Print the cases (those --filter selects) with their group and expected outcome, and exit
    /// without booting anything.
    #[arg(long)]
    pub(crate) list: bool,
    /// Log level of vport-agent inside the guest (shown in an ERROR case's console tail).
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub(crate) agent_log_level: String,
    /// Open/close cycles of the fast REOPEN case.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) cycles: u32,
    /// Print the report as one JSON object on stdout instead of the matrix.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the report as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) junit: Option<PathBuf>,
}

/// Which QEMU, machine type and vCPU count a suite's VMs run on (`vport run matrix` runs a
/// suite once per combination).
#[derive(Args, Clone)]
pub(crate) struct PlatformArgs {
    /// The QEMU binary (default: qemu-system-x86_64 on PATH), e.g. one scripts/fetch-platforms
    /// unpacked into the cache.
    #[arg(long, value_name = "PATH", env = "VPORT_QEMU")]
    pub(crate) qemu: Option<PathBuf>,
    /// QEMU machine type of the suite's VMs: pc (i440FX, the default) or q35 (PCIe), with
    /// virtio-serial-pci; microvm (no PCI), with virtio-serial-device on virtio-mmio.
    #[arg(long, value_parser = vport_host::qemu::MACHINES)]
    pub(crate) machine: Option<String>,
    /// vCPUs of the suite's VMs (default: the suite's own, one; the bench's many-ports VMs keep
    /// their 1 and 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) cpus: Option<u32>,
    /// Stretch the suite's failure deadlines (a HELLO, a reply, QEMU's start, a migration) by
    /// this factor, 1 to 10, for a slow or busy machine; measurement windows are not stretched.
    /// `vport run matrix` measures it from a calibration boot and passes it on.
    #[arg(long, value_name = "X", env = "VPORT_SPEED_FACTOR", default_value = "1")]
    pub(crate) speed_factor: vport_host::speed::SpeedFactor,
}

impl PlatformArgs {
    /// The platform these options name, with the speed factor put into effect: it is
    /// process-wide ([`vport_host::speed::set`]) and read by every failure deadline, so this is
    /// called once, before the suite starts.
    pub(crate) fn take_effect(&self) -> vport_host::qemu::Platform {
        vport_host::speed::set(self.speed_factor);
        vport_host::qemu::Platform { qemu: self.qemu.clone(), machine: self.machine.clone(), cpus: self.cpus }
    }
}
