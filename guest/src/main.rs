//! The `vport-agent` binary: command line and wiring (see the library for the parts).

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use vport_agent::discovery::{AutoSelect, PortSpec, Selector, DEFAULT_PREFIX};
use vport_agent::event_loop::{Config, EventLoop};
use vport_agent::port::AgentInfo;
use vport_agent::settings::{Limits, Settings, DEFAULT_MAX_STREAM_BYTES};
use vport_agent::{log, sys};

/// Serves named virtio-serial ports (/dev/vportNpM) for the vport host.
///
/// By default every port whose name starts with "org.vport." is served; the QEMU guest agent
/// and spice ports are never served unless named with --port.
#[derive(Debug, Parser)]
#[command(name = "vport-agent", version)]
struct Cli {
    /// A port to serve: its name, /dev/vportNpM, /dev/virtio-ports/NAME, or a console
    /// /dev/hvcN (served in raw mode; it must exist at start). Repeatable. A named or vport
    /// port that does not exist yet is waited for.
    #[arg(long = "port", value_name = "NAME|PATH")]
    ports: Vec<String>,
    /// Also serve every virtio console (/dev/hvc0../dev/hvc7 with a virtconsole behind it, in
    /// raw mode), found at start and on hot-plug, forgotten on unplug; except the kernel's own
    /// console (console=hvcN). The guest cannot tell which port name a /dev/hvcN belongs to, so
    /// this is not limited by --prefix: use it only in a VM whose consoles are all vport's.
    #[arg(long)]
    consoles: bool,
    /// Serve every named port (except the guest agent and spice ports).
    #[arg(long, conflicts_with = "prefix")]
    all: bool,
    /// Serve every port whose name starts with PREFIX [default: org.vport. unless --port is given].
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Log level.
    #[arg(long, value_name = "LEVEL", default_value = "info",
          value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    log_level: String,
    /// sysfs mount point (for tests).
    #[arg(long, value_name = "PATH", default_value = "/sys")]
    sysfs_root: PathBuf,
    /// Device directory (for tests).
    #[arg(long, value_name = "PATH", default_value = "/dev")]
    dev_root: PathBuf,
    /// Serve GUEST_OP requests: let the host open other virtio-serial ports of this guest (and
    /// only those: nodes listed in /sys/class/virtio-ports) and read, write and poll them. Off
    /// by default; test VMs such as vport's conformance image turn it on. See
    /// docs/security.md.
    #[arg(long)]
    allow_guest_ops: bool,
    /// Longest SOURCE or SINK stream a host may ask for (bytes; K, M, G, T suffixes are
    /// binary multiples).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_STREAM_BYTES, value_parser = parse_size)]
    max_stream_bytes: u64,
    /// Serve acknowledged streams (vport send / vport recv): the host may write files into DIR
    /// and read the files in it, and nothing outside it (plain names only, no symlinks
    /// followed). Off by default: every STREAM_OPEN is refused. The directory must exist.
    /// See docs/protocol.md, "Acknowledged streams", and docs/security.md.
    #[arg(long, value_name = "DIR")]
    stream_dir: Option<PathBuf>,
}

/// Parses a byte count with an optional binary suffix (`4096`, `64M`, `16G`).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        Some((i, 'T' | 't')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a byte count such as 1048576, 64M or 16G"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s} bytes does not fit in 64 bits"))
}

/// True for a console path (`/dev/hvcN`).
fn is_console(arg: &str) -> bool {
    arg.strip_prefix("/dev/hvc").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The console ports named with `--port`.
fn consoles(cli: &Cli) -> Vec<PathBuf> {
    cli.ports.iter().filter(|p| is_console(p)).map(PathBuf::from).collect()
}

fn selector(cli: &Cli) -> anyhow::Result<Selector> {
    let explicit =
        cli.ports.iter().filter(|p| !is_console(p)).map(|p| PortSpec::parse(p)).collect::<Result<Vec<_>, _>>()?;
    let auto = match (&cli.prefix, cli.all) {
        (_, true) => AutoSelect::All,
        (Some(p), false) => AutoSelect::Prefix(p.clone()),
        (None, false) if cli.ports.is_empty() => AutoSelect::Prefix(DEFAULT_PREFIX.to_owned()),
        (None, false) => AutoSelect::None,
    };
    Ok(Selector { explicit, auto })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let selector = selector(&cli)?;
    let level = cli.log_level.parse::<::log::LevelFilter>().map_err(|e| anyhow::anyhow!("--log-level: {e}"))?;
    log::init(level).map_err(|e| anyhow::anyhow!("{e}"))?;
    // SAFETY: `run` is called from `main` before the agent starts any thread (the guest-op
    // workers start later; logging writes from the calling thread).
    if !unsafe { sys::return_large_buffers() } {
        ::log::info!("the allocator keeps freed large buffers (no glibc mallopt): RSS may grow after large frames");
    }
    let info = AgentInfo {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel_release: sys::kernel_release(),
        boot_id: sys::boot_id(),
    };
    let mut watching = selector.to_string();
    if cli.consoles {
        watching.push_str(if watching.is_empty() { "every virtio console" } else { ", every virtio console" });
    }
    let consoles = consoles(&cli);
    if let Some(dir) = &cli.stream_dir {
        if !dir.is_dir() {
            anyhow::bail!("--stream-dir {}: not a directory (create it, owned by the agent's user)", dir.display());
        }
    }
    let settings = Settings {
        allow_guest_ops: cli.allow_guest_ops,
        stream_dir: cli.stream_dir.clone(),
        limits: Limits { max_stream_bytes: cli.max_stream_bytes, ..Limits::default() },
    };
    let config = Config {
        selector,
        sysfs_root: cli.sysfs_root,
        dev_root: cli.dev_root,
        consoles,
        discover_consoles: cli.consoles,
        settings: settings.clone(),
    };
    let mut agent = EventLoop::new(config, info)?;
    ::log::info!(
        "vport-agent {} started: watching {watching}; guest ops {}; streams {}; uid {} gid {}",
        env!("CARGO_PKG_VERSION"),
        if settings.allow_guest_ops { "allowed" } else { "disabled" },
        settings.stream_dir.as_ref().map_or("disabled".to_owned(), |d| format!("in {}", d.display())),
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    agent.run()?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(1);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
            eprintln!("vport-agent: error: {msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(args: &[&str]) -> anyhow::Result<Selector> {
        let cli = Cli::try_parse_from(std::iter::once("vport-agent").chain(args.iter().copied()))?;
        selector(&cli)
    }

    #[test]
    fn default_is_the_org_vport_prefix() {
        assert_eq!(sel(&[]).unwrap(), Selector { explicit: vec![], auto: AutoSelect::Prefix("org.vport.".into()) });
    }

    #[test]
    fn explicit_ports_only_unless_all_or_prefix() {
        let s = sel(&["--port", "org.qemu.guest_agent.0", "--port", "/dev/vport0p3"]).unwrap();
        assert_eq!(s.auto, AutoSelect::None);
        assert_eq!(s.explicit, vec![PortSpec::Name("org.qemu.guest_agent.0".into()), PortSpec::Dev("vport0p3".into())]);
        assert_eq!(sel(&["--port", "x", "--all"]).unwrap().auto, AutoSelect::All);
        assert_eq!(sel(&["--port", "x", "--prefix", "a."]).unwrap().auto, AutoSelect::Prefix("a.".into()));
    }

    #[test]
    fn console_paths_are_consoles_not_vports() {
        let cli = Cli::try_parse_from(["vport-agent", "--port", "/dev/hvc1", "--prefix", "org.vport."]).unwrap();
        assert_eq!(consoles(&cli), vec![PathBuf::from("/dev/hvc1")]);
        assert_eq!(
            selector(&cli).unwrap(),
            Selector { explicit: vec![], auto: AutoSelect::Prefix("org.vport.".into()) }
        );
        // Only a console named: no automatic selection.
        let cli = Cli::try_parse_from(["vport-agent", "--port", "/dev/hvc0"]).unwrap();
        assert_eq!(selector(&cli).unwrap().auto, AutoSelect::None);
    }

    #[test]
    fn sizes_take_binary_suffixes_and_bad_ones_are_errors() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("16G"), Ok(16 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn consoles_are_discovered_only_when_asked() {
        assert!(!Cli::try_parse_from(["vport-agent"]).unwrap().consoles);
        let cli = Cli::try_parse_from(["vport-agent", "--consoles"]).unwrap();
        assert!(cli.consoles);
        // --consoles does not turn the default prefix off.
        assert_eq!(selector(&cli).unwrap().auto, AutoSelect::Prefix("org.vport.".into()));
    }

    #[test]
    fn guest_ops_are_off_unless_allowed() {
        assert!(!Cli::try_parse_from(["vport-agent"]).unwrap().allow_guest_ops);
        assert!(Cli::try_parse_from(["vport-agent", "--allow-guest-ops"]).unwrap().allow_guest_ops);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(sel(&["--all", "--prefix", "x"]).is_err());
        assert!(sel(&["--port", "/dev/hvcx"]).is_err());
        assert!(sel(&["--port", "/dev/tty0"]).is_err());
        assert!(sel(&["--log-level", "loud"]).is_err());
    }
}
