//! The `vport` command line: what each command and option means (clap derive). `main.rs`
//! carries the commands out; this module only describes and parses them.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vport_host::command;
use vport_host::command::boot::VmSettings;
use vport_host::command::help::{
    ATTACH_LIBVIRT_HELP, ATTACH_QMP_HELP, ATTACH_SOCKET_HELP, BENCH_ABOUT, CONNECT_ABOUT, CONNECT_SOCKET_HELP,
    ENVIRONMENT, FAULTS_ABOUT, MATRIX_ABOUT, SOAK_ABOUT, TRANSFER_ABOUT, WATCH_ABOUT,
};
use vport_host::command::image::ImageChoice;
use vport_host::exit::HELP as EXIT_CODES;
use vport_host::hello;
use vport_host::image::GuestImage;
use vport_host::qemu::accel::AccelChoice;

mod suites;
pub(crate) use suites::{BenchArgs, ConformanceArgs, FaultsArgs, MatrixArgs, SoakArgs};

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
#[command(group = clap::ArgGroup::new("attach").args(["socket", "libvirt"]))]
pub(crate) struct ConnectArgs {
    /// Port name, for example org.vport.0 (with --libvirt: the domain's channel).
    #[arg(required_unless_present_any = ["socket", "list"])]
    pub(crate) port: Option<String>,
    /// QEMU pid of the VM to use when several have the port.
    #[arg(long, conflicts_with = "attach")]
    pub(crate) vm: Option<u32>,
    /// Connect to a VM vport did not start: port NAME's chardev is at ADDR (a bare PATH, as
    /// before, is a unix socket QEMU listens on).
    #[arg(long, value_name = "NAME=ADDR", conflicts_with_all = ["port", "vm"], long_help = CONNECT_SOCKET_HELP)]
    pub(crate) socket: Option<String>,
    /// QMP socket of the VM given with --socket or --libvirt (optional).
    #[arg(long, value_name = "PATH", requires = "attach", long_help = ATTACH_QMP_HELP)]
    pub(crate) qmp: Option<PathBuf>,
    /// Connect to channel PORT of a libvirt domain (its socket read from `virsh dumpxml`).
    #[arg(long, value_name = "DOMAIN", long_help = ATTACH_LIBVIRT_HELP)]
    pub(crate) libvirt: Option<String>,
    /// Seconds to wait for QEMU to take the connection (after that the port is reported busy),
    /// or, for unix-listen: and tcp-listen:, to connect.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) timeout: u64,
    /// List the ports of the running VMs started by `vport boot`, and exit.
    #[arg(long, conflicts_with_all = ["port", "socket", "libvirt"])]
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
    /// QEMU machine type: pc (i440FX) or q35 (PCIe), where the virtio-serial controller is
    /// virtio-serial-pci; microvm (no PCI), where it is virtio-serial-device on virtio-mmio.
    #[arg(long, default_value = "pc", value_parser = vport_host::qemu::MACHINES)]
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
#[command(group = clap::ArgGroup::new("attach").args(["sockets", "libvirt"]))]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    #[command(flatten)]
    pub(crate) vm: VmArgs,
    /// A virtio-serial port to create and watch (repeatable, each name once): A-Z a-z 0-9 . _ - only
    /// (with --libvirt: the domain's channels to watch).
    #[arg(long = "port", default_value = hello::DEFAULT_PORT)]
    pub(crate) ports: Vec<String>,
    /// Watch a VM vport did not start: port NAME's chardev is at ADDR (repeatable, one per port;
    /// instead of --port).
    #[arg(long = "socket", value_name = "NAME=ADDR", conflicts_with = "ports", long_help = ATTACH_SOCKET_HELP)]
    pub(crate) sockets: Vec<String>,
    /// QMP socket of the VM given with --socket or --libvirt (optional: without it QMP facts are
    /// unavailable).
    #[arg(long, value_name = "PATH", requires = "attach", long_help = ATTACH_QMP_HELP)]
    pub(crate) qmp: Option<PathBuf>,
    /// Watch the channels --port names of a libvirt domain (read from `virsh dumpxml`).
    #[arg(long, value_name = "DOMAIN", conflicts_with = "sockets", long_help = ATTACH_LIBVIRT_HELP)]
    pub(crate) libvirt: Option<String>,
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
#[command(group = clap::ArgGroup::new("attach").args(["socket", "libvirt"]))]
pub(crate) struct HelloArgs {
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    #[command(flatten)]
    pub(crate) vm: VmArgs,
    /// The port to create and talk to: A-Z a-z 0-9 . _ - only (with --libvirt: the domain's
    /// channel to talk to).
    #[arg(long, default_value = hello::DEFAULT_PORT)]
    pub(crate) port: String,
    /// Talk to a VM vport did not start: port NAME's chardev is at ADDR (instead of --port).
    #[arg(long, value_name = "NAME=ADDR", conflicts_with = "port", long_help = ATTACH_SOCKET_HELP)]
    pub(crate) socket: Option<String>,
    /// QMP socket of the VM given with --socket or --libvirt (optional: without it QMP facts are
    /// unavailable).
    #[arg(long, value_name = "PATH", requires = "attach", long_help = ATTACH_QMP_HELP)]
    pub(crate) qmp: Option<PathBuf>,
    /// Talk to channel --port of a libvirt domain (its socket read from `virsh dumpxml`).
    #[arg(long, value_name = "DOMAIN", conflicts_with = "socket", long_help = ATTACH_LIBVIRT_HELP)]
    pub(crate) libvirt: Option<String>,
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
