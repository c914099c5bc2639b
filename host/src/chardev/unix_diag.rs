//! Has the server taken my unix connection yet? Asked of the kernel (`sock_diag` netlink,
//! `UNIX_DIAG_PEER`).
//!
//! `connect(2)` to a listening unix socket succeeds as soon as the kernel queues the connection
//! in the listener's backlog; the server may never `accept(2)` it. QEMU's socket chardev serves
//! one client and does not accept while it has one, so a second client sits in the backlog
//! with a working-looking connection and nothing happens. Until `accept`, the server's end of a
//! queued connection has no inode, and the kernel reports the client's peer inode as 0 (as `ss
//! -x` shows); after `accept` it is the accepted socket's inode.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR` (linux/netlink.h).
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST` (linux/netlink.h).
const NLM_F_REQUEST: u16 = 1;
/// `UDIAG_SHOW_PEER` (linux/unix_diag.h): report the peer's inode.
const UDIAG_SHOW_PEER: u32 = 0x4;
/// `UNIX_DIAG_PEER` (linux/unix_diag.h): the attribute carrying it.
const UNIX_DIAG_PEER: u16 = 2;
/// `struct nlmsghdr` size.
const NLMSG_HDR: usize = 16;
/// `struct unix_diag_msg` size.
const UNIX_DIAG_MSG: usize = 16;

/// Why the kernel could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// A system call failed (no `unix_diag` support in the kernel shows as `ENOENT` or
    /// `EPROTONOSUPPORT`).
    #[error("sock_diag {what} failed")]
    Sys {
        /// The step.
        what: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The kernel's answer did not have the expected shape.
    #[error("unexpected sock_diag answer: {0}")]
    Answer(&'static str),
}

/// Whether the server has accepted the connection `stream` (whose client end this is): `true`
/// once the server's end has been `accept`ed, `false` while it waits in the listener's backlog.
pub fn peer_accepted(stream: &UnixStream) -> Result<bool, DiagError> {
    let ino = nix::sys::stat::fstat(stream).map_err(|source| DiagError::Sys { what: "fstat", source })?;
    // A socket inode number is 32-bit in the diag interface (`udiag_ino` is a u32).
    let ino = u32::try_from(ino.st_ino).map_err(|_| DiagError::Answer("socket inode above 32 bits"))?;
    Ok(peer_inode(ino)? != 0)
}

/// The inode of the peer of the unix socket with inode `ino` (0: no peer inode yet).
fn peer_inode(ino: u32) -> Result<u32, DiagError> {
    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    let fd: OwnedFd =
        socket(AddressFamily::Netlink, SockType::Datagram, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkSockDiag)
            .map_err(|source| DiagError::Sys { what: "socket", source })?;
    sendto(fd.as_raw_fd(), &request(ino), &NetlinkAddr::new(0, 0), MsgFlags::empty())
        .map_err(|source| DiagError::Sys { what: "sendto", source })?;
    // The kernel answers a single-socket request while handling sendto: the reply is queued
    // by now, so never block on it.
    let mut buf = [0u8; 1024];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
        .map_err(|source| DiagError::Sys { what: "recv", source })?;
    parse_reply(&buf[..n.min(buf.len())])
}

/// A `SOCK_DIAG_BY_FAMILY` request for the unix socket `ino`, asking for its peer.
fn request(ino: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR + 24);
    m.extend_from_slice(&((NLMSG_HDR + 24) as u32).to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes()); // nlmsg_flags
    m.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    m.push(nix::libc::AF_UNIX as u8); // sdiag_family
    m.push(0); // sdiag_protocol
    m.extend_from_slice(&0u16.to_ne_bytes()); // pad
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: any
    m.extend_from_slice(&ino.to_ne_bytes()); // udiag_ino
    m.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes()); // udiag_show
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_cookie[0]: INET_DIAG_NOCOOKIE
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_cookie[1]
    m
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The `UNIX_DIAG_PEER` value of a reply (`nlmsghdr`, `unix_diag_msg`, then attributes).
fn parse_reply(b: &[u8]) -> Result<u32, DiagError> {
    let kind = u16_at(b, 4).ok_or(DiagError::Answer("short header"))?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(b, NLMSG_HDR).ok_or(DiagError::Answer("short error"))? as i32;
        let source = nix::Error::from_raw(errno.saturating_neg());
        return Err(DiagError::Sys { what: "request", source });
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(DiagError::Answer("not a sock_diag message"));
    }
    let len = (u32_at(b, 0).ok_or(DiagError::Answer("short header"))? as usize).min(b.len());
    let mut off = NLMSG_HDR + UNIX_DIAG_MSG;
    while off + 4 <= len {
        let alen = usize::from(u16_at(b, off).ok_or(DiagError::Answer("short attribute"))?);
        let atype = u16_at(b, off + 2).ok_or(DiagError::Answer("short attribute"))?;
        if alen < 4 {
            return Err(DiagError::Answer("attribute length below 4"));
        }
        if atype == UNIX_DIAG_PEER {
            return u32_at(b, off + 4).ok_or(DiagError::Answer("short peer attribute"));
        }
        off += (alen + 3) & !3;
    }
    Err(DiagError::Answer("no peer attribute"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_queued_connection_is_not_accepted_until_the_server_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let first = UnixStream::connect(&path).unwrap();
        let second = UnixStream::connect(&path).unwrap();
        assert!(!peer_accepted(&first).unwrap(), "queued, not accepted");
        let (_server_end, _) = listener.accept().unwrap();
        assert!(peer_accepted(&first).unwrap(), "accepted");
        assert!(!peer_accepted(&second).unwrap(), "the second still waits in the backlog");
    }

    #[test]
    fn replies_are_parsed_defensively() {
        let mut ok = vec![0u8; NLMSG_HDR + UNIX_DIAG_MSG];
        ok[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        ok.extend_from_slice(&8u16.to_ne_bytes());
        ok.extend_from_slice(&UNIX_DIAG_PEER.to_ne_bytes());
        ok.extend_from_slice(&77u32.to_ne_bytes());
        let len = ok.len() as u32;
        ok[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_reply(&ok).unwrap(), 77);
        assert!(matches!(parse_reply(&ok[..20]), Err(DiagError::Answer(_))));
        let mut err = vec![0u8; NLMSG_HDR + 4];
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[NLMSG_HDR..].copy_from_slice(&(-(nix::libc::ENOENT)).to_ne_bytes());
        let e = parse_reply(&err).unwrap_err();
        assert!(matches!(e, DiagError::Sys { source: nix::Error::ENOENT, .. }), "{e}");
        assert!(parse_reply(&[]).is_err());
    }
}
