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
//!
//! `mod.rs` holds the handle table: what is open, the limits, and the operations that do not
//! block (OPEN, DEBUGFS, SYSFS, SIGIO_COUNT, CANCEL, CLOSE); `worker.rs` holds the worker
//! threads that run the others, and the cancel; `vsock.rs` the listen and accept of
//! VSOCK_ACCEPT (a vsock stream as a handle). The event loop imports this module, never the
//! reverse.

mod vsock;
mod worker;

#[cfg(test)]
mod tests;

pub use self::worker::{Completion, Owner, CANCEL_BOUND, CANCEL_RETRY, CANCEL_SIGNAL, MAX_IO, READ_ALL_DATA};

use self::worker::{cancel, failed, worker, Job, WorkerCtl};
use crate::devnode::{open_node, resolve, NodeError};
use crate::discovery::list_sysfs;
use crate::fdio::{revents, set_async_fd};
use crate::settings::Limits;
use nix::errno::Errno;
use nix::poll::{PollFlags, PollTimeout};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;
use vport_common::message::{error_code, GuestOp, GuestOpDone};

/// SIGIO masks kept per handle.
pub const MAX_SIGIO_MASKS: usize = 64;

/// Setting up guest operations failed.
#[derive(Debug, Error)]
pub enum GuestOpsError {
    /// Installing the SIGUSR2 handler failed.
    #[error("cannot install the {CANCEL_SIGNAL} handler that interrupts guest operations")]
    Handler(#[source] Errno),
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
    /// worker. VSOCK_ACCEPT listens at once (a failure is [`Submitted::Done`]) and is
    /// [`Submitted::Queued`] on its new handle's worker, which accepts. An OPEN of something that
    /// is not a virtio-ports node, an OPEN or VSOCK_ACCEPT over the handle limit, and an
    /// operation over the per-handle queue limit, are [`Submitted::Refused`].
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
            GuestOp::VsockAccept { port, timeout_ms } => match self.vsock_accept(owner, op_id, port, timeout_ms) {
                Ok(submitted) => return submitted,
                Err(done) => done,
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
                    let busy = h.ctl.is_busy();
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
            op @ (GuestOp::Read { handle, .. }
            | GuestOp::Write { handle, .. }
            | GuestOp::Poll { handle, .. }
            | GuestOp::Loopback { handle, .. }
            | GuestOp::WriteEach { handle, .. }) => {
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
            if c.handle_gone {
                // Dropping its sender ends the worker once the jobs before are done.
                self.handles.remove(&c.handle);
            } else if let Some(h) = self.handles.get_mut(&c.handle) {
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
                h.ctl.release();
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
        if let Some(refused) = self.over_handle_limit(&owner, op_id) {
            return Err(refused);
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

    /// VSOCK_ACCEPT: listens at once (see [`vsock`]), then queues the accept on the new
    /// handle's worker: `Ok` is what became of the request ([`Submitted::Queued`], or refused
    /// over the handle limit), `Err` a completion at once (the listen failed).
    fn vsock_accept(&mut self, owner: Owner, op_id: u32, port: u32, timeout_ms: u32) -> Result<Submitted, GuestOpDone> {
        if let Some(refused) = self.over_handle_limit(&owner, op_id) {
            return Ok(refused);
        }
        let listener = vsock::listen(port).map_err(|(e, why)| {
            log::info!("guest op {op_id}: {why}");
            failed(op_id, e, why)
        })?;
        self.queue_accept(owner, op_id, listener, &format!("vsock port {port}"), timeout_ms)
    }

    /// A new handle of `owner` whose worker accepts one connection on `listener` (named `what`
    /// in logs) within `timeout_ms`: [`Submitted::Queued`], or `Err` a completion at once.
    fn queue_accept(
        &mut self,
        owner: Owner,
        op_id: u32,
        listener: OwnedFd,
        what: &str,
        timeout_ms: u32,
    ) -> Result<Submitted, GuestOpDone> {
        // No SIGIO on an accepted handle; -1 matches no fd in `on_sigio`.
        let (handle, jobs) = self
            .start_worker(owner.clone(), listener, -1, None)
            .map_err(|e| failed(op_id, Errno::EAGAIN, format!("cannot start a worker thread: {e}")))?;
        log::debug!("guest op: handle {handle} listens on {what} for {timeout_ms} ms");
        match jobs.send(Job::Accept { op_id, owner, timeout_ms }) {
            Ok(()) => {
                if let Some(h) = self.handles.get_mut(&handle) {
                    h.in_flight += 1;
                }
                Ok(Submitted::Queued)
            }
            Err(_) => {
                self.handles.remove(&handle);
                Err(failed(op_id, Errno::EIO, format!("handle {handle}: worker gone")))
            }
        }
    }

    /// ERROR 7 when `owner` holds the most handles allowed.
    fn over_handle_limit(&self, owner: &Owner, op_id: u32) -> Option<Submitted> {
        let max = self.limits.max_guest_op_handles;
        (self.handles.values().filter(|h| &h.owner == owner).count() >= max).then(|| Submitted::Refused {
            code: error_code::LIMIT,
            text: format!("guest op {op_id}: this session already holds {max} handles (the limit); close one"),
        })
    }

    /// Makes `fd` (opened from `path`) a new handle of `owner`, with its worker thread.
    fn adopt(&mut self, owner: Owner, op_id: u32, fd: OwnedFd, path: PathBuf, sigio: bool) -> GuestOpDone {
        let raw_fd = fd.as_raw_fd();
        if sigio {
            if let Err(e) = set_async_fd(raw_fd, true) {
                return failed(op_id, e, format!("{}: cannot enable SIGIO", path.display()));
            }
        }
        let sigio_log = sigio.then(|| SigioLog { count: 0, masks: Vec::new() });
        let handle = match self.start_worker(owner, fd, raw_fd, sigio_log) {
            Ok((handle, _)) => handle,
            Err(e) => return failed(op_id, Errno::EAGAIN, format!("cannot start a worker thread: {e}")),
        };
        log::debug!("guest op: handle {handle} is {} (sigio {sigio})", path.display());
        GuestOpDone {
            op_id,
            ret: i64::from(handle),
            data: path.display().to_string().into_bytes(),
            ..Default::default()
        }
    }

    /// Starts the worker of a new handle of `owner` on `fd` (`raw_fd`: what SIGIO reports it as)
    /// and lists it: the handle and the sender of its jobs.
    fn start_worker(
        &mut self,
        owner: Owner,
        fd: OwnedFd,
        raw_fd: RawFd,
        sigio: Option<SigioLog>,
    ) -> std::io::Result<(u32, Sender<Job>)> {
        let handle = self.next_handle;
        let ctl = Arc::new(WorkerCtl::new());
        let (jobs, rx) = channel();
        let (c, done, waker) = (Arc::clone(&ctl), self.done_tx.clone(), Arc::clone(&self.waker));
        std::thread::Builder::new()
            .name(format!("gop-{handle}"))
            .stack_size(256 * 1024)
            .spawn(move || worker(handle, fd, rx, c, done, waker))?;
        self.next_handle += 1;
        self.handles.insert(handle, Handle { owner, raw_fd, in_flight: 0, jobs: jobs.clone(), ctl, sigio });
        Ok((handle, jobs))
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

/// The node name (`vportNpM`) of a resolved path, for logs.
pub fn node_of(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}
