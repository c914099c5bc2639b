//! Kernel uevents over `NETLINK_KOBJECT_UEVENT`: the socket, and a pure parser of the kernel's
//! message format `ACTION@DEVPATH\0KEY=VALUE\0...`.
//!
//! The agent never polls for port names: it rescans sysfs when a `virtio-ports` uevent
//! (`add`, `change` = name arrived, `remove`) comes in. Only the kernel's multicast group (1) is
//! joined, so udev's re-broadcasts (`libudev` header, group 2) never arrive; messages not sent by
//! the kernel (netlink port id 0) are ignored anyway.

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recvfrom, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use thiserror::Error;

/// The subsystem of virtio-serial port devices.
pub const SUBSYSTEM: &str = "virtio-ports";

/// Receive buffer asked for, so a burst of hot-plug events does not overflow the socket.
const RCVBUF: usize = 1 << 20;

/// A uevent action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `add`
    Add,
    /// `change`
    Change,
    /// `remove`
    Remove,
    /// Any other (`bind`, `unbind`, `move`, `online`, `offline`).
    Other(String),
}

/// One parsed uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// The action.
    pub action: Action,
    /// `DEVPATH` (from the header).
    pub devpath: String,
    /// `SUBSYSTEM`, if present.
    pub subsystem: Option<String>,
    /// `DEVNAME`, if present.
    pub devname: Option<String>,
    /// Every `KEY=VALUE` pair, in order.
    pub vars: Vec<(String, String)>,
}

impl Uevent {
    /// True for an event of the `virtio-ports` subsystem.
    pub fn is_virtio_port(&self) -> bool {
        self.subsystem.as_deref() == Some(SUBSYSTEM)
    }

    /// The port's node name (`vportNpM`): `DEVNAME`, else the last component of `DEVPATH`.
    pub fn node(&self) -> &str {
        match &self.devname {
            Some(d) => d.rsplit('/').next().unwrap_or(d),
            None => self.devpath.rsplit('/').next().unwrap_or(&self.devpath),
        }
    }
}

/// Why a uevent message could not be parsed, or the socket failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UeventError {
    /// A udev re-broadcast (starts with `libudev`), not a kernel message.
    #[error("udev message, not a kernel uevent")]
    Udev,
    /// The header is not `ACTION@DEVPATH`.
    #[error("uevent header {0:?} is not ACTION@DEVPATH")]
    BadHeader(String),
    /// Not UTF-8.
    #[error("uevent is not utf-8")]
    NotUtf8,
    /// A field without `=`.
    #[error("uevent field {0:?} has no '='")]
    BadField(String),
    /// The socket could not be created or set up.
    #[error("cannot {op} the kobject uevent netlink socket")]
    Socket {
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: Errno,
    },
}

/// Parses one kernel uevent message. Pure.
pub fn parse(msg: &[u8]) -> Result<Uevent, UeventError> {
    if msg.starts_with(b"libudev") {
        return Err(UeventError::Udev);
    }
    let text = std::str::from_utf8(msg).map_err(|_| UeventError::NotUtf8)?;
    let mut fields = text.split('\0').filter(|f| !f.is_empty());
    let header = fields.next().unwrap_or("");
    let (action, devpath) = header
        .split_once('@')
        .filter(|(a, d)| !a.is_empty() && d.starts_with('/'))
        .ok_or_else(|| UeventError::BadHeader(header.to_owned()))?;
    let mut ev = Uevent {
        action: match action {
            "add" => Action::Add,
            "change" => Action::Change,
            "remove" => Action::Remove,
            other => Action::Other(other.to_owned()),
        },
        devpath: devpath.to_owned(),
        subsystem: None,
        devname: None,
        vars: Vec::new(),
    };
    for field in fields {
        let (k, v) = field.split_once('=').ok_or_else(|| UeventError::BadField(field.to_owned()))?;
        match k {
            "SUBSYSTEM" => ev.subsystem = Some(v.to_owned()),
            "DEVNAME" => ev.devname = Some(v.to_owned()),
            _ => {}
        }
        ev.vars.push((k.to_owned(), v.to_owned()));
    }
    Ok(ev)
}

/// What draining the socket found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// `virtio-ports` events, in arrival order.
    pub port_events: Vec<Uevent>,
    /// Messages received in total.
    pub messages: u64,
    /// Messages that did not parse.
    pub bad: u64,
    /// The socket overflowed (ENOBUFS): events were lost, a full rescan is needed.
    pub overflowed: bool,
}

/// A non-blocking socket subscribed to the kernel's uevents.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
}

impl UeventSocket {
    /// Opens and binds the socket (group 1: kernel events).
    pub fn open() -> Result<UeventSocket, UeventError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(|source| UeventError::Socket { op: "create", source })?;
        // Best effort: RcvBufForce needs CAP_NET_ADMIN (the agent normally has it as root).
        if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1)).map_err(|source| UeventError::Socket { op: "bind", source })?;
        Ok(UeventSocket { fd })
    }

    /// The raw fd, for registration with mio.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads every pending message (edge-triggered: until EAGAIN).
    pub fn drain(&mut self) -> Result<Drained, UeventError> {
        let mut out = Drained::default();
        let mut buf = vec![0u8; 8192];
        loop {
            match recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), &mut buf) {
                Ok((n, from)) => {
                    out.messages += 1;
                    if from.map(|a| a.pid()) != Some(0) {
                        out.bad += 1;
                        continue;
                    }
                    match parse(&buf[..n]) {
                        Ok(ev) if ev.is_virtio_port() => out.port_events.push(ev),
                        Ok(_) => {}
                        Err(e) => {
                            log::debug!("ignoring uevent: {e}");
                            out.bad += 1;
                        }
                    }
                }
                Err(Errno::EAGAIN) => return Ok(out),
                Err(Errno::EINTR) => continue,
                Err(Errno::ENOBUFS) => out.overflowed = true,
                Err(source) => return Err(UeventError::Socket { op: "read", source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_port_change_event() {
        let msg = b"change@/devices/pci0000:00/0000:00:04.0/virtio1/virtio-ports/vport1p2\0ACTION=change\0\
DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio1/virtio-ports/vport1p2\0SUBSYSTEM=virtio-ports\0\
MAJOR=251\0MINOR=2\0DEVNAME=vport1p2\0SEQNUM=1234\0";
        let ev = parse(msg).unwrap();
        assert_eq!(ev.action, Action::Change);
        assert_eq!(ev.devpath, "/devices/pci0000:00/0000:00:04.0/virtio1/virtio-ports/vport1p2");
        assert!(ev.is_virtio_port());
        assert_eq!(ev.node(), "vport1p2");
        assert_eq!(ev.vars.len(), 7);
        assert_eq!(ev.vars[6], ("SEQNUM".to_owned(), "1234".to_owned()));
    }

    #[test]
    fn node_falls_back_to_devpath() {
        let ev = parse(b"remove@/devices/virtio1/virtio-ports/vport1p3\0SUBSYSTEM=virtio-ports\0").unwrap();
        assert_eq!(ev.action, Action::Remove);
        assert_eq!(ev.node(), "vport1p3");
    }

    #[test]
    fn other_subsystems_and_actions() {
        let ev = parse(b"bind@/devices/virtio1\0SUBSYSTEM=virtio\0").unwrap();
        assert_eq!(ev.action, Action::Other("bind".into()));
        assert!(!ev.is_virtio_port());
    }

    #[test]
    fn rejects_malformed_messages() {
        assert_eq!(parse(b"libudev\0\xfe\xed\xca\xfe"), Err(UeventError::Udev));
        assert_eq!(parse(b"add /devices/x\0"), Err(UeventError::BadHeader("add /devices/x".into())));
        assert_eq!(parse(b"add@devices\0"), Err(UeventError::BadHeader("add@devices".into())));
        assert_eq!(parse(b""), Err(UeventError::BadHeader(String::new())));
        assert_eq!(parse(b"add@/d\0NOEQUALS\0"), Err(UeventError::BadField("NOEQUALS".into())));
        assert_eq!(parse(b"add@/d\0K=\xff\0"), Err(UeventError::NotUtf8));
    }

    #[test]
    fn the_socket_opens_unprivileged() {
        // Receiving kernel uevents needs no privilege; this also checks the nix call shapes.
        let mut s = UeventSocket::open().unwrap();
        assert!(s.drain().is_ok());
    }
}
