//! `vport connect` to a VM vport did not start: the port's host end given as `--socket
//! NAME=ADDR` (any [`EndpointAddr`] kind) or found in a libvirt domain (`--libvirt`), QEMU's
//! monitor optionally given as `--qmp PATH`.
//!
//! What is checked before bridging, by kind:
//!
//! | kind | before the bridge |
//! |---|---|
//! | unix (QEMU listens) | with `--qmp`, `query-chardev` says whether another client holds the port (exit 4); in any case QEMU must take the connection within `--timeout`, asked of the kernel ([`crate::connect`]) |
//! | tcp (QEMU listens) | with `--qmp`, `query-chardev` as for unix; without it nothing can tell a connection QEMU took from one left in its backlog |
//! | unix-listen, tcp-listen (QEMU connects, `reconnect=N`) | vport binds the address and waits up to `--timeout` for QEMU; a unix socket file vport bound is removed on exit, Ctrl-C and SIGTERM |
//! | pty | the slave opens in raw mode; a pty cannot be half-closed, so the bridge ends once the input has ended and the port is quiet ([`crate::connect::bridge`]) |
//!
//! With `--qmp` the port must exist in QEMU under that name (QOM, as for `vport hello`); a name
//! QEMU does not know is a usage error (exit 2).

use crate::attach::{serial_ports, AttachError, AttachSpec, QMP_TIMEOUT};
use crate::chardev::{self, Accepted, ChardevError, EndpointAddr, Listener, PtyStream};
use crate::connect::{open_asking, refuse_if_held, ConnectError, PortStream, Target};
use crate::qmp::Qmp;
use crate::usage::{port_name_problem, UsageError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Parses `vport connect --socket VALUE`: `NAME=ADDR` (a port name, then `=`), or a bare
/// `ADDR` (the older form, `--socket PATH`, is one: a unix socket QEMU listens on).
pub fn parse_connect_socket(value: &str) -> Result<(Option<String>, EndpointAddr), UsageError> {
    match value.split_once('=') {
        Some((name, _)) if port_name_problem(name).is_none() => {
            crate::attach::parse_socket(value).map(|(n, a)| (Some(n), a))
        }
        _ => EndpointAddr::parse(value).map(|a| (None, a)).map_err(|e| UsageError::BadSocket {
            value: value.into(),
            reason: format!("{e}; name the port as NAME=ADDR (for example org.vport.0=/run/vm/port0.sock)"),
        }),
    }
}

/// The port `port` of `spec` (`from` says where the spec came from, for the message), or its
/// only port when `port` is `None`.
pub fn choose(spec: &AttachSpec, port: Option<&str>, from: &str) -> Result<(String, EndpointAddr), ConnectError> {
    let known = || spec.names().join(", ");
    match port {
        Some(p) => spec.ports.iter().find(|(n, _)| n == p).cloned().ok_or_else(|| ConnectError::NotAPort {
            port: p.into(),
            from: from.into(),
            known: known(),
        }),
        None => match spec.ports.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(ConnectError::WhichPort { from: from.into(), known: known() }),
        },
    }
}

/// How messages name the port: `port NAME at ADDR`, or `ADDR` without a name.
fn place(name: Option<&str>, addr: &EndpointAddr) -> String {
    match (name, addr) {
        (None, EndpointAddr::UnixClient { path }) => Target::socket(path).place(),
        (None, a) => a.to_string(),
        (Some(n), a) => format!("port {n} at {a}"),
    }
}

/// Connects to the port `name` (if named) at `addr` within `timeout`, after asking QEMU at
/// `qmp` (if given) that it has such a port and, for a socket QEMU listens on, that no other
/// client holds it. Returns the connection for [`crate::connect::bridge`] and how messages name
/// the port.
pub fn open_attached(
    name: Option<&str>,
    addr: &EndpointAddr,
    qmp: Option<&Path>,
    timeout: Duration,
) -> Result<(PortStream, String), ConnectError> {
    let start = Instant::now();
    let place = place(name, addr);
    let qmp = match qmp {
        Some(path) => {
            let Some(name) = name else { return Err(ConnectError::QmpNeedsName { qmp: path.into() }) };
            Some(port_chardev(path, name)?)
        }
        None => None,
    };
    let stream = match addr {
        EndpointAddr::UnixClient { path } => {
            let target = Target { name: name.map(String::from), socket: path.clone(), qmp: None, device: None };
            PortStream::Unix(open_asking(&target, qmp, start, timeout)?.0)
        }
        EndpointAddr::TcpClient { addr: sock } => {
            refuse_if_held(qmp.as_ref(), &place)?;
            let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
            let s = std::net::TcpStream::connect_timeout(sock, left).map_err(|source| ConnectError::Connect {
                place: place.clone(),
                hint: " (nobody listens there: the vm has probably exited)",
                source,
            })?;
            let _ = s.set_nodelay(true);
            PortStream::Tcp(s)
        }
        EndpointAddr::UnixServer { .. } | EndpointAddr::TcpServer { .. } => {
            let port = name.unwrap_or("(unnamed)");
            let listener = chardev::bind(port, addr)?
                .ok_or_else(|| ChardevError::NoListener { port: port.into(), addr: addr.to_string() })?;
            accept_within(&listener, &place, timeout.saturating_sub(start.elapsed()))?
        }
        EndpointAddr::Pty { path: Some(path) } => PortStream::Pty(PtyStream::open(path).map_err(|source| {
            ChardevError::Pty { port: name.unwrap_or("(unnamed)").into(), path: path.clone(), source }
        })?),
        EndpointAddr::Pty { path: None } => {
            return Err(ChardevError::PtyPathUnknown { port: name.unwrap_or("(unnamed)").into() }.into())
        }
    };
    Ok((stream, place))
}

/// QEMU's monitor at `path`, and the chardev label of its port `name` (QOM).
fn port_chardev(path: &Path, name: &str) -> Result<(Qmp, String), ConnectError> {
    let qmp_err = |source| AttachError::Qmp { path: path.into(), source };
    let q = Qmp::connect(path, QMP_TIMEOUT).map_err(qmp_err)?;
    let devices = serial_ports(&q).map_err(qmp_err)?;
    match devices.iter().find(|d| d.name == name) {
        Some(d) => Ok((q, d.chardev.clone())),
        None => {
            let known = devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ");
            Err(AttachError::NoSuchPort { port: name.into(), qmp: path.into(), known }.into())
        }
    }
}

/// Waits up to `timeout` for QEMU to connect to `listener` and takes the connection.
fn accept_within(listener: &Listener, place: &str, timeout: Duration) -> Result<PortStream, ConnectError> {
    let accepted = listener
        .accept_within(place, timeout)
        .map_err(|source| ConnectError::Io { what: format!("cannot accept qemu's connection on {place}"), source })?;
    match accepted {
        Some(Accepted::Unix(s)) => Ok(PortStream::Unix(s)),
        Some(Accepted::Tcp(s)) => Ok(PortStream::Tcp(s)),
        None => {
            Err(ConnectError::NotConnected { place: place.into(), waited: format!("{:.1} s", timeout.as_secs_f64()) })
        }
    }
}

/// The QMP socket `--qmp` gave, checked to exist.
pub fn check_qmp(qmp: Option<&PathBuf>) -> Result<(), UsageError> {
    qmp.map_or(Ok(()), |p| crate::attach::check_qmp_path(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitCode;
    use std::io::{Read, Write};

    #[test]
    fn the_socket_value_is_named_or_a_bare_address_as_before() {
        let (n, a) = parse_connect_socket("org.vport.0=/t/p.sock").unwrap();
        assert_eq!((n.as_deref(), a), (Some("org.vport.0"), EndpointAddr::UnixClient { path: "/t/p.sock".into() }));
        let (n, a) = parse_connect_socket("/t/p.sock").unwrap();
        assert_eq!((n, a), (None, EndpointAddr::UnixClient { path: "/t/p.sock".into() }), "the older --socket PATH");
        let (n, a) = parse_connect_socket("/t/a=b.sock").unwrap();
        assert_eq!((n, a), (None, EndpointAddr::UnixClient { path: "/t/a=b.sock".into() }), "an = in a path");
        let (n, a) = parse_connect_socket("p=unix-listen:/t/q.sock").unwrap();
        assert_eq!((n.as_deref(), a.kind()), (Some("p"), chardev::EndpointKind::UnixServer));
        let e = parse_connect_socket("vsock:3:1").unwrap_err().to_string();
        assert!(e.contains("unknown kind") && e.contains("NAME=ADDR"), "{e}");
    }

    #[test]
    fn the_port_is_chosen_by_name_or_as_the_only_one() {
        let spec = AttachSpec::parse(&["a=/t/a".into(), "b=/t/b".into()], None).unwrap();
        assert_eq!(choose(&spec, Some("b"), "--socket").unwrap().0, "b");
        let e = choose(&spec, None, "domain vm1").unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::Usage);
        assert!(e.to_string().contains("a, b"), "{e}");
        let e = choose(&spec, Some("c"), "domain vm1").unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::Usage);
        assert!(e.to_string().contains("domain vm1 has no port \"c\""), "{e}");
        let one = AttachSpec::parse(&["a=/t/a".into()], None).unwrap();
        assert_eq!(choose(&one, None, "--socket").unwrap().0, "a");
    }

    #[test]
    fn a_listening_port_takes_qemus_connection_and_its_socket_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let addr = EndpointAddr::UnixServer { path: path.clone(), reconnect_secs: 0 };
        let p = path.clone();
        let qemu = std::thread::spawn(move || {
            let s = crate::wait::wait_until(
                "the listener",
                Duration::from_secs(5),
                Duration::from_millis(5),
                || Ok(()),
                || std::os::unix::net::UnixStream::connect(&p).ok(),
            );
            let mut s = s.unwrap();
            s.write_all(b"from qemu").unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        let (stream, place) = open_attached(Some("p"), &addr, None, Duration::from_secs(5)).unwrap();
        assert!(place.starts_with("port p at unix-listen:"), "{place}");
        let mut out = Vec::new();
        crate::connect::bridge(stream, std::io::Cursor::new(b"from host".to_vec()), &mut out, &place).unwrap();
        assert_eq!(out, b"from qemu");
        assert_eq!(qemu.join().unwrap(), b"from host");
        assert!(!path.exists(), "the socket vport bound is gone with the bridge");

        let Err(e) = open_attached(Some("p"), &addr, None, Duration::from_millis(50)) else { panic!("no qemu came") };
        assert!(e.to_string().contains("qemu did not connect"), "{e}");
        assert!(!path.exists());
    }

    #[test]
    fn qmp_needs_a_port_name() {
        let addr = EndpointAddr::UnixClient { path: "/t/p".into() };
        let Err(e) = open_attached(None, &addr, Some(Path::new("/t/q")), Duration::from_secs(1)) else { panic!() };
        assert_eq!(e.exit_code(), ExitCode::Usage);
        assert!(e.to_string().contains("NAME=ADDR"), "{e}");
    }
}
