//! The listeners of host ends QEMU connects to ([`super::EndpointKind::UnixServer`],
//! [`super::EndpointKind::TcpServer`]), bound before QEMU starts so that its first connection finds
//! them.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use super::addr::EndpointAddr;
use super::error::ChardevError;

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
