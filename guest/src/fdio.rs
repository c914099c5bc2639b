//! The real [`PortIo`]: the fd of `/dev/vportNpM` (or of a `/dev/hvcN` console in raw mode),
//! with the PROBE system calls and SIGIO set-up.
//!
//! Console ports are put in raw mode with `cfmakeraw` (nix termios) rather than through the
//! serialport crate: the agent only needs raw mode on an already-open fd, which is one
//! `tcgetattr`/`tcsetattr` pair; serialport would add a dependency tree (and its own open path,
//! baud rate handling and port enumeration) for nothing the agent uses.

use crate::port::{PortIo, ProbeOutcome};
use crate::sigio;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use nix::sys::termios::{cfmakeraw, tcflush, tcgetattr, tcsetattr, FlushArg, SetArg, SpecialCharacterIndices};
use nix::unistd::{lseek, read, Whence};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use thiserror::Error;
use vport_common::message::{ProbeKind, ProbeTarget};

/// Opening a port's node failed.
#[derive(Debug, Error)]
#[error("cannot open {path}")]
pub struct OpenError {
    /// The node.
    pub path: PathBuf,
    /// The errno.
    #[source]
    pub source: Errno,
}

/// A console could not be put in raw mode.
#[derive(Debug, Error)]
#[error("cannot put console {path} in raw mode")]
pub struct RawModeError {
    /// The console.
    pub path: PathBuf,
    /// The errno.
    #[source]
    pub source: Errno,
}

/// A console could not be opened and put in raw mode.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The open failed (ENODEV: no console behind this hvc line).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Raw mode could not be set.
    #[error(transparent)]
    RawMode(#[from] RawModeError),
}

impl ConsoleError {
    /// The errno of the failed call.
    pub fn errno(&self) -> Errno {
        match self {
            ConsoleError::Open(e) => e.source,
            ConsoleError::RawMode(e) => e.source,
        }
    }
}

/// The flags every port fd is opened with.
fn port_flags() -> OFlag {
    OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY
}

/// An open port.
#[derive(Debug)]
pub struct FdIo {
    fd: OwnedFd,
    path: PathBuf,
}

impl FdIo {
    /// Opens a virtio-serial port node non-blocking.
    pub fn open_port(path: &Path) -> Result<FdIo, OpenError> {
        let fd =
            open(path, port_flags(), Mode::empty()).map_err(|source| OpenError { path: path.to_owned(), source })?;
        Ok(FdIo { fd, path: path.to_owned() })
    }

    /// Opens a console (`/dev/hvcN`) non-blocking and puts it in raw mode (no echo, no line
    /// discipline processing, 8-bit clean), so frames pass unchanged; input received before
    /// raw mode was set is discarded (it went through the cooked line discipline).
    pub fn open_console(path: &Path) -> Result<FdIo, ConsoleError> {
        let io = Self::open_port(path)?;
        let raw = |source| RawModeError { path: path.to_owned(), source };
        let mut t = tcgetattr(io.fd.as_fd()).map_err(raw)?;
        cfmakeraw(&mut t);
        t.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        tcsetattr(io.fd.as_fd(), SetArg::TCSANOW, &t).map_err(raw)?;
        // Host bytes that waited for the open went through the default line discipline
        // between open and tcsetattr (canonical mode: control bytes of a frame erase, kill or
        // signal; echo): they are mangled, so they are dropped. The host asks again
        // (HELLO_REQUEST) and the agent offers a session on open anyway.
        tcflush(io.fd.as_fd(), FlushArg::TCIFLUSH).map_err(raw)?;
        Ok(io)
    }

    /// The raw fd (for epoll registration and matching SIGIO `ssi_fd`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The node this fd was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `F_SETSIG` from Linux `<asm-generic/fcntl.h>` (`__F_SETSIG`, 10 on every architecture
/// Linux supports); the libc crate does not export it.
const F_SETSIG: nix::libc::c_int = 10;

/// `fcntl(fd, cmd, arg)` for the integer-argument commands nix does not wrap.
fn fcntl_int(fd: RawFd, cmd: nix::libc::c_int, arg: nix::libc::c_int) -> Result<nix::libc::c_int, Errno> {
    // SAFETY: `fd` is an open descriptor owned by the caller for the duration of the call; the
    // commands used here (F_SETOWN, F_SETSIG, F_GETFL, F_SETFL) take an int argument and do not
    // touch memory.
    let r = unsafe { nix::libc::fcntl(fd, cmd, arg) };
    Errno::result(r)
}

/// Turns SIGIO delivery for `fd` on (`F_SETOWN` this process, `F_SETSIG` the agent's real-time
/// signal, `O_ASYNC`) or off (clears `O_ASYNC`). See [`crate::sigio`].
pub fn set_async_fd(fd: RawFd, on: bool) -> Result<(), Errno> {
    let flags = fcntl_int(fd, nix::libc::F_GETFL, 0)?;
    if on {
        fcntl_int(fd, nix::libc::F_SETOWN, std::process::id() as nix::libc::c_int)?;
        fcntl_int(fd, F_SETSIG, sigio::signal_number())?;
        fcntl_int(fd, nix::libc::F_SETFL, flags | nix::libc::O_ASYNC)?;
    } else {
        fcntl_int(fd, nix::libc::F_SETFL, flags & !nix::libc::O_ASYNC)?;
    }
    Ok(())
}

/// `poll(2)` of the single fd `fd` for `events`: the call's return value and the exact revents.
pub fn revents(fd: BorrowedFd<'_>, events: PollFlags, timeout: PollTimeout) -> Result<(i32, PollFlags), Errno> {
    let mut fds = [PollFd::new(fd, events)];
    let n = nix::poll::poll(&mut fds, timeout)?;
    Ok((n, fds[0].revents().unwrap_or(PollFlags::empty())))
}

/// Runs one probe system call on `fd`.
fn run_probe(kind: ProbeKind, fd: BorrowedFd<'_>, arg: u32) -> ProbeOutcome {
    let ok = |ret: i64| ProbeOutcome { ret, ..Default::default() };
    match kind {
        // Handled by the caller (it needs the path, not an fd).
        ProbeKind::Open => ProbeOutcome::failed(Errno::EINVAL),
        ProbeKind::Lseek => match lseek(fd, 0, Whence::SeekCur) {
            Ok(off) => ok(off),
            Err(e) => ProbeOutcome::failed(e),
        },
        ProbeKind::Read => {
            let mut buf = vec![0u8; arg as usize];
            match read(fd, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    ProbeOutcome { ret: n as i64, data: buf, ..Default::default() }
                }
                Err(e) => ProbeOutcome::failed(e),
            }
        }
        ProbeKind::Poll => match revents(fd, PollFlags::POLLIN | PollFlags::POLLOUT, PollTimeout::ZERO) {
            Ok((n, mask)) => ProbeOutcome { ret: i64::from(n), mask: mask.bits() as u16, ..Default::default() },
            Err(e) => ProbeOutcome::failed(e),
        },
        ProbeKind::Pread => {
            let mut b = [0u8; 1];
            match nix::sys::uio::pread(fd, &mut b, 0) {
                Ok(n) => ProbeOutcome { ret: n as i64, data: b[..n].to_vec(), ..Default::default() },
                Err(e) => ProbeOutcome::failed(e),
            }
        }
        ProbeKind::Pwrite => match nix::sys::uio::pwrite(fd, b"p", 0) {
            Ok(n) => ok(n as i64),
            Err(e) => ProbeOutcome::failed(e),
        },
    }
}

impl PortIo for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        nix::unistd::read(&self.fd, buf)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, Errno> {
        nix::unistd::write(&self.fd, buf)
    }
    fn poll_mask(&mut self) -> Result<PollFlags, Errno> {
        Ok(revents(self.fd.as_fd(), PollFlags::POLLIN | PollFlags::POLLOUT, PollTimeout::ZERO)?.1)
    }

    /// `Open` (either target) opens the node again and closes it at once; `ret` is the new fd
    /// number on success. Other kinds on `SecondFd` open a second fd first and report that
    /// open's errno if it fails.
    fn probe(&mut self, kind: ProbeKind, target: ProbeTarget, arg: u32) -> ProbeOutcome {
        if kind == ProbeKind::Open || target == ProbeTarget::SecondFd {
            let second = match open(
                &self.path,
                OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(e) => return ProbeOutcome::failed(e),
            };
            if kind == ProbeKind::Open {
                return ProbeOutcome { ret: i64::from(second.as_raw_fd()), ..Default::default() };
            }
            // `second` is closed when it goes out of scope, after the call.
            return run_probe(kind, second.as_fd(), arg);
        }
        run_probe(kind, self.fd.as_fd(), arg)
    }

    fn set_async(&mut self, on: bool) -> Result<(), Errno> {
        set_async_fd(self.fd.as_raw_fd(), on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_io() -> (FdIo, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
        (FdIo { fd: r, path: PathBuf::from("/nonexistent/vport0p1") }, w)
    }

    #[test]
    fn probes_on_a_pipe_report_raw_results_and_errnos() {
        let (mut io, w) = pipe_io();
        assert_eq!(io.probe(ProbeKind::Lseek, ProbeTarget::OwnFd, 0), ProbeOutcome::failed(Errno::ESPIPE));
        assert_eq!(io.probe(ProbeKind::Pread, ProbeTarget::OwnFd, 0), ProbeOutcome::failed(Errno::ESPIPE));
        assert_eq!(io.probe(ProbeKind::Read, ProbeTarget::OwnFd, 8), ProbeOutcome::failed(Errno::EAGAIN));
        let poll = io.probe(ProbeKind::Poll, ProbeTarget::OwnFd, 0);
        assert_eq!((poll.ret, poll.mask), (0, 0), "an empty pipe's read end is not ready");
        nix::unistd::write(&w, b"abc").unwrap();
        let poll = io.probe(ProbeKind::Poll, ProbeTarget::OwnFd, 0);
        assert_eq!((poll.ret, poll.mask), (1, PollFlags::POLLIN.bits() as u16));
        let rd = io.probe(ProbeKind::Read, ProbeTarget::OwnFd, 2);
        assert_eq!((rd.ret, rd.data.as_slice()), (2, &b"ab"[..]));
        // The second open fails: the result is the open's errno.
        assert_eq!(io.probe(ProbeKind::Open, ProbeTarget::SecondFd, 0), ProbeOutcome::failed(Errno::ENOENT));
        assert_eq!(io.probe(ProbeKind::Lseek, ProbeTarget::SecondFd, 0), ProbeOutcome::failed(Errno::ENOENT));
    }

    #[test]
    fn set_async_toggles_o_async() {
        let (mut io, _w) = pipe_io();
        let flags = |io: &FdIo| fcntl_int(io.raw_fd(), nix::libc::F_GETFL, 0).unwrap();
        io.set_async(true).unwrap();
        assert_ne!(flags(&io) & nix::libc::O_ASYNC, 0);
        io.set_async(false).unwrap();
        assert_eq!(flags(&io) & nix::libc::O_ASYNC, 0);
    }
}
