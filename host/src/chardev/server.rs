//! Host ends where QEMU starts the connection (`reconnect=N`): vport accepts it on the listener
//! it bound before QEMU started, from loopback only.

use std::time::Duration;

use super::addr::EndpointAddr;
use super::connection::{Connection, Io};
use super::endpoint::Endpoint;
use super::error::ChardevError;
use super::events::EndpointEvents;
use super::listener::{Accepted, Listener};

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
        let io = match self.listener.accept_within(&self.port, timeout).map_err(|e| self.listen_err(e))? {
            Some(Accepted::Unix(s)) => Io::Unix(s),
            Some(Accepted::Tcp(s)) => Io::Tcp(s),
            None => {
                return Err(ChardevError::AcceptTimeout {
                    port: self.port.clone(),
                    addr: self.addr.to_string(),
                    timeout,
                })
            }
        };
        Ok(Connection::new(&self.port, self.addr.kind(), io, &self.events))
    }
    fn events(&self) -> &EndpointEvents {
        &self.events
    }
}
