use super::*;
use crate::chardev::stream::wait_readable;
use nix::pty::openpty;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

/// A fresh pty: its master, and the path of its slave (the slave descriptor `openpty` opened is
/// closed again, as QEMU does).
fn pty() -> (File, PathBuf) {
    let pair = openpty(None, None).unwrap();
    let path = nix::unistd::ttyname(pair.slave.as_fd()).unwrap();
    drop(pair.slave);
    (File::from(pair.master), path)
}

/// Reads from the master until `n` bytes came or 5 s passed (then it fails with what came).
fn read_master(master: &mut File, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(wait_readable(master.as_fd(), left).unwrap(), "only {} of {n} bytes: {got:?}", got.len());
        let k = master.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..k]);
    }
    got
}

nix::ioctl_read!(tiocgexcl, b'T', 0x40, nix::libc::c_int);

/// Whether the pty under `s` is in exclusive mode (`TIOCGEXCL`).
fn exclusive(s: &PtyStream) -> bool {
    let mut on: nix::libc::c_int = 0;
    // SAFETY: TIOCGEXCL writes one int through the pointer, which points at `on`; the
    // descriptor is open for as long as `s` is.
    unsafe { tiocgexcl(s.port.as_raw_fd(), &mut on) }.unwrap();
    on != 0
}

#[test]
fn raw_bytes_pass_both_ways_unchanged() {
    let (mut master, path) = pty();
    let mut s = PtyStream::open(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The bytes a line discipline or software flow control would act on first (NUL, ^C, LF,
    // CR, XON, XOFF, DEL, 0xFF), then every byte value.
    let mut bytes = vec![0x00, 0x03, 0x0a, 0x0d, 0x11, 0x13, 0x7f, 0xff, 0x04, 0x1a, 0x1c];
    bytes.extend(0..=255u8);

    master.write_all(&bytes).unwrap();
    let mut got = vec![0u8; bytes.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, bytes, "master to slave");
    s.set_read_timeout(Some(Duration::ZERO)).unwrap();
    assert_eq!(s.read(&mut got).unwrap_err().kind(), ErrorKind::WouldBlock, "nothing added");

    s.write_all(&bytes).unwrap();
    s.flush().unwrap();
    assert_eq!(read_master(&mut master, bytes.len()), bytes, "slave to master");
    assert!(!wait_readable(master.as_fd(), Duration::ZERO).unwrap(), "nothing added");
}

#[test]
fn a_second_open_is_refused_while_any_handle_is_open() {
    let (mut master, path) = pty();
    let s = PtyStream::open(&path).unwrap();
    let e = PtyStream::open(&path).err().expect("a second open must be refused");
    assert_eq!(e.kind(), ErrorKind::ResourceBusy, "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()) && msg.contains("fuser"), "{msg}");

    // A clone keeps the pty held after the original is gone; the first handle still works.
    let mut c = s.try_clone().unwrap();
    drop(s);
    assert_eq!(PtyStream::open(&path).err().map(|e| e.kind()), Some(ErrorKind::ResourceBusy));
    c.write_all(b"still here").unwrap();
    assert_eq!(read_master(&mut master, 10), b"still here");
    drop(c);

    let again = PtyStream::open(&path).expect("free once every handle is closed");
    drop(again);
}

#[test]
fn exclusive_mode_lasts_until_the_last_handle_closes() {
    let (_master, path) = pty();
    let s = PtyStream::open(&path).unwrap();
    assert!(exclusive(&s));
    let c = s.try_clone().unwrap();
    drop(s);
    assert!(exclusive(&c), "dropping one of two handles must keep TIOCEXCL");
    let c2 = c.try_clone().unwrap();
    drop(c);
    assert!(exclusive(&c2));
    drop(c2);
    // A new opener finds the pty free (open() itself would fail with EBUSY for a non-root user
    // if TIOCEXCL had been left set) and sets it again.
    let s = PtyStream::open(&path).unwrap();
    assert!(exclusive(&s));
}

#[test]
fn a_path_that_is_not_a_tty_is_a_clear_error() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let e = PtyStream::open(file.path()).err().expect("a regular file is no pty");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("not a terminal") && msg.contains(&file.path().display().to_string()), "{msg}");

    let gone = file.path().with_extension("gone");
    let e = PtyStream::open(&gone).err().expect("no such file");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&gone.display().to_string()), "{e}");
}

#[test]
fn a_read_timeout_without_data_is_would_block_within_the_bound() {
    let (mut master, path) = pty();
    let mut s = PtyStream::open(&path).unwrap();
    let timeout = Duration::from_millis(100);
    s.set_read_timeout(Some(timeout)).unwrap();
    let start = Instant::now();
    let e = s.read(&mut [0u8; 16]).unwrap_err();
    let took = start.elapsed();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    assert!(took >= timeout && took < timeout + Duration::from_secs(2), "{took:?}");

    // The clone's timeout is its own (it blocks), and data wakes it.
    let mut c = s.try_clone().unwrap();
    master.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap(), 1);
    assert_eq!(&b, b"x");
}

#[test]
fn the_master_closing_is_end_of_file() {
    let (mut master, path) = pty();
    let mut s = PtyStream::open(&path).unwrap();
    let mut blocking = s.try_clone().unwrap();
    master.write_all(b"last").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"last");
    drop(master);
    assert_eq!(s.read(&mut got).unwrap(), 0, "with a timeout");
    assert_eq!(blocking.read(&mut got).unwrap(), 0, "without one");
    let e = s.write(b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}");
}

#[test]
fn a_pty_that_cannot_be_opened_any_more_is_the_os_error_eio() {
    // A master that never unlocked its slave (no unlockpt): opening the slave fails with EIO, as
    // it does while QEMU's master is closing. session::server reads that as the pty being gone.
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY).unwrap();
    let path = PathBuf::from(nix::pty::ptsname_r(&master).unwrap());
    let e = PtyStream::open(&path).err().expect("a locked pty cannot be opened");
    assert_eq!(e.raw_os_error(), Some(nix::libc::EIO), "{e}");
}
