//! The worker side of guest operations: one thread per handle runs that handle's jobs in
//! order ([`worker`]), sends each completion over a channel and wakes the event loop; a blocked
//! call is interrupted with [`CANCEL_SIGNAL`] ([`cancel`]; see [`crate::guest_ops`] for why the
//! signal is repeated).

use crate::fdio::revents;
use nix::errno::Errno;
use nix::poll::{PollFlags, PollTimeout};
use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::{SigSet, Signal};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vport_common::message::{GuestOp, GuestOpDone, MAX_WRITE_EACH};
use vport_common::pattern::{self, StreamDigest};

/// The signal that interrupts a worker's blocked call.
pub const CANCEL_SIGNAL: Signal = Signal::SIGUSR2;
/// Interval between cancel signals while the worker is still in a call.
pub const CANCEL_RETRY: Duration = Duration::from_millis(10);
/// How long a cancel keeps signalling.
pub const CANCEL_BOUND: Duration = Duration::from_secs(1);
/// Largest single READ (`all` false) and the buffer of the loops.
pub const MAX_IO: usize = 64 * 1024;
/// Bytes of a READ `all` returned in `data`.
pub const READ_ALL_DATA: usize = 4096;

/// Who asked: the control port (node name) and its session. Completions go back there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Node name of the control port (`vportNpM`).
    pub dev: String,
    /// The session the request came in.
    pub session: u32,
}

/// A finished operation for the loop to send.
#[derive(Debug)]
pub struct Completion {
    /// Who asked.
    pub owner: Owner,
    /// The handle it ran on.
    pub handle: u32,
    /// The result.
    pub done: GuestOpDone,
    /// The handle ended with this completion (a VSOCK_ACCEPT that got no connection): its fd
    /// is closed and [`super::GuestOps::completions`] drops it from the table.
    pub handle_gone: bool,
}

/// What the loop sends a handle's worker.
pub(super) enum Job {
    /// Run READ, WRITE or POLL for `owner`.
    Op { op_id: u32, op: GuestOp, owner: Owner },
    /// The handle's fd is a listener: wait up to `timeout_ms` for one connection, which
    /// replaces it (VSOCK_ACCEPT; [`super::vsock::accept_within`]).
    Accept { op_id: u32, owner: Owner, timeout_ms: u32 },
    /// Close the fd (after the jobs before it) and end the thread.
    Close { op_id: u32, owner: Owner },
}

/// What the loop knows about a worker: whether it is inside a call, and its thread.
pub(super) struct WorkerCtl {
    busy: AtomicBool,
    /// The handle's session ended: operations still queued are not run (they complete with
    /// ECANCELED) and the fd is closed.
    released: AtomicBool,
    thread: Mutex<Option<Pthread>>,
}

impl WorkerCtl {
    /// A worker not started yet: idle, not released.
    pub(super) fn new() -> Self {
        WorkerCtl { busy: AtomicBool::new(false), released: AtomicBool::new(false), thread: Mutex::new(None) }
    }

    /// Whether the worker is inside a call now.
    pub(super) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// The handle's session ended: the jobs still queued are not run.
    pub(super) fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }
}

/// A failed call: `ret` -1, `errno` `e`, and `why` as the data.
pub(super) fn failed(op_id: u32, e: Errno, why: String) -> GuestOpDone {
    GuestOpDone { op_id, ret: -1, errno: e as i32, data: why.into_bytes(), ..Default::default() }
}

/// Interrupts the worker's current call, if it is in one (see [`crate::guest_ops`]).
pub(super) fn cancel(ctl: &Arc<WorkerCtl>) {
    if !ctl.busy.load(Ordering::SeqCst) {
        return;
    }
    let Ok(guard) = ctl.thread.lock() else { return };
    let Some(thread) = *guard else { return };
    drop(guard);
    let ctl = Arc::clone(ctl);
    let spawned = std::thread::Builder::new().name("gop-cancel".into()).stack_size(64 * 1024).spawn(move || {
        let end = Instant::now() + CANCEL_BOUND;
        // Repeated on purpose: see `crate::guest_ops` (no signal can be lost this way).
        while ctl.busy.load(Ordering::SeqCst) && Instant::now() < end {
            if pthread_kill(thread, CANCEL_SIGNAL).is_err() {
                return;
            }
            std::thread::sleep(CANCEL_RETRY);
        }
    });
    if let Err(e) = spawned {
        log::warn!("guest op: cannot start the cancel thread: {e}");
    }
}

/// The thread of one handle: runs its jobs in order until Close (or the loop drops the
/// sender), each completion sent on `done` with a wake of the loop. After an Accept that got no
/// connection the handle has no fd: later operations on it fail with EBADF.
pub(super) fn worker(
    handle: u32,
    fd: OwnedFd,
    jobs: Receiver<Job>,
    ctl: Arc<WorkerCtl>,
    done: Sender<Completion>,
    waker: Arc<mio::Waker>,
) {
    let mut unblock = SigSet::empty();
    unblock.add(CANCEL_SIGNAL);
    if let Err(e) = unblock.thread_unblock() {
        log::warn!("guest op worker: cannot unblock {CANCEL_SIGNAL}: {e}; its calls cannot be cancelled");
    }
    if let Ok(mut t) = ctl.thread.lock() {
        *t = Some(pthread_self());
    }
    let mut fd = Some(fd);
    let send = |owner: Owner, d: GuestOpDone, handle_gone: bool| {
        if done.send(Completion { owner, handle, done: d, handle_gone }).is_ok() {
            if let Err(e) = waker.wake() {
                log::error!("guest op worker: cannot wake the event loop: {e}");
            }
        }
    };
    for job in jobs {
        match job {
            Job::Op { op_id, op, owner } => {
                let start = Instant::now();
                // Busy first, then the release check: a release either sees the worker busy
                // (and interrupts the call) or is seen here (and the op does not run).
                ctl.busy.store(true, Ordering::SeqCst);
                if ctl.released.load(Ordering::SeqCst) {
                    ctl.busy.store(false, Ordering::SeqCst);
                    let why = "not run: the session that asked for it ended".to_owned();
                    send(owner, failed(op_id, Errno::ECANCELED, why), false);
                    continue;
                }
                let mut d = match &fd {
                    Some(fd) => run(fd.as_fd(), op),
                    None => failed(op_id, Errno::EBADF, format!("handle {handle}: no connection was accepted")),
                };
                ctl.busy.store(false, Ordering::SeqCst);
                d.op_id = op_id;
                d.elapsed_ns = start.elapsed().as_nanos() as u64;
                send(owner, d, false);
            }
            Job::Accept { op_id, owner, timeout_ms } => {
                let start = Instant::now();
                ctl.busy.store(true, Ordering::SeqCst);
                let accepted = if ctl.released.load(Ordering::SeqCst) {
                    Err((Errno::ECANCELED, "not run: the session that asked for it ended".to_owned()))
                } else {
                    match &fd {
                        Some(listener) => super::vsock::accept_within(listener.as_fd(), timeout_ms),
                        None => Err((Errno::EBADF, format!("handle {handle} has no listener"))),
                    }
                };
                ctl.busy.store(false, Ordering::SeqCst);
                // The listener is closed here, before the completion goes out, either way: a
                // host that asks again on the same port at once finds it free.
                let (mut d, gone) = match accepted {
                    Ok((conn, peer)) => {
                        fd = Some(conn);
                        (GuestOpDone { ret: i64::from(handle), data: peer.into_bytes(), ..Default::default() }, false)
                    }
                    Err((e, why)) => {
                        fd = None;
                        (failed(op_id, e, why), true)
                    }
                };
                d.op_id = op_id;
                d.elapsed_ns = start.elapsed().as_nanos() as u64;
                send(owner, d, gone);
            }
            Job::Close { op_id, owner } => {
                drop(fd);
                send(owner, GuestOpDone { op_id, ..Default::default() }, false);
                return;
            }
        }
    }
}

/// Runs READ, WRITE, POLL or LOOPBACK on `fd` (the worker fills in `op_id` and `elapsed_ns`).
fn run(fd: BorrowedFd<'_>, op: GuestOp) -> GuestOpDone {
    match op {
        GuestOp::Read { bytes, all: false, .. } => {
            let mut buf = vec![0u8; (bytes as usize).min(MAX_IO)];
            match nix::unistd::read(fd, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    let mut dg = StreamDigest::new();
                    dg.update(&buf);
                    GuestOpDone { ret: n as i64, bytes: n as u64, digest: dg.digest(), data: buf, ..Default::default() }
                }
                Err(e) => GuestOpDone { ret: -1, errno: e as i32, ..Default::default() },
            }
        }
        GuestOp::Read { bytes, all: true, .. } => read_all(fd, bytes),
        GuestOp::Write { seed, bytes, .. } => write_pattern(fd, seed, bytes, MAX_IO),
        GuestOp::WriteEach { each: 0, .. } => einval("each must be at least 1"),
        GuestOp::WriteEach { each, .. } if each > MAX_WRITE_EACH => {
            einval(&format!("each {each} is over the limit of {MAX_WRITE_EACH} bytes"))
        }
        GuestOp::WriteEach { seed, bytes, each, .. } => write_pattern(fd, seed, bytes, each as usize),
        GuestOp::Loopback { bytes, .. } => loopback(fd, bytes),
        GuestOp::Poll { events, timeout_ms, .. } => {
            let timeout = PollTimeout::try_from(timeout_ms.max(-1)).unwrap_or(PollTimeout::NONE);
            match revents(fd, PollFlags::from_bits_truncate(events as i16), timeout) {
                Ok((n, mask)) => GuestOpDone { ret: i64::from(n), mask: mask.bits() as u16, ..Default::default() },
                Err(e) => GuestOpDone { ret: -1, errno: e as i32, ..Default::default() },
            }
        }
        other => einval(&format!("{other:?} does not run on a worker")),
    }
}

/// A completion refusing the operation before any system call: EINVAL, `data` says why.
fn einval(why: &str) -> GuestOpDone {
    GuestOpDone { ret: -1, errno: Errno::EINVAL as i32, data: why.as_bytes().to_vec(), ..Default::default() }
}

fn read_all(fd: BorrowedFd<'_>, want: u64) -> GuestOpDone {
    let mut buf = vec![0u8; MAX_IO];
    let mut dg = StreamDigest::new();
    let mut head = Vec::new();
    let mut ret = 0i64;
    let mut errno = 0;
    while dg.bytes() < want {
        let n = ((want - dg.bytes()) as usize).min(MAX_IO);
        match nix::unistd::read(fd, &mut buf[..n]) {
            Ok(0) => {
                ret = 0;
                break;
            }
            Ok(k) => {
                ret = k as i64;
                dg.update(&buf[..k]);
                let room = READ_ALL_DATA.saturating_sub(head.len());
                head.extend_from_slice(&buf[..k.min(room)]);
            }
            Err(e) => {
                ret = -1;
                errno = e as i32;
                break;
            }
        }
    }
    GuestOpDone { ret, errno, bytes: dg.bytes(), digest: dg.digest(), data: head, ..Default::default() }
}

/// Echoes what `fd` gives back into it until `total` bytes were echoed, a read returns 0 or a
/// call fails (an interrupted call, CANCEL or CLOSE, ends it with EINTR).
fn loopback(fd: BorrowedFd<'_>, total: u64) -> GuestOpDone {
    let mut buf = vec![0u8; MAX_IO];
    let mut dg = StreamDigest::new();
    let mut ret = 0i64;
    let mut errno = 0;
    'echo: while dg.bytes() < total {
        let n = ((total - dg.bytes()) as usize).min(MAX_IO);
        let got = match nix::unistd::read(fd, &mut buf[..n]) {
            Ok(0) => {
                ret = 0;
                break;
            }
            Ok(k) => k,
            Err(e) => {
                ret = -1;
                errno = e as i32;
                break;
            }
        };
        let mut sent = 0;
        while sent < got {
            match nix::unistd::write(fd, &buf[sent..got]) {
                Ok(0) => {
                    ret = 0;
                    break 'echo;
                }
                Ok(k) => {
                    ret = k as i64;
                    dg.update(&buf[sent..sent + k]);
                    sent += k;
                }
                Err(e) => {
                    ret = -1;
                    errno = e as i32;
                    break 'echo;
                }
            }
        }
    }
    GuestOpDone { ret, errno, bytes: dg.bytes(), digest: dg.digest(), ..Default::default() }
}

/// Writes `total` bytes of the pattern of `seed` a block of `each` bytes at a time, as `dd`
/// does: each block is filled once and written to its end, calling again after a short write
/// (the guest's writes are cut at 32 KiB), never filled again for the rest.
fn write_pattern(fd: BorrowedFd<'_>, seed: u64, total: u64, each: usize) -> GuestOpDone {
    let each = each.min(usize::try_from(total).unwrap_or(usize::MAX)).max(1);
    let mut buf = vec![0u8; each];
    let mut dg = StreamDigest::new();
    let mut ret = 0i64;
    let mut errno = 0;
    'blocks: while dg.bytes() < total {
        let off = dg.bytes();
        let n = ((total - off) as usize).min(each);
        pattern::fill(seed, off, &mut buf[..n]);
        let mut done = 0;
        while done < n {
            match nix::unistd::write(fd, &buf[done..n]) {
                // A write that takes nothing would loop for ever: report it as the result.
                Ok(0) => {
                    ret = 0;
                    break 'blocks;
                }
                Ok(k) => {
                    ret = k as i64;
                    dg.update(&buf[done..done + k]);
                    done += k;
                }
                Err(e) => {
                    ret = -1;
                    errno = e as i32;
                    break 'blocks;
                }
            }
        }
    }
    GuestOpDone { ret, errno, bytes: dg.bytes(), digest: dg.digest(), ..Default::default() }
}
