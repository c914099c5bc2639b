//! `vport connect`: find a port of a VM that `vport boot` keeps up, make sure no other client
//! holds its chardev, connect within a deadline, and bridge the connection to stdin/stdout.
//!
//! QEMU's socket chardev (`server=on`) serves one client at a time and leaves further
//! connections waiting in its listen backlog: without a check, a second client would connect
//! "successfully" and then hang. [`open`] therefore
//!
//! 1. asks QEMU (`query-chardev` on the VM's tools monitor, [`crate::registry::VmEntry::qmp_tools`])
//!    whether the chardev has a client: [`chardev_state`] of its `filename`;
//! 2. connects with a deadline (a full backlog makes `connect(2)` block);
//! 3. waits, within the same deadline, until QEMU has *accepted* the connection, which the kernel
//!    tells ([`crate::chardev::unix_diag::peer_accepted`]): this also catches a client that
//!    connected between steps 1 and 2, and works for `--socket` where there is no QMP to ask.
//!
//! Every failure is a [`ConnectError`] that names the port or socket, says what to do, and maps
//! to an [`ExitCode`] ([`ConnectError::exit_code`]).
//!
//! Limit: the QMP client keeps its socket open until the process ends (its reader thread holds
//! it), so a `vport connect` that bridges also holds the VM's tools monitor. A second `vport
//! connect` to the same VM then cannot ask QEMU (the greeting does not come within 1 s) and
//! learns of a held port from step 3, after `--timeout`.

use crate::chardev::unix_diag::peer_accepted;
use crate::exit::ExitCode;
use crate::qmp::Qmp;
use crate::registry::{self, RegistryError};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Longest wait for the tools monitor's greeting: QEMU greets at once unless another tool
/// holds the monitor (it serves one client, like every socket chardev).
const QMP_GREETING: Duration = Duration::from_secs(1);

/// What `vport connect` connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The port name; `None` when only the socket is known (`--socket`).
    pub name: Option<String>,
    /// The chardev's unix socket.
    pub socket: PathBuf,
    /// The VM's tools monitor and the port's chardev id, when known (a `vport boot` VM).
    pub qmp: Option<(PathBuf, String)>,
    /// The port's QEMU device id, when known (a `vport boot` VM).
    pub device: Option<String>,
}

impl Target {
    /// A bare socket (`--socket`): no name, no QEMU to ask.
    pub fn socket(path: &Path) -> Target {
        Target { name: None, socket: path.into(), qmp: None, device: None }
    }

    /// How messages name it: `port NAME` or `socket PATH`.
    pub fn place(&self) -> String {
        match &self.name {
            Some(n) => format!("port {n}"),
            None => format!("socket {}", self.socket.display()),
        }
    }

    /// [`Target::place`], with the socket path for a named port.
    fn place_and_socket(&self) -> String {
        match &self.name {
            Some(n) => format!("port {n} at {}", self.socket.display()),
            None => self.place(),
        }
    }
}

/// Why `vport connect` could not bridge the port.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The port could not be looked up (unknown, ambiguous, unreadable registry).
    #[error(transparent)]
    Lookup(#[from] RegistryError),
    /// Another client holds the port's chardev.
    #[error(
        "{place} is already in use by another client (QEMU serves one client per chardev socket; a second one \
         would wait in its backlog): {evidence}. Close the other client (another `vport connect`, `vport watch`, \
         socat, ...) and try again"
    )]
    Busy {
        /// [`Target::place`].
        place: String,
        /// What showed it: QEMU's `query-chardev`, or the connection not being accepted.
        evidence: String,
    },
    /// The socket's permissions do not let this user connect.
    #[error("permission denied connecting to {place}: {detail}")]
    PermissionDenied {
        /// The port and its socket.
        place: String,
        /// Which file or directory refuses access, and the fix.
        detail: String,
    },
    /// Connecting failed for another reason.
    #[error("cannot connect to {place}{hint}")]
    Connect {
        /// The port and its socket.
        place: String,
        /// What to do, for the common causes (empty otherwise).
        hint: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not take the connection although it shows no other client.
    #[error(
        "qemu has not taken the connection to {place} within {waited} although query-chardev shows no client \
         ({filename}); is qemu stopped or hung? (`vport boot` shows its pid)"
    )]
    NotAccepted {
        /// [`Target::place`].
        place: String,
        /// How long vport waited (`1.0 s`).
        waited: String,
        /// The chardev's `filename` in `query-chardev`.
        filename: String,
    },
    /// The port named is not among the ports given (`--socket`) or found (`--libvirt`).
    #[error("{from} has no port {port:?} (its ports: {known})")]
    NotAPort {
        /// The name given.
        port: String,
        /// Where the ports came from (`--socket`, `domain NAME`).
        from: String,
        /// The names there, comma-separated.
        known: String,
    },
    /// Several ports and none named.
    #[error("{from} has several ports ({known}): name the one to connect to (vport connect PORT ...)")]
    WhichPort {
        /// Where the ports came from.
        from: String,
        /// The names there, comma-separated.
        known: String,
    },
    /// `--qmp` with a `--socket` that names no port.
    #[error("--qmp {} needs the port's name to find it in qemu: give --socket NAME=ADDR", qmp.display())]
    QmpNeedsName {
        /// The QMP socket given.
        qmp: PathBuf,
    },
    /// QEMU did not connect to the listener vport bound (`unix-listen:`, `tcp-listen:`).
    #[error(
        "qemu did not connect to {place} within {waited}: its chardev (server=off,reconnect=N) tries again every N \
         seconds, so give a --timeout longer than N; is the vm running?"
    )]
    NotConnected {
        /// The port and its address.
        place: String,
        /// How long vport waited.
        waited: String,
    },
    /// The VM (its QMP, its port names) could not be used.
    #[error(transparent)]
    Attach(#[from] crate::attach::AttachError),
    /// The host end could not be bound or opened.
    #[error(transparent)]
    Chardev(#[from] crate::chardev::ChardevError),
    /// The libvirt domain's ports could not be read.
    #[error(transparent)]
    Libvirt(#[from] crate::libvirt::LibvirtError),
    /// Reading or writing the bridged streams failed.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ConnectError {
    /// The exit code: unknown or ambiguous port [`ExitCode::Usage`], busy [`ExitCode::Busy`],
    /// an attached VM's or a libvirt domain's as theirs say, everything else
    /// [`ExitCode::Infrastructure`].
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ConnectError::Lookup(RegistryError::NoSuchPort { .. } | RegistryError::Ambiguous { .. }) => ExitCode::Usage,
            ConnectError::Busy { .. } => ExitCode::Busy,
            ConnectError::NotAPort { .. } | ConnectError::WhichPort { .. } | ConnectError::QmpNeedsName { .. } => {
                ExitCode::Usage
            }
            ConnectError::Attach(e) => e.exit_code(),
            ConnectError::Libvirt(e) => e.exit_code(),
            _ => ExitCode::Infrastructure,
        }
    }
}

/// The port `name` among the VMs registered in `registry_dir` (restricted to QEMU pid `vm`).
pub fn lookup(registry_dir: &Path, name: &str, vm: Option<u32>) -> Result<Target, ConnectError> {
    let entries = registry::live_entries(registry_dir, registry::pid_alive)?;
    let (entry, port) = registry::find_port(&entries, name, vm)?;
    log::info!("port {name} of the vm with qemu pid {}", entry.pid);
    Ok(Target {
        name: Some(name.into()),
        socket: port.socket.clone(),
        qmp: entry.qmp_tools.clone().zip(port.chardev.clone()),
        device: Some(port.id.clone()),
    })
}

/// What `query-chardev` says of a socket chardev, from its `filename`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChardevState {
    /// No client: `disconnected:unix:<path>,server=on` (QEMU 7.2 `qemu_chr_socket_address`).
    Free,
    /// A client is connected: `unix:<path>,server=on`, `tcp:<host>:<port>,server=on <-> <peer>`
    /// (`qemu_chr_compute_filename`).
    Held,
    /// Not a unix or TCP server socket chardev (pty, file, ...): nothing to tell.
    Unknown,
}

/// Reads a `query-chardev` `filename` (formats verified against QEMU 7.2's char-socket.c and a
/// running QEMU; other QEMU versions print `,server` instead of `,server=on`).
pub fn chardev_state(filename: &str) -> ChardevState {
    if filename.starts_with("disconnected:") {
        ChardevState::Free
    } else if (filename.starts_with("unix:") || filename.starts_with("tcp:")) && filename.contains(",server") {
        ChardevState::Held
    } else {
        ChardevState::Unknown
    }
}

/// The `filename` of chardev `label`, from QEMU.
fn chardev_filename(qmp: &Qmp, label: &str) -> Option<String> {
    match qmp.query_chardev() {
        Ok(list) => list.into_iter().find(|c| c.label == label).map(|c| c.filename),
        Err(e) => {
            log::warn!("query-chardev failed: {e}");
            None
        }
    }
}

/// Connects to `target` and returns the connection once QEMU has accepted it, all within
/// `timeout` (see the module docs for the steps).
pub fn open(target: &Target, timeout: Duration) -> Result<UnixStream, ConnectError> {
    open_keeping_qmp(target, timeout).map(|(stream, _)| stream)
}

/// [`open`], and the VM's tools monitor it asked (`None` for `--socket`, or when the monitor
/// did not answer): a caller that goes on watching the VM (its run state, its events) keeps
/// it, since QEMU serves one client per monitor.
pub fn open_keeping_qmp(target: &Target, timeout: Duration) -> Result<(UnixStream, Option<Qmp>), ConnectError> {
    let start = Instant::now();
    let qmp = target.qmp.as_ref().and_then(|(path, label)| match Qmp::connect(path, QMP_GREETING.min(timeout)) {
        Ok(q) => Some((q, label.clone())),
        Err(e) => {
            log::info!("cannot ask qemu whether {} is free ({e}); relying on the kernel's view", target.place());
            None
        }
    });
    open_asking(target, qmp, start, timeout)
}

/// [`open_keeping_qmp`] with QEMU's monitor already connected (`qmp`, with the port's chardev
/// label), or none to ask; `timeout` counts from `start`.
pub(crate) fn open_asking(
    target: &Target,
    qmp: Option<(Qmp, String)>,
    start: Instant,
    timeout: Duration,
) -> Result<(UnixStream, Option<Qmp>), ConnectError> {
    let busy = |evidence: String| ConnectError::Busy { place: target.place(), evidence };
    refuse_if_held(qmp.as_ref(), &target.place())?;
    let left = timeout.saturating_sub(start.elapsed());
    let stream = connect_within(target, left, &busy)?;
    let accepted = crate::wait::wait_until(
        "qemu to take the connection",
        timeout.saturating_sub(start.elapsed()),
        Duration::from_millis(5),
        || Ok(()),
        || match peer_accepted(&stream) {
            Ok(a) => a.then_some(true),
            Err(e) => {
                log::info!("cannot ask the kernel whether the connection was accepted ({e}); assuming it was");
                Some(false)
            }
        },
    );
    if accepted.is_ok() {
        return Ok((stream, qmp.map(|(q, _)| q)));
    }
    let waited = format!("{:.1} s", start.elapsed().as_secs_f64());
    match &qmp {
        Some((q, label)) => match chardev_filename(q, label) {
            Some(f) if chardev_state(&f) == ChardevState::Free => {
                Err(ConnectError::NotAccepted { place: target.place(), waited, filename: f })
            }
            Some(f) => Err(busy(format!(
                "qemu has not taken the connection within {waited}, and query-chardev shows chardev {label} connected ({f})"
            ))),
            None => Err(busy(format!("qemu has not taken the connection within {waited}"))),
        },
        None if target.qmp.is_some() => Err(busy(format!(
            "qemu has not taken the connection within {waited} (its tools monitor was busy, probably with another \
             `vport connect`, so vport could not ask who holds the port)"
        ))),
        None => Err(busy(format!(
            "the server has not taken the connection within {waited} (without QMP, that of a vm registered by \
             `vport boot` or --qmp, vport cannot ask qemu)"
        ))),
    }
}

/// [`ConnectError::Busy`] when QEMU's monitor (`qmp`, with the port's chardev label) shows
/// another client holding the chardev at `place`; no monitor, or no answer, is no evidence.
pub(crate) fn refuse_if_held(qmp: Option<&(Qmp, String)>, place: &str) -> Result<(), ConnectError> {
    let Some((q, label)) = qmp else { return Ok(()) };
    let Some(f) = chardev_filename(q, label) else { return Ok(()) };
    log::debug!("chardev {label}: {f}");
    if chardev_state(&f) == ChardevState::Held {
        let evidence = format!("query-chardev shows chardev {label} connected ({f})");
        return Err(ConnectError::Busy { place: place.into(), evidence });
    }
    Ok(())
}

/// `connect(2)` to `socket` that gives up after `timeout` when the listener's backlog is full.
fn connect_within(
    target: &Target,
    timeout: Duration,
    busy: &dyn Fn(String) -> ConnectError,
) -> Result<UnixStream, ConnectError> {
    use nix::sys::socket::{connect, setsockopt, socket as new_socket, sockopt, AddressFamily, SockFlag, SockType};
    use nix::sys::time::TimeVal;
    use std::os::fd::AsRawFd;
    let io = |source: std::io::Error| connect_error(target, source);
    let fd =
        new_socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(|e| io(e.into()))?;
    // A blocking unix connect waits for room in a full backlog for at most SO_SNDTIMEO; at
    // least 1 ms, since 0 would mean "forever".
    let t = timeout.max(Duration::from_millis(1));
    let tv = TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
    setsockopt(&fd, sockopt::SendTimeout, &tv).map_err(|e| io(e.into()))?;
    let addr = nix::sys::socket::UnixAddr::new(&target.socket).map_err(|e| io(e.into()))?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::Error::EAGAIN) => {
            return Err(busy(format!(
                "its backlog is full (one client served, another waiting); connect gave up after {:.1} s",
                timeout.as_secs_f64()
            )))
        }
        Err(e) => return Err(io(e.into())),
    }
    // Writes to the port may block for as long as the guest does not read: no timeout there.
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(0, 0)).map_err(|e| io(e.into()))?;
    Ok(UnixStream::from(fd))
}

/// The error for a failed connect to `target`, with what to do.
fn connect_error(target: &Target, source: std::io::Error) -> ConnectError {
    use std::io::ErrorKind;
    let place = target.place_and_socket();
    let hint = match source.kind() {
        ErrorKind::PermissionDenied => {
            return ConnectError::PermissionDenied { place, detail: permission_detail(&target.socket) }
        }
        ErrorKind::NotFound => " (no such socket: is the vm still running? `vport connect --list` shows the ports)",
        ErrorKind::ConnectionRefused => " (nobody listens there: the vm has probably exited)",
        _ => "",
    };
    ConnectError::Connect { place, hint, source }
}

/// Which file on the way to `socket` this user may not use, its owner and mode, and the fix.
pub fn permission_detail(socket: &Path) -> String {
    use nix::unistd::{access, AccessFlags};
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid();
    let describe = |p: &Path, need: &str| match std::fs::metadata(p) {
        Ok(m) => {
            format!("{} (owner uid {}, mode {:o}) is not {need} by uid {me}", p.display(), m.uid(), m.mode() & 0o7777)
        }
        Err(_) => format!("{} is not {need} by uid {me}", p.display()),
    };
    let dirs: Vec<&Path> = socket.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()).collect();
    let culprit = dirs
        .iter()
        .rev()
        .find(|d| access(**d, AccessFlags::X_OK).is_err())
        .map(|d| describe(d, "searchable"))
        .unwrap_or_else(|| describe(socket, "writable"));
    format!(
        "{culprit}; run vport connect as the user who started the vm (or root), or give uid {me} access \
         (chmod / setfacl on the socket and its directories)"
    )
}

/// A connection to a port's chardev, of any kind, for [`bridge`].
pub enum PortStream {
    /// QEMU's (or vport's) unix socket.
    Unix(UnixStream),
    /// QEMU's (or vport's) loopback TCP socket.
    Tcp(std::net::TcpStream),
    /// The slave of QEMU's pty.
    Pty(crate::chardev::PtyStream),
}

impl PortStream {
    fn try_clone(&self) -> std::io::Result<PortStream> {
        Ok(match self {
            PortStream::Unix(s) => PortStream::Unix(s.try_clone()?),
            PortStream::Tcp(s) => PortStream::Tcp(s.try_clone()?),
            PortStream::Pty(s) => PortStream::Pty(s.try_clone()?),
        })
    }

    /// Half-closes a socket (QEMU takes it as the host leaving); a pty has no half-close.
    fn shutdown_write(&self) -> bool {
        match self {
            PortStream::Unix(s) => s.shutdown(std::net::Shutdown::Write).is_ok(),
            PortStream::Tcp(s) => s.shutdown(std::net::Shutdown::Write).is_ok(),
            PortStream::Pty(_) => false,
        }
    }
}

impl Read for PortStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PortStream::Unix(s) => s.read(buf),
            PortStream::Tcp(s) => s.read(buf),
            PortStream::Pty(s) => s.read(buf),
        }
    }
}

impl Write for PortStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PortStream::Unix(s) => s.write(buf),
            PortStream::Tcp(s) => s.write(buf),
            PortStream::Pty(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            PortStream::Unix(s) => s.flush(),
            PortStream::Tcp(s) => s.flush(),
            PortStream::Pty(s) => s.flush(),
        }
    }
}

impl From<UnixStream> for PortStream {
    fn from(s: UnixStream) -> PortStream {
        PortStream::Unix(s)
    }
}

/// How long a pty bridge goes on reading once the input ended and the port is quiet (a pty
/// cannot be half-closed, so nothing tells the guest that the host is done): as socat's `-t`.
const PTY_LINGER: Duration = Duration::from_millis(500);

/// Copies `input` to the port and the port to `output`, byte for byte, until the port closes
/// (`place`, [`Target::place`], names it in errors).
/// End of `input` half-closes a socket connection, which QEMU takes as the host leaving; QEMU
/// then closes its side and the bridge ends. A pty cannot be half-closed: the bridge ends once
/// the input has ended and the port has been quiet for 0.5 s.
pub fn bridge(
    stream: impl Into<PortStream>,
    mut input: impl Read + Send + 'static,
    mut output: impl Write,
    place: &str,
) -> Result<(), ConnectError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stream = stream.into();
    let io = |what: String| move |source| ConnectError::Io { what, source };
    let mut from_port = stream.try_clone().map_err(io("cannot clone the port connection".into()))?;
    let mut to_port = stream;
    let input_done = std::sync::Arc::new(AtomicBool::new(false));
    let done = input_done.clone();
    std::thread::spawn(move || {
        if let Err(e) = std::io::copy(&mut input, &mut to_port) {
            log::warn!("writing to the port failed: {e}");
        }
        to_port.shutdown_write();
        done.store(true, Ordering::SeqCst);
    });
    let pty = matches!(from_port, PortStream::Pty(_));
    if let PortStream::Pty(p) = &mut from_port {
        p.set_read_timeout(Some(Duration::from_millis(50))).map_err(io(format!("cannot read from {place}")))?;
    }
    let mut heard = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from_port.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if pty && e.kind() == std::io::ErrorKind::WouldBlock => {
                if input_done.load(Ordering::SeqCst) && heard.elapsed() >= PTY_LINGER {
                    return Ok(());
                }
                continue;
            }
            // QEMU dropping a client that had unread bytes of ours resets the connection.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(io(format!("reading from {place} failed"))(e)),
        };
        heard = Instant::now();
        output.write_all(&buf[..n]).map_err(io("cannot write to stdout".into()))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn chardev_filenames_of_qemu_7_2() {
        assert_eq!(chardev_state("disconnected:unix:/t/port0.sock,server=on"), ChardevState::Free);
        assert_eq!(chardev_state("unix:/t/port0.sock,server=on"), ChardevState::Held);
        assert_eq!(chardev_state("unix:/t/port0.sock,server"), ChardevState::Held, "older qemu");
        assert_eq!(chardev_state("pty:/dev/pts/3"), ChardevState::Unknown);
    }

    fn target(path: &Path) -> Target {
        Target { name: Some("org.vport.t".into()), socket: path.into(), qmp: None, device: None }
    }

    #[test]
    fn an_accepted_connection_is_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let s = open(&target(&path), Duration::from_secs(10)).unwrap();
        assert!(peer_accepted(&s).unwrap());
        drop(server.join().unwrap().unwrap());
    }

    #[test]
    fn a_connection_left_in_the_backlog_is_busy_within_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let e = open(&target(&path), Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        assert_eq!(e.exit_code(), ExitCode::Busy, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("port org.vport.t is already in use") && msg.contains("cannot ask qemu"), "{msg}");
        let msg = open(&Target::socket(&path), Duration::from_millis(10)).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("socket {} is already in use", path.display())), "{msg}");
    }

    #[test]
    fn a_missing_socket_says_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let e = open(&target(&dir.path().join("gone.sock")), Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::Infrastructure);
        assert!(e.to_string().contains("gone.sock") && e.to_string().contains("--list"), "{e}");
    }

    #[test]
    fn the_bridge_copies_both_ways_until_the_port_closes() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap(); // until the bridge half-closes
            b.write_all(b"pong").unwrap();
            got
        });
        let mut out = Vec::new();
        bridge(a, std::io::Cursor::new(b"ping".to_vec()), &mut out, "port p").unwrap();
        assert_eq!(out, b"pong");
        assert_eq!(peer.join().unwrap(), b"ping");
    }

    #[test]
    fn lookup_errors_map_to_usage() {
        let dir = tempfile::tempdir().unwrap();
        let e = lookup(dir.path(), "nosuch", None).unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::Usage);
        assert!(e.to_string().contains("no vm started by `vport boot` is running"), "{e}");
    }
}
