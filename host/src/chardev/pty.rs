//! The slave side of a QEMU `-chardev pty`, opened through the `serialport` crate.
//!
//! QEMU keeps the master; its chardev counts as connected while a slave is open (it checks
//! once a second while disconnected, in `pty_chr_timer`). When QEMU closes the master the kernel
//! hangs the slave up; [`PtyStream`] reports that as end of file, like a socket.
//!
//! The slave is opened as a serial port (`serialport::TTYPort`), so the termios and poll code is
//! the crate's tested path rather than our own: raw 8N1 (`cfmakeraw`: no echo, no line
//! discipline, no signal characters, 8-bit clean), no flow control, exclusive access (`TIOCEXCL`
//! and an exclusive `flock`), and a poll-based timeout on every read and write.

use std::io::{ErrorKind, Read, Write};
use std::mem::ManuallyDrop;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serialport::{DataBits, FlowControl, Parity, SerialPort, StopBits, TTYPort};

/// The line speed asked for. A pty has no line and ignores it; a real serial line would not.
const BAUD: u32 = 115_200;

/// How long one wait of a blocking read or of a write lasts before it is simply started again:
/// serialport bounds every read and write by its timeout, and a write (or a read without a
/// timeout) must block for as long as the peer takes, as on a socket.
const LONG_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// An open pty slave in raw mode with a read timeout, held exclusively.
///
/// Guarantees:
/// - bytes pass unchanged both ways (raw 8N1: no `ICRNL`/`ONLCR`, no `ISIG`, no `IXON`/`IXOFF`);
/// - no flow control, neither XON/XOFF nor RTS/CTS: QEMU's pty chardev has none (it reads the
///   master whenever the guest's port can take data and pauses otherwise, which backs up into
///   the slave's buffer and blocks our writes), and XON/XOFF would eat bytes 0x11 and 0x13 of
///   the payload;
/// - exclusive: while any handle of this stream (itself or a [`PtyStream::try_clone`]) is open,
///   the pty carries `TIOCEXCL` and an exclusive `flock`, so a second [`PtyStream::open`] (or any
///   other opener, except root past `TIOCEXCL`) is refused; the last handle to close clears
///   `TIOCEXCL`;
/// - a read with a timeout that sees no data fails with [`ErrorKind::WouldBlock`]; without a
///   timeout it blocks; once QEMU has closed the master, reads return `Ok(0)`;
/// - writes block until the pty takes the bytes (they never time out).
pub struct PtyStream {
    /// Taken only in [`Drop`].
    port: ManuallyDrop<TTYPort>,
    read_timeout: Option<Duration>,
    /// How many handles ([`PtyStream::try_clone`]) share the open file description.
    handles: Arc<AtomicUsize>,
}

impl PtyStream {
    /// Opens the slave at `path` (`O_RDWR | O_NOCTTY | O_CLOEXEC`) exclusively and makes it raw
    /// 8N1 without flow control.
    ///
    /// Errors: [`ErrorKind::NotFound`] if `path` does not exist (QEMU gone); the raw OS error
    /// `EIO` if the pty cannot be opened any more (its master is closing);
    /// [`ErrorKind::ResourceBusy`] if another program holds it; [`ErrorKind::InvalidInput`] if
    /// `path` is not a terminal. Each message names `path`.
    pub fn open(path: &Path) -> std::io::Result<PtyStream> {
        let name = path.to_str().ok_or_else(|| {
            std::io::Error::new(ErrorKind::InvalidInput, format!("{} is not a UTF-8 path", path.display()))
        })?;
        let port = serialport::new(name, BAUD)
            .data_bits(DataBits::Eight)
            .parity(Parity::None)
            .stop_bits(StopBits::One)
            .flow_control(FlowControl::None)
            .exclusive(true)
            .timeout(LONG_WAIT)
            .open_native()
            .map_err(|e| open_error(path, e))?;
        Ok(PtyStream { port: ManuallyDrop::new(port), read_timeout: None, handles: Arc::new(AtomicUsize::new(1)) })
    }

    /// Another handle to the same slave (`F_DUPFD_CLOEXEC`); its read timeout is its own and
    /// starts as `None`. The pty stays exclusive until every handle is dropped.
    pub fn try_clone(&self) -> std::io::Result<PtyStream> {
        let port = self.port.try_clone_native()?;
        self.handles.fetch_add(1, Ordering::AcqRel);
        Ok(PtyStream { port: ManuallyDrop::new(port), read_timeout: None, handles: self.handles.clone() })
    }

    /// Makes reads give up with `WouldBlock` after `timeout` (`None`: block). A zero timeout
    /// polls.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.read_timeout = timeout;
        Ok(())
    }

    fn set_wait(&mut self, wait: Duration) -> std::io::Result<()> {
        Ok(self.port.set_timeout(wait)?)
    }
}

/// The error of a failed open, with `path` and what to do about it in the message. serialport
/// carries an errno only as its text, so the few that callers tell apart are recognised by it.
fn open_error(path: &Path, e: serialport::Error) -> std::io::Error {
    use nix::errno::Errno;
    let shown = path.display();
    match e.kind() {
        // EBUSY from open(2) (TIOCEXCL) or EWOULDBLOCK from flock(2).
        serialport::ErrorKind::NoDevice => std::io::Error::new(
            ErrorKind::ResourceBusy,
            format!(
                "the pty {shown} is already open exclusively (another vport, or a terminal program \
                 such as screen, minicom or socat): close that first (`fuser -v {shown}` names it)"
            ),
        ),
        serialport::ErrorKind::Io(ErrorKind::NotFound) => std::io::Error::new(
            ErrorKind::NotFound,
            format!("the pty {shown} does not exist (QEMU has exited or removed the chardev)"),
        ),
        _ if e.description == Errno::ENOTTY.desc() => std::io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{shown} is not a terminal: give the pty slave QEMU reported \
                 (\"char device redirected to /dev/pts/N\")"
            ),
        ),
        // Kept as the OS error: it tells that the pty is going away (see session::server).
        _ if e.description == Errno::EIO.desc() => std::io::Error::from_raw_os_error(nix::libc::EIO),
        _ => {
            let kind = std::io::Error::from(e.clone()).kind();
            std::io::Error::new(kind, format!("cannot open the pty {shown}: {e}"))
        }
    }
}

/// Whether `e` is serialport's rendering of `EIO` (a read on a pty whose master is closed).
fn is_eio(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::EIO)
        || (e.kind() == ErrorKind::Other && e.to_string() == nix::errno::Errno::EIO.desc())
}

impl Read for PtyStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let deadline = self.read_timeout.map(|t| Instant::now() + t);
        loop {
            let wait = deadline.map_or(LONG_WAIT, |d| d.saturating_duration_since(Instant::now()));
            self.set_wait(wait)?;
            match self.port.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) => match e.kind() {
                    ErrorKind::TimedOut if deadline.is_some() => return Err(ErrorKind::WouldBlock.into()),
                    // A blocking read's long wait ran out, or a signal came: wait on.
                    ErrorKind::TimedOut | ErrorKind::Interrupted => continue,
                    // The master is gone (QEMU exited): poll says POLLHUP (serialport's
                    // BrokenPipe), or read(2) says EIO. End of file.
                    ErrorKind::BrokenPipe => return Ok(0),
                    _ if is_eio(&e) => return Ok(0),
                    _ => return Err(e),
                },
            }
        }
    }
}

impl Write for PtyStream {
    /// Blocks until the pty takes some of `buf`. A hung-up pty (QEMU gone) fails with
    /// [`ErrorKind::BrokenPipe`], as a socket whose peer is gone does.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            self.set_wait(LONG_WAIT)?;
            match self.port.write(buf) {
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::Interrupted) => continue,
                r => return r,
            }
        }
    }

    /// Waits until the written bytes have left (`tcdrain`); nothing is buffered in this process.
    fn flush(&mut self) -> std::io::Result<()> {
        self.set_wait(LONG_WAIT)?;
        self.port.flush()
    }
}

impl Drop for PtyStream {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and `self.port` is not used after this.
        let port = unsafe { ManuallyDrop::take(&mut self.port) };
        if self.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last handle: serialport's close clears TIOCEXCL, for the next opener.
            drop(port);
        } else {
            // Others still use the pty: close this descriptor only, keeping TIOCEXCL (the
            // flock lives on with the shared open file description).
            let _ = nix::unistd::close(port);
        }
    }
}

#[cfg(test)]
mod tests;
