//! The host end of a virtio-serial port: a connection to the port's QEMU chardev.
//!
//! [`Stream`] is what the rest of the rig needs from any endpoint kind (unix socket, and in
//! time TCP and pty): bytes both ways and a read deadline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

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
}

/// Connects as a client to a `-chardev socket,server=on` unix socket.
pub fn connect_unix(port: &str, path: &Path) -> Result<UnixStream, ChardevError> {
    UnixStream::connect(path).map_err(|source| ChardevError::ConnectUnix {
        port: port.into(),
        path: path.into(),
        source,
    })
}
