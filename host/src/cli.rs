//! The `vport` command line: what each command and option means (clap derive). `main.rs`
//! carries the commands out; this module only describes and parses them.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vport_host::command;
use vport_host::command::boot::VmSettings;
use vport_host::command::help::{
    ATTACH_QMP_HELP, ATTACH_SOCKET_HELP, BENCH_ABOUT, CONNECT_ABOUT, ENVIRONMENT, FAULTS_ABOUT, MATRIX_ABOUT,
    SOAK_ABOUT, TRANSFER_ABOUT, WATCH_ABOUT,
};
use vport_host::command::image::ImageChoice;
use vport_host::exit::HELP as EXIT_CODES;
use vport_host::hello;
use vport_host::image::GuestImage;
use vport_host::qemu::accel::AccelChoice;

#[derive(Parser)]
#[command(
    name = "vport",
    version,
    about = "Boot a QEMU VM with vport-agent and test the life cycle of its virtio-serial ports",
    long_about = "vport boots qemu-system-x86_64 with a small Debian-kernel guest that runs vport-agent, \
connects to the VM's virtio-serial ports from the host, and checks what both sides observe.\n\n\
First time on a machine: scripts/bootstrap (installs qemu, busybox, the kernel package), then \
scripts/build-agent (the static guest agent).",
    after_help = format!("{ENVIRONMENT}\n\n{EXIT_CODES}")
)]
pub(crate) struct Cli {
    /// Diagnostics on stderr: error, warn, info, debug (full QEMU command lines, QMP traffic), trace.
    #[arg(long, global = true, default_value = "warn", env = "VPORT_LOG")]
    pub(crate) log_level: log::LevelFilter,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Build (or reuse from the cache) the guest kernel + initramfs.
    #[command(subcommand, after_help = EXIT_CODES)]
    Image(ImageCommand),
    /// Boot a VM and keep it running; print how to reach each port. Ctrl-C stops it.
    #[command(after_help = EXIT_CODES)]
    Boot(BootArgs),
    /// Boot a VM, handshake with the agent, ping it, and report.
    #[command(after_help = EXIT_CODES)]
    Hello(HelloArgs),
    /// Boot a VM and show the life cycle of its ports live (guest open, host connected,
    /// session state, bytes each way); commands on stdin make the guest close and reopen.
    #[command(after_help = EXIT_CODES, long_about = WATCH_ABOUT)]
    Watch(WatchArgs),
    /// Bridge a port of a VM started by `vport boot` to stdin/stdout (like socat).
    #[command(after_help = EXIT_CODES, long_about = CONNECT_ABOUT)]
    Connect(ConnectArgs),
    /// Copy a host file into the guest's stream directory through a port, surviving
    /// interruptions, digest verified.
    #[command(after_help = EXIT_CODES, long_about = TRANSFER_ABOUT)]
    Send(SendArgs),
    /// Copy a file of the guest's stream directory to the host through a port, surviving
    /// interruptions, digest verified.
    #[command(after_help = EXIT_CODES, long_about = TRANSFER_ABOUT)]
    Recv(RecvArgs),
    /// Measure throughput (raw port, plain, acknowledged; both ways) and the agent's idle
    /// cost on a real VM, as ratios to the raw port of the same boot.
    #[command(after_help = EXIT_CODES, long_about = BENCH_ABOUT)]
    Bench(BenchArgs),
    /// Work with life-cycle traces (JSON lines, see docs/trace.md).
    #[command(subcommand, after_help = EXIT_CODES)]
    Trace(TraceCommand),
    /// Run a test suite against real VMs.
    #[command(subcommand, after_help = EXIT_CODES)]
    Run(RunCommand),
}

#[derive(Subcommand)]
pub(crate) enum RunCommand {
    /// Check every documented behaviour of virtio-serial ports on real VMs (docs/conformance.md)
    /// and print a matrix: case, expected, observed, PASS / FAIL / QUIRK.
    #[command(
        long_about = "Check every documented behaviour of virtio-serial ports on real VMs (docs/conformance.md) \
and print a matrix: case, expected, observed, PASS / FAIL / QUIRK. A QUIRK is the VM differing from the spec \
in a way the suite explains; it does not fail the run. A VM group that cannot be set up marks its cases NOT RUN \
and ends the run with exit 3.\n\n--filter and --junit are checked before anything is built: a filter that \
selects no case, or a JUnit file that cannot be created, is a usage error (exit 2). If the JUnit file cannot be \
written at the end, the matrix (or --json) is printed first, then the error (exit 3).",
        after_help = EXIT_CODES
    )]
    Conformance(ConformanceArgs),
    /// Inject faults during a two-way acknowledged transfer on a real VM, each repeated, and
    /// print what recovery cost (docs/reliability.md).
    #[command(
        long_about = FAULTS_ABOUT,
        after_help = EXIT_CODES
    )]
    Faults(FaultsArgs),
    /// Drive a port's life cycle round thousands of times on a real VM (reconnects, reopens,
    /// stop/cont, unplug/replug under traffic) and check that nothing accumulates.
    #[command(long_about = SOAK_ABOUT, after_help = EXIT_CODES)]
    Soak(SoakArgs),
    /// Run the suites (conformance, faults --quick, bench --quick) once per platform cell:
    /// every combination of QEMU, guest kernel, machine type, vCPUs and accelerator.
    #[command(long_about = MATRIX_ABOUT, after_help = EXIT_CODES)]
    Matrix(MatrixArgs),
}

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
    /// Machine types; microvm is listed and skipped (its virtio-mmio transport is not built).
    #[arg(long = "machine", value_name = "NAME", value_delimiter = ',', default_value = "pc,q35", value_parser = ["pc", "q35", "microvm"])]
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

#[derive(Subcommand)]
pub(crate) enum TraceCommand {
    /// Judge a trace: strict open/close alternation on each side, READY only from CONNECTED,
    /// no data outside READY, no duplicate OPENED. Each violation names its record numbers.
    /// Notes (such as coalesced VSERPORT_CHANGE events) are not violations; a file that cannot
    /// be read or is not a valid trace is exit 3, and the message names the line.
    #[command(after_help = EXIT_CODES)]
    Check {
        /// The trace file (`-` for standard input).
        file: PathBuf,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct ConnectArgs {
    /// Port name, for example org.vport.0.
    #[arg(required_unless_present_any = ["socket", "list"])]
    pub(crate) port: Option<String>,
    /// QEMU pid of the VM to use when several have the port.
    #[arg(long)]
    pub(crate) vm: Option<u32>,
    /// Connect to this chardev socket directly instead of looking the port up (QEMU cannot be
    /// asked whether another client holds it; see --help).
    #[arg(long, conflicts_with_all = ["port", "vm"])]
    pub(crate) socket: Option<PathBuf>,
    /// Seconds to wait for QEMU to take the connection; after that the port is reported busy.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) timeout: u64,
    /// List the ports of the running VMs started by `vport boot`, and exit.
    #[arg(long, conflicts_with_all = ["port", "socket"])]
    pub(crate) list: bool,
}

/// Where a transfer goes, and how patiently (`vport send` and `vport recv`).
#[derive(Args)]
pub(crate) struct TransferTarget {
    /// Port name, for example org.vport.0 (`vport connect --list` shows them).
    #[arg(long, required_unless_present = "socket")]
    pub(crate) port: Option<String>,
    /// QEMU pid of the VM to use when several have the port.
    #[arg(long)]
    pub(crate) vm: Option<u32>,
    /// Use this chardev socket directly instead of looking the port up.
    #[arg(long, conflicts_with_all = ["port", "vm"])]
    pub(crate) socket: Option<PathBuf>,
    /// Seconds to wait for a session with the agent, at the start and after each interruption.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) timeout: u64,
    /// Seconds a session may make no progress before vport leaves it and resumes in a new one.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) stall: u64,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct SendArgs {
    /// The host file to send.
    pub(crate) file: PathBuf,
    /// Its name in the guest's stream directory (default: the file's own name).
    #[arg(long = "as", value_name = "NAME")]
    pub(crate) name: Option<String>,
    #[command(flatten)]
    pub(crate) target: TransferTarget,
}

#[derive(Args)]
pub(crate) struct RecvArgs {
    /// The file's name in the guest's stream directory.
    pub(crate) name: String,
    /// The host file to write (default: NAME in the current directory).
    #[arg(long, short = 'o', value_name = "DEST")]
    pub(crate) output: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) target: TransferTarget,
}

impl TransferTarget {
    pub(crate) fn command(self, direction: command::transfer::Direction) -> command::transfer::TransferCommand {
        command::transfer::TransferCommand {
            port: self.port,
            vm: self.vm,
            socket: self.socket,
            direction,
            session_timeout: Duration::from_secs(self.timeout),
            stall_timeout: Duration::from_secs(self.stall),
            json: self.json,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum ImageCommand {
    /// Build the image, or reuse an identical one, and print where it is.
    #[command(after_help = EXIT_CODES)]
    Build {
        #[command(flatten)]
        image: ImageArgs,
        /// Print the result as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
pub(crate) struct ImageArgs {
    /// Your own bzImage instead of the Debian kernel (virtio built in, or see --kernel-modules).
    #[arg(long, env = "VPORT_KERNEL")]
    pub(crate) kernel: Option<PathBuf>,
    /// The lib/modules/RELEASE directory that goes with --kernel.
    #[arg(long, env = "VPORT_KERNEL_MODULES", requires = "kernel")]
    pub(crate) kernel_modules: Option<PathBuf>,
    /// A linux-image-*.deb to take the kernel and modules from (default: the one in the cache,
    /// downloaded with apt-get when absent).
    #[arg(long, conflicts_with = "kernel")]
    pub(crate) kernel_deb: Option<PathBuf>,
    /// The statically linked vport-agent (default: the first static one of: scripts/build-agent's
    /// build beside this vport's build, vport-agent beside this vport (cargo install), on PATH,
    /// /usr/libexec/vport/, /usr/local/libexec/vport/, /usr/lib/vport/).
    #[arg(long, env = "VPORT_AGENT")]
    pub(crate) agent: Option<PathBuf>,
    /// A statically linked busybox.
    #[arg(long, env = "VPORT_BUSYBOX")]
    pub(crate) busybox: Option<PathBuf>,
}

impl ImageArgs {
    pub(crate) fn choice(&self) -> ImageChoice {
        ImageChoice {
            kernel: self.kernel.clone(),
            kernel_modules: self.kernel_modules.clone(),
            kernel_deb: self.kernel_deb.clone(),
            agent: self.agent.clone(),
            busybox: self.busybox.clone(),
        }
    }
}

/// Which QEMU, machine type and vCPU count a suite's VMs run on (`vport run matrix` runs a
/// suite once per combination).
#[derive(Args, Clone)]
pub(crate) struct PlatformArgs {
    /// The QEMU binary (default: qemu-system-x86_64 on PATH), e.g. one scripts/fetch-platforms
    /// unpacked into the cache.
    #[arg(long, value_name = "PATH", env = "VPORT_QEMU")]
    pub(crate) qemu: Option<PathBuf>,
    /// QEMU machine type of the suite's VMs: pc (i440FX, the default) or q35 (PCIe);
    /// virtio-serial-pci on both.
    #[arg(long, value_parser = vport_host::qemu::MACHINES)]
    pub(crate) machine: Option<String>,
    /// vCPUs of the suite's VMs (default: the suite's own, one; the bench's many-ports VMs keep
    /// their 1 and 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) cpus: Option<u32>,
}

impl PlatformArgs {
    /// The platform these options name.
    pub(crate) fn platform(&self) -> vport_host::qemu::Platform {
        vport_host::qemu::Platform { qemu: self.qemu.clone(), machine: self.machine.clone(), cpus: self.cpus }
    }
}

#[derive(Args, Clone)]
pub(crate) struct VmArgs {
    /// Accelerator: auto tries KVM once (the verdict is cached) and falls back to TCG.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub(crate) accel: AccelChoice,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=65536))]
    pub(crate) memory: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) cpus: u32,
    /// QEMU machine type: pc (i440FX) or q35 (PCIe); the virtio-serial controller is
    /// virtio-serial-pci on both. (microvm needs the virtio-mmio transport, not built yet.)
    #[arg(long, default_value = "pc", value_parser = ["pc", "q35"])]
    pub(crate) machine: String,
    /// Log level of vport-agent inside the guest (its log goes to the guest console).
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub(crate) agent_log_level: String,
    /// Start vport-agent with --allow-guest-ops: a host client may then open the guest's other
    /// virtio-serial ports through the agent (GUEST_OP). Off by default, as in the agent
    /// (docs/security.md).
    #[arg(long)]
    pub(crate) allow_guest_ops: bool,
    /// Start vport-agent without --stream-dir: `vport send` / `vport recv` are then refused. By
    /// default the test image's agent keeps streams in /var/lib/vport-streams (in the guest's
    /// RAM).
    #[arg(long)]
    pub(crate) no_streams: bool,
}

impl VmArgs {
    /// Arguments for vport-agent, passed on the kernel command line.
    pub(crate) fn agent_args(&self) -> Vec<String> {
        let mut args = vec!["--log-level".into(), self.agent_log_level.clone()];
        if !self.no_streams {
            args.extend(["--stream-dir".into(), vport_host::image::initscript::GUEST_STREAM_DIR.into()]);
        }
        if self.allow_guest_ops {
            args.push(vport_host::conformance::GUEST_OPS_FLAG.into());
        }
        args
    }

    pub(crate) fn settings(&self) -> VmSettings {
        VmSettings {
            accel: self.accel,
            machine: self.machine.clone(),
            memory_mib: self.memory,
            cpus: self.cpus,
            agent_args: self.agent_args(),
        }
    }

    /// The VM settings for `img` with `ports` and these options.
    pub(crate) fn vm_config(&self, img: &GuestImage, ports: &[String]) -> vport_host::qemu::VmConfig {
        self.settings().vm_config(img, ports)
    }
}

#[derive(Args)]
pub(crate) struct BootArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    #[command(flatten)]
    pub(crate) vm: VmArgs,
    /// A virtio-serial port to create (repeatable, each name once): A-Z a-z 0-9 . _ - only. Names
    /// should start with org.vport. for the agent to serve them.
    #[arg(long = "port", default_value = hello::DEFAULT_PORT)]
    pub(crate) ports: Vec<String>,
    /// Print the VM description as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    #[command(flatten)]
    pub(crate) vm: VmArgs,
    /// A virtio-serial port to create and watch (repeatable, each name once): A-Z a-z 0-9 . _ - only.
    #[arg(long = "port", default_value = hello::DEFAULT_PORT)]
    pub(crate) ports: Vec<String>,
    /// Watch a VM vport did not start: port NAME's chardev is at ADDR (repeatable, one per port;
    /// instead of --port).
    #[arg(long = "socket", value_name = "NAME=ADDR", conflicts_with = "ports", long_help = ATTACH_SOCKET_HELP)]
    pub(crate) sockets: Vec<String>,
    /// QMP socket of the VM given with --socket (optional: without it QMP facts are unavailable).
    #[arg(long, value_name = "PATH", requires = "sockets", long_help = ATTACH_QMP_HELP)]
    pub(crate) qmp: Option<PathBuf>,
    /// Print every timeline record as a JSON line on stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Seconds a READY session may stay silent while the VM runs before it is taken for dead
    /// (a hung agent, a stuck port): at half of it the host sends a PING, which a live agent
    /// answers; unanswered at the deadline, the host leaves and connects again, with a
    /// `liveness:` note on the timeline. Once a session has ended, a connection that gives no
    /// next one for as long is left and made again too (a port QEMU left stuck). Time the VM is paused does not count. 0: off
    /// (an idle agent is then never woken by the host).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub(crate) liveness: u64,
}

#[derive(Args)]
pub(crate) struct HelloArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    #[command(flatten)]
    pub(crate) vm: VmArgs,
    /// The port to create and talk to: A-Z a-z 0-9 . _ - only.
    #[arg(long, default_value = hello::DEFAULT_PORT)]
    pub(crate) port: String,
    /// Talk to a VM vport did not start: port NAME's chardev is at ADDR (instead of --port).
    #[arg(long, value_name = "NAME=ADDR", conflicts_with = "port", long_help = ATTACH_SOCKET_HELP)]
    pub(crate) socket: Option<String>,
    /// QMP socket of the VM given with --socket (optional: without it QMP facts are unavailable).
    #[arg(long, value_name = "PATH", requires = "socket", long_help = ATTACH_QMP_HELP)]
    pub(crate) qmp: Option<PathBuf>,
    /// Seconds from the guest starting (or from connecting, with --socket) until the agent's
    /// HELLO must have arrived.
    #[arg(long, default_value_t = 45, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) timeout: u64,
    /// Pings to send after the handshake.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100000))]
    pub(crate) pings: u32,
    /// Also write the run's life-cycle trace to FILE (JSON lines; check it with
    /// `vport trace check FILE`). The trace is recorded and checked in any case.
    #[arg(long, value_name = "FILE")]
    pub(crate) trace: Option<PathBuf>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn parse_accel(s: &str) -> Result<AccelChoice, String> {
    s.parse::<AccelChoice>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_args(args: &[&str]) -> BootArgs {
        match Cli::try_parse_from(std::iter::once("vport").chain(["boot"]).chain(args.iter().copied())) {
            Ok(Cli { command: Command::Boot(b), .. }) => b,
            Ok(_) => panic!("not the boot command"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn guest_ops_reach_the_agent_only_when_asked_for() {
        assert_eq!(boot_args(&[]).vm.agent_args(), ["--log-level", "info", "--stream-dir", "/var/lib/vport-streams"]);
        assert_eq!(
            boot_args(&["--allow-guest-ops", "--agent-log-level", "debug", "--no-streams"]).vm.agent_args(),
            ["--log-level", "debug", "--allow-guest-ops"]
        );
    }

    #[test]
    fn the_fault_option_names_every_fault_and_selects_them() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let help = cli.find_subcommand_mut("run").and_then(|r| r.find_subcommand_mut("faults")).unwrap().render_help();
        let help = help.to_string().replace('\n', " ");
        for f in vport_host::faults::Fault::ALL {
            assert!(help.contains(f.name()), "--fault's help lacks {}", f.name());
        }
        let parsed = Cli::try_parse_from(["vport", "run", "faults", "--fault", "qemu-kill", "--fault", "host-drop"]);
        let Ok(Cli { command: Command::Run(RunCommand::Faults(args)), .. }) = parsed else { panic!("not parsed") };
        assert_eq!(args.faults, [vport_host::faults::Fault::QemuKill, vport_host::faults::Fault::HostDrop]);
    }
}
