//! The reference transport of `vport bench`: a virtio-vsock stream, so that users see what
//! virtio-serial costs against vsock on the same VM.
//!
//! The host has no `/dev/vhost-vsock` here, so the device is QEMU's `vhost-user-vsock-pci`
//! (`vhost-user-vsock-device` on `microvm`'s virtio-mmio: [`Transport::vhost_user_vsock`]) with
//! rust-vmm's `vhost-device-vsock` as its backend ([`Daemon`]): QEMU connects to the daemon's
//! vhost-user socket, and a host program reaches the guest through the daemon's unix socket
//! (`CONNECT <port>\n`, answered `OK <port>\n`, then the stream's bytes). vhost-user needs the
//! guest's memory shared with the daemon: the VM's RAM comes from a `memfd` shared backend.
//!
//! In the guest, GUEST_OP VSOCK_ACCEPT gives the agent's raw-port loops a vsock handle, so the
//! vsock samples run the same `write()` / `read()` loops as the raw port ([`to_host`],
//! [`to_guest`]) with the daemon's socket as the host end, every byte's digest checked.
//!
//! Whatever stops it (the daemon not installed, a QEMU without the device, a guest kernel
//! without AF_VSOCK) is an [`Unavailable`] reason: the bench reports vsock as skipped with it
//! and measures everything else.

use super::measure::{read_all_from_host, write_each_to_host, RawPort};
use super::BenchError;
use crate::client::{AgentClient, GuestOpProgress};
use crate::qemu::args::escape;
use crate::qemu::Transport;
use crate::session::Session;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::message::GuestOp;

/// The vhost-user backend's program.
pub const DAEMON: &str = "vhost-device-vsock";
/// The version vport installs and was measured with.
pub const DAEMON_VERSION: &str = "0.3.0";
/// QEMU's memory backend that the daemon can map.
pub const MEMORY_BACKEND: &str = "memory-backend-memfd";
/// The guest's context id (the daemon gives it to the device).
pub const GUEST_CID: u32 = 3;
/// The vsock port the guest listens on.
pub const GUEST_PORT: u32 = 5201;
/// The report's environment key.
pub const REPORT_KEY: &str = "vsock reference";
/// The daemon's vhost-user socket (QEMU connects to it) in the work directory.
const VHOST_SOCKET: &str = "vhost-vsock.sock";
/// The daemon's socket for host programs in the work directory.
const HOST_SOCKET: &str = "vsock.sock";
/// The daemon's stderr in the work directory.
const DAEMON_LOG: &str = "vhost-device-vsock.log";
/// QEMU ids of the chardev, the device and the memory backend.
const CHARDEV_ID: &str = "vport-vsock";
const MEMORY_ID: &str = "vport-mem";
/// Longest wait for the daemon's socket.
const DAEMON_START: Duration = Duration::from_secs(10);
/// How often a wait for the socket looks again without an event: whether the daemon still
/// runs, and whether a socket that exists listens yet (both have no event of their own).
const RECHECK: Duration = Duration::from_millis(50);
/// A `SO_ACCEPTCON` socket in `/proc/net/unix`'s flags: it listens.
const ACCEPTCON: u32 = 0x10000;

/// Why the vsock reference cannot run on this machine or VM; each says what to do about it.
#[derive(Debug, Error)]
pub enum Unavailable {
    /// The daemon is neither on `PATH` nor in vport's cache.
    #[error("{DAEMON} is not installed (not on PATH, not in {cache_bin}): install it with `{install}` (scripts/install-vhost-vsock does it)")]
    NoDaemon {
        /// Where vport looked in its cache.
        cache_bin: String,
        /// The command that installs it there.
        install: String,
    },
    /// QEMU could not be found or asked.
    #[error("cannot ask QEMU which devices it has: {0}")]
    Qemu(String),
    /// QEMU lacks the device or the shared memory backend.
    #[error("{qemu} has no {what}: the reference needs a QEMU with {device} and {MEMORY_BACKEND} (QEMU 7.2 of Debian 12's qemu-system-x86 has both)")]
    NoQemuSupport {
        /// The QEMU binary.
        qemu: String,
        /// What it lacks.
        what: &'static str,
        /// The vsock device the machine's transport needs.
        device: &'static str,
    },
    /// The daemon could not be started or did not make its socket.
    #[error("{path}: {why}{log}")]
    Daemon {
        /// The daemon's path.
        path: String,
        /// What went wrong.
        why: String,
        /// The end of its log, if it said anything (with a leading separator).
        log: String,
    },
    /// The guest could not take a vsock connection (no AF_VSOCK, an agent without
    /// VSOCK_ACCEPT, a refusal).
    #[error("the guest cannot accept a vsock connection: {0}")]
    Guest(String),
    /// The host could not connect to the guest through the daemon.
    #[error("the host cannot connect to guest port {GUEST_PORT} through {DAEMON}: {0}")]
    Connect(String),
}

/// The command that installs the daemon into `cache_dir/tools`, where vport looks for it.
pub fn install_command(cache_dir: &Path) -> String {
    format!("cargo install {DAEMON} --locked --version {DAEMON_VERSION} --root {}", cache_dir.join("tools").display())
}

/// The daemon: on `path` (the `PATH` variable), else `cache_dir/tools/bin/`.
pub fn find_daemon(path: Option<&OsStr>, cache_dir: &Path) -> Result<PathBuf, Unavailable> {
    let name = OsStr::new(DAEMON);
    let in_cache = cache_dir.join("tools").join("bin");
    crate::qemu::find_on_path(name, path)
        .or_else(|| crate::qemu::find_on_path(name, Some(in_cache.as_os_str())))
        .ok_or_else(|| Unavailable::NoDaemon {
            cache_bin: in_cache.display().to_string(),
            install: install_command(cache_dir),
        })
}

/// Whether `qemu -device help` / `-object help` output `help` lists `name` (as `name "NAME"`
/// or a bare `NAME` line).
pub fn lists_name(help: &str, name: &str) -> bool {
    let quoted = format!("name \"{name}\"");
    help.lines().map(str::trim).any(|l| l == name || l.starts_with(&quoted))
}

/// Checks that `qemu` has the vsock device `device` and the shared memory backend.
fn check_qemu(qemu: &Path, device: &'static str) -> Result<(), Unavailable> {
    for (kind, what) in [("-device", device), ("-object", MEMORY_BACKEND)] {
        let out = Command::new(qemu)
            .args([kind, "help"])
            .output()
            .map_err(|e| Unavailable::Qemu(format!("{} {kind} help: {e}", qemu.display())))?;
        if !lists_name(&String::from_utf8_lossy(&out.stdout), what) {
            return Err(Unavailable::NoQemuSupport { qemu: qemu.display().to_string(), what, device });
        }
    }
    Ok(())
}

/// The VM's RAM (`mib`, equal to `-m`) from a shared memfd, which the daemon can map.
pub fn memory_args(mib: u32) -> Vec<OsString> {
    vec![
        "-object".into(),
        format!("{MEMORY_BACKEND},id={MEMORY_ID},size={mib}M,share=on").into(),
        "-machine".into(),
        format!("memory-backend={MEMORY_ID}").into(),
    ]
}

/// The vhost-user vsock device `device` ([`Transport::vhost_user_vsock`]), its chardev a client
/// of the daemon's socket `vhost_socket` (the guest's CID is the daemon's to give).
pub fn device_args(device: &str, vhost_socket: &Path) -> Vec<OsString> {
    let mut chardev = OsString::from(format!("socket,id={CHARDEV_ID},path="));
    chardev.push(escape(vhost_socket.as_os_str()));
    vec![
        "-chardev".into(),
        chardev,
        "-device".into(),
        format!("{device},chardev={CHARDEV_ID},id={CHARDEV_ID}-dev").into(),
    ]
}

/// The daemon's arguments: guest `cid`, its vhost-user socket and its socket for host programs.
pub fn daemon_args(cid: u32, vhost_socket: &Path, host_socket: &Path) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        cid.to_string().into(),
        "--socket".into(),
        vhost_socket.into(),
        "--uds-path".into(),
        host_socket.into(),
    ]
}

/// Whether `/proc/net/unix` text `table` lists a socket bound to `path` that listens.
pub fn listening_in(table: &str, path: &Path) -> bool {
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        fields.len() >= 8
            && l.trim_end().ends_with(path.as_ref())
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & ACCEPTCON != 0)
    })
}

/// Waits, up to `timeout`, until a socket bound to `path` listens. Woken by inotify when
/// something is made in `path`'s directory, and every 50 ms to call `alive` (its `Err`
/// ends the wait with that reason) and to see whether a socket already made listens yet.
pub fn wait_listening(
    path: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let dir = path.parent().ok_or_else(|| format!("{} has no directory", path.display()))?;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| format!("inotify_init: {}", e.desc()))?;
    inotify
        .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .map_err(|e| format!("cannot watch {}: {}", dir.display(), e.desc()))?;
    let deadline = Instant::now() + timeout;
    loop {
        // Looked at after the watch is set: a socket made before is seen here, one made after
        // wakes the poll.
        let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        if listening_in(&table, path) {
            return Ok(());
        }
        alive()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no listening socket {} after {timeout:?}", path.display()));
        }
        let slice = u16::try_from(left.min(RECHECK).as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(slice)) {
            Ok(n) if n > 0 => {
                // Drained only: what was made is looked at at the top of the loop.
                let _ = inotify.read_events();
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll on inotify: {}", e.desc())),
        }
    }
}

/// A running `vhost-device-vsock`, killed and reaped when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// QEMU's end: the vhost-user socket.
    pub vhost_socket: PathBuf,
    /// The host programs' end.
    pub host_socket: PathBuf,
    /// `vhost-device-vsock X.Y.Z`, as it says.
    pub version: String,
    /// The QEMU device it serves ([`Transport::vhost_user_vsock`] of the VM's machine).
    pub device: &'static str,
}

impl Daemon {
    /// Starts `bin` for QEMU's `device` in a guest of CID [`GUEST_CID`] with its sockets and its
    /// log in `dir`, and waits up to `timeout` for its vhost-user socket to listen. It is killed
    /// if vport dies.
    pub fn start(bin: &Path, device: &'static str, dir: &Path, timeout: Duration) -> Result<Daemon, Unavailable> {
        let failed = |why: String, log: String| Unavailable::Daemon { path: bin.display().to_string(), why, log };
        let version = Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .map_err(|e| failed(format!("cannot run it: {e}"), String::new()))?;
        let (vhost_socket, host_socket, log) = (dir.join(VHOST_SOCKET), dir.join(HOST_SOCKET), dir.join(DAEMON_LOG));
        let stderr = std::fs::File::create(&log)
            .map_err(|e| failed(format!("cannot create {}: {e}", log.display()), String::new()))?;
        let mut cmd = Command::new(bin);
        cmd.args(daemon_args(GUEST_CID, &vhost_socket, &host_socket))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = crate::qemu::cleanup::spawn_with_pdeathsig(&mut cmd)
            .map_err(|e| failed(format!("cannot start it: {e}"), String::new()))?;
        let mut daemon = Daemon { child, vhost_socket, host_socket, version, device };
        let waited = wait_listening(&daemon.vhost_socket, timeout, || match daemon.child.try_wait() {
            Ok(Some(status)) => Err(format!("it exited before its socket listened ({status})")),
            Ok(None) => Ok(()),
            Err(e) => Err(format!("cannot wait for it: {e}")),
        });
        match waited {
            Ok(()) => Ok(daemon),
            // Dropping it kills it (if it still runs).
            Err(why) => Err(failed(why, log_tail(&log))),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            log::debug!("{DAEMON}: kill: {e}");
        }
        if let Err(e) = self.child.wait() {
            log::warn!("{DAEMON}: cannot reap it: {e}");
        }
    }
}

/// The last lines of the daemon's log as `; it said: ...`, or nothing.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        String::new()
    } else {
        format!("; it said: {tail}")
    }
}

/// Sets the VM of `cfg` up for the reference: finds the daemon and checks QEMU, starts the
/// daemon with its sockets in `dir`, and adds the shared memory and the device to `cfg` (after
/// its memory size is final).
pub fn prepare(cfg: &mut crate::qemu::VmConfig, dir: &Path) -> Result<Daemon, Unavailable> {
    let bin = find_daemon(std::env::var_os("PATH").as_deref(), &cfg.cache_dir)?;
    let qemu = crate::qemu::find_qemu(cfg.qemu.as_deref()).map_err(|e| Unavailable::Qemu(e.to_string()))?;
    let device = Transport::of(&cfg.machine).vhost_user_vsock();
    check_qemu(&qemu, device)?;
    let daemon = Daemon::start(&bin, device, dir, DAEMON_START)?;
    cfg.extra_args.extend(memory_args(cfg.memory_mib));
    cfg.extra_args.extend(device_args(device, &daemon.vhost_socket));
    Ok(daemon)
}

/// `CONNECT <port>\n`: what a host program sends the daemon's socket to reach guest `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The daemon's answer to CONNECT (without its `\n`): `OK <host port>` gives the port.
pub fn parse_connect_reply(line: &str) -> Result<u32, String> {
    line.strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("{DAEMON} answered {line:?} instead of `OK <port>`"))
}

/// Connects to guest `port` through the daemon's socket `host_socket`; the stream then carries
/// the connection's bytes.
fn host_connect(host_socket: &Path, port: u32, timeout: Duration) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(host_socket).map_err(|e| format!("connect to {}: {e}", host_socket.display()))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| format!("set a read timeout: {e}"))?;
    s.write_all(connect_line(port).as_bytes()).map_err(|e| format!("send CONNECT: {e}"))?;
    // Byte by byte up to the newline: what follows it is the stream's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "{DAEMON} closed the connection without an answer (the guest refused port {port}: nothing listens there)"
                ))
            }
            Ok(_) if byte[0] == b'\n' => {
                parse_connect_reply(&String::from_utf8_lossy(&line))?;
                return Ok(s);
            }
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("no answer to CONNECT within {timeout:?}: {e}")),
        }
    }
    Err(format!("{DAEMON} answered {:?}..., no line", String::from_utf8_lossy(&line)))
}

/// The guest's vsock handle and the host's connection to it, made once per VM: the guest
/// listens (VSOCK_ACCEPT), a later SYSFS tells the host it does, the host connects through the
/// daemon, and the completion gives the handle.
fn connect(ctl: &mut Session, daemon: &Daemon, timeout: Duration) -> Result<RawPort, Unavailable> {
    let session = |e: crate::session::SessionError| Unavailable::Guest(e.to_string());
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let op = ctl.start_guest_op(GuestOp::VsockAccept { port: GUEST_PORT, timeout_ms }).map_err(session)?;
    // Guest operations start in order: once SYSFS is done, the guest listens (or failed to).
    ctl.guest_op(GuestOp::Sysfs, timeout).map_err(session)?;
    let guest_failure = |d: vport_common::message::GuestOpDone| {
        Unavailable::Guest(format!("VSOCK_ACCEPT: errno {}: {}", d.errno, String::from_utf8_lossy(&d.data)))
    };
    if let GuestOpProgress::Done(d) = ctl.guest_op_progress(op).map_err(session)? {
        return Err(guest_failure(d));
    }
    let host = host_connect(&daemon.host_socket, GUEST_PORT, timeout).map_err(Unavailable::Connect)?;
    let done = ctl.await_guest_op(op, timeout).map_err(session)?;
    match u32::try_from(done.ret) {
        Ok(handle) if handle > 0 => {
            log::info!("vsock: guest handle {handle}, peer {}", String::from_utf8_lossy(&done.data));
            Ok(RawPort { handle, host })
        }
        _ => Err(guest_failure(done)),
    }
}

/// The reference in a bench: the daemon (kept for the VM's life, which uses it) and the
/// connection, or why there is none.
pub struct Reference {
    daemon: Option<Daemon>,
    state: Result<RawPort, String>,
}

impl Reference {
    /// Connects through `prepared` (the daemon [`prepare`] started, or why it could not) once
    /// the agent's session `ctl` is READY; any failure is the reason the reference is skipped.
    pub fn connect(prepared: Result<Daemon, Unavailable>, ctl: &mut Session, timeout: Duration) -> Reference {
        match prepared {
            Ok(daemon) => {
                let state = connect(ctl, &daemon, timeout).map_err(|e| guest_hint(&e));
                Reference { daemon: Some(daemon), state }
            }
            Err(e) => Reference { daemon: None, state: Err(e.to_string()) },
        }
    }

    /// Whether its samples can be taken.
    pub fn runs(&self) -> bool {
        self.state.is_ok()
    }

    /// The report's line: what carried the bytes, or `skipped: <reason>`.
    pub fn describe(&self) -> String {
        match (&self.state, &self.daemon) {
            (Ok(_), Some(d)) => format!(
                "virtio-vsock: {} served by {} (guest CID {GUEST_CID}, port {GUEST_PORT}; the VM's RAM \
                 shared from a memfd for it)",
                d.device, d.version
            ),
            (Ok(_), None) => "virtio-vsock".to_string(),
            (Err(reason), _) => format!("skipped: {reason}"),
        }
    }

    /// The connection, or the reason it was skipped as a setup error.
    fn port(&mut self) -> Result<&mut RawPort, BenchError> {
        self.state.as_mut().map_err(|reason| BenchError::Setup(format!("vsock was skipped: {reason}")))
    }

    /// Gives up the connection (its guest handle is closed by the caller, if any).
    pub fn take(&mut self) -> Option<RawPort> {
        std::mem::replace(&mut self.state, Err("closed".into())).ok()
    }
}

/// A guest without AF_VSOCK runs a kernel without the vsock modules (vport unpacks a kernel
/// package again whenever the modules it wants change, so a stale copy is not the cause): say
/// so, with the fix.
fn guest_hint(e: &Unavailable) -> String {
    let text = e.to_string();
    if text.contains("no AF_VSOCK") {
        format!(
            "{text} (the guest kernel has neither built in nor as modules vsock and vmw_vsock_virtio_transport: \
             give a kernel with them, e.g. Debian's, with --kernel-deb)"
        )
    } else {
        text
    }
}

/// vsock guest->host: the guest writes `bytes` of the pattern of `seed` to its vsock handle in
/// `write()` calls of `each` bytes, the host reads them off the daemon's socket; as the raw
/// port's sample ([`super::measure::raw_to_host`]).
pub fn to_host(
    ctl: &mut Session,
    vsock: &mut Reference,
    seed: u64,
    bytes: u64,
    each: u32,
) -> Result<Duration, BenchError> {
    write_each_to_host(ctl, vsock.port()?, "vsock", seed, bytes, each)
}

/// vsock host->guest: the host writes `data` (the pattern of `seed`) to the daemon's socket in
/// writes of `each` bytes, the guest reads it all off its vsock handle; as the raw port's
/// sample ([`super::measure::raw_to_guest`]).
pub fn to_guest(
    ctl: &mut Session,
    vsock: &mut Reference,
    seed: u64,
    data: &[u8],
    each: u32,
) -> Result<Duration, BenchError> {
    read_all_from_host(ctl, vsock.port()?, "vsock", seed, data, each)
}

#[cfg(test)]
mod tests;
