//! One connection of a host end to QEMU's chardev ([`Connection`]): a [`Stream`] over a unix
//! socket, a TCP socket or a pty, that records its own end.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::addr::EndpointKind;
use super::events::{EndpointEvent, EndpointEventKind, EndpointEvents};
use super::pty::PtyStream;
use super::stream::Stream;

/// The stream under a [`Connection`].
pub(super) enum Io {
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
    /// A connection that exists now: numbered and recorded as [`EndpointEventKind::Connected`].
    pub(super) fn new(port: &str, kind: EndpointKind, io: Io, events: &EndpointEvents) -> Connection {
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

    /// Whether this connection still waits in QEMU's listen backlog: QEMU's socket chardev
    /// serves one client per port and does not `accept(2)` another while it has one, so a
    /// second client's `connect(2)` succeeds and nothing reaches the guest. `Some(true)`:
    /// queued (another client holds the chardev); `Some(false)`: QEMU accepted it; `None`:
    /// unknown (a TCP or pty connection, or the kernel cannot be asked; see
    /// [`super::unix_diag`]).
    pub fn queued(&self) -> Option<bool> {
        match &self.io {
            Io::Unix(s) if matches!(self.kind, EndpointKind::UnixClient) => match super::unix_diag::peer_accepted(s) {
                Ok(accepted) => Some(!accepted),
                Err(e) => {
                    log::debug!("port {}: cannot ask the kernel whether QEMU accepted: {e}", self.port);
                    None
                }
            },
            _ => None,
        }
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
