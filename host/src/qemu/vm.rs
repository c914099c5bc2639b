//! A running QEMU guest and everything it owns: the process, a private temporary directory
//! with the QMP socket, one unix socket per virtio-serial port, the serial console log and
//! QEMU's own stdout/stderr.
//!
//! Guarantees: QEMU never outlives its [`Vm`]. [`Vm::kill`] and `Drop` SIGKILL and reap it
//! and remove the directory; `PR_SET_PDEATHSIG` kills it if vport dies; and
//! [`install_signal_cleanup`] kills every live VM on Ctrl-C / SIGTERM / SIGHUP.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use super::accel::{self, Accel, AccelChoice};
use super::args::{self, ChardevBackend, PortKind, PortSpec};
use super::{FindQemuError, QemuVersion};
use crate::chardev::{EndpointAddr, Listener};
use crate::wait::{wait_until, WaitError};

/// Device id of the virtio-serial controller (its bus is `vser0.0`).
pub const CONTROLLER_ID: &str = "vser0";
/// File name (in the VM directory) of the second QMP monitor of [`VmConfig::tools_qmp`].
pub const TOOLS_QMP_SOCKET: &str = "qmp-tools.sock";

/// Why a VM could not be started or waited for.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No QEMU binary.
    #[error(transparent)]
    QemuNotFound(#[from] FindQemuError),
    /// The accelerator probe could not run.
    #[error("cannot choose an accelerator")]
    Accel(#[from] accel::AccelError),
    /// The port list is invalid.
    #[error("invalid port {name:?}: {reason}")]
    InvalidPort { name: String, reason: &'static str },
    /// A file in the VM directory could not be created.
    #[error("cannot set up vm files in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be executed.
    #[error("cannot run {qemu}")]
    Spawn {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited or stalled before its sockets appeared.
    #[error("qemu did not come up (stderr: {stderr_tail})")]
    Startup {
        stderr_tail: String,
        #[source]
        source: WaitError,
    },
    /// A wait on the running VM failed.
    #[error("vm wait failed")]
    Wait(#[source] WaitError),
    /// A port's host end could not be prepared (listener, free TCP port).
    #[error("cannot prepare the host end of a port")]
    Endpoint(#[from] crate::chardev::ChardevError),
}

/// Device id of controller `i`: [`CONTROLLER_ID`] for 0, `vser<i>` for the extra ones (bus
/// `<id>.0`).
pub fn controller_id(i: usize) -> String {
    format!("vser{i}")
}

/// Which host end a port gets (see [`crate::chardev`] for what each means). Named from vport's
/// side: `UnixClient` means QEMU listens and vport connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostEnd {
    /// QEMU listens on a unix socket in the VM directory (`server=on,wait=off`); vport connects.
    #[default]
    UnixClient,
    /// vport listens on a unix socket in the VM directory (bound before QEMU starts); QEMU
    /// connects with `reconnect=<reconnect_secs>`.
    UnixServer {
        /// QEMU's reconnect interval in seconds (at least 1).
        reconnect_secs: u32,
    },
    /// QEMU listens on a free loopback TCP port (`server=on,wait=off`); vport connects.
    TcpClient,
    /// vport listens on a free loopback TCP port (bound before QEMU starts); QEMU connects with
    /// `reconnect=<reconnect_secs>`.
    TcpServer {
        /// QEMU's reconnect interval in seconds (at least 1).
        reconnect_secs: u32,
    },
    /// `-chardev pty`; vport opens the slave.
    Pty,
}

/// One port to create, and its host end (by default a unix socket QEMU listens on in the VM
/// directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Name the guest sees.
    pub name: String,
    /// `virtserialport` or `virtconsole`.
    pub kind: PortKind,
    /// The host end.
    pub host: HostEnd,
    /// Which virtio-serial controller the port sits on: 0 is [`CONTROLLER_ID`], `i > 0` the
    /// `i`-th of [`VmConfig::extra_controllers`] (id [`controller_id`]`(i)`).
    pub controller: usize,
}

impl PortConfig {
    /// A `virtserialport` called `name` whose host end is a unix socket QEMU listens on.
    pub fn serial(name: impl Into<String>) -> Self {
        Self { name: name.into(), kind: PortKind::Serial, host: HostEnd::UnixClient, controller: 0 }
    }

    /// The same port on controller `controller` (see [`PortConfig::controller`]).
    pub fn on_controller(mut self, controller: usize) -> Self {
        self.controller = controller;
        self
    }

    /// The same port with host end `host`.
    pub fn with_host(mut self, host: HostEnd) -> Self {
        self.host = host;
        self
    }
}

/// Everything needed to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// QEMU binary; `None`: `$VPORT_QEMU`, else `qemu-system-x86_64` on `PATH`.
    pub qemu: Option<PathBuf>,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Machine type (`pc`).
    pub machine: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// `max_ports` of the virtio-serial controller (`None`: QEMU default, 31).
    pub max_ports: Option<u32>,
    /// Ports, created in order.
    pub ports: Vec<PortConfig>,
    /// Further virtio-serial controllers, each given by its `max_ports` (`None`: QEMU default);
    /// the `i`-th (from 1) gets id [`controller_id`]`(i)`.
    pub extra_controllers: Vec<Option<u32>>,
    /// `-incoming <uri>`: start as a migration destination (for example `exec:cat FILE` or
    /// `unix:PATH`). The ports and controllers must match the source's.
    pub incoming: Option<String>,
    /// Extra raw QEMU arguments appended last.
    pub extra_args: Vec<OsString>,
    /// Whether QEMU gets a second QMP monitor, [`TOOLS_QMP_SOCKET`] in the VM directory
    /// ([`Vm::tools_qmp_socket`]), for other programs while the rig holds the first (a QMP
    /// socket serves one client at a time): `vport boot` has one so that `vport connect` can
    /// ask `query-chardev` whether a port is free.
    pub tools_qmp: bool,
    /// Deadline for QEMU to create its sockets.
    pub startup_timeout: Duration,
    /// Cache directory (for the accelerator verdict).
    pub cache_dir: PathBuf,
}

impl VmConfig {
    /// Defaults: `pc` machine, auto accelerator, 256 MiB, 1 vCPU, no ports, 30 s startup.
    pub fn new(kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        Self {
            qemu: None,
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: cmdline.into(),
            accel: AccelChoice::Auto,
            machine: "pc".into(),
            memory_mib: 256,
            cpus: 1,
            max_ports: None,
            ports: Vec::new(),
            extra_controllers: Vec::new(),
            incoming: None,
            extra_args: Vec::new(),
            tools_qmp: false,
            startup_timeout: Duration::from_secs(30),
            cache_dir: crate::cache::cache_dir(),
        }
    }
}

/// A created port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Name the guest sees.
    pub name: String,
    /// QEMU device id (appears in `VSERPORT_CHANGE` events).
    pub id: String,
    /// QEMU chardev id.
    pub chardev_id: String,
    /// Device type.
    pub kind: PortKind,
    /// Unix socket QEMU listens on ([`HostEnd::UnixClient`] ports; empty for other kinds).
    pub socket: PathBuf,
    /// The host end.
    pub endpoint: EndpointAddr,
}

/// A free loopback TCP port now (bind port 0, read it, release it). Another process can take
/// it before QEMU binds it; [`Vm::start`] retries when QEMU reports the address in use.
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Port specs for `ports` with sockets in `dir`: ids `vport-port<i>`, chardevs `vport-ch<i>`,
/// sockets `port<i>.sock` (short, so paths stay under the 108-byte unix socket limit; vport's
/// own listening sockets are `port<i>.host.sock`). TCP ports are chosen by [`plan_endpoints`].
pub fn plan_ports(dir: &Path, ports: &[PortConfig]) -> Result<Vec<PortSpec>, VmError> {
    plan_endpoints(dir, ports, &mut |_| Ok(0)).map(|v| v.into_iter().map(|(s, _)| s).collect())
}

/// Like [`plan_ports`], with each port's host end; `tcp_port(i)` picks the loopback TCP port of
/// port `i` (for TCP host ends).
pub fn plan_endpoints(
    dir: &Path,
    ports: &[PortConfig],
    tcp_port: &mut dyn FnMut(usize) -> std::io::Result<u16>,
) -> Result<Vec<(PortSpec, EndpointAddr)>, VmError> {
    plan_endpoints_on(dir, ports, usize::MAX, tcp_port)
}

/// Like [`plan_endpoints`] for a VM with `controllers` extra controllers (a port on a
/// controller beyond them is an error).
pub fn plan_endpoints_on(
    dir: &Path,
    ports: &[PortConfig],
    controllers: usize,
    tcp_port: &mut dyn FnMut(usize) -> std::io::Result<u16>,
) -> Result<Vec<(PortSpec, EndpointAddr)>, VmError> {
    let mut out: Vec<(PortSpec, EndpointAddr)> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let bad = |reason| VmError::InvalidPort { name: p.name.clone(), reason };
        if p.controller > controllers {
            return Err(bad("the port names a controller the vm does not have"));
        }
        if p.name.is_empty() {
            return Err(bad("port names must not be empty"));
        }
        if p.name.contains('\0') {
            return Err(bad("port names must not contain NUL"));
        }
        if out.iter().any(|(o, _)| o.name == p.name) {
            return Err(bad("duplicate port name"));
        }
        if matches!(p.host, HostEnd::UnixServer { reconnect_secs: 0 } | HostEnd::TcpServer { reconnect_secs: 0 }) {
            return Err(bad("a host end that qemu connects to needs reconnect_secs >= 1"));
        }
        let loopback = std::net::Ipv4Addr::LOCALHOST;
        let tcp = |tcp_port: &mut dyn FnMut(usize) -> std::io::Result<u16>| {
            tcp_port(i).map_err(|source| VmError::Io { path: dir.to_path_buf(), source })
        };
        let (backend, addr) = match p.host {
            HostEnd::UnixClient => {
                let path = dir.join(format!("port{i}.sock"));
                (ChardevBackend::UnixServer { path: path.clone() }, EndpointAddr::UnixClient { path })
            }
            HostEnd::UnixServer { reconnect_secs } => {
                let path = dir.join(format!("port{i}.host.sock"));
                (
                    ChardevBackend::UnixClient { path: path.clone(), reconnect_secs },
                    EndpointAddr::UnixServer { path, reconnect_secs },
                )
            }
            HostEnd::TcpClient => {
                let port = tcp(tcp_port)?;
                (
                    ChardevBackend::TcpServer { host: loopback.to_string(), port },
                    EndpointAddr::TcpClient { addr: (loopback, port).into() },
                )
            }
            HostEnd::TcpServer { reconnect_secs } => {
                let port = tcp(tcp_port)?;
                (
                    ChardevBackend::TcpClient { host: loopback.to_string(), port, reconnect_secs },
                    EndpointAddr::TcpServer { addr: (loopback, port).into(), reconnect_secs },
                )
            }
            HostEnd::Pty => (ChardevBackend::Pty, EndpointAddr::Pty { path: None }),
        };
        let spec = PortSpec {
            name: p.name.clone(),
            id: format!("vport-port{i}"),
            chardev_id: format!("vport-ch{i}"),
            kind: p.kind,
            backend,
            nr: None,
            controller: p.controller,
        };
        out.push((spec, addr));
    }
    Ok(out)
}

/// The full QEMU argument list for `cfg` under `accel`, with files in `dir`.
pub fn build_args(cfg: &VmConfig, accel: Accel, dir: &Path, ports: &[PortSpec]) -> Vec<OsString> {
    let mut a = args::machine_args(&cfg.machine, accel);
    a.extend(args::memory_args(cfg.memory_mib));
    a.extend(args::smp_args(cfg.cpus));
    a.extend(args::base_args());
    a.extend(args::kernel_args(&cfg.kernel, &cfg.initrd, &cfg.cmdline));
    a.extend(args::console_args(&dir.join("console.log")));
    a.extend(args::virtio_serial_args(CONTROLLER_ID, cfg.max_ports));
    for (i, max) in cfg.extra_controllers.iter().enumerate() {
        a.extend(args::virtio_serial_args(&controller_id(i + 1), *max));
    }
    for p in ports {
        a.extend(args::port_args(&controller_id(p.controller), p));
    }
    if let Some(uri) = &cfg.incoming {
        a.extend(args::incoming_args(uri));
    }
    if cfg.tools_qmp {
        a.extend(args::monitor_args("qmp-tools", &dir.join(TOOLS_QMP_SOCKET)));
    }
    // Last, so that the QMP socket existing implies every other socket exists too.
    a.extend(args::qmp_args(&dir.join("qmp.sock")));
    a.extend(cfg.extra_args.iter().cloned());
    a
}

/// Live QEMU processes and their directories, for the signal handler.
static LIVE: Mutex<Vec<(i32, PathBuf)>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<(i32, PathBuf)>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set by the signal handler before it kills anything.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether Ctrl-C (or SIGTERM) arrived and the cleanup of [`install_signal_cleanup`] is killing
/// the VMs: a caller that sees QEMU exit should then leave the exit code to that handler
/// ([`crate::exit::ExitCode::Interrupted`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Installs a Ctrl-C / SIGTERM / SIGHUP handler that SIGKILLs and reaps every live VM's
/// QEMU, removes their directories and exits with [`crate::exit::ExitCode::Interrupted`]
/// (130). Idempotent; fails if another handler was already installed with the `ctrlc` crate.
pub fn install_signal_cleanup() -> Result<(), ctrlc::Error> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    ctrlc::set_handler(|| {
        // First, so a thread that sees QEMU go away knows why (see `interrupted`).
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        let entries: Vec<_> = live().drain(..).collect();
        for (pid, dir) in entries {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            let _ = std::fs::remove_dir_all(&dir);
        }
        eprintln!("vport: interrupted, killed qemu");
        crate::exit::ExitCode::Interrupted.exit();
    })?;
    *installed = true;
    Ok(())
}

/// Last `lines` lines of the file at `path` (empty if unreadable).
/// The last `lines` lines of the text file `path` (empty when it cannot be read).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running QEMU guest. See the module docs for the clean-up guarantees.
pub struct Vm {
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    child: Mutex<Child>,
    exited: Mutex<Option<ExitStatus>>,
    pid: u32,
    qemu: PathBuf,
    accel: Accel,
    ports: Vec<PortInfo>,
    listeners: Vec<(String, Listener)>,
    args: Vec<OsString>,
    tools_qmp: bool,
    version: OnceLock<Result<QemuVersion, String>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("pid", &self.pid)
            .field("dir", &self.dir_path)
            .field("accel", &self.accel)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Starts QEMU for `cfg` and waits (up to `cfg.startup_timeout`, twice: sockets, then
    /// reply) until its QMP and port sockets exist and QEMU has answered a QMP
    /// `qmp_capabilities` (which it does only after machine set-up, so a bad kernel fails
    /// here). That connection is closed again; QMP is free for the caller. On error nothing is
    /// left running.
    ///
    /// QEMU gets SIGKILL when the *thread* that called `start` exits (`PR_SET_PDEATHSIG`
    /// semantics), so start VMs from a thread that outlives them.
    ///
    /// Listeners of host ends QEMU connects to are bound before QEMU starts (see
    /// [`Vm::listener`]). A [`HostEnd::TcpClient`] port gets a loopback port that was free a
    /// moment before; if QEMU finds it taken, the start is retried (3 attempts).
    pub fn start(cfg: &VmConfig) -> Result<Vm, VmError> {
        let qemu = super::find_qemu(cfg.qemu.as_deref())?;
        let accel = accel::resolve(cfg.accel, &qemu, Some(&cfg.kernel), &cfg.cache_dir)?;
        let tcp = cfg.ports.iter().any(|p| p.host == HostEnd::TcpClient);
        let mut attempt = 1;
        loop {
            match Vm::start_once(cfg, &qemu, accel) {
                Err(VmError::Startup { stderr_tail, .. })
                    if tcp && attempt < 3 && stderr_tail.contains("Address already in use") =>
                {
                    log::debug!("qemu found a chosen tcp port taken (attempt {attempt}); retrying");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn start_once(cfg: &VmConfig, qemu: &Path, accel: Accel) -> Result<Vm, VmError> {
        let qemu = qemu.to_path_buf();
        let tmp = tempfile::Builder::new()
            .prefix("vport-vm-")
            .tempdir()
            .map_err(|source| VmError::Io { path: std::env::temp_dir(), source })?;
        let dir = tmp.path().to_path_buf();
        let mut tcp_listeners = std::collections::HashMap::new();
        let planned =
            plan_endpoints_on(&dir, &cfg.ports, cfg.extra_controllers.len(), &mut |i| match cfg.ports[i].host {
                HostEnd::TcpServer { .. } => {
                    let l = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
                    let port = l.local_addr()?.port();
                    tcp_listeners.insert(i, l);
                    Ok(port)
                }
                _ => free_loopback_port(),
            })?;
        let mut listeners = Vec::new();
        for (i, (spec, addr)) in planned.iter().enumerate() {
            let l = match tcp_listeners.remove(&i) {
                Some(l) => Some(Listener::Tcp(l)),
                None => crate::chardev::bind(&spec.name, addr)?,
            };
            if let Some(l) = l {
                listeners.push((spec.name.clone(), l));
            }
        }
        let specs: Vec<PortSpec> = planned.iter().map(|(s, _)| s.clone()).collect();
        let args = build_args(cfg, accel, &dir, &specs);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| VmError::Io { path, source }
        };
        let log_path = dir.join("qemu.log");
        let out = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let err = out.try_clone().map_err(io(&log_path))?;
        let mut cmd = Command::new(&qemu);
        cmd.args(&args).stdin(Stdio::null()).stdout(out).stderr(err);
        log::debug!("starting {cmd:?}");
        // Registered under the lock before the pid exists anywhere else, so the signal
        // handler cannot miss it.
        let mut reg = live();
        let child =
            super::spawn_with_pdeathsig(&mut cmd).map_err(|source| VmError::Spawn { qemu: qemu.clone(), source })?;
        let pid = child.id();
        reg.push((pid as i32, dir.clone()));
        drop(reg);
        let ports = planned
            .into_iter()
            .map(|(s, endpoint)| PortInfo {
                name: s.name.clone(),
                id: s.id.clone(),
                chardev_id: s.chardev_id.clone(),
                kind: s.kind,
                socket: match &s.backend {
                    ChardevBackend::UnixServer { path } => path.clone(),
                    _ => PathBuf::new(),
                },
                endpoint,
            })
            .collect();
        let vm = Vm {
            dir: Some(tmp),
            dir_path: dir,
            child: Mutex::new(child),
            exited: Mutex::new(None),
            pid,
            qemu,
            accel,
            ports,
            listeners,
            args,
            tools_qmp: cfg.tools_qmp,
            version: OnceLock::new(),
        };
        log::debug!("qemu pid {pid} ({accel}) in {}", vm.dir_path.display());
        let sockets: Vec<PathBuf> = std::iter::once(vm.qmp_socket())
            .chain(vm.ports.iter().filter(|p| !p.socket.as_os_str().is_empty()).map(|p| p.socket.clone()))
            .collect();
        let waited = wait_until(
            "qemu to create its QMP and port sockets",
            cfg.startup_timeout,
            Duration::from_millis(5),
            || vm.check_alive(),
            || sockets.iter().all(|s| s.exists()).then_some(()),
        );
        // Sockets exist before the machine is set up (kernel loaded etc.); a QMP command
        // reply means QEMU's main loop runs.
        let waited =
            waited.and_then(|()| crate::qmp::wait_ready(&vm.qmp_socket(), cfg.startup_timeout, || vm.check_alive()));
        if let Err(source) = waited {
            let stderr_tail = vm.stderr_tail(20);
            return Err(VmError::Startup { stderr_tail, source });
        }
        Ok(vm)
    }

    /// The private directory holding sockets and logs (removed when the VM is dropped).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// QMP socket path.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir_path.join("qmp.sock")
    }

    /// The socket of the second QMP monitor, if the VM has one ([`VmConfig::tools_qmp`]).
    pub fn tools_qmp_socket(&self) -> Option<PathBuf> {
        self.tools_qmp.then(|| self.dir_path.join(TOOLS_QMP_SOCKET))
    }

    /// All ports, in configuration order.
    pub fn ports(&self) -> &[PortInfo] {
        &self.ports
    }

    /// The port called `name`.
    pub fn port(&self, name: &str) -> Option<&PortInfo> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// The listener vport bound for port `name`, if its host end is one QEMU connects to
    /// ([`HostEnd::UnixServer`], [`HostEnd::TcpServer`]).
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|(n, _)| n == name).map(|(_, l)| l)
    }

    /// Records a port added at run time (hot-plug: QMP `chardev-add` + `device_add`), so that
    /// [`Vm::port`] and the rig find it. A port of the same name is replaced.
    pub fn add_port(&mut self, info: PortInfo) {
        self.ports.retain(|p| p.name != info.name);
        self.ports.push(info);
    }

    /// Forgets the port called `name` (after a hot-unplug).
    pub fn remove_port(&mut self, name: &str) {
        self.ports.retain(|p| p.name != name);
    }

    /// Records the pty slave path QEMU allocated for port `name` (from QMP `query-chardev`).
    pub fn set_pty_path(&mut self, name: &str, path: PathBuf) {
        if let Some(p) = self.ports.iter_mut().find(|p| p.name == name) {
            if let EndpointAddr::Pty { path: slot } = &mut p.endpoint {
                *slot = Some(path);
            }
        }
    }

    /// Socket of the port called `name`.
    pub fn port_socket(&self, name: &str) -> Option<&Path> {
        self.port(name).map(|p| p.socket.as_path())
    }

    /// Serial console (guest `ttyS0`) log file.
    pub fn console_log(&self) -> PathBuf {
        self.dir_path.join("console.log")
    }

    /// QEMU stdout+stderr file.
    pub fn stderr_log(&self) -> PathBuf {
        self.dir_path.join("qemu.log")
    }

    /// Last `lines` lines of the console log.
    pub fn console_tail(&self, lines: usize) -> String {
        file_tail(&self.console_log(), lines)
    }

    /// Last `lines` lines of QEMU's stderr.
    pub fn stderr_tail(&self, lines: usize) -> String {
        file_tail(&self.stderr_log(), lines)
    }

    /// The accelerator QEMU runs with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The arguments QEMU was started with.
    pub fn args(&self) -> &[OsString] {
        &self.args
    }

    /// QEMU's version (runs `--version` on first call only).
    pub fn qemu_version(&self) -> Result<QemuVersion, String> {
        self.version.get_or_init(|| super::query_version(&self.qemu)).clone()
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exit status, if QEMU has exited (reaps it).
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        let mut exited = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        if exited.is_none() {
            *exited = self.child().try_wait().ok().flatten();
        }
        *exited
    }

    /// `Ok` while QEMU runs; `Err` naming the exit status and stderr tail once it exited.
    /// Suitable as the `alive` argument of [`wait_until`].
    pub fn check_alive(&self) -> Result<(), String> {
        match self.try_exit_status() {
            None => Ok(()),
            Some(status) => {
                Err(format!("qemu (pid {}) exited with {status}; stderr: {}", self.pid, self.stderr_tail(10)))
            }
        }
    }

    /// Waits up to `timeout` for QEMU to exit by itself (for example after the guest powers
    /// off) and returns its status.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, VmError> {
        wait_until("qemu to exit", timeout, Duration::from_millis(10), || Ok(()), || self.try_exit_status())
            .map_err(VmError::Wait)
    }

    /// SIGKILLs QEMU (if still running) and reaps it. Idempotent. The directory stays until
    /// the `Vm` is dropped.
    pub fn kill(&mut self) {
        live().retain(|(pid, _)| *pid != self.pid as i32);
        if self.try_exit_status().is_some() {
            return;
        }
        let mut child = self.child();
        let _ = child.kill();
        match child.wait() {
            Ok(status) => {
                drop(child);
                *self.exited.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                log::debug!("killed qemu pid {}: {status}", self.pid);
            }
            Err(e) => log::warn!("cannot reap qemu pid {}: {e}", self.pid),
        }
    }
}

/// Set (to anything but empty or `0`) to keep every VM directory (guest console log, QEMU
/// log, sockets) after the VM ends, for post-mortems; its path is logged at info level.
pub const KEEP_DIR_ENV: &str = "VPORT_KEEP_VM_DIR";

fn keep_dirs() -> bool {
    std::env::var_os(KEEP_DIR_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.dir.take() {
            if keep_dirs() {
                let kept = dir.keep();
                log::info!("vm directory kept ({KEEP_DIR_ENV}): {}", kept.display());
                return;
            }
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                log::warn!("cannot remove vm directory {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_on_path() -> Option<PathBuf> {
        super::super::find_on_path(super::super::QEMU_BINARY.as_ref(), std::env::var_os("PATH").as_deref())
    }

    #[test]
    fn plans_ports_with_ids_and_rejects_bad_names() {
        let specs = plan_ports(Path::new("/t"), &[PortConfig::serial("a"), PortConfig::serial("b")]).unwrap();
        assert_eq!(specs[1].id, "vport-port1");
        assert_eq!(specs[1].chardev_id, "vport-ch1");
        assert_eq!(specs[1].backend, ChardevBackend::UnixServer { path: "/t/port1.sock".into() });
        assert!(matches!(
            plan_ports(Path::new("/t"), &[PortConfig::serial("a"), PortConfig::serial("a")]),
            Err(VmError::InvalidPort { .. })
        ));
        assert!(plan_ports(Path::new("/t"), &[PortConfig::serial("")]).is_err());
    }

    #[test]
    fn plans_each_host_end_with_the_opposite_qemu_role() {
        let ports = [
            PortConfig::serial("a"),
            PortConfig::serial("b").with_host(HostEnd::UnixServer { reconnect_secs: 1 }),
            PortConfig::serial("c").with_host(HostEnd::TcpClient),
            PortConfig::serial("d").with_host(HostEnd::TcpServer { reconnect_secs: 2 }),
            PortConfig::serial("e").with_host(HostEnd::Pty),
        ];
        let p = plan_endpoints(Path::new("/t"), &ports, &mut |i| Ok(4000 + i as u16)).unwrap();
        assert_eq!(p[0].1, EndpointAddr::UnixClient { path: "/t/port0.sock".into() });
        assert_eq!(p[1].0.backend, ChardevBackend::UnixClient { path: "/t/port1.host.sock".into(), reconnect_secs: 1 });
        assert_eq!(p[2].0.backend, ChardevBackend::TcpServer { host: "127.0.0.1".into(), port: 4002 });
        assert_eq!(p[2].1, EndpointAddr::TcpClient { addr: "127.0.0.1:4002".parse().unwrap() });
        assert_eq!(
            p[3].0.backend,
            ChardevBackend::TcpClient { host: "127.0.0.1".into(), port: 4003, reconnect_secs: 2 }
        );
        assert_eq!(p[4], (p[4].0.clone(), EndpointAddr::Pty { path: None }));
        assert_eq!(p[4].0.backend, ChardevBackend::Pty);
        let bad = [PortConfig::serial("x").with_host(HostEnd::UnixServer { reconnect_secs: 0 })];
        assert!(plan_endpoints(Path::new("/t"), &bad, &mut |_| Ok(1)).is_err());
    }

    #[test]
    fn second_controller_and_incoming_args() {
        let mut cfg = VmConfig::new("/k", "/i", "console=ttyS0");
        cfg.ports = vec![PortConfig::serial("a"), PortConfig::serial("b").on_controller(1)];
        cfg.extra_controllers = vec![Some(4)];
        cfg.incoming = Some("unix:/t/mig.sock".into());
        let specs = plan_endpoints_on(Path::new("/t"), &cfg.ports, 1, &mut |_| Ok(0))
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>();
        assert_eq!(specs[1].controller, 1);
        let a: Vec<String> = build_args(&cfg, Accel::Tcg, Path::new("/t"), &specs)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(a.contains(&"virtio-serial-pci,id=vser1,max_ports=4".to_string()), "{a:?}");
        assert!(a.iter().any(|x| x.starts_with("virtserialport,bus=vser0.0,chardev=vport-ch0,")), "{a:?}");
        assert!(a.iter().any(|x| x.starts_with("virtserialport,bus=vser1.0,chardev=vport-ch1,")), "{a:?}");
        let i = a.iter().position(|x| x == "-incoming").unwrap();
        assert_eq!(a[i + 1], "unix:/t/mig.sock");
        assert_eq!(controller_id(0), CONTROLLER_ID);
        let bad = [PortConfig::serial("c").on_controller(2)];
        assert!(plan_endpoints_on(Path::new("/t"), &bad, 1, &mut |_| Ok(0)).is_err());
    }

    #[test]
    fn full_args_put_qmp_after_ports() {
        let mut cfg = VmConfig::new("/k", "/i", "console=ttyS0");
        cfg.ports = vec![PortConfig::serial("p")];
        cfg.max_ports = Some(2);
        cfg.tools_qmp = true;
        let specs = plan_ports(Path::new("/t"), &cfg.ports).unwrap();
        let a: Vec<String> = build_args(&cfg, Accel::Tcg, Path::new("/t"), &specs)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let pos = |s: &str| a.iter().position(|x| x.starts_with(s)).unwrap_or_else(|| panic!("{s} not in {a:?}"));
        assert!(pos("virtio-serial-pci,id=vser0,max_ports=2") < pos("virtserialport,bus=vser0.0"));
        assert!(pos("virtserialport") < pos("socket,id=qmp"));
        assert!(pos("socket,id=qmp-tools,path=/t/qmp-tools.sock") < pos("socket,id=qmp,path=/t/qmp.sock"));
        assert!(a.contains(&"file,id=console,path=/t/console.log".to_string()));
        assert_eq!(&a[..4], ["-machine", "pc", "-accel", "tcg"]);
    }

    /// Real QEMU: the KVM probe firmware must make QEMU exit with status 3 under TCG, so
    /// the probe is known to detect "guest code ran".
    #[test]
    fn probe_bios_exits_3_under_tcg() {
        let Some(qemu) = qemu_on_path() else {
            println!("skipped: qemu-system-x86_64 not on PATH");
            return;
        };
        let o = accel::probe(&qemu, Accel::Tcg, Duration::from_secs(30)).unwrap();
        assert!(o.works, "{o:?}");
    }

    /// Real QEMU and a real kernel (`VPORT_KERNEL` or one unpacked in the cache): the kernel
    /// probe must see the kernel reach its panic under TCG.
    #[test]
    fn kernel_probe_panics_under_tcg() {
        let Some(qemu) = qemu_on_path() else {
            println!("skipped: qemu-system-x86_64 not on PATH");
            return;
        };
        let from_cache = || {
            std::fs::read_dir(crate::cache::cache_dir().join("kernels"))
                .ok()?
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("vmlinuz"))
                .find(|p| p.is_file())
        };
        let Some(kernel) = std::env::var_os("VPORT_KERNEL").map(PathBuf::from).or_else(from_cache) else {
            println!("skipped: no kernel (set VPORT_KERNEL or run `vport image build`)");
            return;
        };
        let o = accel::probe_kernel(&qemu, Accel::Tcg, &kernel, Duration::from_secs(60)).unwrap();
        assert!(o.works, "{o:?}");
    }

    /// Real QEMU: a VM that fails at once (bad kernel) reports QEMU's stderr, and a VM that
    /// starts creates its sockets, is alive, and is gone after kill.
    #[test]
    fn start_failure_and_kill_with_real_qemu() {
        let Some(_) = qemu_on_path() else {
            println!("skipped: qemu-system-x86_64 not on PATH");
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = VmConfig::new(tmp.path().join("missing-kernel"), tmp.path().join("missing-initrd"), "");
        cfg.accel = AccelChoice::Tcg;
        cfg.cache_dir = tmp.path().to_path_buf();
        let err = Vm::start(&cfg).unwrap_err();
        assert!(err.to_string().contains("missing-kernel"), "{err}");
        // A minimal header-only bzImage (boot protocol 2.12) QEMU accepts; `-S` keeps the
        // vCPU from ever running it.
        let mut bz = vec![0u8; 8192];
        bz[0x1f1] = 4; // setup_sects
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
        bz[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        bz[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        let k = tmp.path().join("k");
        std::fs::write(&k, bz).unwrap();
        let initrd = tmp.path().join("initrd");
        std::fs::write(&initrd, b"x").unwrap();
        cfg.kernel = k;
        cfg.initrd = initrd;
        cfg.extra_args = vec!["-S".into()]; // keep the vCPU stopped
        cfg.ports = vec![PortConfig::serial("org.vport.test")];
        let mut vm = Vm::start(&cfg).unwrap();
        assert!(vm.qmp_socket().exists());
        assert!(vm.port_socket("org.vport.test").unwrap().exists());
        assert_eq!(vm.port("org.vport.test").unwrap().id, "vport-port0");
        vm.check_alive().unwrap();
        assert!(vm.qemu_version().unwrap().major >= 4);
        let dir = vm.dir().to_path_buf();
        let pid = vm.pid();
        vm.kill();
        let err = vm.check_alive().unwrap_err();
        assert!(err.contains(&format!("pid {pid}")), "{err}");
        drop(vm);
        assert!(!dir.exists());
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "qemu pid {pid} still exists");
    }
}
