//! The slave side of a QEMU `-chardev pty`, opened in raw mode.
//!
//! QEMU keeps the master; its chardev counts as connected while a slave is open (it checks
//! once a second while disconnected, in `pty_chr_timer`). A read on the slave after QEMU closed
//! the master fails with `EIO`; [`PtyStream`] reports that as end of file, like a socket.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// An open pty slave in raw mode with a read timeout.
pub struct PtyStream {
    file: File,
    read_timeout: Option<Duration>,
}

impl PtyStream {
    /// Opens the slave at `path` (`O_RDWR | O_NOCTTY`) and makes it raw (`cfmakeraw`): no echo,
    /// no line discipline, 8-bit clean.
    pub fn open(path: &Path) -> std::io::Result<PtyStream> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
            .open(path)?;
        let mut t = tcgetattr(file.as_fd())?;
        cfmakeraw(&mut t);
        tcsetattr(file.as_fd(), SetArg::TCSANOW, &t)?;
        Ok(PtyStream { file, read_timeout: None })
    }

    /// Another handle to the same slave (its read timeout is its own).
    pub fn try_clone(&self) -> std::io::Result<PtyStream> {
        Ok(PtyStream { file: self.file.try_clone()?, read_timeout: None })
    }

    /// Makes reads give up with `WouldBlock` after `timeout` (`None`: block).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.read_timeout = timeout;
        Ok(())
    }
}

impl Read for PtyStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(t) = self.read_timeout {
            if !super::stream::wait_readable(self.file.as_fd(), t)? {
                return Err(ErrorKind::WouldBlock.into());
            }
        }
        match self.file.read(buf) {
            // The master is gone (QEMU exited): end of file.
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => Ok(0),
            r => r,
        }
    }
}

impl Write for PtyStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;

    #[test]
    fn raw_pty_carries_bytes_unchanged_and_master_close_is_eof() {
        let pair = openpty(None, None).unwrap();
        let path = nix::unistd::ttyname(pair.slave.as_fd()).unwrap();
        drop(pair.slave);
        let mut s = PtyStream::open(&path).unwrap();
        let mut master = File::from(pair.master);
        // Bytes a cooked tty would transform: CR, ^C, ^D, 0xFF.
        let bytes = [b'\r', 3, 4, 0xff, b'\n', 0];
        master.write_all(&bytes).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; bytes.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, bytes);
        s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        assert_eq!(s.read(&mut got).unwrap_err().kind(), ErrorKind::WouldBlock);
        drop(master);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(s.read(&mut got).unwrap(), 0);
    }
}
