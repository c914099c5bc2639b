//! `vport`: the command-line face of the vport host rig. It parses the arguments, calls the
//! command's body in the library ([`vport_host::command`]), and exits with the code the
//! outcome maps to in the one table ([`vport_host::exit`]).

mod cli;

use anyhow::Context;
use clap::Parser;
use cli::*;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};
use vport_host::attach::{AttachSpec, Attached};
use vport_host::bench::BenchSize;
use vport_host::command::boot::BootCommand;
use vport_host::command::conformance::ConformanceCommand;
use vport_host::command::connect::ConnectCommand;
use vport_host::command::hello::HelloCommand;
use vport_host::command::{self, CommandError, Progress};
use vport_host::exit::ExitCode;
use vport_host::hello::HelloOptions;
use vport_host::image::GuestImage;
use vport_host::qemu::install_signal_cleanup;
use vport_host::rig::Rig;
use vport_host::soak::SoakCounts;
use vport_host::usage::{self, UsageError};

/// An error with the exit code it maps to; `error` is `None` when the command has shown its
/// outcome itself.
struct Failure {
    code: ExitCode,
    error: Option<anyhow::Error>,
}

impl From<CommandError> for Failure {
    fn from(e: CommandError) -> Failure {
        Failure { code: e.exit_code(), error: e.needs_message().then(|| e.into()) }
    }
}

fn infra(error: impl Into<anyhow::Error>) -> Failure {
    Failure { code: ExitCode::Infrastructure, error: Some(error.into()) }
}

fn usage(e: UsageError) -> Failure {
    CommandError::from(e).into()
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new().filter_level(cli.log_level).format_target(false).init();
    if let Err(e) = install_signal_cleanup() {
        log::warn!("cannot install the Ctrl-C handler ({e}); an interrupted run may leave qemu behind");
    }
    let progress = Progress::new(false);
    let mut out = std::io::stdout();
    let result: Result<(), Failure> = match cli.command {
        Command::Image(ImageCommand::Build { image, json }) => {
            command::image::build(&image.choice(), json, &mut out, &progress).map_err(Failure::from)
        }
        Command::Boot(args) => {
            let cmd =
                BootCommand { image: args.image.choice(), vm: args.vm.settings(), ports: args.ports, json: args.json };
            command::boot::boot(&cmd, &mut out, &progress).map_err(Failure::from)
        }
        Command::Hello(args) => cmd_hello(args, &mut out, &progress),
        Command::Watch(args) => cmd_watch(args, &progress),
        Command::Connect(args) => {
            let cmd = ConnectCommand {
                port: args.port,
                vm: args.vm,
                socket: args.socket,
                qmp: args.qmp,
                libvirt: args.libvirt,
                timeout: Duration::from_secs(args.timeout),
                list: args.list,
            };
            command::connect::connect(&cmd).map_err(Failure::from)
        }
        Command::Send(args) => {
            let direction = command::transfer::Direction::Send { local: args.file, name: args.name };
            command::transfer::transfer(&args.target.command(direction), &mut out, &progress).map_err(Failure::from)
        }
        Command::Recv(args) => {
            let direction = command::transfer::Direction::Recv { name: args.name, dest: args.output };
            command::transfer::transfer(&args.target.command(direction), &mut out, &progress).map_err(Failure::from)
        }
        Command::Trace(TraceCommand::Check { file, json }) => {
            command::trace::check(&file, json, &mut out).map_err(Failure::from)
        }
        Command::Run(RunCommand::Faults(args)) => {
            let repeats = args.repeats.unwrap_or(if args.full { 50 } else { 3 });
            let cmd = command::faults::FaultsCommand {
                image: args.image.choice(),
                accel: args.accel,
                platform: args.platform.take_effect(),
                repeats,
                faults: args.faults,
                stall: Duration::from_secs(args.stall),
                trace: args.trace,
                json: args.json,
                junit: args.junit,
            };
            command::faults::faults(cmd, &mut out, &progress).map_err(Failure::from)
        }
        Command::Bench(args) => {
            let preset = if args.full { BenchSize::FULL } else { BenchSize::QUICK };
            let size = BenchSize {
                bytes: args.mib.map_or(preset.bytes, |m| m << 20),
                rounds: args.rounds.unwrap_or(preset.rounds),
                idle_window: args.idle.map_or(preset.idle_window, Duration::from_secs),
                ..preset
            };
            let cmd = command::bench::BenchCommand {
                image: args.image.choice(),
                accel: args.accel,
                platform: args.platform.take_effect(),
                size,
                json: args.json,
                json_out: args.json_out,
                plots: args.plots,
            };
            command::bench::bench(cmd, &mut out, &progress).map_err(Failure::from)
        }
        Command::Run(RunCommand::Soak(args)) => {
            let preset = if args.full { SoakCounts::FULL } else { SoakCounts::QUICK };
            let counts = SoakCounts {
                reconnects: args.reconnects.unwrap_or(preset.reconnects),
                reopens: args.reopens.unwrap_or(preset.reopens),
                stop_conts: args.stop_conts.unwrap_or(preset.stop_conts),
                replugs: args.replugs.unwrap_or(preset.replugs),
            };
            let cmd = command::soak::SoakCommand {
                image: args.image.choice(),
                accel: args.accel,
                platform: args.platform.take_effect(),
                counts,
                json: args.json,
                junit: args.junit,
            };
            command::soak::soak(cmd, &mut out, &progress).map_err(Failure::from)
        }
        Command::Run(RunCommand::Matrix(args)) => {
            let cmd = command::matrix::MatrixCommand {
                qemus: args.qemus,
                kernel_debs: args.kernel_debs,
                machines: args.machines,
                cpus: args.cpus,
                accels: args.accels,
                suites: args.suites,
                jobs: args.jobs.map(usize::from),
                out_dir: args.out,
                agent: args.agent,
                suite_deadline: Duration::from_secs(args.suite_deadline * 60),
                json: args.json,
                speed_factor: args.speed_factor,
            };
            command::matrix::matrix(cmd, &mut out, &progress).map_err(Failure::from)
        }
        Command::Run(RunCommand::Conformance(args)) => {
            let cmd = ConformanceCommand {
                image: args.image.choice(),
                accel: args.accel,
                platform: args.platform.take_effect(),
                filter: args.filter,
                list: args.list,
                agent_log_level: args.agent_log_level,
                cycles: args.cycles,
                json: args.json,
                junit: args.junit,
            };
            command::conformance::conformance(cmd, &mut out, &progress).map_err(Failure::from)
        }
    };
    let code = match result {
        Ok(()) => ExitCode::Success,
        Err(f) => {
            if let Some(error) = f.error {
                eprintln!("vport: error: {error}");
                for cause in error.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
            }
            f.code
        }
    };
    // Threads that still serve a port hold their listeners: their unix socket files go now.
    vport_host::chardev::remove_bound_sockets();
    code.exit();
}

fn build_image(args: &ImageArgs, progress: &Progress) -> Result<GuestImage, Failure> {
    Ok(command::image::prepare(&args.choice(), progress)?)
}

fn cmd_hello(args: HelloArgs, out: &mut dyn std::io::Write, progress: &Progress) -> Result<(), Failure> {
    let attach = match (&args.socket, &args.libvirt) {
        (Some(socket), _) => Some(AttachSpec::parse(std::slice::from_ref(socket), args.qmp.clone()).map_err(usage)?),
        (None, Some(domain)) => {
            Some(libvirt_spec(domain, std::slice::from_ref(&args.port), args.qmp.clone(), progress)?)
        }
        (None, None) => None,
    };
    let opts = HelloOptions {
        port: args.port,
        accel: args.vm.accel,
        machine: args.vm.machine.clone(),
        memory_mib: args.vm.memory,
        cpus: args.vm.cpus,
        hello_timeout: Duration::from_secs(args.timeout),
        pings: args.pings,
        agent_args: args.vm.agent_args(),
        trace: args.trace,
    };
    let cmd = HelloCommand { image: args.image.choice(), hello: opts, attach, json: args.json };
    command::hello::hello(cmd, out, progress).map_err(Failure::from)
}

/// The ports `ports` of libvirt domain `domain` (`--libvirt`), with what its XML says of each.
fn libvirt_spec(
    domain: &str,
    ports: &[String],
    qmp: Option<std::path::PathBuf>,
    progress: &Progress,
) -> Result<AttachSpec, Failure> {
    let (spec, found) = vport_host::libvirt::attach_spec(domain, ports, qmp).map_err(CommandError::from)?;
    for c in found.channels.iter().filter(|c| spec.ports.iter().any(|(n, _)| *n == c.name)) {
        progress.say(&format!("domain {domain}: {}", c.describe()));
    }
    if spec.qmp.is_none() {
        progress.say("--libvirt without --qmp: libvirt holds qemu's monitor, so qmp facts are unavailable");
    }
    Ok(spec)
}

fn cmd_watch(args: WatchArgs, progress: &Progress) -> Result<(), Failure> {
    use vport_host::watch;
    if !args.sockets.is_empty() || args.libvirt.is_some() {
        return cmd_watch_attached(args, progress);
    }
    usage::check_port_names(&args.ports).map_err(usage)?;
    let img = build_image(&args.image, progress)?;
    let cfg = args.vm.vm_config(&img, &args.ports);
    progress.say("starting qemu");
    let origin = Instant::now();
    let mut rig = Rig::launch(cfg).context("cannot boot the vm").map_err(infra)?;
    let timeline = watch_timeline(args.json, origin)?;
    let liveness = (args.liveness > 0).then(|| Duration::from_secs(args.liveness));
    let commands = watch::start(&rig, &timeline, liveness).context("cannot watch the ports").map_err(infra)?;
    rig.resume().context("cannot start the guest").map_err(infra)?;
    match serve_watch(progress, &args.ports, rig.qmp.events(), commands)? {
        watch::WatchEnd::Quit => Ok(()),
        watch::WatchEnd::QemuExited => qemu_gone(&rig),
    }
}

/// `vport watch --socket NAME=ADDR... [--qmp PATH]`: watching a VM vport did not start.
fn cmd_watch_attached(args: WatchArgs, progress: &Progress) -> Result<(), Failure> {
    use vport_host::watch;
    let spec = match &args.libvirt {
        Some(domain) => libvirt_spec(domain, &args.ports, args.qmp.clone(), progress)?,
        None => AttachSpec::parse(&args.sockets, args.qmp.clone()).map_err(usage)?,
    };
    if let Some(qmp) = &spec.qmp {
        vport_host::attach::check_qmp_path(qmp).map_err(usage)?;
    }
    let origin = Instant::now();
    let attached = Attached::attach(&spec).map_err(|e| Failure::from(CommandError::Attach(e)))?;
    if attached.qmp.is_none() {
        progress.say(
            "no --qmp: no QMP events; qemu's exit shows as every port's chardev server going away (not for \
             unix-listen:/tcp-listen:); watching ends then, on quit or on Ctrl-C",
        );
    }
    let timeline = watch_timeline(args.json, origin)?;
    let liveness = (args.liveness > 0).then(|| Duration::from_secs(args.liveness));
    let watching =
        watch::start_attached(&attached, &timeline, liveness).context("cannot watch the ports").map_err(infra)?;
    let (commands, qemu_gone) = (watching.commands.clone(), watching.qemu_gone.clone());
    match serve_watch(progress, &spec.names(), &qemu_gone, commands)? {
        watch::WatchEnd::Quit => Ok(()),
        watch::WatchEnd::QemuExited if attached.qmp.is_none() => Err(CommandError::CheckFailed(format!(
            "every port's chardev server is gone: qemu exited? ({})\n{}",
            watching.servers_gone().join("; "),
            attached.failure_context()
        ))
        .into()),
        watch::WatchEnd::QemuExited => Err(CommandError::CheckFailed(format!(
            "qemu exited (its QMP connection closed)\n{}",
            attached.failure_context()
        ))
        .into()),
    }
}

/// Says what is watched, then passes the commands on stdin to the watchers until `quit` or
/// QEMU's exit (`qemu_events` closing).
fn serve_watch(
    progress: &Progress,
    ports: &[String],
    qemu_events: &crossbeam_channel::Receiver<vport_host::qmp::QmpEvent>,
    commands: crossbeam_channel::Sender<vport_host::watch::Command>,
) -> Result<vport_host::watch::WatchEnd, Failure> {
    progress.say(&format!(
        "watching {} (commands on stdin: close PORT [MS], reopen PORT, ping PORT, quit)",
        ports.join(", ")
    ));
    let stdin = std::io::BufReader::new(std::io::stdin());
    vport_host::watch::serve_input_until(qemu_events, stdin, commands, |e| eprintln!("vport: {e}"))
        .context("cannot read commands")
        .map_err(infra)
}

/// The timeline `vport watch` prints on stdout: every record as a JSON line (`json`), or the
/// live table.
fn watch_timeline(json: bool, origin: Instant) -> Result<vport_host::timeline::Timeline, Failure> {
    use std::io::IsTerminal;
    use vport_host::timeline::Timeline;
    // Raw fd 1: every record reaches a pipe reader at once (stdout is line-buffered anyway,
    // but a table redraw is several lines).
    let stdout = std::fs::File::from(
        std::io::stdout().as_fd().try_clone_to_owned().context("cannot duplicate stdout").map_err(infra)?,
    );
    Ok(if json {
        Timeline::with_sink(origin, stdout)
    } else {
        let redraw = std::io::stdout().is_terminal();
        Timeline::with_sink(origin, vport_host::watch::TableSink::new(stdout, redraw))
    })
}

/// QEMU went away while `watch` kept the VM up ([`command::boot::qemu_gone`]).
fn qemu_gone(rig: &Rig) -> Result<(), Failure> {
    Ok(command::boot::qemu_gone(rig)?)
}
