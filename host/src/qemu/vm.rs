//! A running QEMU guest: the process and everything it owns, a private directory with the
//! QMP socket, one socket or listener per virtio-serial port, the serial console log and
//! QEMU's own stdout/stderr.
//!
//! [`Vm::start`] finds QEMU ([`super::binary`]), resolves the accelerator ([`super::probe`]),
//! plans the ports and the command line ([`super::plan`]), binds the listeners of host ends
//! QEMU connects to, spawns QEMU ([`super::cleanup`]) and waits until it is ready: its sockets
//! exist and it answers on QMP through the QMP client ([`crate::qmp::wait_ready`]). Every wait
//! checks that QEMU still runs.
//!
//! Guarantees: QEMU never outlives its [`Vm`]. [`Vm::kill`] and `Drop` SIGKILL and reap it
//! and remove the directory; `PR_SET_PDEATHSIG` kills it if vport dies; and
//! [`super::install_signal_cleanup`] kills every live VM on Ctrl-C / SIGTERM / SIGHUP.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use super::accel::Accel;
use super::args::PortSpec;
use super::binary::{find_qemu, query_version, FindQemuError, QemuVersion};
use super::cleanup::{spawn_tracked, untrack, VmDir};
use super::config::{HostEnd, VmConfig};
use super::plan::{
    build_args, needs_host_tsc_rate, plan_endpoints_on, PlanError, PortInfo, CONSOLE_LOG, QEMU_LOG, QMP_SOCKET,
    TOOLS_QMP_SOCKET,
};
use super::probe::{self, AccelError};
use crate::chardev::{EndpointAddr, Listener};
use crate::wait::{wait_until, WaitError};

/// Why a VM could not be started or waited for.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No QEMU binary.
    #[error(transparent)]
    QemuNotFound(#[from] FindQemuError),
    /// The accelerator probe could not run.
    #[error("cannot choose an accelerator")]
    Accel(#[from] AccelError),
    /// The ports cannot be planned (invalid port list, no free loopback TCP port).
    #[error(transparent)]
    Plan(#[from] PlanError),
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
    /// QEMU exited or stalled before its sockets appeared or before it answered on QMP.
    #[error("qemu did not come up (stderr: {stderr_tail})")]
    Startup {
        stderr_tail: String,
        #[source]
        source: WaitError,
    },
    /// A wait on the running VM failed.
    #[error("vm wait failed")]
    Wait(#[source] WaitError),
    /// A port's host end could not be prepared (listener).
    #[error("cannot prepare the host end of a port")]
    Endpoint(#[from] crate::chardev::ChardevError),
}

/// The last `lines` lines of the text file `path` (empty when it cannot be read).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free loopback TCP port now (bind port 0, read it, release it). Another process can take
/// it before QEMU binds it; [`Vm::start`] retries when QEMU reports the address in use.
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// The ports of a VM about to start.
struct PreparedPorts {
    /// Each port's spec and host end, in configuration order.
    planned: Vec<(PortSpec, EndpointAddr)>,
    /// The listeners of the host ends QEMU connects to, by port name.
    listeners: Vec<(String, Listener)>,
}

/// The ports of `cfg` planned in `dir`, and the listeners of the host ends QEMU connects to,
/// bound now (before QEMU starts, so that its first connection finds them).
fn prepare_ports(cfg: &VmConfig, dir: &Path) -> Result<PreparedPorts, VmError> {
    let mut tcp_listeners = HashMap::new();
    let planned = plan_endpoints_on(dir, &cfg.ports, cfg.extra_controllers.len(), &mut |i| match cfg.ports[i].host {
        HostEnd::TcpServer { .. } => {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
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
    Ok(PreparedPorts { planned, listeners })
}

/// A running QEMU guest. See the module docs for the clean-up guarantees.
pub struct Vm {
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
    /// Last, so that it is removed after QEMU is dead (fields drop after `Drop::drop`).
    dir: VmDir,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("pid", &self.pid)
            .field("dir", &self.dir.path())
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
        let qemu = find_qemu(cfg.qemu.as_deref())?;
        let accel = probe::resolve(cfg.accel, &qemu, Some(&cfg.kernel), &cfg.cache_dir)?;
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
        let dir = VmDir::create().map_err(|source| VmError::Io { path: std::env::temp_dir(), source })?;
        let PreparedPorts { planned, listeners } = prepare_ports(cfg, dir.path())?;
        let specs: Vec<PortSpec> = planned.iter().map(|(s, _)| s.clone()).collect();
        let tsc_khz = if needs_host_tsc_rate(cfg, accel) { super::tsc::host_tsc_khz() } else { None };
        let args = build_args(cfg, accel, tsc_khz, dir.path(), &specs);
        let log_path = dir.path().join(QEMU_LOG);
        let io = |source| VmError::Io { path: log_path.clone(), source };
        let out = std::fs::File::create(&log_path).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut cmd = Command::new(qemu);
        cmd.args(&args).stdin(Stdio::null()).stdout(out).stderr(err);
        log::debug!("starting {cmd:?}");
        let child = spawn_tracked(&mut cmd, dir.path())
            .map_err(|source| VmError::Spawn { qemu: qemu.to_path_buf(), source })?;
        let pid = child.id();
        let vm = Vm {
            child: Mutex::new(child),
            exited: Mutex::new(None),
            pid,
            qemu: qemu.to_path_buf(),
            accel,
            ports: planned.into_iter().map(|(spec, endpoint)| PortInfo::planned(&spec, endpoint)).collect(),
            listeners,
            args,
            tools_qmp: cfg.tools_qmp,
            version: OnceLock::new(),
            dir,
        };
        log::debug!("qemu pid {pid} ({accel}) in {}", vm.dir().display());
        vm.wait_ready(crate::speed::scaled(cfg.startup_timeout))
            .map_err(|source| VmError::Startup { stderr_tail: vm.stderr_tail(20), source })?;
        Ok(vm)
    }

    /// Waits up to `timeout` for the QMP and port sockets to exist, then up to `timeout` again
    /// for QEMU to answer on QMP (see [`crate::qmp::wait_ready`]); both waits end at once if
    /// QEMU exits.
    fn wait_ready(&self, timeout: Duration) -> Result<(), WaitError> {
        let sockets: Vec<PathBuf> = std::iter::once(self.qmp_socket())
            .chain(self.ports.iter().filter(|p| !p.socket.as_os_str().is_empty()).map(|p| p.socket.clone()))
            .collect();
        wait_until(
            "qemu to create its QMP and port sockets",
            timeout,
            Duration::from_millis(5),
            || self.check_alive(),
            || sockets.iter().all(|s| s.exists()).then_some(()),
        )?;
        // Sockets exist before the machine is set up (kernel loaded etc.); a QMP command
        // reply means QEMU's main loop runs.
        crate::qmp::wait_ready(&self.qmp_socket(), timeout, || self.check_alive())
    }

    /// The private directory holding sockets and logs (removed when the VM is dropped).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// QMP socket path.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir().join(QMP_SOCKET)
    }

    /// The socket of the second QMP monitor, if the VM has one ([`VmConfig::tools_qmp`]).
    pub fn tools_qmp_socket(&self) -> Option<PathBuf> {
        self.tools_qmp.then(|| self.dir().join(TOOLS_QMP_SOCKET))
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
        self.dir().join(CONSOLE_LOG)
    }

    /// QEMU stdout+stderr file.
    pub fn stderr_log(&self) -> PathBuf {
        self.dir().join(QEMU_LOG)
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
        self.version.get_or_init(|| query_version(&self.qemu)).clone()
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
        untrack(self.pid);
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

impl Drop for Vm {
    /// Kills and reaps QEMU; the directory goes after it (see [`VmDir`]).
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::{AccelChoice, PortConfig};

    fn qemu_on_path() -> Option<PathBuf> {
        super::super::binary::find_on_path(
            super::super::binary::QEMU_BINARY.as_ref(),
            std::env::var_os("PATH").as_deref(),
        )
    }

    #[test]
    fn file_tail_keeps_the_last_lines_and_reads_nothing_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(file_tail(&p, 2), "b\nc");
        assert_eq!(file_tail(&p, 10), "a\nb\nc");
        assert_eq!(file_tail(&dir.path().join("none"), 3), "");
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
