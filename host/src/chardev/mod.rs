//! The host end of a virtio-serial port: a connection to the port's QEMU chardev.
//!
//! [`Stream`] is what the rest of the rig needs from any connection: bytes both ways and a read
//! deadline. [`Endpoint`] is one port's host end of any kind ([`EndpointKind`]): it produces
//! [`Connection`]s (a [`Stream`], usable by [`crate::link::Link`]) and reports every connect and
//! disconnect, with its [`Instant`], as an [`EndpointEvent`] ([`Endpoint::events`]).
//!
//! Kinds, named from vport's side (the QEMU chardev is the opposite role):
//!
//! | kind | QEMU chardev | connect means |
//! |---|---|---|
//! | [`EndpointKind::UnixClient`] | `socket,path=P,server=on,wait=off` | vport connects to `P` |
//! | [`EndpointKind::UnixServer`] | `socket,path=P,server=off,reconnect=N` | vport accepts QEMU's connection on `P` |
//! | [`EndpointKind::TcpClient`] | `socket,host=127.0.0.1,port=N,server=on,wait=off` | vport connects |
//! | [`EndpointKind::TcpServer`] | `socket,host=127.0.0.1,port=N,server=off,reconnect=N` | vport accepts |
//! | [`EndpointKind::Pty`] | `pty` | vport opens the pty slave (raw mode) |
//!
//! A socket chardev serves one client at a time: QEMU sees the host attached from the
//! moment its side of the connection exists. When the host drops a connection, a QEMU that
//! connects out (`reconnect=N`) comes back within `N` seconds. A pty chardev counts as connected
//! while the slave is open; QEMU checks that once a second while disconnected, so the guest sees
//! a pty host attach up to one second after [`Endpoint::connect`]. Only loopback addresses are
//! used. A second client of a QEMU socket chardev waits in the listen backlog with a
//! connection that looks established; [`unix_diag::peer_accepted`] tells it apart.

mod pty;
pub mod unix_diag;

use crossbeam_channel::{Receiver, Sender};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

pub use pty::PtyStream;

/// A byte stream to a port's chardev with a settable read timeout.
pub trait Stream: Read + Write + Send {
    /// Makes reads give up with `WouldBlock`/`TimedOut` after `timeout` (`None`: block).
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Stream for std::net::TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

/// Why an endpoint could not be reached.
#[derive(Debug, Error)]
pub enum ChardevError {
    /// Connecting to the chardev's unix socket failed.
    #[error("cannot connect to the chardev socket {path} of port {port}")]
    ConnectUnix {
        /// Port name.
        port: String,
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the chardev's TCP address failed.
    #[error("cannot connect to the chardev address {addr} of port {port}")]
    ConnectTcp {
        /// Port name.
        port: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Binding or using a listener failed.
    #[error("cannot listen on {addr} for port {port}")]
    Listen {
        /// Port name.
        port: String,
        /// Path or address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not connect to the listener in time.
    #[error("qemu did not connect to {addr} for port {port} within {timeout:?}")]
    AcceptTimeout {
        /// Port name.
        port: String,
        /// Path or address.
        addr: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A listener that should have been bound before QEMU started is missing.
    #[error("port {port} has no listener at {addr}")]
    NoListener {
        /// Port name.
        port: String,
        /// Path or address.
        addr: String,
    },
    /// The pty's path is not known (QEMU has not reported it).
    #[error("the pty path of port {port} is not known")]
    PtyPathUnknown {
        /// Port name.
        port: String,
    },
    /// Opening or configuring the pty failed.
    #[error("cannot open the pty {path} of port {port}")]
    Pty {
        /// Port name.
        port: String,
        /// Pty slave path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Connects as a client to a `-chardev socket,server=on` unix socket.
pub fn connect_unix(port: &str, path: &Path) -> Result<UnixStream, ChardevError> {
    UnixStream::connect(path).map_err(|source| ChardevError::ConnectUnix {
        port: port.into(),
        path: path.into(),
        source,
    })
}

/// What kind of host end a port has (named from vport's side; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointKind {
    /// vport connects to QEMU's unix socket.
    UnixClient,
    /// vport listens on a unix socket; QEMU connects (and reconnects).
    UnixServer,
    /// vport connects to QEMU's loopback TCP listener.
    TcpClient,
    /// vport listens on loopback TCP; QEMU connects (and reconnects).
    TcpServer,
    /// vport opens the slave of QEMU's pty.
    Pty,
}

impl EndpointKind {
    /// A short stable name (`unix-client`, ...), for logs and traces.
    pub fn name(self) -> &'static str {
        match self {
            EndpointKind::UnixClient => "unix-client",
            EndpointKind::UnixServer => "unix-server",
            EndpointKind::TcpClient => "tcp-client",
            EndpointKind::TcpServer => "tcp-server",
            EndpointKind::Pty => "pty",
        }
    }
}

/// Where a port's host end is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddr {
    /// QEMU listens on the unix socket `path`; vport connects.
    UnixClient {
        /// Socket path.
        path: PathBuf,
    },
    /// vport listens on the unix socket `path`; QEMU connects and reconnects every
    /// `reconnect_secs` seconds after a disconnect.
    UnixServer {
        /// Socket path.
        path: PathBuf,
        /// QEMU's `reconnect=` in seconds.
        reconnect_secs: u32,
    },
    /// QEMU listens on loopback `addr`; vport connects.
    TcpClient {
        /// Loopback address.
        addr: SocketAddr,
    },
    /// vport listens on loopback `addr`; QEMU connects and reconnects.
    TcpServer {
        /// Loopback address.
        addr: SocketAddr,
        /// QEMU's `reconnect=` in seconds.
        reconnect_secs: u32,
    },
    /// QEMU's pty; `path` is the slave (`/dev/pts/N`) once known (QMP `query-chardev`).
    Pty {
        /// Slave path.
        path: Option<PathBuf>,
    },
}

impl EndpointAddr {
    /// The endpoint kind.
    pub fn kind(&self) -> EndpointKind {
        match self {
            EndpointAddr::UnixClient { .. } => EndpointKind::UnixClient,
            EndpointAddr::UnixServer { .. } => EndpointKind::UnixServer,
            EndpointAddr::TcpClient { .. } => EndpointKind::TcpClient,
            EndpointAddr::TcpServer { .. } => EndpointKind::TcpServer,
            EndpointAddr::Pty { .. } => EndpointKind::Pty,
        }
    }
}

impl std::fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointAddr::UnixClient { path } => write!(f, "unix:{}", path.display()),
            EndpointAddr::UnixServer { path, reconnect_secs } => {
                write!(f, "unix-listen:{} (qemu reconnect={reconnect_secs}s)", path.display())
            }
            EndpointAddr::TcpClient { addr } => write!(f, "tcp:{addr}"),
            EndpointAddr::TcpServer { addr, reconnect_secs } => {
                write!(f, "tcp-listen:{addr} (qemu reconnect={reconnect_secs}s)")
            }
            EndpointAddr::Pty { path: Some(p) } => write!(f, "pty:{}", p.display()),
            EndpointAddr::Pty { path: None } => write!(f, "pty:(unknown)"),
        }
    }
}

/// A listener bound for a port whose QEMU chardev connects out to vport.
#[derive(Debug)]
pub enum Listener {
    /// Unix socket listener.
    Unix(UnixListener),
    /// Loopback TCP listener.
    Tcp(TcpListener),
}

impl Listener {
    /// Another handle to the same listening socket.
    pub fn try_clone(&self) -> std::io::Result<Listener> {
        Ok(match self {
            Listener::Unix(l) => Listener::Unix(l.try_clone()?),
            Listener::Tcp(l) => Listener::Tcp(l.try_clone()?),
        })
    }
}

/// What happened on an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointEventKind {
    /// A connection was established (the host end is attached).
    Connected,
    /// vport closed the connection.
    ClosedByHost,
    /// QEMU closed the connection (read end of file, reset, or pty master gone).
    ClosedByPeer,
}

/// One connect or disconnect of a port's host end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEvent {
    /// Port name.
    pub port: String,
    /// Endpoint kind.
    pub kind: EndpointKind,
    /// Connection number on this endpoint, from 1.
    pub conn: u64,
    /// What happened.
    pub what: EndpointEventKind,
    /// Local monotonic time.
    pub at: Instant,
}

#[derive(Default)]
struct HubInner {
    history: Vec<EndpointEvent>,
    subscribers: Vec<Sender<EndpointEvent>>,
    conns: u64,
}

/// The record of an endpoint's connects and disconnects, shared by the endpoint and its
/// connections. Cheap to clone (one shared log).
#[derive(Clone, Default)]
pub struct EndpointEvents {
    inner: Arc<Mutex<HubInner>>,
}

impl EndpointEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_conn(&self) -> u64 {
        let mut g = self.lock();
        g.conns += 1;
        g.conns
    }

    fn record(&self, ev: EndpointEvent) {
        log::debug!("port {}: {} connection {} {:?}", ev.port, ev.kind.name(), ev.conn, ev.what);
        let mut g = self.lock();
        g.subscribers.retain(|tx| tx.send(ev.clone()).is_ok());
        g.history.push(ev);
    }

    /// Every event so far, in order.
    pub fn history(&self) -> Vec<EndpointEvent> {
        self.lock().history.clone()
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> Receiver<EndpointEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.lock().subscribers.push(tx);
        rx
    }
}

enum Io {
    Unix(UnixStream),
    Tcp(TcpStream),
    Pty(PtyStream),
}

/// One connection of an endpoint to QEMU's chardev. Implements [`Stream`]. Reading end of file
/// (or a reset) records [`EndpointEventKind::ClosedByPeer`]; dropping the connection closes it
/// and records [`EndpointEventKind::ClosedByHost`] (unless the peer closed first).
pub struct Connection {
    port: String,
    kind: EndpointKind,
    conn: u64,
    io: Io,
    connected_at: Instant,
    events: EndpointEvents,
    closed: bool,
}

impl Connection {
    fn new(port: &str, kind: EndpointKind, io: Io, events: &EndpointEvents) -> Connection {
        let conn = events.next_conn();
        let connected_at = Instant::now();
        events.record(EndpointEvent {
            port: port.into(),
            kind,
            conn,
            what: EndpointEventKind::Connected,
            at: connected_at,
        });
        Connection { port: port.into(), kind, conn, io, connected_at, events: events.clone(), closed: false }
    }

    /// Wraps an already connected unix stream (for example one end of a socketpair standing in
    /// for QEMU in tests) as connection of `kind`, recorded in `events`.
    pub fn from_unix_stream(port: &str, kind: EndpointKind, stream: UnixStream, events: &EndpointEvents) -> Connection {
        Connection::new(port, kind, Io::Unix(stream), events)
    }

    /// The port name.
    pub fn port(&self) -> &str {
        &self.port
    }

    /// The endpoint kind.
    pub fn kind(&self) -> EndpointKind {
        self.kind
    }

    /// Connection number on its endpoint, from 1.
    pub fn number(&self) -> u64 {
        self.conn
    }

    /// When the connection was established.
    pub fn connected_at(&self) -> Instant {
        self.connected_at
    }

    /// Whether QEMU has closed the connection (seen by a read).
    pub fn peer_closed(&self) -> bool {
        self.closed
    }

    fn record_close(&mut self, what: EndpointEventKind) {
        if !self.closed {
            self.closed = true;
            self.events.record(EndpointEvent {
                port: self.port.clone(),
                kind: self.kind,
                conn: self.conn,
                what,
                at: Instant::now(),
            });
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = match &mut self.io {
            Io::Unix(s) => s.read(buf),
            Io::Tcp(s) => s.read(buf),
            Io::Pty(s) => s.read(buf),
        };
        match &r {
            Ok(0) if !buf.is_empty() => self.record_close(EndpointEventKind::ClosedByPeer),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => self.record_close(EndpointEventKind::ClosedByPeer),
            _ => {}
        }
        r
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.io {
            Io::Unix(s) => s.write(buf),
            Io::Tcp(s) => s.write(buf),
            Io::Pty(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.io {
            Io::Unix(s) => s.flush(),
            Io::Tcp(s) => s.flush(),
            Io::Pty(s) => s.flush(),
        }
    }
}

impl Stream for Connection {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        match &mut self.io {
            Io::Unix(s) => UnixStream::set_read_timeout(s, timeout),
            Io::Tcp(s) => TcpStream::set_read_timeout(s, timeout),
            Io::Pty(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        match &self.io {
            Io::Unix(s) => drop(s.shutdown(std::net::Shutdown::Both)),
            Io::Tcp(s) => drop(s.shutdown(std::net::Shutdown::Both)),
            Io::Pty(_) => {}
        }
        self.record_close(EndpointEventKind::ClosedByHost);
    }
}

/// One port's host end, of any [`EndpointKind`].
pub trait Endpoint: Send {
    /// The port name.
    fn port(&self) -> &str;
    /// Where the host end is.
    fn addr(&self) -> &EndpointAddr;
    /// The kind.
    fn kind(&self) -> EndpointKind {
        self.addr().kind()
    }
    /// Establishes the next connection within `timeout`: connects to QEMU, accepts QEMU's
    /// connection, or opens the pty. The connection is recorded as
    /// [`EndpointEventKind::Connected`] at the moment it exists.
    fn connect(&mut self, timeout: Duration) -> Result<Connection, ChardevError>;
    /// This endpoint's connect/disconnect record.
    fn events(&self) -> &EndpointEvents;
}

/// vport connects to QEMU's unix socket ([`EndpointKind::UnixClient`]).
pub struct UnixClientEndpoint {
    port: String,
    addr: EndpointAddr,
    path: PathBuf,
    events: EndpointEvents,
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
        let s = connect_unix(&self.port, &self.path)?;
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

/// vport accepts QEMU's connection on a listener bound before QEMU started
/// ([`EndpointKind::UnixServer`], [`EndpointKind::TcpServer`]).
pub struct ServerEndpoint {
    port: String,
    addr: EndpointAddr,
    listener: Listener,
    events: EndpointEvents,
}

impl ServerEndpoint {
    fn listen_err(&self, source: std::io::Error) -> ChardevError {
        ChardevError::Listen { port: self.port.clone(), addr: self.addr.to_string(), source }
    }
}

impl Endpoint for ServerEndpoint {
    fn port(&self) -> &str {
        &self.port
    }
    fn addr(&self) -> &EndpointAddr {
        &self.addr
    }
    fn connect(&mut self, timeout: Duration) -> Result<Connection, ChardevError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = match &self.listener {
                Listener::Unix(l) => wait_readable(l.as_fd(), left),
                Listener::Tcp(l) => wait_readable(l.as_fd(), left),
            }
            .map_err(|e| self.listen_err(e))?;
            if !ready {
                return Err(ChardevError::AcceptTimeout {
                    port: self.port.clone(),
                    addr: self.addr.to_string(),
                    timeout,
                });
            }
            let accepted = match &self.listener {
                Listener::Unix(l) => l.set_nonblocking(true).and_then(|()| l.accept()).map(|(s, _)| Io::Unix(s)),
                Listener::Tcp(l) => l.set_nonblocking(true).and_then(|()| l.accept()).and_then(|(s, peer)| {
                    if !peer.ip().is_loopback() {
                        log::warn!("port {}: refusing a connection from {peer}", self.port);
                        return Err(std::io::Error::from(ErrorKind::WouldBlock));
                    }
                    s.set_nodelay(true)?;
                    Ok(Io::Tcp(s))
                }),
            };
            match accepted {
                Ok(io) => {
                    let io = match io {
                        Io::Unix(s) => s.set_nonblocking(false).map(|()| Io::Unix(s)),
                        Io::Tcp(s) => s.set_nonblocking(false).map(|()| Io::Tcp(s)),
                        other => Ok(other),
                    }
                    .map_err(|e| self.listen_err(e))?;
                    return Ok(Connection::new(&self.port, self.addr.kind(), io, &self.events));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => continue,
                Err(e) => return Err(self.listen_err(e)),
            }
        }
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

/// The endpoint for port `port` at `addr`. Server kinds need the `listener` bound before QEMU
/// started (see [`crate::qemu::Vm::listener`]).
pub fn endpoint(
    port: &str,
    addr: &EndpointAddr,
    listener: Option<Listener>,
) -> Result<Box<dyn Endpoint>, ChardevError> {
    let events = EndpointEvents::default();
    let (port_s, addr_c) = (port.to_string(), addr.clone());
    Ok(match addr {
        EndpointAddr::UnixClient { path } => {
            Box::new(UnixClientEndpoint { port: port_s, addr: addr_c, path: path.clone(), events })
        }
        EndpointAddr::TcpClient { addr: sock } => {
            Box::new(TcpClientEndpoint { port: port_s, addr: addr_c, sock: *sock, events })
        }
        EndpointAddr::UnixServer { .. } | EndpointAddr::TcpServer { .. } => {
            let listener =
                listener.ok_or_else(|| ChardevError::NoListener { port: port.into(), addr: addr.to_string() })?;
            Box::new(ServerEndpoint { port: port_s, addr: addr_c, listener, events })
        }
        EndpointAddr::Pty { .. } => Box::new(PtyEndpoint { port: port_s, addr: addr_c, events }),
    })
}

/// Binds the listener for a server-kind `addr` (unix path or loopback TCP address; TCP port 0
/// picks a free port, see the returned listener's address).
pub fn bind(port: &str, addr: &EndpointAddr) -> Result<Option<Listener>, ChardevError> {
    let err = |source| ChardevError::Listen { port: port.into(), addr: addr.to_string(), source };
    match addr {
        EndpointAddr::UnixServer { path, .. } => Ok(Some(Listener::Unix(UnixListener::bind(path).map_err(err)?))),
        EndpointAddr::TcpServer { addr: sock, .. } => {
            if !sock.ip().is_loopback() {
                return Err(err(std::io::Error::new(ErrorKind::InvalidInput, "only loopback addresses are used")));
            }
            Ok(Some(Listener::Tcp(TcpListener::bind(sock).map_err(err)?)))
        }
        _ => Ok(None),
    }
}

/// Waits up to `timeout` for `fd` to be readable; `Ok(false)` on timeout.
pub(crate) fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up, so a wait never ends early and spins.
        let ms = left.as_millis() + u128::from(!left.subsec_nanos().is_multiple_of(1_000_000));
        let ms = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) if Instant::now() >= deadline => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_server_endpoint_accepts_and_records_both_closes() {
        let dir = tempfile::tempdir().unwrap();
        let addr = EndpointAddr::UnixServer { path: dir.path().join("s.sock"), reconnect_secs: 1 };
        let l = bind("p", &addr).unwrap();
        let mut ep = endpoint("p", &addr, l).unwrap();
        let err = ep.connect(Duration::from_millis(20)).err().unwrap();
        assert!(matches!(err, ChardevError::AcceptTimeout { .. }), "{err}");
        let EndpointAddr::UnixServer { path, .. } = &addr else { unreachable!() };
        let mut peer = UnixStream::connect(path).unwrap();
        let mut c = ep.connect(Duration::from_secs(5)).unwrap();
        peer.write_all(b"hi").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(c.read(&mut buf).unwrap(), 2);
        drop(peer);
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert!(c.peer_closed());
        drop(c);
        let _peer2 = UnixStream::connect(path).unwrap();
        drop(ep.connect(Duration::from_secs(5)).unwrap());
        let whats: Vec<_> = ep.events().history().iter().map(|e| (e.conn, e.what)).collect();
        use EndpointEventKind::*;
        assert_eq!(whats, [(1, Connected), (1, ClosedByPeer), (2, Connected), (2, ClosedByHost)]);
    }

    #[test]
    fn tcp_endpoints_connect_on_loopback_only() {
        let addr = EndpointAddr::TcpServer { addr: "127.0.0.1:0".parse().unwrap(), reconnect_secs: 1 };
        let Some(Listener::Tcp(l)) = bind("p", &addr).unwrap() else { panic!() };
        let real = l.local_addr().unwrap();
        let srv_addr = EndpointAddr::TcpServer { addr: real, reconnect_secs: 1 };
        let mut srv = endpoint("p", &srv_addr, Some(Listener::Tcp(l))).unwrap();
        let mut cli = endpoint("p", &EndpointAddr::TcpClient { addr: real }, None).unwrap();
        let rx = srv.events().subscribe();
        let mut a = cli.connect(Duration::from_secs(5)).unwrap();
        let mut b = srv.connect(Duration::from_secs(5)).unwrap();
        a.write_all(b"x").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(rx.try_recv().unwrap().what, EndpointEventKind::Connected);
        assert!(bind("p", &EndpointAddr::TcpServer { addr: "10.0.0.1:0".parse().unwrap(), reconnect_secs: 1 }).is_err());
        assert!(endpoint("p", &srv_addr, None).is_err(), "a server endpoint needs its listener");
    }

    #[test]
    fn unknown_pty_path_is_an_error_naming_the_port() {
        let mut ep = endpoint("org.vport.pty", &EndpointAddr::Pty { path: None }, None).unwrap();
        let err = ep.connect(Duration::from_secs(1)).err().unwrap();
        assert!(err.to_string().contains("org.vport.pty"), "{err}");
    }
}
