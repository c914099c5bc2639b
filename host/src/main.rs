//! `vport`: the command-line face of the vport host rig.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vport_host::hello::{self, HelloOptions};
use vport_host::image::{self, kernel::KernelSource, GuestImage, ImageRequest};
use vport_host::qemu::accel::AccelChoice;
use vport_host::qemu::vm::install_signal_cleanup;
use vport_host::registry;
use vport_host::rig::{vm_config, Rig};
use vport_host::trace_check;

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    the check failed: the VM ran, but the agent or the port did not behave as expected
  2    usage error (bad arguments)
  3    infrastructure failure: QEMU, kernel, busybox or agent binary missing, image build or
       QEMU start failed
  130  interrupted (Ctrl-C); QEMU is killed first";

/// Infrastructure failure exit code.
const EXIT_INFRA: i32 = 3;
/// Check failure exit code.
const EXIT_FAILED: i32 = 1;

#[derive(Parser)]
#[command(
    name = "vport",
    version,
    about = "Boot a QEMU VM with vport-agent and test the life cycle of its virtio-serial ports",
    long_about = "vport boots qemu-system-x86_64 with a small Debian-kernel guest that runs vport-agent, \
connects to the VM's virtio-serial ports from the host, and checks what both sides observe.\n\n\
First time on a machine: scripts/bootstrap (installs qemu, busybox, the kernel package), then \
scripts/build-agent (the static guest agent).",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Diagnostics on stderr: error, warn, info, debug (full QEMU command lines, QMP traffic), trace.
    #[arg(long, global = true, default_value = "warn", env = "VPORT_LOG")]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    #[command(after_help = EXIT_CODES)]
    Watch(WatchArgs),
    /// Bridge a port of a VM started by `vport boot` to stdin/stdout (like socat).
    #[command(after_help = EXIT_CODES)]
    Connect(ConnectArgs),
    /// Work with life-cycle traces (JSON lines, see docs/trace.md).
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Run a test suite against real VMs.
    #[command(subcommand)]
    Run(RunCommand),
}

#[derive(Subcommand)]
enum RunCommand {
    /// Check every documented behaviour of virtio-serial ports on real VMs (docs/conformance.md)
    /// and print a matrix: case, expected, observed, PASS / FAIL / QUIRK.
    #[command(
        after_help = "Exit codes:\n  0  every case PASS or QUIRK (a QUIRK is the VM differing from the spec, explained)\n  1  a case FAILed or broke\n  2  usage error\n  3  infrastructure failure: a VM could not be set up (its cases are NOT RUN), or qemu/kernel/agent missing"
    )]
    Conformance(ConformanceArgs),
}

#[derive(Args)]
struct ConformanceArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Accelerator: auto tries KVM once (the verdict is cached) and falls back to TCG.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    accel: AccelChoice,
    /// Run only the cases whose name contains one of these comma-separated strings.
    #[arg(long)]
    filter: Option<String>,
    /// Log level of vport-agent inside the guest (shown in an ERROR case's console tail).
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    agent_log_level: String,
    /// Open/close cycles of the fast REOPEN case.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    cycles: u32,
    /// Print the report as one JSON object on stdout instead of the matrix.
    #[arg(long)]
    json: bool,
    /// Also write the report as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Judge a trace: strict open/close alternation on each side, READY only from CONNECTED,
    /// no data outside READY, no duplicate OPENED. Each violation names its record numbers.
    #[command(
        after_help = "Exit codes:\n  0  the trace is clean (notes, such as coalesced VSERPORT_CHANGE events, are not violations)\n  1  violations found\n  2  usage error\n  3  the file cannot be read or is not a valid trace (the message names the line)"
    )]
    Check {
        /// The trace file (`-` for standard input).
        file: PathBuf,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(long_about = "Bridge a port of a VM started by `vport boot` to stdin/stdout, byte for byte, like \
`socat - UNIX-CONNECT:<socket>`. The port is found by name among the running VMs that `vport boot` \
registered; with several candidates pass --vm PID (printed by `vport boot`). The bridge ends when QEMU \
closes the connection; end of input half-closes it, which QEMU takes as the host leaving.")]
struct ConnectArgs {
    /// Port name, for example org.vport.0.
    #[arg(required_unless_present = "socket")]
    port: Option<String>,
    /// QEMU pid of the VM to use when several have the port.
    #[arg(long)]
    vm: Option<u32>,
    /// Connect to this chardev socket directly instead of looking the port up.
    #[arg(long, conflicts_with_all = ["port", "vm"])]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the image, or reuse an identical one, and print where it is.
    Build {
        #[command(flatten)]
        image: ImageArgs,
        /// Print the result as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct ImageArgs {
    /// Your own bzImage instead of the Debian kernel (virtio built in, or see --kernel-modules).
    #[arg(long, env = "VPORT_KERNEL")]
    kernel: Option<PathBuf>,
    /// The lib/modules/RELEASE directory that goes with --kernel.
    #[arg(long, env = "VPORT_KERNEL_MODULES", requires = "kernel")]
    kernel_modules: Option<PathBuf>,
    /// A linux-image-*.deb to take the kernel and modules from (default: the one in the cache,
    /// downloaded with apt-get when absent).
    #[arg(long, conflicts_with = "kernel")]
    kernel_deb: Option<PathBuf>,
    /// The statically linked vport-agent (default: scripts/build-agent's output).
    #[arg(long, env = "VPORT_AGENT")]
    agent: Option<PathBuf>,
    /// A statically linked busybox.
    #[arg(long, env = "VPORT_BUSYBOX")]
    busybox: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct VmArgs {
    /// Accelerator: auto tries KVM once (the verdict is cached) and falls back to TCG.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    accel: AccelChoice,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=65536))]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Log level of vport-agent inside the guest (its log goes to the guest console).
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    agent_log_level: String,
}

impl VmArgs {
    /// Arguments for vport-agent, passed on the kernel command line.
    fn agent_args(&self) -> Vec<String> {
        vec!["--log-level".into(), self.agent_log_level.clone()]
    }

    /// The VM settings for `img` with `ports` and these options.
    fn vm_config(&self, img: &GuestImage, ports: &[String]) -> vport_host::qemu::vm::VmConfig {
        let names: Vec<&str> = ports.iter().map(String::as_str).collect();
        let mut cfg = vm_config(img, &names, &self.agent_args());
        cfg.accel = self.accel;
        cfg.memory_mib = self.memory;
        cfg.cpus = self.cpus;
        cfg
    }
}

#[derive(Args)]
struct BootArgs {
    #[command(flatten)]
    image: ImageArgs,
    #[command(flatten)]
    vm: VmArgs,
    /// A virtio-serial port to create (repeatable). Names should start with org.vport. for the
    /// agent to serve them.
    #[arg(long = "port", default_value = hello::DEFAULT_PORT)]
    ports: Vec<String>,
    /// Print the VM description as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(long_about = "Boot a VM and show the life cycle of its ports live. vport watch is the host client of \
every port: it completes the handshake, reads continuously (so an in-band BYE or HELLO shows within \
milliseconds), records QMP events (VSERPORT_CHANGE is rate-limited by QEMU to one per second per port), \
and after each handshake fetches the agent's own transition records, mapped onto the host clock.\n\n\
Output: a table on stdout, redrawn on every change (on a terminal) or appended; with --json, every \
record of the timeline as one JSON line (the trace format of docs/trace.md; `vport trace check` judges it).\n\n\
Commands, one per line on stdin: `close PORT [MS]` (the agent closes the port and reopens it after MS \
milliseconds, default 1000), `reopen PORT`, `ping PORT`, `quit`. At end of input, watching goes on until \
Ctrl-C or until QEMU exits.")]
struct WatchArgs {
    #[command(flatten)]
    image: ImageArgs,
    #[command(flatten)]
    vm: VmArgs,
    /// A virtio-serial port to create and watch (repeatable).
    #[arg(long = "port", default_value = hello::DEFAULT_PORT)]
    ports: Vec<String>,
    /// Print every timeline record as a JSON line on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct HelloArgs {
    #[command(flatten)]
    image: ImageArgs,
    #[command(flatten)]
    vm: VmArgs,
    /// The port to create and talk to.
    #[arg(long, default_value = hello::DEFAULT_PORT)]
    port: String,
    /// Seconds from the guest starting until the agent's HELLO must have arrived.
    #[arg(long, default_value_t = 45, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Pings to send after the handshake.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100000))]
    pings: u32,
    /// Also write the run's life-cycle trace to FILE (JSON lines; check it with
    /// `vport trace check FILE`). The trace is recorded and checked in any case.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_accel(s: &str) -> Result<AccelChoice, String> {
    s.parse::<AccelChoice>().map_err(|e| e.to_string())
}

/// Progress lines on stderr with the time since start.
struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("vport [{:5.1}s] {msg}", self.start.elapsed().as_secs_f64());
        }
    }
}

/// An error with the exit code it maps to.
struct Failure {
    code: i32,
    error: anyhow::Error,
}

fn infra(error: impl Into<anyhow::Error>) -> Failure {
    Failure { code: EXIT_INFRA, error: error.into() }
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new().filter_level(cli.log_level).format_target(false).init();
    if let Err(e) = install_signal_cleanup() {
        log::warn!("cannot install the Ctrl-C handler ({e}); an interrupted run may leave qemu behind");
    }
    let progress = Progress { start: Instant::now(), quiet: false };
    let result = match cli.command {
        Command::Image(ImageCommand::Build { image, json }) => cmd_image_build(&image, json, &progress),
        Command::Boot(args) => cmd_boot(args, &progress),
        Command::Hello(args) => cmd_hello(args, &progress),
        Command::Watch(args) => cmd_watch(args, &progress),
        Command::Connect(args) => cmd_connect(args),
        Command::Trace(TraceCommand::Check { file, json }) => cmd_trace_check(&file, json),
        Command::Run(RunCommand::Conformance(args)) => cmd_conformance(args, &progress),
    };
    if let Err(f) = result {
        eprintln!("vport: error: {}", f.error);
        for cause in f.error.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(f.code);
    }
}

fn build_image(args: &ImageArgs, progress: &Progress) -> Result<GuestImage, Failure> {
    let agent = image::resolve_agent(args.agent.as_deref()).map_err(infra)?;
    let req = ImageRequest {
        kernel: KernelSource::from_args(args.kernel.clone(), args.kernel_modules.clone(), args.kernel_deb.clone()),
        agent,
        busybox: args.busybox.clone().unwrap_or_else(image::default_busybox),
        cache_dir: vport_host::cache::cache_dir(),
    };
    progress.say("preparing the guest image");
    let img = image::build(&req, &mut |m| progress.say(m)).map_err(infra)?;
    progress.say(&format!(
        "guest image {} (kernel {}){}",
        img.dir.display(),
        img.kernel_release,
        if img.fresh { "" } else { ", from the cache" }
    ));
    Ok(img)
}

fn cmd_image_build(args: &ImageArgs, json: bool, progress: &Progress) -> Result<(), Failure> {
    let img = build_image(args, progress)?;
    let out = serde_json::json!({
        "dir": img.dir, "kernel": img.kernel, "initramfs": img.initramfs, "kernel_release": img.kernel_release,
        "modules": img.modules, "cmdline": img.cmdline, "fresh": img.fresh, "key": img.key,
    });
    if json {
        println!("{out}");
    } else {
        println!(
            "kernel      {}\ninitramfs   {}\nrelease     {}\nmodules     {}\ncmdline     {}",
            img.kernel.display(),
            img.initramfs.display(),
            img.kernel_release,
            img.modules.join(" "),
            img.cmdline
        );
    }
    Ok(())
}

fn cmd_hello(args: HelloArgs, progress: &Progress) -> Result<(), Failure> {
    let img = build_image(&args.image, progress)?;
    let opts = HelloOptions {
        port: args.port,
        accel: args.vm.accel,
        memory_mib: args.vm.memory,
        cpus: args.vm.cpus,
        hello_timeout: Duration::from_secs(args.timeout),
        pings: args.pings,
        agent_args: args.vm.agent_args(),
        trace: args.trace,
    };
    let report = match hello::run(&img, &opts, &mut |m| progress.say(m)) {
        Ok(r) => r,
        Err(e) => {
            let code = if e.is_infrastructure() { EXIT_INFRA } else { EXIT_FAILED };
            return Err(Failure { code, error: anyhow::Error::new(e).context("vport hello failed") });
        }
    };
    if args.json {
        let v = serde_json::to_string(&report).map_err(infra)?;
        println!("{v}");
    } else {
        print!("{}", report.to_text());
    }
    if !report.qemu_view_ok() {
        return Err(Failure {
            code: EXIT_FAILED,
            error: anyhow::anyhow!(
                "the agent answered, but QEMU does not show the port open (VSERPORT_CHANGE seen: {}, frontend-open: {})",
                report.vserport_change_open_seen,
                report.frontend_open
            ),
        });
    }
    if !report.trace.violations.is_empty() {
        return Err(Failure {
            code: EXIT_FAILED,
            error: anyhow::anyhow!(
                "the run's trace breaks {} life-cycle rule(s):\n{}",
                report.trace.violations.len(),
                report.trace.violations.join("\n")
            ),
        });
    }
    Ok(())
}

fn cmd_boot(args: BootArgs, progress: &Progress) -> Result<(), Failure> {
    let img = build_image(&args.image, progress)?;
    let cfg = args.vm.vm_config(&img, &args.ports);
    progress.say("starting qemu");
    let mut rig = Rig::launch(cfg).context("cannot boot the vm").map_err(infra)?;
    rig.resume().context("cannot start the guest").map_err(infra)?;
    let entry = registry::VmEntry {
        pid: rig.vm.pid(),
        dir: rig.vm.dir().to_path_buf(),
        console_log: rig.vm.console_log(),
        ports: rig
            .vm
            .ports()
            .iter()
            .map(|p| registry::PortEntry { name: p.name.clone(), id: p.id.clone(), socket: p.socket.clone() })
            .collect(),
    };
    let _registration = registry::register(&registry::registry_dir(), &entry).map_err(infra)?;
    let ports: Vec<_> = rig
        .vm
        .ports()
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "id": p.id, "chardev": p.chardev_id, "socket": p.socket}))
        .collect();
    if args.json {
        let v = serde_json::json!({
            "pid": rig.vm.pid(), "accel": rig.vm.accel().to_string(), "dir": rig.vm.dir(),
            "console_log": rig.vm.console_log(), "ports": ports,
        });
        println!("{v}");
    } else {
        println!("vm running: qemu pid {}, accelerator {}", rig.vm.pid(), rig.vm.accel());
        println!("guest console log: {}", rig.vm.console_log().display());
        for p in rig.vm.ports() {
            println!(
                "port {} (device id {}): vport connect {}   (or: socat - UNIX-CONNECT:{})",
                p.name,
                p.id,
                p.name,
                p.socket.display()
            );
        }
        println!("Ctrl-C stops the vm.");
    }
    let _ = std::io::stdout().flush();
    // Print QMP events until QEMU exits (the event channel closes with the QMP socket).
    // Ctrl-C is handled by the signal handler: it kills QEMU and exits 130.
    while let Ok(ev) = rig.qmp.events().recv() {
        eprintln!("vport: qmp event {} {}", ev.name, ev.data);
    }
    qemu_gone(&rig)
}

fn cmd_connect(args: ConnectArgs) -> Result<(), Failure> {
    let (name, socket) = match (args.socket, args.port) {
        (Some(socket), _) => (socket.display().to_string(), socket),
        (None, Some(port)) => {
            let entries = registry::live_entries(&registry::registry_dir(), registry::pid_alive).map_err(infra)?;
            let (vm, p) =
                registry::find_port(&entries, &port, args.vm).map_err(|e| Failure { code: 2, error: e.into() })?;
            log::info!("port {port} of the vm with qemu pid {}", vm.pid);
            (port, p.socket.clone())
        }
        (None, None) => unreachable_usage()?,
    };
    let stream = std::os::unix::net::UnixStream::connect(&socket)
        .with_context(|| format!("cannot connect to port {name} at {}", socket.display()))
        .map_err(infra)?;
    let mut from_port = stream.try_clone().context("cannot clone the port connection").map_err(infra)?;
    let mut to_port = stream;
    // stdin -> port on a thread; end of input half-closes, which QEMU takes as the host leaving.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        if let Err(e) = std::io::copy(&mut stdin, &mut to_port) {
            log::warn!("writing to the port failed: {e}");
        }
        let _ = to_port.shutdown(std::net::Shutdown::Write);
    });
    // Raw bytes straight to fd 1: `std::io::stdout()` is line-buffered and would hold back
    // everything after the last newline of binary data until one arrives.
    let mut stdout = std::fs::File::from(
        std::io::stdout().as_fd().try_clone_to_owned().context("cannot duplicate stdout").map_err(infra)?,
    );
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from_port.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // QEMU dropping a client that had unread bytes of ours resets the connection.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(infra(anyhow::Error::new(e).context(format!("reading from port {name} failed")))),
        };
        stdout.write_all(&buf[..n]).context("cannot write to stdout").map_err(infra)?;
    }
    Ok(())
}

/// clap guarantees a port or a socket; reaching here is a usage error, not a panic.
fn unreachable_usage<T>() -> Result<T, Failure> {
    Err(Failure { code: 2, error: anyhow::anyhow!("give a port name or --socket PATH") })
}

fn cmd_trace_check(file: &std::path::Path, json: bool) -> Result<(), Failure> {
    let result = if file == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the trace from standard input")
            .map_err(infra)?;
        trace_check::check_text(&text)
            .map_err(|source| trace_check::TraceCheckError::Parse { path: file.into(), source })
    } else {
        trace_check::run(file)
    };
    let code = trace_check::exit_code(&result);
    match (&result, json) {
        (Ok(report), false) => print!("{}", trace_check::render_text(report)),
        (Ok(report), true) => println!("{}", trace_check::render_json(report)),
        (Err(e), false) => eprintln!("vport: {}", trace_check::render_error_text(e)),
        (Err(e), true) => println!("{}", trace_check::render_error_json(e)),
    }
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

fn cmd_watch(args: WatchArgs, progress: &Progress) -> Result<(), Failure> {
    use std::io::IsTerminal;
    use vport_host::timeline::Timeline;
    use vport_host::watch;
    let img = build_image(&args.image, progress)?;
    let cfg = args.vm.vm_config(&img, &args.ports);
    progress.say("starting qemu");
    let origin = Instant::now();
    let mut rig = Rig::launch(cfg).context("cannot boot the vm").map_err(infra)?;
    // Raw fd 1: every record reaches a pipe reader at once (stdout is line-buffered anyway,
    // but a table redraw is several lines).
    let stdout = std::fs::File::from(
        std::io::stdout().as_fd().try_clone_to_owned().context("cannot duplicate stdout").map_err(infra)?,
    );
    let timeline = if args.json {
        Timeline::with_sink(origin, stdout)
    } else {
        let redraw = std::io::stdout().is_terminal();
        Timeline::with_sink(origin, watch::TableSink::new(stdout, redraw))
    };
    let commands = watch::start(&rig, &timeline).context("cannot watch the ports").map_err(infra)?;
    rig.resume().context("cannot start the guest").map_err(infra)?;
    progress.say(&format!(
        "watching {} (commands on stdin: close PORT [MS], reopen PORT, ping PORT, quit)",
        args.ports.join(", ")
    ));

    let (quit_tx, quit_rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            match vport_host::watch::parse_command(&line) {
                Ok(Some(cmd)) => drop(commands.send(cmd)),
                Ok(None) => {
                    let _ = quit_tx.send(());
                    return;
                }
                Err(e) => eprintln!("vport: {e}"),
            }
        }
        // End of input drops `quit_tx`: the loop below then keeps watching until Ctrl-C or
        // until QEMU exits.
    });
    let mut quit_rx = quit_rx;
    loop {
        crossbeam_channel::select! {
            recv(quit_rx) -> msg => match msg {
                Ok(()) => return Ok(()),
                Err(_) => quit_rx = crossbeam_channel::never(),
            },
            recv(rig.qmp.events()) -> ev => {
                if ev.is_err() {
                    break;
                }
            }
        }
    }
    qemu_gone(&rig)
}

/// QEMU went away while a command kept the VM up: leave the exit to the Ctrl-C handler if that
/// is why (it exits 130), else report how QEMU ended and what the guest said last.
fn qemu_gone(rig: &Rig) -> Result<(), Failure> {
    if vport_host::qemu::vm::interrupted() {
        // The handler killed QEMU and is about to exit the process; do not race it with our own
        // exit code.
        loop {
            std::thread::park();
        }
    }
    let status = rig.vm.wait_exit(Duration::from_secs(10)).map_err(infra)?;
    Err(Failure { code: EXIT_FAILED, error: anyhow::anyhow!("qemu exited ({status})\n{}", rig.failure_context()) })
}

fn cmd_conformance(args: ConformanceArgs, progress: &Progress) -> Result<(), Failure> {
    use vport_host::conformance::{self, CaseEvent, SuiteOptions};
    let img = build_image(&args.image, progress)?;
    let mut opts = SuiteOptions::new(img);
    opts.accel = args.accel;
    opts.filter = args.filter;
    opts.reopen_cycles = args.cycles;
    opts.agent_args = vec!["--log-level".into(), args.agent_log_level];
    let report = conformance::run(&opts, &mut |ev| match ev {
        CaseEvent::GroupStarted { group } => progress.say(&format!("group {group}: booting")),
        CaseEvent::CaseFinished(c) => progress.say(&format!("{:<7} {}", c.verdict.label(), c.name)),
        CaseEvent::GroupFailed(e) => progress.say(&format!("group failed: {e:?}")),
    })
    .map_err(|e| Failure { code: 2, error: e.into() })?;
    if let Some(path) = &args.junit {
        std::fs::write(path, conformance::render_junit(&report))
            .with_context(|| format!("cannot write the JUnit report {}", path.display()))
            .map_err(infra)?;
    }
    if args.json {
        println!("{}", conformance::render_json(&report));
    } else {
        print!("{}", conformance::render_text(&report));
    }
    if !report.infra_errors.is_empty() {
        return Err(Failure {
            code: EXIT_INFRA,
            error: anyhow::anyhow!("{} vm(s) could not be set up", report.infra_errors.len()),
        });
    }
    if !report.ok() {
        return Err(Failure { code: EXIT_FAILED, error: anyhow::anyhow!("conformance cases failed") });
    }
    Ok(())
}
