//! Host ends where vport starts the connection: it connects to the unix or loopback TCP
//! socket QEMU listens on, or opens the slave of QEMU's pty.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::addr::{EndpointAddr, EndpointKind};
use super::connection::{Connection, Io};
use super::endpoint::Endpoint;
use super::error::ChardevError;
use super::events::EndpointEvents;
use super::pty::PtyStream;

/// Connects as a client to a `-chardev socket,server=on` unix socket.
pub fn connect_unix(port: &str, path: &Path) -> Result<UnixStream, ChardevError> {
    UnixStream::connect(path).map_err(|source| ChardevError::ConnectUnix {
        port: port.into(),
        path: path.into(),
        source,
    })
}

/// vport connects to QEMU's unix socket ([`EndpointKind::UnixClient`]).
pub struct UnixClientEndpoint {
    port: String,
    addr: EndpointAddr,
    path: PathBuf,
    events: EndpointEvents,
    /// A connection already made (and checked) that the first `connect` hands out.
    first: Option<UnixStream>,
    /// Longest blocking write on each connection (`None`: writes may block for ever).
    write_timeout: Option<Duration>,
}

impl UnixClientEndpoint {
    /// The host end of port `port` whose QEMU chardev listens on the unix socket `path`.
    pub(super) fn new(port: &str, path: &Path) -> Self {
        let addr = EndpointAddr::UnixClient { path: path.to_path_buf() };
        UnixClientEndpoint {
            port: port.into(),
            addr,
            path: path.to_path_buf(),
            events: EndpointEvents::default(),
            first: None,
            write_timeout: None,
        }
    }

    /// The host end of port `port` at `path`, whose first connection is `first` (made and
    /// checked by the caller, `crate::connect::open`); every later one connects again. Each
    /// connection's writes give up after `write_timeout`: a port QEMU stopped reading (a dead
    /// agent, a stuck port) then fails the write, and so the session, instead of hanging it.
    pub fn resuming(port: &str, path: &Path, first: UnixStream, write_timeout: Duration) -> Self {
        UnixClientEndpoint {
            first: Some(first),
            write_timeout: Some(write_timeout),
            ..UnixClientEndpoint::new(port, path)
        }
    }
}

impl Endpoint for UnixClientEndpoint {
    fn port(&self) -> &str {
        &self.port
    }
    fn addr(&self) -> &EndpointAddr {
        &self.addr
    }
    fn connect(&mut self, _timeout: Duration) -> Result<Connection, ChardevError> {
        // A unix connect to a listening socket completes at once (or fails at once).
        let s = match self.first.take() {
            Some(s) => s,
            None => connect_unix(&self.port, &self.path)?,
        };
        s.set_write_timeout(self.write_timeout).map_err(|source| ChardevError::ConnectUnix {
            port: self.port.clone(),
            path: self.path.clone(),
            source,
        })?;
        Ok(Connection::new(&self.port, EndpointKind::UnixClient, Io::Unix(s), &self.events))
    }
    fn events(&self) -> &EndpointEvents {
        &self.events
    }
}

/// vport connects to QEMU's loopback TCP listener ([`EndpointKind::TcpClient`]).
pub struct TcpClientEndpoint {
    port: String,
    addr: EndpointAddr,
    sock: SocketAddr,
    events: EndpointEvents,
}

impl TcpClientEndpoint {
    /// The host end of port `port` whose QEMU chardev listens on the loopback address `sock`.
    pub(super) fn new(port: &str, sock: SocketAddr) -> Self {
        let addr = EndpointAddr::TcpClient { addr: sock };
        TcpClientEndpoint { port: port.into(), addr, sock, events: EndpointEvents::default() }
    }
}

impl Endpoint for TcpClientEndpoint {
    fn port(&self) -> &str {
        &self.port
    }
    fn addr(&self) -> &EndpointAddr {
        &self.addr
    }
    fn connect(&mut self, timeout: Duration) -> Result<Connection, ChardevError> {
        let err = |source| ChardevError::ConnectTcp { port: self.port.clone(), addr: self.sock, source };
        let s = TcpStream::connect_timeout(&self.sock, timeout.max(Duration::from_millis(1))).map_err(err)?;
        s.set_nodelay(true).map_err(err)?;
        Ok(Connection::new(&self.port, EndpointKind::TcpClient, Io::Tcp(s), &self.events))
    }
    fn events(&self) -> &EndpointEvents {
        &self.events
    }
}

/// vport opens the slave of QEMU's pty in raw mode ([`EndpointKind::Pty`]).
pub struct PtyEndpoint {
    port: String,
    addr: EndpointAddr,
    events: EndpointEvents,
}

impl PtyEndpoint {
    /// The host end of port `port` whose QEMU chardev is a pty with the slave `path`, once
    /// known.
    pub(super) fn new(port: &str, path: Option<PathBuf>) -> Self {
        PtyEndpoint { port: port.into(), addr: EndpointAddr::Pty { path }, events: EndpointEvents::default() }
    }
}

impl Endpoint for PtyEndpoint {
    fn port(&self) -> &str {
        &self.port
    }
    fn addr(&self) -> &EndpointAddr {
        &self.addr
    }
    fn connect(&mut self, _timeout: Duration) -> Result<Connection, ChardevError> {
        let EndpointAddr::Pty { path: Some(path) } = &self.addr else {
            return Err(ChardevError::PtyPathUnknown { port: self.port.clone() });
        };
        let s = PtyStream::open(path).map_err(|source| ChardevError::Pty {
            port: self.port.clone(),
            path: path.clone(),
            source,
        })?;
        Ok(Connection::new(&self.port, EndpointKind::Pty, Io::Pty(s), &self.events))
    }
    fn events(&self) -> &EndpointEvents {
        &self.events
    }
}
