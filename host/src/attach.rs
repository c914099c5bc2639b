//! Attaching to a VM vport did not start: `vport hello` and `vport watch` with `--socket
//! NAME=ADDR` (one per port) and, optionally, `--qmp PATH`.
//!
//! Such a VM comes from anywhere (a hand-written command line, libvirt, another tool): vport
//! knows of it only what it is told. Each port's host end is an [`EndpointAddr`] (QEMU's socket
//! in server or client mode, TCP, a pty); a listening kind is bound at [`Attached::attach`], so
//! a QEMU whose chardev connects out (`server=off,reconnect=N`) finds vport within `N` seconds.
//!
//! With `--qmp`, the port's QEMU device id and chardev id are asked of QEMU (QOM: the
//! `virtserialport` / `virtconsole` devices and their `name` and `chardev` properties), so that
//! the session server follows `VSERPORT_CHANGE`, `STOP`, `RESET`, unplugs and QEMU's exit as it
//! does for a VM vport started. Without it the [`PortServer`]s get no QMP at all: a session ends
//! on in-band signals (BYE, a new HELLO) and on the connection's loss only, and every
//! QMP-derived fact is reported unavailable ([`NO_QMP`]), not failed. vport never kills or
//! stops an attached VM.

use crate::chardev::{self, ChardevError, EndpointAddr, Listener, ADDR_FORMS};
use crate::qmp::{Qmp, QmpError, QmpEvent};
use crate::session::PortServer;
use crate::usage::{check_port_names, UsageError};
use crossbeam_channel::Receiver;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// How QMP-derived facts read without `--qmp`.
pub const NO_QMP: &str = "unavailable (no --qmp)";
/// Deadline for the QMP connection and commands of an attached VM.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// The QOM containers searched for virtio-serial ports: with an `id=`, and without.
const QOM_CONTAINERS: [&str; 2] = ["/machine/peripheral", "/machine/peripheral-anon"];

/// What to attach to, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    /// Each port's name (as the guest sees it) and host end, in command-line order.
    pub ports: Vec<(String, EndpointAddr)>,
    /// The VM's QMP socket (`-qmp unix:PATH,server=on,wait=off`), if given.
    pub qmp: Option<PathBuf>,
}

impl AttachSpec {
    /// The spec of `--socket` values `sockets` (each `NAME=ADDR`, names unique) and `--qmp`.
    pub fn parse(sockets: &[String], qmp: Option<PathBuf>) -> Result<AttachSpec, UsageError> {
        let ports = sockets.iter().map(|s| parse_socket(s)).collect::<Result<Vec<_>, _>>()?;
        let names: Vec<&str> = ports.iter().map(|(n, _)| n.as_str()).collect();
        check_port_names(&names)?;
        Ok(AttachSpec { ports, qmp })
    }

    /// The port names, in order.
    pub fn names(&self) -> Vec<String> {
        self.ports.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Parses one `--socket NAME=ADDR` value (see [`EndpointAddr::parse`] for `ADDR`).
pub fn parse_socket(value: &str) -> Result<(String, EndpointAddr), UsageError> {
    let bad = |reason: String| UsageError::BadSocket { value: value.into(), reason };
    let Some((name, addr)) = value.split_once('=') else {
        return Err(bad(format!(
            "give NAME=ADDR, the port's name as the guest sees it and its chardev, for example \
             org.vport.0=/run/vm/port0.sock; {ADDR_FORMS}"
        )));
    };
    let addr = EndpointAddr::parse(addr).map_err(|e| bad(e.to_string()))?;
    Ok((name.to_string(), addr))
}

/// Why attaching failed.
#[derive(Debug, Error)]
pub enum AttachError {
    /// The QMP socket could not be used.
    #[error("cannot use the qmp socket {path} given with --qmp (QEMU's -qmp unix:PATH,server=on,wait=off)")]
    Qmp {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: QmpError,
    },
    /// QEMU has no virtio-serial port of the name given with `--socket`.
    #[error(
        "the vm at --qmp {qmp} has no virtio-serial port named {port:?} (its ports: {known}); --socket NAME must be \
         the port's name= as the guest sees it"
    )]
    NoSuchPort {
        /// The name given.
        port: String,
        /// The QMP socket.
        qmp: PathBuf,
        /// The names QEMU has, comma-separated.
        known: String,
    },
    /// A listening host end could not be bound, or an endpoint made.
    #[error(transparent)]
    Chardev(#[from] ChardevError),
    /// No port of that name was given with `--socket`.
    #[error("no --socket was given for port {0}")]
    NotGiven(String),
}

impl AttachError {
    /// The exit code: a name QEMU does not know is a usage error, the rest infrastructure.
    pub fn exit_code(&self) -> crate::exit::ExitCode {
        match self {
            AttachError::NoSuchPort { .. } | AttachError::NotGiven(_) => crate::exit::ExitCode::Usage,
            _ => crate::exit::ExitCode::Infrastructure,
        }
    }
}

/// One attached port.
#[derive(Debug)]
pub struct AttachedPort {
    /// Name, as the guest sees it.
    pub name: String,
    /// Host end.
    pub addr: EndpointAddr,
    /// QEMU device id (`VSERPORT_CHANGE`'s `id`), when QMP named one: `None` without `--qmp`
    /// and for a device without `id=` (QEMU sends it no event).
    pub device_id: Option<String>,
    /// QEMU chardev id (`query-chardev` label), when QMP named it.
    pub chardev_id: Option<String>,
    listener: Option<Listener>,
}

/// A VM vport did not start, reached through its ports' host ends and, optionally, QMP.
pub struct Attached {
    /// QMP, when `--qmp` was given.
    pub qmp: Option<Arc<Qmp>>,
    /// The QMP socket, when given.
    pub qmp_path: Option<PathBuf>,
    ports: Vec<AttachedPort>,
}

impl Attached {
    /// Connects QMP (if given), finds each port's ids through it, and binds the listeners of
    /// the listening kinds. Nothing is connected to a port yet.
    pub fn attach(spec: &AttachSpec) -> Result<Attached, AttachError> {
        let qmp = match &spec.qmp {
            Some(path) => {
                let qmp_err = |source| AttachError::Qmp { path: path.clone(), source };
                Some(Arc::new(Qmp::connect(path, QMP_TIMEOUT).map_err(qmp_err)?))
            }
            None => None,
        };
        let devices = match (&qmp, &spec.qmp) {
            (Some(q), Some(path)) => {
                serial_ports(q).map_err(|source| AttachError::Qmp { path: path.clone(), source })?
            }
            _ => Vec::new(),
        };
        let mut ports = Vec::new();
        for (name, addr) in &spec.ports {
            let (device_id, chardev_id) = match (&qmp, &spec.qmp) {
                (Some(_), Some(path)) => {
                    let Some(d) = devices.iter().find(|d| d.name == *name) else {
                        let known = devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ");
                        return Err(AttachError::NoSuchPort { port: name.clone(), qmp: path.clone(), known });
                    };
                    if d.id.is_none() {
                        log::warn!(
                            "port {name}: its QEMU device has no id=, so QEMU sends no VSERPORT_CHANGE for it; \
                             give the -device an id= to have them"
                        );
                    }
                    (d.id.clone(), Some(d.chardev.clone()))
                }
                _ => (None, None),
            };
            let listener = chardev::bind(name, addr)?;
            ports.push(AttachedPort { name: name.clone(), addr: addr.clone(), device_id, chardev_id, listener });
        }
        Ok(Attached { qmp, qmp_path: spec.qmp.clone(), ports })
    }

    /// The ports, in command-line order.
    pub fn ports(&self) -> &[AttachedPort] {
        &self.ports
    }

    /// The port called `name`.
    pub fn port(&self, name: &str) -> Result<&AttachedPort, AttachError> {
        self.ports.iter().find(|p| p.name == name).ok_or_else(|| AttachError::NotGiven(name.into()))
    }

    /// QEMU's events from now on; without QMP, a channel on which nothing ever comes.
    pub fn events(&self) -> Receiver<QmpEvent> {
        self.qmp.as_ref().map_or_else(crossbeam_channel::never, |q| q.subscribe())
    }

    /// A session server for port `name` over its host end. With QMP it follows QEMU's events
    /// for the port's ids; without, it has no QMP at all (see the module docs) and takes QEMU
    /// for exited when the chardev's server goes away
    /// ([`PortServer::infer_exit_from_chardev`]).
    pub fn port_server(&self, name: &str) -> Result<PortServer, AttachError> {
        let port = self.port(name)?;
        let listener = match &port.listener {
            Some(l) => Some(l.try_clone().map_err(|source| ChardevError::Listen {
                port: name.into(),
                addr: port.addr.to_string(),
                source,
            })?),
            None => None,
        };
        let endpoint = chardev::endpoint(name, &port.addr, listener)?;
        let device = port.device_id.as_deref().unwrap_or_default();
        let chardev = port.chardev_id.as_deref().unwrap_or_default();
        let mut server = PortServer::with_events(name, device, chardev, endpoint, self.events(), self.qmp.clone());
        if self.qmp.is_none() {
            server.infer_exit_from_chardev();
        }
        Ok(server)
    }

    /// What a failure report can say of the VM: vport has no console or stderr of it.
    pub fn failure_context(&self) -> String {
        let qmp = match &self.qmp_path {
            Some(p) => format!("qmp {}", p.display()),
            None => "no --qmp".into(),
        };
        let ports: Vec<String> = self.ports.iter().map(|p| format!("{} at {}", p.name, p.addr)).collect();
        format!("vport did not start this vm ({qmp}; {}): see its own console and QEMU's stderr", ports.join(", "))
    }
}

/// A virtio-serial port device, as QOM shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SerialDevice {
    /// The device id (`None`: no `id=`, under `peripheral-anon`).
    pub(crate) id: Option<String>,
    /// The port's `name=`.
    pub(crate) name: String,
    /// Its chardev's label.
    pub(crate) chardev: String,
}

/// Every `virtserialport` and `virtconsole` of the VM, with its name and chardev.
pub(crate) fn serial_ports(qmp: &Qmp) -> Result<Vec<SerialDevice>, QmpError> {
    let mut out = Vec::new();
    for container in QOM_CONTAINERS {
        let children = match qmp.execute("qom-list", Some(json!({ "path": container }))) {
            Ok(v) => v,
            // No device without id= gives no peripheral-anon container.
            Err(QmpError::Command { .. }) => continue,
            Err(e) => return Err(e),
        };
        for child in children.as_array().into_iter().flatten() {
            let ty = child.get("type").and_then(|t| t.as_str()).unwrap_or_default();
            let Some(node) = child.get("name").and_then(|n| n.as_str()) else { continue };
            if !matches!(ty, "child<virtserialport>" | "child<virtconsole>") {
                continue;
            }
            let path = format!("{container}/{node}");
            let get = |property: &str| -> Result<String, QmpError> {
                let v = qmp.execute("qom-get", Some(json!({ "path": path, "property": property })))?;
                Ok(v.as_str().unwrap_or_default().to_string())
            };
            let anonymous = container.ends_with("-anon");
            out.push(SerialDevice {
                id: (!anonymous).then(|| node.to_string()),
                name: get("name")?,
                chardev: get("chardev")?,
            });
        }
    }
    Ok(out)
}

/// Checks a `--qmp` path before anything is done: it must exist (QEMU creates it at start).
pub fn check_qmp_path(path: &Path) -> Result<(), UsageError> {
    std::fs::metadata(path).map(drop).map_err(|e| UsageError::QmpPath { path: path.into(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_parse_with_their_names_and_bad_ones_say_the_form() {
        let spec = AttachSpec::parse(
            &["org.vport.0=/t/p0.sock".into(), "org.vport.1=tcp:127.0.0.1:4555".into()],
            Some("/t/qmp.sock".into()),
        )
        .unwrap();
        assert_eq!(spec.names(), ["org.vport.0", "org.vport.1"]);
        assert_eq!(spec.ports[0].1, EndpointAddr::UnixClient { path: "/t/p0.sock".into() });
        let e = parse_socket("/t/p0.sock").unwrap_err().to_string();
        assert!(e.contains("NAME=ADDR") && e.contains("tcp:HOST:PORT"), "{e}");
        let e = AttachSpec::parse(&["a,b=/t/p".into()], None).unwrap_err().to_string();
        assert!(e.contains("a comma"), "{e}");
        let e = AttachSpec::parse(&["p=/t/a".into(), "p=/t/b".into()], None).unwrap_err();
        assert!(matches!(e, UsageError::DuplicatePort { .. }), "{e}");
        let e = parse_socket("p=vsock:1:2").unwrap_err().to_string();
        assert!(e.starts_with("bad --socket \"p=vsock:1:2\": \"vsock:1:2\": unknown kind"), "{e}");
    }

    #[test]
    fn without_qmp_a_port_server_has_no_qemu_view_and_never_sees_qemu_exit() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("p.sock");
        let spec = AttachSpec::parse(&[format!("org.vport.0=unix-listen:{}", sock.display())], None).unwrap();
        let attached = Attached::attach(&spec).unwrap();
        assert!(sock.exists(), "the listening kind is bound at attach");
        let server = attached.port_server("org.vport.0").unwrap();
        assert!(!server.vm_paused(), "without QMP the VM is taken for running");
        assert_eq!(server.state(), vport_common::server::ServerState::Idle);
        assert!(matches!(attached.port_server("org.vport.9"), Err(AttachError::NotGiven(_))));
        drop(server);
        drop(attached);
        assert!(!sock.exists(), "the socket vport bound is removed");
    }

    /// A stand-in for QEMU's `server=on` chardev at `path`: takes one connection, reads the
    /// host's first bytes, closes it, and, if `exits`, goes away (listener closed, file removed,
    /// as QEMU does on exit); else goes on listening. Returns the listener it kept, if any.
    fn qemu_closing_once(
        path: PathBuf,
        exits: bool,
    ) -> std::thread::JoinHandle<Option<std::os::unix::net::UnixListener>> {
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = std::io::Read::read(&mut s, &mut buf); // the HELLO_REQUEST
            drop(s);
            if exits {
                drop(listener);
                std::fs::remove_file(&path).unwrap();
                None
            } else {
                Some(listener)
            }
        })
    }

    #[test]
    fn without_qmp_a_chardev_server_that_goes_away_is_qemus_exit() {
        use crate::session::{EndReason, SessionError};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("p.sock");
        let qemu = qemu_closing_once(sock.clone(), true);
        let spec = AttachSpec::parse(&[format!("org.vport.0={}", sock.display())], None).unwrap();
        let attached = Attached::attach(&spec).unwrap();
        let mut server = attached.port_server("org.vport.0").unwrap();
        let e = server.accept(Duration::from_secs(10)).unwrap_err();
        assert!(matches!(e, SessionError::Closed { reason: EndReason::VmExited, .. }), "{e}");
        let why = server.server_gone().expect("why the server is taken for gone");
        assert!(
            why.starts_with("the chardev's server is gone (qemu exited?): it closed the connection and unix:"),
            "{why}"
        );
        assert!(why.contains("No such file"), "{why}");
        assert!(qemu.join().unwrap().is_none());
    }

    #[test]
    fn without_qmp_a_connection_closed_by_a_server_still_listening_is_no_exit() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("p.sock");
        let qemu = qemu_closing_once(sock.clone(), false);
        let spec = AttachSpec::parse(&[format!("org.vport.0={}", sock.display())], None).unwrap();
        let attached = Attached::attach(&spec).unwrap();
        let mut server = attached.port_server("org.vport.0").unwrap();
        // The stand-in takes the first connection, closes it and goes on listening (its
        // listener is kept in the thread's result until joined): the reconnect waits in its
        // backlog, so no session comes, and the server is not taken for gone.
        let e = server.accept(Duration::from_millis(600)).unwrap_err();
        assert!(matches!(e, crate::session::SessionError::Timeout { .. }), "still waiting for a session: {e}");
        let _listening = qemu.join().unwrap().expect("still listening");
        assert_eq!(server.server_gone(), None);
        assert_ne!(
            server.state(),
            vport_common::server::ServerState::Closed { reason: crate::session::EndReason::VmExited }
        );
    }
}
