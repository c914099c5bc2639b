//! Opening, serving and closing the ports: the I/O the slot machine ([`crate::slot`]) asks
//! for. An open attempt ([`crate::slot::SlotAction::Open`]) ends in an [`OpenOutcome`]; a service call
//! ([`crate::slot::SlotAction::Serve`], or a readiness event) ends in a [`SlotInput`] saying whether the port
//! has work left, is closing, unplugged or failed; a close ([`crate::slot::SlotAction::Close`]) keeps the
//! port's counters and ring by name. Serving a port also runs the guest operations it accepted
//! ([`crate::guest_ops`]) and delivers their completions.

use super::{EventLoop, Known, LoopError, OpenPort};
use crate::discovery::Wanted;
use crate::fdio::{FdIo, OpenError};
use crate::guest_ops::{Owner, Submitted};
use crate::log::chain;
use crate::port::{Health, Port};
use crate::slot::{ByeFlush, CloseCause, OpenOutcome, Slot, SlotInput, BYE_FLUSH_BOUND};
use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::errno::Errno;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

impl EventLoop {
    /// Opens `w` ([`crate::slot::SlotAction::Open`]) and reports how it went to its slot machine.
    pub(super) fn try_open(&mut self, w: &Wanted) {
        let path = self.config.dev_root.join(&w.dev);
        // Whatever brought this attempt (a uevent, a back-off), a wait for permissions ends here;
        // an EACCES below starts a new one.
        self.perms.unwatch(&w.dev);
        let opened = if self.consoles.contains(&w.dev) {
            FdIo::open_console(&path).map_err(|e| OpenError { path: path.clone(), source: e.errno() })
        } else {
            FdIo::open_port(&path)
        };
        let discovered_console = self.consoles.contains(&w.dev) && !self.named_consoles.contains(&w.dev);
        let gone_console =
            discovered_console && matches!(&opened, Err(e) if matches!(e.source, Errno::ENODEV | Errno::ENXIO));
        let outcome = match opened {
            Err(_) if gone_console => OpenOutcome::Failed,
            Ok(io) => self.register_opened(w, &path, io),
            Err(e) if e.source == Errno::EBUSY => {
                self.stats.busy_retries += 1;
                self.env.ebusy_total += 1;
                self.carry.entry(w.name.clone()).or_default().counters.ebusy += 1;
                OpenOutcome::Busy
            }
            Err(e) if matches!(e.source, Errno::EACCES | Errno::EPERM) => {
                self.stats.open_failures += 1;
                match self.perms.watch(&w.dev, &path) {
                    Err(werr) => {
                        log::warn!(
                            "port {}: {}; cannot watch {} for a permission change ({werr}); waiting for a uevent",
                            w.name,
                            chain(&e),
                            path.display()
                        );
                        OpenOutcome::Denied { watched: false }
                    }
                    // The mode may have changed between the open and the watch: look once more.
                    Ok(()) => match FdIo::open_port(&path) {
                        Ok(io) => {
                            self.perms.unwatch(&w.dev);
                            self.register_opened(w, &path, io)
                        }
                        Err(_) => {
                            log::warn!(
                                "port {}: {}; waiting for its permissions to change (the packaged udev rule \
                                 99-vport.rules gives group vport read/write on org.vport.* nodes)",
                                w.name,
                                chain(&e)
                            );
                            OpenOutcome::Denied { watched: true }
                        }
                    },
                }
            }
            Err(e) if e.source == Errno::ENXIO && !self.consoles.contains(&w.dev) => {
                self.stats.open_failures += 1;
                let first = self.enxio_logged.insert(w.dev.clone());
                if first && self.config.discover_consoles {
                    log::info!(
                        "port {}: {}: a virtconsole port (or one just unplugged), served through its hvc line \
                         (--consoles); which line is not visible in the guest",
                        w.name,
                        chain(&e)
                    );
                } else if first {
                    log::warn!(
                        "port {}: {}: a virtconsole port (or one just unplugged); a console is served only as \
                         /dev/hvcN, and which hvcN is not visible in the guest: run with --consoles (every \
                         virtio console) or --port /dev/hvcN",
                        w.name,
                        chain(&e)
                    );
                }
                OpenOutcome::Failed
            }
            Err(e) => {
                self.stats.open_failures += 1;
                log::warn!("port {}: {}; waiting for a uevent", w.name, chain(&e));
                OpenOutcome::Failed
            }
        };
        self.apply(w, SlotInput::OpenEnded(outcome));
        if gone_console {
            // A discovered console whose line has no console behind it any more: forgotten.
            log::info!("console {}: no console behind {} any more; forgotten", w.name, path.display());
            self.apply(w, SlotInput::Unlisted { fd_unplugged: false });
            self.consoles.remove(&w.dev);
            return;
        }
        if outcome != OpenOutcome::Busy {
            return;
        }
        if let Some(Known { slot: Slot::Busy { delay, .. }, .. }) = self.slots.get(&w.dev) {
            log::warn!(
                "port {}: {} is busy (open elsewhere); retrying in {} ms",
                w.name,
                path.display(),
                delay.as_millis()
            );
        }
    }

    /// Registers a port opened from `path`: [`OpenOutcome::Opened`], or `Failed` (logged).
    fn register_opened(&mut self, w: &Wanted, path: &Path, io: FdIo) -> OpenOutcome {
        match self.register(&w.name, &w.dev, io) {
            Ok(()) => OpenOutcome::Opened,
            Err(e) => {
                self.stats.open_failures += 1;
                log::error!("port {}: cannot register {} with epoll: {e}", w.name, path.display());
                OpenOutcome::Failed
            }
        }
    }

    /// Registers an opened port with epoll (continuing its carried counters); its slot machine
    /// is told next, and has it served.
    pub(super) fn register(&mut self, name: &str, dev: &str, io: FdIo) -> Result<(), std::io::Error> {
        let token = Token(self.next_token);
        self.next_token += 1;
        let raw = io.raw_fd();
        self.poll.registry().register(&mut SourceFd(&raw), token, Interest::READABLE | Interest::WRITABLE)?;
        self.stats.opens += 1;
        log::info!("port {name}: opened {}", io.path().display());
        let mut carry = self.carry.remove(name).unwrap_or_default();
        carry.counters.opens += 1;
        let port = Port::with_carry(
            name.to_owned(),
            dev.to_owned(),
            io,
            Rc::clone(&self.info),
            Rc::clone(&self.settings),
            carry,
        );
        self.tokens.insert(token, dev.to_owned());
        self.open.insert(dev.to_owned(), OpenPort { token, port: Box::new(port) });
        self.env.ports_open = self.open.len() as u64;
        Ok(())
    }

    /// Opens a console port named with `--port` in raw mode and serves it; failure stops the
    /// agent (a named console must exist at start).
    pub(super) fn open_console(&mut self, path: &Path) -> Result<(), LoopError> {
        let err = |source| LoopError::Console { path: path.to_owned(), source };
        let io = FdIo::open_console(path).map_err(|e| err(Box::new(e)))?;
        let dev = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let console = Wanted { name: path.display().to_string(), dev };
        self.consoles.insert(console.dev.clone());
        self.register(&console.name, &console.dev, io).map_err(|e| err(Box::new(e)))?;
        self.apply(&console, SlotInput::OpenEnded(OpenOutcome::Opened));
        Ok(())
    }

    /// Serves the open port on `dev` and reports the result to its slot machine.
    pub(super) fn service(&mut self, dev: &str) {
        let Some(OpenPort { port, .. }) = self.open.get_mut(dev) else { return };
        let before = port.counters();
        let health = port.service(&mut self.env);
        let after = port.counters();
        if port.state().session().is_none() {
            // No host: no reply can be on its way.
            self.rechecks.forget(dev);
        } else if (after.bytes_in, after.bytes_out) != (before.bytes_in, before.bytes_out) {
            self.rechecks.traffic(dev, Instant::now());
        }
        self.run_guest_ops(dev);
        let Some(OpenPort { port, .. }) = self.open.get_mut(dev) else { return };
        let input = match health {
            Ok(h @ (Health::Open | Health::MoreWork)) => SlotInput::Served {
                more_work: h == Health::MoreWork,
                close: port.close_request().map(|ms| ByeFlush { reopen_after_ms: ms, written: port.queued() == 0 }),
            },
            Ok(Health::Unplugged) => SlotInput::Unplugged,
            Err(e) => {
                self.stats.io_errors += 1;
                log::error!("{}; closing it and retrying", chain(&e));
                SlotInput::IoFailed
            }
        };
        let port = Wanted { dev: dev.to_owned(), name: port.name().to_owned() };
        self.apply(&port, input);
    }

    /// Deregisters and closes an open port ([`crate::slot::SlotAction::Close`]), keeping its counters and
    /// ring by name.
    pub(super) fn close(&mut self, dev: &str, cause: CloseCause) {
        let Some(OpenPort { token, mut port }) = self.open.remove(dev) else { return };
        let cause = match cause {
            CloseCause::Commanded { bye_written } => {
                if !bye_written {
                    port.counters_mut().bye_flush_timeouts += 1;
                    log::warn!("port {}: BYE not written within {BYE_FLUSH_BOUND:?}; closing anyway", port.name());
                }
                port.close_cause()
            }
            CloseCause::Unplugged => {
                self.stats.unplugs += 1;
                "unplugged"
            }
            CloseCause::IoError => "i/o error",
            CloseCause::AgentExit => "agent exiting",
        };
        self.tokens.remove(&token);
        self.rechecks.forget(dev);
        let raw = port.io().raw_fd();
        if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&raw)) {
            log::debug!("port {}: deregister: {e}", port.name());
        }
        port.close(&mut self.env, cause);
        port.counters_mut().closes += 1;
        log::info!("port {} ({}): closed ({cause}); {:?}", port.name(), port.dev(), port.counters());
        let name = port.name().to_owned();
        self.carry.insert(name, port.into_carry());
        self.env.ports_open = self.open.len() as u64;
        self.release_guest_ops();
    }

    /// Runs the guest ops `dev`'s port accepted, queues the immediate answers (written on the
    /// next turn, within the write budget), and closes the handles of control sessions that
    /// ended.
    fn run_guest_ops(&mut self, dev: &str) {
        if let Some(OpenPort { port, .. }) = self.open.get_mut(dev) {
            let requests = port.take_guest_ops();
            let queued = (!requests.is_empty()).then(|| Wanted { dev: dev.to_owned(), name: port.name().to_owned() });
            for request in requests {
                if !port.session_is_ready(request.session) {
                    // A HELLO_REQUEST read in the same batch ended the session that asked.
                    log::info!("guest op {}: its session ended before it ran; dropped", request.op_id);
                    continue;
                }
                let owner = Owner { dev: dev.to_owned(), session: request.session };
                match self.guest_ops.submit(owner, request.op_id, request.op.clone()) {
                    Submitted::Done(done) => {
                        port.send_guest_op_done(request.session, done);
                    }
                    Submitted::Queued => {}
                    Submitted::Refused { code, text } => {
                        port.refuse_guest_op(&request, code, text);
                    }
                }
            }
            if let Some(port) = queued {
                self.apply(&port, SlotInput::WorkQueued);
            }
        }
        self.release_guest_ops();
    }

    /// Queues the completions guest-op workers reported on the control ports that asked; the
    /// next turn of the loop writes them (within the port's write budget, like all output).
    pub(super) fn deliver_guest_op_completions(&mut self) {
        for c in self.guest_ops.completions() {
            let Some(o) = self.open.get_mut(&c.owner.dev) else {
                log::info!("guest op {} finished after its control port {} closed", c.done.op_id, c.owner.dev);
                continue;
            };
            if o.port.send_guest_op_done(c.owner.session, c.done) {
                let port = Wanted { dev: c.owner.dev.clone(), name: o.port.name().to_owned() };
                self.apply(&port, SlotInput::WorkQueued);
            }
        }
    }

    /// Closes the guest-op handles whose control session is no longer READY.
    fn release_guest_ops(&mut self) {
        if self.guest_ops.open_handles() > 0 {
            let open = &self.open;
            self.guest_ops.release(|o| open.get(&o.dev).is_some_and(|p| p.port.session_is_ready(o.session)));
        }
    }
}
