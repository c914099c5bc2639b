//! The listeners of host ends QEMU connects to ([`super::EndpointKind::UnixServer`],
//! [`super::EndpointKind::TcpServer`]), bound before QEMU starts so that its first connection finds
//! them.
//!
//! A unix socket vport binds is vport's file: it is removed when the last handle of its
//! listener is dropped ([`Listener::try_clone`] shares it), and by
//! [`remove_bound_sockets`], which the Ctrl-C / SIGTERM / SIGHUP handler calls
//! ([`crate::qemu::install_signal_cleanup`]) since an exit from a signal drops nothing. A
//! socket file someone else made is never removed: [`bind`] fails on an existing path.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::addr::EndpointAddr;
use super::error::ChardevError;

/// A listener bound for a port whose QEMU chardev connects out to vport.
#[derive(Debug)]
pub enum Listener {
    /// Unix socket listener, and the socket file it owns.
    Unix(UnixListener, Arc<SocketFile>),
    /// Loopback TCP listener.
    Tcp(TcpListener),
}

impl Listener {
    /// Another handle to the same listening socket (the socket file is removed once every
    /// handle is gone).
    pub fn try_clone(&self) -> std::io::Result<Listener> {
        Ok(match self {
            Listener::Unix(l, file) => Listener::Unix(l.try_clone()?, file.clone()),
            Listener::Tcp(l) => Listener::Tcp(l.try_clone()?),
        })
    }
}

/// A connection QEMU made to a [`Listener`], in blocking mode.
#[derive(Debug)]
pub enum Accepted {
    /// On a unix listener.
    Unix(UnixStream),
    /// On a loopback TCP listener (with `TCP_NODELAY`).
    Tcp(TcpStream),
}

impl Listener {
    /// Waits up to `timeout` for a connection and takes it (`None`: none came). A TCP
    /// connection from outside loopback is refused (logged for port `port`) and waiting goes
    /// on; a readiness that yields no connection (taken by another handle) is waited past.
    pub fn accept_within(&self, port: &str, timeout: Duration) -> std::io::Result<Option<Accepted>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = match self {
                Listener::Unix(l, _) => super::stream::wait_readable(l.as_fd(), left),
                Listener::Tcp(l) => super::stream::wait_readable(l.as_fd(), left),
            }?;
            if !ready {
                return Ok(None);
            }
            let accepted = match self {
                Listener::Unix(l, _) => {
                    l.set_nonblocking(true).and_then(|()| l.accept()).map(|(s, _)| Accepted::Unix(s))
                }
                Listener::Tcp(l) => l.set_nonblocking(true).and_then(|()| l.accept()).and_then(|(s, peer)| {
                    if !peer.ip().is_loopback() {
                        log::warn!("port {port}: refusing a connection from {peer}");
                        return Err(std::io::Error::from(ErrorKind::WouldBlock));
                    }
                    s.set_nodelay(true)?;
                    Ok(Accepted::Tcp(s))
                }),
            };
            match accepted {
                Ok(Accepted::Unix(s)) => return s.set_nonblocking(false).map(|()| Some(Accepted::Unix(s))),
                Ok(Accepted::Tcp(s)) => return s.set_nonblocking(false).map(|()| Some(Accepted::Tcp(s))),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Unix socket files vport bound and has not removed yet, for the signal handler.
static BOUND: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn bound() -> MutexGuard<'static, Vec<PathBuf>> {
    BOUND.lock().unwrap_or_else(|e| e.into_inner())
}

/// A unix socket file vport bound: removed (and taken off the signal handler's list) on drop.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
}

impl SocketFile {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        bound().retain(|p| *p != self.path);
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != ErrorKind::NotFound {
                log::warn!("cannot remove the socket {} vport bound: {e}", self.path.display());
            }
        }
    }
}

/// Binds a unix listener at `path` and lists its file for removal.
fn bind_unix(path: &Path) -> std::io::Result<Listener> {
    // Listed under the lock before the file exists: the handler cannot miss it.
    let mut list = bound();
    let l = UnixListener::bind(path)?;
    list.push(path.to_path_buf());
    Ok(Listener::Unix(l, Arc::new(SocketFile { path: path.to_path_buf() })))
}

/// Removes every unix socket file vport bound and still holds: for the signal handler, which
/// exits without dropping anything. Returns how many were removed.
pub fn remove_bound_sockets() -> usize {
    remove_listed(|_| true)
}

/// Removes the listed socket files `which` picks, and takes them off the list.
fn remove_listed(which: impl Fn(&Path) -> bool) -> usize {
    let mut list = bound();
    let (gone, kept): (Vec<PathBuf>, Vec<PathBuf>) = list.drain(..).partition(|p| which(p));
    *list = kept;
    gone.iter().filter(|p| std::fs::remove_file(p).is_ok()).count()
}

/// Binds the listener for a server-kind `addr` (unix path or loopback TCP address; TCP port 0
/// picks a free port, see the returned listener's address).
pub fn bind(port: &str, addr: &EndpointAddr) -> Result<Option<Listener>, ChardevError> {
    let err = |source| ChardevError::Listen { port: port.into(), addr: addr.to_string(), source };
    match addr {
        EndpointAddr::UnixServer { path, .. } => Ok(Some(bind_unix(path).map_err(err)?)),
        EndpointAddr::TcpServer { addr: sock, .. } => {
            if !sock.ip().is_loopback() {
                return Err(err(std::io::Error::new(ErrorKind::InvalidInput, "only loopback addresses are used")));
            }
            Ok(Some(Listener::Tcp(TcpListener::bind(sock).map_err(err)?)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_file_goes_with_its_last_handle_or_with_the_signal_handler() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let addr = EndpointAddr::UnixServer { path: path.clone(), reconnect_secs: 0 };
        let l = bind("p", &addr).unwrap().unwrap();
        let clone = l.try_clone().unwrap();
        assert!(bound().contains(&path));
        drop(l);
        assert!(path.exists(), "a handle is left");
        drop(clone);
        assert!(!path.exists(), "removed with the last handle");
        assert!(!bound().contains(&path));

        let other = dir.path().join("m.sock");
        let l = bind("p", &EndpointAddr::UnixServer { path: other.clone(), reconnect_secs: 0 }).unwrap();
        assert!(other.exists());
        assert!(bound().contains(&other), "listed for the signal handler");
        // The handler's sweep (`remove_bound_sockets`), limited to this test's file: other
        // tests of this process bind sockets too.
        assert_eq!(remove_listed(|p| p == other), 1);
        assert!(!other.exists(), "the sweep removes it");
        drop(l); // no error for a file already gone

        // Someone else's file is never taken over, nor removed.
        std::fs::write(&path, b"not a socket").unwrap();
        let e = bind("p", &addr).unwrap_err();
        assert!(matches!(e, ChardevError::Listen { .. }), "{e}");
        assert!(path.exists());
    }
}
