//! Host ends where QEMU starts the connection (`reconnect=N`): vport accepts it on the listener
//! it bound before QEMU started, from loopback only.

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::addr::EndpointAddr;
use super::connection::{Connection, Io};
use super::endpoint::Endpoint;
use super::error::ChardevError;
use super::events::EndpointEvents;
use super::listener::Listener;
use super::stream::wait_readable;

/// vport accepts QEMU's connection on a listener bound before QEMU started
/// ([`super::EndpointKind::UnixServer`], [`super::EndpointKind::TcpServer`]).
pub struct ServerEndpoint {
    port: String,
    addr: EndpointAddr,
    listener: Listener,
    events: EndpointEvents,
}

impl ServerEndpoint {
    /// The host end of port `port` at the server-kind `addr`, accepting on `listener`.
    pub(super) fn new(port: &str, addr: EndpointAddr, listener: Listener) -> Self {
        ServerEndpoint { port: port.into(), addr, listener, events: EndpointEvents::default() }
    }

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
                Listener::Unix(l, _) => wait_readable(l.as_fd(), left),
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
                Listener::Unix(l, _) => l.set_nonblocking(true).and_then(|()| l.accept()).map(|(s, _)| Io::Unix(s)),
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
