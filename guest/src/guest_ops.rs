//! Guest operations (GUEST_OP, `docs/protocol.md`): ordinary system calls on ports the agent
//! does **not** serve, run on the host's request, so the conformance suite can observe what a
//! guest program sees: a read with no host, a blocking write that completes when a host
//! connects, exact poll masks, debugfs counters, SIGIO on a plain fd.
//!
//! Each open handle has one worker thread that runs that handle's operations in order; the
//! agent's event loop never blocks. A worker sends its completion over a channel and wakes the
//! loop with a [`mio::Waker`]; the loop gives it to the control port that asked, which sends
//! GUEST_OP_DONE in the requesting session (dropped, and logged, if that session has ended).
//!
//! A blocked call is interrupted (CANCEL, CLOSE, or the end of the owning control session) with
//! `SIGUSR2`: workers unblock it and [`GuestOps::new`] installs a no-op handler without
//! `SA_RESTART`, so the call returns EINTR. The signal is repeated every
//! [`CANCEL_RETRY`] while the worker is still inside a call (for at most [`CANCEL_BOUND`]):
//! a signal that lands just before the worker enters the call would otherwise be lost.

use crate::devnode::{open_node, resolve, NodeError};
use crate::discovery::list_sysfs;
use crate::fdio::{revents, set_async_fd};
use crate::settings::Limits;
use nix::errno::Errno;
use nix::poll::{PollFlags, PollTimeout};
use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::message::{error_code, GuestOp, GuestOpDone};
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
/// SIGIO masks kept per handle.
pub const MAX_SIGIO_MASKS: usize = 64;

/// Setting up guest operations failed.
#[derive(Debug, Error)]
pub enum GuestOpsError {
    /// Installing the SIGUSR2 handler failed.
    #[error("cannot install the {CANCEL_SIGNAL} handler that interrupts guest operations")]
    Handler(#[source] Errno),
}

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
}

/// What became of a submitted operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Done at once: send this completion.
    Done(GuestOpDone),
    /// A worker runs it; its completion comes through [`GuestOps::completions`].
    Queued,
    /// Refused (nothing was run): answer the request with ERROR `code` ([`error_code::LIMIT`]
    /// or [`error_code::DENIED`]) and `text`.
    Refused {
        /// The ERROR code.
        code: u16,
        /// Why, naming the limit or the rule.
        text: String,
    },
}

enum Job {
    Op { op_id: u32, op: GuestOp, owner: Owner },
    Close { op_id: u32, owner: Owner },
}

/// What the loop knows about a worker: whether it is inside a call, and its thread.
struct WorkerCtl {
    busy: AtomicBool,
    /// The handle's session ended: operations still queued are not run (they complete with
    /// ECANCELED) and the fd is closed.
    released: AtomicBool,
    thread: Mutex<Option<Pthread>>,
}

struct SigioLog {
    count: u64,
    masks: Vec<u16>,
}

struct Handle {
    owner: Owner,
    raw_fd: RawFd,
    /// Operations sent to the worker whose completion has not come back yet.
    in_flight: usize,
    jobs: Sender<Job>,
    ctl: Arc<WorkerCtl>,
    sigio: Option<SigioLog>,
}

/// The open handles and the completion channel.
pub struct GuestOps {
    handles: BTreeMap<u32, Handle>,
    next_handle: u32,
    done_tx: Sender<Completion>,
    done_rx: Receiver<Completion>,
    waker: Arc<mio::Waker>,
    sysfs_root: PathBuf,
    dev_root: PathBuf,
    limits: Limits,
}

extern "C" fn on_cancel_signal(_: nix::libc::c_int) {}

fn failed(op_id: u32, e: Errno, why: String) -> GuestOpDone {
    GuestOpDone { op_id, ret: -1, errno: e as i32, data: why.into_bytes(), ..Default::default() }
}

impl GuestOps {
    /// Installs the no-op `SIGUSR2` handler (no `SA_RESTART`: blocked calls return EINTR).
    /// `waker` wakes the event loop when a worker finishes.
    pub fn new(
        waker: Arc<mio::Waker>,
        sysfs_root: PathBuf,
        dev_root: PathBuf,
        limits: Limits,
    ) -> Result<GuestOps, GuestOpsError> {
        let action = SigAction::new(SigHandler::Handler(on_cancel_signal), SaFlags::empty(), SigSet::empty());
        // SAFETY: the handler does nothing (async-signal-safe by construction), and it replaces
        // no handler the program relies on: SIGUSR2 is otherwise unused by the agent.
        unsafe { sigaction(CANCEL_SIGNAL, &action) }.map_err(GuestOpsError::Handler)?;
        let (done_tx, done_rx) = channel();
        Ok(GuestOps { handles: BTreeMap::new(), next_handle: 1, done_tx, done_rx, waker, sysfs_root, dev_root, limits })
    }

    /// Number of open handles.
    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// Starts `op` for `owner`. Operations that do not block (OPEN, CLOSE of an unknown handle,
    /// CANCEL, DEBUGFS, SYSFS, SIGIO_COUNT, anything on an unknown handle) are
    /// [`Submitted::Done`] at once; the others are [`Submitted::Queued`] on their handle's
    /// worker. An OPEN of something that is not a virtio-ports node, or over the handle limit,
    /// and an operation over the per-handle queue limit, are [`Submitted::Refused`].
    pub fn submit(&mut self, owner: Owner, op_id: u32, op: GuestOp) -> Submitted {
        let start = Instant::now();
        let mut done = match op {
            GuestOp::Open { port, nonblock, sigio } => match self.open(owner, op_id, &port, nonblock, sigio) {
                Ok(done) => done,
                Err(refused) => return refused,
            },
            GuestOp::Debugfs { port } => match self.debugfs(op_id, &port) {
                Ok(done) => done,
                Err(refused) => return refused,
            },
            GuestOp::Sysfs => match list_sysfs(&self.sysfs_root) {
                Ok(list) => {
                    let text: String =
                        list.iter().map(|p| format!("{} {}\n", p.dev, p.name.as_deref().unwrap_or(""))).collect();
                    GuestOpDone { op_id, ret: list.len() as i64, data: text.into_bytes(), ..Default::default() }
                }
                Err(e) => failed(op_id, Errno::EIO, crate::log::chain(&e)),
            },
            GuestOp::SigioCount { handle } => match self.handles.get(&handle) {
                Some(Handle { sigio: Some(log), .. }) => GuestOpDone {
                    op_id,
                    ret: log.count as i64,
                    data: log.masks.iter().flat_map(|m| m.to_le_bytes()).collect(),
                    ..Default::default()
                },
                Some(_) => failed(op_id, Errno::EINVAL, format!("handle {handle} was not opened with sigio")),
                None => failed(op_id, Errno::EBADF, format!("no handle {handle}")),
            },
            GuestOp::Cancel { handle } => match self.handles.get(&handle) {
                Some(h) => {
                    let busy = h.ctl.busy.load(Ordering::SeqCst);
                    cancel(&h.ctl);
                    GuestOpDone { op_id, ret: i64::from(busy), ..Default::default() }
                }
                None => failed(op_id, Errno::EBADF, format!("no handle {handle}")),
            },
            GuestOp::Close { handle } => match self.handles.remove(&handle) {
                Some(h) => {
                    cancel(&h.ctl);
                    // The worker closes the fd after the operations queued before this one.
                    return match h.jobs.send(Job::Close { op_id, owner }) {
                        Ok(()) => Submitted::Queued,
                        Err(_) => Submitted::Done(failed(op_id, Errno::EIO, format!("handle {handle}: worker gone"))),
                    };
                }
                None => failed(op_id, Errno::EBADF, format!("no handle {handle}")),
            },
            op @ (GuestOp::Read { handle, .. } | GuestOp::Write { handle, .. } | GuestOp::Poll { handle, .. }) => {
                let max = self.limits.max_guest_ops_per_handle;
                match self.handles.get_mut(&handle) {
                    Some(h) if h.in_flight >= max => {
                        return Submitted::Refused {
                            code: error_code::LIMIT,
                            text: format!(
                                "guest op {op_id}: handle {handle} already has {max} operations queued or running \
                                 (the per-handle limit); wait for their completions"
                            ),
                        }
                    }
                    Some(h) => {
                        return match h.jobs.send(Job::Op { op_id, op, owner }) {
                            Ok(()) => {
                                h.in_flight += 1;
                                Submitted::Queued
                            }
                            Err(_) => {
                                Submitted::Done(failed(op_id, Errno::EIO, format!("handle {handle}: worker gone")))
                            }
                        }
                    }
                    None => failed(op_id, Errno::EBADF, format!("no handle {handle}")),
                }
            }
        };
        done.elapsed_ns = start.elapsed().as_nanos() as u64;
        Submitted::Done(done)
    }

    /// The completions the workers have sent since the last call.
    pub fn completions(&mut self) -> Vec<Completion> {
        let done: Vec<Completion> = self.done_rx.try_iter().collect();
        for c in &done {
            if let Some(h) = self.handles.get_mut(&c.handle) {
                h.in_flight = h.in_flight.saturating_sub(1);
            }
        }
        done
    }

    /// A SIGIO real-time signal for `fd`: counted if `fd` is a handle opened with `sigio`.
    /// Returns whether it was one.
    pub fn on_sigio(&mut self, fd: RawFd) -> bool {
        let Some(h) = self.handles.values_mut().find(|h| h.raw_fd == fd) else { return false };
        let Some(log) = h.sigio.as_mut() else { return false };
        log.count += 1;
        // SAFETY: the handle is in the table, so its worker has not received Close and still
        // owns the open fd; the borrow ends within this call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let mask =
            revents(fd, PollFlags::POLLIN | PollFlags::POLLOUT, PollTimeout::ZERO).map_or(0, |(_, r)| r.bits() as u16);
        if log.masks.len() < MAX_SIGIO_MASKS {
            log.masks.push(mask);
        }
        true
    }

    /// Closes every handle whose owner `live` says has ended (interrupting blocked calls).
    /// Their completions are still produced, and dropped by the loop.
    pub fn release(&mut self, live: impl Fn(&Owner) -> bool) {
        let dead: Vec<u32> = self.handles.iter().filter(|(_, h)| !live(&h.owner)).map(|(k, _)| *k).collect();
        for k in dead {
            if let Some(h) = self.handles.remove(&k) {
                log::info!("guest op handle {k}: its control session {:#010x} ended; closing it", h.owner.session);
                h.ctl.released.store(true, Ordering::SeqCst);
                cancel(&h.ctl);
                let _ = h.jobs.send(Job::Close { op_id: 0, owner: h.owner });
            }
        }
    }

    /// OPEN: `Err` is a refusal (the reference is not a port, or the session holds the most
    /// handles allowed); a system call failure is a completion with `ret` -1.
    fn open(
        &mut self,
        owner: Owner,
        op_id: u32,
        port: &str,
        nonblock: bool,
        sigio: bool,
    ) -> Result<GuestOpDone, Submitted> {
        let max = self.limits.max_guest_op_handles;
        if self.handles.values().filter(|h| h.owner == owner).count() >= max {
            return Err(Submitted::Refused {
                code: error_code::LIMIT,
                text: format!("guest op {op_id}: this session already holds {max} handles (the limit); close one"),
            });
        }
        let fd = match resolve(port, &self.sysfs_root, &self.dev_root).and_then(|node| {
            let fd = open_node(&node, nonblock)?;
            Ok((node, fd))
        }) {
            Ok(found) => found,
            Err(NodeError::Denied(why)) => {
                log::warn!("guest op {op_id}: OPEN refused: {why}");
                return Err(Submitted::Refused { code: error_code::DENIED, text: format!("guest op {op_id}: {why}") });
            }
            Err(NodeError::NotFound(why)) => return Ok(failed(op_id, Errno::ENOENT, why)),
            Err(NodeError::Sys { errno, what }) => return Ok(failed(op_id, errno, what)),
        };
        let (node, fd) = fd;
        Ok(self.adopt(owner, op_id, fd, node.path, sigio))
    }

    /// Makes `fd` (opened from `path`) a new handle of `owner`, with its worker thread.
    fn adopt(&mut self, owner: Owner, op_id: u32, fd: OwnedFd, path: PathBuf, sigio: bool) -> GuestOpDone {
        let raw_fd = fd.as_raw_fd();
        if sigio {
            if let Err(e) = set_async_fd(raw_fd, true) {
                return failed(op_id, e, format!("{}: cannot enable SIGIO", path.display()));
            }
        }
        let handle = self.next_handle;
        let ctl = Arc::new(WorkerCtl {
            busy: AtomicBool::new(false),
            released: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let (jobs, rx) = channel();
        let (c, done, waker) = (Arc::clone(&ctl), self.done_tx.clone(), Arc::clone(&self.waker));
        let spawned = std::thread::Builder::new()
            .name(format!("gop-{handle}"))
            .stack_size(256 * 1024)
            .spawn(move || worker(handle, fd, rx, c, done, waker));
        if let Err(e) = spawned {
            return failed(op_id, Errno::EAGAIN, format!("cannot start a worker thread: {e}"));
        }
        self.next_handle += 1;
        log::debug!("guest op: handle {handle} is {} (sigio {sigio})", path.display());
        let sigio = sigio.then(|| SigioLog { count: 0, masks: Vec::new() });
        self.handles.insert(handle, Handle { owner, raw_fd, in_flight: 0, jobs, ctl, sigio });
        GuestOpDone {
            op_id,
            ret: i64::from(handle),
            data: path.display().to_string().into_bytes(),
            ..Default::default()
        }
    }

    fn debugfs(&self, op_id: u32, port: &str) -> Result<GuestOpDone, Submitted> {
        let dev = match resolve(port, &self.sysfs_root, &self.dev_root) {
            Ok(node) => node.node,
            Err(NodeError::Denied(why)) => {
                return Err(Submitted::Refused { code: error_code::DENIED, text: format!("guest op {op_id}: {why}") })
            }
            Err(NodeError::NotFound(why)) => return Ok(failed(op_id, Errno::ENOENT, why)),
            Err(NodeError::Sys { errno, what }) => return Ok(failed(op_id, errno, what)),
        };
        let path = self.sysfs_root.join("kernel/debug/virtio-ports").join(&dev);
        Ok(match std::fs::read(&path) {
            Ok(text) => GuestOpDone { op_id, ret: text.len() as i64, data: text, ..Default::default() },
            Err(e) => {
                let errno = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
                failed(op_id, errno, path.display().to_string())
            }
        })
    }
}

/// Interrupts the worker's current call, if it is in one (see the module docs).
fn cancel(ctl: &Arc<WorkerCtl>) {
    if !ctl.busy.load(Ordering::SeqCst) {
        return;
    }
    let Ok(guard) = ctl.thread.lock() else { return };
    let Some(thread) = *guard else { return };
    drop(guard);
    let ctl = Arc::clone(ctl);
    let spawned = std::thread::Builder::new().name("gop-cancel".into()).stack_size(64 * 1024).spawn(move || {
        let end = Instant::now() + CANCEL_BOUND;
        // Repeated on purpose: see the module docs (no signal can be lost this way).
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

fn worker(
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
    let send = |owner: Owner, d: GuestOpDone| {
        if done.send(Completion { owner, handle, done: d }).is_ok() {
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
                    send(owner, failed(op_id, Errno::ECANCELED, why));
                    continue;
                }
                let mut d = run(fd.as_fd(), op);
                ctl.busy.store(false, Ordering::SeqCst);
                d.op_id = op_id;
                d.elapsed_ns = start.elapsed().as_nanos() as u64;
                send(owner, d);
            }
            Job::Close { op_id, owner } => {
                drop(fd);
                send(owner, GuestOpDone { op_id, ..Default::default() });
                return;
            }
        }
    }
}

/// Runs READ, WRITE or POLL on `fd` (the worker fills in `op_id` and `elapsed_ns`).
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
        GuestOp::Write { seed, bytes, .. } => write_pattern(fd, seed, bytes),
        GuestOp::Poll { events, timeout_ms, .. } => {
            let timeout = PollTimeout::try_from(timeout_ms.max(-1)).unwrap_or(PollTimeout::NONE);
            match revents(fd, PollFlags::from_bits_truncate(events as i16), timeout) {
                Ok((n, mask)) => GuestOpDone { ret: i64::from(n), mask: mask.bits() as u16, ..Default::default() },
                Err(e) => GuestOpDone { ret: -1, errno: e as i32, ..Default::default() },
            }
        }
        other => GuestOpDone {
            ret: -1,
            errno: Errno::EINVAL as i32,
            data: format!("{other:?} does not run on a worker").into_bytes(),
            ..Default::default()
        },
    }
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

fn write_pattern(fd: BorrowedFd<'_>, seed: u64, total: u64) -> GuestOpDone {
    let mut buf = vec![0u8; MAX_IO];
    let mut dg = StreamDigest::new();
    let mut ret = 0i64;
    let mut errno = 0;
    while dg.bytes() < total {
        let off = dg.bytes();
        let n = ((total - off) as usize).min(MAX_IO);
        pattern::fill(seed, off, &mut buf[..n]);
        match nix::unistd::write(fd, &buf[..n]) {
            // A write that takes nothing would loop for ever: report it as the result.
            Ok(0) => {
                ret = 0;
                break;
            }
            Ok(k) => {
                ret = k as i64;
                dg.update(&buf[..k]);
            }
            Err(e) => {
                ret = -1;
                errno = e as i32;
                break;
            }
        }
    }
    GuestOpDone { ret, errno, bytes: dg.bytes(), digest: dg.digest(), ..Default::default() }
}

/// The node name (`vportNpM`) of a resolved path, for logs.
pub fn node_of(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Poll, Token};
    use nix::sys::stat::Mode;

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
        // Cancel until the worker is inside read(): the first cancels may find it idle.
        let end = Instant::now() + Duration::from_secs(10);
        let r = loop {
            g.submit(owner(), 4, GuestOp::Cancel { handle });
            if let Some(c) = g.completions().into_iter().find(|c| c.done.op_id == 3) {
                break c;
            }
            assert!(Instant::now() < end, "the blocked read was never interrupted");
            let mut events = mio::Events::with_capacity(4);
            poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
        };
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
        assert!(
            matches!(&r, Submitted::Refused { code: error_code::LIMIT, text } if text.contains("2 handles")),
            "{r:?}"
        );
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
}
