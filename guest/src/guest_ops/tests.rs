//! Tests of [`crate::guest_ops`] on FIFOs and files (OPEN itself accepts only virtio-ports
//! nodes, which a unit test cannot make: handles are adopted as OPEN would make them).

use super::*;
use mio::{Poll, Token};
use nix::sys::stat::Mode;
use std::time::Duration;
use vport_common::pattern;

fn ops(dir: &Path) -> (Poll, GuestOps) {
    let poll = Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), Token(9)).unwrap());
    (poll, GuestOps::new(waker, dir.join("sys"), dir.join("dev"), Limits::default()).unwrap())
}

/// A handle on `path` (a FIFO or file here: OPEN itself accepts only virtio-ports nodes,
/// which a unit test cannot make), as OPEN would give it.
fn adopt(g: &mut GuestOps, owner: Owner, op_id: u32, path: &Path, nonblock: bool) -> u32 {
    let mut flags = nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC;
    if nonblock {
        flags |= nix::fcntl::OFlag::O_NONBLOCK;
    }
    let fd = nix::fcntl::open(path, flags, Mode::empty()).unwrap();
    let d = g.adopt(owner, op_id, fd, path.to_owned(), false);
    assert!(d.ret > 0, "{d:?}");
    d.ret as u32
}

fn done(s: Submitted) -> GuestOpDone {
    match s {
        Submitted::Done(d) => d,
        other => panic!("expected a completion at once, got {other:?}"),
    }
}

fn owner() -> Owner {
    Owner { dev: "vport0p1".into(), session: 7 }
}

/// Waits (bounded) for the completion of `op_id`, blocking in mio's poll on the waker.
/// Completions of other ops that arrive meanwhile are kept in `seen`.
fn wait_done(poll: &mut Poll, g: &mut GuestOps, seen: &mut Vec<Completion>, op_id: u32) -> Completion {
    let mut events = mio::Events::with_capacity(4);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        seen.extend(g.completions());
        if let Some(i) = seen.iter().position(|c| c.done.op_id == op_id) {
            return seen.remove(i);
        }
        assert!(Instant::now() < end, "no completion for op {op_id}");
        poll.poll(&mut events, Some(Duration::from_millis(500))).unwrap();
    }
}

/// Sends CANCEL on `handle` until operation `op_id` completes (bounded): the first cancels may
/// find the worker not yet inside its call.
fn cancel_until_done(poll: &mut Poll, g: &mut GuestOps, handle: u32, op_id: u32) -> Completion {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        g.submit(owner(), op_id + 1, GuestOp::Cancel { handle });
        if let Some(c) = g.completions().into_iter().find(|c| c.done.op_id == op_id) {
            return c;
        }
        assert!(Instant::now() < end, "operation {op_id} was never interrupted");
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
    }
}

#[test]
fn a_fifo_carries_a_pattern_write_to_a_read_all_and_close_completes_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let (mut poll, mut g) = ops(dir.path());
    // O_RDWR on a fifo never blocks in open and gives a fd that reads what it writes.
    let handle = adopt(&mut g, owner(), 1, &fifo, false);
    assert_eq!(handle, 1);
    assert_eq!(g.submit(owner(), 2, GuestOp::Write { handle, seed: 5, bytes: 50_000 }), Submitted::Queued);
    assert_eq!(g.submit(owner(), 3, GuestOp::Read { handle, bytes: 50_000, all: true }), Submitted::Queued);
    assert_eq!(g.submit(owner(), 4, GuestOp::Close { handle }), Submitted::Queued);
    let mut seen = Vec::new();
    let w = wait_done(&mut poll, &mut g, &mut seen, 2);
    let r = wait_done(&mut poll, &mut g, &mut seen, 3);
    let c = wait_done(&mut poll, &mut g, &mut seen, 4);
    assert_eq!((w.done.bytes, w.done.digest), (50_000, pattern::pattern_digest(5, 50_000)));
    assert_eq!((r.done.bytes, r.done.digest), (50_000, pattern::pattern_digest(5, 50_000)));
    assert_eq!(r.done.data.len(), READ_ALL_DATA);
    assert_eq!((c.done.ret, c.owner), (0, owner()));
    assert_eq!(g.open_handles(), 0);
    let again = done(g.submit(owner(), 5, GuestOp::Read { handle, bytes: 1, all: false }));
    assert_eq!(again.errno, Errno::EBADF as i32);
}

#[test]
fn write_each_writes_in_calls_of_its_size_and_refuses_sizes_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let (mut poll, mut g) = ops(dir.path());
    let handle = adopt(&mut g, owner(), 1, &fifo, false);
    let write = GuestOp::WriteEach { handle, seed: 6, bytes: 5_500, each: 1_000 };
    assert_eq!(g.submit(owner(), 2, write), Submitted::Queued);
    assert_eq!(g.submit(owner(), 3, GuestOp::Read { handle, bytes: 5_500, all: true }), Submitted::Queued);
    let mut seen = Vec::new();
    let w = wait_done(&mut poll, &mut g, &mut seen, 2);
    let r = wait_done(&mut poll, &mut g, &mut seen, 3);
    // `ret` is the last call's result: the 500 bytes left after five calls of 1,000.
    assert_eq!((w.done.ret, w.done.bytes, w.done.digest), (500, 5_500, pattern::pattern_digest(6, 5_500)));
    assert_eq!((r.done.bytes, r.done.digest), (5_500, pattern::pattern_digest(6, 5_500)));
    for (id, each) in [(4, 0), (5, vport_common::message::MAX_WRITE_EACH + 1)] {
        let refused = GuestOp::WriteEach { handle, seed: 6, bytes: 10, each };
        assert_eq!(g.submit(owner(), id, refused), Submitted::Queued);
        let d = wait_done(&mut poll, &mut g, &mut seen, id);
        assert_eq!((d.done.ret, d.done.errno, d.done.bytes), (-1, Errno::EINVAL as i32, 0), "each {each}");
    }
}

#[test]
fn a_blocked_read_is_cancelled_with_eintr_and_poll_reports_exact_masks() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let (mut poll, mut g) = ops(dir.path());
    let handle = adopt(&mut g, owner(), 1, &fifo, false);
    let pl = g.submit(owner(), 2, GuestOp::Poll { handle, events: 0x5, timeout_ms: 0 });
    assert_eq!(pl, Submitted::Queued);
    let pl = wait_done(&mut poll, &mut g, &mut Vec::new(), 2);
    assert_eq!((pl.done.ret, pl.done.mask), (1, PollFlags::POLLOUT.bits() as u16));
    assert_eq!(g.submit(owner(), 3, GuestOp::Read { handle, bytes: 10, all: false }), Submitted::Queued);
    let r = cancel_until_done(&mut poll, &mut g, handle, 3);
    assert_eq!((r.done.ret, r.done.errno), (-1, Errno::EINTR as i32));
}

#[test]
fn operations_queued_on_a_released_handle_are_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let (mut poll, mut g) = ops(dir.path());
    let handle = adopt(&mut g, owner(), 1, &fifo, false);
    // A read that blocks (nothing in the fifo), then a write and a read queued behind it.
    assert_eq!(g.submit(owner(), 2, GuestOp::Read { handle, bytes: 1, all: false }), Submitted::Queued);
    assert_eq!(g.submit(owner(), 3, GuestOp::Write { handle, seed: 1, bytes: 100 }), Submitted::Queued);
    assert_eq!(g.submit(owner(), 4, GuestOp::Read { handle, bytes: 100, all: false }), Submitted::Queued);
    g.release(|_| false);
    let mut seen = Vec::new();
    let blocked = wait_done(&mut poll, &mut g, &mut seen, 2);
    // Interrupted in the call, or not started yet when the release came.
    let errno = blocked.done.errno;
    assert!(errno == Errno::EINTR as i32 || errno == Errno::ECANCELED as i32, "{:?}", blocked.done);
    for op in [3, 4] {
        let c = wait_done(&mut poll, &mut g, &mut seen, op);
        assert_eq!((c.done.ret, c.done.errno), (-1, Errno::ECANCELED as i32), "op {op}: {:?}", c.done);
    }
}

#[test]
fn release_closes_the_handles_of_ended_sessions_only() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let (_poll, mut g) = ops(dir.path());
    let other = Owner { dev: "vport0p1".into(), session: 8 };
    adopt(&mut g, owner(), 1, &f, true);
    adopt(&mut g, other.clone(), 2, &f, true);
    assert_eq!(g.open_handles(), 2);
    g.release(|o| *o == other);
    assert_eq!(g.open_handles(), 1);
}

#[test]
fn unknown_ports_and_handles_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_poll, mut g) = ops(dir.path());
    let d = done(g.submit(owner(), 1, GuestOp::Open { port: "nope".into(), nonblock: true, sigio: false }));
    assert_eq!((d.ret, d.errno), (-1, Errno::ENOENT as i32));
    assert!(String::from_utf8_lossy(&d.data).contains("nope"));
    let d = done(g.submit(owner(), 2, GuestOp::SigioCount { handle: 3 }));
    assert_eq!(d.errno, Errno::EBADF as i32);
    assert_eq!(node_of(Path::new("/dev/vport1p2")), "vport1p2");
}

#[test]
fn open_of_anything_but_a_port_is_refused_and_opens_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"x").unwrap();
    let (_poll, mut g) = ops(dir.path());
    for port in [secret.display().to_string(), "/etc/passwd".into(), "/dev/virtio-ports/../../init".into()] {
        let r = g.submit(owner(), 1, GuestOp::Open { port: port.clone(), nonblock: true, sigio: false });
        assert!(matches!(&r, Submitted::Refused { code: error_code::DENIED, .. }), "{port}: {r:?}");
        let r = g.submit(owner(), 2, GuestOp::Debugfs { port: port.clone() });
        assert!(matches!(&r, Submitted::Refused { code: error_code::DENIED, .. }), "{port}: {r:?}");
    }
    assert_eq!(g.open_handles(), 0);
}

#[test]
fn handles_per_session_and_operations_per_handle_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let (_poll, mut g) = ops(dir.path());
    g.limits = Limits { max_guest_op_handles: 2, max_guest_ops_per_handle: 3, ..Limits::default() };
    let handle = adopt(&mut g, owner(), 1, &fifo, false);
    adopt(&mut g, owner(), 2, &fifo, false);
    let r = g.submit(owner(), 3, GuestOp::Open { port: "vport0p1".into(), nonblock: true, sigio: false });
    assert!(matches!(&r, Submitted::Refused { code: error_code::LIMIT, text } if text.contains("2 handles")), "{r:?}");
    // Reads that block (nothing written to the fifo): three queue, the fourth is refused.
    for op_id in 10..13 {
        assert_eq!(g.submit(owner(), op_id, GuestOp::Read { handle, bytes: 1, all: false }), Submitted::Queued);
    }
    let r = g.submit(owner(), 13, GuestOp::Read { handle, bytes: 1, all: false });
    assert!(matches!(&r, Submitted::Refused { code: error_code::LIMIT, .. }), "{r:?}");
    // Another session still gets its own handles.
    let other = Owner { dev: "vport0p1".into(), session: 8 };
    adopt(&mut g, other, 4, &fifo, false);
    g.release(|_| false);
}

#[test]
fn a_loopback_echoes_every_byte_until_its_count_and_a_cancel_ends_it() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let (mut poll, mut g) = ops(dir.path());
    let (guest, mut host) = UnixStream::pair().unwrap();
    let d = g.adopt(owner(), 1, guest.into(), dir.path().join("pair"), false);
    let handle = u32::try_from(d.ret).unwrap();
    assert_eq!(g.submit(owner(), 2, GuestOp::Loopback { handle, bytes: 3000 }), Submitted::Queued);
    let mut sent = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for seed in 1..=3 {
        let mut out = vec![0u8; 1000];
        pattern::fill(seed, 0, &mut out);
        host.write_all(&out).unwrap();
        let mut back = vec![0u8; 1000];
        host.read_exact(&mut back).unwrap();
        assert_eq!(back, out, "round {seed} echoed as sent");
        sent.extend_from_slice(&out);
    }
    let c = wait_done(&mut poll, &mut g, &mut Vec::new(), 2);
    let mut dg = pattern::StreamDigest::new();
    dg.update(&sent);
    assert_eq!((c.done.bytes, c.done.digest, c.done.errno), (3000, dg.digest(), 0));

    // A loopback waiting for input ends with EINTR on CANCEL.
    assert_eq!(g.submit(owner(), 3, GuestOp::Loopback { handle, bytes: 10 }), Submitted::Queued);
    let r = cancel_until_done(&mut poll, &mut g, handle, 3);
    assert_eq!((r.done.ret, r.done.errno, r.done.bytes), (-1, Errno::EINTR as i32, 0));
}

#[test]
fn an_accepted_connection_is_a_handle_that_writes_reads_and_closes_like_a_port() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = tempfile::tempdir().unwrap();
    let (mut poll, mut g) = ops(dir.path());
    let path = dir.path().join("l.sock");
    // VSOCK_ACCEPT's accept, on a unix listener instead of a vsock one (no AF_VSOCK needed).
    let listener: OwnedFd = UnixListener::bind(&path).unwrap().into();
    assert_eq!(g.queue_accept(owner(), 1, listener, "a unix socket", 10_000), Ok(Submitted::Queued));
    assert_eq!(g.open_handles(), 1);
    let mut host = UnixStream::connect(&path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut seen = Vec::new();
    let a = wait_done(&mut poll, &mut g, &mut seen, 1);
    assert!(!a.handle_gone, "{a:?}");
    assert_eq!((a.done.errno, a.done.data.as_slice()), (0, b"unix".as_slice()), "{a:?}");
    let handle = u32::try_from(a.done.ret).unwrap();
    assert!(handle > 0);
    // The listener is closed once the connection is accepted.
    assert!(UnixStream::connect(&path).is_err(), "nobody listens any more");

    let write = GuestOp::WriteEach { handle, seed: 8, bytes: 100_000, each: 4_096 };
    assert_eq!(g.submit(owner(), 2, write), Submitted::Queued);
    let mut got = vec![0u8; 100_000];
    host.read_exact(&mut got).unwrap();
    let w = wait_done(&mut poll, &mut g, &mut seen, 2);
    assert_eq!((w.done.bytes, w.done.digest), (100_000, pattern::pattern_digest(8, 100_000)));
    let mut dg = pattern::StreamDigest::new();
    dg.update(&got);
    assert_eq!(dg.digest(), pattern::pattern_digest(8, 100_000), "the host got the pattern");

    assert_eq!(g.submit(owner(), 3, GuestOp::Read { handle, bytes: 70_000, all: true }), Submitted::Queued);
    let mut out = vec![0u8; 70_000];
    pattern::fill(9, 0, &mut out);
    host.write_all(&out).unwrap();
    let r = wait_done(&mut poll, &mut g, &mut seen, 3);
    assert_eq!((r.done.bytes, r.done.digest), (70_000, pattern::pattern_digest(9, 70_000)));

    assert_eq!(g.submit(owner(), 4, GuestOp::Close { handle }), Submitted::Queued);
    assert_eq!(wait_done(&mut poll, &mut g, &mut seen, 4).done.ret, 0);
    assert_eq!(host.read(&mut [0u8; 1]).unwrap(), 0, "the guest end is closed");
    assert_eq!(g.open_handles(), 0);
}

#[test]
fn an_accept_that_times_out_or_whose_session_ends_leaves_no_handle_and_no_listener() {
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = tempfile::tempdir().unwrap();
    let (mut poll, mut g) = ops(dir.path());
    let path = dir.path().join("l.sock");
    let listener: OwnedFd = UnixListener::bind(&path).unwrap().into();
    assert_eq!(g.queue_accept(owner(), 1, listener, "a unix socket", 30), Ok(Submitted::Queued));
    let t = wait_done(&mut poll, &mut g, &mut Vec::new(), 1);
    assert!(t.handle_gone, "{t:?}");
    assert_eq!((t.done.ret, t.done.errno), (-1, Errno::ETIMEDOUT as i32));
    assert!(String::from_utf8_lossy(&t.done.data).contains("no connection within 30 ms"), "{t:?}");
    assert_eq!(g.open_handles(), 0);
    assert!(UnixStream::connect(&path).is_err(), "the listener was closed before the completion");
    let gone = done(g.submit(owner(), 2, GuestOp::Read { handle: t.handle, bytes: 1, all: false }));
    assert_eq!(gone.errno, Errno::EBADF as i32);

    std::fs::remove_file(&path).unwrap();
    let listener: OwnedFd = UnixListener::bind(&path).unwrap().into();
    assert_eq!(g.queue_accept(owner(), 3, listener, "a unix socket", 60_000), Ok(Submitted::Queued));
    // The session ends while the worker waits: the wait is interrupted (or never starts).
    let end = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    g.release(|_| false);
    let c = loop {
        seen.extend(g.completions());
        if let Some(c) = seen.iter().find(|c| c.done.op_id == 3) {
            break c;
        }
        assert!(Instant::now() < end, "the accept was never interrupted");
        poll.poll(&mut mio::Events::with_capacity(4), Some(Duration::from_millis(50))).unwrap();
    };
    assert!(c.handle_gone && c.done.ret == -1, "{c:?}");
    assert!([Errno::EINTR as i32, Errno::ECANCELED as i32].contains(&c.done.errno), "{c:?}");
    assert_eq!(g.open_handles(), 0);
}

#[test]
fn vsock_accept_fails_at_once_without_af_vsock_or_times_out_and_frees_its_port() {
    let dir = tempfile::tempdir().unwrap();
    let (mut poll, mut g) = ops(dir.path());
    // This machine may or may not have AF_VSOCK: either way the answer is exact.
    let port = 40_000 + std::process::id() % 20_000;
    for op_id in [1, 2] {
        match g.submit(owner(), op_id, GuestOp::VsockAccept { port, timeout_ms: 20 }) {
            Submitted::Done(d) => {
                let text = String::from_utf8_lossy(&d.data).into_owned();
                assert_eq!(d.ret, -1, "{d:?}");
                if d.errno == Errno::EAFNOSUPPORT as i32 {
                    assert!(text.contains("has no AF_VSOCK") && text.contains("vmw_vsock_virtio_transport"), "{text}");
                } else {
                    assert!(text.starts_with(&format!("vsock port {port}: ")), "{text}");
                }
                assert_eq!(g.open_handles(), 0);
            }
            Submitted::Queued => {
                let t = wait_done(&mut poll, &mut g, &mut Vec::new(), op_id);
                // The second round binds the same port: the first listener is closed.
                assert_eq!((t.done.ret, t.done.errno, t.handle_gone), (-1, Errno::ETIMEDOUT as i32, true), "{t:?}");
                assert_eq!(g.open_handles(), 0);
            }
            other => panic!("{other:?}"),
        }
    }
    g.limits = Limits { max_guest_op_handles: 0, ..Limits::default() };
    let r = g.submit(owner(), 3, GuestOp::VsockAccept { port, timeout_ms: 20 });
    assert!(matches!(&r, Submitted::Refused { code: error_code::LIMIT, .. }), "{r:?}");
}
