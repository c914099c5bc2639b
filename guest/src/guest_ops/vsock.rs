//! VSOCK_ACCEPT: a virtio-vsock stream as a guest-op handle, so that READ, WRITE, WRITE_EACH,
//! POLL and LOOPBACK run on a vsock socket exactly as on a raw port (`vport bench` measures the
//! vsock reference with them).
//!
//! The listener is made at once, in the event loop, before the next guest operation starts
//! ([`listen`]): a host that has the completion of a later one knows the guest listens. The
//! accept runs on the new handle's worker ([`accept_within`]), which then holds the connection
//! instead of the listener.

use crate::fdio::revents;
use nix::errno::Errno;
use nix::poll::{PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, getpeername, listen as listen_on, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike,
    SockaddrStorage, VsockAddr,
};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// The kernel modules that give a guest AF_VSOCK over a virtio-vsock device.
pub const VSOCK_MODULES: &str = "vsock, vmw_vsock_virtio_transport_common and vmw_vsock_virtio_transport";

/// A vsock stream socket listening on `VMADDR_CID_ANY:port` (backlog 1). `Err`: the failed
/// call's errno and a text naming what failed and, where there is one, the fix.
pub fn listen(port: u32) -> Result<OwnedFd, (Errno, String)> {
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| (e, failure_text("socket(AF_VSOCK)", port, e)))?;
    bind(fd.as_raw_fd(), &VsockAddr::new(nix::libc::VMADDR_CID_ANY, port))
        .map_err(|e| (e, failure_text("bind", port, e)))?;
    let backlog = Backlog::new(1).map_err(|e| (e, failure_text("listen", port, e)))?;
    listen_on(&fd, backlog).map_err(|e| (e, failure_text("listen", port, e)))?;
    Ok(fd)
}

/// What a failed `call` of VSOCK_ACCEPT on `port` says in GUEST_OP_DONE's `data`.
pub fn failure_text(call: &str, port: u32, e: Errno) -> String {
    let fix = match e {
        Errno::EAFNOSUPPORT | Errno::ENODEV => format!(
            ": this guest kernel has no AF_VSOCK; load the modules {VSOCK_MODULES} (vport's image loads them \
             when the kernel has them) and give the VM a virtio-vsock device"
        ),
        Errno::EADDRINUSE => ": something in the guest listens on that vsock port already".to_owned(),
        _ => String::new(),
    };
    format!("vsock port {port}: {call} failed: {}{fix}", e.desc())
}

/// Waits up to `timeout_ms` for a connection on `listener` and accepts it: the connection
/// (blocking, close-on-exec) and its peer as `vsock:CID:PORT` (another family's address as it
/// prints). `Err`: ETIMEDOUT when none came in time, EINTR when the wait was interrupted (CANCEL,
/// CLOSE, the end of the session), or the failed call's errno; with a text for `data`.
pub fn accept_within(listener: BorrowedFd<'_>, timeout_ms: u32) -> Result<(OwnedFd, String), (Errno, String)> {
    let timeout = PollTimeout::try_from(i32::try_from(timeout_ms).unwrap_or(i32::MAX)).unwrap_or(PollTimeout::MAX);
    match revents(listener, PollFlags::POLLIN, timeout) {
        Ok((0, _)) => {
            return Err((Errno::ETIMEDOUT, format!("no connection within {timeout_ms} ms; the listener is closed")))
        }
        Ok(_) => {}
        Err(e) => return Err((e, format!("waiting for a connection: {}", e.desc()))),
    }
    let conn = accept4(listener, SockFlag::SOCK_CLOEXEC).map_err(|e| (e, format!("accept: {}", e.desc())))?;
    let peer = peer_name(&conn);
    Ok((conn, peer))
}

/// The peer of `conn`: `vsock:CID:PORT` for a vsock stream, else the address as it prints
/// (`unknown peer` if it has none).
fn peer_name(conn: &OwnedFd) -> String {
    match getpeername::<SockaddrStorage>(conn.as_raw_fd()) {
        Ok(addr) => match addr.as_vsock_addr() {
            Some(v) => vsock_name(v),
            None if addr.family() == Some(AddressFamily::Unix) => "unix".to_owned(),
            None => addr.to_string(),
        },
        Err(_) => "unknown peer".to_owned(),
    }
}

/// `vsock:CID:PORT`.
fn vsock_name(v: &VsockAddr) -> String {
    format!("vsock:{}:{}", v.cid(), v.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_missing_address_family_names_the_modules_and_the_device() {
        let t = failure_text("socket(AF_VSOCK)", 5000, Errno::EAFNOSUPPORT);
        assert!(t.starts_with("vsock port 5000: socket(AF_VSOCK) failed: "), "{t}");
        assert!(t.contains("vmw_vsock_virtio_transport") && t.contains("virtio-vsock device"), "{t}");
        let busy = failure_text("bind", 7, Errno::EADDRINUSE);
        assert!(busy.contains("listens on that vsock port already"), "{busy}");
        assert_eq!(
            failure_text("listen", 7, Errno::EINVAL),
            format!("vsock port 7: listen failed: {}", Errno::EINVAL.desc())
        );
    }

    #[test]
    fn vsock_peers_print_as_cid_and_port() {
        assert_eq!(vsock_name(&VsockAddr::new(2, 1_234)), "vsock:2:1234");
    }

    #[test]
    fn accept_times_out_then_takes_a_pending_connection_with_its_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (errno, text) = accept_within(listener.as_fd(), 20).unwrap_err();
        assert_eq!(errno, Errno::ETIMEDOUT);
        assert!(text.contains("within 20 ms"), "{text}");
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (conn, peer) = accept_within(listener.as_fd(), 0).unwrap();
        assert_eq!(peer, "unix");
        let flags = nix::fcntl::fcntl(&conn, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & nix::libc::FD_CLOEXEC, 0, "the connection is close-on-exec");
    }
}
