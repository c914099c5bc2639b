//! Where a port's host end is ([`EndpointAddr`]) and which kind it is ([`EndpointKind`]),
//! named from vport's side (see the table in [`super`]).

use std::net::SocketAddr;
use std::path::PathBuf;

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
