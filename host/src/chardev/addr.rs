//! Where a port's host end is ([`EndpointAddr`]) and which kind it is ([`EndpointKind`]),
//! named from vport's side (see the table in [`super`]).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use thiserror::Error;

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

/// A host-end address, as written on the command line, that names no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{spec:?}: {reason}; {ADDR_FORMS}")]
pub struct BadEndpointAddr {
    /// The address as given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The forms [`EndpointAddr::parse`] accepts, as error messages and `--help` say them.
pub const ADDR_FORMS: &str = "give PATH or unix:PATH (QEMU listens: server=on), unix-listen:PATH (vport listens, QEMU \
connects: server=off,reconnect=N), tcp:HOST:PORT (QEMU listens), tcp-listen:127.0.0.1:PORT (vport listens on loopback), \
or pty:/dev/pts/N (QEMU's pty)";

impl EndpointAddr {
    /// Parses the host end of a chardev vport did not create, written as the [`Display`] form
    /// gives it (without the `reconnect` note): `unix:PATH` or a bare `PATH`, `unix-listen:PATH`,
    /// `tcp:HOST:PORT` (`HOST` resolved now, its first address taken),
    /// `tcp-listen:HOST:PORT`, `pty:PATH`. A listening kind records `reconnect_secs` 0: QEMU's
    /// setting is not known to vport.
    ///
    /// [`Display`]: std::fmt::Display
    pub fn parse(spec: &str) -> Result<EndpointAddr, BadEndpointAddr> {
        let bad = |reason: &str| BadEndpointAddr { spec: spec.into(), reason: reason.into() };
        let path = |rest: &str| {
            if rest.is_empty() {
                Err(bad("the path is empty"))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        let sock = |rest: &str| -> Result<SocketAddr, BadEndpointAddr> {
            if rest.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
                return Err(bad("a TCP address is HOST:PORT with a port number"));
            }
            let mut addrs = rest.to_socket_addrs().map_err(|e| bad(&format!("cannot resolve it ({e})")))?;
            addrs.next().ok_or_else(|| bad("the host name resolves to no address"))
        };
        if let Some(rest) = spec.strip_prefix("unix-listen:") {
            Ok(EndpointAddr::UnixServer { path: path(rest)?, reconnect_secs: 0 })
        } else if let Some(rest) = spec.strip_prefix("unix:") {
            Ok(EndpointAddr::UnixClient { path: path(rest)? })
        } else if let Some(rest) = spec.strip_prefix("tcp-listen:") {
            Ok(EndpointAddr::TcpServer { addr: sock(rest)?, reconnect_secs: 0 })
        } else if let Some(rest) = spec.strip_prefix("tcp:") {
            Ok(EndpointAddr::TcpClient { addr: sock(rest)? })
        } else if let Some(rest) = spec.strip_prefix("pty:") {
            Ok(EndpointAddr::Pty { path: Some(path(rest)?) })
        } else if spec.split_once(':').is_some_and(|(kind, _)| !kind.contains('/')) {
            Err(bad("unknown kind before ':'"))
        } else {
            Ok(EndpointAddr::UnixClient { path: path(spec)? })
        }
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn every_kind_parses_from_its_display_form() {
        let unix = EndpointAddr::UnixClient { path: "/t/p.sock".into() };
        assert_eq!(EndpointAddr::parse("unix:/t/p.sock"), Ok(unix.clone()));
        assert_eq!(EndpointAddr::parse("/t/p.sock"), Ok(unix));
        assert_eq!(
            EndpointAddr::parse("unix-listen:/t/q.sock"),
            Ok(EndpointAddr::UnixServer { path: "/t/q.sock".into(), reconnect_secs: 0 })
        );
        let addr: SocketAddr = "127.0.0.1:4555".parse().unwrap();
        assert_eq!(EndpointAddr::parse("tcp:127.0.0.1:4555"), Ok(EndpointAddr::TcpClient { addr }));
        assert_eq!(
            EndpointAddr::parse("tcp-listen:127.0.0.1:4555"),
            Ok(EndpointAddr::TcpServer { addr, reconnect_secs: 0 })
        );
        assert_eq!(EndpointAddr::parse("pty:/dev/pts/7"), Ok(EndpointAddr::Pty { path: Some("/dev/pts/7".into()) }));
    }

    #[test]
    fn bad_addresses_say_which_forms_exist() {
        for (spec, reason) in [
            ("unix:", "the path is empty"),
            ("tcp:127.0.0.1", "HOST:PORT"),
            ("tcp:127.0.0.1:http", "HOST:PORT"),
            ("vsock:3:1024", "unknown kind"),
            ("", "the path is empty"),
        ] {
            let e = EndpointAddr::parse(spec).unwrap_err().to_string();
            assert!(e.contains(reason) && e.contains("tcp:HOST:PORT"), "{spec}: {e}");
        }
    }
}
